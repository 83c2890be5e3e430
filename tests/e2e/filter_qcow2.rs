//! The qcow2 filter against qemu: images made by qemu-img and qemu-io
//! read back equal, images written by ours pass `qemu-img check`, the
//! maps equal qemu-nbd's, locks keep a second writer out.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{
    nbdkit, nbdpy, our_bin, random_file, require, require_nbdsh, run, run_ok, Server, PYTHON,
};

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run_ok(c.arg(img));
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// Copy the virtual disk our qcow2 filter serves from `img` to `out`.
fn read_ours(img: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["-r", "--filter=qcow2", "file", p(img)];
    args.extend_from_slice(extra);
    let s = Server::ours(&args);
    run_ok(Command::new(our_bin("nbdcopy")).arg(s.uri()).arg(out));
}

fn compare(raw: &Path, img: &Path) {
    let out = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(raw), p(img)]);
    assert!(out.contains("identical"), "{out}");
}

fn check_clean(img: &Path) {
    let out = run(Command::new("qemu-img").args(["check", p(img)]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("No errors"), "{text}");
}

/// Images with every kind of cluster, in every supported layout.
fn kinds_image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&img), "20M"]);
    qemu_io(
        &img,
        &[
            "write -P 0xaa 0 1M",
            "write -z 2M 1M",
            "write -P 0x55 3M 100k",
            "write -P 0x66 3300k 7k",
            "write -c -P 0x11 8M 2M",
            "write -c -P 0x22 10M 2M",
            "write -P 0x77 19M 1M",
            "write -z 19500k 4k",
        ],
    );
    img
}

#[test]
fn qcow2_reads_what_qemu_wrote() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "compat=0.10",
        "compat=1.1",
        "compat=1.1,compression_type=zstd",
        "compat=1.1,extended_l2=on",
        "compat=1.1,cluster_size=4096,refcount_bits=1",
        "compat=1.1,cluster_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let img = kinds_image(dir.path(), &format!("k{i}.qcow2"), opts);
        let out = dir.path().join(format!("k{i}.raw"));
        read_ours(&img, &out, &[]);
        compare(&out, &img);
    }
}

#[test]
fn qcow2_refuses_external_data_file() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    let data = dir.path().join("x.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p(&data)),
        p(&img),
        "1M",
    ]);
    let out = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=qcow2",
        "file",
        p(&img),
        "--run",
        "nbdinfo $uri",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("external data file"), "{err}");
}

fn map(uri_or_cmd: &[&str], ctx: Option<&str>) -> String {
    let mut c = Command::new(our_bin("nbdinfo"));
    match ctx {
        Some(m) => c.arg(format!("--map={m}")),
        None => c.arg("--map"),
    };
    run_ok(c.args(uri_or_cmd))
}

fn qemu_nbd_map(img: &Path, ctx: Option<&str>) -> String {
    map(
        &["--", "[", "qemu-nbd", "-r", "-f", "qcow2", p(img), "]"],
        ctx,
    )
}

#[test]
fn qcow2_map_as_qemu_nbd() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in ["compat=0.10", "compat=1.1"].iter().enumerate() {
        let img = kinds_image(dir.path(), &format!("m{i}.qcow2"), opts);
        let s = Server::ours(&["-r", "--filter=qcow2", "file", p(&img)]);
        let ours = map(&[&s.uri()], None);
        drop(s);
        assert_eq!(ours, qemu_nbd_map(&img, None), "{opts}");
    }
}

/// Our server on `img`, writable.
fn serve(img: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--filter=qcow2", "file", p(img)];
    args.extend_from_slice(extra);
    Server::ours(&args)
}

fn nbdsh(uri: &str, script: &str) {
    nbdpy(uri, script);
}

