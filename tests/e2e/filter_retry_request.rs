//! The retry-request filter end to end, against upstream's: with the
//! error filter failing every read below a log filter, a read is tried
//! 1 + retries times before the client sees the error; a failure that
//! goes away is not seen at all.

use std::path::Path;
use std::time::Duration;

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, Server};
use crate::filter_log::log_lines;

const READ: &str =
    "try:\n  h.pread(512, 0)\n  print('ok')\nexcept nbd.Error as e:\n  print('error', e.errnum)\n";

/// Run `script` over retry-request, log, error and memory with `args`:
/// its output and the reads the log saw.
fn reads(prog: &Path, args: &[&str], script: &str) -> (String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let mut a = vec![
        "--filter=retry-request",
        "--filter=log",
        "--filter=error",
        "memory",
        "1M",
        "retry-request-delay=1",
        &l,
    ];
    a.extend_from_slice(args);
    let s = Server::start_with(prog, &a);
    let out = nbdpy(&s.uri(), script);
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let n = log_lines(&log)
        .iter()
        .filter(|l| l.contains(" Read id="))
        .count();
    (out, n)
}

#[test]
fn retry_request_retries_as_upstream() {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return;
    }
    for (args, want) in [
        (
            &[
                "error-pread-rate=1",
                "error=ENOSPC",
                "retry-request-retries=1",
            ][..],
            ("error 28\n", 2),
        ),
        (
            &["error-pread-rate=1", "error=EIO", "retry-request-retries=0"][..],
            ("error 5\n", 1),
        ),
    ] {
        let ours = reads(&nbdkit(), args, READ);
        assert_eq!(ours, reads(Path::new("nbdkit"), args, READ), "{args:?}");
        assert_eq!((ours.0.as_str(), ours.1), want, "{args:?}");
    }
}

#[test]
fn retry_request_hides_a_passing_failure() {
    if !require_nbdsh() {
        return;
    }
    // The error filter fails reads while its trigger file exists; the
    // client removes it while the filter waits to retry.
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail");
    std::fs::write(&trigger, b"").unwrap();
    let script = format!(
        "import os, time\n\
         c = h.aio_pread(nbd.Buffer(512), 0)\n\
         h.poll(10)\n\
         time.sleep(1.5)\n\
         os.unlink({:?})\n\
         while not h.aio_command_completed(c): h.poll(-1)\n\
         print('ok')\n",
        trigger.display().to_string()
    );
    let (out, n) = reads(
        &nbdkit(),
        &[
            "error-pread-rate=1",
            &format!("error-file={}", trigger.display()),
            "retry-request-retries=5",
        ],
        &script,
    );
    assert_eq!(out, "ok\n");
    assert!((2..=4).contains(&n), "{n} reads");
}

#[test]
fn retry_request_bad_parameters() {
    for bad in [
        "retry-request-delay=0",
        "retry-request-retries=1001",
        "retry-request-open=x",
    ] {
        let out = crate::common::run(std::process::Command::new(nbdkit()).args([
            "--filter=retry-request",
            "memory",
            "1M",
            bad,
            "--run",
            "true",
        ]));
        assert_eq!(out.status.code(), Some(1), "{bad}");
    }
}
