//! In-memory disk stores, shared by the `memory` and `data` plugins.
//!
//! Three allocators are available, chosen with `allocator=`:
//!
//! - `sparse` (the default): the disk is cut into pages of
//!   [`PAGE_SIZE`] bytes and only pages holding non-zero data use
//!   memory. Pages live in ordered maps sharded over [`SHARDS`] locks by
//!   page number, and each page has its own lock, so requests on
//!   different pages run in parallel and the virtual size may be anything
//!   up to 2^63-1 bytes. Writing zeroes over an absent page does not
//!   allocate it; zeroing or trimming frees whole pages, zeroes partial
//!   ones and frees a page that has become all zero. Extents report absent
//!   pages as holes that read as zeroes, allocated pages as data (with the
//!   zero flag if they happen to be all zero).
//! - `zstd`: the same sparse page table, but every allocated page is held
//!   compressed with zstd (level [`ZSTD_LEVEL`]); a write decompresses
//!   the page, changes it and compresses it again. Typical disk data
//!   takes about half the memory, at some CPU cost. A page that becomes
//!   all zero is freed as with `sparse`.
//! - `malloc` (optionally `malloc,mlock=true`): the whole disk is
//!   allocated at once (lazily zeroed by the kernel) in chunks of
//!   [`MALLOC_CHUNK`] bytes, each with its own lock. Nothing is sparse and
//!   extents report everything as data. With `mlock=true` the memory is
//!   locked into RAM with mlock(2).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;

use crate::slab::SlabPage;
use libnbd::backend::HOLE_ZERO;
use libnbd::protocol::alloc;
use libnbd::{parse_bool, Caps, ConfigError, ConfigResult, Error, Extents, Flags, Handle, Result};

/// Size of a page of the sparse allocator: 32 KiB, as nbdkit's sparse
/// array, so extents have the same granularity.
pub const PAGE_SIZE: usize = 32 * 1024;
const PAGE: u64 = PAGE_SIZE as u64;

/// zstd compression level of `allocator=zstd` (zstd's default level, as
/// nbdkit uses).
pub const ZSTD_LEVEL: i32 = 3;

/// Number of lock shards of the sparse allocator's page map.
pub const SHARDS: usize = 64;

/// Size of a locked chunk of the malloc allocator.
pub const MALLOC_CHUNK: usize = 256 * 1024;

/// At most this many extents are reported per request (more are fetched
/// by the client with further requests).
const MAX_EXTENTS: usize = 1024;

/// At most this many pages are visited per extents request.
const MAX_EXTENT_PAGES: u64 = 1 << 16;

/// Take a read lock, ignoring poisoning (the data stays consistent: no
/// code panics while holding a lock).
fn rd<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Take a write lock, ignoring poisoning.
fn wr<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

pub use libnbd::zeroes::is_zero;

/// How much memory (RAM plus swap, in bytes) this machine has, from
/// `/proc/meminfo`, if known.
pub fn memory_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut total = 0u64;
    let mut found = false;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        if key == "MemTotal" || key == "SwapTotal" {
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            total = total.saturating_add(kb.saturating_mul(1024));
            found = true;
        }
    }
    found.then_some(total)
}

/// The `allocator=` parameter of the memory and data plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// A sparse page table (the default).
    Sparse,
    /// A sparse page table of zstd-compressed pages.
    Zstd,
    /// One flat allocation, optionally locked into RAM.
    Malloc {
        /// Lock the memory with mlock(2).
        mlock: bool,
    },
}

