//! Partition tables built in memory, shared by the `partitioning`,
//! `linuxdisk` and `floppy` plugins: the layout of a virtual disk made of
//! partitions (MBR with extended and logical partitions beyond four, or
//! GPT with its protective MBR and secondary table), as upstream nbdkit
//! 1.32 lays it out, and parsers that read the tables back (for tests).
//!
//! The sector size is fixed at 512 bytes. A [`Layout`] is a sorted list
//! of [`Region`]s covering the whole disk: table sectors (bytes held in
//! memory), zero padding, and the partitions' data (served by the plugin
//! from whatever backs partition `i`).
//!
//! Upstream's layout, which this follows: partition `i` starts at the
//! first sector after the previous one (after the primary table for the
//! first) rounded up to its alignment, and takes its size rounded up to
//! whole sectors. With MBR and more than four partitions, the first three
//! are primary, the fourth entry is an extended partition (type 0x0f)
//! and each later partition is preceded by its own extended boot record
//! sector (placed before the alignment padding). The MBR disk ends where
//! the last partition ends; the GPT disk has 32 or more sectors of
//! secondary entries and the secondary header after it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::{Cache, Caps, Error, Flags, Fua, Handle, Result};

/// The sector size.
pub const SECTOR: u64 = 512;

/// The default MBR type byte (Linux filesystem).
pub const MBR_LINUX: u8 = 0x83;

/// The default GPT partition type: Linux filesystem data.
pub const GUID_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Which partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// DOS-style master boot record.
    Mbr,
    /// GUID partition table (with a protective MBR).
    Gpt,
}

/// One partition to lay out.
#[derive(Debug, Clone)]
pub struct PartSpec {
    /// Its data's size in bytes (rounded up to whole sectors on disk).
    pub size: u64,
    /// Its start is aligned to this many bytes (a multiple of 512).
    pub alignment: u64,
    /// The MBR type byte.
    pub mbr_id: u8,
    /// The GPT type GUID, in on-disk byte order.
    pub type_guid: [u8; 16],
    /// The GPT unique partition GUID, in on-disk byte order.
    pub guid: [u8; 16],
    /// The GPT partition name (at most 36 UTF-16 units are kept).
    pub name: String,
    /// The first partition is flagged bootable (MBR 0x80, GPT legacy
    /// BIOS bootable), as upstream flags it.
    pub bootable: bool,
}

impl PartSpec {
    /// A partition of `size` bytes with upstream's defaults: 1M
    /// alignment, Linux types, a random GUID, no name.
    pub fn new(size: u64) -> Self {
        PartSpec {
            size,
            alignment: 1 << 20,
            mbr_id: MBR_LINUX,
            type_guid: parse_guid(GUID_LINUX).expect("valid GUID"),
            guid: rand::random(),
            name: String::new(),
            bootable: false,
        }
    }
}

/// What backs a region of the virtual disk.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Table bytes held in memory.
    Bytes(Arc<Vec<u8>>),
    /// Padding reading as zeroes.
    Zero,
    /// The data of partition `i`, from its start.
    Part(usize),
}

/// A run of the virtual disk.
#[derive(Debug, Clone)]
pub struct Region {
    /// Start in bytes.
    pub start: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// What is there.
    pub piece: Piece,
}

/// A laid-out partitioned disk.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The regions, in order, covering `[0, size)`.
    pub regions: Vec<Region>,
    /// Total size in bytes.
    pub size: u64,
    /// Start sector of each partition.
    pub starts: Vec<u64>,
}

