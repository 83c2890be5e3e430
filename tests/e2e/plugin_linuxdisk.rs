//! The linuxdisk plugin against upstream's: the same disk size for the
//! default estimate, `size=+SIZE`, `size=SIZE` and ext4; the same GPT
//! layout (`sfdisk -d`); the filesystem (taken out with the partition
//! filter) checked by e2fsck and read back by debugfs with the files, the
//! label and the type asked for; read-only; too small a size fails.

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(dir.join("A long file name.txt"), b"long\n").unwrap();
    random_file(&dir.join("sub/big.bin"), 300_000, 7);
    std::os::unix::fs::symlink("hello.txt", dir.join("link")).unwrap();
}

fn peers() -> bool {
    require(&[
        "nbdkit", "nbdcopy", "nbdinfo", "sfdisk", "debugfs", "e2fsck", "mke2fs",
    ])
}

fn size_of(s: &Server) -> u64 {
    run_ok(Command::new("nbdinfo").arg("--size").arg(s.uri()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn plugin_linuxdisk_sizes_and_layout_as_upstream() {
    if !peers() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t);
    let t = t.to_str().unwrap();
    for extra in [
        vec![],
        vec!["size=+1M"],
        vec!["size=8M"],
        vec!["type=ext4", "label=ROOTFS"],
        vec!["type=ext3"],
    ] {
        let mut args = vec!["linuxdisk", t];
        args.extend(&extra);
        let ours = Server::ours(&args);
        let theirs = Server::upstream(&args);
        assert_eq!(size_of(&ours), size_of(&theirs), "{extra:?}");
        let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
        run_ok(Command::new("nbdcopy").arg(ours.uri()).arg(&a));
        run_ok(Command::new("nbdcopy").arg(theirs.uri()).arg(&b));
        // Upstream writes the type GUID as text (see the module doc).
        let layout = |img: &Path| {
            let out = run_ok(Command::new("sfdisk").arg("-d").arg(img));
            out.lines()
                .find(|l| l.contains(" : start="))
                .map(|l| {
                    l.split(", type=")
                        .next()
                        .unwrap()
                        .split(" : ")
                        .nth(1)
                        .unwrap()
                        .to_string()
                })
                .unwrap()
        };
        assert_eq!(layout(&a), layout(&b), "{extra:?}");
        let l = run_ok(Command::new("sfdisk").arg("-d").arg(&a));
        assert!(
            l.contains("type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
            "{l}"
        );
        assert!(l.contains("attrs=\"LegacyBIOSBootable\""), "{l}");
    }
}

#[test]
fn plugin_linuxdisk_filesystem_contents() {
    if !peers() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t);
    let t = t.to_str().unwrap();
    let fs = d.path().join("fs.img");
    let s = Server::ours(&[
        "--filter=partition",
        "linuxdisk",
        t,
        "type=ext4",
        "label=ROOTFS",
        "partition=1",
    ]);
    run_ok(Command::new("nbdcopy").arg(s.uri()).arg(&fs));
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(&fs));
    assert!(fsck.status.success(), "{fsck:?}");
    let ls = run_ok(Command::new("debugfs").args(["-R", "ls -p /"]).arg(&fs));
    for name in ["hello.txt", "A long file name.txt", "sub", "link"] {
        assert!(ls.contains(&format!("/{name}/")), "{name}: {ls}");
    }
    let big = run(Command::new("debugfs")
        .args(["-R", "cat /sub/big.bin"])
        .arg(&fs));
    assert!(big.stdout == std::fs::read(format!("{t}/sub/big.bin")).unwrap());
    let sb = run_ok(Command::new("dumpe2fs").arg("-h").arg(&fs));
    assert!(sb.contains("Filesystem volume name:   ROOTFS"), "{sb}");
    assert!(sb.contains("has_journal") && sb.contains("extent"), "{sb}");
    let link = run_ok(Command::new("debugfs").args(["-R", "stat /link"]).arg(&fs));
    assert!(link.contains("Fast link dest: \"hello.txt\""), "{link}");
}

#[test]
fn plugin_linuxdisk_read_only_and_failures() {
    if !peers() || !require_nbdsh() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t);
    let t = t.to_str().unwrap();
    let caps =
        "print(h.is_read_only(), h.can_flush(), h.can_trim(), h.can_multi_conn(), h.can_cache())\n";
    let out = same_as_upstream(&["linuxdisk", t], caps).unwrap();
    assert_eq!(out, "True False False True True\n");
    for (args, msg) in [
        (vec![t, "size=64K"], "mke2fs: command failed"),
        (vec![t, "type=xfs"], "e2fsprogs"),
        (vec!["/nonexistent/dir"], "du: command failed"),
        (vec![], "dir=<DIRECTORY>"),
    ] {
        let out = run(Command::new(nbdkit())
            .arg("linuxdisk")
            .args(&args)
            .args(["--run", "true"]));
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
