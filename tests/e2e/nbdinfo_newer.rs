//! nbdinfo's options newer than libnbd 1.14: `--uri` (the `uri:` line of
//! upstream 1.14's own report on the same server), and the negated flag
//! tests `--isnt`, `--cannot`, `--hasnt` (exit 0 when false, 2 when
//! true), against upstream nbdkit.

use std::process::Command;

use crate::common::{our_bin, require, run, Server};

fn nbdinfo(args: &[&str]) -> std::process::Output {
    run(Command::new(our_bin("nbdinfo")).args(args))
}

#[test]
fn nbdinfo_uri_as_upstream_report() {
    if !require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let srv = Server::upstream(&["memory", "1M"]);
    let uri = srv.uri_export("some%20export");
    let out = nbdinfo(&["--uri", &uri]);
    assert!(out.status.success());
    let ours = String::from_utf8_lossy(&out.stdout).to_string();
    let report = run(Command::new("nbdinfo").arg(&uri));
    let theirs = String::from_utf8_lossy(&report.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("uri: ").map(str::to_string))
        .expect("upstream prints a uri: line");
    assert_eq!(ours, format!("{theirs}\n"));
    assert!(ours.contains("some%20export"), "{ours}");
    // No URI for a subprocess; not with another mode.
    let out = nbdinfo(&["--uri", "--", "[", "nbdkit", "memory", "1M", "]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--uri"));
    let out = nbdinfo(&["--uri", "--size", &uri]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn nbdinfo_negated_flag_tests() {
    if !require(&["nbdkit"]) {
        return;
    }
    let ro = Server::upstream(&["-r", "memory", "1M"]);
    let rw = Server::upstream(&["memory", "1M"]);
    let code =
        |args: &[&str], s: &Server| nbdinfo(&[args, &[s.uri().as_str()]].concat()).status.code();
    for (args, on_ro, on_rw) in [
        (&["--is", "read-only"][..], 0, 2),
        (&["--isnt", "read-only"][..], 2, 0),
        (&["--can", "write"][..], 2, 0),
        (&["--cannot", "write"][..], 0, 2),
        (&["--has", "structured-reply"][..], 0, 0),
        (&["--hasnt", "structured-reply"][..], 2, 2),
        (&["--hasnt", "extended-headers"][..], 0, 0),
        (&["--cannot", "connect"][..], 2, 2),
        // The last of them counts.
        (&["--isnt", "read-only", "--can", "write"][..], 2, 0),
        (&["--can", "write", "--isnt", "read-only"][..], 2, 0),
    ] {
        assert_eq!(code(args, &ro), Some(on_ro), "{args:?} read-only");
        assert_eq!(code(args, &rw), Some(on_rw), "{args:?} writable");
    }
    let out = nbdinfo(&["--isnt", "bogus", &rw.uri()]);
    assert_eq!(out.status.code(), Some(1));
}
