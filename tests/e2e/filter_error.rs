//! The error filter end to end: injected errors reach libnbd's clients
//! with the right errno, only for the chosen requests, only while the
//! trigger file exists.

use std::process::Command;

use crate::common::{nbdpy, require, require_nbdsh, run, Server};

#[test]
fn error_rate_pread_gives_eio() {
    if !require_nbdsh() || !require(&["nbdcopy"]) {
        return;
    }
    let s = Server::ours(&["--filter=error", "memory", "1M", "error-pread-rate=100%"]);
    nbdpy(
        &s.uri(),
        "try:\n  h.pread(512, 0)\n  raise SystemExit('the read worked')\n\
         except nbd.Error as e:\n  assert e.errnum == errno.EIO, e\n\
         h.pwrite(b'a' * 512, 0)\n\
         h.zero(512, 512)\n\
         h.shutdown()\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("nbdcopy")
        .arg(s.uri())
        .arg(dir.path().join("out")));
    assert!(
        !out.status.success(),
        "nbdcopy read through injected errors"
    );
}

#[test]
fn error_chosen_errno_for_writes_only() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&[
        "--filter=error",
        "memory",
        "1M",
        "error=ENOSPC",
        "error-pwrite-rate=1",
        "error-zero-rate=1",
    ]);
    nbdpy(
        &s.uri(),
        "for f in (lambda: h.pwrite(b'a' * 512, 0), lambda: h.zero(512, 0)):\n\
         \x20 try:\n    f()\n    raise SystemExit('the write worked')\n\
         \x20 except nbd.Error as e:\n    assert e.errnum == errno.ENOSPC, e\n\
         h.pread(512, 0)\n\
         h.trim(512, 0)\n\
         h.flush()\n\
         h.shutdown()\n",
    );
}

#[test]
fn error_file_triggers_errors() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("inject");
    let file = format!("error-file={}", trigger.display());
    let s = Server::ours(&["--filter=error", "memory", "1M", "error-rate=1", &file]);
    nbdpy(
        &s.uri(),
        &format!(
            "import os\n\
             t = {:?}\n\
             h.pread(512, 0)\n\
             open(t, 'w').close()\n\
             try:\n  h.pread(512, 0)\n  raise SystemExit('no error injected')\n\
             except nbd.Error as e:\n  assert e.errnum == errno.EIO, e\n\
             os.unlink(t)\n\
             h.pread(512, 0)\n\
             h.shutdown()\n",
            trigger.to_str().unwrap()
        ),
    );
}

#[test]
fn error_extents_fail_nbdinfo_map() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let s = Server::ours(&["--filter=error", "memory", "1M", "error-extents-rate=100%"]);
    let out = run(Command::new("nbdinfo").arg("--map").arg(s.uri()));
    assert!(
        !out.status.success(),
        "nbdinfo --map worked through injected errors"
    );
    let out = run(Command::new("nbdinfo").arg("--size").arg(s.uri()));
    assert!(out.status.success());
}

#[test]
fn error_rate_is_random() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["--filter=error", "memory", "1M", "error-cache-rate=0.5"]);
    nbdpy(
        &s.uri(),
        "fails = 0\n\
         for i in range(400):\n\
         \x20 try:\n    h.cache(512, 0)\n\
         \x20 except nbd.Error:\n    fails += 1\n\
         assert 120 < fails < 280, fails\n\
         h.shutdown()\n",
    );
}
