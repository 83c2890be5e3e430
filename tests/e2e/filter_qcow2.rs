//! The qcow2 filter against qemu: images made by qemu-img and qemu-io
//! read back equal, images written by ours pass `qemu-img check`, the
//! maps equal qemu-nbd's, locks keep a second writer out.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{
    nbdkit, nbdpy, our_bin, p, qcow2_create, qcow2_overlay, qemu_img, qemu_io_qcow2, random_file,
    require, require_nbdsh, run, run_ok, Server, PYTHON,
};

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
    qcow2_create(&img, opts, "20M");
    qemu_io_qcow2(
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
    qcow2_create(&img, &format!("data_file={}", p(&data)), "1M");
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
    let a = if ctx.is_some() { "-A" } else { "-r" };
    map(
        &["--", "[", "qemu-nbd", "-r", a, "-f", "qcow2", p(img), "]"],
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

/// Writes of every shape, zeroes and trims (an nbdsh script).
const WRITES: &str = "
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
    let script = WRITES;
    for (i, opts) in [
        "compat=0.10",
        "compat=1.1",
        "compat=1.1,cluster_size=512",
        "compat=1.1,extended_l2=on",
        "compat=1.1,extended_l2=on,cluster_size=16k",
    ]
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

/// The raw disk qemu sees through `img`'s chain.
fn qemu_raw(img: &Path, out: &Path) {
    qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", p(img), p(out)]);
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// A chain base.raw <- mid.qcow2 <- top.qcow2 (and a raw-backed
/// overlay), each layer written by qemu-io, read by ours through the
/// chain; writes into the top copy what they do not cover from below.
#[test]
fn qcow2_backing_chains() {
    if !require(&["qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    random_file(&base, 6 << 20, 5);
    // A backing file shorter than the overlay reads as zeroes past its end.
    let mid = d.join("mid.qcow2");
    qcow2_overlay(&mid, "base.raw", "raw", "8M");
    qemu_io_qcow2(
        &mid,
        &[
            "write -P 0x11 1M 100k",
            "write -z 2M 64k",
            "write -c -P 0x12 3M 64k",
        ],
    );
    // The top with and without extended L2 entries (subclusters of 2K:
    // qemu's writes leave clusters partly allocated).
    for (name, opts) in [("top", "compat=1.1"), ("topx", "extended_l2=on")] {
        let top = d.join(format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            p(&top),
            "8M",
        ]);
        qemu_io_qcow2(
            &top,
            &[
                "write -P 0x21 1050k 10k",
                "write -z 5M 1M",
                "write -z 6000k 3k",
            ],
        );
        for img in [&mid, &top] {
            let (ours, theirs) = (d.join("ours.raw"), d.join("theirs.raw"));
            read_ours(img, &ours, &[]);
            qemu_raw(img, &theirs);
            same_bytes(&ours, &theirs);
        }
        // Partial writes over backing data: the rest of each cluster
        // comes from below; a write and a zero into partly allocated
        // clusters.
        let s = serve(&top, &[]);
        nbdsh(
            &s.uri(),
            "h.pwrite(b'\\x77' * 1000, 100)\n\
             h.pwrite(b'\\x78' * 70000, 3 * 1048576 - 300)\n\
             h.pwrite(b'\\x79' * 100, 1050 * 1024 + 12000)\n\
             h.zero(5000, 6000 * 1024 - 1000)\n\
             h.flush()\n",
        );
        drop(s);
        check_clean(&top);
        let (ours, theirs) = (d.join("ours.raw"), d.join("theirs.raw"));
        read_ours(&top, &ours, &[]);
        qemu_raw(&top, &theirs);
        same_bytes(&ours, &theirs);
        let t = std::fs::read(&theirs).unwrap();
        assert!(t[100..1100].iter().all(|&b| b == 0x77));
        assert_eq!(t[..100], std::fs::read(&base).unwrap()[..100]);
        assert!(t[1050 * 1024 + 12000..][..100].iter().all(|&b| b == 0x79));
        assert!(t[6000 * 1024 - 1000..][..5000].iter().all(|&b| b == 0));
    }
}

/// Copy-on-read: reading the whole disk fills the top image with what
/// came from the backing file.
#[test]
fn qcow2_copy_on_read() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    random_file(&base, 2 << 20, 9);
    let top = d.join("top.qcow2");
    qcow2_overlay(&top, "base.raw", "raw", "2M");
    let out = d.join("out.raw");
    let s = serve(&top, &["copy-on-read=true"]);
    run_ok(Command::new(our_bin("nbdcopy")).arg(s.uri()).arg(&out));
    drop(s);
    same_bytes(&out, &base);
    check_clean(&top);
    // Now the top alone holds the data.
    std::fs::remove_file(&base).unwrap();
    qemu_img(&["rebase", "-u", "-b", "", p(&top)]);
    let alone = d.join("alone.raw");
    qemu_raw(&top, &alone);
    same_bytes(&alone, &out);
}

/// Copy-on-read racing guest writes: reads of whole clusters on one
/// connection, 4K writes into the same clusters on another, all in
/// flight together. The backing data a read copies up never overwrites
/// a write, even one in flight when the backing data was read.
#[test]
fn qcow2_copy_on_read_keeps_concurrent_writes() {
    if !require(&["qemu-img"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    random_file(&base, 4 << 20, 13);
    let expect = d.join("expect.raw");
    std::fs::copy(&base, &expect).unwrap();
    for round in 0..3 {
        let top = d.join(format!("top{round}.qcow2"));
        qcow2_overlay(&top, "base.raw", "raw", "4M");
        let s = serve(&top, &["copy-on-read=true"]);
        let script = format!(
            "
import random
w = nbd.NBD()
w.connect_uri(sys.argv[1])
blocks = list(range(0, 1024, 3))
random.Random({round}).shuffle(blocks)
def data(b):
    return bytes([(b * 5 + j + {round}) % 249 for j in range(4096)])
cookies = []
for b in blocks:
    for c in (h, w):
        while c.aio_in_flight() >= 16:
            c.poll(-1)
    cookies.append((h, h.aio_pread(nbd.Buffer(65536), (b * 4096) & ~65535)))
    cookies.append((w, w.aio_pwrite(data(b), b * 4096)))
for c in (h, w):
    while c.aio_in_flight() > 0:
        c.poll(-1)
for c, k in cookies:
    assert c.aio_command_completed(k)
w.flush()
with open({expect:?}, 'r+b') as f:
    for b in blocks:
        f.seek(b * 4096)
        f.write(data(b))
print(len(blocks))
"
        );
        assert_eq!(nbdpy(&s.uri(), &script).trim(), "342");
        drop(s);
        check_clean(&top);
        let got = d.join(format!("got{round}.raw"));
        qemu_raw(&top, &got);
        same_bytes(&got, &expect);
        std::fs::copy(&base, &expect).unwrap();
    }
}

/// A backing file on an NBD server, named as qemu names it
/// (`nbd:unix:PATH`) or by URI.
#[test]
fn qcow2_nbd_backing() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    random_file(&base, 4 << 20, 11);
    let bs = Server::ours(&["-r", "file", p(&base)]);
    for (i, name) in [format!("nbd:unix:{}", bs.socket.display()), bs.uri()]
        .iter()
        .enumerate()
    {
        let top = d.join(format!("t{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            name,
            "-F",
            "raw",
            p(&top),
            "4M",
        ]);
        qemu_io_qcow2(&top, &["write -P 0x44 1M 4k"]);
        let (ours, theirs) = (d.join("ours.raw"), d.join("theirs.raw"));
        read_ours(&top, &ours, &[]);
        qemu_raw(&top, &theirs);
        same_bytes(&ours, &theirs);
        let o = std::fs::read(&ours).unwrap();
        assert!(o[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x44));
    }
}

/// `qemu:allocation-depth` (and base:allocation) through a chain, as
/// qemu-nbd reports them.
#[test]
fn qcow2_allocation_depth_as_qemu_nbd() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qcow2_create(&base, "", "8M");
    qemu_io_qcow2(&base, &["write -P 1 0 2M", "write -z 6M 64k"]);
    let top = d.join("top.qcow2");
    qcow2_overlay(&top, "base.qcow2", "qcow2", "10M");
    qemu_io_qcow2(
        &top,
        &["write -P 2 1M 128k", "write -z 3M 64k", "write -P 3 9M 64k"],
    );
    let s = Server::ours(&["-r", "--filter=qcow2", "file", p(&top)]);
    for ctx in [Some("qemu:allocation-depth"), None] {
        let ours = map(&[&s.uri()], ctx);
        assert_eq!(ours, qemu_nbd_map(&top, ctx), "{ctx:?}");
    }
    assert!(map(&[&s.uri()], Some("qemu:allocation-depth")).contains("backing depth 2"));
}

/// Image locks: a second writer is refused, ours or qemu's, both ways;
/// force-share=true opts out.
#[test]
fn qcow2_locks_keep_second_writer_out() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    qcow2_create(&img, "", "1M");
    // Ours writes: qemu-io cannot.
    let s = serve(&img, &[]);
    nbdsh(&s.uri(), "h.pwrite(b'x' * 512, 0)\nh.flush()\n");
    let out = run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 512", p(&img)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{err}");
    // ... nor a second server of ours.
    let out = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=qcow2",
        "file",
        p(&img),
        "--run",
        "true",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{err}");
    drop(s);
    // qemu writes: ours cannot start, unless told to share.
    let sock = dir.path().join("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k", p(&sock), p(&img)])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=qcow2",
        "file",
        p(&img),
        "--run",
        "true",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    let refused = !out.status.success() && err.contains("lock");
    let out2 = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "-r",
        "--filter=qcow2",
        "file",
        p(&img),
        "force-share=true",
        "--run",
        "true",
    ]));
    let _ = q.kill();
    let _ = q.wait();
    assert!(refused, "{err}");
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
}

