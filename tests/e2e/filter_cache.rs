//! The cache filter end to end, with libnbd's Python bindings as the
//! client and the file plugin below: writeback keeps writes out of the
//! file until a flush; cache-on-read serves repeated reads from the
//! cache (our log filter under the cache shows what reaches the plugin);
//! cache-max-size reclaims blocks, writing dirty ones back first.

use crate::common::{nbdpy, random_file, require_nbdsh, Server};

const MB: usize = 1 << 20;

/// Plugin reads logged by a log filter: (offset, count).
fn logged_reads(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter(|l| l.contains(" Read id="))
        .map(|l| {
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
            (field("offset="), field("count="))
        })
        .collect()
}

#[test]
fn cache_writeback_flushes_to_the_file_on_flush() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 4 * MB, 41);
    let original = std::fs::read(&disk).unwrap();
    let srv = Server::ours(&["--filter=cache", "file", disk.to_str().unwrap()]);
    let probe = format!(
        "def on_disk(off, n):\n    with open({:?}, 'rb') as f:\n        f.seek(off)\n        return f.read(n)\n",
        disk.display().to_string()
    );
    let out = nbdpy(
        &srv.uri(),
        &format!(
            "{probe}\
before = on_disk(1048576, 65536)
h.pwrite(b'\\xab' * 65536, 1048576)
h.pwrite(b'\\xcd' * 1000, 5000)
mid = on_disk(1048576, 65536)
print(mid == before, h.pread(65536, 1048576) == b'\\xab' * 65536, h.pread(1000, 5000) == b'\\xcd' * 1000)
h.flush()
print(on_disk(1048576, 65536) == b'\\xab' * 65536, on_disk(5000, 1000) == b'\\xcd' * 1000)
"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "True True True",
        "writes are cached, not yet in the file"
    );
    assert_eq!(lines[1], "True True", "flush wrote them to the file");
    let mut want = original.clone();
    want[MB..MB + 65536].fill(0xab);
    want[5000..6000].fill(0xcd);
    assert!(std::fs::read(&disk).unwrap() == want);
}

#[test]
fn cache_writethrough_writes_at_once() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, MB, 42);
    let srv = Server::ours(&[
        "--filter=cache",
        "file",
        disk.to_str().unwrap(),
        "cache=writethrough",
    ]);
    nbdpy(&srv.uri(), "h.pwrite(b'\\x01' * 4096, 8192)\n");
    assert!(std::fs::read(&disk).unwrap()[8192..12288]
        .iter()
        .all(|b| *b == 1));
}

#[test]
fn cache_on_read_and_max_size_reclaim() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 4 * MB, 43);
    let log = dir.path().join("log.txt");
    // A 256K cache of 64K blocks: reclaim starts above 95% (four blocks
    // make 100%) and goes down to 50%.
    let srv = Server::ours(&[
        "--filter=cache",
        "--filter=log",
        "file",
        disk.to_str().unwrap(),
        "cache-on-read=true",
        "cache-min-block-size=64k",
        "cache-max-size=256k",
        "cache-low-threshold=50",
        &format!("logfile={}", log.display()),
    ]);
    let data = std::fs::read(&disk).unwrap();
    nbdpy(
        &srv.uri(),
        "a = h.pread(4096, 0)\nb = h.pread(4096, 100)\nassert a[100:] == b[:3996]\n",
    );
    let reads = logged_reads(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(
        reads,
        vec![(0, 65536)],
        "the second read came from the cache"
    );
    // Read 16 other blocks, then block 0 again: it has been reclaimed.
    let out = nbdpy(
        &srv.uri(),
        "import hashlib\nfor i in range(1, 17):\n    h.pread(65536, i * 65536)\nprint(hashlib.sha256(h.pread(65536, 0)).hexdigest())\n",
    );
    let reads = logged_reads(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(reads.len(), 18, "{reads:?}");
    assert_eq!(reads[17], (0, 65536), "block 0 was reclaimed");
    let _ = out;
    // Dirty blocks leave the cache only after being written back: with
    // cache=unsafe (no flush ever), writing 1M through a 256K cache puts
    // most of it in the file anyway, and every byte reads back.
    drop(srv);
    let srv = Server::ours(&[
        "--filter=cache",
        "file",
        disk.to_str().unwrap(),
        "cache=unsafe",
        "cache-min-block-size=64k",
        "cache-max-size=256k",
    ]);
    let out = nbdpy(
        &srv.uri(),
        "for i in range(16):\n    h.pwrite(bytes([i + 1]) * 65536, i * 65536)\nok = all(h.pread(65536, i * 65536) == bytes([i + 1]) * 65536 for i in range(16))\nprint(ok)\n",
    );
    assert_eq!(out.trim(), "True");
    let now = std::fs::read(&disk).unwrap();
    let written = (0..16)
        .filter(|i| {
            now[i * 65536..(i + 1) * 65536]
                .iter()
                .all(|b| *b == *i as u8 + 1)
        })
        .count();
    assert!(
        written >= 12,
        "only {written} of 16 blocks reached the file"
    );
    assert!(now[MB..] == data[MB..]);
}
