//! # cache: keep blocks of a slow plugin in a local file
//!
//! Blocks written (and, with `cache-on-read`, read or prefetched) are
//! kept in a sparse temporary file (in `$TMPDIR`, default `/var/tmp`,
//! unlinked at once) shared by all connections, and reads of them are
//! served from it without asking the plugin. What happens to writes
//! depends on the mode:
//!
//! - `cache=writeback` (the default): writes go to the cache only and the
//!   blocks are marked dirty; a flush writes every dirty block to the
//!   plugin and then flushes the plugin. A write with FUA goes through
//!   at once. Safe for clients that flush (modern ones do); dirty blocks
//!   are lost if nbdkit exits before a flush.
//! - `cache=writethrough`: every write also goes to the plugin before it
//!   completes.
//! - `cache=unsafe`: like writeback, but flush and FUA do nothing: the
//!   plugin is written only when the cache must shrink. Fast and
//!   dangerous.
//!
//! Zero and trim requests go straight to the plugin (zeroing is cheap
//! there and must not fill the cache); the whole blocks they cover leave
//! the cache. Block status comes from the plugin, with dirty blocks
//! reported as data.
//!
//! ```text
//! nbdkit --filter=cache curl https://example.com/disk.img cache-on-read=true
//! nbdkit --filter=cache file disk.img cache=unsafe cache-max-size=1G
//! ```
//!
//! ## Parameters
//!
//! - `cache=writeback|writethrough|unsafe`: the mode (see above).
//! - `cache-on-read=false|true|/PATH`: also cache the blocks that reads
//!   fetch from the plugin (default false); with an absolute `/PATH`,
//!   only while `/PATH` exists. Beware of stale data if the plugin's data
//!   can change behind nbdkit's back.
//! - `cache-min-block-size=SIZE`: the cache's block size, a power of 2 of
//!   at least 4096 (default 64K, or the temporary file system's block
//!   size if larger).
//! - `cache-max-size=SIZE`: limit the cache to about this size. Once it
//!   grows beyond `cache-high-threshold` percent of it (default 95),
//!   blocks are reclaimed, least recently used first (a clock
//!   approximation), until it is under `cache-low-threshold` percent
//!   (default 80); dirty blocks are written to the plugin before they
//!   leave.
//! - `cache-high-threshold=N`, `cache-low-threshold=N`: percentages,
//!   `0 < low < high <= 100`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    BlockSize, Cache, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags,
    Fua, Handle, Next, OpenContext, Params, Result,
};

use crate::cow::blocks::{BlockLocks, StateMap, Store};
use crate::cow::{parse_block_size, Switch};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "cache",
    help: "\
cache=MODE                Set cache MODE, one of writeback (default),
                          writethrough, or unsafe.
cache-on-read=BOOL|/PATH  Set to true to cache on reads (default false).
cache-min-block-size=SIZE Set the minimum block size (default 64K).
cache-max-size=SIZE       Set maximum space used by cache.
cache-high-threshold=PCT  Percentage of max size where reclaim begins.
cache-low-threshold=PCT   Percentage of max size where reclaim ends.
",
    create,
};

/// Not in the cache.
const NOT: u8 = 0;
/// In the cache, same as the plugin.
const CLEAN: u8 = 1;
/// In the cache, newer than the plugin.
const DIRTY: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Writeback,
    Writethrough,
    Unsafe,
}

#[derive(Debug, Clone)]
struct Config {
    mode: Mode,
    on_read: Switch,
    min_bs: u64,
    /// Whether `min_bs` was given (else the file system may raise it).
    bs_given: bool,
    max_size: Option<u64>,
    high: u64,
    low: u64,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(build(p)?))
}

