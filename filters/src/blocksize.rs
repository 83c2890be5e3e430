//! # blocksize: meet the plugin's block size limits, whatever the client sends
//!
//! Clients may send requests of any alignment and of up to nearly 4 GiB
//! (64 MiB with data, nbdkit's own limit); some plugins need aligned or
//! smaller requests. This filter passes only requests aligned to
//! `minblock` and no larger than `maxdata` (reads, writes) or `maxlen`
//! (trim, zero, cache, extents) to the layers below:
//!
//! - an unaligned read reads the whole blocks around it;
//! - the unaligned head or tail of a write or zero is done by
//!   read-modify-write of its block (serialised against other writes, so
//!   concurrent requests stay consistent); a fast zero that would need
//!   one fails at once with `ENOTSUP`;
//! - the unaligned head or tail of a trim is ignored (trim is advisory);
//! - larger requests are split.
//!
//! The export size is rounded down to a multiple of `minblock` (combine
//! with the truncate filter to round up instead). The filter advertises
//! a minimum block size of 1 (anything goes), a preferred size of at
//! least `minblock` (4096 unless the plugin prefers more) and no maximum.
//!
//! ```text
//! nbdkit --filter=blocksize vddk minblock=512 file=/path/to/file.vmdk
//! nbdkit --filter=blocksize nbd maxdata=32M socket=/path/to/socket
//! ```
//!
//! ## Parameters
//!
//! - `minblock=SIZE`: the alignment and minimum size of requests to the
//!   plugin, a power of 2 up to 64K (default: the plugin's minimum block
//!   size, else 1).
//! - `maxdata=SIZE`: the largest read or write passed on, a multiple of
//!   `minblock` (default: the smaller of 64M and the plugin's maximum).
//! - `maxlen=SIZE`: the largest trim, zero, cache or extents request
//!   passed on, a multiple of `minblock` (default: 4G - 1 rounded down to
//!   `minblock`).

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    BlockSize, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};
use tokio::sync::RwLock;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "blocksize",
    help: "\
minblock=<SIZE>      Minimum block size, power of 2 <= 64k (default 1).
maxdata=<SIZE>       Maximum size for read/write (default 64M).
maxlen=<SIZE>        Maximum size for trim/zero (default 4G-minblock).
",
    create,
};

/// nbdkit's limit on a request with data.
const MAX_DATA: u64 = 64 * 1024 * 1024;
/// The protocol's limit on a request's length.
const MAX_LEN: u64 = u32::MAX as u64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Config {
    minblock: Option<u64>,
    maxdata: Option<u64>,
    maxlen: Option<u64>,
}

/// The limits in force on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    minblock: u64,
    maxdata: u64,
    maxlen: u64,
}

fn nonzero(p: &mut Params, key: &str) -> ConfigResult<Option<u64>> {
    match p.take_size(key)? {
        Some(0) => Err(ConfigError::new(format!(
            "parameter '{key}' must be non-zero if specified"
        ))),
        v => Ok(v),
    }
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let c = Config {
        minblock: nonzero(p, "minblock")?,
        maxdata: nonzero(p, "maxdata")?,
        maxlen: nonzero(p, "maxlen")?,
    };
    if let Some(m) = c.minblock {
        if !m.is_power_of_two() {
            return Err(ConfigError::new("minblock must be a power of 2"));
        }
        if m > 65536 {
            return Err(ConfigError::new("minblock must not exceed 65536"));
        }
    }
    if c.maxlen.is_some_and(|l| l > MAX_LEN) {
        return Err(ConfigError::new("parameter 'maxlen' too large"));
    }
    // With minblock given the multiples can be checked now; else at open.
    if c.minblock.is_some() {
        limits(c, None).map_err(|e| ConfigError::new(e.msg))?;
    }
    Ok(Arc::new(BlocksizeFilter {
        c,
        rmw: Arc::new(RwLock::new(())),
    }))
}