/// Writes a client never flushed are written back when it disconnects.
#[test]
fn qcow2_unflushed_writes_kept_at_disconnect() {
    if !require(&["qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.qcow2");
    let s = serve(&img, &["create=true", "size=8M"]);
    nbdsh(&s.uri(), "h.pwrite(b'\\x61' * 70000, 1000)\n");
    // The metadata is written back as the connection closes.
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(s);
    check_clean(&img);
    qemu_io_qcow2(&img, &["read -P 0x61 1000 70000", "read -P 0 0 1000"]);
}

/// The flags of each persistent bitmap in `qemu-img info --output=json`.
fn bitmap_flags(info: &str) -> Vec<(String, Vec<String>)> {
    let v: serde_json::Value = serde_json::from_str(info).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let f = b["flags"].as_array().unwrap();
            let f = f.iter().map(|x| x.as_str().unwrap().to_string()).collect();
            (b["name"].as_str().unwrap().to_string(), f)
        })
        .collect()
}

/// An nbdsh script line printing `qemu-img info --output=json` of `img`
/// (while the connection is open).
fn info_in_script(img: &Path) -> String {
    format!(
        "import subprocess\nprint(subprocess.run(['qemu-img', 'info', '-U', '--output=json', \
         '{}'], capture_output=True, text=True, check=True).stdout)\n",
        p(img)
    )
}

