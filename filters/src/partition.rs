//! # partition: serve one partition of a partitioned disk
//!
//! When a client connects the filter reads the partition table of the
//! layer below (512-byte sectors) and then serves only the partition
//! chosen, like `qemu-nbd -P`. Both partition table formats are
//! understood:
//!
//! - MBR: primary partitions 1 to 4, and logical partitions numbered from
//!   5 in the chain of extended boot records inside the extended partition
//!   (type 0x05, 0x0f or 0x85);
//! - GPT: partitions 1 to the number of entries in the table (a disk whose
//!   second sector has the `EFI PART` signature; the protective MBR in
//!   front of it is not used).
//!
//! A partition that is not in the table, is unused, or reaches past the
//! end of the disk makes the connection fail with a message saying which.
//!
//! ```text
//! nbdkit --filter=partition file disk.img partition=1
//! ```
//!
//! ## Parameters
//!
//! - `partition=PART` (required): the partition number, counting from 1.
//!
//! The opposite is the partitioning plugin, which puts a partition table
//! around files. nbdkit 1.32 has no `partition-sectorsize` parameter:
//! sectors are always 512 bytes.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

use crate::offset::Window;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "partition",
    help: "partition=<PART>    (required) The partition number (counting from 1).",
    create,
};

/// Bytes in a sector of the partition table.
const SECTOR: u64 = 512;

/// Logical partitions we follow before deciding the chain loops.
const MAX_LOGICAL: u32 = 1024;

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let v = p
        .take("partition")
        .ok_or_else(|| ConfigError::new("the partition parameter is required"))?;
    let number = match v.trim().parse::<u32>() {
        Ok(n) if n >= 1 => n,
        _ => {
            return Err(ConfigError::new(format!(
                "partition: could not parse partition number '{v}' (partitions count from 1)"
            )))
        }
    };
    Ok(Arc::new(PartitionFilter { number }))
}

struct PartitionFilter {
    number: u32,
}

#[async_trait]
impl Filter for PartitionFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h = next.open(ctx).await?;
        let size = h.size()?;
        let (start, len) = find_partition(&*h, size, self.number).await?;
        Ok(Box::new(Window::new(h, start, len)))
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn err(msg: String) -> Error {
    Error::einval(format!("partition: {msg}"))
}

async fn read_sector(h: &dyn Handle, disk: u64, lba: u64) -> Result<[u8; SECTOR as usize]> {
    let at = lba
        .checked_mul(SECTOR)
        .filter(|a| a.checked_add(SECTOR).is_some_and(|e| e <= disk))
        .ok_or_else(|| {
            err(format!(
                "sector {lba} of the partition table is beyond the end of the disk"
            ))
        })?;
    let mut b = [0u8; SECTOR as usize];
    h.pread(&mut b, at, Flags::NONE).await?;
    Ok(b)
}

/// One entry of an MBR (or extended boot record) partition table.
#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    kind: u8,
    start: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            kind: e[4],
            start: le32(e, 8) as u64,
            sectors: le32(e, 12) as u64,
        }
    })
}