impl Allocator {
    /// Parse `sparse`, `zstd`, `malloc`, `malloc,mlock=true|false`.
    pub fn parse(s: &str) -> ConfigResult<Allocator> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or("");
        let extra: Vec<&str> = parts.filter(|p| !p.is_empty()).collect();
        match name {
            "sparse" | "zstd" => {
                if !extra.is_empty() {
                    return Err(ConfigError::new(format!(
                        "allocator={name} does not take extra parameters"
                    )));
                }
                Ok(if name == "zstd" {
                    Allocator::Zstd
                } else {
                    Allocator::Sparse
                })
            }
            "malloc" => {
                let mut mlock = false;
                for p in extra {
                    match p.split_once('=') {
                        Some(("mlock", v)) => {
                            mlock = parse_bool(v).map_err(|e| {
                                ConfigError::new(format!("allocator=malloc: mlock: {e}"))
                            })?
                        }
                        _ => {
                            let key = p.split_once('=').map_or(p, |(k, _)| k);
                            return Err(ConfigError::new(format!(
                                "allocator=malloc: unknown parameter {key}"
                            )));
                        }
                    }
                }
                Ok(Allocator::Malloc { mlock })
            }
            _ => Err(ConfigError::new(format!("unknown allocator \"{s}\""))),
        }
    }
}

/// A disk image held in memory, with either allocator.
pub enum Store {
    /// `allocator=sparse` or `allocator=zstd`.
    Sparse(SparseStore),
    /// `allocator=malloc`.
    Malloc(MallocStore),
}

impl Store {
    /// An all-zero store of `size` bytes.
    pub fn new(alloc: Allocator, size: u64) -> ConfigResult<Store> {
        Ok(match alloc {
            Allocator::Sparse => Store::Sparse(SparseStore::new(size, Codec::Plain)),
            Allocator::Zstd => Store::Sparse(SparseStore::new(size, Codec::Zstd)),
            Allocator::Malloc { mlock } => Store::Malloc(MallocStore::new(size, mlock)?),
        })
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Store::Sparse(s) => s.size,
            Store::Malloc(m) => m.size,
        }
    }

    fn check(&self, len: u64, offset: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::einval(format!(
                "request (offset {offset}, length {len}) beyond the end of the disk ({})",
                self.size()
            ))),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(buf.len() as u64, offset)?;
        match self {
            Store::Sparse(s) => s.read(buf, offset),
            Store::Malloc(m) => m.read(buf, offset),
        }
        Ok(())
    }

    /// Write `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(buf.len() as u64, offset)?;
        match self {
            Store::Sparse(s) => s.write(buf, offset),
            Store::Malloc(m) => m.write(buf, offset),
        }
        Ok(())
    }

    /// Make `count` bytes at `offset` read as zero, freeing what can be
    /// freed.
    pub fn zero(&self, count: u64, offset: u64) -> Result<()> {
        self.check(count, offset)?;
        match self {
            Store::Sparse(s) => s.zero(count, offset),
            Store::Malloc(m) => m.zero(count, offset),
        }
        Ok(())
    }

    /// Report the allocation of `[offset, offset + count)`.
    pub fn extents(&self, count: u64, offset: u64, req_one: bool, ext: &mut Extents) -> Result<()> {
        self.check(count, offset)?;
        match self {
            Store::Sparse(s) => s.extents(count, offset, req_one, ext),
            Store::Malloc(_) => ext.add(offset, count, 0),
        }
    }

    /// Lock the memory into RAM if the allocator asks for it
    /// (`malloc,mlock=true`); call after forking.
    pub fn lock(&self) -> Result<()> {
        match self {
            Store::Sparse(_) => Ok(()),
            Store::Malloc(m) => m.lock(),
        }
    }

    /// Bytes of memory used for data (allocated pages or chunks).
    pub fn allocated(&self) -> u64 {
        match self {
            Store::Sparse(s) => s.pages() * PAGE,
            Store::Malloc(m) => m.size,
        }
    }
}

/// Split `[offset, offset + len)` at page boundaries of `page` bytes:
/// calls `f(page_number, offset_in_page, length, offset_in_request)`.
fn for_each_page(page: u64, offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut done = 0u64;
    while done < len {
        let pos = offset + done;
        let idx = pos / page;
        let in_page = pos % page;
        let n = (page - in_page).min(len - done);
        f(idx, in_page as usize, n as usize, done as usize);
        done += n;
    }
}

/// One page of the sparse store: its bytes as the codec keeps them.
type Page = RwLock<PageBuf>;

