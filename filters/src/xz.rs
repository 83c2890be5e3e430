//! # xz: serve the uncompressed content of an xz file
//!
//! The layer below holds an `.xz` file; clients see the data it
//! compresses, read-only. Like nbdkit's xz filter, random access goes
//! through the xz index: only the block holding the requested bytes is
//! decoded, and recently decoded blocks are kept in an LRU cache.
//!
//! ```text
//! nbdkit --filter=xz file disk.img.xz
//! nbdkit --filter=xz curl https://example.com/disk.raw.xz --run 'nbdinfo $uri'
//! nbdkit --filter=xz curl https://example.com/disk.raw.xz \
//!     --run 'nbdcopy -p -- $uri [ qemu-nbd -f qcow2 out.qcow2 ]'
//! ```
//!
//! ## Parameters
//!
//! - `xz-max-depth=N` (default 8): how many decoded blocks the LRU cache
//!   keeps per connection that reads (one that only asks for the size or
//!   extents takes no room). The cache is shared by every connection to the
//!   same export, and so are the blocks decoded ahead (below): as upstream,
//!   memory use is at most about N × the largest cached block (see
//!   `xz-max-block`) per connection, plus a compressed block per block
//!   being decoded. Blocks that sequential readers have moved two blocks
//!   past go first, as soon as the cache holds more than a sequential
//!   reader needs (the two blocks before its own, its own, and those
//!   decoded ahead: 6 on 2 cores) or than N if smaller: connections
//!   reading one image in turn, as nbdcopy's four, keep those few blocks
//!   between them.
//! - `xz-max-block=SIZE` (default 512M): the largest block decoded whole
//!   into memory; blocks larger than this, or than 64M, are decoded
//!   progressively into the spill instead (upstream refuses files with
//!   blocks larger than `xz-max-block`; we serve them).
//! - `xz-spill-max=SIZE` (default 8G, at least 128M): the most decoded
//!   data the spill file keeps (all-zero parts cost nothing).
//!
//! ## Beyond upstream
//!
//! - **Parallel decoding ahead of sequential readers.** When a reader
//!   moves from one block to the next (a copy, a boot), the following
//!   blocks are fetched and decoded in the background, as many at once as
//!   there are cores, ahead of the reader, within the cache (`xz-max-depth`
//!   blocks): a full copy runs at the speed of a multi-threaded `xz -d`.
//!   Nothing is started until the first read. Each connection's
//!   sequential run is followed, so that blocks are marked passed only by
//!   a connection that read its way through them, and a block passed and
//!   dropped is not decoded ahead again unless it is read again: libnbd's
//!   nbdcopy copies a region per connection, and the end of one region
//!   used to decode again the start of the next, already read.
//! - **A faster liblzma.** The decoder is xz 5.8's, bundled and built
//!   with what its configure finds on x86-64 (`.cargo/config.toml`):
//!   35% less CPU per block than Debian's liblzma 5.4, which upstream
//!   links.
//! - **Replies straight from the cache.** A read within one cached block
//!   is sent from the block itself, not copied into a reply buffer first
//!   ([`Handle::pread_shared`]).
//! - **Single-block files stay usable.** Plain `xz` writes one block, so
//!   upstream decodes from the start of the file for every read outside
//!   its cache. Here such a block (and any block above the in-memory
//!   limit) is decoded progressively, once: what was decoded is kept in a
//!   sparse, unnamed temporary file (the spill, in `$TMPDIR`, default
//!   `/var/tmp`, gone when the server exits), random reads of decoded
//!   parts are reads of that file, and a read further on moves the decoder
//!   on from where it is. Past `xz-spill-max` the least recently used
//!   parts are dropped, and only reading one of those again decodes the
//!   block from its start again.
//!
//! ## Behaviour
//!
//! The export is read-only (the layer below is opened read-only), its size
//! is the uncompressed size; multi-stream files and stream padding are
//! handled; extents report all data. Corruption gives EIO with a message
//! naming the block, never wrong data: a block decoded whole is checked
//! (CRC32, CRC64 or SHA-256 as the file says) before any of it is served.
//! A spilled block's check can only be verified when its decoder reaches
//! its end; if it fails there, every later read of the block fails.

mod decode;
mod index;
mod spill;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use libnbd::{
    BlockSize, Cache, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags,
    Handle, Next, OpenContext, Params, Result, SharedData,
};
use tokio::sync::{OnceCell, Semaphore};

