//! libnbd (python3-libnbd) drives every command with every flag against
//! our server: writes with FUA, trim, zero with NO_HOLE and FAST_ZERO,
//! cache, flush, block status before and after, and the errors the
//! protocol prescribes for reads past the end and writes to a read-only
//! export.

use crate::common::*;

const HELPERS: &str = r#"
size = h.get_size()
def exts(off, count, flags=0):
    out = []
    def cb(meta, offset, entries, err):
        if meta == "base:allocation":
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, off, cb, flags)
    return out
def fails(errnum, f, *args):
    try:
        f(*args)
    except nbd.Error as ex:
        # python3-libnbd gives the errno as a name ("EPERM").
        assert ex.errno == errno.errorcode[errnum], (f.__name__, args, ex.errno, ex)
        return
    raise AssertionError("%s%r succeeded" % (f.__name__, args))
"#;

fn script(uri: &str, body: &str) {
    let out = nbdpy(uri, &format!("{HELPERS}{body}\nprint('done')\n"));
    assert!(out.contains("done"), "{out}");
}

#[test]
fn commands_memory_every_flag() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["memory", "1M"]);
    script(
        &s.uri(),
        r#"
assert size == 1048576
assert h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_flush() and h.can_cache() and h.can_multi_conn() and h.can_df()
assert not h.is_read_only()
assert exts(0, size) == [(size, 3)], exts(0, size)
buf = b"\x55" * 4096 + b"\xaa" * 4096
h.pwrite(buf, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 65536) == buf
got = []
h.pread_structured(8192, 65536, lambda b, o, s, e: got.append((o, s)) or 0, nbd.CMD_FLAG_DF)
assert len(got) == 1 and got[0][0] == 65536, got
e = exts(0, size)
assert sum(l for l, f in e) == size, e
assert any(f == 0 for l, f in e), e
one = exts(65536, 8192, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and one[0][1] == 0, one
h.zero(4096, 65536, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(8192, 65536) == bytes(4096) + b"\xaa" * 4096
h.zero(4096, 65536 + 4096, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(8192, 65536) == bytes(8192)
h.pwrite(b"x" * 131072, 0)
h.trim(131072, 0, nbd.CMD_FLAG_FUA)
assert h.pread(131072, 0) == bytes(131072)
h.zero(size, 0)
assert exts(0, size) == [(size, 3)], exts(0, size)
h.cache(65536, 0)
h.flush()
h.set_strict_mode(0)
fails(errno.EINVAL, h.pread, 512, size)
fails(errno.EINVAL, h.pread, 512, size - 256)
fails(errno.ENOSPC, h.pwrite, b"x" * 512, size - 256)
fails(errno.EINVAL, h.trim, 512, size)
fails(errno.ENOSPC, h.zero, 512, size)
assert h.pread(512, size - 512) == bytes(512)
# The connection survives the errors.
h.pwrite(b"end", size - 3)
assert h.pread(3, size - 3) == b"end"
"#,
    );
}

#[test]
fn commands_read_zero_runs_as_holes() {
    // Zero runs of 64 KiB or more in read replies travel as hole chunks
    // (4 KiB aligned), shorter ones as data, and never with DF.
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["memory", "1M"]);
    script(
        &s.uri(),
        r#"
h.pwrite(b"a" * 5000, 0)
h.pwrite(b"b" * 100, 300000)
h.pwrite(b"c" * 100, 330000)
def chunks(count, off, flags=0):
    got = []
    h.pread_structured(count, off, lambda b, o, s, e: got.append((o, len(b), s, b)) or 0, flags)
    return sorted(got)
c = chunks(393216, 0)
kinds = [(o, n, s) for o, n, s, b in c]
# 4 KiB blocks: 5000 bytes of "a" make 2 blocks of data, "b" and "c" sit
# in blocks 73 and 80, too close together (and to the end) for holes.
assert kinds == [(0, 8192, nbd.READ_DATA), (8192, 290816, nbd.READ_HOLE),
                 (299008, 94208, nbd.READ_DATA)], kinds
whole = b"".join(b for o, n, s, b in c)
assert whole == h.pread(393216, 0)
assert whole[:5000] == b"a" * 5000 and whole[300000:300100] == b"b" * 100
assert whole.count(0) == 393216 - 5200
# A whole read of zeroes is one hole; with DF, one data chunk.
assert [(o, n, s) for o, n, s, b in chunks(524288, 524288)] == [(524288, 524288, nbd.READ_HOLE)]
df = chunks(524288, 524288, nbd.CMD_FLAG_DF)
assert [(o, n, s) for o, n, s, b in df] == [(524288, 524288, nbd.READ_DATA)]
assert df[0][3] == bytes(524288)
"#,
    );
}

#[test]
fn commands_readonly_export() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["-r", "memory", "1M"]);
    script(
        &s.uri(),
        r#"
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero() and not h.can_fua()
h.set_strict_mode(0)
fails(errno.EPERM, h.pwrite, b"x" * 512, 0)
fails(errno.EPERM, h.trim, 512, 0)
fails(errno.EPERM, h.zero, 512, 0)
assert h.pread(512, 0) == bytes(512)
"#,
    );
}

#[test]
fn commands_file_holes() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk.img");
    std::fs::File::create(&f).unwrap().set_len(4 << 20).unwrap();
    let s = Server::ours(&["file", f.to_str().unwrap()]);
    script(
        &s.uri(),
        r#"
assert size == 4 << 20
assert exts(0, size) == [(size, 3)], exts(0, size)
h.pwrite(b"\x01" * 1048576, 1048576, nbd.CMD_FLAG_FUA)
e = exts(0, size)
assert (1048576, 3) == e[0] and e[1] == (1048576, 0), e
h.trim(1048576, 1048576)
assert h.pread(4096, 1048576) == bytes(4096)
assert exts(0, size) == [(size, 3)], exts(0, size)
h.pwrite(b"\x02" * 65536, 0)
h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 0) == bytes(65536)
h.cache(size, 0)
h.flush()
"#,
    );
    drop(s);
    let data = std::fs::read(&f).unwrap();
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn commands_simple_replies_with_no_sr() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["--no-sr", "memory", "1M"]);
    script(
        &s.uri(),
        r#"
assert not h.get_structured_replies_negotiated()
h.pwrite(b"abc" * 1000, 4096)
assert h.pread(3000, 4096) == b"abc" * 1000
h.set_strict_mode(0)
fails(errno.EINVAL, h.pread, 512, size)
"#,
    );
}

#[test]
fn commands_pattern_bytes() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["pattern", "1M"]);
    script(
        &s.uri(),
        r#"
import struct
b = h.pread(64, 1048576 - 64)
want = b"".join(struct.pack(">Q", o) for o in range(1048576 - 64, 1048576, 8))
assert b == want, b
b = h.pread(8, 4)
assert b == struct.pack(">Q", 0)[4:] + struct.pack(">Q", 8)[:4], b
assert h.is_read_only()
"#,
    );
}
