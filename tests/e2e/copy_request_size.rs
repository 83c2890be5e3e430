//! nbdcopy's request size: writes to a server without multi-conn (all
//! of them on one connection, as to qemu-nbd) go in 2M requests, to a
//! server with multi-conn in libnbd's 256K, and `--request-size` wins
//! over both. Upstream nbdkit's log filter shows the sizes written; its
//! multi-conn filter takes multi-conn away.

use crate::common::{random_file, require, run, word_after, Server};
use crate::copy_common::nbdcopy;

/// The largest `count=` of the `Write` requests in a log filter file.
fn largest_write(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(" Write "))
        .filter_map(|l| u64::from_str_radix(word_after(l, "count=0x")?, 16).ok())
        .max()
        .unwrap_or(0)
}

/// Copy 8M of random data into upstream `nbdkit memory` (multi-conn
/// taken away unless `multi_conn`) with `opts`; the copy must be exact.
/// Returns the largest write the server saw.
fn largest_write_copying(multi_conn: bool, opts: &[&str]) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 8 << 20, 11);
    let log = dir.path().join("log");
    let logfile = format!("logfile={}", log.display());
    let mut args = vec!["--filter=log", "--filter=multi-conn", "memory", "8M"];
    args.push(if multi_conn {
        "multi-conn-mode=plugin"
    } else {
        "multi-conn-mode=disable"
    });
    args.push(&logfile);
    let dst = Server::upstream(&args);
    let o = run(nbdcopy().args(opts).arg(&img).arg(dst.uri()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let check = dir.path().join("check.img");
    let o = run(nbdcopy().arg(dst.uri()).arg(&check));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&check).unwrap(), std::fs::read(&img).unwrap());
    drop(dst);
    largest_write(&std::fs::read_to_string(&log).unwrap())
}

#[test]
fn copy_request_size_2m_writes_without_multi_conn() {
    if !require(&["nbdkit"]) {
        return;
    }
    assert_eq!(largest_write_copying(false, &[]), 2 << 20);
}

#[test]
fn copy_request_size_256k_writes_with_multi_conn() {
    if !require(&["nbdkit"]) {
        return;
    }
    assert_eq!(largest_write_copying(true, &[]), 256 << 10);
}

#[test]
fn copy_request_size_option_wins() {
    if !require(&["nbdkit"]) {
        return;
    }
    assert_eq!(
        largest_write_copying(false, &["--request-size=512K"]),
        512 << 10
    );
}
