//! # floppy: a FAT32 disk made virtually from a directory
//!
//! The files and subdirectories of a directory appear in a FAT32
//! filesystem (with long file names) in the single partition of an MBR
//! disk, served read-only. As upstream does, the filesystem is built in
//! memory and the files' data are read from the files themselves at each
//! request: no copy is made (so leave the directory alone meanwhile).
//!
//! ```text
//! nbdkit floppy /path/to/directory
//! nbdkit floppy dir=/path/to/directory label=MYDISK size=64M
//! nbdkit --filter=partition floppy /path/to/directory partition=1
//! ```
//!
//! ## Parameters
//!
//! - `[dir=]DIRECTORY` (required): its files and subdirectories appear
//!   in the filesystem's root.
//! - `label=LABEL` (default `NBDKITFLOPY`): the volume label, up to 11
//!   characters (more are cut off).
//! - `size=SIZE`: the whole disk's size. Without it the disk is just
//!   large enough for the files and directories, with no free space.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's floppy plugin:
//!
//! - The disk is an MBR with one partition of type 0x0c (FAT32 LBA) at
//!   sector 2048; FAT32 is used whatever the size, with 16K clusters, 32
//!   reserved sectors (boot sector, FSInfo, backup boot sector at 6), two
//!   FATs each a multiple of 32 sectors, volume ID `01020304`.
//! - Every name is stored as a long (VFAT) name, with a generated
//!   `BASIS~N.EXT` short name; directories come first, then files, each
//!   in a contiguous run of clusters; times are the files' modification
//!   times (UTC). Only regular files and directories are taken (symbolic
//!   links, devices, sockets are left out). A file of 4G or more, a name
//!   longer than 255 UTF-16 units, a directory of more than 65536 slots
//!   (entries and their long names), or a disk beyond FAT32's limits stops
//!   the server with an error, as does `size=` too small for the files.
//! - Unlike upstream, the boot sector records the partition's start as
//!   its hidden sectors and a 64-head, 32-sector geometry, so that tools
//!   such as mtools accept it (upstream writes zeroes there), and starts
//!   with the usual jump instruction; the FSInfo's next-free hint is
//!   "unknown" on a full disk. Upstream also writes its OEM name into
//!   the MBR's (unused) boot code area; ours leaves it zero.
//! - Read-only; no flush, trim, zero or extents; multi-conn is safe;
//!   cache is emulated; thread model parallel. A file that shrank or
//!   vanished since startup fails the reads of its data with EIO.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Error, Flags, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

use crate::ptable::{self, Kind, Layout, PartSpec, Piece, Region};

/// The registry entry of the floppy plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "floppy",
    help: "dir=<DIRECTORY>     (required) The directory to serve.\n\
           label=<LABEL>                  The volume label.\n\
           size=<SIZE>                    Total disk size.",
    magic: Some("dir"),
    create,
};

const SECTOR: u64 = 512;
/// Sectors per cluster (16K clusters).
const SPC: u64 = 32;
const CLUSTER: u64 = SECTOR * SPC;
const RESERVED: u64 = 32;
const NFATS: u64 = 2;
/// The partition starts at 1M.
const PART_START: u64 = 2048;
const EOC: u32 = 0x0FFF_FFFF;

/// The configured floppy plugin: the disk's layout and the files whose
/// data it maps.
pub struct FloppyPlugin {
    layout: Arc<Layout>,
    files: Arc<Vec<PathBuf>>,
}

/// Build the floppy plugin: walk the directory and lay out the disk.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let dir = params.take("dir").ok_or_else(|| {
        ConfigError::new(
            "you must supply the dir=<DIRECTORY> parameter after the plugin name on the command line",
        )
    })?;
    let label = params.take("label").unwrap_or_else(|| "NBDKITFLOPY".into());
    let size = params.take_size("size")?;
    let dir = crate::tempdisk::real_dir(&dir)?;
    let tree = Tree::walk(&dir).map_err(ConfigError::new)?;
    let (layout, files) = build(tree, &label, size).map_err(ConfigError::new)?;
    Ok(Arc::new(FloppyPlugin {
        layout: Arc::new(layout),
        files: Arc::new(files),
    }))
}

/// A directory of the tree: its entries, and its place once laid out.
#[derive(Debug, Default)]
struct Dir {
    /// Index of the parent directory (the root is its own parent).
    parent: usize,
    entries: Vec<Entry>,
    mtime: i64,
    first_cluster: u32,
    clusters: u64,
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: Kind2,
}

#[derive(Debug, Clone, Copy)]
enum Kind2 {
    Dir(usize),
    File(usize),
}