fn build(p: &mut Params) -> ConfigResult<CacheFilter> {
    let mode = match p.take("cache").as_deref() {
        None | Some("writeback") => Mode::Writeback,
        Some("writethrough") => Mode::Writethrough,
        Some("unsafe") => Mode::Unsafe,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "invalid cache parameter '{v}', should be writeback|writethrough|unsafe"
            )))
        }
    };
    let on_read = match p.take("cache-on-read") {
        Some(v) => Switch::parse("cache-on-read", &v)?,
        None => Switch::Off,
    };
    let bs = p.take_size("cache-min-block-size")?;
    let min_bs = parse_block_size("cache-min-block-size", bs, 64 * 1024)?;
    let max_size = p.take_size("cache-max-size")?;
    let high: u64 = p.take_parsed("cache-high-threshold")?.unwrap_or(95);
    let low: u64 = p.take_parsed("cache-low-threshold")?.unwrap_or(80);
    if high == 0 || high > 100 {
        return Err(ConfigError::new(
            "cache-high-threshold must be between 1 and 100",
        ));
    }
    if low == 0 || low >= high {
        return Err(ConfigError::new(
            "cache-low-threshold must be greater than zero and less than cache-high-threshold",
        ));
    }
    if max_size == Some(0) {
        return Err(ConfigError::new("cache-max-size must be greater than zero"));
    }
    Ok(CacheFilter {
        c: Config {
            mode,
            on_read,
            min_bs,
            bs_given: bs.is_some(),
            max_size,
            high,
            low,
        },
        cache: tokio::sync::OnceCell::new(),
    })
}

struct CacheFilter {
    c: Config,
    cache: tokio::sync::OnceCell<Arc<Blocks>>,
}

/// The cache shared by every connection.
struct Blocks {
    store: Store,
    /// NOT, CLEAN or DIRTY per block.
    map: StateMap,
    /// 1 for blocks used since the clock hand last passed.
    refs: StateMap,
    locks: BlockLocks,
    bs: u64,
    size: u64,
    /// Blocks in the cache.
    cached: AtomicU64,
    /// Reclaim in progress (between the thresholds); the clock hand.
    reclaiming: AtomicBool,
    hand: tokio::sync::Mutex<u64>,
}

impl Blocks {
    fn block_end(&self, blk: u64) -> u64 {
        ((blk + 1) * self.bs).min(self.size)
    }
    fn blocks(&self, off: u64, end: u64) -> (u64, u64) {
        (off / self.bs, end.div_ceil(self.bs))
    }
    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::einval(format!(
                "cache: request {off}+{len} beyond the end ({})",
                self.size
            ))),
        }
    }
    /// Set a block's state, keeping the count of cached blocks.
    fn set(&self, blk: u64, v: u8) {
        let old = self.map.set(blk, v);
        if old == NOT && v != NOT {
            self.cached.fetch_add(1, Ordering::AcqRel);
        } else if old != NOT && v == NOT {
            self.cached.fetch_sub(1, Ordering::AcqRel);
        }
    }
    /// Is some block of `[first, end)` not cached?
    fn any_missing(&self, first: u64, end: u64) -> bool {
        let mut blk = first;
        while blk < end {
            let (s, e) = self.map.run(blk, end);
            if s == NOT {
                return true;
            }
            blk = e;
        }
        false
    }
    fn touch(&self, first: u64, end: u64) {
        for b in first..end {
            self.refs.set(b, 1);
        }
    }
    /// Drop a block from the cache.
    fn evict(&self, blk: u64) {
        if self.map.get(blk) != NOT {
            self.set(blk, NOT);
            self.refs.set(blk, 0);
            let s = blk * self.bs;
            self.store.punch(s, self.block_end(blk) - s);
        }
    }
}

#[async_trait]
impl Filter for CacheFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = next.open(ctx).await?;
        let size = next.size()?;
        let c = &self.c;
        let blocks = self
            .cache
            .get_or_try_init(|| async {
                let store = Store::new(size)?;
                let fs = store.fs_block_size();
                let bs = if !c.bs_given && fs.is_power_of_two() {
                    c.min_bs.max(fs)
                } else {
                    c.min_bs
                };
                if c.max_size.is_some_and(|m| m < bs) {
                    return Err(Error::einval(format!(
                        "cache-max-size must be at least the block size ({bs})"
                    )));
                }
                Ok::<_, Error>(Arc::new(Blocks {
                    store,
                    map: StateMap::new(),
                    refs: StateMap::new(),
                    locks: BlockLocks::new(),
                    bs,
                    size,
                    cached: AtomicU64::new(0),
                    reclaiming: AtomicBool::new(false),
                    hand: tokio::sync::Mutex::new(0),
                }))
            })
            .await?
            .clone();
        if blocks.size != size {
            return Err(Error::eio(format!(
                "cache: the plugin's size changed ({} to {size})",
                blocks.size
            )));
        }
        let below = next.caps()?;
        let (next_extents, next_trim) = (below.extents, below.trim);
        Ok(Box::new(CacheHandle {
            next,
            b: blocks,
            c: c.clone(),
            next_extents,
            next_trim,
        }))
    }
}

