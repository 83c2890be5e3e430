//! Sparseness: holes in the source are not read and stay holes, zero
//! blocks of data become holes or zero requests (`-S`), and a server
//! destination gets zero requests rather than data, or nothing where it
//! already reads as zeroes (counted with upstream nbdkit's log filter). The source is a 1 TiB export with
//! three 64K runs of data, so a copy that reads or writes the holes
//! cannot finish in time.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::common::{random_file, require, run, run_ok, Server};
use crate::copy_common::nbdcopy;

const TIB: u64 = 1 << 40;
/// Offsets of the 64K data runs of the source.
const RUNS: [u64; 3] = [0, 1 << 39, TIB - 65536];

/// Upstream nbdkit's data plugin: 1 TiB, data at [`RUNS`], holes
/// elsewhere.
fn sparse_source() -> Server {
    let data = format!(
        "data=@{} (1)*65536 @{} (2)*65536 @{} (3)*65536",
        RUNS[0], RUNS[1], RUNS[2]
    );
    Server::upstream(&["data", &data, "size=1T"])
}

/// Requests in an nbdkit log file: (count of requests, bytes, lines)
/// for one request type (`Write`, `Zero`, `Trim`).
fn logged(log: &Path, what: &str) -> (usize, u64, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains(&format!(" {what} id=")))
        .map(String::from)
        .collect();
    let bytes = lines
        .iter()
        .map(|l| {
            let c = l
                .split("count=0x")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            u64::from_str_radix(c, 16).unwrap()
        })
        .sum();
    (lines.len(), bytes, lines)
}

#[test]
fn copy_sparse_1t_to_file() {
    if !require(&["nbdkit"]) {
        return;
    }
    let src = sparse_source();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.img");
    run_ok(nbdcopy().arg(src.uri()).arg(&out));
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), TIB);
    let allocated = meta.blocks() * 512;
    assert!(
        (3 * 65536..=1 << 20).contains(&allocated),
        "{allocated} bytes allocated for 192K of data"
    );
    let f = std::fs::File::open(&out).unwrap();
    for (i, at) in RUNS.iter().enumerate() {
        let mut b = vec![0u8; 65536 + 4096];
        let start = at.saturating_sub(4096).min(TIB - b.len() as u64);
        f.read_exact_at(&mut b, start).unwrap();
        let data_at = (at - start) as usize;
        assert!(b[data_at..data_at + 65536]
            .iter()
            .all(|&x| x == i as u8 + 1));
        assert!(b[..data_at]
            .iter()
            .chain(&b[data_at + 65536..])
            .all(|&x| x == 0));
    }
}

#[test]
fn copy_sparse_1t_to_nbd_sends_zeroes_not_data() {
    if !require(&["nbdkit"]) {
        return;
    }
    let src = sparse_source();
    let dir = tempfile::tempdir().unwrap();
    // A fresh memory disk says it reads as zeroes: nothing to zero. With
    // the noextents filter it cannot say so, and the holes are zeroed.
    for (opts, name, say_zero) in [
        (&[][..], "fresh", true),
        (&[][..], "default", false),
        (&["--destination-is-zero"][..], "destination-is-zero", false),
        (&["--allocated"][..], "allocated", true),
    ] {
        let log = dir.path().join(format!("{name}.log"));
        let logfile = format!("logfile={}", log.display());
        let mut args = vec!["--filter=log"];
        if !say_zero {
            args.push("--filter=noextents");
        }
        args.extend(["memory", "1T", &logfile]);
        let dst = Server::upstream(&args);
        run_ok(nbdcopy().args(opts).arg(src.uri()).arg(dst.uri()));
        drop(dst);
        let (writes, written, _) = logged(&log, "Write");
        assert_eq!(written, 3 * 65536, "{name}: only the data is written");
        assert!(writes <= 6, "{name}: {writes} writes");
        let (_, trimmed, _) = logged(&log, "Trim");
        let (zeroes, zeroed, lines) = logged(&log, "Zero");
        match name {
            "fresh" | "destination-is-zero" => assert_eq!(zeroes, 0, "{name}: zeroes sent"),
            _ => {
                assert_eq!(
                    zeroed + trimmed,
                    TIB - 3 * 65536,
                    "{name}: the holes are zeroed"
                );
                // Big requests, not one per request size.
                assert!(zeroes <= 2048, "{name}: {zeroes} zero requests");
                // Fast zero where offered; no holes with --allocated.
                assert!(lines[0].contains("fast=1"), "{name}: {}", lines[0]);
                let trim = if name == "allocated" {
                    "trim=0"
                } else {
                    "trim=1"
                };
                assert!(
                    lines.iter().all(|l| l.contains(trim)),
                    "{name}: {}",
                    lines[0]
                );
            }
        }
    }
}

