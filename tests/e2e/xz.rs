//! The xz filter, over the curl plugin and nginx (the headline pipeline)
//! and over the file plugin: sizes, random reads against the raw original,
//! copies into qcow2, a raw file and `nbdkit memory`, corruption.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{nbdkit, nbdpy, our_bin, require, require_nbdsh, run, run_ok, Server};
use crate::nginx::{Nginx, NGINX};

/// Size of the test image: a few MiB, a multiple of 512 for qcow2.
const SIZE: usize = (5 << 20) + (64 << 10);

/// Disk-like data: runs of pseudo-random bytes, text and zeroes.
pub fn disk_like(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let run = (rnd() % 300_000) as usize + 1;
        match rnd() % 3 {
            0 => v.extend((0..run).map(|_| rnd() as u8)),
            1 => v.extend(
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit 42\n"
                    .iter()
                    .cycle()
                    .take(run),
            ),
            _ => v.resize(v.len() + run, 0),
        }
    }
    v.truncate(len);
    v
}

/// A raw image and its `.xz` (made by `xz` with these extra arguments).
struct Image {
    dir: tempfile::TempDir,
    raw: PathBuf,
    xz: PathBuf,
}

fn image(xz_args: &[&str], seed: u64) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, disk_like(SIZE, seed)).unwrap();
    let xz = dir.path().join("disk.raw.xz");
    let out = run(Command::new("xz")
        .args(["-c", "-k"])
        .args(xz_args)
        .arg(&raw));
    assert!(out.status.success(), "xz failed");
    std::fs::write(&xz, out.stdout).unwrap();
    Image { dir, raw, xz }
}

fn multi_block() -> Image {
    image(&["-T2", "--block-size=1MiB"], 1)
}

fn single_block() -> Image {
    image(&[], 2)
}

/// Random reads (and one full pass) through `uri`, against `raw`.
fn check_reads(uri: &str, raw: &Path, seed: u32) {
    let script = format!(
        r#"
import random
raw = open({raw:?}, "rb").read()
assert h.get_size() == len(raw), (h.get_size(), len(raw))
assert not h.can_trim() and h.is_read_only()
rnd = random.Random({seed})
for i in range(200):
    n = rnd.randint(1, 200000)
    off = rnd.randint(0, len(raw) - n)
    assert h.pread(n, off) == raw[off:off+n], (off, n)
for off in range(0, len(raw), 1 << 20):
    n = min(1 << 20, len(raw) - off)
    assert h.pread(n, off) == raw[off:off+n], off
print("ok")
"#,
        raw = raw.display().to_string()
    );
    assert_eq!(nbdpy(uri, &script).trim(), "ok");
}

fn peers() -> bool {
    require(&[NGINX, "xz", "nbdinfo", "nbdcopy", "qemu-img", "qemu-nbd"]) && require_nbdsh()
}

#[test]
fn xz_curl_nbdinfo_reports_uncompressed_size() {
    if !peers() {
        return;
    }
    let ng = Nginx::start();
    for (img, name) in [
        (multi_block(), "multi.raw.xz"),
        (single_block(), "single.raw.xz"),
    ] {
        ng.serve(&img.xz, name);
        let url = ng.url(name);
        // Exactly as a user types it.
        let out = run_ok(Command::new(nbdkit()).args([
            "-U",
            "-",
            "curl",
            "--filter=xz",
            &url,
            "--run",
            "nbdinfo --size $uri",
        ]));
        assert_eq!(out.trim(), SIZE.to_string());
        let ours = our_bin("nbdinfo");
        if ours.exists() {
            let srv = Server::ours(&["--filter=xz", "curl", &url]);
            let out = run_ok(Command::new(&ours).args(["--size", &srv.uri()]));
            assert_eq!(out.trim(), SIZE.to_string());
        }
        drop(img);
    }
}

#[test]
fn xz_curl_random_reads_multi_block() {
    if !peers() {
        return;
    }
    let ng = Nginx::start();
    let img = multi_block();
    ng.serve(&img.xz, "disk.raw.xz");
    let srv = Server::ours(&["--filter=xz", "curl", &ng.url("disk.raw.xz")]);
    check_reads(&srv.uri(), &img.raw, 3);
}

#[test]
fn xz_curl_random_reads_single_block() {
    if !peers() {
        return;
    }
    let ng = Nginx::start();
    let img = single_block();
    ng.serve(&img.xz, "disk.raw.xz");
    let srv = Server::ours(&["--filter=xz", "curl", &ng.url("disk.raw.xz")]);
    check_reads(&srv.uri(), &img.raw, 4);
    // The single block was fetched once (plus the index probes), not once
    // per read.
    let log = ng.access_log();
    let gets = log.lines().filter(|l| l.contains("\"GET ")).count();
    assert!(gets < 40, "{gets} GET requests");
}

