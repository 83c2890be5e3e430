//! The checkwrite filter end to end: copying an export onto itself with
//! libnbd's nbdcopy and qemu-img passes, copying other data onto it
//! fails; the same requests give the same answers as upstream's filter;
//! a log filter below sees a read-only plugin that is never written.

use std::process::Command;
use std::time::Duration;

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, run, same_as_upstream, Server};
use crate::filter_log::log_lines;

const SCRIPT: &str = r#"
h.set_strict_mode(0)
print("ro", h.is_read_only(), "flush", h.can_flush(), "fua", h.can_fua(), "trim", h.can_trim(),
      "zero", h.can_zero(), "fast", h.can_fast_zero(), "cache", h.can_cache())
def t(name, f):
    try:
        f(); print(name, "ok")
    except nbd.Error as e:
        print(name, "error", e.errnum)
t("write-same", lambda: h.pwrite(b"\1\2\3", 0))
t("write-diff", lambda: h.pwrite(b"\1\2\4", 0))
t("write-fua", lambda: h.pwrite(b"\0", 100, nbd.CMD_FLAG_FUA))
t("zero-hole", lambda: h.zero(4096, 0x10000))
t("zero-data", lambda: h.zero(512, 0))
t("fast-zero-hole", lambda: h.zero(4096, 0x10000, nbd.CMD_FLAG_FAST_ZERO))
t("fast-zero-data", lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO))
t("trim-hole", lambda: h.trim(4096, 0x10000))
t("trim-data", lambda: h.trim(512, 0))
t("flush", lambda: h.flush())
t("cache", lambda: h.cache(512, 0))
"#;

#[test]
fn checkwrite_answers_as_upstream() {
    let args = ["--filter=checkwrite", "data", "1 2 3", "size=1M"];
    if let Some(out) = same_as_upstream(&args, SCRIPT) {
        assert!(out.contains("write-diff error 5"), "{out}");
        assert!(out.contains("fast-zero-data error 95"), "{out}");
    }
}

#[test]
fn checkwrite_copy_onto_itself() {
    if !require(&["nbdcopy", "qemu-img"]) {
        return;
    }
    let data = "@32768 1 @1048576 2 3 @3145728 4";
    for copy in [
        "nbdcopy \"$uri\" \"$uri\"",
        "qemu-img convert -n -f raw -O raw \"$uri\" \"$uri\"",
    ] {
        let out = run(Command::new(nbdkit()).args([
            "-U",
            "-",
            "--filter=checkwrite",
            "data",
            data,
            "size=4M",
            "--run",
            copy,
        ]));
        assert!(out.status.success(), "{copy}: {out:?}");
    }
    // Other data copied in must fail.
    let out = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=checkwrite",
        "data",
        data,
        "size=4M",
        "--run",
        "nbdcopy -- [ nbdkit pattern 4M ] \"$uri\"",
    ]));
    assert!(!out.status.success(), "a wrong copy must fail");
}

#[test]
fn checkwrite_never_writes_the_plugin() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let s = Server::ours(&["--filter=checkwrite", "--filter=log", "memory", "1M", &l]);
    nbdpy(
        &s.uri(),
        "h.pwrite(bytes(4096), 0)\nh.zero(8192, 4096)\nh.flush()\nh.shutdown()\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let lines = log_lines(&log);
    let connect = lines.iter().find(|l| l.contains(" Connect ")).unwrap();
    assert!(connect.contains(" write=0 "), "{connect}");
    for op in [" Write ", " Zero ", " Flush ", " Trim "] {
        assert!(!lines.iter().any(|l| l.contains(op)), "{op}: {lines:#?}");
    }
    assert!(
        lines.iter().any(|l| l.contains(" Read ")),
        "writes are checked by reads"
    );
}