/// Where a page's bytes live.
enum PageBuf {
    /// A slot of a huge-page slab (plain pages).
    Slab(SlabPage),
    /// The heap (compressed pages, or plain ones when no slab could be
    /// mapped).
    Heap(Box<[u8]>),
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            PageBuf::Slab(s) => s,
            PageBuf::Heap(b) => b,
        }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            PageBuf::Slab(s) => s,
            PageBuf::Heap(b) => b,
        }
    }
}

/// How the sparse store keeps the bytes of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As they are: [`PAGE_SIZE`] bytes, changed in place.
    Plain,
    /// zstd-compressed; an empty buffer stands for an all-zero page.
    Zstd,
}

/// Per-thread zstd contexts and a page of scratch space, so compressing
/// and decompressing a page allocates nothing but the result.
struct ZstdScratch {
    cctx: zstd::zstd_safe::CCtx<'static>,
    dctx: zstd::zstd_safe::DCtx<'static>,
    page: Vec<u8>,
    out: Vec<u8>,
}

thread_local! {
    static ZSTD: RefCell<ZstdScratch> = RefCell::new(ZstdScratch {
        cctx: zstd::zstd_safe::CCtx::create(),
        dctx: zstd::zstd_safe::DCtx::create(),
        page: vec![0; PAGE_SIZE],
        out: Vec::with_capacity(zstd::zstd_safe::compress_bound(PAGE_SIZE)),
    });
}

impl ZstdScratch {
    /// Decompress `stored` into `page` (all of it).
    fn unpack(dctx: &mut zstd::zstd_safe::DCtx<'static>, stored: &[u8], page: &mut [u8]) {
        if stored.is_empty() {
            page.fill(0);
            return;
        }
        // The page was compressed by us from exactly PAGE_SIZE bytes and
        // has been in our memory since: failure is a bug, not bad input.
        match dctx.decompress(page, stored) {
            Ok(n) if n == page.len() => {}
            r => panic!("zstd page corrupted in memory: {r:?}"),
        }
    }

    /// Compress the scratch page into a new exact-size buffer (empty if
    /// the page is all zero and `may_be_zero`).
    fn pack(&mut self, may_be_zero: bool) -> Box<[u8]> {
        if may_be_zero && is_zero(&self.page) {
            return Box::default();
        }
        self.out.clear();
        if let Err(e) = self.cctx.compress(&mut self.out, &self.page, ZSTD_LEVEL) {
            // The output has compress_bound() bytes of room: cannot fail.
            panic!("zstd compression of a page failed: {e}");
        }
        self.out.as_slice().into()
    }
}

impl Codec {
    /// Copy `out.len()` bytes at `at` in the page out of `stored`.
    fn read(self, stored: &[u8], at: usize, out: &mut [u8]) {
        match self {
            Codec::Plain => out.copy_from_slice(&stored[at..at + out.len()]),
            Codec::Zstd if out.len() == PAGE_SIZE => ZSTD.with(|z| {
                ZstdScratch::unpack(&mut z.borrow_mut().dctx, stored, out);
            }),
            Codec::Zstd => ZSTD.with(|z| {
                let z = &mut *z.borrow_mut();
                ZstdScratch::unpack(&mut z.dctx, stored, &mut z.page);
                out.copy_from_slice(&z.page[at..at + out.len()]);
            }),
        }
    }

    /// Apply `f` to the page in `stored`; returns whether the page is
    /// now all zero (only looked at if `may_be_zero`, else false).
    fn update(self, stored: &mut PageBuf, may_be_zero: bool, f: impl FnOnce(&mut [u8])) -> bool {
        match self {
            Codec::Plain => {
                f(stored);
                may_be_zero && is_zero(stored)
            }
            Codec::Zstd => ZSTD.with(|z| {
                let z = &mut *z.borrow_mut();
                ZstdScratch::unpack(&mut z.dctx, stored, &mut z.page);
                f(&mut z.page);
                *stored = PageBuf::Heap(z.pack(may_be_zero));
                stored.is_empty()
            }),
        }
    }

