//! `nbdkit --version` as upstream's: one line, and with a plugin named a
//! line for each filter and the plugin, failing for an unknown plugin or
//! filter (nbdkit-probing(1): scripts probe for plugins that way).

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn version(prog: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = run(Command::new(prog).args(args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn nbdkit_version_lines_as_upstream() {
    if !require(&["nbdkit"]) {
        return;
    }
    let up = Path::new("nbdkit");
    for args in [
        &["--version"][..],
        &["memory", "--version"],
        &["--version", "memory", "1G"],
        &["--filter=cow", "--filter=xz", "file", "--version"],
        &["--filter=log", "--filter=delay", "null", "-V"],
    ] {
        let ours = version(&nbdkit(), args);
        assert_eq!(ours, version(up, args), "{args:?}");
        assert_eq!(ours.0, Some(0));
    }
    assert_eq!(
        version(
            &nbdkit(),
            &["--filter=cow", "--filter=xz", "file", "--version"]
        )
        .1,
        "nbdkit 1.32.5\ncow 1.32.5\nxz 1.32.5\nfile 1.32.5\n"
    );
}

#[test]
fn nbdkit_version_fails_for_unknown_plugin() {
    if !require(&["nbdkit"]) {
        return;
    }
    for args in [
        &["nosuchplugin", "--version"][..],
        &["--filter=nosuchfilter", "memory", "--version"],
    ] {
        let (code, out) = version(&nbdkit(), args);
        assert_eq!(code, Some(1), "{args:?}");
        assert_eq!(version(Path::new("nbdkit"), args).0, Some(1), "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    // The probe of nbdkit-probing(1).
    let probe = |prog: &str| {
        run(Command::new("sh").arg("-c").arg(format!(
            "if {prog} nosuchplugin --version >/dev/null 2>&1; then echo yes; else echo no; fi; \
             if {prog} memory --version >/dev/null 2>&1; then echo yes; else echo no; fi"
        )))
        .stdout
    };
    assert_eq!(probe(&nbdkit().display().to_string()), b"no\nyes\n");
}
