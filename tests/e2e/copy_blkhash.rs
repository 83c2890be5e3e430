//! `nbdcopy --blkhash`: the block hash of sparse and dense images, from
//! our server, a local file and a pipe, to `null:` and to a file, must
//! equal the one a Python reference computes independently with hashlib
//! over the same bytes (the blkhash construction, see
//! tools/src/nbdcopy/blkhash.rs). The sparse image is 64 GiB with a few
//! pieces of data: reading its holes would not finish in time.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{random_file, require, run, run_ok, Server, PYTHON};
use crate::copy_common::nbdcopy;

/// The reference: `H(H(b1) || ... || H(bN) || le64(len))`, blocks of
/// `bs` bytes, the last one short. A block wholly in a hole of the file
/// (SEEK_DATA finds no data in it) is hashed as zeroes without reading.
const REFERENCE: &str = r#"
import hashlib, os, struct, sys
path, name, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(path)
zero = hashlib.new(name, bytes(bs)).digest()
outer = hashlib.new(name)
with open(path, "rb") as f:
    fd = f.fileno()
    off = 0
    while off < size:
        n = min(bs, size - off)
        try:
            data_at = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            data_at = size
        if data_at >= off + n:
            if n == bs:
                outer.update(zero)
            else:
                outer.update(hashlib.new(name, bytes(n)).digest())
        else:
            outer.update(hashlib.new(name, os.pread(fd, n, off)).digest())
        off += n
outer.update(struct.pack("<Q", size))
print(outer.hexdigest())
"#;

fn reference(path: &Path, digest: &str, block_size: u64) -> String {
    let out = run_ok(Command::new(PYTHON).args([
        "-c",
        REFERENCE,
        path.to_str().unwrap(),
        digest,
        &block_size.to_string(),
    ]));
    out.trim().to_string()
}

/// Our nbdcopy with these arguments; its stdout, trimmed.
fn ours(args: &[&str]) -> String {
    run_ok(nbdcopy().args(args)).trim().to_string()
}

/// 64 GiB + 12345 bytes: data at the start, across a block boundary, at
/// an odd offset, and in the short last block; holes elsewhere.
fn sparse_image(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    let size = (64u64 << 30) + 12345;
    f.set_len(size).unwrap();
    f.write_all_at(b"hello", 0).unwrap();
    f.write_all_at(&[7u8; 100_000], (1 << 20) - 50_000).unwrap();
    f.write_all_at(b"odd place", 5_000_000_001).unwrap();
    f.write_all_at(b"goodbye", size - 7).unwrap();
}

/// About 5 MiB of random data with a hole and a run of allocated zeroes
/// inside, and an odd size.
fn dense_image(path: &Path) {
    random_file(path, 5 * 1024 * 1024 + 777, 25);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; 300_000], 1_000_000).unwrap();
    // A hole punched in the middle (the file plugin reports it).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            2 << 20,
            1 << 20,
        );
    }
}

#[test]
fn copy_blkhash_sparse_from_server() {
    if !require(&[PYTHON]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    sparse_image(&img);
    let srv = Server::ours(&["file", img.to_str().unwrap()]);
    let uri = srv.uri();
    let expect = reference(&img, "sha256", 65536);
    assert_eq!(ours(&["--blkhash", &uri, "null:"]), expect);
    assert_eq!(ours(&["--blkhash=sha256/64k", &uri, "null:"]), expect);
    assert_eq!(ours(&["--blkhash", "--synchronous", &uri, "null:"]), expect);
    // To a file named on the command line, the hash to a file.
    let hash = dir.path().join("hash");
    let out = ours(&[
        "--blkhash=sha512/512k",
        &format!("--blkhash-file={}", hash.display()),
        &uri,
        "null:",
    ]);
    assert_eq!(out, "");
    assert_eq!(
        std::fs::read_to_string(&hash).unwrap(),
        format!("{}\n", reference(&img, "sha512", 512 * 1024))
    );
    // From the local file directly.
    assert_eq!(ours(&["--blkhash", img.to_str().unwrap(), "null:"]), expect);
}

#[test]
fn copy_blkhash_dense() {
    if !require(&[PYTHON]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dense.img");
    dense_image(&img);
    let srv = Server::ours(&["file", img.to_str().unwrap()]);
    let uri = srv.uri();
    for (spec, name, bs) in [
        ("md5/1000", "md5", 1000),
        ("sha1/4k", "sha1", 4096),
        ("sha224", "sha224", 65536),
        ("sha384/1M", "sha384", 1 << 20),
        ("sha512", "sha512", 65536),
    ] {
        let expect = reference(&img, name, bs);
        assert_eq!(
            ours(&[&format!("--blkhash={spec}"), &uri, "null:"]),
            expect,
            "{spec}"
        );
    }
    // A real copy (server to file) hashed on the way, identical data.
    let expect = reference(&img, "sha256", 65536);
    let copy = dir.path().join("copy.img");
    assert_eq!(ours(&["--blkhash", &uri, copy.to_str().unwrap()]), expect);
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&img).unwrap());
    // Between servers on several connections and threads (multi-conn),
    // then the destination hashed on its own: the same digest.
    let dst = Server::ours(&["memory", "6M"]);
    assert_eq!(
        ours(&["--blkhash", "-C", "4", "-T", "4", &uri, &dst.uri()]),
        expect
    );
    assert_eq!(ours(&["--blkhash", &dst.uri(), "null:"]), {
        // The memory disk is larger: the reference over the same size.
        let full = dir.path().join("full.img");
        let mut bytes = std::fs::read(&img).unwrap();
        bytes.resize(6 << 20, 0);
        std::fs::write(&full, bytes).unwrap();
        reference(&full, "sha256", 65536)
    });
    // From a pipe (a stream: no size, no extents).
    let out = run(nbdcopy()
        .args(["--blkhash", "-", "null:"])
        .stdin(Stdio::from(std::fs::File::open(&img).unwrap())));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expect);
}

#[test]
fn copy_blkhash_bad_options() {
    for (args, msg) in [
        (&["--blkhash=nosuch", "a", "null:"][..], "unknown digest"),
        (&["--blkhash=sha256/0", "a", "null:"][..], "block size"),
        (&["--blkhash", "a", "-"][..], "--blkhash-file"),
    ] {
        let out = run(nbdcopy().args(args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

/// The digests libnbd 1.24's own tests expect of its nbdcopy for these
/// nbdkit data and pattern disks (cross-checked there with blkhash).
#[test]
fn copy_blkhash_libnbd_vectors() {
    for (plugin, data, spec, expect) in [
        (
            "data",
            "",
            "sha256",
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
        ),
        (
            "data",
            "\"hello\"",
            "md5/4",
            "8262896de34125dec173722c920e8bd0",
        ),
        (
            "data",
            "\"hello\" @1048576 \"goodbye\"",
            "sha256",
            "61b8f3a8cea76e16eeff7ce27f1b7711c1f1e437f5038cec17773772a4bded28",
        ),
        (
            "data",
            "\"12345678\"*512*256",
            "md5",
            "84fc21ac2f49ac283ff399378d834d1a",
        ),
        (
            "pattern",
            "1G",
            "sha256",
            "6750a1c3d78e46eaffb0d094624825dea88f0c7098b2424fce776c0748442649",
        ),
    ] {
        let arg = match plugin {
            "data" => format!("data={data}"),
            _ => data.to_string(),
        };
        let srv = Server::ours(&[plugin, &arg]);
        assert_eq!(
            ours(&[&format!("--blkhash={spec}"), &srv.uri(), "null:"]),
            expect,
            "{plugin} {data} {spec}"
        );
    }
}
