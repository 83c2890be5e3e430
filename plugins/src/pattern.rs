//! # pattern: a fixed test pattern
//!
//! Serves a read-only disk where every 8-byte aligned word holds its own
//! offset as a 64-bit big-endian integer:
//!
//! ```text
//! offset   data
//!   0000:  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 08
//!   0010:  00 00 00 00 00 00 00 10  00 00 00 00 00 00 00 18
//! ```
//!
//! If the size is not a multiple of 8 the last word is truncated. It is
//! the source for copying benchmarks, so reads are a tight loop over
//! words.
//!
//! ```text
//! nbdkit pattern 1G
//! nbdkit pattern 9223372036854775807
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE` (required): the virtual size, in nbdkit's size syntax,
//!   up to 2^63-1 bytes.
//!
//! ## Behaviour
//!
//! Read-only; no flush, trim or zero; extents are not reported (the
//! server reports everything as data); multi-conn is safe and cache is
//! a no-op.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Flags, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

/// The registry entry of the pattern plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "pattern",
    help: "size=<SIZE>  (required) Size of the backing disk",
    magic: Some("size"),
    create,
};

/// The configured pattern plugin.
pub struct PatternPlugin {
    size: u64,
}

/// Build the pattern plugin from `size=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let size = params.take_size("size")?;
    let size = size.ok_or_else(|| ConfigError::new("pattern: size parameter is required"))?;
    Ok(Arc::new(PatternPlugin { size }))
}

#[async_trait]
impl Plugin for PatternPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(PatternHandle { size: self.size }))
    }
}

/// A connection to the pattern plugin.
pub struct PatternHandle {
    size: u64,
}

/// The pattern's byte at `offset`.
fn byte_at(offset: u64) -> u8 {
    (offset & !7).to_be_bytes()[(offset & 7) as usize]
}

/// Fill `buf` with the pattern as it appears at `offset`.
pub fn fill(buf: &mut [u8], offset: u64) {
    let head = (offset.wrapping_neg() % 8) as usize;
    let head = head.min(buf.len());
    let (first, rest) = buf.split_at_mut(head);
    for (i, b) in first.iter_mut().enumerate() {
        *b = byte_at(offset + i as u64);
    }
    let mut word = offset + head as u64;
    let mut words = rest.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word.to_be_bytes());
        word = word.wrapping_add(8);
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b = byte_at(word + i as u64);
    }
}

#[async_trait]
impl Handle for PatternHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            multi_conn: true,
            cache: Cache::Native,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        fill(buf, offset);
        Ok(())
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow(offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| byte_at(offset + i)).collect()
    }

    #[tokio::test]
    async fn pattern_bytes() {
        let mut p = Params::parse(&["1M"], Some("size")).unwrap();
        let h = ENTRY
            .configure(&mut p)
            .unwrap()
            .open(&OpenContext::default())
            .await
            .unwrap();
        assert_eq!(h.size().unwrap(), 1 << 20);
        assert!(!h.caps().unwrap().write);
        assert!(!h.caps().unwrap().flush && !h.caps().unwrap().trim && !h.caps().unwrap().zero);
        assert!(!h.caps().unwrap().extents);
        assert!(h.caps().unwrap().multi_conn);
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
        // As `nbdsh -c 'print(h.pread(32, 8))'` shows upstream.
        let mut b = [0u8; 32];
        h.pread(&mut b, 8, Flags::NONE).await.unwrap();
        let mut want = Vec::new();
        for w in [8u64, 16, 24, 32] {
            want.extend_from_slice(&w.to_be_bytes());
        }
        assert_eq!(b.to_vec(), want);
        assert!(h.pwrite(b"x", 0, Flags::NONE).await.is_err());
    }

    #[test]
    fn unaligned_reads() {
        for off in [
            0u64,
            1,
            5,
            7,
            8,
            13,
            0x1234_5678_9abc_def1,
            (i64::MAX as u64) - 20,
        ] {
            for len in [0usize, 1, 3, 8, 9, 17, 64, 100] {
                let mut b = vec![0xAAu8; len];
                fill(&mut b, off);
                assert_eq!(b, slow(off, len), "offset {off} len {len}");
            }
        }
        let mut b = [0u8; 8];
        fill(&mut b, 0x28);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0x28]);
    }

    #[test]
    fn size_required() {
        let mut p = Params::parse::<&str>(&[], Some("size")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
    }
}
