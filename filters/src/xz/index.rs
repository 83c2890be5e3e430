//! The xz container, read from its end: stream footers, indexes and
//! headers, giving where every block lies in the compressed file and in
//! the uncompressed data; and the pieces of a synthetic single-block
//! stream (header, index, footer) in which one block is handed to
//! liblzma's stream decoder, so that liblzma checks the block header, the
//! block's check, and its sizes against the index.
//!
//! Layout (from the xz file format specification): a file is one or more
//! streams, each optionally followed by stream padding (a multiple of 4
//! NUL bytes). A stream is a 12-byte header (magic `FD 37 7A 58 5A 00`,
//! 2 bytes of flags, CRC32 of the flags), blocks, an index and a 12-byte
//! footer (CRC32, backward size, flags, magic `YZ`). The index lists, for
//! each block, its unpadded size (header + compressed data + check) and
//! its uncompressed size; a block occupies its unpadded size rounded up to
//! a multiple of 4.

use libnbd::{Error, Flags, Handle, Result};

/// The stream header magic.
pub const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0];
/// The stream footer magic.
pub const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Size of a stream header and of a stream footer.
pub const HEADER_SIZE: u64 = 12;
/// Largest variable-length integer (2^63 - 1).
const VLI_MAX: u64 = i64::MAX as u64;
/// Smallest unpadded size of a block (xz's `UNPADDED_SIZE_MIN`).
const UNPADDED_MIN: u64 = 5;
/// How much of the file's tail is read at once while skipping padding.
const TAIL_WINDOW: u64 = 4096;

/// CRC32 (IEEE, reflected), as xz uses for headers and indexes.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Round up to a multiple of 4.
pub fn round4(n: u64) -> u64 {
    (n + 3) & !3
}

/// One block of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Where its data starts in the uncompressed export.
    pub uoffset: u64,
    /// Its uncompressed size.
    pub usize: u64,
    /// Where its block header starts in the compressed file.
    pub coffset: u64,
    /// Its unpadded size (header, compressed data and check).
    pub unpadded: u64,
    /// The flags of the stream holding it (the check type).
    pub flags: [u8; 2],
}

impl Block {
    /// The bytes it occupies in the compressed file (with block padding).
    pub fn total(&self) -> u64 {
        round4(self.unpadded)
    }
    /// Its end in the uncompressed export.
    pub fn uend(&self) -> u64 {
        self.uoffset + self.usize
    }
}

/// Where everything is: the blocks of all streams, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzIndex {
    /// Every block with its data, in order (empty blocks are dropped).
    pub blocks: Vec<Block>,
    /// The uncompressed size of the whole file.
    pub size: u64,
    /// How many streams the file has.
    pub streams: usize,
    /// How many blocks the index lists (empty ones included).
    pub nblocks: usize,
}

impl XzIndex {
    /// The position in `blocks` of the block holding uncompressed `offset`
    /// (which must be below `size`).
    pub fn find(&self, offset: u64) -> usize {
        self.blocks.partition_point(|b| b.uend() <= offset)
    }
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::eio(format!("xz: {msg}"))
}

/// Decode a variable-length integer at `*pos`.
pub fn read_vli(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if i > 0 && b == 0 {
            return None; // not the shortest encoding
        }
        v |= ((b & 0x7F) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return (v <= VLI_MAX).then_some(v);
        }
    }
    None
}

