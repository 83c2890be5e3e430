//! The protect filter end to end, against upstream's: writes that change
//! a protected byte fail with EPERM, writes that leave it alone (and
//! zeroes or trims over zeroes) pass, in plain and complemented ranges;
//! under the offset filter the ranges are of the window.

use crate::common::same_as_upstream;

const SCRIPT: &str = r#"
def t(name, f):
    try:
        f(); print(name, "ok")
    except nbd.Error as e:
        print(name, "error", e.errnum)
t("same", lambda: h.pwrite(b"\1\2\3", 0x2000))
t("change", lambda: h.pwrite(b"\1\2\4", 0x2000))
t("straddle", lambda: h.pwrite(b"\0\1\2\3", 0x1fff))
t("inclusive-end", lambda: h.pwrite(b"\1", 0x10))
t("after-end", lambda: h.pwrite(b"\1", 0x11))
t("zero-data", lambda: h.zero(512, 0x2000))
t("trim-data", lambda: h.trim(512, 0x2000))
t("zero-zeroes", lambda: h.zero(512, 0x3000))
t("trim-zeroes", lambda: h.trim(512, 0x3000))
t("fast-zero", lambda: h.zero(512, 0x3000, nbd.CMD_FLAG_FAST_ZERO))
t("unprotected", lambda: h.pwrite(b"\7" * 512, 0x1000))
t("flush", lambda: h.flush())
print(h.pread(4, 0x2000).hex(), h.pread(1, 0x1000).hex())
"#;

#[test]
fn protect_ranges_as_upstream() {
    let args = [
        "--filter=protect",
        "data",
        "@0x2000 1 2 3",
        "size=64K",
        "protect=0x2000-",
        "protect=-0x10",
    ];
    let Some(out) = same_as_upstream(&args, SCRIPT) else {
        return;
    };
    assert!(out.contains("change error 1"), "{out}");
    assert!(out.contains("same ok"), "{out}");
    // The complement of 0x1000-0x1fff protects 0x2000 on as well.
    let args = [
        "--filter=protect",
        "data",
        "@0x2000 1 2 3",
        "size=64K",
        "protect=~0x1000-0x1fff",
    ];
    let out = same_as_upstream(&args, SCRIPT).unwrap();
    assert!(out.contains("inclusive-end error 1"), "{out}");
    assert!(out.contains("unprotected ok"), "{out}");
}

#[test]
fn protect_under_offset_protects_the_window() {
    let args = [
        "--filter=offset",
        "--filter=protect",
        "data",
        "@0x2200 1 2 3",
        "size=64K",
        "offset=512",
        "protect=0x2000-0x2fff",
    ];
    // Client offset 0x1e00 is the plugin's 0x2000 (protected), 0x2e00 its
    // 0x3000 (not).
    let script = "try:\n  h.pwrite(b'\\x09', 0x1e00)\n  print('ok')\nexcept nbd.Error as e:\n  print('error', e.errnum)\n\
                  h.pwrite(b'\\x09', 0x2e00)\nprint(h.pread(1, 0x2e00).hex(), h.pread(1, 0x2000).hex())\n";
    if let Some(out) = same_as_upstream(&args, script) {
        assert_eq!(out, "error 1\n09 01\n");
    }
}

#[test]
fn protect_bad_ranges_are_refused() {
    for bad in ["protect=10-5", "protect=x", "protect=1k-2k", "protect=~"] {
        let out = crate::common::run(std::process::Command::new(crate::common::nbdkit()).args([
            "--filter=protect",
            "memory",
            "1M",
            bad,
            "--run",
            "true",
        ]));
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("range"),
            "{bad}"
        );
    }
}
