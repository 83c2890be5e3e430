//! The options every tool shares with its upstream twin, compared with
//! upstream's own output: `--version`, `--long-options` and
//! `--short-options` (bash completion), the first lines of `--help`,
//! and the getopt wording of usage errors.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::*;

const CLIENT_TOOLS: [&str; 3] = ["nbdinfo", "nbdcopy", "nbddump"];

/// Options of libnbd's tools newer than 1.14 (issue 25) that ours have
/// and the installed 1.14 lacks; and ours alone (no libnbd has them):
/// nbdcopy's `--shallow` (issue 23).
const NEWER_THAN_1_14: [&str; 10] = [
    "--blkhash",
    "--blkhash-file",
    "--cannot",
    "--has",
    "--hasnt",
    "--isnt",
    "--offset",
    "--skip",
    "--uri",
    // ours alone
    "--shallow",
];

/// nbdinfo's options past 1.14 that other tools had already
/// (`--length`, for `--map --offset/--length`: nbddump's names).
const NBDINFO_NEWER: [&str; 1] = ["--length"];

fn output(prog: &Path, args: &[&str]) -> Output {
    run(Command::new(prog).args(args).stdin(Stdio::null()))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Ours and upstream's answer to `args`, both exiting 0.
fn both_ok(tool: &str, args: &[&str]) -> (String, String) {
    let ours = output(&our_bin(tool), args);
    let theirs = output(Path::new(tool), args);
    assert!(ours.status.success(), "{tool} {args:?}: {}", stderr(&ours));
    assert!(theirs.status.success(), "upstream {tool} {args:?}");
    (stdout(&ours), stdout(&theirs))
}

#[test]
fn tools_version_lines_as_upstream() {
    if !require(&["nbdkit", "nbdinfo", "nbdcopy", "nbddump"]) {
        return;
    }
    for tool in CLIENT_TOOLS.into_iter().chain(["nbdkit"]) {
        let (ours, theirs) = both_ok(tool, &["--version"]);
        assert_eq!(ours, theirs, "{tool} --version");
        let (ours, _) = both_ok(tool, &["-V"]);
        assert_eq!(ours, theirs, "{tool} -V");
    }
    assert_eq!(
        both_ok("nbdcopy", &["--version"]).0,
        "nbdcopy 1.14.2\nlibnbd 1.14.2\n"
    );
}

#[test]
fn tools_completion_options_as_upstream() {
    if !require(&["nbdinfo", "nbdcopy", "nbddump"]) {
        return;
    }
    for tool in CLIENT_TOOLS {
        for opt in ["--long-options", "--short-options"] {
            let (ours, theirs) = both_ok(tool, &[opt]);
            let ours: String = ours
                .lines()
                .filter(|l| !NEWER_THAN_1_14.contains(l))
                .filter(|l| tool != "nbdinfo" || !NBDINFO_NEWER.contains(l))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(ours, theirs, "{tool} {opt}");
        }
        // Every option listed is one the tool takes.
        let (long, _) = both_ok(tool, &["--long-options"]);
        let (short, _) = both_ok(tool, &["--short-options"]);
        for o in long.lines().chain(short.lines()) {
            let out = output(&our_bin(tool), &[o]);
            let err = stderr(&out);
            assert!(
                !err.contains("unrecognized option") && !err.contains("invalid option"),
                "{tool} {o}: {err}"
            );
        }
    }
}

/// Upstream nbdkit options this one does not have yet: upstream's
/// `--long-options`/`--short-options` less these are ours.
const NBDKIT_NOT_YET: [&str; 18] = [
    "--group",
    "-g",
    "--mask-handshake",
    "--old-style",
    "--oldstyle",
    "-o",
    "--selinux-label",
    "--swap",
    "--tls-certificates",
    "--tls-psk",
    "--tls-verify-peer",
    "--user",
    "-u",
    "--vsock",
    // ...and ours has these that upstream 1.32 lacks.
    "--no-mc",
    // (newer nbdkit's switch for extended headers, issue 25)
    "--no-eh",
    // (newer nbdkit's handshake deadline and TCP keepalive, issue 20)
    "--keepalive",
    "--timeout",
];

#[test]
fn tools_nbdkit_completion_options_as_upstream() {
    if !require(&["nbdkit"]) {
        return;
    }
    for opt in ["--long-options", "--short-options"] {
        let (ours, theirs) = both_ok("nbdkit", &[opt]);
        let strip = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !NBDKIT_NOT_YET.contains(l))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&ours), strip(&theirs), "nbdkit {opt}: same order");
        assert!(ours.lines().all(|l| l.starts_with('-')), "{ours}");
    }
}

/// The lines of `--help` up to the first line of the synopsis's end
/// (the first blank line after the synopsis begins).
fn help_head(s: &str) -> Vec<&str> {
    let lines: Vec<&str> = s.lines().collect();
    let Some(first) = lines.iter().position(|l| !l.is_empty()) else {
        return Vec::new();
    };
    // The synopsis starts after the title line (and its blank line) of
    // the client tools; nbdkit's help starts with it.
    let start = if lines[first].ends_with(':') {
        first + 2
    } else {
        first
    };
    let end = lines[start..]
        .iter()
        .position(|l| l.is_empty())
        .map_or(lines.len(), |i| start + i);
    lines[..end].to_vec()
}