/// Append a variable-length integer.
pub fn write_vli(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn check_flags(flags: [u8; 2]) -> Result<()> {
    if flags[0] != 0 || flags[1] & 0xF0 != 0 {
        return Err(corrupt(format!(
            "unsupported stream flags {:02x}{:02x} (a newer xz format?)",
            flags[0], flags[1]
        )));
    }
    Ok(())
}

/// Parse a stream header: its flags.
pub fn parse_header(h: &[u8]) -> Result<[u8; 2]> {
    if h.len() != 12 || h[..6] != HEADER_MAGIC {
        return Err(corrupt(
            "stream header magic not found: not an xz file, or corrupt",
        ));
    }
    let crc = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if crc32(&h[6..8]) != crc {
        return Err(corrupt("stream header CRC32 mismatch: corrupt file"));
    }
    let flags = [h[6], h[7]];
    check_flags(flags)?;
    Ok(flags)
}

/// Parse a stream footer: its flags and the size of the index.
pub fn parse_footer(f: &[u8]) -> Result<([u8; 2], u64)> {
    if f.len() != 12 || f[10..12] != FOOTER_MAGIC {
        return Err(corrupt(
            "stream footer magic not found: not an xz file, truncated, or corrupt",
        ));
    }
    let crc = u32::from_le_bytes(f[0..4].try_into().unwrap());
    if crc32(&f[4..10]) != crc {
        return Err(corrupt("stream footer CRC32 mismatch: corrupt file"));
    }
    let flags = [f[8], f[9]];
    check_flags(flags)?;
    let backward = (u32::from_le_bytes(f[4..8].try_into().unwrap()) as u64 + 1) * 4;
    Ok((flags, backward))
}

/// Parse an index: the (unpadded, uncompressed) sizes of its blocks.
pub fn parse_index(buf: &[u8]) -> Result<Vec<(u64, u64)>> {
    let bad = |what: &str| corrupt(format!("corrupt index: {what}"));
    if buf.len() < 8 || !buf.len().is_multiple_of(4) {
        return Err(bad("bad size"));
    }
    if buf[0] != 0 {
        return Err(bad("no index indicator"));
    }
    let body = buf.len() - 4;
    let crc = u32::from_le_bytes(buf[body..].try_into().unwrap());
    if crc32(&buf[..body]) != crc {
        return Err(bad("CRC32 mismatch"));
    }
    let mut pos = 1;
    let count = read_vli(&buf[..body], &mut pos).ok_or_else(|| bad("bad record count"))?;
    if count > (body as u64) / 2 {
        return Err(bad("more records than fit"));
    }
    let mut records = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let unpadded = read_vli(&buf[..body], &mut pos).ok_or_else(|| bad("bad record"))?;
        let usize = read_vli(&buf[..body], &mut pos).ok_or_else(|| bad("bad record"))?;
        if !(UNPADDED_MIN..=VLI_MAX & !3).contains(&unpadded) {
            return Err(bad("impossible block size"));
        }
        records.push((unpadded, usize));
    }
    if round4(pos as u64) != body as u64 || buf[pos..body].iter().any(|&b| b != 0) {
        return Err(bad("bad padding or trailing bytes"));
    }
    Ok(records)
}

/// An index with one record, for the synthetic stream.
fn one_record_index(unpadded: u64, usize: u64) -> Vec<u8> {
    let mut v = vec![0u8];
    write_vli(&mut v, 1);
    write_vli(&mut v, unpadded);
    write_vli(&mut v, usize);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    let crc = crc32(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// A stream header with these flags.
pub fn stream_header(flags: [u8; 2]) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..6].copy_from_slice(&HEADER_MAGIC);
    h[6..8].copy_from_slice(&flags);
    let crc = crc32(&flags);
    h[8..12].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A stream footer for an index of `index_len` bytes.
pub fn stream_footer(flags: [u8; 2], index_len: usize) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[4..8].copy_from_slice(&((index_len / 4 - 1) as u32).to_le_bytes());
    f[8..10].copy_from_slice(&flags);
    let crc = crc32(&f[4..10]);
    f[0..4].copy_from_slice(&crc.to_le_bytes());
    f[10..12].copy_from_slice(&FOOTER_MAGIC);
    f
}

/// What follows a block in its synthetic single-block stream: an index
/// listing just that block, and the stream footer.
pub fn synthetic_tail(b: &Block) -> Vec<u8> {
    let mut v = one_record_index(b.unpadded, b.usize);
    let f = stream_footer(b.flags, v.len());
    v.extend_from_slice(&f);
    v
}

/// The largest stream index taken (its footer may claim up to 16 GiB).
const MAX_INDEX: u64 = 256 << 20;

/// A stream found: where it starts, its flags, its index records.
type Stream = (u64, [u8; 2], Vec<(u64, u64)>);

/// Read `len` bytes at `offset` from the layer below.
async fn read(next: &dyn Handle, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    next.pread(&mut v, offset, Flags::NONE).await?;
    Ok(v)
}

