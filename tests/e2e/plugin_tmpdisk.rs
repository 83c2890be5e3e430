//! The tmpdisk plugin against upstream's, under libnbd's Python
//! bindings and nbdinfo: the default mkfs command (ext4 with a label,
//! vfat), `command=` with variables, a fresh disk per connection removed
//! on close, command failures, and under the offset filter.

use std::process::Command;

use crate::common::*;

const CAPS: &str = r#"
print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(),
      h.can_zero(), h.can_fast_zero(), h.can_multi_conn(), h.can_cache())
"#;

#[test]
fn plugin_tmpdisk_default_ext4_with_label() {
    if !require(&["mkfs.ext4"]) {
        return;
    }
    let script = format!("{CAPS}sb = bytes(h.pread(1024, 1024))\nprint(sb[56:58], sb[120:128])\n");
    let Some(out) = same_as_upstream(&["tmpdisk", "2M", "label=SCRATCH"], &script) else {
        return;
    };
    assert!(
        out.starts_with("2097152 False True True True True True False False"),
        "{out}"
    );
    // The ext2/3/4 magic and the label in the superblock.
    assert!(out.contains("b'S\\xef' b'SCRATCH\\x00'"), "{out}");
}

#[test]
fn plugin_tmpdisk_vfat() {
    if !require(&["mkfs.vfat"]) {
        return;
    }
    let script = "b = bytes(h.pread(512, 0))\nprint(h.get_size(), b[510:512], b[54:59])\n";
    let Some(out) = same_as_upstream(&["tmpdisk", "size=4M", "type=vfat"], script) else {
        return;
    };
    assert_eq!(out, "4194304 b'U\\xaa' b'FAT12'\n");
    // mkfs.fat has no -L: with a label the default command fails, in
    // both, and the connection is refused.
    for s in [
        Server::upstream(&["tmpdisk", "4M", "type=vfat", "label=X"]),
        Server::ours(&["tmpdisk", "4M", "type=vfat", "label=X"]),
    ] {
        let st = run(Command::new("nbdinfo").args(["--size", &s.uri()]));
        assert!(!st.status.success());
    }
}

#[test]
fn plugin_tmpdisk_command_and_variables() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let command = format!(
        r#"command=truncate -s $((size * 2)) "$disk"
printf '%s|%s|%s' "$greeting" "$q" "$type" | dd of="$disk" conv=notrunc 2>/dev/null
echo "$disk" >> {}"#,
        log.display()
    );
    let args = [
        "tmpdisk",
        "size=4096",
        "greeting=hi there",
        &command,
        "q=it's $HOME",
        "type=none",
    ];
    let script = "print(h.get_size(), bytes(h.pread(32, 0)).rstrip(b'\\0'))\n";
    let Some(out) = same_as_upstream(&args, script) else {
        return;
    };
    assert_eq!(out, "8192 b\"hi there|it's $HOME|none\"\n");
    // Both servers ran the command once, and each disk and its private
    // directory were gone once the connection was open.
    let disks = std::fs::read_to_string(&log).unwrap();
    let disks: Vec<&str> = disks.lines().collect();
    assert_eq!(disks.len(), 2, "{disks:?}");
    for d in disks {
        assert!(d.ends_with("/disk"), "{d}");
        assert!(!std::path::Path::new(d).parent().unwrap().exists(), "{d}");
    }
    // disk= is reserved.
    let st = run(Command::new(nbdkit()).args(["tmpdisk", "1M", "disk=x", "--run", "true"]));
    assert!(String::from_utf8_lossy(&st.stderr)
        .contains("'disk' parameter cannot be set on the command line"));
    let st = run(Command::new(nbdkit()).args(["tmpdisk", "--run", "true"]));
    assert!(String::from_utf8_lossy(&st.stderr).contains("size parameter is required"));
}

#[test]
fn plugin_tmpdisk_fresh_disk_per_connection() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["tmpdisk", "1M", "command=truncate -s $size \"$disk\""]);
    let first = r#"
h2 = nbd.NBD()
h2.connect_uri(sys.argv[1])
h.pwrite(b"mine", 0, nbd.CMD_FLAG_FUA)
h.trim(4096, 4096)
h.flush()
print(bytes(h.pread(4, 0)), bytes(h2.pread(4, 0)))
"#;
    assert_eq!(nbdpy(&s.uri(), first), "b'mine' b'\\x00\\x00\\x00\\x00'\n");
    // A new connection sees a new, empty disk.
    assert_eq!(
        nbdpy(&s.uri(), "print(bytes(h.pread(4, 0)))\n"),
        "b'\\x00\\x00\\x00\\x00'\n"
    );
    // A failing command refuses that connection only.
    let bad = Server::ours(&["tmpdisk", "1M", "command=exit 3"]);
    let st = run(Command::new("nbdinfo").args(["--size", &bad.uri()]));
    assert!(!st.status.success());
}

#[test]
fn plugin_tmpdisk_under_offset_filter() {
    let args = [
        "--filter=offset",
        "tmpdisk",
        "1M",
        "command=truncate -s $size \"$disk\"; printf 'abcdefgh' | dd of=\"$disk\" conv=notrunc 2>/dev/null",
        "offset=2",
        "range=4",
    ];
    let Some(out) = same_as_upstream(&args, "print(h.get_size(), bytes(h.pread(4, 0)))\n") else {
        return;
    };
    assert_eq!(out, "4 b'cdef'\n");
}