/// Parse a GUID `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` into its on-disk
/// bytes (the first three fields little-endian).
pub fn parse_guid(s: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if groups.len() != 5
        || groups
            .iter()
            .zip(lens)
            .any(|(g, l)| g.len() != l || !g.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return None;
    }
    let hex: String = groups.concat();
    let mut b = [0u8; 16];
    for (i, x) in b.iter_mut().enumerate() {
        *x = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// Format on-disk GUID bytes as upstream tools print them.
pub fn format_guid(b: &[u8; 16]) -> String {
    let mut b = *b;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// CRC-32 (IEEE, reflected, as zlib and the UEFI spec).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn div_up(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// The 16-byte MBR entry. CHS fields hold the "use LBA" filler as upstream.
fn mbr_entry(bootable: bool, id: u8, start: u64, len: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = if bootable { 0x80 } else { 0 };
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = id;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    e
}

/// A boot record sector holding up to four entries.
fn boot_record(entries: &[[u8; 16]]) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    for (i, e) in entries.iter().enumerate() {
        s[446 + 16 * i..462 + 16 * i].copy_from_slice(e);
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// How many GPT entries: at least 128, a multiple of 128.
fn gpt_entries(n: usize) -> u64 {
    (div_up(n.max(1) as u64, 128) * 128).max(128)
}

const GPT_ENTRY: u64 = 128;
const GPT_HEADER: usize = 96;

/// Lay out `parts` under a `kind` partition table.
pub fn layout(parts: &[PartSpec], kind: Kind) -> Result<Layout, String> {
    if parts.is_empty() {
        return Err("at least one partition is needed".into());
    }
    let n = parts.len();
    let extended = kind == Kind::Mbr && n > 4;
    let nentries = gpt_entries(n);
    let table_sectors = nentries * GPT_ENTRY / SECTOR;
    let mut pos = match kind {
        Kind::Mbr => 1,
        Kind::Gpt => 2 + table_sectors,
    };
    let mut starts = Vec::with_capacity(n);
    let mut lens = Vec::with_capacity(n);
    let mut ebrs = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if p.size == 0 {
            return Err("zero length partitions are not allowed".into());
        }
        if p.alignment == 0 || p.alignment % SECTOR != 0 {
            return Err(format!(
                "partition alignment {} should be a multiple of sector size {SECTOR}",
                p.alignment
            ));
        }
        if extended && i >= 3 {
            ebrs.push(pos);
            pos += 1;
        }
        let align = p.alignment / SECTOR;
        pos = div_up(pos, align)
            .checked_mul(align)
            .ok_or("disk too large")?;
        starts.push(pos);
        let len = div_up(p.size, SECTOR);
        lens.push(len);
        pos = pos.checked_add(len).ok_or("disk too large")?;
    }
    let end = pos;
    let total = match kind {
        Kind::Mbr => end,
        Kind::Gpt => end + table_sectors + 1,
    };
    if total > (i64::MAX as u64) / SECTOR {
        return Err("disk too large".into());
    }
    if kind == Kind::Mbr && end > u32::MAX as u64 {
        return Err(
            "the disk is too large for an MBR partition table (use partition-type=gpt)".into(),
        );
    }

    // The table sectors, by sector number.
    let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
    match kind {
        Kind::Mbr => {
            let mut e = Vec::new();
            for i in 0..n.min(if extended { 3 } else { 4 }) {
                e.push(mbr_entry(
                    parts[i].bootable,
                    parts[i].mbr_id,
                    starts[i],
                    lens[i],
                ));
            }
            if extended {
                e.push(mbr_entry(false, 0x0f, ebrs[0], end - ebrs[0]));
            }
            tables.push((0, boot_record(&e)));
            for (k, &ebr) in ebrs.iter().enumerate() {
                let i = k + 3;
                let mut e = vec![mbr_entry(false, parts[i].mbr_id, starts[i] - ebr, lens[i])];
                if let Some(&next) = ebrs.get(k + 1) {
                    let next_end = starts[i + 1] + lens[i + 1];
                    e.push(mbr_entry(false, 0x0f, next - ebrs[0], next_end - next));
                }
                tables.push((ebr, boot_record(&e)));
            }
        }
        Kind::Gpt => {
            let pmbr = boot_record(&[mbr_entry(false, 0xee, 1, (total - 1).min(u32::MAX as u64))]);
            let mut entries = vec![0u8; (nentries * GPT_ENTRY) as usize];
            for (i, p) in parts.iter().enumerate() {
                let e = &mut entries[i * GPT_ENTRY as usize..(i + 1) * GPT_ENTRY as usize];
                e[0..16].copy_from_slice(&p.type_guid);
                e[16..32].copy_from_slice(&p.guid);
                e[32..40].copy_from_slice(&starts[i].to_le_bytes());
                e[40..48].copy_from_slice(&(starts[i] + lens[i] - 1).to_le_bytes());
                let attrs: u64 = if p.bootable { 1 << 2 } else { 0 };
                e[48..56].copy_from_slice(&attrs.to_le_bytes());
                for (j, u) in p.name.encode_utf16().take(36).enumerate() {
                    e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
                }
            }
            let entries_crc = crc32(&entries);
            let header = |current: u64, backup: u64, table: u64| {
                let mut h = vec![0u8; SECTOR as usize];
                h[0..8].copy_from_slice(b"EFI PART");
                h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
                h[12..16].copy_from_slice(&(GPT_HEADER as u32).to_le_bytes());
                h[24..32].copy_from_slice(&current.to_le_bytes());
                h[32..40].copy_from_slice(&backup.to_le_bytes());
                h[40..48].copy_from_slice(&(2 + table_sectors).to_le_bytes());
                h[48..56].copy_from_slice(&(total - 2 - table_sectors).to_le_bytes());
                // Disk GUID at 56..72: zero, as upstream.
                h[72..80].copy_from_slice(&table.to_le_bytes());
                h[80..84].copy_from_slice(&(nentries as u32).to_le_bytes());
                h[84..88].copy_from_slice(&(GPT_ENTRY as u32).to_le_bytes());
                h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
                let crc = crc32(&h[..GPT_HEADER]);
                h[16..20].copy_from_slice(&crc.to_le_bytes());
                h
            };
            let mut primary = pmbr;
            primary.extend(header(1, total - 1, 2));
            primary.extend(&entries);
            tables.push((0, primary));
            let mut secondary = entries;
            secondary.extend(header(total - 1, 1, end));
            tables.push((end, secondary));
        }
    }

    // Merge tables, partitions and padding into regions.
    let mut marks: Vec<(u64, u64, Piece)> = Vec::new();
    for (sec, bytes) in tables {
        marks.push((
            sec * SECTOR,
            bytes.len() as u64,
            Piece::Bytes(Arc::new(bytes)),
        ));
    }
    for (i, p) in parts.iter().enumerate() {
        marks.push((starts[i] * SECTOR, p.size, Piece::Part(i)));
    }
    marks.sort_by_key(|m| m.0);
    let size = total * SECTOR;
    let mut regions = Vec::new();
    let mut at = 0;
    for (start, len, piece) in marks {
        debug_assert!(start >= at);
        if start > at {
            regions.push(Region {
                start: at,
                len: start - at,
                piece: Piece::Zero,
            });
        }
        regions.push(Region { start, len, piece });
        at = start + len;
    }
    if size > at {
        regions.push(Region {
            start: at,
            len: size - at,
            piece: Piece::Zero,
        });
    }
    Ok(Layout {
        regions,
        size,
        starts,
    })
}

/// A write refused because it would change a table or padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Where the first changed piece starts.
    pub offset: u64,
    /// A table (else padding).
    pub table: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Upstream's words.
        if self.table {
            write!(f, "attempt to change partition table of virtual disk")
        } else {
            write!(f, "write non-zeroes to padding region")
        }
    }
}

/// What a request touches in one region.
pub struct Span<'a> {
    /// The region.
    pub region: &'a Region,
    /// Offset within the region.
    pub offset: u64,
    /// Offset within the request's buffer.
    pub buf_at: usize,
    /// Length.
    pub len: usize,
}