    /// A new page: zeroes changed by `f`.
    fn create(self, f: impl FnOnce(&mut [u8])) -> PageBuf {
        match self {
            Codec::Plain => {
                let mut page = match SlabPage::zeroed() {
                    Some(s) => PageBuf::Slab(s),
                    None => PageBuf::Heap(vec![0u8; PAGE_SIZE].into_boxed_slice()),
                };
                f(&mut page);
                page
            }
            Codec::Zstd => ZSTD.with(|z| {
                let z = &mut *z.borrow_mut();
                z.page.fill(0);
                f(&mut z.page);
                PageBuf::Heap(z.pack(true))
            }),
        }
    }

    /// Is the page in `stored` all zero?
    fn is_zero(self, stored: &[u8]) -> bool {
        match self {
            Codec::Plain => is_zero(stored),
            // Zero pages are packed as empty buffers.
            Codec::Zstd => stored.is_empty(),
        }
    }
}

/// The sparse allocator: pages of [`PAGE_SIZE`] bytes in [`SHARDS`]
/// ordered maps, page `n` in shard `n % SHARDS`, kept as the [`Codec`]
/// says.
///
/// Locking: data is read or written under the shard's read lock plus
/// the page's own lock; a page is only added or removed under the shard's
/// write lock, so a page can never vanish under a writer.
pub struct SparseStore {
    size: u64,
    codec: Codec,
    shards: Vec<RwLock<BTreeMap<u64, Page>>>,
}

impl SparseStore {
    /// An empty (all-zero) store of `size` bytes.
    pub fn new(size: u64, codec: Codec) -> Self {
        SparseStore {
            size,
            codec,
            shards: (0..SHARDS).map(|_| RwLock::new(BTreeMap::new())).collect(),
        }
    }

    fn shard(&self, idx: u64) -> &RwLock<BTreeMap<u64, Page>> {
        &self.shards[(idx % SHARDS as u64) as usize]
    }

    /// Number of allocated pages.
    pub fn pages(&self) -> u64 {
        self.shards.iter().map(|s| rd(s).len() as u64).sum()
    }

    /// Bytes of memory holding page data (compressed, for zstd).
    pub fn stored_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| rd(s).values().map(|p| rd(p).len() as u64).sum::<u64>())
            .sum()
    }

    /// Is page `idx` allocated?
    pub fn is_allocated(&self, idx: u64) -> bool {
        rd(self.shard(idx)).contains_key(&idx)
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        for_each_page(PAGE, offset, buf.len() as u64, |idx, at, n, from| {
            let out = &mut buf[from..from + n];
            let map = rd(self.shard(idx));
            match map.get(&idx) {
                Some(p) => self.codec.read(&rd(p), at, out),
                None => out.fill(0),
            }
        });
    }

    fn write(&self, buf: &[u8], offset: u64) {
        for_each_page(PAGE, offset, buf.len() as u64, |idx, at, n, from| {
            let data = &buf[from..from + n];
            let zero = is_zero(data);
            let put = |page: &mut [u8]| page[at..at + n].copy_from_slice(data);
            let shard = self.shard(idx);
            {
                let map = rd(shard);
                if let Some(p) = map.get(&idx) {
                    let now_zero = self.codec.update(&mut wr(p), zero, put);
                    drop(map);
                    if now_zero {
                        self.free_if_zero(idx);
                    }
                    return;
                }
            }
            if zero {
                // Absent pages already read as zeroes.
                return;
            }
            // Fill the new page before taking the shard's write lock: the
            // kernel's page faults on fresh memory are the dearest part.
            let page = self.codec.create(put);
            let mut map = wr(shard);
            match map.get(&idx) {
                // Another writer added it meanwhile.
                Some(p) => {
                    self.codec.update(&mut wr(p), false, put);
                }
                None => {
                    map.insert(idx, RwLock::new(page));
                }
            }
        });
    }

    /// Remove page `idx` if it is (still) all zero.
    fn free_if_zero(&self, idx: u64) {
        let mut map = wr(self.shard(idx));
        if map.get(&idx).is_some_and(|p| self.codec.is_zero(&rd(p))) {
            map.remove(&idx);
        }
    }

    fn zero(&self, count: u64, offset: u64) {
        for_each_page(PAGE, offset, count, |idx, at, n, _| {
            let shard = self.shard(idx);
            if n == PAGE_SIZE {
                wr(shard).remove(&idx);
                return;
            }
            let map = rd(shard);
            if let Some(p) = map.get(&idx) {
                let now_zero = self
                    .codec
                    .update(&mut wr(p), true, |page| page[at..at + n].fill(0));
                drop(map);
                if now_zero {
                    self.free_if_zero(idx);
                }
            }
        });
    }

    /// The first allocated page at or after `idx`.
    fn next_allocated(&self, idx: u64) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|s| rd(s).range(idx..).next().map(|(k, _)| *k))
            .min()
    }

    fn extents(&self, count: u64, offset: u64, req_one: bool, ext: &mut Extents) -> Result<()> {
        let end = offset + count;
        let mut pos = offset;
        let mut visited = 0u64;
        while pos < end {
            let idx = pos / PAGE;
            let flags = {
                let map = rd(self.shard(idx));
                map.get(&idx).map(|p| {
                    if self.codec.is_zero(&rd(p)) {
                        alloc::ZERO
                    } else {
                        0
                    }
                })
            };
            let stop = match flags {
                Some(f) => {
                    let stop = ((idx + 1) * PAGE).min(end);
                    ext.add(pos, stop - pos, f)?;
                    stop
                }
                None => {
                    let stop = self
                        .next_allocated(idx + 1)
                        .map_or(end, |n| n.saturating_mul(PAGE).min(end));
                    ext.add(pos, stop - pos, HOLE_ZERO)?;
                    stop
                }
            };
            pos = stop;
            visited += 1;
            let n = ext.list().len();
            if (req_one && n > 1) || n >= MAX_EXTENTS || visited >= MAX_EXTENT_PAGES {
                break;
            }
        }
        Ok(())
    }
}

