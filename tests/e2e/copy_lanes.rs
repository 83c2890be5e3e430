//! nbdcopy's lanes: with several threads and a multi-conn server, each
//! thread reads through a connection of its own (upstream nbdkit's log
//! filter shows the data requests spread over that many connections
//! besides the first), the copy is exact, and a failure on any lane
//! still stops the whole copy with exit status 1.

use std::collections::HashSet;

use crate::common::{random_file, require, run, word_after, Server};
use crate::copy_common::nbdcopy;
use crate::copy_errors::{failed, failing_writes_16m, stderr};

/// The connection numbers of the `Read` requests in a log filter file.
fn reading_connections(log: &str) -> HashSet<u32> {
    log.lines()
        .filter(|l| l.contains(" Read "))
        .filter_map(|l| word_after(l, "connection=")?.parse().ok())
        .collect()
}

#[test]
fn copy_lanes_one_connection_per_thread() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 24 << 20, 7);
    let log = dir.path().join("log");
    let src = Server::upstream(&[
        "--filter=log",
        "file",
        img.to_str().unwrap(),
        &format!("logfile={}", log.display()),
    ]);
    let out = dir.path().join("out.img");
    let o = run(nbdcopy()
        .args(["-C", "3", "-T", "3", "-v"])
        .arg(src.uri())
        .arg(&out));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("connections=3 "), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    drop(src);
    let conns = reading_connections(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(conns.len(), 3, "reads came on connections {conns:?}");
    assert!(
        !conns.contains(&1),
        "the first connection only asks for extents"
    );
}

#[test]
fn copy_lanes_failure_on_one_lane_stops_all() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    random_file(&img, 16 << 20, 8);
    let dst = failing_writes_16m();
    let o = run(nbdcopy()
        .args(["-C", "4", "-T", "4", "--request-size=65536"])
        .arg(&img)
        .arg(dst.uri()));
    failed(&o, &["write at offset", "No space left on device"]);
    let err = stderr(&o);
    assert_eq!(err.matches("nbdcopy: ").count(), 1, "one message: {err}");
}
