//! The random plugin end to end under libnbd's nbdsh and nbdcopy, side
//! by side with upstream nbdkit: the same size, capabilities, errors and
//! bytes for a seed; verified writes; the offset and cow filters on top.

use std::process::Command;

use crate::common::*;

/// What a client sees of the disk: size, capabilities, a digest of the
/// bytes at a few places, and the outcome of each kind of write.
const SURVEY: &str = r#"
import hashlib
size = h.get_size()
print("size", size)
print("ro", h.is_read_only(), "zero", h.can_zero(), "trim", h.can_trim(),
      "flush", h.can_flush(), "fua", h.can_fua(), "fast_zero", h.can_fast_zero(),
      "multi_conn", h.can_multi_conn(), "cache", h.can_cache())
for off, n in [(0, 4096), (1, 17), (size - 600, 600), (12345, 65536)]:
    print(off, n, hashlib.sha256(h.pread(n, off)).hexdigest())
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
attempt("write-same", lambda: h.pwrite(h.pread(1000, 300), 300))
attempt("write-other", lambda: h.pwrite(bytes(1000), 300))
attempt("trim", lambda: h.trim(4096, 0))
attempt("zero", lambda: h.zero(4096, 0))
attempt("cache", lambda: h.cache(4096, 0))
extents = []
h.block_status(size, 0, lambda m, o, e, err: extents.extend(e))
print("extents", extents[:4])
"#;

#[test]
fn plugin_random_same_as_upstream() {
    let Some(out) = same_as_upstream(&["random", "1M", "seed=42"], SURVEY) else {
        return;
    };
    assert!(out.contains("size 1048576"), "{out}");
    assert!(out.contains("write-same ok"), "{out}");
    assert!(out.contains("write-other EIO"), "{out}");
    assert!(
        out.contains("trim EIO") && out.contains("zero EIO"),
        "{out}"
    );
    // seed= in hexadecimal and octal as upstream's strtoul, and the magic
    // size key spelt out.
    same_as_upstream(&["random", "size=100000", "seed=0x2a"], SURVEY).unwrap();
    same_as_upstream(&["random", "size=100000", "seed=052"], SURVEY).unwrap();
}

#[test]
fn plugin_random_seeds() {
    if !require_nbdsh() {
        return;
    }
    let read = |args: &[&str]| nbdpy(&Server::ours(args).uri(), "print(h.pread(64, 1000).hex())");
    let one = read(&["random", "1M", "seed=1"]);
    assert_eq!(one, read(&["random", "1M", "seed=1"]), "seed=1 twice");
    assert_ne!(one, read(&["random", "1M", "seed=2"]), "seed=1 and seed=2");
    // Without a seed each run chooses its own.
    assert_ne!(read(&["random", "1M"]), read(&["random", "1M"]));
    // No size: an empty disk, as upstream's.
    assert_eq!(
        nbdpy(&Server::ours(&["random"]).uri(), "print(h.get_size())"),
        "0\n"
    );
    // Bad seeds are refused as upstream refuses them.
    for bad in ["seed=-1", "seed=4294967296", "seed=1x", "seed="] {
        let st =
            run(Command::new(nbdkit()).args(["-U", "-", "random", "1M", bad, "--run", "true"]));
        assert!(!st.status.success(), "{bad} accepted");
        if require(&["nbdkit"]) {
            let up =
                run(Command::new("nbdkit").args(["-U", "-", "random", "1M", bad, "--run", "true"]));
            assert!(!up.status.success(), "upstream accepted {bad}");
        }
    }
}

#[test]
fn plugin_random_under_filters() {
    if !require_nbdsh() || !require(&["nbdkit", "nbdcopy"]) {
        return;
    }
    // The offset filter's window is the plugin's bytes at the offset.
    let whole = Server::ours(&["random", "1M", "seed=9"]);
    let expect = nbdpy(&whole.uri(), "print(h.pread(4096, 5000).hex())");
    let args = [
        "--filter=offset",
        "random",
        "1M",
        "seed=9",
        "offset=5000",
        "range=4096",
    ];
    let window = nbdpy(
        &Server::ours(&args).uri(),
        "print(h.get_size(), h.pread(4096, 0).hex())",
    );
    assert_eq!(window, format!("4096 {expect}"));
    same_as_upstream(&args, "print(h.get_size(), h.pread(4096, 0).hex())").unwrap();
    // Writes check the data even through a filter: nbdcopy the disk onto
    // itself (the manual's test of copying tools) succeeds, a different
    // disk onto it fails.
    let s = Server::ours(&["random", "4M", "seed=3"]);
    let st = run(Command::new("nbdcopy").args([&s.uri(), &s.uri()]));
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let other = Server::ours(&["random", "4M", "seed=4"]);
    let st = run(Command::new("nbdcopy").args([&other.uri(), &s.uri()]));
    assert!(!st.status.success(), "copying seed 4 onto seed 3 succeeded");
    // The cow filter makes it an ordinary writable disk: any data can
    // be written there, and the rest still reads as the plugin's.
    let script =
        "h.pwrite(bytes(4096), 4096)\nprint(h.pread(4, 4096).hex(), h.pread(4, 8192).hex())";
    let args = ["--filter=cow", "random", "1M", "seed=5"];
    let out = same_as_upstream(&args, script).unwrap();
    let plain = nbdpy(
        &Server::ours(&["random", "1M", "seed=5"]).uri(),
        "print(h.pread(4, 8192).hex())",
    );
    assert_eq!(out, format!("00000000 {plain}"));
}