/// Writes of every shape (whole and partial clusters, over data, zero,
/// compressed and unallocated clusters), zero and trim, into a qemu-made
/// image: qemu-img check finds no error and the disk equals the same
/// writes done on a raw file.
#[test]
fn qcow2_writes_pass_qemu_img_check() {
    if !require(&["qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = "
import os
def w(off, n, seed):
    h.pwrite(bytes([(seed + i) % 251 for i in range(n)]), off)
w(0, 65536, 1)
w(100000, 5000, 2)
w(2*1024*1024 + 512, 3000, 3)
w(8*1024*1024 + 4096, 10000, 4)
w(9*1024*1024, 65536, 5)
w(12*1024*1024 - 7, 200000, 6)
h.zero(3*65536, 16*65536)
h.zero(1000, 15*1024*1024)
h.trim(65536, 17*1024*1024)
w(17*1024*1024 + 100, 100, 7)
h.flush()
";
    for (i, opts) in ["compat=0.10", "compat=1.1", "compat=1.1,cluster_size=512"]
        .iter()
        .enumerate()
    {
        let img = kinds_image(dir.path(), &format!("w{i}.qcow2"), opts);
        // The same writes on the raw image qemu reads from it.
        let raw = dir.path().join(format!("w{i}.raw"));
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&raw)]);
        let rs = Server::ours(&["file", p(&raw)]);
        nbdsh(&rs.uri(), script);
        drop(rs);
        let s = serve(&img, &[]);
        nbdsh(&s.uri(), script);
        drop(s);
        check_clean(&img);
        compare(&raw, &img);
    }
}

/// A copy into a fresh image made by `create=true`, with small clusters
/// so that the refcount table has to grow several times.
#[test]
fn qcow2_create_and_grow_refcounts() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    random_file(&raw, 12 << 20, 23);
    for (i, extra) in [
        &["cluster-size=512"][..],
        &[][..],
        &["preallocation=metadata"][..],
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("c{i}.qcow2"));
        let mut args = vec![
            "-U",
            "-",
            "--filter=qcow2",
            "file",
            p(&img),
            "create=true",
            "size=12M",
        ];
        args.extend_from_slice(extra);
        let run_cmd = format!("{} {} $uri", p(&our_bin("nbdcopy")), p(&raw));
        args.extend_from_slice(&["--run", &run_cmd]);
        run_ok(Command::new(nbdkit()).args(&args));
        check_clean(&img);
        compare(&raw, &img);
        let info = qemu_img(&["info", p(&img)]);
        assert!(info.contains("compat: 1.1"), "{info}");
    }
    // Metadata preallocation: every cluster is mapped before any write.
    let img = dir.path().join("pre.qcow2");
    run_ok(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=qcow2",
        "file",
        p(&img),
        "create=true",
        "size=4M",
        "preallocation=metadata",
        "--run",
        "true",
    ]));
    check_clean(&img);
    let m = qemu_img(&["map", "--output=json", p(&img)]);
    assert!(
        m.contains("\"data\": true") && !m.contains("\"data\": false"),
        "{m}"
    );
}

/// A server killed (SIGKILL) in the middle of a copy leaves an image
/// that qemu-img check -r all finds clean or repairs, with everything
/// flushed before the kill present.
#[test]
fn qcow2_sigkill_mid_copy() {
    if !require(&["qemu-img"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    let mut s = serve(&img, &["create=true", "size=256M"]);
    let pid = s.pid();
    nbdsh(
        &s.uri(),
        "
h.pwrite(b'\\x5a' * (4 << 20), 0)
h.pwrite(b'\\x33' * 1000, 10 << 20)
h.flush()
",
    );
    // Unflushed writes, then a kill while more are on the way.
    let uri = s.uri();
    let writer = std::thread::spawn(move || {
        let _ = Command::new(PYTHON)
            .arg("-c")
            .arg("import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nfor i in range(400):\n    h.pwrite(bytes([i]) * 524288, (16 << 20) + i * 524288)\n")
            .arg(uri)
            .output();
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    writer.join().unwrap();
    let t = std::time::Instant::now();
    while s.alive() && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!s.alive());
    let out = run(Command::new("qemu-img").args(["check", "-r", "all", p(&img)]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    check_clean(&img);
    let raw = dir.path().join("k.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        p(&img),
        p(&raw),
    ]);
    let data = std::fs::read(&raw).unwrap();
    assert!(data[..4 << 20].iter().all(|&b| b == 0x5a));
    assert!(data[10 << 20..(10 << 20) + 1000].iter().all(|&b| b == 0x33));
}
