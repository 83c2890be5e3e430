//! The gzip filter end to end, on files `gzip` made: the bytes checked
//! with nbdcopy and against upstream's gzip filter, the flags against
//! upstream's, multi-member and corrupt files, and the filter under cow
//! (writable) and under tar (a `.tar.gz`).

use std::path::Path;
use std::process::Command;

use crate::common::{
    nbdpy, random_file, require, require_nbdsh, run, run_ok, same_as_upstream, Server,
};
use crate::filter_offset::copy_out;

/// A 3 MiB disk image (random data, then zeroes) and its `.gz`.
fn image(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let raw = dir.join("disk.img");
    random_file(&raw, 1 << 20, 7);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.set_len(3 << 20).unwrap();
    run_ok(Command::new("gzip").arg("-k").arg(&raw));
    (raw, dir.join("disk.img.gz"))
}

#[test]
fn gzip_serves_the_uncompressed_bytes_as_upstream() {
    if !require(&["gzip", "nbdcopy"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (raw, gz) = image(d.path());
    let args = ["file", gz.to_str().unwrap(), "--filter=gzip"];
    let ours = copy_out(&Server::ours(&args).uri(), d.path());
    assert_eq!(ours, std::fs::read(&raw).unwrap());
    if require(&["nbdkit"]) {
        assert_eq!(copy_out(&Server::upstream(&args).uri(), d.path()), ours);
    }
    same_as_upstream(
        &args,
        r#"
print("size", h.get_size(), "ro", h.is_read_only(), "flush", h.can_flush(),
      "mc", h.can_multi_conn(), "trim", h.can_trim(), "zero", h.can_zero(),
      "cache", h.can_cache(), "fua", h.can_fua(), "fz", h.can_fast_zero())
print(h.pread(16, (1 << 20) - 8).hex())
h.cache(4096, 0)
entries = []
h.block_status(65536, 0, lambda ctx, off, e, err: entries.extend(e))
print("extents", entries)
try:
    h.pwrite(b"x", 0)
except nbd.Error as e:
    print("write refused")
"#,
    );
}

#[test]
fn gzip_multi_member_and_corrupt_files() {
    if !require(&["gzip", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (a, b) = (dir.join("a"), dir.join("b"));
    random_file(&a, 200_000, 1);
    random_file(&b, 100_000, 2);
    let mut cat = Vec::new();
    for f in [&a, &b] {
        cat.extend(run(Command::new("gzip").arg("-c").arg(f)).stdout);
    }
    let multi = dir.join("multi.gz");
    std::fs::write(&multi, &cat).unwrap();
    let want = run(Command::new("gzip").arg("-dc").arg(&multi)).stdout;
    assert_eq!(want.len(), 300_000);
    let s = Server::ours(&["file", multi.to_str().unwrap(), "--filter=gzip"]);
    assert_eq!(copy_out(&s.uri(), dir), want);
    drop(s);
    // Truncated, and a flipped bit: the connection fails, the server
    // goes on.
    let truncated = dir.join("truncated.gz");
    std::fs::write(&truncated, &cat[..cat.len() / 3]).unwrap();
    let mut flipped = cat.clone();
    flipped[cat.len() / 4] ^= 0x10;
    let flipped_path = dir.join("flipped.gz");
    std::fs::write(&flipped_path, &flipped).unwrap();
    for bad in [&truncated, &flipped_path, &a] {
        let mut s = Server::ours(&["file", bad.to_str().unwrap(), "--filter=gzip"]);
        for _ in 0..2 {
            let out = run(Command::new("nbdinfo").arg(s.uri()));
            assert!(!out.status.success(), "{}", bad.display());
        }
        assert!(s.alive());
    }
}

#[test]
fn gzip_under_cow_is_writable() {
    if !require(&["gzip"]) || !require_nbdsh() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (_, gz) = image(d.path());
    let args = [
        "file",
        gz.to_str().unwrap(),
        "--filter=cow",
        "--filter=gzip",
    ];
    let script = r#"
print("ro", h.is_read_only(), h.get_size())
h.pwrite(b"written over gzip", (1 << 20) - 4)
print(h.pread(32, (1 << 20) - 8).hex())
"#;
    let out = same_as_upstream(&args, script);
    let out = out.unwrap_or_else(|| nbdpy(&Server::ours(&args).uri(), script));
    assert!(out.starts_with("ro False 3145728\n"), "{out}");
}

#[test]
fn gzip_under_tar_serves_a_tar_gz_entry() {
    if !require(&["gzip", "tar", "nbdcopy"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    random_file(&dir.join("disk.img"), 300_000, 3);
    random_file(&dir.join("other"), 5000, 4);
    run_ok(
        Command::new("tar")
            .current_dir(dir)
            .args(["-czf", "a.tar.gz", "other", "disk.img"]),
    );
    let file = dir.join("a.tar.gz");
    let args = [
        "file",
        file.to_str().unwrap(),
        "--filter=tar",
        "tar-entry=disk.img",
        "--filter=gzip",
    ];
    let ours = copy_out(&Server::ours(&args).uri(), dir);
    assert_eq!(ours, std::fs::read(dir.join("disk.img")).unwrap());
    if require(&["nbdkit"]) {
        assert_eq!(copy_out(&Server::upstream(&args).uri(), dir), ours);
    }
}