impl Layout {
    /// The regions a request `[offset, offset + len)` touches, in order.
    pub fn spans(&self, offset: u64, len: usize) -> Vec<Span<'_>> {
        let end = offset + len as u64;
        let first = self.regions.partition_point(|r| r.start + r.len <= offset);
        let mut out = Vec::new();
        for r in &self.regions[first..] {
            if r.start >= end {
                break;
            }
            let s = offset.max(r.start);
            let e = end.min(r.start + r.len);
            out.push(Span {
                region: r,
                offset: s - r.start,
                buf_at: (s - offset) as usize,
                len: (e - s) as usize,
            });
        }
        out
    }

    /// Fill the table and padding parts of a read; `part` reads
    /// partition `i` at an offset into a buffer.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        mut part: impl FnMut(usize, &mut [u8], u64) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for s in self.spans(offset, buf.len()) {
            let b = &mut buf[s.buf_at..s.buf_at + s.len];
            match &s.region.piece {
                Piece::Bytes(v) => {
                    b.copy_from_slice(&v[s.offset as usize..s.offset as usize + s.len])
                }
                Piece::Zero => b.fill(0),
                Piece::Part(i) => part(*i, b, s.offset)?,
            }
        }
        Ok(())
    }

    /// Do a write: partition pieces go to `part`; table and padding
    /// pieces must hold what is already there, else the write fails
    /// (`Err` of the first changed piece, nothing written).
    pub fn write(
        &self,
        buf: &[u8],
        offset: u64,
        mut part: impl FnMut(usize, &[u8], u64) -> std::io::Result<()>,
    ) -> Result<std::io::Result<()>, Refused> {
        let spans = self.spans(offset, buf.len());
        for s in &spans {
            let b = &buf[s.buf_at..s.buf_at + s.len];
            let same = match &s.region.piece {
                Piece::Bytes(v) => b == &v[s.offset as usize..s.offset as usize + s.len],
                Piece::Zero => b.iter().all(|&x| x == 0),
                Piece::Part(_) => true,
            };
            if !same {
                return Err(Refused {
                    offset: s.region.start + s.offset,
                    table: matches!(s.region.piece, Piece::Bytes(_)),
                });
            }
        }
        for s in &spans {
            if let Piece::Part(i) = s.region.piece {
                if let Err(e) = part(i, &buf[s.buf_at..s.buf_at + s.len], s.offset) {
                    return Ok(Err(e));
                }
            }
        }
        Ok(Ok(()))
    }
}

