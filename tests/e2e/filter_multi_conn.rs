//! The multi-conn filter end to end: three libnbd connections run the
//! same writes, reads and flushes against upstream's filter and ours,
//! with a log filter below counting the flushes that reach the plugin
//! after each step: equal for every mode and dirty-tracking level, with
//! export names kept apart or not; under a noparallel filter that
//! serialises connections, auto mode advertises no multi-conn.

use std::path::Path;

use crate::common::{nbdkit, require, require_nbdsh, same_as_upstream, Server};

/// The steps, each printing how many flushes reached the plugin.
const SCENARIO: &str = r#"
import time
log = sys.argv[2]
def flushes():
    time.sleep(0.05)
    return open(log).read().count(" Flush id=")
hs = [h]
for i in range(2):
    x = nbd.NBD(); x.connect_uri(sys.argv[3] if i == 1 else sys.argv[1]); hs.append(x)
a, b, c = hs
print("multi_conn", a.can_multi_conn(), "fua", a.can_fua())
def step(name, f):
    before = flushes()
    f()
    print(name, flushes() - before)
step("flush-clean", lambda: a.flush())
step("write-a flush-b", lambda: (a.pwrite(b"x" * 512, 0), b.flush()))
step("flush-a", lambda: a.flush())
step("read-b flush-a", lambda: (b.pread(512, 0), a.flush()))
step("write-a read-b flush-c", lambda: (a.pwrite(b"y" * 512, 0), b.pread(512, 0), c.flush()))
step("fua-write-a", lambda: a.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_FUA))
step("zero-b flush-b", lambda: (b.zero(512, 0), b.flush()))
step("flush-b", lambda: b.flush())
step("write-c flush-a", lambda: (c.pwrite(b"w" * 512, 4096), a.flush()))
"#;

/// Run the scenario on `prog` with these filter arguments; c connects
/// to export `c_export`.
fn scenario(prog: &Path, args: &[&str], c_export: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let mut a = vec!["--filter=multi-conn", "--filter=log", "memory", "1M", &l];
    a.extend_from_slice(args);
    let s = Server::start_with(prog, &a);
    let script = SCENARIO.to_string();
    let out = crate::common::run_ok(
        std::process::Command::new(crate::common::PYTHON)
            .arg("-c")
            .arg(format!(
                "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n{script}"
            ))
            .arg(s.uri())
            .arg(&log)
            .arg(s.uri_export(c_export)),
    );
    drop(s);
    out
}

fn same(args: &[&str], c_export: &str) -> Option<String> {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return None;
    }
    let ours = scenario(&nbdkit(), args, c_export);
    let theirs = scenario(Path::new("nbdkit"), args, c_export);
    assert_eq!(
        ours, theirs,
        "ours (left) and upstream (right) for {args:?}"
    );
    Some(ours)
}

#[test]
fn multi_conn_emulate_as_upstream() {
    for track in ["connection", "fast", "off"] {
        let t = format!("multi-conn-track-dirty={track}");
        let Some(out) = same(&["multi-conn-mode=emulate", &t], "") else {
            return;
        };
        assert!(out.starts_with("multi_conn True fua True"), "{out}");
    }
    // Emulation by export: c, on another export, is neither flushed for
    // a nor flushes a and b.
    let out = same(
        &["multi-conn-mode=emulate", "multi-conn-exportname=true"],
        "other",
    )
    .unwrap();
    assert!(out.contains("write-a read-b flush-c 0\n"), "{out}");
    assert!(out.contains("fua-write-a 2\n"), "{out}");
}

#[test]
fn multi_conn_other_modes_as_upstream() {
    for mode in ["auto", "plugin", "disable", "unsafe"] {
        for track in ["connection", "fast", "off"] {
            let m = format!("multi-conn-mode={mode}");
            let t = format!("multi-conn-track-dirty={track}");
            let Some(out) = same(&[&m, &t], "") else {
                return;
            };
            let advertised = mode != "disable";
            assert!(
                out.starts_with(&format!(
                    "multi_conn {}",
                    if advertised { "True" } else { "False" }
                )),
                "{mode}: {out}"
            );
        }
    }
}

#[test]
fn multi_conn_auto_under_noparallel_connections() {
    for order in [
        ["--filter=noparallel", "--filter=multi-conn"],
        ["--filter=multi-conn", "--filter=noparallel"],
    ] {
        let args = [order[0], order[1], "memory", "1M", "serialize=connections"];
        if let Some(out) = same_as_upstream(&args, "print(h.can_multi_conn())\n") {
            assert_eq!(out, "False\n");
        }
    }
}

#[test]
fn multi_conn_emulate_needs_flush() {
    if !require(&["nbdinfo", "nbdkit"]) {
        return;
    }
    // The pattern plugin cannot flush: emulating refuses the client.
    for prog in [nbdkit(), "nbdkit".into()] {
        let out = crate::common::run(std::process::Command::new(&prog).args([
            "-U",
            "-",
            "--filter=multi-conn",
            "pattern",
            "1M",
            "multi-conn-mode=emulate",
            "--run",
            "nbdinfo \"$uri\"",
        ]));
        assert!(!out.status.success(), "{prog:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("emulating multi-conn requires working flush"),
            "{err}"
        );
    }
}
