//! `nbdkit --dump-config`: upstream's keys in upstream's order (the
//! values are ours: plugins and filters live inside the binary).

use std::process::Command;

use crate::common::*;

fn keys(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.split('=').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn nbdkit_dump_config_keys_as_upstream() {
    if !require(&["nbdkit"]) {
        return;
    }
    let ours = run_ok(Command::new(nbdkit()).arg("--dump-config"));
    let theirs = run_ok(Command::new("nbdkit").arg("--dump-config"));
    assert_eq!(keys(&ours), keys(&theirs));
    let value = |k: &str| {
        ours.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    assert_eq!(value("binary"), Some(nbdkit().display().to_string()));
    assert_eq!(value("version").as_deref(), Some("1.32.5"));
    assert_eq!(value("version_major").as_deref(), Some("1"));
    assert_eq!(value("version_minor").as_deref(), Some("32"));
}
