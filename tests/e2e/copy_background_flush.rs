//! nbdcopy flushes an NBD destination that it keeps waiting (a slow
//! source) every 16M written, in the background, so the server's disk
//! works during the copy; a failed background flush fails the copy.
//! The source here is a pipe fed 8M at a time with pauses, so the
//! destination has nothing in flight between chunks; upstream nbdkit's
//! log filter shows the flushes, and a shell plugin fails them.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{random_file, require, run, Server};
use crate::copy_common::nbdcopy;
use crate::copy_errors::failed;

/// 72M of `img` through a slow pipe into `nbdcopy - URI`.
fn slow_copy(img: &Path, uri: &str) -> Output {
    let script = format!(
        "for i in 0 1 2 3 4 5 6 7 8; do \
           dd if={} bs=8M skip=$i count=1 status=none; sleep 0.05; \
         done | {} - '{}'",
        img.display(),
        nbdcopy().get_program().to_str().unwrap(),
        uri
    );
    run(Command::new("sh").arg("-c").arg(script))
}

#[test]
fn copy_background_flush_of_a_waiting_destination() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 72 << 20, 21);
    let log = dir.path().join("log");
    let dst = Server::upstream(&[
        "--filter=log",
        "memory",
        "72M",
        &format!("logfile={}", log.display()),
    ]);
    let o = slow_copy(&img, &dst.uri());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let check = dir.path().join("check.img");
    let o = run(nbdcopy().arg(dst.uri()).arg(&check));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&check).unwrap() == std::fs::read(&img).unwrap());
    drop(dst);
    let text = std::fs::read_to_string(&log).unwrap();
    let flushes = text.lines().filter(|l| l.contains(" Flush ")).count();
    assert_eq!(flushes, 4, "a flush after each 16M of the 72M: {text}");
}

#[test]
fn copy_background_flush_failure_fails_the_copy() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 72 << 20, 22);
    // (The error filter cannot fail flushes: a plugin in shell whose
    // writes go nowhere and whose flush fails.)
    let dst = Server::upstream(&[
        "eval",
        "get_size=echo 75497472",
        "pread=dd if=/dev/zero bs=$3 count=1 status=none",
        "pwrite=cat >/dev/null",
        "can_write=exit 0",
        "can_flush=exit 0",
        "flush=echo 'EIO flush failed on purpose' >&2; exit 1",
    ]);
    let o = slow_copy(&img, &dst.uri());
    failed(&o, &[&dst.uri(), "background flush: Input/output error"]);
}
