//! Our `nbddump` against libnbd's on the same exports: byte-for-byte
//! the same output (plain and coloured, whole exports and `--length`),
//! against upstream nbdkit, qemu-nbd and our nbdkit, captive servers,
//! and big sparse exports dumped quickly.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn ours() -> PathBuf {
    our_bin("nbddump")
}

fn run_both(args: &[&str]) -> (Output, Output) {
    let theirs = run(Command::new("nbddump").args(args).stdin(Stdio::null()));
    let mine = run(Command::new(ours()).args(args).stdin(Stdio::null()));
    (theirs, mine)
}

/// Same exit status, same bytes on stdout.
fn assert_same(args: &[&str]) {
    let (theirs, mine) = run_both(args);
    assert_eq!(
        theirs.status.code(),
        mine.status.code(),
        "exit status of nbddump {args:?}: {}",
        String::from_utf8_lossy(&mine.stderr)
    );
    if theirs.stdout != mine.stdout {
        let a = String::from_utf8_lossy(&theirs.stdout);
        let b = String::from_utf8_lossy(&mine.stdout);
        let first = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(a.lines().count().min(b.lines().count()));
        panic!(
            "nbddump {args:?} differs at line {first}:\nupstream: {:?}\nours:     {:?}",
            a.lines().nth(first),
            b.lines().nth(first)
        );
    }
}

/// Whole export and the interesting `--length` cut-offs, plain and
/// coloured.
fn compare_dumps(uri: &str) {
    for extra in [
        &[][..],
        &["--color"],
        &["-n", "0"],
        &["-n", "7"],
        &["-n", "8"],
        &["-n", "17"],
        &["-n", "24"],
        &["-n", "40"],
        &["-n", "63"],
        &["--length=100"],
        &["--length", "4097"],
        &["--colour", "-n", "50"],
        &["--color", "--no-color", "-n", "300"],
    ] {
        let mut args = extra.to_vec();
        args.push(uri);
        assert_same(&args);
    }
}

#[test]
fn nbddump_upstream_nbdkit() {
    if !require(&["nbdkit", "nbddump"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all");
    std::fs::write(&all, (0..=255u8).collect::<Vec<u8>>()).unwrap();
    for args in [
        &["file", all.to_str().unwrap()][..],
        &[
            "data",
            "\"hello, world!\" @0x100 1 2 3 @0x1000 0x41*64 @0x2003 0 0x21",
            "size=8197",
        ],
        &["data", "0x41*64", "size=1M"],
        &["data", "0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1", "size=64"],
        &["null", "0"],
        &["null", "1"],
        &["null", "32"],
        &["null", "33"],
        &["null", "47"],
        &["null", "48"],
        &["pattern", "1M"],
        &["memory", "4M"],
        &["random", "256K"],
        &[
            "sparse-random",
            "16M",
            "seed=3",
            "percent=50",
            "runlength=100",
        ],
        &["sparse-random", "32M", "seed=7"],
        &["--filter=noextents", "pattern", "2M"],
        &[
            "-r",
            "--filter=offset",
            "pattern",
            "1M",
            "offset=3",
            "range=100000",
        ],
    ] {
        let s = Server::upstream(args);
        compare_dumps(&s.uri());
    }
}

#[test]
fn nbddump_qemu_nbd() {
    if !require(&["qemu-nbd", "qemu-img", "qemu-io", "nbddump"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let p = img.to_str().unwrap();
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, "16M"]));
    run_ok(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x61 0 4097",
        "-c",
        "write -P 0xfe 1M 64k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "write -P 0x0a 16769024 8192",
        p,
    ]));
    // As a captive server, upstream's run first: qcow2 takes a lock.
    for extra in [&[][..], &["-n", "5000"], &["--color", "-n", "100"]] {
        let mut args = extra.to_vec();
        args.extend(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", p, "]"]);
        assert_same(&args);
    }
    let raw = dir.path().join("disk.raw");
    random_file(&raw, 100_000, 9);
    let r = raw.to_str().unwrap();
    assert_same(&["--", "[", "qemu-nbd", "-r", "-f", "raw", r, "]"]);
}

#[test]
fn nbddump_against_our_nbdkit() {
    if !require(&["nbddump"]) {
        return;
    }
    for args in [
        &["pattern", "1M"][..],
        &["data", "\"hello\" @4096 1 2 3", "size=10000"],
        &["memory", "64M"],
        &["null", "47"],
    ] {
        let s = Server::ours(args);
        compare_dumps(&s.uri());
    }
    // Captive: our nbdkit under our nbddump.
    let out = run_ok(
        Command::new(ours())
            .args(["-n", "32", "--", "["])
            .arg(nbdkit())
            .args(["data", "0x41*20", "]"]),
    );
    assert_eq!(
        out,
        "0000000000: 41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41 |AAAAAAAAAAAAAAAA|\n\
         0000000010: 41 41 41 41                                      |AAAA            |\n"
    );
}

#[test]
fn nbddump_big_sparse_export_is_fast() {
    if !require(&["nbdkit"]) {
        return;
    }
    // 1T of zeros: known zero from block status, never read.
    let s = Server::upstream(&["memory", "1T"]);
    let t = Instant::now();
    let out = run_ok(Command::new(ours()).arg(s.uri()));
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        out,
        "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n*\n\
         fffffffff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
    );
    // Data is read with many requests in flight: 64M of pattern.
    let s = Server::upstream(&["--filter=noextents", "pattern", "64M"]);
    let t = Instant::now();
    let out = run(Command::new(ours()).arg(s.uri()).stdout(Stdio::piped()));
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), (64 << 20) / 16 * 80);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn nbddump_options() {
    let out = run_ok(Command::new(ours()).arg("--version"));
    assert!(out.starts_with("nbddump 1.14"), "{out}");
    let out = run_ok(Command::new(ours()).arg("--help"));
    assert!(out.contains("--length") && out.contains("--color"), "{out}");
    let out = run(Command::new(ours()).args(["-n", "abc", "nbd://localhost"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "nbddump: could not parse --length option: abc\n"
    );
    if !require(&["nbdkit"]) {
        return;
    }
    // Size suffixes.
    let s = Server::upstream(&["pattern", "1M"]);
    let out = run_ok(Command::new(ours()).args(["-n", "1K", &s.uri()]));
    assert_eq!(out.lines().count(), 1024 / 16);
    // `nbddump ... | head` stops quietly.
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "{} {} | head -c 100 >/dev/null",
        ours().display(),
        s.uri()
    )));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
