//! The floppy plugin against upstream's: the same disk size, partition
//! table and FAT32 parameters with and without `size=`; the FAT32 in the
//! partition (taken out with the partition filter) checked clean by
//! fsck.fat with the same long names as upstream's; on a disk large enough for mtools
//! (which wants 65525 clusters in a FAT32), the label, the tree and the
//! files' contents read back by mdir/mtype; read-only; bad parameters.

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(dir.join("A long file name.txt"), b"long\n").unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    random_file(&dir.join("sub/big.bin"), 300_000, 7);
    std::fs::write(dir.join("sub/deeper/Ünïcödé name.md"), b"# hi\n").unwrap();
    std::os::unix::fs::symlink("hello.txt", dir.join("link")).unwrap();
}

fn copy(s: &Server, out: &Path) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").arg(s.uri()).arg(out));
    std::fs::read(out).unwrap()
}

#[test]
fn plugin_floppy_layout_as_upstream() {
    if !require(&["nbdkit", "nbdcopy", "sfdisk"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t);
    let t = t.to_str().unwrap();
    for extra in [vec![], vec!["size=10M"], vec!["label=MYDISK"]] {
        let mut args = vec!["floppy", t];
        args.extend(&extra);
        let ours = copy(&Server::ours(&args), &d.path().join("a.img"));
        let theirs = copy(&Server::upstream(&args), &d.path().join("b.img"));
        assert_eq!(ours.len(), theirs.len(), "{extra:?}");
        // The partition table (upstream has its OEM name in the boot
        // code area before it).
        assert!(
            ours[440..512] == theirs[440..512],
            "{extra:?}: the MBRs differ"
        );
        // The boot sector's geometry fields aside (see the module doc),
        // the same FAT32 parameters and label.
        let bs = 2048 * 512;
        for (what, r) in [("bpb", 11..24), ("sizes", 32..64), ("ebpb", 64..90)] {
            assert_eq!(
                ours[bs + r.start..bs + r.end],
                theirs[bs + r.start..bs + r.end],
                "{extra:?}: {what}"
            );
        }
        let l = run_ok(Command::new("sfdisk").arg("-d").arg(d.path().join("a.img")));
        assert!(
            l.contains("start=        2048") && l.contains("type=c"),
            "{l}"
        );
    }
}

#[test]
fn plugin_floppy_filesystem_contents() {
    if !require(&["nbdkit", "nbdcopy", "fsck.fat", "mdir", "mtype"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t);
    let t = t.to_str().unwrap();
    // As small as the files need: fsck.fat checks it and lists the names.
    let fs = d.path().join("fs.img");
    copy(
        &Server::ours(&["--filter=partition", "floppy", t, "partition=1"]),
        &fs,
    );
    let out = run(Command::new("fsck.fat").args(["-n", "-l"]).arg(&fs));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    for name in [
        "/hello.txt",
        "/A long file name.txt",
        "/empty",
        "/sub/big.bin",
        "/sub/deeper/Ünïcödé name.md",
    ] {
        assert!(
            listing.contains(&format!("file {name} (")),
            "{name}: {listing}"
        );
    }
    assert!(!listing.contains("/link"), "{listing}");
    assert!(!listing.contains("Fixing"), "{listing}");
    // The same long names as in upstream's.
    {
        let theirs = d.path().join("theirs.img");
        copy(
            &Server::upstream(&["--filter=partition", "floppy", t, "partition=1"]),
            &theirs,
        );
        let names = |img: &Path| {
            let out = run(Command::new("fsck.fat").args(["-n", "-l"]).arg(img));
            let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("Checking file "))
                .map(|l| l.split(" (").next().unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&fs), names(&theirs));
    }

    // Big enough for mtools (sparse: nbdcopy skips the zeroes).
    let fs = d.path().join("big.img");
    copy(
        &Server::ours(&[
            "--filter=partition",
            "floppy",
            t,
            "size=1100M",
            "label=BIGONE",
            "partition=1",
        ]),
        &fs,
    );
    let img = fs.to_str().unwrap();
    let mtools = |prog: &str, args: &[&str]| {
        run(Command::new(prog)
            .env("MTOOLSRC", "/dev/null")
            .args(["-i", img])
            .args(args))
    };
    let dir = mtools("mdir", &["-/", "::"]);
    let dir = String::from_utf8_lossy(&dir.stdout);
    assert!(dir.contains("Volume in drive : is BIGONE"), "{dir}");
    for name in [
        "A long file name.txt",
        "hello.txt",
        "big.bin",
        "Ünïcödé name.md",
    ] {
        assert!(dir.contains(name), "{name}: {dir}");
    }
    let big = mtools("mtype", &["::/sub/big.bin"]);
    assert!(big.stdout == std::fs::read(format!("{t}/sub/big.bin")).unwrap());
    let hello = mtools("mtype", &["::/hello.txt"]);
    assert_eq!(hello.stdout, b"hello\n");
}

#[test]
fn plugin_floppy_read_only_and_errors() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t);
    let t = t.to_str().unwrap();
    let caps = "print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_trim(), h.can_multi_conn(), h.can_cache())\n";
    if let Some(out) = same_as_upstream(&["floppy", t], caps) {
        assert!(out.ends_with(" True False False True True\n"), "{out}");
    }
    for (args, msg) in [
        (vec![t, "size=100K"], "too large for the FAT32"),
        (vec!["/nonexistent/dir"], "No such file or directory"),
        (vec![], "dir=<DIRECTORY>"),
        (vec![t, "size=lots"], "size"),
    ] {
        let out = run(Command::new(nbdkit())
            .arg("floppy")
            .args(&args)
            .args(["--run", "true"]));
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