#[test]
fn tools_help_first_lines_as_upstream() {
    if !require(&["nbdkit", "nbdinfo", "nbdcopy", "nbddump"]) {
        return;
    }
    for tool in CLIENT_TOOLS {
        let (ours, theirs) = both_ok(tool, &["--help"]);
        assert_eq!(help_head(&ours), help_head(&theirs), "{tool} --help");
        // Upstream's every line is in ours, in order (ours may add).
        let mut rest = ours.lines();
        for line in theirs.lines() {
            assert!(
                rest.any(|l| l == line),
                "{tool} --help lacks {line:?}:\n{ours}"
            );
        }
    }
    // nbdkit's synopsis lists options this one lacks: its first lines.
    let (ours, theirs) = both_ok("nbdkit", &["--help"]);
    assert_eq!(
        ours.lines().take(2).collect::<Vec<_>>(),
        theirs.lines().take(2).collect::<Vec<_>>()
    );
    assert_eq!(
        ours.lines().rev().take(9).collect::<Vec<_>>(),
        theirs.lines().rev().take(9).collect::<Vec<_>>(),
        "the forms after the synopsis"
    );
}

#[test]
fn tools_usage_errors_as_upstream() {
    if !require(&["nbdkit", "nbdinfo", "nbdcopy", "nbddump"]) {
        return;
    }
    let cases: &[(&str, &[&str])] = &[
        ("nbdinfo", &[]),
        ("nbdinfo", &["--bogus-option", "nbd://x"]),
        ("nbdinfo", &["--bogus=1", "nbd://x"]),
        ("nbdinfo", &["-x", "nbd://x"]),
        ("nbdinfo", &["nbd://a", "nbd://b"]),
        ("nbdinfo", &["[", "nbdkit", "memory", "1M"]),
        ("nbdinfo", &["--can"]),
        ("nbdinfo", &["--json=1", "nbd://x"]),
        ("nbdinfo", &["--size", "--map", "nbd://x"]),
        ("nbdinfo", &["--can", "connect", "--list", "nbd://x"]),
        ("nbdinfo", &["--totals", "nbd://x"]),
        ("nbddump", &[]),
        ("nbddump", &["--bogus-option", "nbd://x"]),
        ("nbddump", &["nbd://a", "nbd://b"]),
        ("nbddump", &["-n"]),
        ("nbddump", &["--length"]),
        ("nbddump", &["-n", "abc", "nbd://x"]),
        ("nbdcopy", &[]),
        ("nbdcopy", &["a"]),
        ("nbdcopy", &["--bogus-option", "a", "b"]),
        ("nbdcopy", &["-x", "a", "b"]),
        ("nbdcopy", &["-C"]),
        ("nbdcopy", &["--connections"]),
        ("nbdcopy", &["--flush=yes", "a", "b"]),
        ("nbdcopy", &["-C", "abc", "a", "b"]),
        ("nbdcopy", &["-R", "0", "a", "b"]),
        ("nbdcopy", &["--request-size=3", "a", "b"]),
        ("nbdcopy", &["--sparse=3", "a", "b"]),
        ("nbdcopy", &["--progress=x", "a", "b"]),
        ("nbdcopy", &["[", "nbdkit", "memory", "1M"]),
        ("nbdkit", &[]),
        ("nbdkit", &["--bogus-option"]),
        ("nbdkit", &["-x"]),
        ("nbdkit", &["-U"]),
        ("nbdkit", &["--unix"]),
    ];
    for (tool, args) in cases {
        let ours = output(&our_bin(tool), args);
        let theirs = output(Path::new(tool), args);
        assert_eq!(ours.status.code(), Some(1), "{tool} {args:?}");
        assert_eq!(theirs.status.code(), Some(1), "upstream {tool} {args:?}");
        let (ours_err, theirs_err) = (stderr(&ours), stderr(&theirs));
        if *tool == "nbdkit" {
            // Its usage text lists options this nbdkit lacks.
            assert_eq!(
                ours_err.lines().next(),
                theirs_err.lines().next(),
                "{args:?}"
            );
        } else {
            // The message (if any), then the usage: its first lines (ours
            // lists more options further down).
            let split = |e: &str| -> (String, String) {
                match e.split_once('\n') {
                    Some((m, rest)) if !m.is_empty() => (m.to_string(), rest.to_string()),
                    _ => (String::new(), e.to_string()),
                }
            };
            let ((om, ou), (tm, tu)) = (split(&ours_err), split(&theirs_err));
            assert_eq!(om, tm, "{tool} {args:?}: message");
            assert_eq!(help_head(&ou), help_head(&tu), "{tool} {args:?}: usage");
        }
        assert!(ours.stdout.is_empty(), "{tool} {args:?}");
    }
}