use index::XzIndex;
use spill::{Spill, SpillBlock, AHEAD, CHUNK};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "xz",
    help: "\
xz-max-block=<SIZE> (optional) Largest block decoded whole in memory (default: 512M).
xz-max-depth=<N>    (optional) Maximum blocks in cache (default: 8).
xz-spill-max=<SIZE> (optional) Most data kept decoded on disk (default: 8G).",
    create,
};

/// Blocks above this are always spilled, whatever `xz-max-block` says.
const MEMORY_BLOCK_LIMIT: u64 = 64 << 20;
/// Buffers of evicted blocks kept for reuse.
const SPARE_BUFFERS: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Config {
    max_block: u64,
    depth: usize,
    spill_max: u64,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let max_block = p.take_size("xz-max-block")?.unwrap_or(512 << 20);
    if max_block == 0 {
        return Err(ConfigError::new("xz-max-block must be greater than 0"));
    }
    let depth = p.take_parsed::<usize>("xz-max-depth")?.unwrap_or(8);
    if depth == 0 {
        return Err(ConfigError::new("xz-max-depth must be at least 1"));
    }
    let spill_max = p.take_size("xz-spill-max")?.unwrap_or(8 << 30);
    if spill_max < spill::MIN_MAX {
        return Err(ConfigError::new(format!(
            "xz-spill-max must be at least {}M",
            spill::MIN_MAX >> 20
        )));
    }
    Ok(Arc::new(XzFilter {
        cfg: Config {
            max_block,
            depth,
            spill_max,
        },
        files: Mutex::new(HashMap::new()),
    }))
}

struct XzFilter {
    cfg: Config,
    /// The state of each export, shared by its connections.
    files: Mutex<HashMap<String, Arc<XzFile>>>,
}

#[async_trait]
impl Filter for XzFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let below = OpenContext {
            readonly: true,
            ..ctx.clone()
        };
        let next: Arc<dyn Handle> = Arc::from(next.open(&below).await?);
        let size = next.size()?;
        let index = index::parse(&*next, size).await.inspect_err(|e| {
            // As nbdkit_error does: the reason goes to the server's log.
            libnbd::elog!("nbdkit: xz[{}]: error: {}", ctx.id, e.msg);
        })?;
        let file = {
            let mut files = self
                .files
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match files.get(&ctx.export_name) {
                Some(f) if f.index == index => f.clone(),
                _ => {
                    let f = Arc::new(XzFile::new(index, self.cfg));
                    files.insert(ctx.export_name.clone(), f.clone());
                    f
                }
            }
        };
        Ok(Box::new(XzHandle {
            next,
            file,
            reading: AtomicBool::new(false),
            run: Run::default(),
        }))
    }
}

/// How a block is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Whole, into the LRU cache.
    Memory,
    /// Progressively, into the spill.
    Spill,
}

type Cell = Arc<OnceCell<Arc<Decoded>>>;

/// Things kept for reuse: at most `max` of them.
struct Pool<T> {
    items: Mutex<Vec<T>>,
    max: usize,
}

impl<T> Pool<T> {
    fn new(max: usize) -> Self {
        Pool {
            items: Mutex::new(Vec::new()),
            max,
        }
    }

    fn take(&self) -> Option<T> {
        self.items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    /// Keep `item` for reuse, if the pool has room.
    fn give_back(&self, item: T) {
        let mut items = self
            .items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if items.len() < self.max {
            items.push(item);
        }
    }
}

/// A decoded block. Its buffer goes back to the file's pool when the
/// last reference drops, whether that is the cache's or that of a reply
/// still being sent ([`Handle::pread_shared`]): a fresh buffer costs the
/// kernel clearing its pages on first touch (before this, when replies
/// outlived the cache's reference, most blocks got fresh buffers:
/// clearing them took 10% of the CPU of the headline copy into qcow2).
struct Decoded {
    data: Vec<u8>,
    pool: Arc<Pool<Vec<u8>>>,
}

impl std::ops::Deref for Decoded {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl AsRef<[u8]> for Decoded {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Decoded {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.data));
    }
}

/// A cached block: its cell, its last use, whether a reader has used it
/// (blocks decoded ahead and not read yet are evicted last, so that
/// several sequential readers cannot make the cache thrash), and whether
/// sequential readers have moved two blocks past it.
struct Entry {
    cell: Cell,
    tick: u64,
    used: bool,
    passed: bool,
}