/// The nbdcopy programs to run the pipeline with: libnbd's, and ours if
/// it has been built.
fn nbdcopies() -> Vec<String> {
    let mut v = vec!["nbdcopy".to_string()];
    let ours = our_bin("nbdcopy");
    if ours.exists() {
        v.push(ours.display().to_string());
    }
    v
}

#[test]
fn xz_curl_pipeline_into_qcow2_raw_and_memory() {
    if !peers() {
        return;
    }
    let ng = Nginx::start();
    for img in [multi_block(), single_block()] {
        ng.serve(&img.xz, "disk.raw.xz");
        let url = ng.url("disk.raw.xz");
        for nbdcopy in nbdcopies() {
            // Into qcow2 through qemu-nbd, as in the manual.
            let qcow2 = img.dir.path().join("out.qcow2");
            let _ = std::fs::remove_file(&qcow2);
            run_ok(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&qcow2)
                    .arg(SIZE.to_string()),
            );
            let cmd = format!(
                "{nbdcopy} -- $uri [ qemu-nbd -f qcow2 {} ]",
                qcow2.display()
            );
            run_ok(Command::new(nbdkit()).args([
                "-U",
                "-",
                "curl",
                "--filter=xz",
                &url,
                "--run",
                &cmd,
            ]));
            run_ok(
                Command::new("qemu-img")
                    .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                    .arg(&img.raw)
                    .arg(&qcow2),
            );

            // Into a raw file.
            let out = img.dir.path().join("out.raw");
            let cmd = format!("{nbdcopy} $uri {}", out.display());
            run_ok(Command::new(nbdkit()).args([
                "-U",
                "-",
                "curl",
                "--filter=xz",
                &url,
                "--run",
                &cmd,
            ]));
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&img.raw).unwrap());

            // Into our nbdkit memory, then read back.
            let mem = Server::ours(&["memory", &SIZE.to_string()]);
            let cmd = format!("{nbdcopy} $uri '{}'", mem.uri());
            run_ok(Command::new(nbdkit()).args([
                "-U",
                "-",
                "curl",
                "--filter=xz",
                &url,
                "--run",
                &cmd,
            ]));
            let back = img.dir.path().join("back.raw");
            run_ok(Command::new("nbdcopy").arg(mem.uri()).arg(&back));
            assert!(std::fs::read(&back).unwrap() == std::fs::read(&img.raw).unwrap());
        }
    }
}

#[test]
fn xz_file_multi_stream_and_corruption() {
    if !require(&["xz", "nbdinfo"]) || !require_nbdsh() {
        return;
    }
    let a = multi_block();
    let b = single_block();
    // Two streams with padding between them, as `cat a.xz b.xz` makes.
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("both.xz");
    let mut bytes = std::fs::read(&a.xz).unwrap();
    bytes.extend_from_slice(&[0u8; 8]);
    bytes.extend_from_slice(&std::fs::read(&b.xz).unwrap());
    std::fs::write(&both, &bytes).unwrap();
    let raw = dir.path().join("both.raw");
    let mut r = std::fs::read(&a.raw).unwrap();
    r.extend_from_slice(&std::fs::read(&b.raw).unwrap());
    std::fs::write(&raw, &r).unwrap();
    let srv = Server::ours(&["--filter=xz", "file", &both.display().to_string()]);
    check_reads(&srv.uri(), &raw, 5);
    drop(srv);

    // A damaged block: EIO for its reads, the rest still served.
    let mut bad = std::fs::read(&a.xz).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let badf = dir.path().join("bad.xz");
    std::fs::write(&badf, &bad).unwrap();
    let srv = Server::ours(&["--filter=xz", "file", &badf.display().to_string()]);
    let script = format!(
        r#"
raw = open({raw:?}, "rb").read()
good = bad = 0
for off in range(0, len(raw), 1 << 20):
    n = min(1 << 20, len(raw) - off)
    try:
        d = h.pread(n, off)
        assert d == raw[off:off+n], off
        good += 1
    except nbd.Error as e:
        assert e.errno == "EIO", e
        bad += 1
print(good, bad)
"#,
        raw = a.raw.display().to_string()
    );
    let out = nbdpy(&srv.uri(), &script);
    let v: Vec<usize> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(v[1] >= 1 && v[0] >= 1, "{out}");

    // Not an xz file at all: a clear error when a client connects.
    let raw = a.raw.display().to_string();
    let out = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=xz",
        "file",
        &raw,
        "--run",
        "nbdinfo --size $uri",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an xz file"), "{err}");
}
