//! The readonly filter (nbdkit 1.38's; the upstream installed here is
//! 1.32, so no side-by-side run): without a file the export is read-only
//! to libnbd and qemu-img; with `readonly-file=` writes fail with EPERM
//! exactly while the file exists, and a log filter below sees none of
//! the refused requests.

use std::process::Command;
use std::time::Duration;

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, run, Server};
use crate::filter_log::log_lines;

#[test]
fn readonly_without_file_is_read_only() {
    if !require_nbdsh() || !require(&["qemu-img"]) {
        return;
    }
    let s = Server::ours(&["--filter=readonly", "memory", "1M"]);
    let out = nbdpy(&s.uri(), "print(h.is_read_only(), h.can_flush())\n");
    assert_eq!(out, "True True\n");
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write 0 512",
        &format!("nbd+unix:///?socket={}", s.socket.display()),
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ermission denied")
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "{text}"
    );
}

#[test]
fn readonly_file_switches_writes() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let log = dir.path().join("log");
    let s = Server::ours(&[
        "--filter=readonly",
        "--filter=log",
        "memory",
        "1M",
        &format!("readonly-file={}", ro.display()),
        &format!("logfile={}", log.display()),
    ]);
    let script = format!(
        r#"
import os
def t(name, f):
    try:
        f(); print(name, "ok")
    except nbd.Error as e:
        print(name, "error", e.errnum)
print(h.is_read_only())
t("write", lambda: h.pwrite(b"x" * 512, 0))
open({ro:?}, "w").close()
t("write-ro", lambda: h.pwrite(b"y" * 512, 0))
t("zero-ro", lambda: h.zero(512, 0))
t("trim-ro", lambda: h.trim(512, 0))
t("flush-ro", lambda: h.flush())
os.unlink({ro:?})
t("zero", lambda: h.zero(512, 512))
print(h.pread(1, 0))
h.shutdown()
"#,
        ro = ro.display().to_string()
    );
    let out = nbdpy(&s.uri(), &script);
    assert_eq!(
        out,
        "False\nwrite ok\nwrite-ro error 1\nzero-ro error 1\ntrim-ro error 1\nflush-ro ok\nzero ok\nbytearray(b'x')\n"
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let lines = log_lines(&log);
    let count = |op: &str| lines.iter().filter(|l| l.contains(op)).count();
    assert_eq!(count(" Write id="), 1, "{lines:#?}");
    assert_eq!(count(" Zero id="), 1, "{lines:#?}");
    assert_eq!(count(" Trim id="), 0, "{lines:#?}");
    assert_eq!(count(" Flush id="), 1, "{lines:#?}");
}

#[test]
fn readonly_file_given_twice_is_an_error() {
    let out = run(Command::new(nbdkit()).args([
        "--filter=readonly",
        "memory",
        "1M",
        "readonly-file=/a",
        "readonly-file=/b",
        "--run",
        "true",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple times"));
}
