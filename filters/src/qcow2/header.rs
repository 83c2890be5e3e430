//! The qcow2 header and its extensions: parsing what an image says, and
//! the header of a fresh image.

use libnbd::{Error, Result};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;

/// Compression of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// What the header of an image says.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    /// A bitmaps extension is present (valid or not).
    pub bitmaps_ext: bool,
    /// Its bitmap directory: offset, size in bytes, number of bitmaps.
    pub bitmap_dir: (u64, u64, u32),
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::eio(format!("qcow2: {msg}"))
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Extended L2 entries (subclusters)?
    pub fn ext_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Why writes cannot be done, if they cannot, as far as the header
    /// tells (a dirty image is repaired when opened for writing, after
    /// which the bit is clear).
    pub fn write_refusal(&self) -> Option<String> {
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Some("the image is marked corrupt (run qemu-img check -r all)".into());
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Some("the image is marked dirty (run qemu-img check -r all)".into());
        }
        None
    }

    /// The cluster size an image declares, from its first 512 bytes
    /// (to know how much to read for [`Header::parse`]).
    pub fn peek_cluster_bits(b: &[u8]) -> Result<u32> {
        if b.len() < 72 || &b[0..4] != MAGIC {
            return Err(bad("not a qcow2 image (bad magic)"));
        }
        let bits = be32(b, 20);
        if !(9..=21).contains(&bits) {
            return Err(bad(format!(
                "unsupported cluster size 2^{bits} (must be 512 bytes to 2 MiB)"
            )));
        }
        Ok(bits)
    }

    /// Parse the header from the image's first cluster (or as much of
    /// it as the file holds).
    pub fn parse(b: &[u8]) -> Result<Header> {
        let cluster_bits = Self::peek_cluster_bits(b)?;
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!(
                "unsupported version {version} (only 2 and 3 are supported)"
            )));
        }
        let crypt = be32(b, 32);
        if crypt != 0 {
            return Err(bad(format!(
                "encrypted images are not supported (crypt_method {crypt})"
            )));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(b, 24),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            bitmaps_ext: false,
            bitmap_dir: (0, 0, 0),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
        };
        let mut names: Vec<(u8, u8, String)> = Vec::new();
        if version == 3 {
            if b.len() < 104 {
                return Err(bad("truncated version 3 header"));
            }
            h.incompatible = be64(b, 72);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || h.header_length as usize > b.len() {
                return Err(bad(format!("bad header length {}", h.header_length)));
            }
            if h.refcount_order > 6 {
                return Err(bad(format!("bad refcount order {}", h.refcount_order)));
            }
            if h.header_length > 104 {
                match b[104] {
                    0 => {}
                    1 => h.compression = Compression::Zstd,
                    t => return Err(bad(format!("unknown compression type {t}"))),
                }
            }
            if h.incompatible & INCOMPAT_COMPRESSION != 0 && h.compression == Compression::Zlib {
                return Err(bad("compression type bit set with compression type zlib"));
            }
        }
        // Header extensions.
        let mut at = h.header_length as usize;
        while at + 8 <= b.len() {
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            let data = at + 8;
            if kind == EXT_END {
                break;
            }
            if data + len > b.len() {
                return Err(bad("header extension beyond the first cluster"));
            }
            let text = || String::from_utf8_lossy(&b[data..data + len]).into_owned();
            match kind {
                EXT_BACKING_FORMAT => h.backing_format = Some(text()),
                EXT_BITMAPS if len >= 24 => {
                    h.bitmaps_ext = true;
                    h.bitmap_dir = (be64(b, data + 16), be64(b, data + 8), be32(b, data));
                }
                EXT_BITMAPS => h.bitmaps_ext = true,
                EXT_DATA_FILE => {
                    return Err(bad(format!(
                        "images with an external data file ({}) are not supported",
                        text()
                    )))
                }
                EXT_FEATURE_NAMES => {
                    for e in b[data..data + len].chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..])
                            .trim_end_matches('\0')
                            .to_string();
                        names.push((e[0], e[1], name));
                    }
                }
                _ => {}
            }
            at = data + len.div_ceil(8) * 8;
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(bad(
                "images with an external data file are not supported (incompatible feature \
                 bit 2, data-file)",
            ));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|i| unknown & (1 << i) != 0)
                .map(|i| {
                    names
                        .iter()
                        .find(|n| n.0 == 0 && n.1 == i as u8)
                        .map_or(format!("bit {i}"), |n| n.2.clone())
                })
                .collect();
            return Err(bad(format!(
                "unsupported incompatible features: {}",
                bits.join(", ")
            )));
        }
        if h.ext_l2() && cluster_bits < 14 {
            return Err(bad("extended L2 entries need clusters of at least 16 KiB"));
        }
        let cs = h.cluster_size();
        if !h.l1_table_offset.is_multiple_of(cs) || !h.refcount_table_offset.is_multiple_of(cs) {
            return Err(bad("L1 or refcount table not aligned to a cluster"));
        }
        // The L1 table must map the whole disk.
        let entry = if h.ext_l2() { 16 } else { 8 };
        let per_l2 = cs / entry;
        let need = h.size.div_ceil(cs).div_ceil(per_l2);
        if (h.l1_size as u64) < need {
            return Err(bad(format!(
                "L1 table too small ({} entries for {} needed)",
                h.l1_size, need
            )));
        }
        if h.l1_size > (32 << 20) / 8 {
            return Err(bad("L1 table larger than 32 MiB"));
        }
        let bfo = be64(b, 8) as usize;
        let bfs = be32(b, 16) as usize;
        if bfo != 0 {
            if bfs > 1023 || bfo + bfs > b.len() {
                return Err(bad("bad backing file name"));
            }
            h.backing_file = Some(String::from_utf8_lossy(&b[bfo..bfo + bfs]).into_owned());
        }
        Ok(h)
    }
}

