//! `nbdcopy --shallow`: only the top layer of a qcow2 chain is copied,
//! into a new overlay over the same base (made by ours or by qemu-img),
//! from qemu-nbd -A or from our qcow2 filter; the new overlay reads as
//! the old top and has clusters exactly where the old top had them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{
    nbdkit, our_bin, p, qcow2_create, qcow2_overlay, qemu_img, qemu_io_qcow2, require, run, run_ok,
    Server,
};

const SIZE: &str = "16M";

/// base.qcow2 (data and a hole) and top.qcow2 over it with data over
/// data, data over a hole, zeroes over data (a depth-1 zero range that
/// hides the base) and zeroes over a hole.
fn chain(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.qcow2");
    qcow2_create(&base, "", SIZE);
    qemu_io_qcow2(&base, &["write -P 1 0 8M", "write -P 5 12M 1M"]);
    let top = d.join("top.qcow2");
    overlay(&top);
    qemu_io_qcow2(
        &top,
        &[
            "write -P 2 1M 128k",
            "write -z 3M 256k",
            "write -P 3 10M 64k",
            "write -z 14M 64k",
            "write -P 4 12800k 4k",
        ],
    );
    (base, top)
}

/// A new, empty overlay over base.qcow2 (a relative name), by qemu-img.
fn overlay(img: &Path) {
    qcow2_overlay(img, "base.qcow2", "qcow2", SIZE);
}

/// The ranges qemu-img map says the image itself holds (depth 0 in its
/// JSON), without their host offsets.
fn own_clusters(img: &Path) -> Vec<String> {
    qemu_img(&["map", "--output=json", p(img)])
        .lines()
        .filter(|l| l.contains("\"depth\": 0"))
        .map(|l| match l.find(", \"offset\"") {
            Some(i) => l[..i].to_string(),
            None => l.trim_end_matches([',', '}', ']']).to_string(),
        })
        .collect()
}

fn shallow(src: &[&str], dst: &[&str], extra: &[&str]) -> std::process::Output {
    let mut c = Command::new(our_bin("nbdcopy"));
    c.arg("--shallow").args(extra).arg("--");
    run(c.args(src).args(dst))
}

fn ok(out: std::process::Output) {
    assert!(
        out.status.success(),
        "nbdcopy --shallow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The new overlay reads as the old top, over the same base, and holds
/// clusters exactly where the old top does: a few hundred K, not the
/// base's 9M.
fn check_copy(top: &Path, new: &Path) {
    let out = qemu_img(&["compare", p(top), p(new)]);
    assert!(out.contains("identical"), "{out}");
    let own = own_clusters(new);
    assert_eq!(own, own_clusters(top), "clusters of {}", new.display());
    assert_eq!(own.len(), 5, "{own:?}");
    let len = std::fs::metadata(new).unwrap().len();
    assert!(len < 2 << 20, "{} is {len} bytes", new.display());
}

/// `nbdinfo --map[=CTX]` of a server started for it.
fn nbdinfo_map(ctx: &str, server: &[&str]) -> String {
    run_ok(
        Command::new(our_bin("nbdinfo"))
            .arg(format!("--map={ctx}"))
            .arg("--")
            .args(server),
    )
}

/// What the shallow copy goes by, from ours as from qemu-nbd: the
/// chain's allocation depths (a zeroed range over base data is depth
/// 1) and its base:allocation.
#[test]
fn nbdcopy_shallow_depth_map_as_qemu_nbd() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_base, top) = chain(dir.path());
    let ours = nbdkit();
    for ctx in ["qemu:allocation-depth", "base:allocation"] {
        let theirs = nbdinfo_map(
            ctx,
            &["[", "qemu-nbd", "-r", "-A", "-f", "qcow2", p(&top), "]"],
        );
        let mine = nbdinfo_map(
            ctx,
            &["[", p(&ours), "-r", "--filter=qcow2", "file", p(&top), "]"],
        );
        assert_eq!(mine, theirs, "{ctx}");
    }
    let depth = nbdinfo_map(
        "qemu:allocation-depth",
        &["[", p(&ours), "-r", "--filter=qcow2", "file", p(&top), "]"],
    );
    // The zeroed 256K at 3M, over the base's data, is the top's own.
    assert!(
        depth
            .lines()
            .any(|l| l.split_whitespace().take(3).eq(["3145728", "262144", "1"])),
        "{depth}"
    );
}

