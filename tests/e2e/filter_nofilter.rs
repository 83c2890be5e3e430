//! The nofilter filter end to end: stacked twice around the offset
//! filter it changes nothing a client can see (the same answers as
//! upstream's), and qemu-io writes and reads through it.

use std::process::Command;

use crate::common::{nbdkit, require, run_ok, same_as_upstream};

#[test]
fn nofilter_changes_nothing() {
    let script = r#"
print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
      h.can_fast_zero(), h.can_multi_conn(), h.can_cache())
h.pwrite(b"abc", 10)
print(h.pread(16, 0))
"#;
    let args = [
        "--filter=nofilter",
        "--filter=offset",
        "--filter=nofilter",
        "memory",
        "1M",
        "offset=4096",
    ];
    if let Some(out) = same_as_upstream(&args, script) {
        assert!(out.starts_with("1044480 False"), "{out}");
    }
}

#[test]
fn nofilter_qemu_io() {
    if !require(&["qemu-io"]) {
        return;
    }
    let out = run_ok(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=nofilter",
        "memory",
        "1M",
        "--run",
        "qemu-io -f raw -c 'write -P 0x55 0 4k' -c 'read -P 0x55 0 4k' \"$uri\"",
    ]));
    assert!(out.contains("read 4096/4096 bytes"), "{out}");
}
