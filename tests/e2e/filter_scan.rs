//! The scan filter end to end, against upstream's: while a client is
//! connected the layers below (a log filter, then the memory plugin or
//! the cache filter) get cache requests over the whole disk in
//! `scan-size` steps; none for another export, none (with a warning)
//! over a nocache filter or under noparallel.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, run, Server};
use crate::filter_log::log_lines;

/// Connect a client for a second and read at `read_at` (if any); the
/// cache requests the log filter saw.
fn caches(prog: &Path, args: &[&str], export: &str, read_at: Option<u64>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let mut a = vec!["--filter=scan", "--filter=log"];
    a.extend_from_slice(args);
    a.push(&l);
    let s = Server::start_with(prog, &a);
    let read = read_at.map_or(String::new(), |o| format!("h.pread(512, {o})\n"));
    nbdpy(
        &s.uri_export(export),
        &format!("{read}import time\ntime.sleep(1)\nh.shutdown()\n"),
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    log_lines(&log)
        .into_iter()
        .filter(|l| l.contains(" Cache id="))
        .collect()
}

#[test]
fn scan_prefetches_the_disk_as_upstream() {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return;
    }
    for args in [
        &["memory", "8M", "scan-size=1M"][..],
        &["--filter=cache", "memory", "4M"],
        &["memory", "8M", "scan-size=1M", "scan-ahead=false"],
    ] {
        let ours = caches(&nbdkit(), args, "", None);
        assert_eq!(
            ours,
            caches(Path::new("nbdkit"), args, "", None),
            "{args:?}"
        );
        let step = if args.contains(&"scan-size=1M") {
            1 << 20
        } else {
            2 << 20
        };
        let size: u64 = if args.contains(&"8M") {
            8 << 20
        } else {
            4 << 20
        };
        assert_eq!(ours.len() as u64, size / step, "{args:?}: {ours:#?}");
        assert!(ours[0].contains(" offset=0x0 "), "{ours:#?}");
    }
}

#[test]
fn scan_skips_ahead_of_a_reader() {
    if !require_nbdsh() {
        return;
    }
    // A read near the end moves the scan on to just after it (the delay
    // filter keeps the scan from finishing before the read arrives).
    let args = [
        "--filter=delay",
        "memory",
        "64M",
        "scan-size=1M",
        "delay-cache=20ms",
    ];
    let lines = caches(&nbdkit(), &args, "", Some(60 << 20));
    assert!(lines.len() < 64, "{}", lines.len());
    assert!(
        lines.iter().any(|l| l.contains(" offset=0x3c00200 ")),
        "{lines:#?}"
    );
    // Only the default export is scanned.
    assert!(caches(&nbdkit(), &["memory", "8M"], "other", None).is_empty());
}

#[test]
fn scan_warns_when_it_cannot_prefetch() {
    if !require(&["nbdinfo"]) {
        return;
    }
    for (stack, warning) in [
        (
            ["--filter=scan", "--filter=nocache"],
            "does not support NBD_CMD_CACHE",
        ),
        (
            ["--filter=noparallel", "--filter=scan"],
            "does not support the PARALLEL thread model",
        ),
    ] {
        let out = run(Command::new(nbdkit()).args(["-U", "-"]).args(stack).args([
            "memory",
            "8M",
            "--run",
            "nbdinfo \"$uri\" >/dev/null",
        ]));
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(warning), "{err}");
    }
    let out = run(Command::new(nbdkit()).args(["--filter=scan", "memory", "1M", "scan-size=3M"]));
    assert_eq!(out.status.code(), Some(1));
}
