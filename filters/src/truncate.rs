//! # truncate: change the size of the layer below
//!
//! It can make the export smaller (truncate it), larger (the added bytes
//! read as zeroes and report as a hole in extents), or round its size up
//! or down to a multiple of a power of 2. Writes past the end of the
//! layer below are allowed only if they write zeroes (anything else fails
//! with ENOSPC); trims and zeroes there do nothing.
//!
//! A common use is for clients that cannot handle sizes which are not a
//! multiple of 512: `round-up=512`.
//!
//! ```text
//! nbdkit --filter=truncate file disk.img round-up=4k
//! nbdkit --filter=blocksize --filter=truncate file disk.img minblock=4k round-up=4k
//! ```
//!
//! ## Parameters
//!
//! All optional, applied in this order.
//!
//! - `truncate=SIZE`: the new size, smaller or larger than the plugin's.
//! - `round-up=N`: round the size up to a multiple of `N` (a power of 2).
//! - `round-down=N`: round the size down to a multiple of `N` (a power
//!   of 2).

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "truncate",
    help: "\
truncate=<SIZE>                The new size.
round-up=<N>                   Round up to next multiple of N.
round-down=<N>                 Round down to multiple of N.",
    create,
};

fn power_of_2(p: &mut Params, key: &str) -> ConfigResult<Option<u64>> {
    match p.take_size(key)? {
        None => Ok(None),
        Some(0) => Err(ConfigError::new(format!(
            "if set, the {key} parameter must be > 0"
        ))),
        Some(n) if !n.is_power_of_two() => Err(ConfigError::new(format!(
            "the {key} parameter must be a power of 2"
        ))),
        Some(n) => Ok(Some(n)),
    }
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let truncate = p.take_size("truncate")?;
    let round_up = power_of_2(p, "round-up")?;
    let round_down = power_of_2(p, "round-down")?;
    Ok(Arc::new(TruncateFilter {
        truncate,
        round_up,
        round_down,
    }))
}

struct TruncateFilter {
    truncate: Option<u64>,
    round_up: Option<u64>,
    round_down: Option<u64>,
}

impl TruncateFilter {
    /// The size the client sees for a plugin of `real` bytes.
    fn new_size(&self, real: u64) -> Result<u64> {
        let mut size = self.truncate.unwrap_or(real);
        if let Some(n) = self.round_up {
            size = size
                .checked_add(n - 1)
                .map(|s| s & !(n - 1))
                .filter(|s| *s <= i64::MAX as u64)
                .ok_or_else(|| {
                    Error::einval(format!("truncate: rounding {size} up to {n} overflows"))
                })?;
        }
        if let Some(n) = self.round_down {
            size &= !(n - 1);
        }
        Ok(size)
    }
}

#[async_trait]
impl Filter for TruncateFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h = next.open(ctx).await?;
        let real = h.size()?;
        let size = self.new_size(real)?;
        Ok(Box::new(TruncateHandle {
            next: h,
            real,
            size,
        }))
    }
}

struct TruncateHandle {
    next: Box<dyn Handle>,
    /// Size of the layer below.
    real: u64,
    /// Size we serve.
    size: u64,
}

impl TruncateHandle {
    /// How many of `count` bytes from `offset` lie within the layer below.
    fn below(&self, offset: u64, count: u64) -> u64 {
        if offset >= self.real {
            0
        } else {
            count.min(self.real - offset)
        }
    }
}

