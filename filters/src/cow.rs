//! # cow: a writable copy-on-write overlay over a read-only plugin
//!
//! The layers below are opened read-only and never written. Writes,
//! zeroes and trims go to an overlay kept in a sparse temporary file
//! (in `$TMPDIR`, default `/var/tmp`; it is unlinked at once, so it
//! disappears when nbdkit exits) with a map saying, for each block,
//! whether it is still the plugin's, holds data in the overlay, or reads
//! as zeroes. Everything written is thrown away when nbdkit exits. All
//! connections share one overlay and see the same disk (multi-conn).
//!
//! ```text
//! nbdkit --filter=cow file disk.img
//! nbdkit --filter=cow --filter=xz file disk.xz cow-on-read=true
//! ```
//!
//! ## Parameters
//!
//! - `cow-block-size=N`: the overlay's block size, a power of 2, at
//!   least 4096 (default 64K). A write smaller than a block copies the
//!   rest of the block from the plugin first.
//! - `cow-on-read=false|true|/PATH`: also copy blocks into the overlay
//!   as they are read, so later reads do not go to the plugin again
//!   (useful over slow plugins and filters). With an absolute `/PATH`,
//!   this is on only while `/PATH` exists (default false).
//! - `cow-on-cache=false|true`: copy blocks into the overlay on cache
//!   (prefetch) requests (default false: the request goes to the plugin).
//!
//! Block status: overlay blocks report data, zeroed or trimmed blocks
//! report a zero hole, the rest comes from the plugin. Trim and zero of
//! whole blocks punch holes in the overlay file; the unaligned ends of a
//! trim are ignored (trim is advisory).

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    BlockSize, Cache, Caps, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};

use crate::blocks::{parse_block_size, BlockFile, Piece, Store, Switch};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "cow",
    help: "\
cow-block-size=<N>       Set COW block size.
cow-on-cache=<BOOL>      Copy cache (prefetch) requests to the overlay.
cow-on-read=<BOOL>|/PATH Copy read requests to the overlay.
",
    create,
};

/// The block is still the plugin's.
const BASE: u8 = 0;
/// The block holds data in the overlay.
const DATA: u8 = 1;
/// The block reads as zeroes (trimmed or zeroed).
const ZERO: u8 = 2;

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let bs = parse_block_size("cow-block-size", p.take_size("cow-block-size")?, 64 * 1024)?;
    let on_read = match p.take("cow-on-read") {
        Some(v) => Switch::parse("cow-on-read", &v)?,
        None => Switch::Off,
    };
    let on_cache = p.take_bool("cow-on-cache")?.unwrap_or(false);
    Ok(Arc::new(CowFilter {
        bs,
        on_read,
        on_cache,
        overlay: tokio::sync::OnceCell::new(),
    }))
}

struct CowFilter {
    bs: u64,
    on_read: Switch,
    on_cache: bool,
    /// Created at the first open, when the size is known; shared by all
    /// connections.
    overlay: tokio::sync::OnceCell<Arc<Overlay>>,
}

/// The overlay shared by every connection: BASE, DATA or ZERO per block.
type Overlay = BlockFile;

#[async_trait]
impl Filter for CowFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let mut below = ctx.clone();
        below.readonly = true;
        let next = next.open(&below).await?;
        let size = next.size()?;
        let bs = self.bs;
        let ov = self
            .overlay
            .get_or_try_init(|| async {
                Ok::<_, Error>(Arc::new(Overlay::new("cow", Store::new(size)?, bs, size)))
            })
            .await?
            .clone();
        if ov.size != size {
            return Err(Error::eio(format!(
                "cow: the plugin's size changed ({} to {size}); the overlay cannot follow",
                ov.size
            )));
        }
        let below = next.caps()?;
        let next_extents = below.extents;
        let next_cache = below.cache != Cache::None;
        Ok(Box::new(CowHandle {
            next,
            ov,
            on_read: self.on_read.clone(),
            on_cache: self.on_cache,
            next_extents,
            next_cache,
        }))
    }
}

struct CowHandle {
    next: Box<dyn Handle>,
    ov: Arc<Overlay>,
    on_read: Switch,
    on_cache: bool,
    next_extents: bool,
    next_cache: bool,
}

