//! Progress: `-p` draws a bar when stderr is a terminal (driven here in
//! a pty with `script`), and `--progress=FD` writes libnbd's
//! machine-readable `N/100` lines. The source is slowed down so the
//! copy lasts about a second and progress has time to show.

use std::process::Command;

use crate::common::{require, run_ok, Server};
use crate::copy_common::nbdcopy;

/// 16M whose reads take 100ms each.
fn slow_source() -> Server {
    Server::upstream(&["--filter=delay", "pattern", "16M", "rdelay=100ms"])
}

/// Options making the copy of [`slow_source`] 16 reads, two at a
/// time: about 0.8s.
const SLOW: &str = "-C 1 -R 2 --request-size=1M";

#[test]
fn copy_progress_fd() {
    if !require(&["nbdkit"]) {
        return;
    }
    let src = slow_source();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("progress");
    let script = format!(
        "{} {SLOW} --progress=3 '{}' null: 3>{}",
        nbdcopy().get_program().to_str().unwrap(),
        src.uri(),
        file.display()
    );
    run_ok(Command::new("sh").arg("-c").arg(script));
    let text = std::fs::read_to_string(&file).unwrap();
    let pcs: Vec<u64> = text
        .lines()
        .map(|l| {
            let n = l
                .strip_suffix("/100")
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            n.parse().unwrap()
        })
        .collect();
    assert_eq!(pcs.first(), Some(&0), "{text}");
    assert_eq!(pcs.last(), Some(&100), "{text}");
    assert!(
        pcs.windows(2).all(|w| w[0] <= w[1]),
        "not monotonic: {text}"
    );
    assert!(pcs.len() >= 4, "no progress in between: {text}");
}

#[test]
fn copy_progress_bar_in_a_pty() {
    if !require(&["nbdkit", "script"]) {
        return;
    }
    let src = slow_source();
    let cmd = format!(
        "{} {SLOW} -p '{}' null:",
        nbdcopy().get_program().to_str().unwrap(),
        src.uri()
    );
    // `script` runs the command on a pty and copies what it draws.
    let out = run_ok(
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("TERM", "xterm"),
    );
    assert!(out.contains("100%"), "no finished bar in {out:?}");
    assert!(
        out.contains("[#") && out.contains("16.00 MiB"),
        "no bar in {out:?}"
    );
    // Redrawn in place while copying.
    assert!(
        out.matches('\r').count() + out.matches("\x1b[").count() >= 2,
        "{out:?}"
    );

    // Without -p, nothing is drawn.
    let cmd = format!(
        "{} '{}' null:",
        nbdcopy().get_program().to_str().unwrap(),
        src.uri()
    );
    let out = run_ok(Command::new("script").args(["-qec", &cmd, "/dev/null"]));
    assert!(!out.contains('%'), "{out:?}");
}