/// The dirty ranges of persistent bitmap `name`, as qemu-nbd exports it.
fn dirty_ranges(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let ctx = format!("--map=qemu:dirty-bitmap:{name}");
    let cmd = [
        "--",
        "[",
        "qemu-nbd",
        "-r",
        "-f",
        "qcow2",
        "-B",
        name,
        p(img),
        "]",
    ];
    let out = run_ok(Command::new(our_bin("nbdinfo")).arg(&ctx).args(cmd));
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(2) == Some(&"1")).then(|| (w[0].parse().unwrap(), w[1].parse().unwrap()))
        })
        .collect()
}

/// Persistent bitmaps (`qemu-img bitmap --add`) are kept up to date by
/// our writes, zeroes and trims, each at its granularity; a disabled one
/// is left alone; while bits are gathered the bitmaps are marked in use,
/// and a killed server leaves them so (inconsistent, as qemu would).
#[test]
fn qcow2_writes_keep_dirty_bitmaps() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    qcow2_create(&img, "", "16M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512k", p(&img), "b1"]);
    qemu_img(&["bitmap", "--add", "--disable", p(&img), "off"]);
    qemu_io_qcow2(&img, &["write -P 1 0 64k"]);
    let s = serve(&img, &[]);
    let script = "h.pwrite(b'x' * 100, 1 << 20)\nh.zero(200 * 1024, 4 << 20)\n\
                  h.trim(65536, 8 << 20)\nh.flush()\n"
        .to_string()
        + &info_in_script(&img);
    // Not yet written back while the connection is open: in use.
    let during = bitmap_flags(&nbdpy(&s.uri(), &script));
    drop(s);
    let auto = vec!["auto".to_string()];
    let in_use = vec!["in-use".to_string(), "auto".to_string()];
    assert_eq!(
        during,
        [
            ("b0".into(), in_use.clone()),
            ("b1".into(), in_use),
            ("off".into(), vec![])
        ]
    );
    let after = qemu_img(&["info", "--output=json", p(&img)]);
    assert_eq!(
        bitmap_flags(&after),
        [
            ("b0".into(), auto.clone()),
            ("b1".into(), auto),
            ("off".into(), vec![])
        ]
    );
    check_clean(&img);
    let m = 1 << 20;
    assert_eq!(
        dirty_ranges(&img, "b0"),
        [(0, 65536), (m, 65536), (4 * m, 256 << 10), (8 * m, 65536)]
    );
    let h = 512 << 10;
    assert_eq!(
        dirty_ranges(&img, "b1"),
        [(0, h), (m, h), (4 * m, h), (8 * m, h)]
    );
    assert_eq!(dirty_ranges(&img, "off"), []);

    // Killed with bits not written back: marked in use.
    let mut s = serve(&img, &[]);
    let script = format!(
        "h.pwrite(b'y' * 10, 12 << 20)\nh.flush()\nimport os\nos.kill({}, 9)\n",
        s.pid()
    );
    nbdpy(&s.uri(), &script);
    while s.alive() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(s);
    let f = bitmap_flags(&qemu_img(&["info", "-U", "--output=json", p(&img)]));
    assert!(f[0].1.contains(&"in-use".to_string()), "{f:?}");
    assert_eq!(f[2].1, Vec::<String>::new());
}

