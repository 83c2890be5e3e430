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

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    BlockSize, Cache, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags,
    Handle, Next, OpenContext, Params, Result,
};

use blocks::{BlockLocks, StateMap, Store};

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

/// A `true|false|/PATH` switch, as `cow-on-read` and `cache-on-read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Switch {
    Off,
    On,
    /// On while this file exists.
    WhilePath(PathBuf),
}

impl Switch {
    pub(crate) fn parse(key: &str, v: &str) -> ConfigResult<Switch> {
        if v.starts_with('/') {
            return Ok(Switch::WhilePath(PathBuf::from(v)));
        }
        match libnbd::parse_bool(v) {
            Ok(true) => Ok(Switch::On),
            Ok(false) => Ok(Switch::Off),
            Err(e) => Err(ConfigError::new(format!(
                "{key}: {e} (expected true, false or an absolute path)"
            ))),
        }
    }
    pub(crate) fn active(&self) -> bool {
        match self {
            Switch::Off => false,
            Switch::On => true,
            Switch::WhilePath(p) => p.exists(),
        }
    }
}

/// Parse a block size parameter: a power of 2 of at least 4096.
pub(crate) fn parse_block_size(key: &str, v: Option<u64>, default: u64) -> ConfigResult<u64> {
    let bs = v.unwrap_or(default);
    if bs < 4096 || !bs.is_power_of_two() {
        return Err(ConfigError::new(format!(
            "{key} must be a power of 2 and at least 4096"
        )));
    }
    if bs > 1 << 30 {
        return Err(ConfigError::new(format!("{key} is too large (at most 1G)")));
    }
    Ok(bs)
}

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

/// The overlay shared by every connection.
struct Overlay {
    store: Store,
    map: StateMap,
    locks: BlockLocks,
    bs: u64,
    size: u64,
}

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
                Ok::<_, Error>(Arc::new(Overlay {
                    store: Store::new(size)?,
                    map: StateMap::new(),
                    locks: BlockLocks::new(),
                    bs,
                    size,
                }))
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

