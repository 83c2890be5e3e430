//! The iso plugin against upstream's: the same files, names and volume
//! ID in the image (read back with isoinfo from an nbdcopy copy), two
//! directories merged, `prog=genisoimage`, a failing program, read-only,
//! and the cow filter on top making it writable.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// A small tree: a file with a long name, a subdirectory with a larger
/// file.
fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(dir.join("A long file name.txt"), b"long\n").unwrap();
    random_file(&dir.join("sub/big.bin"), 300_000, 7);
}

fn copy(s: &Server, out: &Path) {
    run_ok(Command::new("nbdcopy").arg(s.uri()).arg(out));
}

/// `isoinfo -f -R`: every path in the image, sorted.
fn listing(img: &Path) -> String {
    let out = run_ok(Command::new("isoinfo").args(["-f", "-R", "-i"]).arg(img));
    let mut l: Vec<&str> = out.lines().collect();
    l.sort();
    l.join("\n")
}

fn volume_id(img: &Path) -> String {
    let out = run_ok(Command::new("isoinfo").args(["-d", "-i"]).arg(img));
    out.lines()
        .find_map(|l| l.strip_prefix("Volume id: "))
        .unwrap_or("")
        .to_string()
}

#[test]
fn plugin_iso_same_contents_as_upstream() {
    if !require(&["nbdkit", "nbdcopy", "xorriso", "isoinfo"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    tree(&a);
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("other.txt"), b"other\n").unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let args = ["iso", a, &format!("dir={b}"), "params=-JrT -V 'My Disk'"];
    copy(&Server::ours(&args), &d.path().join("ours.iso"));
    copy(&Server::upstream(&args), &d.path().join("theirs.iso"));
    let ours = d.path().join("ours.iso");
    let theirs = d.path().join("theirs.iso");
    let l = listing(&ours);
    assert_eq!(l, listing(&theirs));
    for name in [
        "/A long file name.txt",
        "/hello.txt",
        "/other.txt",
        "/sub/big.bin",
    ] {
        assert!(l.lines().any(|x| x == name), "{name} missing: {l}");
    }
    assert_eq!(volume_id(&ours), "My Disk");
    assert_eq!(volume_id(&theirs), "My Disk");
    assert_eq!(
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len()
    );
    let big = run(Command::new("isoinfo")
        .args(["-R", "-x", "/sub/big.bin", "-i"])
        .arg(&ours));
    assert!(big.stdout == std::fs::read(format!("{a}/sub/big.bin")).unwrap());

    // Read-only, as upstream; same size and flags.
    let caps = "print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_trim(), h.can_multi_conn(), h.can_cache())\n";
    let out = same_as_upstream(&["iso", a], caps).unwrap();
    assert!(out.ends_with(" True False False True True\n"), "{out}");
}

#[test]
fn plugin_iso_genisoimage_and_failures() {
    if !require(&["nbdcopy", "genisoimage", "isoinfo"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    tree(&a);
    let a = a.to_str().unwrap();
    let img = d.path().join("g.iso");
    copy(
        &Server::ours(&["iso", a, "prog=genisoimage", "params=-r"]),
        &img,
    );
    assert!(listing(&img).contains("/sub/big.bin"));
    for (args, msg) in [
        (
            vec![a, "prog=false"],
            "false: command failed with exit code 1",
        ),
        (vec!["/nonexistent/dir"], "No such file or directory"),
        (vec![], "dir=<DIRECTORY>"),
    ] {
        let out = run(Command::new(nbdkit())
            .arg("iso")
            .args(&args)
            .args(["--run", "true"]));
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

#[test]
fn plugin_iso_under_the_cow_filter() {
    if !require(&["xorriso"]) || !require_nbdsh() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    tree(d.path());
    let s = Server::ours(&["--filter=cow", "iso", d.path().to_str().unwrap()]);
    let out = nbdpy(
        &s.uri(),
        "print(h.is_read_only())\nh.pwrite(b'XYZ', 32768)\nprint(bytes(h.pread(3, 32768)))\n",
    );
    assert_eq!(out, "False\nb'XYZ'\n");
}
