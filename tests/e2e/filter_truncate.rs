//! The truncate filter end to end: sizes seen by nbdinfo and qemu-img,
//! zeroes past the real end, writes there, and extents.

use std::process::Command;

use crate::common::{nbdpy, random_file, require, require_nbdsh, run_ok, Server};
use crate::filter_offset::{copy_out, map};

fn size(args: &[&str]) -> u64 {
    let s = Server::ours(args);
    run_ok(Command::new("nbdinfo").arg("--size").arg(s.uri()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn truncate_sizes() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let t = |extra: &[&str]| {
        let mut a = vec!["--filter=truncate", "null", "1000"];
        a.extend_from_slice(extra);
        size(&a)
    };
    assert_eq!(t(&[]), 1000);
    assert_eq!(t(&["round-up=512"]), 1024);
    assert_eq!(t(&["round-down=512"]), 512);
    assert_eq!(t(&["truncate=3000", "round-up=1k"]), 3072);
    assert_eq!(t(&["truncate=10M"]), 10 << 20);
    assert_eq!(t(&["round-up=512", "round-down=256"]), 1024);
}

#[test]
fn truncate_bad_parameters_fail_at_startup() {
    for bad in ["round-up=1000", "round-down=0", "truncate=lots"] {
        let out = Command::new(crate::common::nbdkit())
            .args(["--filter=truncate", "null", "1M", bad, "--run", "true"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn truncate_round_up_reads_zeroes_and_refuses_data() {
    if !require_nbdsh() || !require(&["nbdcopy", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 1000, 7);
    let orig = std::fs::read(&disk).unwrap();
    let s = Server::ours(&[
        "--filter=truncate",
        "file",
        disk.to_str().unwrap(),
        "round-up=4k",
    ]);
    let got = copy_out(&s.uri(), dir.path());
    assert_eq!(got.len(), 4096);
    assert_eq!(&got[..1000], &orig[..]);
    assert!(got[1000..].iter().all(|b| *b == 0));
    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &s.uri()]));
    assert!(info.contains("\"virtual-size\": 4096"), "{info}");
    nbdpy(
        &s.uri(),
        "h.pwrite(bytes(1000), 2000)\n\
         h.pwrite(b'\\x09' * 100 + bytes(100), 900)\n\
         try:\n  h.pwrite(b'\\x01' * 512, 3000)\n  raise SystemExit('non-zero write past the end worked')\n\
         except nbd.Error as e:\n  assert e.errnum == errno.ENOSPC, e\n\
         h.zero(4096, 0)\n\
         assert h.pread(4096, 0) == bytes(4096)\n\
         h.shutdown()\n",
    );
    drop(s);
    let now = std::fs::read(&disk).unwrap();
    assert_eq!(now.len(), 1000, "the file must not grow");
    assert!(now.iter().all(|b| *b == 0));
}

#[test]
fn truncate_map_shows_the_extension_as_a_hole() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 1 << 16, 3);
    let s = Server::ours(&[
        "--filter=truncate",
        "file",
        disk.to_str().unwrap(),
        "truncate=1M",
    ]);
    let m = map(&s.uri());
    assert_eq!(
        m.last(),
        Some(&(1 << 16, (1 << 20) - (1 << 16), 3)),
        "{m:?}"
    );
    assert_eq!(m.first().map(|e| (e.0, e.2)), Some((0, 0)), "{m:?}");
    // Shrunk: the map ends at the new size.
    let s = Server::ours(&[
        "--filter=truncate",
        "file",
        disk.to_str().unwrap(),
        "truncate=1000",
    ]);
    assert_eq!(map(&s.uri()), vec![(0, 1000, 0)]);
}