struct CacheHandle {
    next: Box<dyn Handle>,
    b: Arc<Blocks>,
    c: Config,
    next_extents: bool,
    next_trim: bool,
}

impl CacheHandle {
    /// Bring the blocks covering `[off, end)` into the cache, filling
    /// `out` (exactly `[off, end)`) with the range if given.
    async fn fill(&self, off: u64, end: u64, mut out: Option<&mut [u8]>) -> Result<()> {
        let b = &self.b;
        let (first, last) = b.blocks(off, end);
        {
            let _g = b.locks.lock(first, last).await;
            let mut blk = first;
            while blk < last {
                let (state, run_end) = b.map.run(blk, last);
                let rs = blk * b.bs;
                let re = b.block_end(run_end - 1);
                let (ps, pe) = (rs.max(off), re.min(end));
                if state == NOT {
                    let mut tmp = vec![0u8; (re - rs) as usize];
                    self.next.pread(&mut tmp, rs, Flags::NONE).await?;
                    b.store.write_at(&tmp, rs)?;
                    for x in blk..run_end {
                        b.set(x, CLEAN);
                    }
                    if let Some(o) = out.as_deref_mut() {
                        o[(ps - off) as usize..(pe - off) as usize]
                            .copy_from_slice(&tmp[(ps - rs) as usize..(pe - rs) as usize]);
                    }
                } else if let Some(o) = out.as_deref_mut() {
                    b.store
                        .read_at(&mut o[(ps - off) as usize..(pe - off) as usize], ps)?;
                }
                blk = run_end;
            }
            b.touch(first, last);
        }
        self.maybe_reclaim().await
    }

    /// Write dirty blocks `[first, end)` to the plugin; callers hold
    /// their locks.
    async fn write_back(&self, first: u64, end: u64) -> Result<()> {
        let b = &self.b;
        let mut blk = first;
        while blk < end {
            let (state, run_end) = b.map.run(blk, end);
            if state == DIRTY {
                let rs = blk * b.bs;
                let re = b.block_end(run_end - 1);
                let mut tmp = vec![0u8; (re - rs) as usize];
                b.store.read_at(&mut tmp, rs)?;
                self.next.pwrite(&tmp, rs, Flags::NONE).await?;
                for x in blk..run_end {
                    b.set(x, CLEAN);
                }
            }
            blk = run_end;
        }
        Ok(())
    }

