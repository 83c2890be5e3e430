//! The blocksize filter end to end: nbdinfo reads the block sizes our
//! nbdkit advertises with `--filter=blocksize` (the same as upstream's),
//! and unaligned writes from libnbd (strict mode off) read back right
//! while our log filter under it shows the plugin only got aligned,
//! bounded requests.

use std::process::Command;

use crate::common::{nbdpy, require, require_nbdsh, run_ok, Server};

fn block_lines(uri: &str) -> Vec<String> {
    run_ok(Command::new("nbdinfo").arg(uri))
        .lines()
        .filter(|l| l.contains("block_size_") || l.contains("export-size"))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn blocksize_nbdinfo_shows_block_size() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let args = [
        "--filter=blocksize",
        "memory",
        "1000000",
        "minblock=16k",
        "maxdata=64k",
    ];
    let ours = Server::ours(&args);
    let got = block_lines(&ours.uri());
    assert!(
        got.contains(&"block_size_minimum: 1".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&"block_size_preferred: 16384".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&"block_size_maximum: 4294967295".to_string()),
        "{got:?}"
    );
    // The size is rounded down to minblock.
    assert!(
        got.iter().any(|l| l.starts_with("export-size: 999424")),
        "{got:?}"
    );
    if require(&["nbdkit"]) {
        let up = Server::upstream(&args);
        assert_eq!(got, block_lines(&up.uri()), "same as upstream nbdkit");
    }
}

#[test]
fn blocksize_unaligned_writes_read_back() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let srv = Server::ours(&[
        "--filter=blocksize",
        "--filter=log",
        "memory",
        "1M",
        "minblock=4k",
        "maxdata=64k",
        "maxlen=128k",
        &format!("logfile={}", log.display()),
    ]);
    let out = nbdpy(
        &srv.uri(),
        r#"
h.set_strict_mode(0)
import random
r = random.Random(7)
model = bytearray(1048576)
for _ in range(60):
    n = r.randint(1, 200000)
    o = r.randint(0, len(model) - n)
    b = bytes([r.randint(1, 255)]) * n
    h.pwrite(b, o)
    model[o:o + n] = b
h.zero(5000, 3)
model[3:5003] = bytes(5000)
h.zero(300000, 4097)
model[4097:304097] = bytes(300000)
ok = h.pread(1048576 - 1, 1) == bytes(model[1:])
print(ok and h.pread(7, 1000) == bytes(model[1000:1007]))
"#,
    );
    assert_eq!(out.trim(), "True");
    drop(srv);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut n = 0;
    for l in text.lines() {
        for (op, max) in [("Read", 65536u64), ("Write", 65536), ("Zero", 131072)] {
            if !l.contains(&format!(" {op} id=")) {
                continue;
            }
            let field = |k: &str| {
                let v = l
                    .split(k)
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap();
                u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
            };
            let (o, c) = (field("offset="), field("count="));
            assert!(
                o % 4096 == 0 && c % 4096 == 0 && c <= max,
                "unaligned or too big: {l}"
            );
            n += 1;
        }
    }
    assert!(n > 100, "{n} requests logged");
}