struct Lru {
    map: HashMap<usize, Entry>,
    tick: u64,
    /// Blocks dropped once sequential readers had passed them: not
    /// decoded ahead again (see [`XzFile::ahead_cell`]).
    gone: Vec<bool>,
}

impl Lru {
    /// The entry to drop to make room: never `keep`, nor one being decoded
    /// or waited for; a used one first, the least recently used.
    fn victim(&self, keep: usize, unused_too: bool) -> Option<usize> {
        self.map
            .iter()
            .filter(|(k, e)| {
                **k != keep
                    && (e.used || unused_too)
                    && (e.cell.initialized() || Arc::strong_count(&e.cell) == 1)
            })
            .min_by_key(|(_, e)| (!e.used, e.tick))
            .map(|(k, _)| *k)
    }

    /// Block `i`, passed, is read again: forget what was passed from there
    /// on (what follows may be read again too, and must be neither dropped
    /// first nor left out of the blocks decoded ahead). Sequential readers
    /// mark their blocks passed again as they go on.
    fn read_again(&mut self, i: usize) {
        self.gone[i..].fill(false);
        for (_, e) in self.map.iter_mut().filter(|(k, _)| **k >= i) {
            e.passed = false;
        }
    }

    /// The least recently used block that sequential readers have passed
    /// (never `keep`, nor one being decoded or waited for).
    fn passed_victim(&self, keep: usize) -> Option<usize> {
        self.map
            .iter()
            .filter(|(k, e)| {
                **k != keep && e.passed && (e.cell.initialized() || Arc::strong_count(&e.cell) == 1)
            })
            .min_by_key(|(_, e)| e.tick)
            .map(|(k, _)| *k)
    }
}

/// One xz file: its index, caches and decoders.
struct XzFile {
    index: XzIndex,
    kinds: Vec<Kind>,
    depth: usize,
    /// Connections that have read: the cache holds `depth` blocks for
    /// each (one that only asks for the size or extents, as nbdcopy's
    /// first connection, takes no room).
    handles: AtomicUsize,
    /// Blocks decoded ahead of sequential readers.
    ahead: usize,
    /// Blocks being decoded ahead now.
    prefetching: AtomicUsize,
    lru: Mutex<Lru>,
    /// Buffers of dropped blocks, for the next blocks decoded: a fresh
    /// buffer costs a page fault per page on first touch (9% of the
    /// server's CPU copying a 1 GiB image to `null:`).
    spare: Arc<Pool<Vec<u8>>>,
    /// Buffers of compressed input, likewise (as many as blocks can be
    /// fetched at once: those decoded ahead and one per core for
    /// readers).
    spare_input: Pool<Vec<u8>>,
    /// Decoders of whole blocks, kept with their dictionaries (one per
    /// core at most).
    decoders: Pool<decode::Decoder>,
    /// One decoding job per core at a time, for work done ahead of the
    /// readers (a reader's own block is decoded at once).
    slots: Arc<Semaphore>,
    spill_max: u64,
    /// How far the spill decoder runs ahead of a sequential reader.
    spill_ahead: u64,
    spill: OnceLock<std::result::Result<Arc<Spill>, String>>,
    spill_blocks: HashMap<usize, Arc<SpillBlock>>,
}

