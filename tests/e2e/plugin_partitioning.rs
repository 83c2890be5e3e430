//! The partitioning plugin against upstream's: MBR images byte for byte
//! (primary, and logical partitions beyond four with `alignment=`), GPT
//! images by structure (`sfdisk -d` less the random GUIDs, `sgdisk -v`),
//! writes through to the files and refused on tables and padding, the
//! partition filter on top, and bad parameters.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// Files p1..pN of 100000 * i random bytes.
fn part_files(dir: &Path, n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| {
            let p = dir.join(format!("p{i}"));
            random_file(&p, 100_000 * i, i as u64);
            p.to_string_lossy().into_owned()
        })
        .collect()
}

/// The whole disk served with `args`, by nbdcopy.
fn image(s: &Server, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run_ok(Command::new("nbdcopy").arg(s.uri()).arg(&out));
    out
}

fn both_images(args: &[&str], dir: &Path) -> (Vec<u8>, Vec<u8>, PathBuf, PathBuf) {
    let ours = image(&Server::ours(args), dir, "ours.img");
    let theirs = image(&Server::upstream(args), dir, "theirs.img");
    (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
        ours,
        theirs,
    )
}

fn sfdisk(img: &Path) -> String {
    let out = run_ok(Command::new("sfdisk").arg("-d").arg(img));
    out.replace(&img.display().to_string(), "IMG")
}

