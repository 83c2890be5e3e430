//! nbddump `--offset`/`--skip` with `--length`/`--limit` (newer libnbd's):
//! libnbd's own expected output for the pattern plugin, and a random
//! file dumped from unaligned offsets against a hexdump Python makes of
//! the same bytes.

use std::process::Command;

use crate::common::{our_bin, random_file, require, run, run_ok, Server, PYTHON};

fn nbddump(args: &[&str]) -> std::process::Output {
    run(Command::new(our_bin("nbddump")).args(args))
}

#[test]
fn nbddump_offset_as_libnbd() {
    if !require(&["nbdkit"]) {
        return;
    }
    let srv = Server::upstream(&["pattern", "size=100"]);
    let expect = "000000000f: 08 00 00 00 00 00 00 00  10 00 00 00 00 00 00 00 |................|\n\
                  000000001f: 18 00 00 00 00 00 00 00  20 00 00 00 00 00 00 00 |........ .......|\n\
                  000000002f: 28                                               |(               |\n";
    for args in [
        &["--offset=15", "--length=33"][..],
        &["--skip", "15", "--limit", "33"][..],
    ] {
        let out = nbddump(&[args, &[srv.uri().as_str()]].concat());
        assert!(out.status.success(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), expect, "{args:?}");
    }
    // Past the end: an error; at the end: nothing.
    let out = nbddump(&["--offset=101", &srv.uri()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--offset"));
    let out = nbddump(&["--offset=100", &srv.uri()]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"");
    let out = nbddump(&["--offset=x", &srv.uri()]);
    assert_eq!(out.status.code(), Some(1));
}

const REFERENCE: &str = r#"
import sys
data = open(sys.argv[1], "rb").read()
off, n = int(sys.argv[2]), int(sys.argv[3])
end = min(len(data), off + n)
at = off
while at < end:
    b = data[at:min(at + 16, end)]
    hx = " ".join("%02x" % c for c in b[:8])
    if len(b) > 8:
        hx += "  " + " ".join("%02x" % c for c in b[8:])
    asc = "".join(chr(c) if 32 <= c < 127 else "." for c in b)
    print("%010x: %-48s |%-16s|" % (at, hx, asc))
    at += 16
"#;

#[test]
fn nbddump_offset_random_data() {
    if !require(&[PYTHON]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.img");
    random_file(&img, 10_000, 7);
    let srv = Server::ours(&["file", img.to_str().unwrap()]);
    for (off, len) in [
        (0u64, 10_000u64),
        (1, 300),
        (4095, 2000),
        (9_990, 100),
        (9_999, 1),
    ] {
        let ours = nbddump(&[
            &format!("--offset={off}"),
            &format!("--length={len}"),
            &srv.uri(),
        ]);
        assert!(ours.status.success());
        let theirs = run_ok(Command::new(PYTHON).args([
            "-c",
            REFERENCE,
            img.to_str().unwrap(),
            &off.to_string(),
            &len.to_string(),
        ]));
        assert_eq!(String::from_utf8_lossy(&ours.stdout), theirs, "{off} {len}");
    }
}
