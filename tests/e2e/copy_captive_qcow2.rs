//! nbdcopy with captive servers, `[ CMD ARGS ]` on either side or both:
//! qemu-nbd on qcow2 images (`nbdcopy -- [ qemu-nbd -f qcow2 x ] -`),
//! upstream nbdkit and ours. The servers must be gone when nbdcopy
//! exits, also when it is interrupted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{nbdkit, require, run, run_ok};
use crate::copy_common::{nbdcopy, source_image, SIZE};

fn qcow2_of(raw: &Path, out: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out),
    );
}

fn empty_qcow2(out: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(out)
            .arg(SIZE.to_string()),
    );
}

/// Compare a raw and a qcow2 image with qemu-img (which also fails if
/// a qemu-nbd still holds the qcow2's lock).
fn same(raw: &Path, qcow2: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(raw)
            .arg(qcow2),
    );
}

#[test]
fn copy_captive_qcow2_to_pipe() {
    if !require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    let data = source_image(&raw);
    let q = dir.path().join("src.qcow2");
    qcow2_of(&raw, &q);
    let out = run(nbdcopy()
        .args(["--", "[", "qemu-nbd", "-f", "qcow2"])
        .arg(&q)
        .args(["]", "-"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data, "stdout differs from the image");
}

#[test]
fn copy_pipe_to_captive_qcow2() {
    if !require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    source_image(&raw);
    let q = dir.path().join("out.qcow2");
    empty_qcow2(&q);
    let script = format!(
        "cat {} | {} -- - [ qemu-nbd -f qcow2 {} ]",
        raw.display(),
        nbdcopy().get_program().to_str().unwrap(),
        q.display()
    );
    run_ok(Command::new("sh").arg("-c").arg(script));
    same(&raw, &q);
}

#[test]
fn copy_captive_qcow2_to_captive_qcow2() {
    if !require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    source_image(&raw);
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qcow2_of(&raw, &a);
    empty_qcow2(&b);
    run_ok(
        nbdcopy()
            .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2"])
            .arg(&a)
            .args(["]", "[", "qemu-nbd", "-f", "qcow2"])
            .arg(&b)
            .arg("]"),
    );
    same(&raw, &b);
    // The output is as sparse as the source: the hole at the end and
    // the zero run inside the data are not allocated in the qcow2.
    let map = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(&b),
    );
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data <= (3 << 20) - (128 << 10), "{data} bytes allocated");
}

#[test]
fn copy_captive_nbdkit_both_kinds() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    let data = source_image(&raw);
    let out = dir.path().join("out.img");
    std::fs::write(&out, vec![0xffu8; SIZE]).unwrap();
    // Upstream nbdkit as the source, ours as the destination.
    run_ok(
        nbdcopy()
            .args(["--", "[", "nbdkit", "file"])
            .arg(&raw)
            .args(["]", "["])
            .arg(nbdkit())
            .arg("file")
            .arg(&out)
            .arg("]"),
    );
    assert!(std::fs::read(&out).unwrap() == data);
}

fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie has no cmdline; treat it as gone.
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| !c.is_empty())
        .unwrap_or(false)
}

/// Ctrl-C (SIGINT) to nbdcopy in the middle of a slow copy ends it and
/// its captive server.
#[test]
fn copy_captive_killed_on_sigint() {
    if !require(&["nbdkit", "pgrep"]) {
        return;
    }
    let mut child = nbdcopy()
        .args([
            "--",
            "[",
            "nbdkit",
            "--filter=delay",
            "pattern",
            "1G",
            "rdelay=2",
            "]",
            "null:",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let t = Instant::now();
    let server = loop {
        if let Some(&s) = children(pid).first() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no captive server");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let the copy start.
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "exit status {st}");
    let t = Instant::now();
    while alive(server) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "captive server {server} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
