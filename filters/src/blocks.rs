//! Blocks kept in a temporary file, the mechanism the cow and cache
//! filters share: the sparse file ([`Store`]), a compact map of 2-bit
//! block states ([`StateMap`]), striped block locks ([`BlockLocks`]),
//! the three together with the block arithmetic ([`BlockFile`]), and
//! their common parameters ([`Switch`], [`parse_block_size`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use libnbd::{run_blocking, ConfigError, ConfigResult, Error, Result};

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
        self.pages
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&p)
            .cloned()
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
        let pages = self
            .pages
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            if s == 0 && e.is_multiple_of(PAGE_BLOCKS) && !pages.contains_key(&(e / PAGE_BLOCKS)) {
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
        let pages = self
            .pages
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// A disk-sized sparse file of blocks with a state per block and
/// block locks: the cow filter's overlay, the cache filter's cache.
/// Callers take the locks of the blocks they change.
pub(crate) struct BlockFile {
    pub(crate) store: Store,
    pub(crate) map: StateMap,
    pub(crate) locks: BlockLocks,
    /// Block size, a power of 2.
    pub(crate) bs: u64,
    /// Size of the disk (the last block may be short).
    pub(crate) size: u64,
    /// The filter's name, for messages.
    who: &'static str,
}

/// A run of blocks in one state, clipped to the byte range asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// The state of every block of the run.
    pub(crate) state: u8,
    /// The part of the asked range in the run: `[start, end)` in bytes.
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The run's blocks, `[first, last)`, and their bytes
    /// `[block_start, block_end)` (whole blocks, beyond the asked range).
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) block_start: u64,
    pub(crate) block_end: u64,
}

/// A piece of a byte range, as writes and zeroes take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Whole blocks `[first, last)`, bytes `[start, end)`.
    Whole {
        first: u64,
        last: u64,
        start: u64,
        end: u64,
    },
    /// `[start, end)` of block `blk` only, which spans
    /// `[block_start, block_end)`.
    Part {
        blk: u64,
        block_start: u64,
        block_end: u64,
        start: u64,
        end: u64,
    },
}

impl BlockFile {
    /// A new empty file for a disk of `size` bytes in blocks of `bs`.
    pub(crate) fn new(who: &'static str, store: Store, bs: u64, size: u64) -> Self {
        BlockFile {
            store,
            map: StateMap::new(),
            locks: BlockLocks::new(),
            bs,
            size,
            who,
        }
    }
    /// End of the block `blk` (the last block may be short).
    pub(crate) fn block_end(&self, blk: u64) -> u64 {
        ((blk + 1) * self.bs).min(self.size)
    }
    /// Refuse a range beyond the end (the server checks first; this
    /// keeps the block loops finite whoever calls).
    pub(crate) fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::einval(format!(
                "{}: request {off}+{len} beyond the end ({})",
                self.who, self.size
            ))),
        }
    }
    /// Blocks `[first, last)` touched by the byte range `[off, end)`.
    pub(crate) fn blocks(&self, off: u64, end: u64) -> (u64, u64) {
        (off / self.bs, end.div_ceil(self.bs))
    }
    /// Blocks `[first, last)` wholly inside `[off, end)` (the short last
    /// block counts when the range reaches the end of the disk).
    pub(crate) fn whole_blocks(&self, off: u64, end: u64) -> (u64, u64) {
        let last = if end >= self.size {
            self.size.div_ceil(self.bs)
        } else {
            end / self.bs
        };
        (off.div_ceil(self.bs), last)
    }
    /// The runs of blocks of equal state covering `[off, end)`, in order.
    /// Each run's state is read when the iterator reaches it, so a caller
    /// may change the states of the run it was given.
    pub(crate) fn runs(&self, off: u64, end: u64) -> impl Iterator<Item = Run> + '_ {
        let (_, last) = self.blocks(off, end);
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let first = pos / self.bs;
            let (state, run_last) = self.map.run(first, last);
            let block_end = self.block_end(run_last - 1);
            let run = Run {
                state,
                start: pos,
                end: block_end.min(end),
                first,
                last: run_last,
                block_start: first * self.bs,
                block_end,
            };
            pos = run.end;
            Some(run)
        })
    }
    /// `[off, end)` as runs of whole blocks and parts of single blocks.
    pub(crate) fn pieces(&self, off: u64, end: u64) -> impl Iterator<Item = Piece> + '_ {
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let blk = pos / self.bs;
            let block_start = blk * self.bs;
            let block_end = self.block_end(blk);
            let piece = if pos == block_start && end >= block_end {
                let whole_end = if end >= self.size {
                    self.size
                } else {
                    end / self.bs * self.bs
                };
                Piece::Whole {
                    first: blk,
                    last: whole_end.div_ceil(self.bs),
                    start: pos,
                    end: whole_end,
                }
            } else {
                Piece::Part {
                    blk,
                    block_start,
                    block_end,
                    start: pos,
                    end: end.min(block_end),
                }
            };
            pos = match piece {
                Piece::Whole { end, .. } | Piece::Part { end, .. } => end,
            };
            Some(piece)
        })
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

    #[test]
    fn block_file_runs_and_pieces() {
        // 10000 bytes in 4K blocks: 0..4096, ..8192, ..10000 (short).
        let f = BlockFile::new("test", Store::new(10000).unwrap(), 4096, 10000);
        f.map.set(1, 2);
        let runs: Vec<_> = f.runs(100, 10000).collect();
        assert_eq!(runs.len(), 3);
        assert_eq!((runs[0].state, runs[0].start, runs[0].end), (0, 100, 4096));
        assert_eq!((runs[1].state, runs[1].first, runs[1].last), (2, 1, 2));
        assert_eq!(
            (runs[2].start, runs[2].end, runs[2].block_end),
            (8192, 10000, 10000)
        );
        assert_eq!(
            f.pieces(100, 10000).collect::<Vec<_>>(),
            vec![
                Piece::Part {
                    blk: 0,
                    block_start: 0,
                    block_end: 4096,
                    start: 100,
                    end: 4096
                },
                Piece::Whole {
                    first: 1,
                    last: 3,
                    start: 4096,
                    end: 10000
                },
            ]
        );
        assert_eq!(f.whole_blocks(100, 10000), (1, 3));
        assert_eq!(f.whole_blocks(100, 9000), (1, 2));
        assert!(f.check(9000, 1001).is_err() && f.check(9000, 1000).is_ok());
    }
}