/// Find every block of the xz file served by `next` (of `size` bytes),
/// reading its streams backwards from the end: footer, index, header.
pub async fn parse(next: &dyn Handle, size: u64) -> Result<XzIndex> {
    if size < 2 * HEADER_SIZE {
        return Err(corrupt(format!(
            "the file is too small ({size} bytes) to be an xz file"
        )));
    }
    let mut end = size;
    // (start, flags, records) of each stream, last first.
    let mut streams: Vec<Stream> = Vec::new();
    while end > 0 {
        // Skip stream padding: NUL bytes in groups of 4.
        if !end.is_multiple_of(4) {
            return Err(corrupt(
                "the file size (or a stream's end) is not a multiple of 4: truncated, or not an xz file",
            ));
        }
        loop {
            let start = end.saturating_sub(TAIL_WINDOW);
            let tail = read(next, start, end - start).await?;
            let mut n = tail.len();
            while n >= 4 && tail[n - 4..n] == [0; 4] {
                n -= 4;
            }
            end = start + n as u64;
            if n >= 4 || start == 0 {
                break;
            }
        }
        if end < 2 * HEADER_SIZE {
            return Err(corrupt("no stream before the padding: not an xz file"));
        }
        let footer = read(next, end - HEADER_SIZE, HEADER_SIZE).await?;
        let (flags, index_len) = parse_footer(&footer)?;
        if index_len > MAX_INDEX {
            // Read whole, and each record kept as 16 bytes: a crafted
            // (sparse) file must not make us allocate gigabytes.
            return Err(corrupt(format!(
                "the index is {index_len} bytes, more than the {} MiB we take \
                 (10 TB in 1 MiB blocks needs about 100 MiB): corrupt file?",
                MAX_INDEX >> 20
            )));
        }
        let index_start = (end - HEADER_SIZE)
            .checked_sub(index_len)
            .filter(|s| *s >= HEADER_SIZE)
            .ok_or_else(|| corrupt("the index size in the footer is impossible: corrupt file"))?;
        let records = parse_index(&read(next, index_start, index_len).await?)?;
        let blocks: u64 = records
            .iter()
            .try_fold(0u64, |a, (u, _)| a.checked_add(round4(*u)))
            .ok_or_else(|| corrupt("block sizes overflow"))?;
        let start = index_start
            .checked_sub(blocks)
            .and_then(|s| s.checked_sub(HEADER_SIZE))
            .ok_or_else(|| {
                corrupt("the index lists more data than the file holds: corrupt or truncated file")
            })?;
        let hflags = parse_header(&read(next, start, HEADER_SIZE).await?)?;
        if hflags != flags {
            return Err(corrupt(
                "stream header and footer flags differ: corrupt file",
            ));
        }
        streams.push((start, flags, records));
        end = start;
    }
    streams.reverse();
    let mut index = XzIndex {
        blocks: Vec::new(),
        size: 0,
        streams: streams.len(),
        nblocks: 0,
    };
    for (start, flags, records) in streams {
        let mut coffset = start + HEADER_SIZE;
        for (unpadded, usize) in records {
            index.nblocks += 1;
            if usize > 0 {
                index.blocks.push(Block {
                    uoffset: index.size,
                    usize,
                    coffset,
                    unpadded,
                    flags,
                });
            }
            index.size = index
                .size
                .checked_add(usize)
                .filter(|s| *s <= VLI_MAX)
                .ok_or_else(|| corrupt("the uncompressed size is too large"))?;
            coffset += round4(unpadded);
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn vli_roundtrip_and_rejects() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, VLI_MAX] {
            let mut b = Vec::new();
            write_vli(&mut b, v);
            let mut p = 0;
            assert_eq!(read_vli(&b, &mut p), Some(v));
            assert_eq!(p, b.len());
        }
        // Not minimal, truncated, too long.
        assert_eq!(read_vli(&[0x80, 0x00], &mut 0), None);
        assert_eq!(read_vli(&[0x80], &mut 0), None);
        assert_eq!(read_vli(&[0xFF; 10], &mut 0), None);
    }

    #[test]
    fn header_footer_roundtrip() {
        let flags = [0, 4];
        assert_eq!(parse_header(&stream_header(flags)).unwrap(), flags);
        let f = stream_footer(flags, 12);
        assert_eq!(parse_footer(&f).unwrap(), (flags, 12));
        let mut bad = f;
        bad[5] ^= 1;
        assert!(parse_footer(&bad).is_err());
        let mut bad = stream_header(flags);
        bad[0] = 0;
        assert!(parse_header(&bad).is_err());
        assert!(parse_header(&stream_header([1, 0])).is_err());
    }

    #[test]
    fn index_parse() {
        let tail = synthetic_tail(&Block {
            uoffset: 0,
            usize: 1 << 20,
            coffset: 12,
            unpadded: 4321,
            flags: [0, 1],
        });
        let index = &tail[..tail.len() - 12];
        assert_eq!(parse_index(index).unwrap(), vec![(4321, 1 << 20)]);
        assert_eq!(
            parse_footer(&tail[tail.len() - 12..]).unwrap(),
            ([0, 1], index.len() as u64)
        );
        let mut bad = index.to_vec();
        bad[3] ^= 0x40;
        assert!(parse_index(&bad).is_err());
        let mut bad = index.to_vec();
        bad[0] = 1;
        assert!(parse_index(&bad).is_err());
        // An empty index.
        let mut e = vec![0u8, 0, 0, 0];
        let c = crc32(&e);
        e.extend_from_slice(&c.to_le_bytes());
        assert_eq!(parse_index(&e).unwrap(), vec![]);
    }

    #[test]
    fn find_blocks() {
        let b = |uoffset, usize| Block {
            uoffset,
            usize,
            coffset: 0,
            unpadded: 8,
            flags: [0, 0],
        };
        let ix = XzIndex {
            blocks: vec![b(0, 10), b(10, 5), b(15, 100)],
            size: 115,
            streams: 1,
            nblocks: 3,
        };
        assert_eq!(ix.find(0), 0);
        assert_eq!(ix.find(9), 0);
        assert_eq!(ix.find(10), 1);
        assert_eq!(ix.find(14), 1);
        assert_eq!(ix.find(15), 2);
        assert_eq!(ix.find(114), 2);
    }
}