/// The malloc allocator: the whole disk in chunks of [`MALLOC_CHUNK`]
/// bytes, each behind its own lock.
pub struct MallocStore {
    size: u64,
    mlock: bool,
    chunks: Vec<RwLock<Box<[u8]>>>,
}

impl MallocStore {
    /// Allocate `size` bytes of zeroes (the kernel provides the zero pages
    /// lazily). With `mlock`, [`MallocStore::lock`] locks them into RAM.
    pub fn new(size: u64, mlock: bool) -> ConfigResult<Self> {
        let nomem = || {
            ConfigError::new(format!(
                "allocator=malloc: cannot allocate {size} bytes: Cannot allocate memory"
            ))
        };
        if memory_limit().is_some_and(|m| size > m) || usize::try_from(size).is_err() {
            return Err(nomem());
        }
        let chunk = MALLOC_CHUNK as u64;
        let n = size.div_ceil(chunk) as usize;
        let mut chunks = Vec::new();
        chunks.try_reserve_exact(n).map_err(|_| nomem())?;
        for i in 0..n as u64 {
            let len = (size - i * chunk).min(chunk) as usize;
            chunks.push(RwLock::new(vec![0u8; len].into_boxed_slice()));
        }
        Ok(MallocStore {
            size,
            mlock,
            chunks,
        })
    }

