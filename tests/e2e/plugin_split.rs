//! The split plugin against upstream's, under libnbd's Python bindings
//! and nbdinfo: files concatenated, extents from their holes, writes
//! split across the files, read-only, and under the offset filter.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Three parts: a 1M hole with 4K of data in the middle, "hello", and a
/// 64K hole. Returns their paths as arguments.
fn parts(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    let a = dir.join("a");
    let f = std::fs::File::create(&a).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[7u8; 4096], 512 << 10).unwrap();
    std::fs::write(dir.join("b"), b"hello").unwrap();
    let c = std::fs::File::create(dir.join("c")).unwrap();
    c.set_len(64 << 10).unwrap();
    ["a", "b", "c"]
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect()
}

const CAPS: &str = r#"
print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(),
      h.can_zero(), h.can_fast_zero(), h.can_multi_conn(), h.can_cache())
def f(metacontext, offset, entries, err):
    print(metacontext, offset, entries)
h.block_status(h.get_size(), 0, f)
h.block_status(h.get_size() - 1000, 1000, f, nbd.CMD_FLAG_REQ_ONE)
print(bytes(h.pread(10, 1048576 - 3)))
print(bytes(h.pread(4, 512 * 1024 - 2)))
"#;

#[test]
fn plugin_split_same_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let files = parts(dir.path());
    let mut args = vec!["split"];
    args.push(&files[0]);
    let f1 = format!("file={}", files[1]);
    args.push(&f1);
    args.push(&files[2]);
    let Some(out) = same_as_upstream(&args, CAPS) else {
        return;
    };
    assert!(
        out.starts_with("1114117 False False False False True True False True"),
        "{out}"
    );
    assert!(out.contains("b'\\x00\\x00\\x00hello\\x00\\x00'"), "{out}");
    assert!(
        out.contains("[524288, 3, 4096, 0, 520192, 3, 5, 0, 65536, 3]"),
        "{out}"
    );
}

#[test]
fn plugin_split_readonly_and_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = parts(dir.path());
    let mut args = vec!["-r", "split"];
    args.extend(files.iter().map(|s| s.as_str()));
    let Some(out) = same_as_upstream(&args, "print(h.is_read_only(), h.get_size())\n") else {
        return;
    };
    assert_eq!(out, "True 1114117\n");
    // No file at all: a zero-sized disk, as upstream.
    let out = same_as_upstream(&["split"], "print(h.get_size())\n").unwrap();
    assert_eq!(out, "0\n");
    // A missing file fails at startup.
    let st = run(Command::new(nbdkit()).args(["split", "/no/such/file", "--run", "true"]));
    assert!(!st.status.success());
    assert!(
        String::from_utf8_lossy(&st.stderr).contains("realpath: /no/such/file"),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[test]
fn plugin_split_writes_cross_files() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = parts(dir.path());
    let mut args = vec!["split"];
    args.extend(files.iter().map(|s| s.as_str()));
    let s = Server::ours(&args);
    let out = nbdpy(
        &s.uri(),
        r#"
h.pwrite(b"ABCDEFGHIJ", 1048576 - 3)
h.zero(4, 512 * 1024 + 1)
# (upstream 1.32 hangs on a cache of the whole disk: ours only)
h.cache(1048581, 0)
try:
    h.zero(4, 0, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    print("fast", e.errno)
try:
    h.trim(4, 0)
except nbd.Error as e:
    print("trim", e.errno)
print(bytes(h.pread(12, 1048576 - 4)))
"#,
    );
    assert!(out.contains("fast ENOTSUP"), "{out}");
    assert!(out.contains("trim EINVAL"), "{out}");
    assert!(out.contains("b'\\x00ABCDEFGHIJ\\x00'"), "{out}");
    drop(s);
    let a = std::fs::read(&files[0]).unwrap();
    assert_eq!(&a[(1 << 20) - 3..], b"ABC");
    assert_eq!(&a[(512 << 10)..(512 << 10) + 6], &[7, 0, 0, 0, 0, 7]);
    assert_eq!(std::fs::read(&files[1]).unwrap(), b"DEFGH");
    assert_eq!(&std::fs::read(&files[2]).unwrap()[..3], b"IJ\0");
}

#[test]
fn plugin_split_under_offset_filter() {
    let dir = tempfile::tempdir().unwrap();
    let files = parts(dir.path());
    let mut args = vec!["--filter=offset", "split"];
    args.extend(files.iter().map(|s| s.as_str()));
    args.extend(["offset=1048574", "range=9"]);
    let script = r#"
print(h.get_size(), bytes(h.pread(9, 0)))
def f(metacontext, offset, entries, err):
    print(metacontext, offset, entries)
h.block_status(9, 0, f)
"#;
    let Some(out) = same_as_upstream(&args, script) else {
        return;
    };
    assert!(out.starts_with("9 b'\\x00\\x00hello\\x00\\x00'"), "{out}");
    assert!(out.contains("[2, 3, 5, 0, 2, 3]"), "{out}");
}
