//! The cow filter end to end: qemu-io and qemu-img write through our
//! nbdkit's cow filter over the file plugin, and the base image never
//! changes; nbdinfo's map shows the overlay; with `cow-on-read=true` a
//! second read is served from the overlay, which our log filter stacked
//! under cow (between cow and the plugin) proves by logging only one read.

use std::process::Command;

use crate::common::{nbdpy, random_file, require, require_nbdsh, run_ok, Server};

const MB: usize = 1 << 20;

/// Parse `nbdinfo --map` lines into (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    run_ok(Command::new("nbdinfo").arg("--map").arg(uri))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn cow_base_unchanged() {
    if !require(&["qemu-io", "qemu-img", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    random_file(&base, 4 * MB, 11);
    let original = std::fs::read(&base).unwrap();
    let srv = Server::ours(&["--filter=cow", "file", base.to_str().unwrap()]);
    let uri = srv.uri();
    // qemu-io writes: a whole block and an unaligned piece.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 64k", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x66 100000 1000", &uri]));
    // qemu-img convert into the export (same size) replaces it all.
    let repl = dir.path().join("repl.img");
    random_file(&repl, 4 * MB, 13);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        repl.to_str().unwrap(),
        &uri,
    ]));
    // Then qemu-io again on top.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 65536 4096", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x77 65536 4096", &uri]));
    // Everything reads back as written.
    let out = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    let mut want = std::fs::read(&repl).unwrap();
    want[65536..69632].fill(0x77);
    let got = std::fs::read(&out).unwrap();
    assert!(got == want, "reads see the writes");
    // The base image was never written.
    assert!(
        std::fs::read(&base).unwrap() == original,
        "base image changed"
    );
}

#[test]
fn cow_reads_see_qemu_io_writes_and_base_survives() {
    if !require(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    random_file(&base, 2 * MB, 21);
    let original = std::fs::read(&base).unwrap();
    let srv = Server::ours(&[
        "--filter=cow",
        "file",
        base.to_str().unwrap(),
        "cow-block-size=4k",
    ]);
    let uri = srv.uri();
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 64k", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x55 0 64k", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 131072 8192", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0 131072 8192", &uri]));
    // A second server over the same base starts from the base again.
    drop(srv);
    assert!(
        std::fs::read(&base).unwrap() == original,
        "base image changed"
    );
    let srv = Server::ours(&["--filter=cow", "file", base.to_str().unwrap()]);
    let out =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x55 0 64k", &srv.uri()]));
    assert!(
        out.contains("Pattern verification failed") || !out.contains("read 65536/65536"),
        "the overlay did not go away with the server: {out}"
    );
}

fn run(cmd: &mut Command) -> String {
    let o = crate::common::run(cmd);
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn cow_map_shows_overlay_data_and_zeroes() {
    if !require(&["nbdinfo", "qemu-io"]) {
        return;
    }
    // The memory plugin starts all hole; cow's extents report overlay
    // blocks as data, zeroed/trimmed blocks as zero holes, the rest from
    // the plugin.
    let srv = Server::ours(&["--filter=cow", "memory", "1M", "cow-block-size=64k"]);
    let uri = srv.uri();
    assert_eq!(map(&uri), vec![(0, MB as u64, 3)]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 131072 65536", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x22 524288 131072", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -z 589824 65536", &uri]));
    assert_eq!(
        map(&uri),
        vec![
            (0, 131072, 3),
            (131072, 65536, 0),
            (196608, 327680, 3),
            (524288, 65536, 0),
            (589824, 458752, 3),
        ]
    );
}

#[test]
fn cow_on_read_serves_second_read_from_overlay() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    random_file(&base, MB, 31);
    let log = dir.path().join("log.txt");
    // Our log filter sits between cow and the plugin: it logs what cow
    // asks of the plugin.
    let srv = Server::ours(&[
        "--filter=cow",
        "--filter=log",
        "file",
        base.to_str().unwrap(),
        "cow-on-read=true",
        &format!("logfile={}", log.display()),
    ]);
    let out = nbdpy(
        &srv.uri(),
        "a = h.pread(65536, 0)\nb = h.pread(65536, 0)\nc = h.pread(1000, 70000)\nd = h.pread(1000, 70000)\nprint(a == b and c == d, a[:8].hex())\n",
    );
    let data = std::fs::read(&base).unwrap();
    assert_eq!(out.trim(), format!("True {}", hex(&data[..8])));
    drop(srv);
    let text = std::fs::read_to_string(&log).unwrap();
    let reads: Vec<&str> = text.lines().filter(|l| l.contains(" Read id=")).collect();
    // One plugin read per block, whatever the client read twice.
    assert_eq!(reads.len(), 2, "log:\n{text}");
    assert!(
        reads[0].contains("offset=0x0 count=0x10000"),
        "{}",
        reads[0]
    );
    assert!(
        reads[1].contains("offset=0x10000 count=0x10000"),
        "{}",
        reads[1]
    );
    // And the base still holds the same bytes.
    assert!(std::fs::read(&base).unwrap() == data);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
