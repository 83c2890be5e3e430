//! `nbdcopy -v`: the endpoint lines name the operations as upstream's
//! do (`src: nbd_ops "URI"`, `dst: file_ops "PATH"`, `pipe_ops`,
//! `null_ops`), with the sizes and block sizes after them.

use std::process::Command;

use crate::common::{require, run, Server};
use crate::copy_common::nbdcopy;

/// The `src:`/`dst:` lines naming an endpoint's ops (libnbd's own debug
/// lines left out).
fn endpoint_lines(mut c: Command) -> Vec<String> {
    let o = run(&mut c);
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("nbdcopy: src: ") || l.starts_with("nbdcopy: dst: "))
        .filter(|l| l.contains("_ops "))
        .map(|l| l.split(" \"").next().unwrap().to_string())
        .collect()
}

#[test]
fn copy_verbose_names_endpoint_ops_as_upstream() {
    if !require(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.img");
    std::fs::write(&out, vec![0u8; 1 << 20]).unwrap();
    let s = Server::ours(&["memory", "1M"]);
    for dst in [out.display().to_string(), "null:".into(), "-".into()] {
        let mut theirs = Command::new("nbdcopy");
        theirs.args(["-v", &s.uri(), &dst]);
        let mut ours = nbdcopy();
        ours.args(["-v", &s.uri(), &dst]);
        let (t, o) = (endpoint_lines(theirs), endpoint_lines(ours));
        assert_eq!(o, t, "to {dst}");
        assert_eq!(o.len(), 2, "{o:?}");
    }
}