impl Overlay {
    /// End of the block `blk` (the last block may be short).
    fn block_end(&self, blk: u64) -> u64 {
        ((blk + 1) * self.bs).min(self.size)
    }
    /// Refuse a range beyond the end (the server checks first; this
    /// keeps the block loops finite whoever calls).
    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::einval(format!(
                "cow: request {off}+{len} beyond the end ({})",
                self.size
            ))),
        }
    }
    /// Blocks `[first, end)` touched by the byte range `[off, end)`.
    fn blocks(&self, off: u64, end: u64) -> (u64, u64) {
        (off / self.bs, end.div_ceil(self.bs))
    }
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
        let mut blk = first;
        while blk < last {
            let (state, run_end) = ov.map.run(blk, last);
            let rs = blk * ov.bs;
            let re = ov.block_end(run_end - 1);
            // The part of the run inside [off, end).
            let (ps, pe) = (rs.max(off), re.min(end));
            match state {
                BASE => {
                    let mut tmp = vec![0u8; (re - rs) as usize];
                    self.next.pread(&mut tmp, rs, Flags::NONE).await?;
                    ov.store.write_at(&tmp, rs)?;
                    ov.map.set_range(blk, run_end, DATA);
                    if let Some(o) = out.as_deref_mut() {
                        o[(ps - off) as usize..(pe - off) as usize]
                            .copy_from_slice(&tmp[(ps - rs) as usize..(pe - rs) as usize]);
                    }
                }
                DATA => {
                    if let Some(o) = out.as_deref_mut() {
                        ov.store
                            .read_at(&mut o[(ps - off) as usize..(pe - off) as usize], ps)?;
                    }
                }
                _ => {
                    if let Some(o) = out.as_deref_mut() {
                        o[(ps - off) as usize..(pe - off) as usize].fill(0);
                    }
                }
            }
            blk = run_end;
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
        let (_, last) = ov.blocks(offset, end);
        let mut pos = offset;
        while pos < end {
            let blk = pos / ov.bs;
            let (state, run_end) = ov.map.run(blk, last);
            let pe = ov.block_end(run_end - 1).min(end);
            let piece = &mut buf[(pos - offset) as usize..(pe - offset) as usize];
            match state {
                DATA => ov.store.read_at(piece, pos)?,
                ZERO => piece.fill(0),
                _ if self.on_read.active() => self.copy_up(pos, pe, Some(piece)).await?,
                _ => self.next.pread(piece, pos, flags).await?,
            }
            pos = pe;
        }
        Ok(())
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let (first, last) = ov.blocks(offset, end);
        let _g = ov.locks.lock(first, last).await;
        let mut pos = offset;
        while pos < end {
            let blk = pos / ov.bs;
            let bstart = blk * ov.bs;
            let bend = ov.block_end(blk);
            if pos == bstart && end >= bend {
                // A run of whole blocks: straight into the overlay.
                let full_end = if end >= ov.size {
                    ov.size
                } else {
                    end / ov.bs * ov.bs
                };
                ov.store.write_at(
                    &buf[(pos - offset) as usize..(full_end - offset) as usize],
                    pos,
                )?;
                ov.map.set_range(blk, full_end.div_ceil(ov.bs), DATA);
                pos = full_end;
            } else {
                // Part of a block: read, modify, write.
                let wend = end.min(bend);
                let mut b = self.read_block(blk).await?;
                b[(pos - bstart) as usize..(wend - bstart) as usize]
                    .copy_from_slice(&buf[(pos - offset) as usize..(wend - offset) as usize]);
                ov.store.write_at(&b, bstart)?;
                ov.map.set(blk, DATA);
                pos = wend;
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
        let mut pos = offset;
        while pos < end {
            let blk = pos / ov.bs;
            let bstart = blk * ov.bs;
            let bend = ov.block_end(blk);
            let wend = end.min(bend);
            if pos == bstart && wend == bend {
                ov.map.set(blk, ZERO);
                ov.store.punch(bstart, bend - bstart);
            } else if ov.map.get(blk) != ZERO {
                let mut b = self.read_block(blk).await?;
                b[(pos - bstart) as usize..(wend - bstart) as usize].fill(0);
                ov.store.write_at(&b, bstart)?;
                ov.map.set(blk, DATA);
            }
            pos = wend;
        }
        Ok(())
    }

    async fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let ov = &self.ov;
        ov.check(offset, count)?;
        let end = offset + count;
        // Only whole blocks; the unaligned ends are ignored.
        let first = offset.div_ceil(ov.bs);
        let last = if end >= ov.size {
            ov.size.div_ceil(ov.bs)
        } else {
            end / ov.bs
        };
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
        let end = offset + count;
        let (_, last) = ov.blocks(offset, end);
        let mut pos = offset;
        while pos < end {
            let blk = pos / ov.bs;
            let (state, run_end) = ov.map.run(blk, last);
            let pe = ov.block_end(run_end - 1).min(end);
            match state {
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
            pos = pe;
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
        let (_, last) = ov.blocks(offset, end);
        let mut pos = offset;
        while pos < end {
            let blk = pos / ov.bs;
            let (state, run_end) = ov.map.run(blk, last);
            let pe = ov.block_end(run_end - 1).min(end);
            if state == BASE {
                self.next.cache(pe - pos, pos, flags).await?;
            }
            pos = pe;
        }
        Ok(())
    }
}

/// Blocks kept in a temporary file, as the cow and cache filters do:
/// the file, a compact map of 2-bit block states, and block locks.
pub(crate) mod blocks {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, RwLock};

    use libnbd::{Error, Result};

    /// Run blocking file I/O: off the reactor when the runtime can move
    /// its other tasks away (multi-thread), inline otherwise.
    pub(crate) fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(f)
            }
            _ => f(),
        }
    }

    /// Where temporary block files go: `$TMPDIR`, else `/var/tmp`.
    pub(crate) fn tmpdir() -> PathBuf {
        std::env::var_os("TMPDIR")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"))
    }

    /// A sparse temporary file, unlinked as soon as it is created.
    pub(crate) struct Store {
        file: File,
    }

    impl Store {
        /// A new empty (sparse) file of `size` bytes.
        pub(crate) fn new(size: u64) -> Result<Store> {
            let dir = tmpdir();
            let file = tempfile::tempfile_in(&dir)
                .map_err(|e| Error::io(format!("temporary file in {}", dir.display()), e))?;
            file.set_len(size)
                .map_err(|e| Error::io("sizing the temporary file", e))?;
            Ok(Store { file })
        }
        /// The file system's preferred I/O size for the file.
        pub(crate) fn fs_block_size(&self) -> u64 {
            use std::os::unix::fs::MetadataExt;
            self.file.metadata().map(|m| m.blksize()).unwrap_or(4096)
        }
        pub(crate) fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
            run_blocking(|| self.file.read_exact_at(buf, off))
                .map_err(|e| Error::io("reading the temporary file", e))
        }
        pub(crate) fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
            run_blocking(|| self.file.write_all_at(buf, off))
                .map_err(|e| Error::io("writing the temporary file", e))
        }
        /// Give the space of a range back (best effort: reads of it are
        /// never relied on afterwards).
        pub(crate) fn punch(&self, off: u64, len: u64) {
            use nix::fcntl::{fallocate, FallocateFlags};
            if len == 0 {
                return;
            }
            let _ = run_blocking(|| {
                fallocate(
                    self.file.as_raw_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            });
        }
    }

    /// 64-bit words per page of the state map (32 blocks per word).
    const PAGE_WORDS: usize = 512;
    /// Blocks per page.
    const PAGE_BLOCKS: u64 = PAGE_WORDS as u64 * 32;
    /// The low bit of every 2-bit field.
    const LOW_BITS: u64 = 0x5555_5555_5555_5555;

    type Page = Arc<[AtomicU64]>;

    /// A state of 0..=3 per block, 0 for blocks never set. Pages are
    /// allocated on first use, so a huge sparse disk costs nothing.
    pub(crate) struct StateMap {
        pages: RwLock<BTreeMap<u64, Page>>,
    }

    impl StateMap {
        pub(crate) fn new() -> Self {
            StateMap {
                pages: RwLock::new(BTreeMap::new()),
            }
        }

        fn page(&self, p: u64) -> Option<Page> {
            self.pages.read().unwrap().get(&p).cloned()
        }

        fn page_mut(&self, p: u64) -> Page {
            if let Some(pg) = self.page(p) {
                return pg;
            }
            self.pages
                .write()
                .unwrap()
                .entry(p)
                .or_insert_with(|| (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect())
                .clone()
        }

        /// The state of a block.
        pub(crate) fn get(&self, blk: u64) -> u8 {
            match self.page(blk / PAGE_BLOCKS) {
                None => 0,
                Some(pg) => {
                    let i = (blk % PAGE_BLOCKS) as usize;
                    ((pg[i / 32].load(Ordering::Acquire) >> ((i % 32) * 2)) & 3) as u8
                }
            }
        }

        /// Set a block's state; returns the old one.
        pub(crate) fn set(&self, blk: u64, v: u8) -> u8 {
            if v == 0 && self.page(blk / PAGE_BLOCKS).is_none() {
                return 0;
            }
            let pg = self.page_mut(blk / PAGE_BLOCKS);
            let i = (blk % PAGE_BLOCKS) as usize;
            let shift = (i % 32) * 2;
            let old = pg[i / 32]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    Some((w & !(3 << shift)) | ((v as u64) << shift))
                })
                .unwrap();
            ((old >> shift) & 3) as u8
        }

        /// Set blocks `[first, end)`.
        pub(crate) fn set_range(&self, first: u64, end: u64, v: u8) {
            for b in first..end {
                self.set(b, v);
            }
        }

        /// The state of `blk` and the end of the run of blocks from `blk`
        /// with that state, at most `limit`.
        pub(crate) fn run(&self, blk: u64, limit: u64) -> (u8, u64) {
            let pages = self.pages.read().unwrap();
            let get = |b: u64| -> u8 {
                match pages.get(&(b / PAGE_BLOCKS)) {
                    None => 0,
                    Some(pg) => {
                        let i = (b % PAGE_BLOCKS) as usize;
                        ((pg[i / 32].load(Ordering::Acquire) >> ((i % 32) * 2)) & 3) as u8
                    }
                }
            };
            let s = get(blk);
            let mut e = blk + 1;
            while e < limit {
                // Skip whole absent pages quickly when looking at zeroes.
                if s == 0
                    && e.is_multiple_of(PAGE_BLOCKS)
                    && !pages.contains_key(&(e / PAGE_BLOCKS))
                {
                    e = (e + PAGE_BLOCKS).min(limit);
                    continue;
                }
                if get(e) != s {
                    break;
                }
                e += 1;
            }
            (s, e)
        }

        /// The first block at or after `from` whose state is not 0.
        pub(crate) fn find_any(&self, from: u64) -> Option<u64> {
            let a = self.find(from, 1);
            let b = self.find(from, 2);
            let c = self.find(from, 3);
            [a, b, c].into_iter().flatten().min()
        }

        /// The first block at or after `from` whose state is `want`
        /// (never 0).
        pub(crate) fn find(&self, from: u64, want: u8) -> Option<u64> {
            debug_assert!(want != 0);
            let pages = self.pages.read().unwrap();
            for (&p, pg) in pages.range(from / PAGE_BLOCKS..) {
                let base = p * PAGE_BLOCKS;
                let start = from.saturating_sub(base).min(PAGE_BLOCKS) as usize;
                for wi in start / 32..PAGE_WORDS {
                    let w = pg[wi].load(Ordering::Acquire);
                    let hi = (w >> 1) & LOW_BITS;
                    let lo = w & LOW_BITS;
                    let mut m = match want {
                        1 => lo & !hi,
                        2 => hi & !lo,
                        _ => lo & hi,
                    };
                    if wi == start / 32 {
                        // Drop fields before `from` in the first word.
                        let skip = (start % 32) * 2;
                        m &= !0u64 << skip;
                    }
                    if m != 0 {
                        return Some(base + wi as u64 * 32 + (m.trailing_zeros() / 2) as u64);
                    }
                }
            }
            None
        }
    }

    /// Locks over blocks, striped: a block's lock is shared with the
    /// blocks whose number is the same modulo the stripe count. Readers
    /// share a lock, writers hold it alone.
    pub(crate) struct BlockLocks {
        stripes: Vec<tokio::sync::RwLock<()>>,
    }

    const STRIPES: u64 = 64;

    impl BlockLocks {
        pub(crate) fn new() -> Self {
            BlockLocks {
                stripes: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            }
        }
        /// The stripes of blocks `[first, end)` in order (so two lockers
        /// of overlapping ranges never deadlock).
        fn stripes(first: u64, end: u64) -> Vec<usize> {
            let n = end.saturating_sub(first);
            let mut idx: Vec<usize> = if n >= STRIPES {
                (0..STRIPES as usize).collect()
            } else {
                (first..end).map(|b| (b % STRIPES) as usize).collect()
            };
            idx.sort_unstable();
            idx.dedup();
            idx
        }
        /// Lock blocks `[first, end)` for changing them.
        pub(crate) async fn lock(
            &self,
            first: u64,
            end: u64,
        ) -> Vec<tokio::sync::RwLockWriteGuard<'_, ()>> {
            let mut g = Vec::new();
            for i in Self::stripes(first, end) {
                g.push(self.stripes[i].write().await);
            }
            g
        }
        /// Lock blocks `[first, end)` for reading them.
        pub(crate) async fn lock_shared(
            &self,
            first: u64,
            end: u64,
        ) -> Vec<tokio::sync::RwLockReadGuard<'_, ()>> {
            let mut g = Vec::new();
            for i in Self::stripes(first, end) {
                g.push(self.stripes[i].read().await);
            }
            g
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn state_map_runs_and_find() {
            let m = StateMap::new();
            assert_eq!(m.get(5), 0);
            assert_eq!(m.run(0, 100), (0, 100));
            m.set_range(10, 20, 1);
            m.set(15, 2);
            assert_eq!(m.run(0, 100), (0, 10));
            assert_eq!(m.run(10, 100), (1, 15));
            assert_eq!(m.run(15, 100), (2, 16));
            assert_eq!(m.find(0, 2), Some(15));
            assert_eq!(m.find(16, 2), None);
            assert_eq!(m.find(11, 1), Some(11));
            assert_eq!(m.find(16, 1), Some(16));
            let far = PAGE_BLOCKS * 7 + 3;
            m.set(far, 2);
            assert_eq!(m.find(16, 2), Some(far));
            assert_eq!(m.run(20, far + 5), (0, far));
            assert_eq!(m.set(far, 0), 2);
            assert_eq!(m.get(far), 0);
            // Huge disks cost nothing until touched.
            assert_eq!(m.run(1 << 40, (1 << 40) + 10), (0, (1 << 40) + 10));
        }

        #[test]
        fn store_round_trip_and_punch() {
            let s = Store::new(1 << 20).unwrap();
            s.write_at(b"hello", 4096).unwrap();
            let mut b = [0u8; 5];
            s.read_at(&mut b, 4096).unwrap();
            assert_eq!(&b, b"hello");
            s.punch(0, 65536);
            s.read_at(&mut b, 4096).unwrap();
            assert_eq!(b, [0; 5]);
        }

        #[tokio::test]
        async fn locks_overlapping_ranges() {
            let l = BlockLocks::new();
            let g = l.lock(0, 1000).await;
            assert_eq!(g.len(), STRIPES as usize);
            drop(g);
            let a = l.lock(3, 5).await;
            let b = l.lock(5, 7).await; // 5..7 = stripes 5, 6: no overlap with 3, 4
            drop((a, b));
            let a = l.lock_shared(0, 3).await;
            let b = l.lock_shared(1, 2).await;
            drop((a, b));
        }
    }
}