/// The metadata of a fresh version 3 image of `size` bytes with
/// 2^`bits` clusters and 16-bit refcounts, and the file's length: cluster
/// 0 the header, then the refcount table, the refcount blocks, the L1
/// table and, with `prealloc`, every L2 table and a host cluster for
/// every guest cluster (left sparse).
pub fn fresh_image(
    size: u64,
    bits: u32,
    backing: Option<(&str, &str)>,
    prealloc: bool,
) -> Result<(Vec<u8>, u64)> {
    let cs = 1u64 << bits;
    let per_l2 = cs / 8;
    let data = size.div_ceil(cs);
    let l1_entries = data.div_ceil(per_l2).max(1);
    if l1_entries > (32 << 20) / 8 {
        return Err(Error::einval("qcow2: size too large for this cluster size"));
    }
    let l1c = (l1_entries * 8).div_ceil(cs);
    let (l2n, datan) = if prealloc {
        (data.div_ceil(per_l2), data)
    } else {
        (0, 0)
    };
    let per_block = cs / 2;
    let (mut rtc, mut rbn) = (1u64, 1u64);
    let total = loop {
        let total = 1 + rtc + rbn + l1c + l2n + datan;
        let need_rb = total.div_ceil(per_block);
        let need_rtc = (need_rb * 8).div_ceil(cs);
        if need_rb <= rbn && need_rtc <= rtc {
            break total;
        }
        rbn = rbn.max(need_rb);
        rtc = rtc.max(need_rtc);
    };
    if rtc * cs > 8 << 20 {
        return Err(Error::einval("qcow2: size too large"));
    }
    let rt_at = cs;
    let rb_at = rt_at + rtc * cs;
    let l1_at = rb_at + rbn * cs;
    let l2_at = l1_at + l1c * cs;
    let data_at = l2_at + l2n * cs;
    let meta_end = data_at;
    let mut b = vec![0u8; meta_end as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: u64, v: u64| {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
    };
    b[0..4].copy_from_slice(MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, bits);
    put64(&mut b, 24, size);
    put32(&mut b, 36, l1_entries as u32);
    put64(&mut b, 40, l1_at);
    put64(&mut b, 48, rt_at);
    put32(&mut b, 56, rtc as u32);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    let mut at = 112usize;
    if let Some((_, fmt)) = backing {
        put32(&mut b, at, EXT_BACKING_FORMAT);
        put32(&mut b, at + 4, fmt.len() as u32);
        b[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
        at += 8 + fmt.len().div_ceil(8) * 8;
    }
    // The end of the extensions (8 zero bytes), then the backing file name.
    at += 8;
    if let Some((file, _)) = backing {
        if file.len() > 1023 || at + file.len() > cs as usize {
            return Err(Error::einval("qcow2: backing file name too long"));
        }
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, file.len() as u32);
        b[at..at + file.len()].copy_from_slice(file.as_bytes());
    }
    for i in 0..rbn {
        put64(&mut b, rt_at + 8 * i, rb_at + i * cs);
    }
    for c in 0..total {
        let at = (rb_at + 2 * c) as usize;
        b[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    const COPIED: u64 = 1 << 63;
    for i in 0..l2n {
        put64(&mut b, l1_at + 8 * i, (l2_at + i * cs) | COPIED);
    }
    for g in 0..datan {
        put64(&mut b, l2_at + 8 * g, (data_at + g * cs) | COPIED);
    }
    Ok((b, total * cs))
}
