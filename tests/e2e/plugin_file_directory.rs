//! The file plugin's `directory=`, upstream's other name for `dir=`:
//! the same exports listed by libnbd's nbdinfo as upstream's plugin.

use std::process::Command;

use crate::common::*;

#[test]
fn plugin_file_directory_is_dir() {
    if !require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("a.img", 4096u64), ("b.img", 8192)] {
        let f = std::fs::File::create(dir.path().join(name)).unwrap();
        f.set_len(len).unwrap();
    }
    let param = format!("directory={}", dir.path().display());
    let list = |s: &Server| {
        run_ok(Command::new("nbdinfo").args(["--list", "--json", "--no-content", &s.uri()]))
    };
    let ours = list(&Server::ours(&["file", &param]));
    let theirs = list(&Server::upstream(&["file", &param]));
    assert!(
        ours.contains("\"a.img\"") && ours.contains("\"b.img\""),
        "{ours}"
    );
    let sizes = |j: &str| -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_str(j).unwrap();
        let mut s: Vec<u64> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-size"].as_u64().unwrap())
            .collect();
        s.sort();
        s
    };
    assert_eq!(sizes(&ours), vec![4096, 8192]);
    assert_eq!(sizes(&ours), sizes(&theirs));
}