impl CowHandle {
    /// The current content of one block (callers hold its lock).
    async fn read_block(&self, blk: u64) -> Result<Vec<u8>> {
        let ov = &self.ov;
        let start = blk * ov.bs;
        let mut v = vec![0u8; (ov.block_end(blk) - start) as usize];
        match ov.map.get(blk) {
            DATA => ov.store.read_at(&mut v, start)?,
            ZERO => {}
            _ => self.next.pread(&mut v, start, Flags::NONE).await?,
        }
        Ok(v)
    }

    /// Copy the plugin's blocks covering `[off, end)` into the overlay
    /// (those still the plugin's), filling `out` (which covers exactly
    /// `[off, end)`) with the range's content if given.
    async fn copy_up(&self, off: u64, end: u64, mut out: Option<&mut [u8]>) -> Result<()> {
        let ov = &self.ov;
        let (first, last) = ov.blocks(off, end);
        let _g = ov.locks.lock(first, last).await;
        for run in ov.runs(off, end) {
            let (rs, re) = (run.block_start, run.block_end);
            // The part of the run inside [off, end).
            let (ps, pe) = (run.start, run.end);
            let part = (ps - off) as usize..(pe - off) as usize;
            match run.state {
                BASE => {
                    let mut tmp = vec![0u8; (re - rs) as usize];
                    self.next.pread(&mut tmp, rs, Flags::NONE).await?;
                    ov.store.write_at(&tmp, rs)?;
                    ov.map.set_range(run.first, run.last, DATA);
                    if let Some(o) = out.as_deref_mut() {
                        o[part].copy_from_slice(&tmp[(ps - rs) as usize..(pe - rs) as usize]);
                    }
                }
                DATA => {
                    if let Some(o) = out.as_deref_mut() {
                        ov.store.read_at(&mut o[part], ps)?;
                    }
                }
                _ => {
                    if let Some(o) = out.as_deref_mut() {
                        o[part].fill(0);
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for CowHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.ov.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let below = self.next.block_size()?;
        let bs = self.ov.bs as u32;
        Ok(Some(BlockSize {
            minimum: 1,
            preferred: below.map_or(bs, |b| b.preferred.max(bs)),
            maximum: u32::MAX,
        }))
    }
    fn caps(&self) -> Result<Caps> {
        // The overlay is temporary: there is nothing to make durable, so
        // FUA is native.
        Ok(Caps {
            rotational: self.next.caps()?.rotational,
            ..Caps::FULL
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        for run in ov.runs(offset, end) {
            let (pos, pe) = (run.start, run.end);
            let piece = &mut buf[(pos - offset) as usize..(pe - offset) as usize];
            match run.state {
                DATA => ov.store.read_at(piece, pos)?,
                ZERO => piece.fill(0),
                _ if self.on_read.active() => self.copy_up(pos, pe, Some(piece)).await?,
                _ => self.next.pread(piece, pos, flags).await?,
            }
        }
        Ok(())
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let (first, last) = ov.blocks(offset, end);
        let _g = ov.locks.lock(first, last).await;
        let data = |s: u64, e: u64| &buf[(s - offset) as usize..(e - offset) as usize];
        for piece in ov.pieces(offset, end) {
            match piece {
                // A run of whole blocks: straight into the overlay.
                Piece::Whole {
                    first,
                    last,
                    start,
                    end,
                } => {
                    ov.store.write_at(data(start, end), start)?;
                    ov.map.set_range(first, last, DATA);
                }
                // Part of a block: read, modify, write.
                Piece::Part {
                    blk,
                    block_start,
                    start,
                    end,
                    ..
                } => {
                    let mut b = self.read_block(blk).await?;
                    b[(start - block_start) as usize..(end - block_start) as usize]
                        .copy_from_slice(data(start, end));
                    ov.store.write_at(&b, block_start)?;
                    ov.map.set(blk, DATA);
                }
            }
        }
        Ok(())
    }

    async fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }

    async fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, count)?;
        let end = offset + count;
        let (first, last) = ov.blocks(offset, end);
        let _g = ov.locks.lock(first, last).await;
        for piece in ov.pieces(offset, end) {
            match piece {
                Piece::Whole {
                    first,
                    last,
                    start,
                    end,
                } => {
                    ov.map.set_range(first, last, ZERO);
                    ov.store.punch(start, end - start);
                }
                Piece::Part {
                    blk,
                    block_start,
                    start,
                    end,
                    ..
                } if ov.map.get(blk) != ZERO => {
                    let mut b = self.read_block(blk).await?;
                    b[(start - block_start) as usize..(end - block_start) as usize].fill(0);
                    ov.store.write_at(&b, block_start)?;
                    ov.map.set(blk, DATA);
                }
                Piece::Part { .. } => {}
            }
        }
        Ok(())
    }

    async fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, count)?;
        // Only whole blocks; the unaligned ends are ignored.
        let (first, last) = ov.whole_blocks(offset, offset + count);
        if first >= last {
            return Ok(());
        }
        let _g = ov.locks.lock(first, last).await;
        ov.map.set_range(first, last, ZERO);
        let s = first * ov.bs;
        ov.store.punch(s, ov.block_end(last - 1) - s);
        Ok(())
    }

    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, count)?;
        for run in ov.runs(offset, offset + count) {
            let (pos, pe) = (run.start, run.end);
            match run.state {
                DATA => ext.add(pos, pe - pos, 0)?,
                ZERO => ext.add(pos, pe - pos, HOLE_ZERO)?,
                _ if !self.next_extents => ext.add(pos, pe - pos, 0)?,
                _ => {
                    // Ask the plugin about this run until it is covered.
                    let mut p = pos;
                    while p < pe {
                        let mut sub = Extents::new(p, pe);
                        self.next
                            .extents(pe - p, p, flags.without(Flags::REQ_ONE), &mut sub)
                            .await?;
                        if sub.next_offset() <= p {
                            ext.add(p, pe - p, 0)?;
                            break;
                        }
                        for e in sub.list() {
                            ext.add(e.offset, e.length, e.flags)?;
                        }
                        p = sub.next_offset();
                    }
                }
            }
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
        }
        Ok(())
    }

    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, count)?;
        let end = offset + count;
        if self.on_cache {
            return self.copy_up(offset, end, None).await;
        }
        if !self.next_cache {
            return Ok(());
        }
        for run in ov.runs(offset, end) {
            if run.state == BASE {
                self.next
                    .cache(run.end - run.start, run.start, flags)
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    const MB: usize = 1 << 20;

    fn cow(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut Params::parse(words, None).unwrap()).unwrap()
    }

    #[test]
    fn parameters() {
        let bad = |w: &[&str]| create(&mut Params::parse(w, None).unwrap()).is_err();
        assert!(bad(&["cow-block-size=1000"]));
        assert!(bad(&["cow-block-size=2048"]));
        assert!(bad(&["cow-on-read=sometimes"]));
        assert!(!bad(&[
            "cow-block-size=4k",
            "cow-on-read=/tmp/x",
            "cow-on-cache=true"
        ]));
        let mut p = Params::parse(&["cow-block-size=4k", "file=x"], None).unwrap();
        create(&mut p).unwrap();
        assert_eq!(p.items().len(), 1);
    }

    #[tokio::test]
    async fn writes_stay_in_the_overlay() {
        let (stack, log, mem) = mem_stack(cow(&["cow-block-size=4096"]), MB);
        let base = mem.snapshot();
        let h = stack.open(&OpenContext::default()).await.unwrap();
        assert!(h.caps().unwrap().write);
        assert_eq!(
            *mem.opened_readonly
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![true]
        );
        // Unaligned write across blocks, whole blocks, zero, trim.
        h.pwrite(&[0xAA; 5000], 1000, Flags::NONE).await.unwrap();
        h.pwrite(&[0xBB; 8192], 65536, Flags::NONE).await.unwrap();
        h.zero(100, 20000, Flags::NONE).await.unwrap();
        h.zero(8192, 32768, Flags::MAY_TRIM).await.unwrap();
        h.trim(4096 * 3 + 10, 200704 - 5, Flags::NONE)
            .await
            .unwrap();
        let mut want = base.clone();
        want[1000..6000].fill(0xAA);
        want[65536..73728].fill(0xBB);
        want[20000..20100].fill(0);
        want[32768..40960].fill(0);
        // The trim covers whole blocks 49..=51 only.
        want[200704..212992].fill(0);
        let got = read(&*h, 0, MB).await;
        assert!(got == want, "reads see the writes");
        assert_eq!(mem.snapshot(), base, "the base is never written");
        assert!(log
            .ops()
            .iter()
            .all(|o| matches!(o, Op::Read(..) | Op::Extents(..))));
        // A second connection sees the same overlay.
        let h2 = stack.open(&OpenContext::default()).await.unwrap();
        assert!(read(&*h2, 0, MB).await == want);
    }

    #[tokio::test]
    async fn extents_mix_overlay_and_base() {
        let (stack, _, _) = mem_stack(cow(&["cow-block-size=4096"]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let half = (MB / 2) as u64;
        // Base: data then a zero hole.
        assert_eq!(
            extents(&*h, 0, MB as u64).await,
            vec![(0, half, 0), (half, half, HOLE_ZERO)]
        );
        h.pwrite(&[1; 4096], half + 8192, Flags::NONE)
            .await
            .unwrap();
        h.zero(8192, 0, Flags::NONE).await.unwrap();
        assert_eq!(
            extents(&*h, 0, MB as u64).await,
            vec![
                (0, 8192, HOLE_ZERO),
                (8192, half - 8192, 0),
                (half, 8192, HOLE_ZERO),
                (half + 8192, 4096, 0),
                (half + 12288, half - 12288, HOLE_ZERO)
            ]
        );
    }

    #[tokio::test]
    async fn cow_on_read_serves_the_second_read_from_the_overlay() {
        let (stack, log, _) = mem_stack(cow(&["cow-on-read=true"]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let a = read(&*h, 1000, 70000).await;
        assert_eq!(log.ops(), vec![Op::Read(0, 131072)]);
        let b = read(&*h, 1000, 70000).await;
        assert_eq!(a, b);
        assert_eq!(log.ops().len(), 1, "second read from the overlay");
        let mut want = vec![0u8; 70000];
        pattern(&mut want, 1000);
        assert_eq!(a, want);
    }

    #[tokio::test]
    async fn cow_on_read_path_switch() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("on");
        let (stack, log, _) = mem_stack(cow(&[&format!("cow-on-read={}", flag.display())]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        read(&*h, 0, 4096).await;
        read(&*h, 0, 4096).await;
        assert_eq!(log.ops().len(), 2, "off while the path is missing");
        std::fs::write(&flag, "").unwrap();
        read(&*h, 0, 4096).await;
        read(&*h, 0, 4096).await;
        assert_eq!(log.ops().len(), 3, "on while it exists");
    }

    #[tokio::test]
    async fn cache_requests() {
        let (stack, log, _) = mem_stack(cow(&[]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.cache(4096, 0, Flags::NONE).await.unwrap();
        assert_eq!(log.ops(), vec![Op::Cache(0, 4096)]);
        let (stack, log, _) = mem_stack(cow(&["cow-on-cache=true"]), MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        h.cache(4096, 0, Flags::NONE).await.unwrap();
        assert_eq!(log.ops(), vec![Op::Read(0, 65536)]);
        read(&*h, 0, 4096).await;
        assert_eq!(log.ops().len(), 1);
    }

    #[tokio::test]
    async fn unaligned_size_and_concurrent_writes() {
        let size = 100_000;
        let (stack, _, mem) = mem_stack(cow(&["cow-block-size=4k"]), size);
        let base = mem.snapshot();
        let h: Arc<dyn Handle> = Arc::from(stack.open(&OpenContext::default()).await.unwrap());
        assert_eq!(h.size().unwrap(), size as u64);
        // Many small unaligned writes into the same blocks at once.
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.pwrite(&[i as u8 + 1; 100], 97_000 + i * 31, Flags::NONE)
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(h
            .pwrite(&[0; 100], size as u64 - 50, Flags::NONE)
            .await
            .is_err());
        let got = read(&*h, 0, size).await;
        let mut want = base.clone();
        for i in 0..64u64 {
            let s = (97_000 + i * 31) as usize;
            want[s..s + 100].fill(i as u8 + 1);
        }
        assert!(got == want);
        h.trim(size as u64 - 4096 * 24, 4096 * 24, Flags::NONE)
            .await
            .unwrap();
        let got = read(&*h, 4096 * 24, size - 4096 * 24).await;
        assert!(
            got.iter().all(|b| *b == 0),
            "trim reaches the short last block"
        );
    }
}
