//! The noextents filter end to end: nbdinfo --map sees all data.

use std::process::Command;

use crate::common::{require, run_ok, Server};
use crate::filter_offset::{map, sparse_file};

#[test]
fn noextents_map_is_all_data() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sparse.img");
    sparse_file(&disk);
    let d = disk.to_str().unwrap();
    // Without the filter the holes show.
    let plain = map(&Server::ours(&["file", d]).uri());
    assert!(plain.len() > 1, "{plain:?}");
    let s = Server::ours(&["--filter=noextents", "file", d]);
    assert_eq!(map(&s.uri()), vec![(0, 1 << 20, 0)]);
    let out = run_ok(Command::new("nbdinfo").arg("--map").arg(s.uri()));
    assert!(out.contains("data"), "{out}");
    // Upstream prints the same.
    if require(&["nbdkit"]) {
        let theirs = Server::upstream(&["--filter=noextents", "file", d]);
        let t = run_ok(Command::new("nbdinfo").arg("--map").arg(theirs.uri()));
        assert_eq!(out, t);
    }
}
