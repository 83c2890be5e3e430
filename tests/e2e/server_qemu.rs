//! qemu-img as a client of our server: a random 256 MiB image converted
//! into our memory server and back out is byte-identical.

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