impl Layout {
    /// Replace the region of partition `part` by `inner`, regions that
    /// start at 0 and cover it exactly (a filesystem laid out in pieces).
    pub fn splice(&mut self, part: usize, inner: Vec<Region>) {
        let Some(i) = self
            .regions
            .iter()
            .position(|r| matches!(r.piece, Piece::Part(p) if p == part))
        else {
            return;
        };
        let base = self.regions[i].start;
        debug_assert_eq!(
            inner.iter().map(|r| r.len).sum::<u64>(),
            self.regions[i].len
        );
        let shifted = inner.into_iter().map(|r| Region {
            start: base + r.start,
            ..r
        });
        self.regions.splice(i..=i, shifted);
    }

    /// A disk that is one file of `size` bytes, with no table.
    pub fn whole(size: u64) -> Layout {
        Layout {
            regions: vec![Region {
                start: 0,
                len: size,
                piece: Piece::Part(0),
            }],
            size,
            starts: vec![0],
        }
    }
}

/// A disk made once, when the server gets ready (the images of `iso` and
/// `linuxdisk`), then served to each connection as a clone.
#[derive(Default)]
pub struct MadeOnce(std::sync::OnceLock<Disk>);

impl MadeOnce {
    /// Make the disk, unless it is made already.
    pub fn make(
        &self,
        make: impl FnOnce() -> std::result::Result<Disk, String>,
    ) -> libnbd::ConfigResult<()> {
        if self.0.get().is_none() {
            let d = make().map_err(libnbd::ConfigError::new)?;
            let _ = self.0.set(d);
        }
        Ok(())
    }
    /// A connection's handle on the disk; `what` names it in the error
    /// if it was never made.
    pub fn open(&self, what: &str) -> Result<Box<dyn Handle>> {
        match self.0.get() {
            Some(d) => Ok(Box::new(d.clone())),
            None => Err(Error::eio(format!("{what} was not made"))),
        }
    }
}