/// The limits for a connection, from the parameters and what the plugin
/// reports.
fn limits(c: Config, below: Option<BlockSize>) -> Result<Limits> {
    let minblock = c
        .minblock
        .or(below.map(|b| b.minimum.max(1) as u64))
        .unwrap_or(1);
    let maxdata = match c.maxdata {
        Some(d) => d.min(MAX_DATA),
        None => {
            let m = below
                .map(|b| b.maximum as u64)
                .filter(|m| *m > 0)
                .map_or(MAX_DATA, |m| m.min(MAX_DATA));
            (m / minblock * minblock).max(minblock)
        }
    };
    let maxlen = c.maxlen.unwrap_or(MAX_LEN / minblock * minblock);
    if c.maxdata.is_some() && !maxdata.is_multiple_of(minblock) {
        return Err(Error::einval(format!(
            "maxdata must be a multiple of {minblock}"
        )));
    }
    if !maxlen.is_multiple_of(minblock) {
        return Err(Error::einval(format!(
            "maxlen must be a multiple of {minblock}"
        )));
    }
    Ok(Limits {
        minblock,
        maxdata,
        maxlen,
    })
}

struct BlocksizeFilter {
    c: Config,
    /// Writes take it shared, read-modify-write cycles exclusive, over
    /// all connections.
    rmw: Arc<RwLock<()>>,
}

#[async_trait]
impl Filter for BlocksizeFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = next.open(ctx).await?;
        let below = next.block_size()?;
        let l = limits(self.c, below)?;
        let size = next.size()? / l.minblock * l.minblock;
        Ok(Box::new(BlocksizeHandle {
            next,
            l,
            size,
            preferred: below.map_or(4096, |b| b.preferred.max(4096)),
            rmw: self.rmw.clone(),
        }))
    }
}

struct BlocksizeHandle {
    next: Box<dyn Handle>,
    l: Limits,
    size: u64,
    preferred: u32,
    rmw: Arc<RwLock<()>>,
}

/// How a byte range splits over blocks of size `mb`.
#[derive(Debug, PartialEq, Eq)]
struct Split {
    /// An unaligned start: (block offset, start within the block, length).
    head: Option<(u64, usize, usize)>,
    /// The aligned middle: (offset, length), possibly empty.
    mid: (u64, u64),
    /// An unaligned end: (block offset, length from the block start).
    tail: Option<(u64, usize)>,
}

fn split(off: u64, len: u64, mb: u64) -> Split {
    let end = off + len;
    let down = |x: u64| x / mb * mb;
    if mb == 1 {
        return Split {
            head: None,
            mid: (off, len),
            tail: None,
        };
    }
    let mut head = None;
    let mut pos = off;
    if !off.is_multiple_of(mb) {
        let b = down(off);
        let take = (b + mb).min(end) - off;
        head = Some((b, (off - b) as usize, take as usize));
        pos = off + take;
    }
    let mid_end = down(end).max(pos);
    let mut tail = None;
    if mid_end < end {
        tail = Some((mid_end, (end - mid_end) as usize));
    }
    Split {
        head,
        mid: (pos, mid_end - pos),
        tail,
    }
}