/// A source file whose middle 2M are written zeroes (allocated).
fn zeroes_in_the_middle(path: &Path) {
    random_file(path, 4 << 20, 3);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; 2 << 20], 1 << 20).unwrap();
}

#[test]
fn copy_sparse_zero_detection_to_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    zeroes_in_the_middle(&src);
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert!(allocated(&src) >= 4 << 20, "the source is fully allocated");
    let sparse = dir.path().join("sparse.img");
    run_ok(nbdcopy().arg(&src).arg(&sparse));
    let dense = dir.path().join("dense.img");
    run_ok(nbdcopy().args(["-S", "0"]).arg(&src).arg(&dense));
    let full = dir.path().join("full.img");
    std::fs::write(&full, vec![9u8; 1 << 20]).unwrap();
    run_ok(nbdcopy().arg("--allocated").arg(&src).arg(&full));
    for p in [&sparse, &dense, &full] {
        assert!(
            std::fs::read(p).unwrap() == std::fs::read(&src).unwrap(),
            "{}",
            p.display()
        );
    }
    let (s, d, f) = (allocated(&sparse), allocated(&dense), allocated(&full));
    assert!(
        (2 << 20..(2 << 20) + (256 << 10)).contains(&s),
        "-S: {s} bytes allocated"
    );
    assert!(d >= 4 << 20, "-S 0: {d} bytes allocated");
    assert!(f >= 4 << 20, "--allocated: {f} bytes allocated");
}

#[test]
fn copy_sparse_zero_detection_to_nbd() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    zeroes_in_the_middle(&src);
    let log = dir.path().join("log");
    let dst = Server::upstream(&[
        "--filter=log",
        "memory",
        "4M",
        &format!("logfile={}", log.display()),
    ]);
    run_ok(nbdcopy().arg(&src).arg(dst.uri()));
    drop(dst);
    let (_, written, _) = logged(&log, "Write");
    let (_, zeroed, _) = logged(&log, "Zero");
    assert_eq!(written, 2 << 20);
    assert_eq!(zeroed, 2 << 20);
}

/// Our server sends zero runs of read replies as holes, and nbdcopy
/// leaves holes unfilled in its (reused, so dirty) buffers when it looks
/// for zero blocks: whatever the destination and `-S`, what it writes is
/// the source, never what the buffers held before.
#[test]
fn copy_sparse_holes_in_read_replies() {
    if !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 8 << 20, 4);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    // Zero runs: aligned, unaligned, and small ones (sent as data).
    for (at, len) in [
        (0, 256 << 10),
        ((1 << 20) + 100, (2 << 20) + 5000),
        (5 << 20, 4096),
        ((6 << 20) + 12345, 200 << 10),
        ((8 << 20) - (128 << 10), 128 << 10),
    ] {
        f.write_all_at(&vec![0u8; len], at).unwrap();
    }
    let want = std::fs::read(&src).unwrap();
    // No extents: every byte is read, and the zeroes come back as holes.
    let srv = Server::ours(&["--filter=noextents", "file", src.to_str().unwrap()]);
    for opts in [&[][..], &["-S", "1M"], &["-S", "0"], &["--request-size=1M"]] {
        let out = dir.path().join("out.img");
        let _ = std::fs::remove_file(&out);
        run_ok(nbdcopy().args(opts).arg(srv.uri()).arg(&out));
        assert!(std::fs::read(&out).unwrap() == want, "to a file, {opts:?}");
        let o = run(nbdcopy().args(opts).arg(srv.uri()).arg("-"));
        assert!(
            o.status.success() && o.stdout == want,
            "to a pipe, {opts:?}"
        );
    }
    // A destination that cannot zero: zeroes are written as data.
    let dst = Server::upstream(&["--filter=nozero", "memory", "8M", "zeromode=none"]);
    run_ok(nbdcopy().arg(srv.uri()).arg(dst.uri()));
    let back = dir.path().join("back.img");
    run_ok(nbdcopy().arg(dst.uri()).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == want,
        "to a server that cannot zero"
    );
}
