//! qemu-img as a client of our server: a random 256 MiB image converted
//! into our memory server and back out is byte-identical; likewise a
//! mixed image through the zstd allocator, whose zero run stays a hole.

use std::process::Command;

use crate::common::*;

#[test]
fn qemu_img_convert_roundtrip_memory() {
    if !require(&["qemu-img", "cmp"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    random_file(&src, 256 << 20, 1);
    let s = Server::ours(&["memory", "256M"]);
    let uri = s.uri();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    run_ok(Command::new("cmp").arg(&src).arg(&back));
    // And into qcow2.
    let q = dir.path().join("out.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&uri)
            .arg(&q),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&q),
    );
}

#[test]
fn qemu_img_compare_detects_difference() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 1 << 20, 2);
    let s = Server::ours(&["memory", "1M"]);
    // Empty server versus random data: must differ (exit 1).
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri()));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn qemu_img_convert_into_file_plugin() {
    if !require(&["qemu-img", "cmp"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    random_file(&src, 8 << 20, 3);
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let s = Server::ours(&["file", dst.to_str().unwrap()]);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(s.uri()),
    );
    drop(s);
    run_ok(Command::new("cmp").arg(&src).arg(&dst));
}

#[test]
fn qemu_img_convert_roundtrip_memory_zstd() {
    if !require(&["qemu-img", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    // 8 MiB random, 8 MiB zeroes, 16 MiB of text.
    random_file(&src, 8 << 20, 4);
    let mut img = std::fs::read(&src).unwrap();
    img.resize(16 << 20, 0);
    while img.len() < 32 << 20 {
        img.extend_from_slice(format!("line {} of some log text\n", img.len()).as_bytes());
    }
    img.truncate(32 << 20);
    std::fs::write(&src, &img).unwrap();
    let s = Server::ours(&["memory", "32M", "allocator=zstd"]);
    let uri = s.uri();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let map = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter().any(|r| r[..3] == ["8388608", "8388608", "3"]),
        "the zero run is a hole:\n{map}"
    );
}