/// A file backing a partition.
pub struct DiskFile {
    /// Its name, for messages.
    pub name: String,
    /// The open file.
    pub file: File,
    /// Opened for writing.
    pub writable: bool,
}

/// A laid-out disk over its files, and the handle of every connection
/// to it (clones share the files): reads fill tables and padding from
/// the layout; writes (when `write`) go to the files, and fail with EIO
/// where they would change a table or padding.
#[derive(Clone)]
pub struct Disk {
    layout: Arc<Layout>,
    files: Arc<Vec<DiskFile>>,
    write: bool,
}

impl Disk {
    /// A disk of `layout` whose partition `i` is `files[i]`; writable
    /// when `write`.
    pub fn new(layout: Layout, files: Vec<DiskFile>, write: bool) -> Disk {
        Disk {
            layout: Arc::new(layout),
            files: Arc::new(files),
            write,
        }
    }
}

#[async_trait]
impl Handle for Disk {
    fn size(&self) -> Result<u64> {
        Ok(self.layout.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: self.write,
            flush: self.write,
            fua: if self.write { Fua::Emulate } else { Fua::None },
            multi_conn: true,
            cache: Cache::Emulate,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.layout
                .read(buf, offset, |i, b, o| {
                    self.files[i].file.read_exact_at(b, o)
                })
                .map_err(|e| Error::io("pread", e))
        })
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        if !self.write {
            return Err(Error::eperm("the export is read-only"));
        }
        run_blocking(|| {
            match self.layout.write(buf, offset, |i, b, o| {
                let p = &self.files[i];
                if !p.writable {
                    return Err(std::io::Error::from_raw_os_error(libc::EROFS));
                }
                p.file.write_all_at(b, o)
            }) {
                Ok(r) => r.map_err(|e| Error::io("pwrite", e)),
                Err(r) => Err(Error::eio(format!("{r} (at offset {})", r.offset))),
            }
        })
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            for p in self.files.iter().filter(|p| p.writable) {
                p.file
                    .sync_data()
                    .map_err(|e| Error::io(format!("fdatasync: {}", p.name), e))?;
            }
            Ok(())
        })
    }
}

/// A partition read back from a table: start and length in sectors and
/// its MBR type byte or GPT type GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// MBR type byte (0 for GPT).
    pub id: u8,
    /// GPT type GUID (zero for MBR).
    pub type_guid: [u8; 16],
    /// Bootable flag / legacy BIOS bootable attribute.
    pub bootable: bool,
    /// GPT name.
    pub name: String,
}

fn u32_at(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
}
fn u64_at(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap())
}

/// Read the partitions of an MBR disk image (primary, then logical
/// partitions numbered from 5 as Linux does; the extended entry itself
/// is left out).
pub fn parse_mbr(disk: &[u8]) -> Result<Vec<Parsed>, String> {
    let sector = |s: u64| -> Result<&[u8], String> {
        let o = (s * SECTOR) as usize;
        let d = disk.get(o..o + 512).ok_or("sector beyond the disk")?;
        if d[510..512] != [0x55, 0xaa] {
            return Err(format!("no boot signature in sector {s}"));
        }
        Ok(d)
    };
    let entry = |d: &[u8], i: usize| {
        let e = &d[446 + 16 * i..462 + 16 * i];
        (e[0], e[4], u32_at(e, 8) as u64, u32_at(e, 12) as u64)
    };
    let mbr = sector(0)?;
    let mut out = Vec::new();
    let mut ext = None;
    for i in 0..4 {
        let (boot, id, start, len) = entry(mbr, i);
        if id == 0 {
            continue;
        }
        if id == 0x05 || id == 0x0f {
            ext = Some(start);
            continue;
        }
        out.push(Parsed {
            start,
            len,
            id,
            type_guid: [0; 16],
            bootable: boot == 0x80,
            name: String::new(),
        });
    }
    if let Some(base) = ext {
        let mut ebr = base;
        for _ in 0..100_000 {
            let d = sector(ebr)?;
            let (boot, id, start, len) = entry(d, 0);
            out.push(Parsed {
                start: ebr + start,
                len,
                id,
                type_guid: [0; 16],
                bootable: boot == 0x80,
                name: String::new(),
            });
            let (_, nid, nstart, _) = entry(d, 1);
            if nid == 0 {
                break;
            }
            ebr = base + nstart;
        }
    }
    Ok(out)
}

