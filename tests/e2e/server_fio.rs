//! fio's nbd engine: random reads and writes with crc32c verification at
//! queue depth 32 over several jobs, against memory and file.

use std::process::Command;

use crate::common::*;

fn fio_verify(uri: &str, size: &str) {
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--bsrange=512-64k",
        "--iodepth=32",
        "--numjobs=4",
        &format!("--size={size}"),
        "--offset_increment=4M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--group_reporting",
        "--verify_state_save=0",
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed:\n{text}");
    assert!(!text.contains("verify: bad"), "verify errors:\n{text}");
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
}

#[test]
fn fio_verify_memory() {
    if !require(&["fio"]) {
        return;
    }
    let s = Server::ours(&["memory", "16M"]);
    fio_verify(&s.uri(), "4M");
}

#[test]
fn fio_verify_file() {
    if !require(&["fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let s = Server::ours(&["file", f.to_str().unwrap()]);
    fio_verify(&s.uri(), "4M");
}
