//! The stats filter end to end: a libnbd client's requests through our
//! nbdkit with `--filter=stats`, then the stats file written at exit (on
//! SIGTERM and at the end of `--run`) holds the right counts and bytes in
//! upstream's format.

use std::process::Command;

use crate::common::{nbdpy, require_nbdsh, run_ok, Server, PYTHON};

#[test]
fn stats_counts_reads_and_writes() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.txt");
    let srv = Server::ours(&[
        "--filter=stats",
        "memory",
        "1M",
        &format!("statsfile={}", stats.display()),
    ]);
    nbdpy(
        &srv.uri(),
        r#"
for i in range(20):
    h.pread(4096, i * 4096)
h.pread(512, 1024)
h.pwrite(b'x' * 65536, 65536)
h.pwrite(b'y' * 65536, 131072)
h.pwrite(b'z' * 65536, 262144)
h.zero(8192, 0)
h.trim(4096, 524288)
h.flush()
"#,
    );
    drop(srv); // SIGTERM: a clean exit writes the file
    let text = std::fs::read_to_string(&stats).unwrap();
    let line = |p: &str| {
        text.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p} line in:\n{text}"))
            .to_string()
    };
    // 21 reads + 3 writes + zero + trim + flush; 80.5K + 192K + 8K + 4K.
    assert!(line("total: ").starts_with("total: 27 ops, "), "{text}");
    assert!(line("total: ").contains(", 284.50 KiB, "), "{text}");
    assert!(line("read: ").starts_with("read: 21 ops, "), "{text}");
    assert!(line("read: ").contains(" s, 80.50 KiB, "), "{text}");
    assert!(line("write: ").starts_with("write: 3 ops, "), "{text}");
    assert!(line("write: ").contains(" s, 192.00 KiB, "), "{text}");
    assert!(line("zero: ").starts_with("zero: 1 ops, "), "{text}");
    assert!(line("trim: ").starts_with("trim: 1 ops, "), "{text}");
    assert!(line("flush: ").starts_with("flush: 1 ops, "), "{text}");
    assert!(line("read: ").ends_with("/s total"), "{text}");
    // The size breakdown: 20 reads of 4K (12 bits), aligned as their
    // offsets say (offset 0 counts as aligned to anything).
    assert!(text.contains("  Request size and alignment breakdown:\n    12 bits:  95.2% (20 reqs, 80.00 KiB total)\n")
        || text.contains("  Request size and alignment breakdown:\n    12 bits: 95.2% (20 reqs, 80.00 KiB total)\n"),
        "{text}");
    assert!(
        text.contains("\n         12 bit aligned: 100.0% (20)\n"),
        "{text}"
    );
    assert!(
        text.contains("\n    16 bits: 100.0% (3 reqs, 192.00 KiB total)\n"),
        "{text}"
    );
}

#[test]
fn stats_append_and_run() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.txt");
    std::fs::write(&stats, "previous run\n").unwrap();
    let script = dir.path().join("c.py");
    std::fs::write(
        &script,
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(b'a' * 4096, 0)\nh.pread(4096, 0)\n",
    )
    .unwrap();
    run_ok(
        Command::new(crate::common::nbdkit())
            .args(["-U", "-", "--filter=stats", "memory", "1M"])
            .arg(format!("statsfile={}", stats.display()))
            .arg("statsappend=true")
            .arg("statsthreshold=0")
            .arg("--run")
            .arg(format!("{PYTHON} {} $uri", script.display())),
    );
    let text = std::fs::read_to_string(&stats).unwrap();
    assert!(text.starts_with("previous run\ntotal: 2 ops, "), "{text}");
    assert!(text.contains("\nwrite: 1 ops, "), "{text}");
    assert!(!text.contains("breakdown"), "statsthreshold=0: {text}");
}

#[test]
fn stats_requires_statsfile() {
    let out = crate::common::run(Command::new(crate::common::nbdkit()).args([
        "-U",
        "-",
        "--filter=stats",
        "memory",
        "1M",
        "--run",
        "true",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("statsfile"));
}