/// Writes into an image with internal snapshots: clusters and L2 tables
/// a snapshot shares are copied first, so each snapshot still reads as
/// it did, the image passes qemu-img check, and the disk equals the same
/// writes on a raw copy.
#[test]
fn qcow2_writes_keep_internal_snapshots() {
    if !require(&["qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = |name: &str| dir.path().join(name);
    for (i, opts) in ["compat=1.1", "compat=0.10,cluster_size=4096"]
        .iter()
        .enumerate()
    {
        let img = kinds_image(dir.path(), &format!("s{i}.qcow2"), opts);
        let (s1, s2, now) = (
            raw(&format!("s1-{i}.raw")),
            raw(&format!("s2-{i}.raw")),
            raw(&format!("now-{i}.raw")),
        );
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&s1)]);
        qemu_img(&["snapshot", "-c", "s1", p(&img)]);
        // Some tables copied by qemu already, some still shared.
        qemu_io_qcow2(&img, &["write -P 0x33 5M 64k", "write -z 0 64k"]);
        qemu_img(&["snapshot", "-c", "s2", p(&img)]);
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&s2)]);
        std::fs::copy(&s2, &now).unwrap();
        let rs = Server::ours(&["file", p(&now)]);
        nbdsh(&rs.uri(), WRITES);
        drop(rs);
        let s = serve(&img, &[]);
        assert_eq!(nbdpy(&s.uri(), "print(h.is_read_only())\n").trim(), "False");
        nbdsh(&s.uri(), WRITES);
        drop(s);
        check_clean(&img);
        compare(&now, &img);
        for (name, want) in [("s1", &s1), ("s2", &s2)] {
            let got = raw(&format!("got-{name}-{i}.raw"));
            let l = format!("snapshot.name={name}");
            qemu_img(&[
                "convert",
                "-l",
                &l,
                "-f",
                "qcow2",
                "-O",
                "raw",
                p(&img),
                p(&got),
            ]);
            same_bytes(want, &got);
        }
        let list = qemu_img(&["snapshot", "-l", p(&img)]);
        assert!(list.contains("s1") && list.contains("s2"), "{list}");
    }
}