impl BlocksizeHandle {
    async fn read_block(&self, b: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.l.minblock as usize];
        self.next.pread(&mut v, b, Flags::NONE).await?;
        Ok(v)
    }

    /// Read-modify-write of one block: `patch` changes it.
    async fn rmw(&self, b: u64, flags: Flags, patch: impl FnOnce(&mut [u8])) -> Result<()> {
        let mut v = self.read_block(b).await?;
        patch(&mut v);
        self.next.pwrite(&v, b, flags).await
    }

    /// Apply `op` to `[off, off + len)` in pieces of at most `max`.
    async fn chunks<F, Fut>(&self, off: u64, len: u64, max: u64, mut op: F) -> Result<()>
    where
        F: FnMut(u64, u64) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(max);
            op(pos, n).await?;
            pos += n;
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for BlocksizeHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: self.preferred.max(self.l.minblock as u32),
            maximum: u32::MAX,
        }))
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let s = split(offset, buf.len() as u64, self.l.minblock);
        if let Some((b, start, n)) = s.head {
            let v = self.read_block(b).await?;
            buf[..n].copy_from_slice(&v[start..start + n]);
        }
        let (mo, ml) = s.mid;
        let mut pos = mo;
        while pos < mo + ml {
            let n = (mo + ml - pos).min(self.l.maxdata);
            let i = (pos - offset) as usize;
            self.next
                .pread(&mut buf[i..i + n as usize], pos, flags)
                .await?;
            pos += n;
        }
        if let Some((b, n)) = s.tail {
            let v = self.read_block(b).await?;
            let i = (b - offset) as usize;
            buf[i..i + n].copy_from_slice(&v[..n]);
        }
        Ok(())
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let s = split(offset, buf.len() as u64, self.l.minblock);
        if s.head.is_some() || s.tail.is_some() {
            let _g = self.rmw.write().await;
            if let Some((b, start, n)) = s.head {
                self.rmw(b, flags, |v| v[start..start + n].copy_from_slice(&buf[..n]))
                    .await?;
            }
            if let Some((b, n)) = s.tail {
                let i = (b - offset) as usize;
                self.rmw(b, flags, |v| v[..n].copy_from_slice(&buf[i..i + n]))
                    .await?;
            }
        }
        let _g = self.rmw.read().await;
        let (mo, ml) = s.mid;
        self.chunks(mo, ml, self.l.maxdata, |pos, n| {
            let i = (pos - offset) as usize;
            self.next.pwrite(&buf[i..i + n as usize], pos, flags)
        })
        .await
    }

    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let s = split(offset, count, self.l.minblock);
        if s.head.is_some() || s.tail.is_some() {
            if flags.contains(Flags::FAST_ZERO) {
                return Err(Error::enotsup("blocksize: an unaligned zero is not fast"));
            }
            let _g = self.rmw.write().await;
            let wflags = flags.without(Flags::MAY_TRIM);
            if let Some((b, start, n)) = s.head {
                self.rmw(b, wflags, |v| v[start..start + n].fill(0)).await?;
            }
            if let Some((b, n)) = s.tail {
                self.rmw(b, wflags, |v| v[..n].fill(0)).await?;
            }
        }
        let _g = self.rmw.read().await;
        let (mo, ml) = s.mid;
        self.chunks(mo, ml, self.l.maxlen, |pos, n| {
            self.next.zero(n, pos, flags)
        })
        .await
    }

    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let (mo, ml) = split(offset, count, self.l.minblock).mid;
        let _g = self.rmw.read().await;
        self.chunks(mo, ml, self.l.maxlen, |pos, n| {
            self.next.trim(n, pos, flags)
        })
        .await
    }

    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let mb = self.l.minblock;
        let start = offset / mb * mb;
        let end = (offset + count).div_ceil(mb) * mb;
        let end = end.min(self.size);
        self.chunks(start, end.saturating_sub(start), self.l.maxlen, |pos, n| {
            self.next.cache(n, pos, flags)
        })
        .await
    }

    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let mb = self.l.minblock;
        let end = offset + count;
        let mut pos = offset / mb * mb;
        // Ask until something beyond `offset` is known.
        while ext.next_offset() == offset {
            let stop = end
                .div_ceil(mb)
                .saturating_mul(mb)
                .min(pos + self.l.maxlen)
                .min(self.size);
            if stop <= pos {
                return Err(Error::eio("blocksize: extents beyond the end"));
            }
            let mut sub = Extents::new(pos, stop);
            self.next.extents(stop - pos, pos, flags, &mut sub).await?;
            if sub.list().is_empty() {
                return Err(Error::eio("blocksize: the plugin returned no extents"));
            }
            for e in sub.list() {
                ext.add(e.offset, e.length, e.flags)?;
            }
            pos = sub.next_offset();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{extents, mem_stack, pattern, read, Op};

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut Params::parse(words, None).unwrap()).unwrap()
    }

    #[test]
    fn splits() {
        assert_eq!(
            split(100, 1000, 512),
            Split {
                head: Some((0, 100, 412)),
                mid: (512, 512),
                tail: Some((1024, 76))
            }
        );
        assert_eq!(
            split(10, 20, 512),
            Split {
                head: Some((0, 10, 20)),
                mid: (30, 0),
                tail: None
            }
        );
        assert_eq!(
            split(1024, 512, 512),
            Split {
                head: None,
                mid: (1024, 512),
                tail: None
            }
        );
    }

    #[test]
    fn parameters() {
        let bad = |w: &[&str]| create(&mut Params::parse(w, None).unwrap()).is_err();
        assert!(bad(&["minblock=3"]));
        assert!(bad(&["minblock=128k"]));
        assert!(bad(&["minblock=0"]));
        assert!(bad(&["maxdata=100", "minblock=512"]));
        assert!(bad(&["maxlen=1000", "minblock=512"]));
        assert!(bad(&["maxlen=8G"]));
        assert!(!bad(&["minblock=4k", "maxdata=1M", "maxlen=2M"]));
        assert!(!bad(&["maxdata=100"]));
    }

    #[tokio::test]
    async fn unaligned_requests_reach_the_plugin_aligned() {
        let (stack, log, mem) = mem_stack(
            filter(&["minblock=512", "maxdata=4k", "maxlen=8k"]),
            100_000,
        );
        *mem.require_align
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = 512;
        *mem.max_io
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = 4096;
        let h = stack.open(&OpenContext::default()).await.unwrap();
        assert_eq!(h.size().unwrap(), 99_840);
        let bs = h.block_size().unwrap().unwrap();
        assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 4096, u32::MAX));
        let mut want = vec![0u8; 10_000];
        pattern(&mut want, 1);
        assert_eq!(read(&*h, 1, 10_000).await, want);
        h.pwrite(&[7; 9000], 333, Flags::FUA).await.unwrap();
        h.zero(700, 20_001, Flags::NONE).await.unwrap();
        h.trim(20_000, 40_100, Flags::NONE).await.unwrap();
        let mut want = mem.snapshot();
        want[333..9333].fill(7);
        want[20_001..20_701].fill(0);
        assert!(read(&*h, 0, 99_840).await == want[..99_840]);
        for op in log.ops() {
            let (o, n, max) = match op {
                Op::Read(o, n) | Op::Write(o, n) => (o, n, 4096),
                Op::Zero(o, n) | Op::Trim(o, n) | Op::Cache(o, n) | Op::Extents(o, n) => {
                    (o, n, 8192)
                }
                Op::Flush => continue,
            };
            assert!(o % 512 == 0 && n % 512 == 0 && n <= max, "{op:?}");
        }
        // The trim's unaligned ends were dropped.
        assert!(log.ops().contains(&Op::Trim(40_448, 8192)));
        assert!(h.zero(100, 1, Flags::FAST_ZERO).await.is_err());
        assert_eq!(extents(&*h, 100, 300).await, vec![(100, 300, 0)],);
    }

    #[tokio::test]
    async fn defaults_follow_the_plugin() {
        let (stack, log, mem) = mem_stack(filter(&[]), 1 << 20);
        *mem.block_size
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(BlockSize {
            minimum: 4096,
            preferred: 65536,
            maximum: 65536,
        });
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let bs = h.block_size().unwrap().unwrap();
        assert_eq!((bs.minimum, bs.preferred), (1, 65536));
        read(&*h, 10, 200_000).await;
        assert_eq!(
            log.ops(),
            vec![
                Op::Read(0, 4096),
                Op::Read(4096, 65536),
                Op::Read(69632, 65536),
                Op::Read(135168, 61440),
                Op::Read(196608, 4096)
            ]
        );
    }

    #[tokio::test]
    async fn concurrent_unaligned_writes_do_not_lose_data() {
        let (stack, _, mem) = mem_stack(filter(&["minblock=4k"]), 1 << 20);
        let h: Arc<dyn Handle> = Arc::from(stack.open(&OpenContext::default()).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.pwrite(&[i as u8; 100], i * 100, Flags::NONE)
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let d = mem.snapshot();
        for i in 0..32usize {
            assert!(d[i * 100..i * 100 + 100].iter().all(|b| *b == i as u8));
        }
    }
}
