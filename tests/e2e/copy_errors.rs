//! Failures: upstream nbdkit's error filter failing reads, writes,
//! zeroes or extents part way through a copy; a destination too small
//! or read-only; bad arguments. Every one ends nbdcopy with exit status
//! 1 and one message naming the endpoint, the operation, the offset and
//! the error, and progress never reaches 100%.

use std::process::Output;

use crate::common::{random_file, require, run, word_after, Server};
use crate::copy_common::nbdcopy;

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Check a failed run: status 1 and an `nbdcopy: ...` line with every
/// piece of `want`.
pub fn failed(o: &Output, want: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("nbdcopy: "))
        .unwrap_or_else(|| panic!("no nbdcopy message in {err:?}"));
    for w in want {
        assert!(line.contains(w), "{w:?} not in {line:?}");
    }
    line.to_string()
}

/// The offset in a `... at offset N failed: ...` message.
fn offset(line: &str) -> u64 {
    word_after(line, "at offset ").unwrap().parse().unwrap()
}

/// Upstream `nbdkit memory 16M` failing 5% of its writes with ENOSPC.
pub fn failing_writes_16m() -> Server {
    Server::upstream(&[
        "--filter=error",
        "memory",
        "16M",
        "error=ENOSPC",
        "error-pwrite-rate=0.05",
    ])
}

#[test]
fn copy_errors_read_fails_mid_copy() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 16 << 20, 1);
    let src = Server::upstream(&[
        "--filter=error",
        "file",
        img.to_str().unwrap(),
        "error=EIO",
        "error-pread-rate=0.05",
    ]);
    let out = dir.path().join("out.img");
    let o = run(nbdcopy()
        .args(["--request-size=65536", "--progress=2"])
        .arg(src.uri())
        .arg(&out));
    let line = failed(
        &o,
        &[&src.uri(), "read at offset", "failed: Input/output error"],
    );
    assert_eq!(offset(&line) % 65536, 0);
    assert!(!stderr(&o).contains("100/100"), "progress reached 100%");
}

#[test]
fn copy_errors_write_fails_mid_copy() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 16 << 20, 2);
    for opts in [&[][..], &["--synchronous"]] {
        // A server per copy: upstream nbdkit 1.32 sometimes dies of an
        // assertion (raw_send_socket: sock >= 0) when a client goes
        // away with writes in flight, as a failing copy does.
        let dst = failing_writes_16m();
        let o = run(nbdcopy()
            .args(opts)
            .arg("--request-size=65536")
            .arg(&img)
            .arg(dst.uri()));
        failed(
            &o,
            &[
                &dst.uri(),
                "write at offset",
                "failed: No space left on device",
            ],
        );
    }
}

#[test]
fn copy_errors_zero_and_extents_fail() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    // Data, then a hole: zero requests for the hole.
    random_file(&img, 1 << 20, 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // (noextents: a fresh disk would say it reads as zeroes already, and
    // get no zero requests.)
    let dst = Server::upstream(&[
        "--filter=error",
        "--filter=noextents",
        "memory",
        "8M",
        "error=EIO",
        "error-zero-rate=1",
    ]);
    let o = run(nbdcopy().arg(&img).arg(dst.uri()));
    failed(&o, &[&dst.uri(), "zero at offset", "Input/output error"]);

    let src = Server::upstream(&[
        "--filter=error",
        "memory",
        "8M",
        "error=EIO",
        "error-extents-rate=1",
    ]);
    let o = run(nbdcopy().arg(src.uri()).arg("null:"));
    failed(
        &o,
        &[
            &src.uri(),
            "extents at offset 0 failed",
            "Input/output error",
        ],
    );
}

#[test]
fn copy_errors_destination_too_small() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 2 << 20, 4);
    let log = dir.path().join("log");
    let dst = Server::upstream(&[
        "--filter=log",
        "memory",
        "1M",
        &format!("logfile={}", log.display()),
    ]);
    let o = run(nbdcopy().arg(&img).arg(dst.uri()));
    failed(&o, &["destination size is smaller than source size"]);
    drop(dst);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("Write") && !text.contains("Zero"),
        "data moved: {text}"
    );

    // A stream is checked as it goes.
    let dst = Server::upstream(&["memory", "1M"]);
    let script = format!(
        "cat {} | {} - '{}'",
        img.display(),
        nbdcopy().get_program().to_str().unwrap(),
        dst.uri()
    );
    let o = run(std::process::Command::new("sh").arg("-c").arg(script));
    failed(
        &o,
        &[
            &dst.uri(),
            "write at offset 1048576",
            "larger than the destination",
        ],
    );

    // A larger destination is fine.
    let dst = Server::upstream(&["memory", "3M"]);
    let o = run(nbdcopy().arg(&img).arg(dst.uri()));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn copy_errors_read_only_destination() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dst = Server::upstream(&["-r", "memory", "1M"]);
    let o = run(nbdcopy().arg(dst.uri()).arg(dst.uri()));
    failed(&o, &[&dst.uri(), "read-only"]);
}

#[test]
fn copy_errors_bad_arguments() {
    for args in [
        &["onlyone"][..],
        &["a", "b", "c"],
        &["--no-such-option", "a", "b"],
        &["[", "nbdkit", "memory", "1M", "null:"],
    ] {
        let o = run(nbdcopy().args(args));
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).contains("nbdcopy [--allocated]"),
            "{args:?}: no usage"
        );
    }
    // A bad option value: the message alone, as libnbd's nbdcopy.
    for (args, msg) in [
        (
            &["--request-size=1000", "a", "b"][..],
            "--request-size: must be a power of 2",
        ),
        (&["-S", "100", "a", "b"], "--sparse: must be a power of 2"),
        (&["-C", "0", "a", "b"], "--connections: could not parse: 0"),
    ] {
        let o = run(nbdcopy().args(args));
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(e.starts_with(&format!("nbdcopy: {msg}")), "{args:?}: {e}");
        assert!(!e.contains("nbdcopy [--allocated]"), "{args:?}: usage");
    }
    let o = run(nbdcopy().args(["/nonexistent/x", "null:"]));
    failed(&o, &["/nonexistent/x: No such file or directory"]);
    let o = run(nbdcopy().arg("--help"));
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("SOURCE DESTINATION")
    );
    let o = run(nbdcopy().arg("-V"));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("nbdcopy 1.14"));
}