#[derive(Debug)]
struct FileInfo {
    path: PathBuf,
    size: u64,
    mtime: i64,
    first_cluster: u32,
}

/// The directory tree as read at startup.
#[derive(Debug, Default)]
struct Tree {
    dirs: Vec<Dir>,
    files: Vec<FileInfo>,
}

fn mtime(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime()
}

impl Tree {
    fn walk(root: &Path) -> std::result::Result<Tree, String> {
        let mut t = Tree::default();
        let meta = std::fs::metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
        if !meta.is_dir() {
            return Err(format!("{}: not a directory", root.display()));
        }
        t.dirs.push(Dir {
            mtime: mtime(&meta),
            ..Dir::default()
        });
        t.walk_dir(root, 0)?;
        Ok(t)
    }

    fn walk_dir(&mut self, path: &Path, me: usize) -> std::result::Result<(), String> {
        let rd =
            std::fs::read_dir(path).map_err(|e| format!("opendir: {}: {e}", path.display()))?;
        let mut children: Vec<(String, PathBuf, std::fs::Metadata)> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| format!("readdir: {}: {e}", path.display()))?;
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if !(m.is_dir() || m.is_file()) {
                continue;
            }
            let name = e
                .file_name()
                .into_string()
                .map_err(|n| format!("{}: the name is not UTF-8", Path::new(&n).display()))?;
            children.push((name, p, m));
        }
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, p, m) in children {
            if name.encode_utf16().count() > 255 {
                return Err(format!("{}: the name is too long for FAT", p.display()));
            }
            if m.is_dir() {
                let i = self.dirs.len();
                self.dirs.push(Dir {
                    parent: me,
                    mtime: mtime(&m),
                    ..Dir::default()
                });
                self.dirs[me].entries.push(Entry {
                    name,
                    kind: Kind2::Dir(i),
                });
                self.walk_dir(&p, i)?;
            } else {
                if m.len() > u32::MAX as u64 {
                    return Err(format!(
                        "{}: file is larger than the FAT32 limit of 4G",
                        p.display()
                    ));
                }
                let i = self.files.len();
                self.files.push(FileInfo {
                    path: p,
                    size: m.len(),
                    mtime: mtime(&m),
                    first_cluster: 0,
                });
                self.dirs[me].entries.push(Entry {
                    name,
                    kind: Kind2::File(i),
                });
            }
        }
        Ok(())
    }
}

/// The number of 32-byte slots an entry named `name` takes: its long
/// name entries and its short entry.
fn slots(name: &str) -> u64 {
    (name.encode_utf16().count() as u64).div_ceil(13) + 1
}

/// Bytes of directory `d`: its entries ("." and ".." in subdirectories,
/// the volume label in the root).
fn dir_bytes(t: &Tree, d: usize) -> u64 {
    let own = if d == 0 { 1 } else { 2 };
    32 * (own
        + t.dirs[d]
            .entries
            .iter()
            .map(|e| slots(&e.name))
            .sum::<u64>())
}

/// FAT sectors (a multiple of 32) for `clusters` data clusters.
fn fat_sectors(clusters: u64) -> u64 {
    ((clusters + 2) * 4).div_ceil(SECTOR).div_ceil(32) * 32
}

/// Characters allowed in a short name as they are.
fn short_char(c: char) -> Option<u8> {
    let c = c.to_ascii_uppercase();
    if c.is_ascii_uppercase() || c.is_ascii_digit() || "!#$%&'()-@^_`{}~".contains(c) {
        Some(c as u8)
    } else {
        None
    }
}

/// A unique `BASIS~N.EXT` short name for `name` among `taken`.
fn short_name(name: &str, taken: &mut std::collections::HashSet<[u8; 11]>) -> [u8; 11] {
    let (base, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i + 1..]),
        _ => (name, ""),
    };
    let clean = |s: &str, max: usize| -> Vec<u8> {
        s.chars()
            .filter(|&c| c != ' ' && c != '.')
            .map(|c| short_char(c).unwrap_or(b'_'))
            .take(max)
            .collect()
    };
    let base = clean(base, 8);
    let ext = clean(ext, 3);
    for n in 1u32.. {
        let tail = format!("~{n}");
        let keep = (8 - tail.len()).min(base.len());
        let mut s = [b' '; 11];
        s[..keep].copy_from_slice(&base[..keep]);
        s[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        s[8..8 + ext.len()].copy_from_slice(&ext);
        if taken.insert(s) {
            return s;
        }
    }
    unreachable!("a short name is always found")
}