    /// Lock the memory into RAM with mlock(2), if `mlock=true` was given.
    /// (Memory locks are not inherited across fork, so the server calls
    /// this after forking into the background, through
    /// [`libnbd::Plugin::after_fork`].)
    pub fn lock(&self) -> Result<()> {
        if !self.mlock {
            return Ok(());
        }
        for c in &self.chunks {
            let buf = rd(c);
            // SAFETY: the pointer and length describe memory owned by the
            // chunk, which lives (and does not move) as long as the store;
            // mlock only changes the paging of that range.
            let r = unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) };
            if r != 0 {
                return Err(Error::io(
                    "allocator=malloc: mlock",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        for_each_page(
            MALLOC_CHUNK as u64,
            offset,
            buf.len() as u64,
            |i, at, n, from| {
                buf[from..from + n].copy_from_slice(&rd(&self.chunks[i as usize])[at..at + n]);
            },
        );
    }

    fn write(&self, buf: &[u8], offset: u64) {
        for_each_page(
            MALLOC_CHUNK as u64,
            offset,
            buf.len() as u64,
            |i, at, n, from| {
                wr(&self.chunks[i as usize])[at..at + n].copy_from_slice(&buf[from..from + n]);
            },
        );
    }

    fn zero(&self, count: u64, offset: u64) {
        for_each_page(MALLOC_CHUNK as u64, offset, count, |i, at, n, _| {
            wr(&self.chunks[i as usize])[at..at + n].fill(0);
        });
    }
}

/// A connection to an in-memory [`Store`] (memory and data plugins):
/// writable (unless the server is read-only), flush and FUA are no-ops,
/// zero and trim are native and fast, extents are reported, multi-conn is
/// safe since every connection sees the same store, cache is a no-op.
pub struct StoreHandle {
    store: Arc<Store>,
}

impl StoreHandle {
    /// A handle on `store`.
    pub fn new(store: Arc<Store>) -> Self {
        StoreHandle { store }
    }
}

#[async_trait]
impl Handle for StoreHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.store.size())
    }
    fn caps(&self) -> Result<Caps> {
        // Everything is already in memory: cache is a successful no-op.
        Ok(Caps::FULL)
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.read(buf, offset)
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.store.write(buf, offset)
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset)
    }
    async fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.store.zero(count, offset)
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.store
            .extents(count, offset, flags.contains(Flags::REQ_ONE), ext)
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &Store, off: u64, len: u64) -> Vec<(u64, u64, u32)> {
        let mut e = Extents::new(off, off + len);
        s.extents(len, off, false, &mut e).unwrap();
        e.list()
            .iter()
            .map(|x| (x.offset, x.length, x.flags))
            .collect()
    }

    #[test]
    fn allocator_syntax() {
        assert_eq!(Allocator::parse("sparse"), Ok(Allocator::Sparse));
        assert_eq!(Allocator::parse("sparse,"), Ok(Allocator::Sparse));
        assert_eq!(
            Allocator::parse("malloc"),
            Ok(Allocator::Malloc { mlock: false })
        );
        assert_eq!(
            Allocator::parse("malloc,mlock=true"),
            Ok(Allocator::Malloc { mlock: true })
        );
        assert!(Allocator::parse("sparse,foo=1").is_err());
        assert!(Allocator::parse("malloc,foo=1").is_err());
        assert!(Allocator::parse("malloc,mlock=maybe").is_err());
        assert_eq!(Allocator::parse("zstd"), Ok(Allocator::Zstd));
        assert!(Allocator::parse("zstd,level=1").is_err());
        assert!(Allocator::parse("foo").is_err());
    }

    #[test]
    fn sparse_pages() {
        for alloc in [Allocator::Sparse, Allocator::Zstd] {
            sparse_pages_with(alloc);
        }
    }

    fn sparse_pages_with(alloc: Allocator) {
        let s = Store::new(alloc, 1 << 20).unwrap();
        // Zero writes to absent pages allocate nothing.
        s.write(&[0u8; 70000], 0).unwrap();
        assert_eq!(s.allocated(), 0);
        s.write(b"hello", PAGE - 2).unwrap();
        assert_eq!(s.allocated(), 2 * PAGE);
        let mut b = [0u8; 9];
        s.read(&mut b, PAGE - 4).unwrap();
        assert_eq!(&b, b"\0\0hello\0\0");
        assert_eq!(
            map(&s, 0, 1 << 20),
            vec![
                (0, 2 * PAGE, 0),
                (2 * PAGE, (1 << 20) - 2 * PAGE, HOLE_ZERO)
            ]
        );
        // Zeroing part of a page frees it once it is all zero.
        s.zero(2, PAGE - 2).unwrap();
        assert_eq!(s.allocated(), PAGE);
        s.zero(3, PAGE).unwrap();
        assert_eq!(s.allocated(), 0);
        assert_eq!(map(&s, 0, 1 << 20), vec![(0, 1 << 20, HOLE_ZERO)]);
        // Overwriting data with zeroes frees the page too.
        s.write(b"x", 5).unwrap();
        s.write(b"\0", 5).unwrap();
        assert_eq!(s.allocated(), 0);
        // Beyond the end is an error, not a panic.
        assert!(s.write(b"x", 1 << 20).is_err());
        assert!(s.read(&mut b, u64::MAX - 2).is_err());
    }

    #[test]
    fn malloc_store() {
        let s = Store::new(Allocator::Malloc { mlock: false }, 1_000_000).unwrap();
        s.write(&[7u8; 600_000], 100).unwrap();
        let mut b = vec![0u8; 1_000_000];
        s.read(&mut b, 0).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0));
        assert!(b[100..600_100].iter().all(|&x| x == 7));
        s.zero(300_000, 200).unwrap();
        s.read(&mut b, 0).unwrap();
        assert!(b[100..200].iter().all(|&x| x == 7));
        assert!(b[200..300_200].iter().all(|&x| x == 0));
        assert_eq!(b[300_200], 7);
        assert_eq!(map(&s, 0, 1_000_000), vec![(0, 1_000_000, 0)]);
        assert!(Store::new(Allocator::Malloc { mlock: false }, 1 << 62).is_err());
        // Locking a small store works (as root, or within RLIMIT_MEMLOCK).
        let s = Store::new(Allocator::Malloc { mlock: true }, 4096).unwrap();
        s.lock().unwrap();
    }

    #[test]
    fn zstd_pages_are_compressed() {
        let s = Store::new(Allocator::Zstd, 64 * PAGE).unwrap();
        // Text-like data: compresses well.
        let text: Vec<u8> = (0..8 * PAGE_SIZE)
            .map(|i| b"the quick brown fox "[i % 20] ^ (i / 4096) as u8)
            .collect();
        s.write(&text, 3).unwrap();
        let Store::Sparse(sp) = &s else {
            unreachable!()
        };
        assert_eq!(sp.pages(), 9);
        assert!(sp.stored_bytes() < PAGE, "{} bytes", sp.stored_bytes());
        // Random data round-trips, in whole and partial pages.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..3 * PAGE_SIZE + 77)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        s.write(&noise, 20 * PAGE - 5).unwrap();
        let mut back = vec![0u8; noise.len()];
        s.read(&mut back, 20 * PAGE - 5).unwrap();
        assert_eq!(back, noise);
        let mut back = vec![0u8; text.len()];
        s.read(&mut back, 3).unwrap();
        assert_eq!(back, text);
        let mut one = vec![0u8; PAGE_SIZE];
        s.read(&mut one, PAGE).unwrap();
        assert_eq!(one, text[PAGE_SIZE - 3..2 * PAGE_SIZE - 3]);
        // Zeroing the text frees all its 9 pages (they are all zero
        // then); the 5 pages of noise stay.
        s.zero(text.len() as u64, 3).unwrap();
        assert_eq!(sp.pages(), 5);
    }

    #[test]
    fn parallel_writers() {
        for alloc in [Allocator::Sparse, Allocator::Zstd] {
            parallel_writers_with(alloc);
        }
    }

    fn parallel_writers_with(alloc: Allocator) {
        let s = Arc::new(Store::new(alloc, 64 * PAGE).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        // Each thread owns bytes t, t+8, t+16, ... of every
                        // page; writes are interleaved with zeroes.
                        for page in 0..64u64 {
                            let off = page * PAGE + t as u64 + 8 * (round % 100);
                            s.write(&[t + 1], off).unwrap();
                            if round % 7 == 3 {
                                s.zero(1, off).unwrap();
                                s.write(&[t + 1], off).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut b = vec![0u8; 64 * PAGE_SIZE];
        s.read(&mut b, 0).unwrap();
        for page in 0..64usize {
            for round in 0..50usize {
                for t in 0..8usize {
                    assert_eq!(b[page * PAGE_SIZE + t + 8 * round], t as u8 + 1);
                }
            }
        }
    }
}
