//! The exportname filter end to end, against upstream's over the file
//! plugin's `dir=` mode: nbdinfo's export listings for every
//! `exportname-list` and `exportdesc` mode, the default export's name and
//! description, `exportname-strict` refusals; and a log filter below
//! seeing the export the default stands for.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{nbdkit, require, run, Server};
use crate::filter_log::log_lines;

/// A directory of three files for `dir=`.
fn three_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("file1", 1024), ("file2", 2048), ("file3", 3072)] {
        std::fs::write(dir.path().join(name), vec![0u8; len]).unwrap();
    }
    dir
}

/// Run `cmd` under `prog` serving `dir` with the filter's `args`: exit
/// code and stdout.
fn listing(prog: &Path, dir: &Path, args: &[&str], cmd: &str) -> (Option<i32>, String) {
    let d = format!("dir={}", dir.display());
    let mut a = vec!["-U", "-", "--filter=exportname", "file", &d];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--run", cmd]);
    let out = run(Command::new(prog).args(&a));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const LIST: &str = "nbdinfo --list --json \"$uri\" | \
    jq -c '[.exports[] | [.\"export-name\", .description, .\"export-size\"]] | sort'";

fn same(dir: &Path, args: &[&str], cmd: &str) -> Option<(Option<i32>, String)> {
    if !require(&["nbdkit", "nbdinfo", "jq"]) {
        return None;
    }
    let ours = listing(&nbdkit(), dir, args, cmd);
    assert_eq!(
        ours,
        listing(Path::new("nbdkit"), dir, args, cmd),
        "ours (left) and upstream (right) for {args:?}"
    );
    Some(ours)
}

#[test]
fn exportname_listings_as_upstream() {
    let dir = three_files();
    for args in [
        &[][..],
        &["exportname-list=error"],
        &["exportname-list=empty"],
        &["exportname-list=defaultonly", "default-export=file2"],
        &[
            "exportname-list=explicit",
            "exportname=file1",
            "exportname=file3",
        ],
        &["exportname-list=explicit"],
        &["exportdesc=none"],
        &["exportdesc=fixed:hello"],
        &["exportdesc=script:echo \"about $name\"; echo more"],
        &["default-export=file2"],
    ] {
        let Some((_, out)) = same(dir.path(), args, LIST) else {
            return;
        };
        match args.first().copied() {
            Some("exportname-list=empty") => assert_eq!(out.trim(), "[]"),
            Some("exportname-list=defaultonly") => {
                assert_eq!(out.trim(), r#"[["file2",null,2048]]"#)
            }
            Some("exportdesc=fixed:hello") => assert!(out.contains(r#""hello""#), "{out}"),
            // nbdinfo fails, so jq has nothing to print.
            Some("exportname-list=error") => assert_eq!(out, ""),
            _ => {}
        }
    }
}

#[test]
fn exportname_default_and_strict_as_upstream() {
    let dir = three_files();
    let cmd = "nbdinfo \"$uri\" | head -3; \
               nbdinfo --size \"nbd+unix:///file1?socket=$unixsocket\"; \
               nbdinfo --size \"nbd+unix:///file3?socket=$unixsocket\"; echo $?";
    let Some((_, out)) = same(
        dir.path(),
        &["default-export=file2", "exportdesc=fixed:two"],
        cmd,
    ) else {
        return;
    };
    assert!(
        out.contains("export=\"file2\":\n\tdescription: two\n"),
        "{out}"
    );
    let (_, out) = same(
        dir.path(),
        &[
            "exportname-strict=true",
            "exportname=file1",
            "default-export=file1",
        ],
        &format!("{cmd}; nbdinfo --size \"$uri\"; echo $?"),
    )
    .unwrap();
    // file1 opens, file3 is refused, and so is "" (not listed as such).
    assert!(out.contains("\n1024\n1\n"), "{out}");
    assert!(out.ends_with("\n1\n"), "{out}");
}

#[test]
fn exportname_default_reaches_the_layers_below() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = three_files();
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("log");
    let s = Server::ours(&[
        "--filter=exportname",
        "--filter=log",
        "file",
        &format!("dir={}", dir.path().display()),
        "default-export=file3",
        &format!("logfile={}", log.display()),
    ]);
    let out = crate::common::run_ok(Command::new("nbdinfo").args(["--size", &s.uri()]));
    assert_eq!(out.trim(), "3072");
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let lines = log_lines(&log);
    assert!(
        lines.iter().any(|l| l.contains(" Connect export=file3 ")),
        "{lines:#?}"
    );
}