/// A qcow2 with lazy refcounts whose writer was killed (the dirty bit
/// set, refcounts on disk too low: qemu-img check finds errors): served
/// read-only it is read as it is; served writable, its refcounts are
/// counted again first, and after our writes qemu-img check finds it
/// clean, its dirty bit clear, its snapshot intact, its data right.
#[test]
fn qcow2_dirty_image_repaired_before_writing() {
    if !require(&["qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let (s1, want, got) = (
        dir.path().join("s1.raw"),
        dir.path().join("want.raw"),
        dir.path().join("got.raw"),
    );
    qcow2_create(&img, "lazy_refcounts=on", "20M");
    qemu_io_qcow2(&img, &["write -P 0x11 0 3M", "write -c -P 0x12 4M 1M"]);
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(&img), p(&s1)]);
    let writes = [
        "write -P 0x55 64k 1M",
        "write -P 0x66 3M 200k",
        "write -P 0x67 10M 2M",
    ];
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for w in writes.iter().chain(&["flush", "sigraise 9"]) {
        c.arg("-c").arg(w);
    }
    let out = run(c.arg(&img));
    assert!(!out.status.success(), "qemu-io was not killed");
    let dirty = |img: &Path| std::fs::read(img).unwrap()[79] & 1 != 0;
    assert!(dirty(&img));
    let chk = run(Command::new("qemu-img").args(["check", p(&img)]));
    assert!(!chk.status.success(), "qemu-img check found no error");

    // What the disk holds: the snapshot's data, qemu's writes, ours.
    std::fs::copy(&s1, &want).unwrap();
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for w in writes {
        c.arg("-c").arg(w);
    }
    run_ok(c.arg(&want));
    read_ours(&img, &got, &[]);
    same_bytes(&want, &got);
    assert!(dirty(&img), "a read-only server changed the image");

    let rs = Server::ours(&["file", p(&want)]);
    nbdsh(&rs.uri(), WRITES);
    drop(rs);
    let s = serve(&img, &[]);
    assert_eq!(nbdpy(&s.uri(), "print(h.is_read_only())\n").trim(), "False");
    nbdsh(&s.uri(), WRITES);
    drop(s);
    assert!(!dirty(&img));
    check_clean(&img);
    compare(&want, &img);
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-f",
        "qcow2",
        "-O",
        "raw",
        p(&img),
        p(&got),
    ]);
    same_bytes(&s1, &got);
}

/// Our nbdkit serving `file` on a TCP port of its own (found free just
/// before), killed on drop.
struct TcpServer {
    child: std::process::Child,
    port: u16,
}

impl TcpServer {
    fn ours(args: &[&str]) -> TcpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(nbdkit())
            .args(["-f", "-p", &port.to_string()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut s = TcpServer { child, port };
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed().as_secs() < 20 && matches!(s.child.try_wait(), Ok(None)),
                "the TCP server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        s
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        crate::common::stop(&mut self.child);
    }
}

/// A backing file on an NBD server (Unix socket, and TCP by URI and by
/// qemu's `nbd:host:port`) that is sparse: its holes are holes in the
/// overlay's map as qemu-nbd reports them, for base:allocation and
/// qemu:allocation-depth.
#[test]
fn qcow2_nbd_backing_extents_as_qemu_nbd() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 8M with data at 1M (70000 bytes) and 5M (192K), holes elsewhere.
    let base = d.join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[0x61; 70000], 1 << 20).unwrap();
        f.write_all_at(&[0x62; 192 << 10], 5 << 20).unwrap();
    }
    let unix = Server::ours(&["-r", "file", p(&base)]);
    let tcp = TcpServer::ours(&["-r", "file", p(&base)]);
    let names = [
        format!("nbd:unix:{}", unix.socket.display()),
        format!("nbd://localhost:{}", tcp.port),
        format!("nbd:localhost:{}", tcp.port),
    ];
    for (i, name) in names.iter().enumerate() {
        let top = d.join(format!("n{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            name,
            "-F",
            "raw",
            p(&top),
            "8M",
        ]);
        qemu_io_qcow2(&top, &["write -P 7 2M 64k", "write -z 5M 64k"]);
        let s = Server::ours(&["-r", "--filter=qcow2", "file", p(&top)]);
        for ctx in [None, Some("qemu:allocation-depth")] {
            let ours = map(&[&s.uri()], ctx);
            assert_eq!(ours, qemu_nbd_map(&top, ctx), "{name} {ctx:?}");
        }
        // The backing file's holes show (its start is one).
        let ours = map(&[&s.uri()], None);
        let first = ours.lines().next().unwrap_or("");
        assert!(
            first.trim().starts_with("0 ") && first.contains("hole,zero"),
            "{name}: {ours}"
        );
    }
}

