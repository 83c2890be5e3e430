//! The ddrescue filter end to end, against upstream's: with a GNU
//! ddrescue mapfile, reads of rescued (`+`) blocks succeed and the rest
//! fail with EIO, the export is read-only; under the offset filter the
//! map is of the plugin's offsets.

use std::process::Command;

use crate::common::{nbdkit, run, same_as_upstream};

const MAP: &str = "\
# Mapfile. Created by GNU ddrescue version 1.25
# current_pos  current_status  current_pass
0x00100000     +               1
#      pos        size  status
0x00000000  0x00001000  +
0x00001000  0x00000200  -
0x00001200  0x00000e00  +
0x00002000  0x00001000  ?
0x00003000  0x00001000  *
0x00004000  0x00001000  /
0x00005000  0x000FB000  +
";

/// Which 256-byte pieces of the first 24K read, and a few reads.
const PROBE: &str = r#"
h.set_strict_mode(0)
print("ro", h.is_read_only(), "size", h.get_size())
s = ""
for off in range(0, 0x6000, 0x100):
    try:
        h.pread(0x100, off); s += "+"
    except nbd.Error as e:
        s += "." if e.errnum == errno.EIO else "?"
print(s)
for off, n in [(0, 4096), (0x1ff, 2), (0x11ff, 2), (0xffe00, 512), (0x100000, 512)]:
    try:
        h.pread(n, off); print(hex(off), n, "ok")
    except nbd.Error as e:
        print(hex(off), n, "error", e.errnum)
"#;

#[test]
fn ddrescue_fails_bad_blocks_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("disk.map");
    std::fs::write(&map, MAP).unwrap();
    let m = format!("ddrescue-mapfile={}", map.display());
    let Some(out) = same_as_upstream(&["--filter=ddrescue", "memory", "2M", &m], PROBE) else {
        return;
    };
    assert!(out.starts_with("ro True size 2097152\n"), "{out}");
    assert!(
        out.contains(&format!(
            "{}{}{}{}{}",
            "+".repeat(16),
            "..",
            "+".repeat(14),
            ".".repeat(48),
            "+".repeat(16)
        )),
        "{out}"
    );
    // Through the offset filter the client's 0 is the plugin's 0x1200.
    let args = [
        "--filter=offset",
        "--filter=ddrescue",
        "memory",
        "2M",
        "offset=4608",
        &m,
    ];
    let out = same_as_upstream(&args, "h.pread(0xe00, 0)\nprint('ok')\n").unwrap();
    assert_eq!(out, "ok\n");
}

#[test]
fn ddrescue_needs_a_good_mapfile() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("bad.map");
    std::fs::write(&map, "0x0 +\n0x0 0x1000 x\n").unwrap();
    let bad = format!("ddrescue-mapfile={}", map.display());
    for args in [
        vec![
            "--filter=ddrescue",
            "memory",
            "1M",
            "ddrescue-mapfile=/nonexistent",
        ],
        vec!["--filter=ddrescue", "memory", "1M"],
        vec!["--filter=ddrescue", "memory", "1M", &bad],
    ] {
        let out = run(Command::new(nbdkit()).args(&args).args(["--run", "true"]));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}
