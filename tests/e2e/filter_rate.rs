//! The rate filter end to end: libnbd's nbdcopy through our nbdkit with
//! `--filter=rate` takes the time the rate says, and a rate file changes
//! the speed of a copy under way.
//!
//! These are the suite's behaviour checks on timing: the expected time is
//! computed from the rate (in bits per second, `M` = 2^20, the bucket
//! starting full), and the measured time must be within 10% of it.

use std::process::Command;
use std::time::Instant;

use crate::common::{require, require_nbdsh, run_ok, Server, PYTHON};

#[test]
fn rate_limits_nbdcopy() {
    if !require(&["nbdcopy"]) {
        return;
    }
    // 20 MiB at 32 Mbit/s (4 MiB/s) with a 0.5 s bucket: 2 MiB go at
    // once, the other 18 MiB take 4.5 s.
    let srv = Server::ours(&[
        "--filter=rate",
        "pattern",
        "20M",
        "rate=32M",
        "burstiness=0.5",
    ]);
    let t = Instant::now();
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg("null:"));
    let secs = t.elapsed().as_secs_f64();
    let bits = 20.0 * 8.0 * 1048576.0;
    let rate = 32.0 * 1048576.0;
    let expected = (bits - rate * 0.5) / rate;
    eprintln!("rate: nbdcopy took {secs:.3} s, expected {expected:.3} s");
    assert!(
        (secs - expected).abs() <= expected * 0.10,
        "nbdcopy took {secs:.3} s, expected {expected:.3} s within 10%"
    );
}

#[test]
fn rate_connection_rate_limits_each_connection() {
    if !require(&["nbdcopy"]) {
        return;
    }
    // Per connection 8 Mbit/s, global 1G (no limit in practice): one
    // connection copying 4 MiB with a 0.25 s bucket takes 3.75 s.
    let srv = Server::ours(&[
        "--filter=rate",
        "pattern",
        "4M",
        "connection-rate=8M",
        "rate=1G",
        "burstiness=0.25",
    ]);
    let t = Instant::now();
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=1")
            .arg(srv.uri())
            .arg("null:"),
    );
    let secs = t.elapsed().as_secs_f64();
    let expected = (4.0 * 8.0 - 8.0 * 0.25) / 8.0;
    eprintln!("connection-rate: took {secs:.3} s, expected {expected:.3} s");
    assert!(
        (secs - expected).abs() <= expected * 0.10,
        "took {secs:.3} s, expected {expected:.3} s within 10%"
    );
}

#[test]
fn rate_file_changes_speed_mid_copy() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rf = dir.path().join("rate");
    std::fs::write(&rf, "16M\n").unwrap();
    let srv = Server::ours(&[
        "--filter=rate",
        "pattern",
        "256M",
        &format!("rate-file={}", rf.display()),
        "burstiness=0.25",
    ]);
    // Read sequentially for 2 s at 16 Mbit/s (2 MiB/s), switch the file
    // to 64 Mbit/s (8 MiB/s) atomically, read on for 3 s, and report the
    // bytes read in one-second windows.
    let script = format!(
        r#"
import nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
rf = {rf:?}
t0 = time.monotonic()
log = []
off = 0
changed = None
while time.monotonic() - t0 < 5.0:
    h.pread(131072, off)
    off += 131072
    now = time.monotonic() - t0
    log.append((now, off))
    if changed is None and now >= 2.0:
        with open(rf + ".new", "w") as f:
            f.write("64M\n")
        os.rename(rf + ".new", rf)
        changed = now
def window(a, b):
    xs = [o for (t, o) in log if a <= t <= b]
    return (max(xs) - min(xs)) / (b - a) / 1048576 if len(xs) > 1 else 0.0
print(window(0.8, 1.8), window(changed + 2.0, changed + 3.0))
"#,
        rf = rf.display().to_string()
    );
    let out = run_ok(Command::new(PYTHON).arg("-c").arg(script).arg(srv.uri()));
    let v: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (before, after) = (v[0], v[1]);
    eprintln!("rate-file: {before:.2} MiB/s before, {after:.2} MiB/s after the change");
    assert!((before - 2.0).abs() < 0.3, "before: {before} MiB/s, want 2");
    assert!((after - 8.0).abs() < 1.2, "after: {after} MiB/s, want 8");
}