/// Serve `img` (with `args`) and write blocks of `bs` bytes into it
/// (indices: the Python expression `blocks`, shuffled with `seed`) in
/// parallel, 32 in flight on each of two connections, each block holding
/// a pattern of its index; the same blocks go into the file `expect`,
/// which must exist. Then the image must be clean and equal `expect`.
/// Returns how many blocks were written.
fn parallel_pwrites(
    img: &Path,
    args: &[&str],
    expect: &Path,
    bs: usize,
    blocks: &str,
    seed: u32,
) -> String {
    let s = serve(img, args);
    let script = format!(
        "
import random
h2 = nbd.NBD()
h2.connect_uri(sys.argv[1])
hs = [h, h2]
blocks = list({blocks})
random.Random({seed}).shuffle(blocks)
def data(b):
    return bytes([(b * 7 + j) % 251 for j in range({bs})])
cookies = []
for i, b in enumerate(blocks):
    c = hs[i % 2]
    while c.aio_in_flight() >= 32:
        c.poll(-1)
    cookies.append((c, c.aio_pwrite(data(b), b * {bs})))
for c in hs:
    while c.aio_in_flight() > 0:
        c.poll(-1)
for c, k in cookies:
    assert c.aio_command_completed(k)
with open({expect:?}, 'r+b') as f:
    for b in blocks:
        f.seek(b * {bs})
        f.write(data(b))
h.flush()
print(len(blocks))
"
    );
    let n = nbdpy(&s.uri(), &script).trim().to_string();
    drop(s);
    check_clean(img);
    compare(expect, img);
    n
}

