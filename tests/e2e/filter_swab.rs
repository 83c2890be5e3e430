//! The swab filter end to end, against upstream's on the same plugins:
//! swapped data for each word size, the size rounded down, the block size
//! advertised, unaligned requests refused; and with the truncate filter
//! rounding the size up first.

use crate::common::same_as_upstream;

/// Reads, writes and unaligned requests; printed for comparison.
const SCRIPT: &str = r#"
h.set_strict_mode(0)
print("size", h.get_size(), "block", [h.get_block_size(i) for i in range(3)])
print(h.pread(16, 8).hex())
for name, f in [("read3", lambda: h.pread(3, 0)), ("read@1", lambda: h.pread(4, 1)),
                ("zero3", lambda: h.zero(3, 4)), ("trim@1", lambda: h.trim(8, 1)),
                ("cache3", lambda: h.cache(3, 0))]:
    try:
        f(); print(name, "ok")
    except nbd.Error as e:
        print(name, "error", e.errnum)
if not h.is_read_only():
    h.pwrite(bytes(range(1, 9)), 8)
    print("after write", h.pread(8, 8).hex())
"#;

#[test]
fn swab_swaps_words_as_upstream() {
    for bits in ["8", "16", "32", "64"] {
        let b = format!("swab-bits={bits}");
        let Some(out) = same_as_upstream(&["--filter=swab", "pattern", "1001", &b], SCRIPT) else {
            return;
        };
        match bits {
            "16" => assert!(out.contains("size 1000 "), "{out}"),
            // pattern is big-endian offsets: 64-bit swab makes them
            // little-endian.
            "64" => assert!(out.contains("0800000000000000"), "{out}"),
            _ => {}
        }
        if bits == "8" {
            // Upstream 1.32's swab-bits=8 loses writes (they read back as
            // zeroes); ours passes them through, as "turns off the
            // filter" says.
            let s = crate::common::Server::ours(&["--filter=swab", "memory", "64K", &b]);
            let out = crate::common::nbdpy(&s.uri(), SCRIPT);
            assert!(out.ends_with("after write 0102030405060708\n"), "{out}");
        } else {
            same_as_upstream(&["--filter=swab", "memory", "64K", &b], SCRIPT);
        }
    }
}

#[test]
fn swab_over_truncate_rounds_up() {
    let args = [
        "--filter=swab",
        "--filter=truncate",
        "data",
        "1 2 3 4 5",
        "size=5",
        "round-up=4",
        "swab-bits=32",
    ];
    let script = "print(h.get_size(), h.pread(8, 0).hex())\n";
    if let Some(out) = same_as_upstream(&args, script) {
        assert_eq!(out.trim(), "8 0403020100000005");
    }
}
