//! The offset filter end to end: the bytes and the extents of the window,
//! checked with nbdcopy, nbdinfo --map and Python, and against upstream.

use std::path::Path;
use std::process::Command;

use crate::common::{nbdpy, random_file, require, require_nbdsh, run, run_ok, Server};

/// `nbdinfo --map` of an export as (offset, length, type), adjacent
/// extents of one type merged.
pub(crate) fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run_ok(Command::new("nbdinfo").arg("--map").arg(uri));
    let mut v: Vec<(u64, u64, u32)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "bad map line {line:?}");
        let (o, l, t) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        match v.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => v.push((o, l, t)),
        }
    }
    v
}

/// The part of a map in `[start, start+len)`, moved to start at 0.
pub(crate) fn window(m: &[(u64, u64, u32)], start: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let end = start + len;
    m.iter()
        .filter(|(o, l, _)| o + l > start && *o < end)
        .map(|(o, l, t)| {
            let s = (*o).max(start);
            let e = (o + l).min(end);
            (s - start, e - s, *t)
        })
        .collect()
}

/// Copy an export to a local file with nbdcopy and return the bytes.
pub(crate) fn copy_out(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("copy.out");
    run_ok(Command::new("nbdcopy").arg(uri).arg(&out));
    std::fs::read(&out).unwrap()
}

/// A 1 MiB sparse file with data at [128K, 192K) and [512K, 576K).
pub(crate) fn sparse_file(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(1 << 20).unwrap();
    for at in [128u64 << 10, 512 << 10] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[0x5a; 64 << 10]).unwrap();
    }
}

#[test]
fn offset_bytes_through_nbdcopy_and_python() {
    if !require(&["nbdcopy"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 1 << 20, 1);
    let d = disk.to_str().unwrap();
    let s = Server::ours(&["--filter=offset", "file", d, "offset=64K", "range=256K"]);
    let orig = std::fs::read(&disk).unwrap();
    assert_eq!(copy_out(&s.uri(), dir.path()), &orig[64 << 10..320 << 10]);
    nbdpy(
        &s.uri(),
        "assert h.get_size() == 262144\n\
         h.pwrite(b'\\x01' * 4096, 0)\n\
         h.pwrite(b'\\x02' * 4096, 262144 - 4096)\n\
         try:\n  h.pread(1, 262144)\n  raise SystemExit('read past the end worked')\n\
         except nbd.Error:\n  pass\n\
         h.shutdown()\n",
    );
    drop(s);
    let now = std::fs::read(&disk).unwrap();
    assert_eq!(&now[64 << 10..68 << 10], &[1; 4096][..]);
    assert_eq!(&now[316 << 10..320 << 10], &[2; 4096][..]);
    assert_eq!(&now[..64 << 10], &orig[..64 << 10]);
    assert_eq!(&now[320 << 10..], &orig[320 << 10..]);
}

#[test]
fn offset_map_is_shifted() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sparse.img");
    sparse_file(&disk);
    let d = disk.to_str().unwrap();
    let whole = map(&Server::ours(&["file", d]).uri());
    let win = map(&Server::ours(&["--filter=offset", "file", d, "offset=96K", "range=512K"]).uri());
    assert_eq!(win, window(&whole, 96 << 10, 512 << 10));
    // Data at 128K..192K of the file is at 32K..96K of the window.
    assert!(
        win.iter()
            .any(|(o, l, t)| *t == 0 && *o <= 32 << 10 && o + l >= 96 << 10),
        "{win:?}"
    );
    assert!(
        win.iter().any(|(_, _, t)| *t & 1 == 1),
        "no hole in {win:?}"
    );
    // The same as upstream's offset filter over upstream's file plugin.
    if require(&["nbdkit"]) {
        let theirs =
            map(
                &Server::upstream(&["--filter=offset", "file", d, "offset=96K", "range=512K"])
                    .uri(),
            );
        assert_eq!(win, theirs);
    }
}

#[test]
fn offset_outside_the_plugin_fails() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let s = Server::ours(&["--filter=offset", "memory", "1M", "offset=1M", "range=1"]);
    let out = run(Command::new("nbdinfo").arg("--size").arg(s.uri()));
    assert!(
        !out.status.success(),
        "nbdinfo connected to an impossible window"
    );
    let s = Server::ours(&["--filter=offset", "memory", "1M", "offset=1023K"]);
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(s.uri()));
    assert_eq!(out.trim(), "1024");
}

#[test]
fn offset_qemu_io_reads_the_window() {
    if !require(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sparse.img");
    sparse_file(&disk);
    let s = Server::ours(&[
        "--filter=offset",
        "file",
        disk.to_str().unwrap(),
        "offset=128K",
    ]);
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "read -P 0 64k 64k",
        &s.uri(),
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}