fn has_boot_signature(sector: &[u8]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xaa
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// Check a partition of `sectors` sectors from `lba` against the disk and
/// turn it into bytes.
fn place(disk: u64, number: u32, lba: u64, sectors: u64) -> Result<(u64, u64)> {
    let start = lba.checked_mul(SECTOR);
    let len = sectors.checked_mul(SECTOR);
    match (start, len) {
        (Some(s), Some(l)) if s.checked_add(l).is_some_and(|e| e <= disk) => Ok((s, l)),
        _ => Err(err(format!(
            "partition {number} (sectors {lba} to {}) extends beyond the end of the disk ({disk} bytes)",
            lba.saturating_add(sectors).saturating_sub(1)
        ))),
    }
}

/// Find partition `number` of the disk below: its byte offset and length.
pub(crate) async fn find_partition(h: &dyn Handle, disk: u64, number: u32) -> Result<(u64, u64)> {
    if disk < 2 * SECTOR {
        return Err(err(format!(
            "the disk ({disk} bytes) is too small to hold a partition table"
        )));
    }
    let lba0 = read_sector(h, disk, 0).await?;
    let lba1 = read_sector(h, disk, 1).await?;
    if &lba1[0..8] == b"EFI PART" {
        return find_gpt(h, disk, number, &lba1).await;
    }
    if has_boot_signature(&lba0) {
        return find_mbr(h, disk, number, &lba0).await;
    }
    Err(err(
        "the disk has no MBR or GPT partition table (no 0x55aa boot signature, no EFI PART header)"
            .into(),
    ))
}

async fn find_mbr(h: &dyn Handle, disk: u64, number: u32, lba0: &[u8]) -> Result<(u64, u64)> {
    let primary = mbr_entries(lba0);
    if number <= 4 {
        let e = primary[number as usize - 1];
        if e.kind == 0 || e.sectors == 0 {
            return Err(err(format!("MBR partition {number} is not in use")));
        }
        return place(disk, number, e.start, e.sectors);
    }
    let Some(ext) = primary
        .iter()
        .find(|e| is_extended(e.kind) && e.sectors > 0)
    else {
        return Err(err(format!(
            "MBR partition {number} not found: the disk has no extended partition, so only partitions 1-4 exist"
        )));
    };
    // Walk the chain of extended boot records: entry 0 of each is a
    // logical partition (relative to that record), entry 1 points to the
    // next record (relative to the start of the extended partition).
    let mut ebr = ext.start;
    let mut n = 5;
    loop {
        let sector = read_sector(h, disk, ebr).await?;
        if !has_boot_signature(&sector) {
            return Err(err(format!(
                "extended boot record at sector {ebr} has no 0x55aa signature"
            )));
        }
        let [logical, link, ..] = mbr_entries(&sector);
        if logical.kind != 0 && logical.sectors > 0 && n == number {
            return place(disk, number, ebr + logical.start, logical.sectors);
        }
        if link.kind == 0 || link.sectors == 0 || n >= MAX_LOGICAL.min(number) {
            return Err(err(format!(
                "MBR partition {number} not found (the disk has logical partitions 5-{n})"
            )));
        }
        ebr = ext.start + link.start;
        n += 1;
    }
}

async fn find_gpt(h: &dyn Handle, disk: u64, number: u32, header: &[u8]) -> Result<(u64, u64)> {
    let entries_lba = le64(header, 72);
    let count = le32(header, 80);
    let entry_size = le32(header, 84) as u64;
    if !(128..=SECTOR).contains(&entry_size) || entry_size & 7 != 0 {
        return Err(err(format!(
            "GPT header has an unsupported partition entry size ({entry_size} bytes)"
        )));
    }
    if number > count {
        return Err(err(format!(
            "GPT partition {number} not found: the table has {count} entries"
        )));
    }
    let at = (number as u64 - 1) * entry_size;
    let table = entries_lba
        .checked_mul(SECTOR)
        .and_then(|t| t.checked_add(at))
        .filter(|t| t.checked_add(entry_size).is_some_and(|e| e <= disk))
        .ok_or_else(|| err("GPT partition entries lie beyond the end of the disk".into()))?;
    let mut e = vec![0u8; entry_size as usize];
    h.pread(&mut e, table, Flags::NONE).await?;
    if e[0..16].iter().all(|b| *b == 0) {
        return Err(err(format!("GPT partition {number} is not in use")));
    }
    let first = le64(&e, 32);
    let last = le64(&e, 40);
    if last < first {
        return Err(err(format!(
            "GPT partition {number} ends (sector {last}) before it starts (sector {first})"
        )));
    }
    place(disk, number, first, last - first + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offset::testing::*;

    /// Put an MBR entry into a sector.
    pub fn mbr_entry(sector: &mut [u8], i: usize, kind: u8, start: u32, sectors: u32) {
        let e = &mut sector[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn sign(sector: &mut [u8]) {
        sector[510] = 0x55;
        sector[511] = 0xaa;
    }

    /// A 1 MiB disk: primary 1 at sector 8 (8 sectors), primary 2 at 64
    /// (16), extended 3 at 256 (512) holding logicals 5 at 258 (4) and 6
    /// at 386 (2). Each partition's sectors are filled with its number.
    fn mbr_disk() -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        mbr_entry(&mut d[0..512], 0, 0x83, 8, 8);
        mbr_entry(&mut d[0..512], 1, 0x83, 64, 16);
        mbr_entry(&mut d[0..512], 2, 0x05, 256, 512);
        sign(&mut d[0..512]);
        let ebr1 = 256 * 512;
        mbr_entry(&mut d[ebr1..ebr1 + 512], 0, 0x83, 2, 4);
        mbr_entry(&mut d[ebr1..ebr1 + 512], 1, 0x05, 128, 8);
        sign(&mut d[ebr1..ebr1 + 512]);
        let ebr2 = 384 * 512;
        mbr_entry(&mut d[ebr2..ebr2 + 512], 0, 0x83, 2, 2);
        sign(&mut d[ebr2..ebr2 + 512]);
        for (n, lba, len) in [(1u8, 8, 8), (2, 64, 16), (5, 258, 4), (6, 386, 2)] {
            d[lba * 512..(lba + len) * 512].fill(n);
        }
        d
    }

    fn gpt_disk() -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        mbr_entry(&mut d[0..512], 0, 0xee, 1, 2047);
        sign(&mut d[0..512]);
        let hdr = &mut d[512..1024];
        hdr[0..8].copy_from_slice(b"EFI PART");
        hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
        hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        for (i, first, last) in [(0usize, 34u64, 99u64), (2, 100, 2000)] {
            let e = &mut d[1024 + 128 * i..1024 + 128 * (i + 1)];
            e[0..16].fill(0x11);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        d[34 * 512..100 * 512].fill(1);
        d[100 * 512..2001 * 512].fill(3);
        d
    }

    async fn open(disk: Vec<u8>, n: u32) -> Result<Box<dyn Handle>> {
        let mem = Mem::with(disk);
        let mut p = params(&[&format!("partition={n}")]);
        let s = stack(vec![create(&mut p).unwrap()], &mem);
        s.open(&ctx(1)).await
    }

    #[tokio::test]
    async fn partition_mbr_primary_and_logical() {
        for (n, len) in [(1u32, 8u64), (2, 16), (5, 4), (6, 2)] {
            let h = open(mbr_disk(), n).await.unwrap();
            assert_eq!(h.size().unwrap(), len * 512, "partition {n}");
            let b = read(&*h, 0, (len * 512) as usize).await.unwrap();
            assert!(b.iter().all(|x| *x == n as u8), "partition {n}");
        }
        // The extended partition itself is an entry too.
        assert_eq!(
            open(mbr_disk(), 3).await.unwrap().size().unwrap(),
            512 * 512
        );
    }

    #[tokio::test]
    async fn partition_mbr_missing() {
        for (n, want) in [(4u32, "not in use"), (7, "not found"), (200, "not found")] {
            let e = open(mbr_disk(), n).await.err().expect("must fail");
            assert!(e.msg.contains(want), "{n}: {}", e.msg);
        }
        let mut d = mbr_disk();
        d[446 + 32 + 4] = 0; // no extended partition
        let e = open(d, 5).await.err().unwrap();
        assert!(e.msg.contains("no extended partition"), "{}", e.msg);
        let e = open(vec![0; 4096], 1).await.err().unwrap();
        assert!(e.msg.contains("no MBR or GPT"), "{}", e.msg);
        let mut d = mbr_disk();
        mbr_entry(&mut d[0..512], 0, 0x83, 2000, 100);
        let e = open(d, 1).await.err().unwrap();
        assert!(e.msg.contains("beyond the end"), "{}", e.msg);
    }

    #[tokio::test]
    async fn partition_gpt() {
        let h = open(gpt_disk(), 1).await.unwrap();
        assert_eq!(h.size().unwrap(), 66 * 512);
        assert!(read(&*h, 0, 66 * 512)
            .await
            .unwrap()
            .iter()
            .all(|x| *x == 1));
        let h = open(gpt_disk(), 3).await.unwrap();
        assert_eq!(h.size().unwrap(), 1901 * 512);
        h.pwrite(&[9; 512], 0, Flags::NONE).await.unwrap();
        assert_eq!(read(&*h, 0, 1).await.unwrap(), vec![9]);
        let e = open(gpt_disk(), 2).await.err().unwrap();
        assert!(e.msg.contains("not in use"), "{}", e.msg);
        let e = open(gpt_disk(), 129).await.err().unwrap();
        assert!(e.msg.contains("128 entries"), "{}", e.msg);
    }

    #[test]
    fn partition_parameter() {
        assert!(create(&mut params(&[])).is_err());
        assert!(create(&mut params(&["partition=0"])).is_err());
        assert!(create(&mut params(&["partition=x"])).is_err());
        assert!(create(&mut params(&["partition=2"])).is_ok());
    }
}