impl XzFile {
    fn new(index: XzIndex, cfg: Config) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let limit = cfg.max_block.min(MEMORY_BLOCK_LIMIT);
        let single = index.blocks.len() == 1;
        let kinds: Vec<Kind> = index
            .blocks
            .iter()
            .map(|b| {
                if b.usize > limit || (single && b.usize > CHUNK) {
                    Kind::Spill
                } else {
                    Kind::Memory
                }
            })
            .collect();
        let spill_blocks = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == Kind::Spill)
            .map(|(i, _)| (i, Arc::new(SpillBlock::new(i, index.blocks[i]))))
            .collect();
        let ahead = (cores + 1).min(cfg.depth.saturating_sub(2));
        XzFile {
            kinds,
            depth: cfg.depth,
            handles: AtomicUsize::new(0),
            prefetching: AtomicUsize::new(0),
            ahead,
            lru: Mutex::new(Lru {
                map: HashMap::new(),
                tick: 0,
                gone: vec![false; index.blocks.len()],
            }),
            spare: Arc::new(Pool::new(SPARE_BUFFERS)),
            spare_input: Pool::new(ahead + cores),
            decoders: Pool::new(cores),
            slots: Arc::new(Semaphore::new(cores)),
            spill_max: cfg.spill_max,
            spill_ahead: AHEAD.min(cfg.spill_max / 4),
            spill: OnceLock::new(),
            spill_blocks,
            index,
        }
    }

    fn spill(&self) -> Result<Arc<Spill>> {
        self.spill
            .get_or_init(|| {
                Spill::new(self.index.size, self.spill_max)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| Error::eio(format!("xz: cannot create the spill file: {e}")))
    }

    /// How many blocks the cache holds: `xz-max-depth` per connection, as
    /// upstream (whose caches are per connection), so that the sequential
    /// readers of several connections do not evict each other's blocks.
    /// Blocks that sequential readers have passed are dropped first, and
    /// as soon as the cache holds more than [`sequential_need`]
    /// (see [`trim`](Self::trim)).
    ///
    /// [`sequential_need`]: Self::sequential_need
    fn capacity(&self) -> usize {
        self.depth * self.handles.load(Ordering::Relaxed).max(1)
    }

    /// The blocks a sequential reader needs cached: the two before its
    /// own (other connections may still be reading them), its own, and
    /// those decoded ahead; `xz-max-depth` if smaller.
    fn sequential_need(&self) -> usize {
        self.depth.min(self.ahead + 3)
    }

    /// Drop passed blocks while the cache holds more than
    /// [`sequential_need`](Self::sequential_need) (`room`: one more, for
    /// a block about to be added). Several connections reading one image
    /// in turn, as nbdcopy's, share the same few blocks: their cache need
    /// not grow with the connections (bench/NOTES.md has the figures).
    fn trim(&self, lru: &mut Lru, keep: usize, room: usize) {
        while lru.map.len() + room > self.sequential_need() {
            match lru.passed_victim(keep) {
                Some(k) => self.evict(lru, k),
                None => break,
            }
        }
    }

    /// Is a reader of block `i` sequential (it is the first block, or
    /// the one before is cached)? If so, mark passed the blocks its
    /// connection has read its way through, from `run` (the start of its
    /// sequential run) to `i - 2` (`i - 1` may still have reads in flight
    /// on other connections). A connection that has just come to block
    /// `i` from elsewhere marks nothing: the blocks before may be
    /// another's still to read (libnbd's nbdcopy copies a region per
    /// connection).
    fn sequential(&self, i: usize, run: Option<usize>) -> bool {
        if i == 0 {
            return true;
        }
        let mut lru = self
            .lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !lru.map.contains_key(&(i - 1)) {
            return false;
        }
        if let Some(start) = run {
            for (_, e) in lru
                .map
                .iter_mut()
                .filter(|(k, _)| (start..i - 1).contains(*k))
            {
                e.passed = true;
            }
        }
        true
    }

    /// The cache cell of memory block `i` for a reader, inserted if needed
    /// (evicting the least recently used cells nobody is decoding or
    /// waiting for).
    fn cell(&self, i: usize) -> Cell {
        let mut lru = self
            .lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        lru.tick += 1;
        let tick = lru.tick;
        if let Some(e) = lru.map.get_mut(&i) {
            e.tick = tick;
            e.used = true;
            let c = e.cell.clone();
            if e.passed {
                lru.read_again(i);
            }
            return c;
        }
        if lru.gone[i] {
            lru.read_again(i);
        }
        let c: Cell = Arc::new(OnceCell::new());
        lru.map.insert(
            i,
            Entry {
                cell: c.clone(),
                tick,
                used: true,
                passed: false,
            },
        );
        self.trim(&mut lru, i, 0);
        while lru.map.len() > self.capacity() {
            match lru.victim(i, true) {
                Some(k) => self.evict(&mut lru, k),
                None => break,
            }
        }
        c
    }

    /// A new cell for decoding block `i` ahead of the readers, if it is
    /// not cached, sequential readers have not passed it already (a
    /// connection at the end of its region would decode again the start
    /// of the next one, which another connection has read), and there is
    /// room without dropping blocks decoded ahead.
    fn ahead_cell(&self, i: usize) -> Option<Cell> {
        let mut lru = self
            .lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if lru.map.contains_key(&i) || lru.gone[i] {
            return None;
        }
        self.trim(&mut lru, i, 1);
        if lru.map.len() >= self.capacity() {
            let k = lru.victim(i, false)?;
            self.evict(&mut lru, k);
        }
        lru.tick += 1;
        let c: Cell = Arc::new(OnceCell::new());
        let tick = lru.tick;
        lru.map.insert(
            i,
            Entry {
                cell: c.clone(),
                tick,
                used: false,
                passed: false,
            },
        );
        Some(c)
    }

    /// Drop block `k` from the cache (its buffer goes back to the pool
    /// when nobody holds it any more).
    fn evict(&self, lru: &mut Lru, k: usize) {
        if lru.map.remove(&k).is_some_and(|e| e.passed) {
            lru.gone[k] = true;
        }
    }

    /// Fetch and decode memory block `i`: at once for a reader, or when a
    /// core is free for a block decoded ahead.
    async fn load(&self, i: usize, next: &dyn Handle, reader: bool) -> Result<Arc<Decoded>> {
        let b = self.index.blocks[i];
        let err = |m: &dyn std::fmt::Display| {
            Error::eio(format!(
                "xz: block {i} (compressed offset {}, {} bytes uncompressed): {m}",
                b.coffset, b.usize
            ))
        };
        // Room for the synthetic stream header and tail too.
        let len = (index::HEADER_SIZE + b.total()) as usize;
        let mut input = self.spare_input.take().unwrap_or_default();
        // A reused buffer keeps its old bytes (the read overwrites them):
        // only what it grows by is zeroed (clearing it first cost a
        // `memset` of all the compressed data).
        input.truncate(len);
        input.reserve(len + 64 - input.len());
        decode::huge_pages(&mut input);
        input.resize(len, 0);
        next.pread(
            &mut input[index::HEADER_SIZE as usize..],
            b.coffset,
            Flags::NONE,
        )
        .await
        .map_err(|e| err(&format!("reading compressed data: {}", e.msg)))?;
        let _permit = match reader {
            true => None,
            false => Some(self.slots.acquire().await),
        };
        let out = self.spare.take().unwrap_or_default();
        let mut dec = self.decoders.take();
        let (data, input, dec) = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let r = decode::decode_block(&b, &mut input, out, &mut dec);
            libnbd::debug!(
                "xz: block {i} decoded ({}) in {} ms",
                if reader { "for a reader" } else { "ahead" },
                t.elapsed().as_millis()
            );
            (r, input, dec)
        })
        .await
        .map_err(|e| err(&e))?;
        self.spare_input.give_back(input);
        if let Some(d) = dec {
            self.decoders.give_back(d);
        }
        Ok(Arc::new(Decoded {
            data: data.map_err(|m| err(&m))?,
            pool: self.spare.clone(),
        }))
    }

    async fn block(&self, i: usize, next: &dyn Handle) -> Result<Arc<Decoded>> {
        let cell = self.cell(i);
        cell.get_or_try_init(|| self.load(i, next, true))
            .await
            .cloned()
    }

    /// Start decoding block `i` in the background, if it is not cached.
    fn prefetch(self: &Arc<Self>, i: usize, next: &Arc<dyn Handle>, upto: u64) {
        match self.kinds[i] {
            Kind::Memory => {
                // At most `ahead` blocks in the works, however many
                // readers there are, so none waits behind a long queue.
                if self.prefetching.load(Ordering::Relaxed) >= self.ahead {
                    return;
                }
                let Some(cell) = self.ahead_cell(i) else {
                    return;
                };
                self.prefetching.fetch_add(1, Ordering::Relaxed);
                let (me, next) = (self.clone(), next.clone());
                tokio::spawn(async move {
                    let _ = cell.get_or_try_init(|| me.load(i, &*next, false)).await;
                    me.prefetching.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Kind::Spill => {
                if let Ok(s) = self.spill() {
                    self.spill_blocks[&i].readahead(&s, &self.slots, next, upto);
                }
            }
        }
    }

    /// Memory block `i` for a reader, decoded (or waited for).
    async fn memory_block(
        self: &Arc<Self>,
        i: usize,
        next: &Arc<dyn Handle>,
        run: &Run,
    ) -> Result<Arc<Decoded>> {
        // A reader coming from the previous block reads on: decode the
        // next blocks meanwhile.
        if self.sequential(i, run.visit(i)) {
            for j in i + 1..(i + 1 + self.ahead).min(self.kinds.len()) {
                self.prefetch(j, next, self.spill_ahead);
            }
        }
        self.block(i, &**next).await
    }

    /// `count` bytes at `offset` as part of the cached block holding
    /// them, for the server to send without copying; `None` when they
    /// span blocks or their block is spilled.
    async fn read_shared(
        self: &Arc<Self>,
        count: u32,
        offset: u64,
        next: &Arc<dyn Handle>,
        run: &Run,
    ) -> Result<Option<SharedData>> {
        if offset >= self.index.size {
            return Ok(None);
        }
        let i = self.index.find(offset);
        let b = self.index.blocks[i];
        let rel = offset - b.uoffset;
        if self.kinds[i] != Kind::Memory || rel + u64::from(count) > b.usize {
            return Ok(None);
        }
        let data = self.memory_block(i, next, run).await?;
        let (start, end) = (rel as usize, (rel + u64::from(count)) as usize);
        Ok(SharedData::new(data, start..end))
    }

    /// Read `buf.len()` bytes of uncompressed data at `offset`.
    async fn read(
        self: &Arc<Self>,
        buf: &mut [u8],
        offset: u64,
        next: &Arc<dyn Handle>,
        run: &Run,
    ) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.index.size)
            .ok_or_else(|| Error::einval("xz: read beyond the end of the export"))?;
        let mut pos = offset;
        while pos < end {
            let i = self.index.find(pos);
            let b = self.index.blocks[i];
            let rel = pos - b.uoffset;
            let n = (end - pos).min(b.usize - rel);
            let dst = &mut buf[(pos - offset) as usize..][..n as usize];
            match self.kinds[i] {
                Kind::Memory => {
                    let data = self.memory_block(i, next, run).await?;
                    dst.copy_from_slice(&data[rel as usize..(rel + n) as usize]);
                }
                Kind::Spill => {
                    let spill = self.spill()?;
                    let sb = &self.spill_blocks[&i];
                    sb.read(&spill, &self.slots, next, dst, rel).await?;
                    let stop = rel + n;
                    let ahead = self.spill_ahead;
                    if stop + ahead >= sb.frontier() {
                        sb.readahead(&spill, &self.slots, next, stop + ahead);
                        if stop + ahead > b.usize && i + 1 < self.kinds.len() {
                            self.prefetch(i + 1, next, stop + ahead - b.usize);
                        }
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }
}

/// A connection: the layer below (shared with background decoding) and
/// the file's shared state.
struct XzHandle {
    next: Arc<dyn Handle>,
    file: Arc<XzFile>,
    /// Has read: counted in the file's `handles`.
    reading: AtomicBool,
    run: Run,
}

/// Where a connection reads: the block of its last read and the first
/// block of the sequential run it is on.
#[derive(Default)]
struct Run(Mutex<Option<(usize, usize)>>);

impl Run {
    /// A read of block `i`: the start of this connection's sequential
    /// run, if it has read its way through block `i - 2`. (Reads in
    /// flight may complete a block behind.)
    fn visit(&self, i: usize) -> Option<usize> {
        let mut run = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = match *run {
            Some((last, start)) if i + 1 == last => start,
            Some((last, start)) if i == last || i == last + 1 => {
                *run = Some((i, start));
                start
            }
            _ => {
                *run = Some((i, i));
                i
            }
        };
        (start + 2 <= i).then_some(start)
    }
}

impl XzHandle {
    /// This connection reads: count it in the cache's size.
    fn start_reading(&self) {
        if !self.reading.load(Ordering::Relaxed) && !self.reading.swap(true, Ordering::Relaxed) {
            self.file.handles.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for XzHandle {
    fn drop(&mut self) {
        if *self.reading.get_mut() {
            self.file.handles.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Handle for XzHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.file.index.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(None)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            // Read-only: every connection sees the same data.
            multi_conn: true,
            cache: Cache::Emulate,
            rotational: self.next.caps()?.rotational,
            ..Caps::READ_ONLY
        })
    }

    async fn pread_shared(
        &self,
        count: u32,
        offset: u64,
        _flags: Flags,
    ) -> Result<Option<SharedData>> {
        self.start_reading();
        self.file
            .read_shared(count, offset, &self.next, &self.run)
            .await
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.start_reading();
        self.file.read(buf, offset, &self.next, &self.run).await
    }
    async fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eperm("xz: the export is read-only"))
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eperm("xz: the export is read-only"))
    }
    async fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eperm("xz: the export is read-only"))
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        ext.add(offset, count, 0)
    }
    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        // Decode the range (and keep it) without copying it anywhere.
        let end = offset.saturating_add(count).min(self.file.index.size);
        let mut pos = offset;
        let mut buf = Vec::new();
        while pos < end {
            let n = (end - pos).min(4 << 20);
            buf.resize(n as usize, 0);
            self.file.read(&mut buf, pos, &self.next, &self.run).await?;
            pos += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