/// Many 4K writes in flight at once, over two connections, into the
/// same fresh clusters (over nothing, and over a backing file whose data
/// the rest of each cluster keeps): no write is lost, the image equals
/// the same writes on a raw file, and `qemu-img check` finds no error.
#[test]
fn qcow2_parallel_writes_into_fresh_clusters() {
    if !require(&["qemu-img"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    random_file(&base, 4 << 20, 7);
    for with_backing in [false, true] {
        let img = dir.path().join(format!("p{with_backing}.qcow2"));
        let expect = dir.path().join(format!("p{with_backing}.raw"));
        if with_backing {
            std::fs::copy(&base, &expect).unwrap();
        } else {
            std::fs::write(&expect, vec![0u8; 4 << 20]).unwrap();
        }
        let mut args = vec!["create=true", "size=4M"];
        let b = format!("backing={}", p(&base));
        if with_backing {
            args.extend_from_slice(&[&b, "backing-format=raw"]);
        }
        // Every other 4K block of the first 2M (32 clusters of 64K, 8
        // writes into each), shuffled, 32 in flight per connection.
        let n = parallel_pwrites(&img, &args, &expect, 4096, "range(0, 512, 2)", 5);
        assert_eq!(n, "256");
    }
}

/// Parallel writes into clusters with only some subclusters allocated
/// (extended L2): a write into an allocated subcluster and one into an
/// unallocated subcluster of the same cluster (which reallocates the
/// cluster, copying in what it holds) must not lose each other's data.
#[test]
fn qcow2_parallel_writes_into_partly_allocated_subclusters() {
    if !require(&["qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    let expect = dir.path().join("x.raw");
    qcow2_create(&img, "compat=1.1,extended_l2=on", "4M");
    // Every fourth 2K subcluster of the first 2M allocated by qemu.
    let cmds: Vec<String> = (0..256)
        .map(|k| format!("write -P 0x{:02x} {} 2k", k % 200 + 1, k * 8192))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_qcow2(&img, &cmds);
    // Then every 2K of the first 2M rewritten, shuffled, 32 in flight on
    // each of two connections.
    std::fs::write(&expect, vec![0u8; 4 << 20]).unwrap();
    let n = parallel_pwrites(&img, &[], &expect, 2048, "range(1024)", 9);
    assert_eq!(n, "1024");
}

/// Zeroes of whole clusters racing 4K writes into the same clusters,
/// which read the backing file's data (so each write allocates its
/// cluster, copying the rest in): each cluster ends either all zeroes
/// (the write first) or zeroes around the 4K written (the zero first),
/// never with the backing data around the write.
#[test]
fn qcow2_zeroes_racing_writes_end_in_some_order() {
    if !require(&["qemu-img"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0xee; 4 << 20]).unwrap();
    let img = dir.path().join("z.qcow2");
    qcow2_overlay(&img, "base.raw", "raw", "4M");
    let s = serve(&img, &[]);
    let script = "
import random
w = nbd.NBD()
w.connect_uri(sys.argv[1])
cl = list(range(64))
random.Random(3).shuffle(cl)
cookies = []
for c in cl:
    for x in (h, w):
        while x.aio_in_flight() >= 16:
            x.poll(-1)
    at = c * 65536 + (c % 16) * 4096
    cookies.append((w, w.aio_pwrite(bytes([c + 1]) * 4096, at)))
    cookies.append((h, h.aio_zero(65536, c * 65536)))
for x in (h, w):
    while x.aio_in_flight() > 0:
        x.poll(-1)
for x, k in cookies:
    assert x.aio_command_completed(k)
h.flush()
bad = []
for c in range(64):
    d = h.pread(65536, c * 65536)
    at = (c % 16) * 4096
    rest = d[:at] + d[at + 4096:]
    mid = d[at:at + 4096]
    if rest != bytes(61440) or mid not in (bytes(4096), bytes([c + 1]) * 4096):
        bad.append(c)
print(bad)
";
    assert_eq!(nbdpy(&s.uri(), script).trim(), "[]");
    drop(s);
    check_clean(&img);
}

/// The writer's lock is taken when the server starts, before any
/// client: `qemu-img info` (which does not share write) and a qemu-io
/// writer are refused; a read-only server (`-r`, `qcow2dec`) or
/// `force-share=true` takes no writer's lock.
#[test]
fn qcow2_write_lock_taken_at_start() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    qcow2_create(&img, "", "1M");
    let info = || run(Command::new("qemu-img").args(["info", p(&img)]));
    // The lock comes just after the socket is listening: wait for it.
    let refused_soon = || {
        let t = std::time::Instant::now();
        loop {
            let out = info();
            if !out.status.success() {
                return String::from_utf8_lossy(&out.stderr).into_owned();
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "qemu-img info still opens the image"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let s = serve(&img, &[]);
    let err = refused_soon();
    assert!(err.contains("lock"), "{err}");
    let out = run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 512", p(&img)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{err}");
    drop(s);
    for (filter, extra) in [
        ("--filter=qcow2", &["-r"][..]),
        ("--filter=qcow2dec", &[][..]),
        ("--filter=qcow2", &["force-share=true"][..]),
    ] {
        let mut args: Vec<&str> = Vec::new();
        let force = extra.contains(&"force-share=true");
        if !force {
            args.extend_from_slice(extra);
        }
        args.extend_from_slice(&[filter, "file", p(&img)]);
        if force {
            args.push("force-share=true");
        }
        let s = Server::ours(&args);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let out = info();
        drop(s);
        assert!(
            out.status.success(),
            "{filter} {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