/// A small in-memory plugin with a request log, for the unit tests of
/// every filter in this crate.
#[cfg(test)]
pub(crate) mod testkit {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use libnbd::backend::HOLE_ZERO;
    use libnbd::{
        BlockSize, Cache, Caps, Error, Extents, Filter, Flags, Handle, OpenContext, Plugin, Result,
        Stack,
    };

    /// A request that reached the plugin.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Op {
        Read(u64, u64),
        Write(u64, u64),
        Zero(u64, u64),
        Trim(u64, u64),
        Flush,
        Cache(u64, u64),
        Extents(u64, u64),
    }

    /// The plugin's request log.
    #[derive(Default)]
    pub(crate) struct Log(Mutex<Vec<Op>>);

    impl Log {
        pub(crate) fn ops(&self) -> Vec<Op> {
            self.0.lock().unwrap().clone()
        }
        pub(crate) fn clear(&self) {
            self.0.lock().unwrap().clear()
        }
        fn push(&self, op: Op) {
            self.0.lock().unwrap().push(op)
        }
        /// Bytes read by the plugin so far.
        pub(crate) fn bytes_read(&self) -> u64 {
            self.ops()
                .iter()
                .map(|o| if let Op::Read(_, n) = o { *n } else { 0 })
                .sum()
        }
    }

    /// The disk and its knobs.
    pub(crate) struct Mem {
        pub(crate) data: Mutex<Vec<u8>>,
        /// Read-only flags of every open, in order.
        pub(crate) opened_readonly: Mutex<Vec<bool>>,
        /// Sleep this long in each read.
        pub(crate) read_delay: Mutex<Duration>,
        /// Block size constraints to report.
        pub(crate) block_size: Mutex<Option<BlockSize>>,
        /// Refuse reads and writes not aligned to this (if non-zero).
        pub(crate) require_align: Mutex<u64>,
        /// Largest read or write accepted (if non-zero).
        pub(crate) max_io: Mutex<u64>,
        /// Cache answer.
        pub(crate) cache: Mutex<Cache>,
    }

    impl Mem {
        /// A disk filled with a recognisable pattern: byte i is
        /// `(i / 512 + i) as u8`... except the second half, left zero.
        pub(crate) fn new(size: usize) -> Arc<Mem> {
            let mut data = vec![0u8; size];
            pattern(&mut data[..size / 2], 0);
            Arc::new(Mem {
                data: Mutex::new(data),
                opened_readonly: Mutex::new(Vec::new()),
                read_delay: Mutex::new(Duration::ZERO),
                block_size: Mutex::new(None),
                require_align: Mutex::new(0),
                max_io: Mutex::new(0),
                cache: Mutex::new(Cache::Native),
            })
        }
        pub(crate) fn snapshot(&self) -> Vec<u8> {
            self.data.lock().unwrap().clone()
        }
    }

    /// Fill with the test pattern for offset `off`.
    pub(crate) fn pattern(buf: &mut [u8], off: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            let x = off + i as u64;
            *b = (x / 4096 * 7 + x / 13) as u8 | 1;
        }
    }

    struct MemPlugin {
        mem: Arc<Mem>,
        log: Arc<Log>,
    }

    struct MemHandle {
        mem: Arc<Mem>,
        log: Arc<Log>,
        readonly: bool,
    }

    #[async_trait]
    impl Plugin for MemPlugin {
        async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
            self.mem.opened_readonly.lock().unwrap().push(ctx.readonly);
            Ok(Box::new(MemHandle {
                mem: self.mem.clone(),
                log: self.log.clone(),
                readonly: ctx.readonly,
            }))
        }
    }

    impl MemHandle {
        fn check(&self, off: u64, len: u64) -> Result<()> {
            let a = *self.mem.require_align.lock().unwrap();
            if a > 0 && (!off.is_multiple_of(a) || !len.is_multiple_of(a)) {
                return Err(Error::einval(format!("unaligned request {off}+{len}")));
            }
            let m = *self.mem.max_io.lock().unwrap();
            if m > 0 && len > m {
                return Err(Error::einval(format!("request too large {len}")));
            }
            let size = self.mem.data.lock().unwrap().len() as u64;
            if off + len > size {
                return Err(Error::einval(format!("beyond the end {off}+{len}")));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Handle for MemHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.mem.data.lock().unwrap().len() as u64)
        }
        fn block_size(&self) -> Result<Option<BlockSize>> {
            Ok(*self.mem.block_size.lock().unwrap())
        }
        fn caps(&self) -> Result<Caps> {
            Ok(Caps {
                write: !self.readonly,
                cache: *self.mem.cache.lock().unwrap(),
                ..Caps::FULL
            })
        }
        async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
            self.check(offset, buf.len() as u64)?;
            let d = *self.mem.read_delay.lock().unwrap();
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            self.log.push(Op::Read(offset, buf.len() as u64));
            let data = self.mem.data.lock().unwrap();
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
            if self.readonly {
                return Err(Error::eperm("read-only"));
            }
            self.check(offset, buf.len() as u64)?;
            self.log.push(Op::Write(offset, buf.len() as u64));
            let mut data = self.mem.data.lock().unwrap();
            data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        async fn flush(&self, _flags: Flags) -> Result<()> {
            self.log.push(Op::Flush);
            Ok(())
        }
        async fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
            if self.readonly {
                return Err(Error::eperm("read-only"));
            }
            self.log.push(Op::Trim(offset, count));
            let mut data = self.mem.data.lock().unwrap();
            data[offset as usize..(offset + count) as usize].fill(0);
            Ok(())
        }
        async fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
            if self.readonly {
                return Err(Error::eperm("read-only"));
            }
            self.log.push(Op::Zero(offset, count));
            let mut data = self.mem.data.lock().unwrap();
            data[offset as usize..(offset + count) as usize].fill(0);
            Ok(())
        }
        async fn extents(
            &self,
            count: u64,
            offset: u64,
            _f: Flags,
            ext: &mut Extents,
        ) -> Result<()> {
            self.log.push(Op::Extents(offset, count));
            // 4K granularity: all-zero blocks are holes.
            let data = self.mem.data.lock().unwrap();
            let mut pos = offset / 4096 * 4096;
            while pos < offset + count {
                let e = (pos + 4096).min(data.len() as u64);
                let zero = data[pos as usize..e as usize].iter().all(|b| *b == 0);
                ext.add(pos, e - pos, if zero { HOLE_ZERO } else { 0 })?;
                pos = e;
            }
            Ok(())
        }
        async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
            self.log.push(Op::Cache(offset, count));
            Ok(())
        }
    }

    /// A stack of filters (outermost first) over a fresh memory disk.
    pub(crate) fn stack_of(
        filters: Vec<Arc<dyn Filter>>,
        size: usize,
    ) -> (Stack, Arc<Log>, Arc<Mem>) {
        let mem = Mem::new(size);
        let log = Arc::new(Log::default());
        let stack = Stack {
            filters,
            plugin: Arc::new(MemPlugin {
                mem: mem.clone(),
                log: log.clone(),
            }),
        };
        (stack, log, mem)
    }

    /// One filter over a fresh memory disk.
    pub(crate) fn mem_stack(f: Arc<dyn Filter>, size: usize) -> (Stack, Arc<Log>, Arc<Mem>) {
        stack_of(vec![f], size)
    }

    /// Read a range through a handle.
    pub(crate) async fn read(h: &dyn Handle, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        h.pread(&mut v, off, Flags::NONE).await.unwrap();
        v
    }

    /// Extents of a range as (offset, length, flags).
    pub(crate) async fn extents(h: &dyn Handle, off: u64, len: u64) -> Vec<(u64, u64, u32)> {
        let mut e = Extents::new(off, off + len);
        h.extents(len, off, Flags::NONE, &mut e).await.unwrap();
        e.list()
            .iter()
            .map(|x| (x.offset, x.length, x.flags))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;

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
        assert_eq!(*mem.opened_readonly.lock().unwrap(), vec![true]);
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
