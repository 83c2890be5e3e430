//! # swab: swap the byte order of every 2, 4 or 8 byte word
//!
//! Reads and writes go through a byte swap of each word of `swab-bits`:
//! with the default 16, bytes 0 1 2 3 of the layer below are 1 0 3 2 to
//! the client. One use is reading disks formatted on an Atari Falcon,
//! whose IDE controller is wired in reverse; with `swab-bits=64` the
//! pattern plugin becomes little-endian.
//!
//! ```text
//! nbdkit --filter=swab file disk.img
//! nbdkit --filter=swab pattern 1M swab-bits=64
//! ```
//!
//! ## Parameters
//!
//! - `swab-bits=8|16|32|64`: the word size to swap (default 16); 8 turns
//!   the filter off.
//!
//! ## Behaviour
//!
//! The export size is rounded down to a whole number of words (the
//! truncate filter can round it up first). Every request (read, write,
//! trim, zero, extents, cache) must be aligned to the word size or fails
//! with EINVAL; the block size advertised says so (a minimum of the word
//! size), and the blocksize filter placed before this one gives clients
//! byte access by read-modify-write.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    BlockSize, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "swab",
    help: "swab-bits=8|16|32|64       Size of byte swap (default 16).",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let word = match p.take("swab-bits").as_deref().map(str::trim) {
        None | Some("16") => 2,
        Some("8") => 1,
        Some("32") => 4,
        Some("64") => 8,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "swab-bits must be 8, 16, 32 or 64, not '{v}'"
            )))
        }
    };
    Ok(Arc::new(Swab { word }))
}

struct Swab {
    /// Bytes in a swapped word: 1, 2, 4 or 8.
    word: usize,
}

#[async_trait]
impl Filter for Swab {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(SwabHandle {
            next: next.open(ctx).await?,
            word: self.word,
        }))
    }
}

struct SwabHandle {
    next: Box<dyn Handle>,
    word: usize,
}

/// Reverse the bytes of each `word`-byte word of `buf` (whose length is
/// a multiple of `word`).
fn swap(buf: &mut [u8], word: usize) {
    match word {
        2 => buf.chunks_exact_mut(2).for_each(|c| c.swap(0, 1)),
        4 => buf.chunks_exact_mut(4).for_each(|c| {
            let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            c.copy_from_slice(&v.swap_bytes().to_ne_bytes());
        }),
        8 => buf.chunks_exact_mut(8).for_each(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            c.copy_from_slice(&u64::from_ne_bytes(b).swap_bytes().to_ne_bytes());
        }),
        _ => {}
    }
}

impl SwabHandle {
    fn aligned(&self, count: u64, offset: u64) -> Result<()> {
        let w = self.word as u64;
        if !count.is_multiple_of(w) || !offset.is_multiple_of(w) {
            return Err(Error::einval(
                "swab: requests to this filter must be aligned",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for SwabHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        let size = self.next.size()?;
        Ok(size - size % self.word as u64)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let w = self.word as u32;
        // Even with swab-bits=8 (as upstream) a block size is advertised.
        let b = self.next.block_size()?.unwrap_or(BlockSize {
            minimum: 1,
            preferred: 512,
            maximum: u32::MAX,
        });
        let minimum = b.minimum.max(w);
        let preferred = b.preferred.max(minimum);
        Ok(Some(BlockSize {
            minimum,
            preferred,
            maximum: b.maximum.max(preferred),
        }))
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.aligned(buf.len() as u64, offset)?;
        self.next.pread(buf, offset, flags).await?;
        swap(buf, self.word);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.aligned(buf.len() as u64, offset)?;
        if self.word == 1 {
            return self.next.pwrite(buf, offset, flags).await;
        }
        let mut swapped = buf.to_vec();
        swap(&mut swapped, self.word);
        self.next.pwrite(&swapped, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.aligned(count, offset)?;
        self.next.trim(count, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.aligned(count, offset)?;
        self.next.zero(count, offset, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.aligned(count, offset)?;
        self.next.extents(count, offset, flags, ext).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.aligned(count, offset)?;
        self.next.cache(count, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::protocol::errno;

    fn open_with(bits: &str, data: Vec<u8>) -> (libnbd::Stack, Arc<Mem>) {
        let mem = Mem::with(data);
        let word = format!("swab-bits={bits}");
        (
            stack(vec![create(&mut params(&[&word])).unwrap()], &mem),
            mem,
        )
    }

    #[tokio::test]
    async fn swab_swaps_each_word() {
        let data: Vec<u8> = (0..17).collect();
        for (bits, want) in [
            ("8", (0..8).collect::<Vec<u8>>()),
            ("16", vec![1, 0, 3, 2, 5, 4, 7, 6]),
            ("32", vec![3, 2, 1, 0, 7, 6, 5, 4]),
            ("64", vec![7, 6, 5, 4, 3, 2, 1, 0]),
        ] {
            let (s, _) = open_with(bits, data.clone());
            let h = s.open(&ctx(1)).await.unwrap();
            assert_eq!(read(&*h, 0, 8).await, want, "bits {bits}");
            let w: u64 = bits.parse::<u64>().unwrap() / 8;
            assert_eq!(h.size().unwrap(), 17 - 17 % w);
        }
    }

    #[tokio::test]
    async fn swab_writes_swapped_and_refuses_unaligned() {
        let (s, mem) = open_with("32", vec![0; 64]);
        let h = s.open(&ctx(1)).await.unwrap();
        h.pwrite(&[1, 2, 3, 4], 4, Flags::NONE).await.unwrap();
        assert_eq!(
            mem.data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[4..8],
            [4, 3, 2, 1]
        );
        assert_eq!(read(&*h, 4, 4).await, vec![1, 2, 3, 4]);
        mem.take_calls();
        for e in [
            h.pwrite(&[1, 2], 4, Flags::NONE).await.unwrap_err(),
            h.pread(&mut [0; 4], 2, Flags::NONE).await.unwrap_err(),
            h.zero(3, 0, Flags::NONE).await.unwrap_err(),
            h.trim(4, 1, Flags::NONE).await.unwrap_err(),
            h.cache(5, 0, Flags::NONE).await.unwrap_err(),
            try_extents(&*h, 2, 4).await.unwrap_err(),
        ] {
            assert_eq!(e.errno, errno::EINVAL);
        }
        assert!(mem.take_calls().is_empty());
        h.zero(8, 8, Flags::NONE).await.unwrap();
        assert_eq!(
            h.block_size().unwrap(),
            Some(BlockSize {
                minimum: 4,
                preferred: 512,
                maximum: u32::MAX
            })
        );
        assert!(create(&mut params(&["swab-bits=24"])).is_err());
    }
}
