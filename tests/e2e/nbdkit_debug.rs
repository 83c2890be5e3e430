//! `nbdkit -v`'s lines for the calls into each layer and `-D` debug
//! flags, against upstream nbdkit: the data calls of a session through a
//! filter and a plugin print the same lines (layer, call, arguments) in
//! the same order; `-D nbdkit.backend.datapath=0` silences them; `-D`
//! warnings and errors as upstream's.

use std::path::Path;
use std::process::Command;

use crate::common::*;

const SESSION: &str = "import nbd, sys
h = nbd.NBD()
h.add_meta_context('base:allocation')
h.connect_uri(sys.argv[1])
h.pread(512, 0)
h.pwrite(b'x' * 512, 1024, nbd.CMD_FLAG_FUA)
h.zero(512, 0)
h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
h.trim(512, 0)
h.flush()
h.cache(512, 0)
h.block_status(4096, 0, lambda *a: 0)
";

/// The per-call lines of `prog -v` serving a session, as "layer: call".
fn call_lines(prog: &Path, extra: &[&str]) -> Vec<String> {
    let mut c = Command::new(prog);
    c.args(["-U", "-", "-v"]).args(extra);
    c.args(["--filter=offset", "null", "1M", "offset=512", "--run"]);
    c.arg(format!("{PYTHON} -c \"$SESSION\" \"$uri\""));
    let out = run(c.env("SESSION", SESSION));
    assert!(out.status.success(), "{out:?}");
    let calls = [
        "pread ", "pwrite ", "zero ", "trim ", "flush", "cache ", "extents ", "open ", "close",
    ];
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split_once(": debug: ").map(|(_, rest)| rest))
        .filter(|l| {
            let call = l.split_once(": ").map_or("", |(_, c)| c);
            (l.starts_with("offset: ") || l.starts_with("null: "))
                && calls.iter().any(|c| call.starts_with(c))
        })
        // Handles' addresses differ from run to run.
        .map(|l| match l.split_once("returned handle ") {
            Some((head, _)) => format!("{head}returned handle"),
            None => l.to_string(),
        })
        .collect()
}

#[test]
fn nbdkit_debug_calls_into_each_layer_as_upstream() {
    if !require(&["nbdkit"]) || !require_nbdsh() {
        return;
    }
    // Upstream may exit at the end of --run before its close lines.
    let no_close = |v: Vec<String>| -> Vec<String> {
        v.into_iter().filter(|l| !l.ends_with(": close")).collect()
    };
    let ours = call_lines(&nbdkit(), &[]);
    assert!(
        ours.ends_with(&["offset: close".into(), "null: close".into()]),
        "{ours:?}"
    );
    let ours = no_close(ours);
    let theirs = no_close(call_lines(Path::new("nbdkit"), &[]));
    assert_eq!(ours, theirs);
    // Both layers, the offsets moved by the filter.
    assert!(ours.contains(&"offset: pwrite count=512 offset=1024 fua=1".to_string()));
    assert!(ours.contains(&"null: pwrite count=512 offset=1536 fua=1".to_string()));
    assert!(ours.contains(&"null: zero count=4096 offset=512 may_trim=0 fua=0 fast=1".to_string()));

    // The data path silenced; open and close remain.
    let quiet = no_close(call_lines(&nbdkit(), &["-D", "nbdkit.backend.datapath=0"]));
    let theirs = no_close(call_lines(
        Path::new("nbdkit"),
        &["-D", "nbdkit.backend.datapath=0"],
    ));
    assert_eq!(quiet, theirs);
    assert!(
        quiet
            .iter()
            .all(|l| l.contains("open ") || l.ends_with("close")),
        "{quiet:?}"
    );
}

#[test]
fn nbdkit_debug_flags_warn_as_upstream() {
    if !require(&["nbdkit"]) {
        return;
    }
    let stderr = |prog: &Path, flag: &str| {
        let o =
            run(Command::new(prog).args(["-U", "-", "-D", flag, "memory", "1M", "--run", "true"]));
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for flag in ["memory.foo=1", "nosuch.foo=1", "nbdkit.bogus=1"] {
        let ours = stderr(&nbdkit(), flag);
        let theirs = stderr(Path::new("nbdkit"), flag);
        assert_eq!(ours, theirs, "-D {flag}");
        assert!(ours.1.contains("warning"), "{ours:?}");
    }
    let (code, err) = stderr(&nbdkit(), "foo=1");
    assert_eq!(code, Some(1));
    assert!(err.contains("must have the format NAME.FLAG=N"), "{err}");
}
