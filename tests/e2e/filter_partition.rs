//! The partition filter end to end, over MBR and GPT disk images: made
//! by `sfdisk` when it is installed, and written byte by byte here
//! otherwise (and always, for the logical partitions), checked with
//! nbdcopy, qemu-img and against upstream's partition filter.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{on_path, require, run, run_ok, Server};
use crate::filter_offset::copy_out;

const SECTOR: usize = 512;
/// Disk images are 4 MiB.
const SECTORS: usize = 8192;

fn mbr_entry(d: &mut [u8], sector: usize, i: usize, kind: u8, start: u32, sectors: u32) {
    let e = sector * SECTOR + 446 + 16 * i;
    d[e] = if i == 0 && sector == 0 { 0x80 } else { 0 };
    // CHS fields: the "too large" marker, as modern tools write.
    d[e + 1..e + 4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    d[e + 4] = kind;
    d[e + 5..e + 8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
    d[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    d[sector * SECTOR + 510] = 0x55;
    d[sector * SECTOR + 511] = 0xaa;
}

fn fill(d: &mut [u8], lba: usize, sectors: usize, byte: u8) {
    d[lba * SECTOR..(lba + sectors) * SECTOR].fill(byte);
}

/// The partitions of [`mbr_image`]: number, first sector, sectors, fill.
const MBR_PARTS: [(u32, usize, usize, u8); 4] = [
    (1, 2048, 1024, 0x11),
    (2, 4096, 512, 0x22),
    (5, 6208, 256, 0x55),
    (6, 6720, 128, 0x66),
];

/// An MBR disk: primaries 1 and 2, extended 3 (sectors 6144..8191) with
/// logical partitions 5 and 6, each filled with its own byte.
fn mbr_image() -> Vec<u8> {
    let mut d = vec![0u8; SECTORS * SECTOR];
    mbr_entry(&mut d, 0, 0, 0x83, 2048, 1024);
    mbr_entry(&mut d, 0, 1, 0x83, 4096, 512);
    mbr_entry(&mut d, 0, 2, 0x05, 6144, 2048);
    // EBR 1 at 6144: logical 5 at +64, next EBR at extended+512.
    mbr_entry(&mut d, 6144, 0, 0x83, 64, 256);
    mbr_entry(&mut d, 6144, 1, 0x05, 512, 512);
    // EBR 2 at 6656: logical 6 at +64, end of chain.
    mbr_entry(&mut d, 6656, 0, 0x83, 64, 128);
    for (_, lba, n, b) in MBR_PARTS {
        fill(&mut d, lba, n, b);
    }
    d
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// GPT partitions: number, first sector, last sector (inclusive), fill.
const GPT_PARTS: [(u32, usize, usize, u8); 2] = [(1, 2048, 3071, 0x11), (3, 4096, 6143, 0x33)];

/// A GPT disk with partitions 1 and 3 (2 unused), primary and backup
/// headers with correct CRCs, as `sgdisk` would write it.
fn gpt_image() -> Vec<u8> {
    let mut d = vec![0u8; SECTORS * SECTOR];
    mbr_entry(&mut d, 0, 0, 0xee, 1, (SECTORS - 1) as u32);
    d[446] = 0;
    let mut entries = vec![0u8; 128 * 128];
    // Linux filesystem data, in GPT's mixed-endian layout.
    let linux = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ];
    for (n, first, last, _) in GPT_PARTS {
        let e = &mut entries[(n as usize - 1) * 128..n as usize * 128];
        e[0..16].copy_from_slice(&linux);
        e[16..32].copy_from_slice(&[n as u8; 16]);
        e[32..40].copy_from_slice(&(first as u64).to_le_bytes());
        e[40..48].copy_from_slice(&(last as u64).to_le_bytes());
        for (i, c) in format!("part{n}").encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
    }
    let entries_crc = crc32(&entries);
    let last = (SECTORS - 1) as u64;
    let header = |mine: u64, other: u64, table: u64| {
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&mine.to_le_bytes());
        h[32..40].copy_from_slice(&other.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
        h[56..72].copy_from_slice(&[0x42; 16]);
        h[72..80].copy_from_slice(&table.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    d[SECTOR..SECTOR + 92].copy_from_slice(&header(1, last, 2));
    d[2 * SECTOR..34 * SECTOR].copy_from_slice(&entries);
    let backup_table = (SECTORS - 33) * SECTOR;
    d[backup_table..backup_table + entries.len()].copy_from_slice(&entries);
    let bh = (SECTORS - 1) * SECTOR;
    d[bh..bh + 92].copy_from_slice(&header(last, 1, last - 32));
    for (_, first, last, b) in GPT_PARTS {
        fill(&mut d, first, last - first + 1, b);
    }
    d
}

/// Serve partition `n` of `img` with our filter; its bytes.
fn ours(img: &Path, n: u32, dir: &Path) -> Vec<u8> {
    let part = format!("partition={n}");
    let s = Server::ours(&["--filter=partition", "file", img.to_str().unwrap(), &part]);
    copy_out(&s.uri(), dir)
}

fn upstream(img: &Path, n: u32, dir: &Path) -> Vec<u8> {
    let part = format!("partition={n}");
    let s = Server::upstream(&["--filter=partition", "file", img.to_str().unwrap(), &part]);
    copy_out(&s.uri(), dir)
}

/// Check each partition's bytes, and compare with upstream.
fn check(img: &Path, parts: &[(u32, usize, u8)], compare: bool) {
    let dir = img.parent().unwrap();
    for &(n, sectors, byte) in parts {
        let got = ours(img, n, dir);
        assert_eq!(got.len(), sectors * SECTOR, "size of partition {n}");
        assert!(got.iter().all(|b| *b == byte), "contents of partition {n}");
        if compare {
            assert_eq!(
                got,
                upstream(img, n, dir),
                "partition {n} differs from upstream's"
            );
        }
    }
}

/// Does serving partition `n` fail (nbdinfo cannot connect)?
fn fails(img: &Path, n: u32) -> bool {
    let part = format!("partition={n}");
    let s = Server::ours(&["--filter=partition", "file", img.to_str().unwrap(), &part]);
    !run(Command::new("nbdinfo").arg("--size").arg(s.uri()))
        .status
        .success()
}

#[test]
fn partition_mbr() {
    if !require(&["nbdcopy", "nbdinfo", "nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    std::fs::write(&img, mbr_image()).unwrap();
    check(&img, &[(1, 1024, 0x11), (2, 512, 0x22)], true);
    assert!(fails(&img, 4), "partition 4 is unused");
    assert!(fails(&img, 7), "there is no logical partition 7");
}

#[test]
fn partition_mbr_logical() {
    if !require(&["nbdcopy", "nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    std::fs::write(&img, mbr_image()).unwrap();
    let parts: Vec<(u32, usize, u8)> = MBR_PARTS[2..].iter().map(|p| (p.0, p.2, p.3)).collect();
    check(&img, &parts, true);
}

#[test]
fn partition_gpt() {
    if !require(&["nbdcopy", "nbdinfo", "nbdkit", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gpt.img");
    std::fs::write(&img, gpt_image()).unwrap();
    let parts: Vec<(u32, usize, u8)> = GPT_PARTS
        .iter()
        .map(|p| (p.0, p.2 - p.1 + 1, p.3))
        .collect();
    check(&img, &parts, true);
    assert!(fails(&img, 2), "partition 2 is unused");
    assert!(fails(&img, 129), "the table has 128 entries");
    // qemu-img sees the partition's size.
    let s = Server::ours(&[
        "--filter=partition",
        "file",
        img.to_str().unwrap(),
        "partition=3",
    ]);
    let out = run_ok(Command::new("qemu-img").args(["info", "--output=json", &s.uri()]));
    assert!(out.contains("\"virtual-size\": 1048576"), "{out}");
}

#[test]
fn partition_writes_stay_inside() {
    if !require(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gpt.img");
    let orig = gpt_image();
    std::fs::write(&img, &orig).unwrap();
    let s = Server::ours(&[
        "--filter=partition",
        "file",
        img.to_str().unwrap(),
        "partition=1",
    ]);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 0 4k",
        "-c",
        "write -P 0x78 508k 4k",
        &s.uri(),
    ]));
    drop(s);
    let now = std::fs::read(&img).unwrap();
    let start = 2048 * SECTOR;
    assert!(now[start..start + 4096].iter().all(|b| *b == 0x77));
    assert!(now[start + (508 << 10)..start + (512 << 10)]
        .iter()
        .all(|b| *b == 0x78));
    assert_eq!(now[..start], orig[..start]);
    assert_eq!(now[start + (512 << 10)..], orig[start + (512 << 10)..]);
}

/// With `sfdisk` (util-linux) installed, tables it writes work too.
#[test]
fn partition_sfdisk_tables() {
    if !on_path("sfdisk") {
        eprintln!("SKIP: sfdisk is not installed (the hand-written tables are tested)");
        return;
    }
    if !require(&["nbdcopy", "nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (label, script, parts) in [
        (
            "dos",
            "label: dos\nstart=2048, size=1024, type=83\nstart=4096, size=512, type=83\n\
             start=6144, size=2048, type=5\nstart=6208, size=256, type=83\nstart=6720, size=128, type=83\n",
            vec![(1u32, 2048usize, 1024usize, 0x11u8), (2, 4096, 512, 0x22), (5, 6208, 256, 0x55), (6, 6720, 128, 0x66)],
        ),
        (
            "gpt",
            "label: gpt\nstart=2048, size=1024\nstart=4096, size=2048\n",
            vec![(1, 2048, 1024, 0x11), (2, 4096, 2048, 0x22)],
        ),
    ] {
        let img = dir.path().join(format!("{label}.img"));
        let mut d = vec![0u8; SECTORS * SECTOR];
        for (_, lba, n, b) in &parts {
            fill(&mut d, *lba, *n, *b);
        }
        std::fs::write(&img, &d).unwrap();
        let mut child = Command::new("sfdisk")
            .arg("--no-reread")
            .arg("--no-tell-kernel")
            .arg("-q")
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "sfdisk {label}");
        let want: Vec<(u32, usize, u8)> = parts.iter().map(|p| (p.0, p.2, p.3)).collect();
        check(&img, &want, true);
    }
}