#[test]
fn plugin_partitioning_mbr_same_bytes_as_upstream() {
    if !require(&["nbdkit", "nbdcopy", "sfdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = part_files(dir.path(), 7);
    let (ours, theirs, img, _) = both_images(
        &["partitioning", &f[0], &f[1], "mbr-id=0x82", &f[2]],
        dir.path(),
    );
    assert!(ours == theirs, "MBR images differ");
    let d = sfdisk(&img);
    assert!(d.contains("label: dos"), "{d}");
    assert!(
        d.contains("IMG3 : start=        6144, size=         586, type=82"),
        "{d}"
    );
    // Seven files: three primary, an extended, four logical.
    let args = [
        "partitioning",
        "partition-type=mbr",
        &f[0],
        &f[1],
        &f[2],
        &f[3],
        &f[4],
        "alignment=4096",
        &f[5],
        &f[6],
    ];
    let (ours, theirs, img, _) = both_images(&args, dir.path());
    assert!(ours == theirs, "MBR images with logical partitions differ");
    let d = sfdisk(&img);
    assert!(
        d.contains("IMG4 : start=        6730, size=        7038, type=f"),
        "{d}"
    );
    assert!(
        d.contains("IMG7 : start=       11224, size=        1172, type=83"),
        "{d}"
    );
    assert!(
        d.contains("IMG8 : start=       12400, size=        1368, type=83"),
        "{d}"
    );
}

#[test]
fn plugin_partitioning_gpt_structure_as_upstream() {
    if !require(&["nbdkit", "nbdcopy", "sfdisk", "sgdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = part_files(dir.path(), 5);
    // Five files: GPT by default.
    let args = [
        "partitioning",
        &f[0],
        "type-guid=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        &f[1],
        "type-guid=default",
        &f[2],
        "alignment=512",
        &f[3],
        &f[4],
    ];
    let (ours, theirs, img_ours, img_theirs) = both_images(&args, dir.path());
    assert_eq!(ours.len(), theirs.len());
    // The unique partition GUIDs are random in both: compare the rest.
    let strip = |s: String| -> String {
        s.lines()
            .map(|l| match l.find(", uuid=") {
                Some(a) => {
                    let rest = &l[a + 2..];
                    let end = rest.find(", ").map(|e| a + 2 + e).unwrap_or(l.len());
                    format!("{}{}", &l[..a], &l[end..])
                }
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let d = strip(sfdisk(&img_ours));
    assert_eq!(d, strip(sfdisk(&img_theirs)));
    assert!(d.contains("label: gpt"), "{d}");
    assert!(
        d.contains("type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
        "{d}"
    );
    assert!(d.contains("attrs=\"LegacyBIOSBootable\""), "{d}");
    assert!(
        d.contains("IMG4 : start=        6730, size=         782"),
        "{d}"
    );
    // Long or non-ASCII file names leave the partition unnamed.
    for name in ["n".repeat(36), "k".repeat(35), "üñí".to_string()] {
        let p = dir.path().join(&name);
        random_file(&p, 1000, 1);
        // Captive, run in the directory, so the name is given as it is.
        let img = |prog: &Path, n: &str| {
            let out = dir.path().join(n);
            run_ok(
                Command::new(prog)
                    .current_dir(dir.path())
                    .args(["-U", "-", "partitioning", "partition-type=gpt", &name])
                    .arg("--run")
                    .arg(format!("nbdcopy \"$uri\" {}", out.display())),
            );
            strip(sfdisk(&out))
        };
        let ours = img(&nbdkit(), "ours-name.img");
        let theirs = img(Path::new("nbdkit"), "theirs-name.img");
        assert_eq!(ours, theirs, "{name}");
    }
    let v = run_ok(Command::new("sgdisk").arg("-v").arg(&img_ours));
    assert!(v.contains("No problems found"), "{v}");
    // Byte for byte except the GUIDs and the CRCs that cover them.
    let mask = |d: &[u8]| {
        let mut d = d.to_vec();
        let n = d.len() / 512;
        for hdr in [1, n - 1] {
            d[hdr * 512 + 16..hdr * 512 + 20].fill(0);
            d[hdr * 512 + 88..hdr * 512 + 92].fill(0);
        }
        for table in [2, n - 33] {
            for e in 0..128 {
                let o = table * 512 + e * 128;
                d[o + 16..o + 32].fill(0);
            }
        }
        d
    };
    assert!(
        mask(&ours) == mask(&theirs),
        "GPT images differ beyond GUIDs"
    );
}

const WRITES: &str = r#"
def t(name, f):
    try:
        f(); print(name, "ok")
    except nbd.Error as e:
        print(name, "error", e.errno)
mbr = h.pread(512, 0)
t("same table", lambda: h.pwrite(mbr, 0))
t("changed table", lambda: h.pwrite(b"x" * 512, 0))
t("zero padding", lambda: h.pwrite(bytes(512), 4096))
t("padding", lambda: h.pwrite(b"y" * 512, 4096))
t("data", lambda: h.pwrite(b"DATA", 2048 * 512))
t("sector tail zero", lambda: h.pwrite(bytes(10), 2048 * 512 + 100000))
t("sector tail", lambda: h.pwrite(b"z" * 10, 2048 * 512 + 100000))
t("zero", lambda: h.zero(512, 4096 * 512, nbd.CMD_FLAG_FUA))
t("flush", lambda: h.flush())
print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(),
      h.can_zero(), h.can_multi_conn(), h.can_cache())
print(bytes(h.pread(4, 2048 * 512)), bytes(h.pread(4, 4096 * 512)))
"#;

#[test]
fn plugin_partitioning_writes_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let f = part_files(dir.path(), 2);
    let args = ["partitioning", &f[0], &f[1]];
    let Some(out) = same_as_upstream(&args, WRITES) else {
        return;
    };
    assert!(
        out.contains("same table ok\nchanged table error EIO\n"),
        "{out}"
    );
    assert!(
        out.contains("zero padding ok\npadding error EIO\ndata ok\n"),
        "{out}"
    );
    assert!(
        out.contains("sector tail zero ok\nsector tail error EIO\n"),
        "{out}"
    );
    assert!(out.contains("b'DATA' b'\\x00\\x00\\x00\\x00'"), "{out}");
    // The writes reached the files (both servers wrote the same).
    assert_eq!(&std::fs::read(&f[0]).unwrap()[..4], b"DATA");
    assert!(std::fs::read(&f[1]).unwrap()[..512].iter().all(|&b| b == 0));
}

#[test]
fn plugin_partitioning_under_the_partition_filter() {
    if !require(&["nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = part_files(dir.path(), 5);
    let mut want = std::fs::read(&f[4]).unwrap();
    want.resize(want.len().div_ceil(512) * 512, 0);
    // With MBR the fifth file is partition 6: 4 is the extended one.
    for (table, n) in [("mbr", "6"), ("gpt", "5")] {
        let pt = format!("partition-type={table}");
        let partition = format!("partition={n}");
        let args = [
            "--filter=partition",
            "partitioning",
            &f[0],
            &f[1],
            &f[2],
            &f[3],
            &f[4],
            &pt,
            &partition,
        ];
        let (ours, theirs, _, _) = both_images(&args, dir.path());
        assert!(ours == want, "{table}: partition {n} is not the fifth file");
        assert!(theirs == want, "{table}: upstream's partition {n} differs");
    }
}

#[test]
fn plugin_partitioning_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let f = part_files(dir.path(), 1);
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let empty = empty.to_string_lossy().into_owned();
    for (args, msg) in [
        (vec![], "at least one file"),
        (
            vec![f[0].as_str(), "alignment=3000"],
            "multiple of sector size",
        ),
        (vec!["mbr-id=0x182", &f[0]], "out of range"),
        (vec!["type-guid=xyz", &f[0]], "could not validate GUID"),
        (vec![&f[0], "partition-type=foo"], "unknown partition-type"),
        (vec!["/nonexistent/file"], "No such file or directory"),
        (vec![&empty], "zero length partitions are not allowed"),
    ] {
        let out = run(Command::new(nbdkit())
            .arg("partitioning")
            .args(&args)
            .args(["--run", "true"]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