    /// Shrink the cache if it has grown beyond the high threshold.
    async fn maybe_reclaim(&self) -> Result<()> {
        let b = &self.b;
        let Some(max) = self.c.max_size else {
            return Ok(());
        };
        let used = |b: &Blocks| b.cached.load(Ordering::Acquire) * b.bs;
        if !b.reclaiming.load(Ordering::Acquire) && used(b) <= max / 100 * self.c.high {
            return Ok(());
        }
        let mut hand = b.hand.lock().await;
        b.reclaiming.store(true, Ordering::Release);
        let low = max / 100 * self.c.low;
        while used(b) > low {
            let blk = match b.map.find_any(*hand).or_else(|| b.map.find_any(0)) {
                Some(x) => x,
                None => break,
            };
            *hand = blk + 1;
            if b.refs.set(blk, 0) == 1 {
                // Used recently: a second chance.
                continue;
            }
            let _g = b.locks.lock(blk, blk + 1).await;
            if b.map.get(blk) == DIRTY {
                self.write_back(blk, blk + 1).await?;
            }
            b.evict(blk);
        }
        b.reclaiming.store(false, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl Handle for CacheHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let below = self.next.block_size()?;
        let bs = self.b.bs as u32;
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: below.map_or(bs, |x| x.preferred.max(bs)),
            maximum: u32::MAX,
        }))
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            flush: true,
            fua: Fua::Native,
            // One cache for all connections, and a flush writes back all of it.
            multi_conn: true,
            cache: Cache::Native,
            ..self.next.caps()?
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let b = &self.b;
        let end = offset + buf.len() as u64;
        b.check(offset, buf.len() as u64)?;
        let (first, last) = b.blocks(offset, end);
        if self.c.on_read.active() && b.any_missing(first, last) {
            return self.fill(offset, end, Some(buf)).await;
        }
        let _g = b.locks.lock_shared(first, last).await;
        let mut pos = offset;
        while pos < end {
            let blk = pos / b.bs;
            let (state, run_end) = b.map.run(blk, last);
            let pe = b.block_end(run_end - 1).min(end);
            let piece = &mut buf[(pos - offset) as usize..(pe - offset) as usize];
            if state == NOT {
                self.next.pread(piece, pos, flags).await?;
            } else {
                b.store.read_at(piece, pos)?;
                b.touch(blk, run_end);
            }
            pos = pe;
        }
        Ok(())
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let b = &self.b;
        let end = offset + buf.len() as u64;
        b.check(offset, buf.len() as u64)?;
        let through = match self.c.mode {
            Mode::Writethrough => true,
            Mode::Writeback => flags.contains(Flags::FUA),
            Mode::Unsafe => false,
        };
        let (first, last) = b.blocks(offset, end);
        {
            let _g = b.locks.lock(first, last).await;
            if through {
                self.next.pwrite(buf, offset, flags).await?;
            }
            let mut pos = offset;
            while pos < end {
                let blk = pos / b.bs;
                let bstart = blk * b.bs;
                let bend = b.block_end(blk);
                let data = |s: u64, e: u64| &buf[(s - offset) as usize..(e - offset) as usize];
                if pos == bstart && end >= bend {
                    let full_end = if end >= b.size {
                        b.size
                    } else {
                        end / b.bs * b.bs
                    };
                    b.store.write_at(data(pos, full_end), pos)?;
                    for x in blk..full_end.div_ceil(b.bs) {
                        b.set(x, if through { CLEAN } else { DIRTY });
                    }
                    pos = full_end;
                    continue;
                }
                let wend = end.min(bend);
                let state = b.map.get(blk);
                if state != NOT {
                    // Cached: change it in place.
                    b.store.write_at(data(pos, wend), pos)?;
                    if !through {
                        b.set(blk, DIRTY);
                    }
                } else if !through {
                    // Not cached: complete the block from the plugin.
                    let mut v = vec![0u8; (bend - bstart) as usize];
                    self.next.pread(&mut v, bstart, Flags::NONE).await?;
                    v[(pos - bstart) as usize..(wend - bstart) as usize]
                        .copy_from_slice(data(pos, wend));
                    b.store.write_at(&v, bstart)?;
                    b.set(blk, DIRTY);
                }
                pos = wend;
            }
            b.touch(first, last);
        }
        self.maybe_reclaim().await
    }

    async fn flush(&self, flags: Flags) -> Result<()> {
        let b = &self.b;
        match self.c.mode {
            Mode::Unsafe => return Ok(()),
            Mode::Writethrough => {}
            Mode::Writeback => {
                let mut from = 0;
                while let Some(blk) = b.map.find(from, DIRTY) {
                    let (_, run_end) = b.map.run(blk, u64::MAX);
                    let _g = b.locks.lock(blk, run_end).await;
                    self.write_back(blk, run_end).await?;
                    from = run_end;
                }
            }
        }
        self.next.flush(flags).await
    }

    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let b = &self.b;
        b.check(offset, count)?;
        let end = offset + count;
        let (first, last) = b.blocks(offset, end);
        let _g = b.locks.lock(first, last).await;
        self.next.zero(count, offset, flags).await?;
        let mut pos = offset;
        while pos < end {
            let blk = pos / b.bs;
            let bstart = blk * b.bs;
            let bend = b.block_end(blk);
            let wend = end.min(bend);
            if pos == bstart && wend == bend {
                b.evict(blk);
            } else if b.map.get(blk) != NOT {
                b.store.write_at(&vec![0u8; (wend - pos) as usize], pos)?;
            }
            pos = wend;
        }
        Ok(())
    }

    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let b = &self.b;
        b.check(offset, count)?;
        let end = offset + count;
        let (first, last) = b.blocks(offset, end);
        let _g = b.locks.lock(first, last).await;
        if self.next_trim {
            self.next.trim(count, offset, flags).await?;
        }
        // Whole blocks leave the cache (dirty data in them may go: a
        // trimmed range may read as anything).
        let full_first = offset.div_ceil(b.bs);
        let full_last = if end >= b.size {
            b.size.div_ceil(b.bs)
        } else {
            end / b.bs
        };
        for blk in full_first..full_last {
            b.evict(blk);
        }
        Ok(())
    }

    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let b = &self.b;
        b.check(offset, count)?;
        let end = offset + count;
        let mut sub = Extents::new(offset, end);
        if self.next_extents {
            self.next
                .extents(count, offset, flags.without(Flags::REQ_ONE), &mut sub)
                .await?;
        }
        if sub.list().is_empty() {
            sub.add(offset, count, 0)?;
        }
        // Dirty blocks are data whatever the plugin says.
        for e in sub.list() {
            let e_end = e.offset + e.length;
            let mut pos = e.offset;
            while pos < e_end {
                let blk = pos / b.bs;
                let (state, run_end) = b.map.run(blk, e_end.div_ceil(b.bs));
                let pe = b.block_end(run_end - 1).min(e_end);
                ext.add(pos, pe - pos, if state == DIRTY { 0 } else { e.flags })?;
                pos = pe;
            }
        }
        Ok(())
    }

    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.b.check(offset, count)?;
        self.fill(offset, offset + count, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::testkit::{extents, mem_stack, pattern, read, Op};
    use libnbd::backend::HOLE_ZERO;

    const MB: usize = 1 << 20;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut Params::parse(words, None).unwrap()).unwrap()
    }

    fn writes(ops: &[Op]) -> Vec<Op> {
        ops.iter()
            .filter(|o| matches!(o, Op::Write(..)))
            .cloned()
            .collect()
    }

    #[test]
    fn parameters() {
        let bad = |w: &[&str]| create(&mut Params::parse(w, None).unwrap()).is_err();
        assert!(bad(&["cache=sometimes"]));
        assert!(bad(&["cache-min-block-size=1000"]));
        assert!(bad(&["cache-high-threshold=50", "cache-low-threshold=60"]));
        assert!(bad(&["cache-low-threshold=0"]));
        assert!(bad(&["cache-on-read=perhaps"]));
        assert!(!bad(&[
            "cache=unsafe",
            "cache-on-read=/x",
            "cache-max-size=1M",
            "cache-high-threshold=90",
            "cache-low-threshold=10",
            "cache-min-block-size=4k"
        ]));
    }

    #[tokio::test]
    async fn writeback_holds_writes_until_flush() {
        let (stack, log, mem) = mem_stack(filter(&["cache-min-block-size=4k"]), MB);
        let base = mem.snapshot();
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.pwrite(&[9; 5000], 100, Flags::NONE).await.unwrap();
        h.pwrite(&[8; 8192], 65536, Flags::NONE).await.unwrap();
        assert_eq!(mem.snapshot(), base, "nothing written yet");
        assert!(writes(&log.ops()).is_empty());
        let mut want = base.clone();
        want[100..5100].fill(9);
        want[65536..73728].fill(8);
        assert!(read(&*h, 0, MB).await == want);
        // The dirty blocks show as data even where the plugin has a hole.
        h.pwrite(&[1; 4096], (MB - 4096) as u64, Flags::NONE)
            .await
            .unwrap();
        want[MB - 4096..].fill(1);
        let e = extents(&*h, (MB - 8192) as u64, 8192).await;
        assert_eq!(
            e,
            vec![
                ((MB - 8192) as u64, 4096, HOLE_ZERO),
                ((MB - 4096) as u64, 4096, 0)
            ]
        );
        h.flush(Flags::NONE).await.unwrap();
        assert!(mem.snapshot() == want, "flush wrote the dirty blocks");
        assert_eq!(log.ops().last(), Some(&Op::Flush));
        // Writes of whole 4K blocks, the partial ones filled from the plugin.
        assert_eq!(
            writes(&log.ops()),
            vec![
                Op::Write(0, 8192),
                Op::Write(65536, 8192),
                Op::Write((MB - 4096) as u64, 4096)
            ]
        );
        // A second flush has nothing to write.
        log.clear();
        h.flush(Flags::NONE).await.unwrap();
        assert_eq!(log.ops(), vec![Op::Flush]);
    }

    #[tokio::test]
    async fn writethrough_and_fua_write_at_once() {
        let (stack, log, mem) = mem_stack(filter(&["cache=writethrough"]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.pwrite(&[3; 100], 10, Flags::NONE).await.unwrap();
        assert_eq!(&mem.snapshot()[10..110], &[3; 100]);
        let (stack, _, mem) = mem_stack(filter(&[]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.pwrite(&[4; 100], 10, Flags::FUA).await.unwrap();
        assert_eq!(&mem.snapshot()[10..110], &[4; 100]);
        assert!(writes(&log.ops()).len() == 1);
    }

    #[tokio::test]
    async fn unsafe_ignores_flush() {
        let (stack, log, mem) = mem_stack(filter(&["cache=unsafe"]), MB);
        let base = mem.snapshot();
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.pwrite(&[4; 100], 10, Flags::FUA).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        assert_eq!(mem.snapshot(), base);
        assert!(log.ops().iter().all(|o| matches!(o, Op::Read(..))));
    }

    #[tokio::test]
    async fn cache_on_read_serves_again_from_the_cache() {
        let (stack, log, _) = mem_stack(filter(&["cache-on-read=true"]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let a = read(&*h, 1000, 3000).await;
        let b = read(&*h, 1000, 3000).await;
        assert_eq!(a, b);
        let mut want = vec![0u8; 3000];
        pattern(&mut want, 1000);
        assert_eq!(a, want);
        assert_eq!(log.ops(), vec![Op::Read(0, 65536)]);
        // Without cache-on-read, reads always go down; cache requests fill.
        let (stack, log, _) = mem_stack(filter(&[]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        read(&*h, 0, 10).await;
        read(&*h, 0, 10).await;
        assert_eq!(log.ops().len(), 2);
        h.cache(10, 0, Flags::NONE).await.unwrap();
        read(&*h, 0, 10).await;
        assert_eq!(log.ops().len(), 3);
    }

    #[tokio::test]
    async fn zero_and_trim_drop_blocks() {
        let (stack, log, mem) = mem_stack(filter(&["cache-min-block-size=4k"]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.pwrite(&[5; 16384], 0, Flags::NONE).await.unwrap();
        h.zero(4096 + 10, 4096 - 10, Flags::NONE).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        let d = mem.snapshot();
        assert!(d[..4086].iter().all(|b| *b == 5));
        assert!(d[4086..8192].iter().all(|b| *b == 0));
        assert!(d[8192..16384].iter().all(|b| *b == 5));
        assert!(log.ops().contains(&Op::Zero(4086, 4106)));
        h.trim(8192, 8192, Flags::NONE).await.unwrap();
        log.clear();
        read(&*h, 8192, 8192).await;
        assert_eq!(log.ops(), vec![Op::Read(8192, 8192)], "trimmed blocks left");
    }

    #[tokio::test]
    async fn max_size_reclaims_and_keeps_dirty_data() {
        // 64K cache of 4K blocks: reclaim from 60K down to 32K.
        let f = Arc::new(
            build(
                &mut Params::parse(
                    &[
                        "cache-min-block-size=4k",
                        "cache-max-size=64k",
                        "cache-high-threshold=95",
                        "cache-low-threshold=50",
                        "cache-on-read=true",
                    ],
                    None,
                )
                .unwrap(),
            )
            .unwrap(),
        );
        let (stack, log, mem) = mem_stack(f.clone(), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let cached = || f.cache.get().unwrap().cached.load(Ordering::Acquire);
        // Dirty 256K in 4K writes: far more than the cache holds.
        for i in 0..64u64 {
            h.pwrite(&[i as u8 + 1; 4096], i * 4096, Flags::NONE)
                .await
                .unwrap();
        }
        // Reclaiming wrote dirty blocks back, and the data is all there.
        assert!(cached() <= 15, "{}", cached());
        assert!(!writes(&log.ops()).is_empty());
        for i in 0..64u64 {
            let v = read(&*h, i * 4096, 4096).await;
            assert!(v.iter().all(|x| *x == i as u8 + 1), "block {i}");
        }
        h.flush(Flags::NONE).await.unwrap();
        let d = mem.snapshot();
        for i in 0..64usize {
            assert!(d[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|x| *x == i as u8 + 1));
        }
        // Reading the whole disk through a 64K cache works too.
        let all = read(&*h, 0, MB).await;
        assert!(all == mem.snapshot());
        assert!(cached() <= 15, "{}", cached());
    }
}