fn lfn_checksum(s: &[u8; 11]) -> u8 {
    s.iter().fold(0u8, |sum, &c| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(c)
    })
}

/// FAT date and time of a Unix time (UTC), clamped to 1980..2107.
fn fat_time(t: i64) -> (u16, u16) {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year < 1980 {
        return (0x21, 0); // 1980-01-01 00:00
    }
    if year > 2107 {
        return ((127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29);
    }
    let date = (((year - 1980) << 9) | (month << 5) | day) as u16;
    let time = (((secs / 3600) << 11) | (((secs / 60) % 60) << 5) | ((secs % 60) / 2)) as u16;
    (date, time)
}

fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, mtime: i64) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[0..11].copy_from_slice(name);
    e[11] = attr;
    let (date, time) = fat_time(mtime);
    e[14..16].copy_from_slice(&time.to_le_bytes());
    e[16..18].copy_from_slice(&date.to_le_bytes());
    e[18..20].copy_from_slice(&date.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&time.to_le_bytes());
    e[24..26].copy_from_slice(&date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The long name entries of `name`, in on-disk order (last piece first).
fn lfn_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let units: Vec<u16> = name.encode_utf16().collect();
    let n = units.len().div_ceil(13);
    let sum = lfn_checksum(short);
    let mut out = Vec::with_capacity(n);
    for seq in (1..=n).rev() {
        let mut e = [0u8; 32];
        e[0] = seq as u8 | if seq == n { 0x40 } else { 0 };
        e[11] = 0x0f;
        e[13] = sum;
        let offsets = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (k, &o) in offsets.iter().enumerate() {
            let i = (seq - 1) * 13 + k;
            let u = match i.cmp(&units.len()) {
                std::cmp::Ordering::Less => units[i],
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => 0xffff,
            };
            e[o..o + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.push(e);
    }
    out
}

/// The bytes of directory `d` (its clusters' worth).
fn dir_content(t: &Tree, d: usize, label: &[u8; 11]) -> Vec<u8> {
    let dir = &t.dirs[d];
    let mut out = Vec::with_capacity((dir.clusters * CLUSTER) as usize);
    let mut taken = std::collections::HashSet::new();
    if d == 0 {
        out.extend(short_entry(label, 0x08, 0, 0, dir.mtime));
    } else {
        let parent = if dir.parent == 0 {
            0
        } else {
            t.dirs[dir.parent].first_cluster
        };
        out.extend(short_entry(
            b".          ",
            0x10,
            dir.first_cluster,
            0,
            dir.mtime,
        ));
        out.extend(short_entry(
            b"..         ",
            0x10,
            parent,
            0,
            t.dirs[dir.parent].mtime,
        ));
    }
    for e in &dir.entries {
        let short = short_name(&e.name, &mut taken);
        for l in lfn_entries(&e.name, &short) {
            out.extend(l);
        }
        let s = match e.kind {
            Kind2::Dir(i) => {
                let c = &t.dirs[i];
                short_entry(&short, 0x10, c.first_cluster, 0, c.mtime)
            }
            Kind2::File(i) => {
                let f = &t.files[i];
                short_entry(&short, 0x20, f.first_cluster, f.size as u32, f.mtime)
            }
        };
        out.extend(s);
    }
    out.resize((dir.clusters * CLUSTER) as usize, 0);
    out
}

/// Lay out the disk: the MBR, and in its partition the FAT32 built over
/// `t`. Returns the layout and the files its `Part` pieces name.
fn build(
    mut t: Tree,
    label: &str,
    size: Option<u64>,
) -> std::result::Result<(Layout, Vec<PathBuf>), String> {
    let too_large = || "disk image is too large for the FAT32 disk format".to_string();
    // Clusters: the directories first (the root at 2), then the files.
    let mut next: u64 = 2;
    for d in 0..t.dirs.len() {
        let bytes = dir_bytes(&t, d);
        // FAT readers stop at 65536 slots in a directory.
        if bytes > 65536 * 32 {
            return Err("a directory has too many entries for FAT32".into());
        }
        let n = bytes.div_ceil(CLUSTER).max(1);
        t.dirs[d].first_cluster = next as u32;
        t.dirs[d].clusters = n;
        next += n;
    }
    for f in &mut t.files {
        let n = f.size.div_ceil(CLUSTER);
        if n > 0 {
            f.first_cluster = next as u32;
        }
        next += n;
    }
    let used = next - 2;
    if next > 0x0FFF_FFF0 {
        return Err(too_large());
    }
    // The filesystem's sectors and data clusters.
    let (fs_sectors, clusters) = match size {
        None => {
            let c = used.max(1);
            (RESERVED + NFATS * fat_sectors(c) + c * SPC, c)
        }
        Some(s) => {
            let p = (s / SECTOR)
                .checked_sub(PART_START)
                .filter(|&p| p >= RESERVED + NFATS * 32 + SPC)
                .ok_or_else(too_large)?;
            let mut c = (p - RESERVED) / SPC;
            loop {
                let fs = fat_sectors(c);
                let c2 = (p.saturating_sub(RESERVED + NFATS * fs)) / SPC;
                if c2 >= c {
                    break;
                }
                c = c2;
            }
            if c < used.max(1) {
                return Err(format!(
                    "size={s} is too small for the files and directories"
                ));
            }
            (p, c)
        }
    };
    if fs_sectors + PART_START > u32::MAX as u64 || clusters + 2 > 0x0FFF_FFF0 {
        return Err(too_large());
    }
    let fat_len = fat_sectors(clusters);

    // The FAT, up to the last used cluster (the rest is free: zero).
    let mut fat = vec![0u32; next as usize];
    fat[0] = 0x0FFF_FFF8;
    fat[1] = EOC;
    let mut chain = |first: u64, n: u64| {
        for c in first..first + n {
            fat[c as usize] = if c + 1 == first + n {
                EOC
            } else {
                c as u32 + 1
            };
        }
    };
    for d in &t.dirs {
        chain(d.first_cluster as u64, d.clusters);
    }
    for f in &t.files {
        chain(f.first_cluster as u64, f.size.div_ceil(CLUSTER));
    }
    let fat_bytes: Vec<u8> = fat.iter().flat_map(|e| e.to_le_bytes()).collect();

    // The reserved sectors: boot sector, FSInfo, their backups at 6, 7.
    let mut label11 = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        label11[i] = b;
    }
    let mut boot = vec![0u8; SECTOR as usize];
    boot[0..3].copy_from_slice(&[0xeb, 0x58, 0x90]);
    boot[3..11].copy_from_slice(b"MSWIN4.1");
    boot[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    boot[13] = SPC as u8;
    boot[14..16].copy_from_slice(&(RESERVED as u16).to_le_bytes());
    boot[16] = NFATS as u8;
    boot[21] = 0xf8;
    boot[24..26].copy_from_slice(&32u16.to_le_bytes());
    boot[26..28].copy_from_slice(&64u16.to_le_bytes());
    boot[28..32].copy_from_slice(&(PART_START as u32).to_le_bytes());
    boot[32..36].copy_from_slice(&(fs_sectors as u32).to_le_bytes());
    boot[36..40].copy_from_slice(&(fat_len as u32).to_le_bytes());
    boot[44..48].copy_from_slice(&2u32.to_le_bytes());
    boot[48..50].copy_from_slice(&1u16.to_le_bytes());
    boot[50..52].copy_from_slice(&6u16.to_le_bytes());
    boot[66] = 0x29;
    boot[67..71].copy_from_slice(&0x0102_0304u32.to_le_bytes());
    boot[71..82].copy_from_slice(&label11);
    boot[82..90].copy_from_slice(b"FAT32   ");
    boot[510] = 0x55;
    boot[511] = 0xaa;
    let mut fsinfo = vec![0u8; SECTOR as usize];
    fsinfo[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    fsinfo[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    fsinfo[488..492].copy_from_slice(&((clusters - used) as u32).to_le_bytes());
    let next_free = if used < clusters {
        next as u32
    } else {
        u32::MAX
    };
    fsinfo[492..496].copy_from_slice(&next_free.to_le_bytes());
    fsinfo[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    let mut reserved = vec![0u8; (RESERVED * SECTOR) as usize];
    for at in [0, 6] {
        let o = (at * SECTOR) as usize;
        reserved[o..o + 512].copy_from_slice(&boot);
        reserved[o + 512..o + 1024].copy_from_slice(&fsinfo);
    }

    // The filesystem's regions, from the partition's start.
    let mut regions = Vec::new();
    let mut at = 0u64;
    let mut push = |regions: &mut Vec<Region>, len: u64, piece: Piece| {
        if len > 0 {
            regions.push(Region {
                start: at,
                len,
                piece,
            });
            at += len;
        }
    };
    push(
        &mut regions,
        reserved.len() as u64,
        Piece::Bytes(Arc::new(reserved)),
    );
    let fat_bytes = Arc::new(fat_bytes);
    for _ in 0..NFATS {
        push(
            &mut regions,
            fat_bytes.len() as u64,
            Piece::Bytes(fat_bytes.clone()),
        );
        push(
            &mut regions,
            fat_len * SECTOR - fat_bytes.len() as u64,
            Piece::Zero,
        );
    }
    for d in 0..t.dirs.len() {
        let bytes = dir_content(&t, d, &label11);
        push(
            &mut regions,
            bytes.len() as u64,
            Piece::Bytes(Arc::new(bytes)),
        );
    }
    for (i, f) in t.files.iter().enumerate() {
        push(&mut regions, f.size, Piece::Part(i));
        push(
            &mut regions,
            f.size.div_ceil(CLUSTER) * CLUSTER - f.size,
            Piece::Zero,
        );
    }
    let end: u64 = regions.iter().map(|r| r.len).sum();
    push(&mut regions, fs_sectors * SECTOR - end, Piece::Zero);

    // The MBR around it.
    let part = PartSpec {
        mbr_id: 0x0c,
        ..PartSpec::new(fs_sectors * SECTOR)
    };
    let mut layout = ptable::layout(&[part], Kind::Mbr)?;
    if let Some(s) = size {
        if s > layout.size {
            layout.regions.push(Region {
                start: layout.size,
                len: s - layout.size,
                piece: Piece::Zero,
            });
            layout.size = s;
        }
    }
    layout.splice(0, regions);
    Ok((layout, t.files.into_iter().map(|f| f.path).collect()))
}

#[async_trait]
impl Plugin for FloppyPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(FloppyHandle {
            layout: self.layout.clone(),
            files: self.files.clone(),
        }))
    }
}

/// A connection to the floppy plugin.
pub struct FloppyHandle {
    layout: Arc<Layout>,
    files: Arc<Vec<PathBuf>>,
}

#[async_trait]
impl Handle for FloppyHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.layout.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            multi_conn: true,
            cache: Cache::Emulate,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.layout
                .read(buf, offset, |i, b, o| {
                    let p = &self.files[i];
                    let f = std::fs::File::open(p)?;
                    f.read_exact_at(b, o)
                        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
                })
                .map_err(|e| Error::io("pread", e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_times() {
        let mut taken = Default::default();
        assert_eq!(&short_name("hello.txt", &mut taken), b"HELLO~1 TXT");
        assert_eq!(&short_name("hello.txt", &mut taken), b"HELLO~2 TXT");
        assert_eq!(
            &short_name("A long file name.txt", &mut taken),
            b"ALONGF~1TXT"
        );
        assert_eq!(&short_name(".bashrc", &mut taken), b"BASHRC~1   ");
        let l = lfn_entries("A long file name.txt", b"ALONGF~1TXT");
        assert_eq!(l.len(), 2);
        assert_eq!(l[0][0], 0x42);
        assert_eq!(l[1][0], 0x01);
        assert_eq!(fat_time(0), (0x21, 0));
        // 2021-03-04 05:06:08 UTC.
        assert_eq!(
            fat_time(1_614_834_368),
            ((41 << 9) | (3 << 5) | 4, (5 << 11) | (6 << 5) | 4)
        );
    }

    #[test]
    fn sizes_as_upstream() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("a.txt"), b"hello\n").unwrap();
        std::fs::write(d.path().join("A long file name.txt"), b"x").unwrap();
        std::fs::write(d.path().join("sub/big.bin"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("a.txt", d.path().join("link")).unwrap();
        let t = || Tree::walk(d.path()).unwrap();
        assert_eq!(t().files.len(), 3, "the symlink is left out");
        // Upstream makes this a 2880-sector disk: 2048 + 832.
        let (l, files) = build(t(), "MYLABEL", None).unwrap();
        assert_eq!(l.size, 2880 * 512);
        assert_eq!(files.len(), 3);
        let (l, _) = build(t(), "MYLABEL", Some(10 << 20)).unwrap();
        assert_eq!(l.size, 10 << 20);
        assert!(build(t(), "X", Some(100 << 10)).is_err());
        let mut disk = vec![0u8; l.size as usize];
        l.read(&mut disk, 0, |i, b, o| {
            std::fs::File::open(&files[i])?.read_exact_at(b, o)
        })
        .unwrap();
        let p = ptable::parse_mbr(&disk).unwrap();
        assert_eq!((p[0].start, p[0].len, p[0].id), (2048, 18432, 0x0c));
        let boot = &disk[2048 * 512..2049 * 512];
        assert_eq!(&boot[82..90], b"FAT32   ");
        assert_eq!(&boot[71..82], b"MYLABEL    ");
    }
}