#[async_trait]
impl Handle for TruncateHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let n = self.below(offset, buf.len() as u64) as usize;
        if n > 0 {
            self.next.pread(&mut buf[..n], offset, flags).await?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let n = self.below(offset, buf.len() as u64) as usize;
        if buf[n..].iter().any(|b| *b != 0) {
            return Err(Error::enospc(
                "truncate: write beyond end of underlying device",
            ));
        }
        if n > 0 {
            self.next.pwrite(&buf[..n], offset, flags).await?;
        }
        Ok(())
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.below(offset, count) {
            0 => Ok(()),
            n => self.next.trim(n, offset, flags).await,
        }
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.below(offset, count) {
            0 => Ok(()),
            n => self.next.zero(n, offset, flags).await,
        }
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.below(offset, count) {
            0 => Ok(()),
            n => self.next.cache(n, offset, flags).await,
        }
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let n = self.below(offset, count);
        if n > 0 {
            let mut below = Extents::new(offset, offset + n);
            self.next.extents(n, offset, flags, &mut below).await?;
            for e in below.list() {
                ext.add(e.offset, e.length, e.flags)?;
            }
            if !below.is_full() {
                // A short answer from below: the client asks again.
                return Ok(());
            }
        }
        if n < count {
            ext.add(offset + n, count - n, HOLE_ZERO)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut params(words)).unwrap()
    }

    async fn size_of(real: usize, words: &[&str]) -> u64 {
        let s = stack(vec![filter(words)], &Mem::new(real));
        s.open(&ctx(1)).await.unwrap().size().unwrap()
    }

    #[tokio::test]
    async fn truncate_sizes() {
        assert_eq!(size_of(1000, &[]).await, 1000);
        assert_eq!(size_of(1000, &["truncate=3000"]).await, 3000);
        assert_eq!(size_of(1000, &["truncate=300"]).await, 300);
        assert_eq!(size_of(1000, &["round-up=512"]).await, 1024);
        assert_eq!(size_of(1024, &["round-up=512"]).await, 1024);
        assert_eq!(size_of(1000, &["round-down=512"]).await, 512);
        assert_eq!(size_of(1000, &["round-down=1k"]).await, 0);
        assert_eq!(size_of(1000, &["truncate=3000", "round-up=1k"]).await, 3072);
        assert_eq!(
            size_of(1000, &["round-up=512", "round-down=256"]).await,
            1024
        );
    }

    #[test]
    fn truncate_bad_parameters() {
        for w in [
            "round-up=1000",
            "round-down=3",
            "round-down=0",
            "round-up=0",
            "truncate=x",
        ] {
            assert!(create(&mut params(&[w])).is_err(), "{w}");
        }
    }

    #[tokio::test]
    async fn truncate_extended_reads_zeroes_and_refuses_data() {
        let mem = Mem::with(vec![5; 1000]);
        let s = stack(vec![filter(&["truncate=2000"])], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        let b = try_read(&*h, 900, 200).await.unwrap();
        assert_eq!(&b[..100], &[5; 100]);
        assert_eq!(&b[100..], &[0; 100]);
        assert_eq!(try_read(&*h, 1500, 500).await.unwrap(), vec![0; 500]);
        // Zeroes past the end are fine, data is not.
        h.pwrite(&[0; 100], 1500, Flags::NONE).await.unwrap();
        let mut w = vec![7u8; 100];
        w[50..].fill(0);
        h.pwrite(&w, 950, Flags::NONE).await.unwrap();
        assert_eq!(
            mem.data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[950..1000],
            [7; 50]
        );
        let e = h.pwrite(&[1; 100], 950, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, libnbd::protocol::errno::ENOSPC);
        assert_eq!(
            mem.data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[950..1000],
            [7; 50]
        );
        h.zero(1000, 500, Flags::NONE).await.unwrap();
        h.trim(1000, 900, Flags::NONE).await.unwrap();
        h.zero(100, 1800, Flags::NONE).await.unwrap();
        h.cache(1000, 1000, Flags::NONE).await.unwrap();
        let calls = mem.take_calls();
        assert!(calls.contains(&"zero 500 500".to_string()), "{calls:?}");
        assert!(calls.contains(&"trim 900 100".to_string()), "{calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("cache")), "{calls:?}");
        assert_eq!(
            try_extents(&*h, 0, 2000).await.unwrap(),
            vec![(0, 512, 0), (512, 1488, HOLE_ZERO)]
        );
        assert_eq!(
            try_extents(&*h, 1200, 800).await.unwrap(),
            vec![(1200, 800, HOLE_ZERO)]
        );
    }

    #[tokio::test]
    async fn truncate_smaller_hides_the_tail() {
        let mem = Mem::with(vec![5; 1000]);
        let s = stack(vec![filter(&["truncate=100"])], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(try_read(&*h, 0, 100).await.unwrap(), vec![5; 100]);
        assert_eq!(try_extents(&*h, 0, 100).await.unwrap(), vec![(0, 100, 0)]);
    }
}
