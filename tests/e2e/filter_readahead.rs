//! The readahead filter end to end: sequential and random reads through
//! our nbdkit with `--filter=readahead` return the right bytes (with a
//! slow layer under it, so reads meet prefetches still under way), writes
//! on another connection are seen at once, and our log filter under
//! readahead shows the plugin getting fewer, larger reads for a
//! sequential copy. The speed-up itself is measured by bench/readahead.sh.

use std::process::Command;

use crate::common::{nbdpy, random_file, require, require_nbdsh, run_ok, Server};

const MB: usize = 1 << 20;

#[test]
fn readahead_sequential_copy_is_correct_and_prefetched() {
    if !require(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 32 * MB, 51);
    let log = dir.path().join("log.txt");
    let srv = Server::ours(&[
        "--filter=readahead",
        "--filter=log",
        "--filter=delay",
        "file",
        disk.to_str().unwrap(),
        "rdelay=2ms",
        &format!("logfile={}", log.display()),
    ]);
    let out = dir.path().join("out.img");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=1", "--request-size=65536"])
            .arg(srv.uri())
            .arg(&out),
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap());
    drop(srv);
    let text = std::fs::read_to_string(&log).unwrap();
    let reads = text.lines().filter(|l| l.contains(" Read id=")).count();
    // The client sent 512 reads of 64K; prefetching in pieces of up to
    // 2M leaves the plugin far fewer (how many depends on how many of the
    // client's 64 requests in flight beat the prefetch: ~100 on an idle
    // machine, 200 seen on a loaded one; without readahead, 512).
    assert!(reads < 300, "{reads} plugin reads for 512 client reads");
}

#[test]
fn readahead_random_and_sequential_reads_are_correct() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 16 * MB, 52);
    let srv = Server::ours(&[
        "--filter=readahead",
        "--filter=delay",
        "file",
        disk.to_str().unwrap(),
        "rdelay=1ms",
    ]);
    let script = format!(
        r#"
import random
data = open({path:?}, 'rb').read()
# Sequential, with requests in flight (pipelined through the async API).
bufs = []
for i in range(0, 8 * 1048576, 32768):
    buf = nbd.Buffer(32768)
    h.aio_pread(buf, i)
    bufs.append((i, buf))
    while h.aio_in_flight() > 16:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
for (i, b) in bufs:
    assert b.to_bytearray() == data[i:i + 32768], i
# Sequential with odd sizes.
off = 8 * 1048576
for n in [1, 511, 4096, 70000, 3, 262144, 100000] * 5:
    assert h.pread(n, off) == data[off:off + n], off
    off += n
# Random.
r = random.Random(5)
for _ in range(300):
    n = r.randint(1, 65536)
    o = r.randint(0, len(data) - n)
    assert h.pread(n, o) == data[o:o + n], (o, n)
# A write on another connection, ahead of a sequential reader.
for i in range(0, 1048576, 65536):
    h.pread(65536, i)
h2 = nbd.NBD()
h2.connect_uri(sys.argv[1])
h2.pwrite(b'\x5a' * 4096, 1048576 + 65536)
h2.zero(4096, 1048576 + 2 * 65536)
got = h.pread(3 * 65536, 1048576)
assert got[65536:65536 + 4096] == b'\x5a' * 4096
assert got[131072:131072 + 4096] == bytes(4096)
assert got[:65536] == data[1048576:1048576 + 65536]
print("ok")
"#,
        path = disk.display().to_string()
    );
    assert_eq!(nbdpy(&srv.uri(), &script).trim(), "ok");
}

#[test]
fn readahead_over_pattern_plugin() {
    if !require_nbdsh() {
        return;
    }
    // pattern: each 8-byte word holds its offset, big-endian.
    let srv = Server::ours(&["--filter=readahead", "pattern", "64M"]);
    let out = nbdpy(
        &srv.uri(),
        r#"
import struct
def want(off, n):
    start = off - off % 8
    words = b''.join(struct.pack('>Q', x) for x in range(start, off + n + 8, 8))
    return words[off - start:off - start + n]
off = 0
for i in range(200):
    assert h.pread(65536, off) == want(off, 65536), off
    off += 65536
for o in [12345, 40000000, 7, 1048576 * 33 + 3]:
    assert h.pread(1000, o) == want(o, 1000), o
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
}