/// Read and check the primary and secondary GPT of a disk image
/// (signatures, CRCs, that the two agree) and return its partitions.
pub fn parse_gpt(disk: &[u8]) -> Result<Vec<Parsed>, String> {
    let n = disk.len() as u64 / SECTOR;
    let header = |lba: u64| -> Result<(&[u8], Vec<u8>), String> {
        let h = &disk[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize];
        if &h[0..8] != b"EFI PART" {
            return Err(format!("no GPT signature at LBA {lba}"));
        }
        let hsize = u32_at(h, 12) as usize;
        let mut c = h[..hsize].to_vec();
        c[16..20].fill(0);
        if crc32(&c) != u32_at(h, 16) {
            return Err(format!("bad header CRC at LBA {lba}"));
        }
        if u64_at(h, 24) != lba {
            return Err(format!("header at LBA {lba} says it is elsewhere"));
        }
        let table = u64_at(h, 72) as usize;
        let count = u32_at(h, 80) as usize;
        let esize = u32_at(h, 84) as usize;
        let t = disk
            .get(table * 512..table * 512 + count * esize)
            .ok_or("table beyond the disk")?;
        if crc32(t) != u32_at(h, 88) {
            return Err(format!("bad entries CRC for header at LBA {lba}"));
        }
        Ok((h, t.to_vec()))
    };
    let pmbr = &disk[..512];
    if pmbr[446 + 4] != 0xee || pmbr[510..512] != [0x55, 0xaa] {
        return Err("no protective MBR".into());
    }
    let (h1, t1) = header(1)?;
    let (h2, t2) = header(n - 1)?;
    if t1 != t2 || u64_at(h1, 32) != n - 1 || u64_at(h2, 32) != 1 {
        return Err("primary and secondary GPT disagree".into());
    }
    let mut out = Vec::new();
    for e in t1.chunks(u32_at(h1, 84) as usize) {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let first = u64_at(e, 32);
        out.push(Parsed {
            start: first,
            len: u64_at(e, 40) - first + 1,
            id: 0,
            type_guid: e[0..16].try_into().unwrap(),
            bootable: u64_at(e, 48) & 4 != 0,
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(l: &Layout, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut d = vec![0xa5u8; l.size as usize];
        l.read(&mut d, 0, |i, b, _| {
            b.fill(fill(i));
            Ok(())
        })
        .unwrap();
        d
    }

    #[test]
    fn crc_and_guid() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let g = parse_guid(GUID_LINUX).unwrap();
        assert_eq!(g[0..4], [0xaf, 0x3d, 0xc6, 0x0f]);
        assert_eq!(format_guid(&g), GUID_LINUX);
        assert!(parse_guid("xyz").is_none());
        assert!(parse_guid("0FC63DAF-8483-4772-8E79-3D69D8477DEZ").is_none());
    }

    #[test]
    fn mbr_primary_layout() {
        let mut parts: Vec<_> = [100_000, 200_000, 300_000]
            .iter()
            .map(|&s| PartSpec::new(s))
            .collect();
        parts[0].bootable = true;
        parts[2].mbr_id = 0x82;
        let l = layout(&parts, Kind::Mbr).unwrap();
        // As upstream: 2048, 4096, 6144 and the disk ends with the last.
        assert_eq!(l.starts, [2048, 4096, 6144]);
        assert_eq!(l.size, (6144 + 586) * 512);
        let d = image(&l, |i| i as u8 + 1);
        let p = parse_mbr(&d).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].start, p[0].len, p[0].id, p[0].bootable),
            (2048, 196, 0x83, true)
        );
        assert_eq!(
            (p[2].start, p[2].len, p[2].id, p[2].bootable),
            (6144, 586, 0x82, false)
        );
        // Padding reads as zeroes, the partition's sector tail too.
        assert_eq!(d[512], 0);
        assert_eq!(d[2048 * 512], 1);
        assert_eq!(d[2048 * 512 + 100_000], 0);
    }

    #[test]
    fn mbr_logical_layout() {
        let mut parts: Vec<_> = (1..=7).map(|i| PartSpec::new(i * 100_000)).collect();
        parts[6].alignment = 4096;
        let l = layout(&parts, Kind::Mbr).unwrap();
        // The numbers upstream nbdkit 1.32 gives for these files.
        assert_eq!(l.starts, [2048, 4096, 6144, 8192, 10240, 12288, 13464]);
        assert_eq!(l.size, 14832 * 512);
        let d = image(&l, |_| 7);
        let p = parse_mbr(&d).unwrap();
        let got: Vec<_> = p.iter().map(|p| (p.start, p.len)).collect();
        assert_eq!(
            got,
            [
                (2048, 196),
                (4096, 391),
                (6144, 586),
                (8192, 782),
                (10240, 977),
                (12288, 1172),
                (13464, 1368)
            ]
        );
        // The extended partition spans from the first EBR to the end.
        assert_eq!(d[446 + 48 + 4], 0x0f);
        assert_eq!(u32_at(&d, 446 + 48 + 8), 6730);
        assert_eq!(u32_at(&d, 446 + 48 + 12), 8102);
    }

    #[test]
    fn gpt_layout() {
        let mut parts: Vec<_> = (1..=3).map(|i| PartSpec::new(i * 100_000)).collect();
        parts[0].bootable = true;
        parts[1].name = "p2".into();
        parts[1].type_guid = parse_guid("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F").unwrap();
        let l = layout(&parts, Kind::Gpt).unwrap();
        assert_eq!(l.starts, [2048, 4096, 6144]);
        assert_eq!(l.size, 6763 * 512);
        let d = image(&l, |_| 0xff);
        let p = parse_gpt(&d).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].start, p[0].len, p[0].bootable), (2048, 196, true));
        assert_eq!(
            format_guid(&p[1].type_guid),
            "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
        );
        assert_eq!(p[1].name, "p2");
        assert_eq!((p[2].start, p[2].len, p[2].bootable), (6144, 586, false));
        // Many partitions: the table grows in steps of 128 entries.
        let many: Vec<_> = (0..130)
            .map(|_| PartSpec {
                alignment: 512,
                ..PartSpec::new(1)
            })
            .collect();
        let l = layout(&many, Kind::Gpt).unwrap();
        assert_eq!(l.starts[0], 66);
        assert_eq!(l.size, 261 * 512);
        assert_eq!(parse_gpt(&image(&l, |_| 1)).unwrap().len(), 130);
    }

    #[test]
    fn writes_to_tables_must_not_change_them() {
        let l = layout(&[PartSpec::new(1000)], Kind::Mbr).unwrap();
        let d = image(&l, |_| 0);
        let mut seen = Vec::new();
        let mut part = |i: usize, b: &[u8], o: u64| {
            seen.push((i, b.len(), o));
            Ok(())
        };
        assert!(l.write(&d[..512], 0, &mut part).is_ok());
        let r = l.write(&[1; 512], 0, &mut part).err().unwrap();
        assert_eq!((r.offset, r.table), (0, true));
        let r = l.write(&[1; 512], 1024, &mut part).err().unwrap();
        assert_eq!((r.offset, r.table), (1024, false));
        assert!(l.write(&[0; 512], 4096, &mut part).is_ok());
        assert!(l.write(&[1; 24], 2048 * 512 + 1000, &mut part).is_err());
        assert!(l.write(&[1; 1000], 2048 * 512, &mut part).is_ok());
        assert_eq!(seen, [(0, 1000, 0)]);
        assert!(layout(&[PartSpec::new(0)], Kind::Mbr).is_err());
        assert!(layout(
            &[PartSpec {
                alignment: 3000,
                ..PartSpec::new(1)
            }],
            Kind::Mbr
        )
        .is_err());
    }
}
