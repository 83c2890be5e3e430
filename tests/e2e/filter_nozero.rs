//! The nozero filter end to end: what libnbd sees advertised, and (with
//! a log filter below) what reaches the plugin.

use std::time::Duration;

use crate::common::{nbdpy, require_nbdsh, Server};
use crate::filter_log::log_lines;

/// Run `script` over nozero (with `args`) over a log filter over memory;
/// the log lines.
fn logged(args: &[&str], script: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let l = format!("logfile={}", log.display());
    let mut a = vec![
        "--filter=nozero",
        "--filter=log",
        "memory",
        "1M",
        l.as_str(),
    ];
    a.extend_from_slice(args);
    let s = Server::ours(&a);
    nbdpy(&s.uri(), script);
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    log_lines(&log)
}

fn count(lines: &[String], what: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.contains(&format!(" {what} id=")))
        .count()
}

#[test]
fn nozero_default_hides_write_zeroes() {
    if !require_nbdsh() {
        return;
    }
    let lines = logged(
        &[],
        "assert not h.can_zero()\n\
         assert not h.can_fast_zero()\n\
         h.pwrite(bytes(4096), 0)\n\
         h.shutdown()\n",
    );
    assert_eq!(count(&lines, "Write"), 1);
    assert_eq!(count(&lines, "Zero"), 0);
}

#[test]
fn nozero_emulate_writes_zeroes_below() {
    if !require_nbdsh() {
        return;
    }
    let lines = logged(
        &["zeromode=emulate"],
        "assert h.can_zero()\n\
         assert h.can_fast_zero()\n\
         h.pwrite(b'x' * 8192, 0)\n\
         h.zero(8192, 0)\n\
         assert h.pread(8192, 0) == bytes(8192)\n\
         try:\n  h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)\n  raise SystemExit('fast zero worked')\n\
         except nbd.Error as e:\n  assert e.errnum == errno.ENOTSUP, e\n\
         h.shutdown()\n",
    );
    assert_eq!(count(&lines, "Zero"), 0, "{}", lines.join("\n"));
    assert!(lines
        .iter()
        .any(|l| l == "connection=1 Write id=2 offset=0x0 count=0x2000 fua=0 ..."));
}

#[test]
fn nozero_notrim_and_plugin_modes() {
    if !require_nbdsh() {
        return;
    }
    let lines = logged(&["zeromode=notrim"], "h.zero(4096, 0)\nh.shutdown()\n");
    assert!(lines
        .iter()
        .any(|l| l == "connection=1 Zero id=1 offset=0x0 count=0x1000 trim=0 fua=0 fast=0 ..."));
    let lines = logged(
        &["zeromode=plugin", "fastzeromode=ignore"],
        "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)\nh.shutdown()\n",
    );
    assert!(lines
        .iter()
        .any(|l| l == "connection=1 Zero id=1 offset=0x0 count=0x1000 trim=1 fua=0 fast=0 ..."));
    let lines = logged(
        &["zeromode=plugin", "fastzeromode=none"],
        "assert h.can_zero()\nassert not h.can_fast_zero()\nh.shutdown()\n",
    );
    assert_eq!(count(&lines, "Zero"), 0);
    logged(
        &["zeromode=plugin", "fastzeromode=slow"],
        "assert h.can_fast_zero()\n\
         try:\n  h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)\n  raise SystemExit('fast zero worked')\n\
         except nbd.Error as e:\n  assert e.errnum == errno.ENOTSUP, e\n\
         h.zero(512, 0)\n\
         h.shutdown()\n",
    );
}