#[test]
fn nbdcopy_shallow_top_layer_only() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_base, top) = chain(d);
    let ours = nbdkit();
    let ours = p(&ours);
    let sources: [(&str, Vec<&str>); 2] = [
        (
            "qemu-nbd -A",
            vec!["[", "qemu-nbd", "-r", "-A", "-f", "qcow2", p(&top), "]"],
        ),
        (
            "ours",
            vec!["[", ours, "-r", "--filter=qcow2", "file", p(&top), "]"],
        ),
    ];
    for (i, (what, src)) in sources.iter().enumerate() {
        // Into an overlay that ours creates (a relative backing name).
        let new = d.join(format!("ours{i}.qcow2"));
        let create = format!("file={}", p(&new));
        let dst = [
            "[",
            ours,
            "--filter=qcow2",
            "file",
            &create,
            "create=true",
            "size=16M",
            "backing=base.qcow2",
            "backing-format=qcow2",
            "]",
        ];
        // Several connections where ours offers them, and -p.
        ok(shallow(src, &dst, &["-C", "4", "--progress=2"]));
        check_copy(&top, &new);
        // Into one qemu-img made, served by qemu-nbd; one request at a time.
        let new = d.join(format!("qemu{i}.qcow2"));
        overlay(&new);
        let dst = ["[", "qemu-nbd", "-f", "qcow2", p(&new), "]"];
        let extra: &[&str] = if i == 0 { &["--synchronous"] } else { &[] };
        ok(shallow(src, &dst, extra));
        check_copy(&top, &new);
        eprintln!("{what}: ok");
    }
}

/// A raw file that holds the base already takes the top layer: it then
/// reads as the whole chain.
#[test]
fn nbdcopy_shallow_into_a_copy_of_the_base() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top) = chain(d);
    let raw = d.join("disk.raw");
    qemu_img(&["convert", "-O", "raw", p(&base), p(&raw)]);
    let s = Server::ours(&["-r", "--filter=qcow2", "file", p(&top)]);
    let out = run(Command::new(our_bin("nbdcopy"))
        .args(["--shallow", &s.uri()])
        .arg(&raw));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(&raw), p(&top)]);
    assert!(out.contains("identical"), "{out}");
}

/// Refused, exit 1 and a message, nothing written: a source without
/// qemu:allocation-depth, a source that is no NBD server, --blkhash, a
/// new file as destination.
#[test]
fn nbdcopy_shallow_refusals() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_base, top) = chain(d);
    let new = d.join("new.qcow2");
    overlay(&new);
    let dst = ["[", "qemu-nbd", "-f", "qcow2", p(&new), "]"];
    let no_depth = ["[", "qemu-nbd", "-r", "-f", "qcow2", p(&top), "]"];
    let with_depth = ["[", "qemu-nbd", "-r", "-A", "-f", "qcow2", p(&top), "]"];
    let fresh = d.join("fresh.raw");
    // (source, destination, more options, the message)
    type Case<'a> = (Vec<&'a str>, Vec<&'a str>, &'a [&'a str], &'a str);
    let cases: [Case; 4] = [
        (
            no_depth.to_vec(),
            dst.to_vec(),
            &[],
            "does not offer qemu:allocation-depth",
        ),
        (
            vec![p(&top)],
            dst.to_vec(),
            &[],
            "the source must be an NBD server",
        ),
        (
            with_depth.to_vec(),
            vec!["null:"],
            &["--blkhash"],
            "--blkhash",
        ),
        (
            with_depth.to_vec(),
            vec![p(&fresh)],
            &[],
            "missing or empty",
        ),
    ];
    for (src, dst, extra, msg) in cases {
        let out = shallow(&src, &dst, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{src:?} {dst:?}: {err}");
        assert!(err.contains(msg), "{src:?} {dst:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(own_clusters(&new).is_empty(), "the overlay was written");
    assert!(!fresh.exists(), "the file was created");
}

/// Three layers: base <- mid <- top. Only the top's clusters are copied
/// (the mid's, at depth 2, and the base's, at 3, are not), into an
/// overlay of mid.qcow2 made by qemu-img and served by ours.
#[test]
fn nbdcopy_shallow_three_layers() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base.qcow2 <- top.qcow2 (the middle layer here) <- top3.qcow2.
    chain(d);
    let over_mid = |img: &Path| qcow2_overlay(img, "top.qcow2", "qcow2", SIZE);
    let top = d.join("top3.qcow2");
    over_mid(&top);
    qemu_io_qcow2(
        &top,
        &["write -P 8 1M 64k", "write -z 12M 64k", "write -P 9 6M 4k"],
    );
    let new = d.join("new3.qcow2");
    over_mid(&new);
    let ours = nbdkit();
    let src = ["[", p(&ours), "-r", "--filter=qcow2", "file", p(&top), "]"];
    let dst = ["[", p(&ours), "--filter=qcow2", "file", p(&new), "]"];
    ok(shallow(&src, &dst, &[]));
    let out = qemu_img(&["compare", p(&top), p(&new)]);
    assert!(out.contains("identical"), "{out}");
    let own = own_clusters(&new);
    assert_eq!(own, own_clusters(&top));
    assert_eq!(own.len(), 3, "{own:?}");
}
