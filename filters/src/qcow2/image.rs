//! An open qcow2 image: the mapping of guest clusters through the L1 and
//! L2 tables, reads of every kind of cluster, and writes that allocate
//! clusters and keep the refcounts right.
//!
//! Metadata is cached in memory and written back at flush (and when the
//! last handle of a connection closes), in an order that keeps the
//! image consistent on disk at every moment: data and refcount blocks
//! (one sync), then the refcount table (after a sync), then L2 tables
//! and the L1 table (after a sync), and only after that are clusters
//! that the old metadata still pointed to given back (their refcounts
//! lowered). A
//! crash can leak clusters (a refcount too high, which `qemu-img check
//! -r leaks` repairs) but never leaves a cluster in use with a refcount
//! of 0. Clusters are allocated at the end of the file, never reused.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use libnbd::backend::HOLE_ZERO;
use libnbd::{Error, Extents, Flags, Handle, Result};

mod bitmaps;
mod repair;

use super::backing::Backing;
use super::header::{Compression, Header};

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How much freshly written file to start the writeback of at once.
const WRITEBACK_STEP: u64 = 16 << 20;
/// How far behind the end of the written file the early writeback
/// stays (allocating writes still in flight there).
const WRITEBACK_LAG: u64 = 16 << 20;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;
/// Clean L2 tables kept in memory at most (beyond that some are dropped).
const L2_CACHE_MAX: usize = 4096;
/// Decompressed clusters kept.
const COMPRESSED_CACHE: usize = 8;

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::eio(format!("qcow2: {msg}"))
}

/// Where a run of guest bytes lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    /// Not allocated here: from the backing file, or zeroes.
    Unalloc,
    /// Reads as zeroes.
    Zero,
    /// At this host offset.
    Data(u64),
    /// In a compressed cluster (its descriptor).
    Compressed(u64),
}

struct Refcounts {
    table: Vec<u64>,
    table_off: u64,
    table_clusters: u64,
    table_dirty: bool,
    /// Tables replaced since the last flush: given back once the header
    /// points to the new one.
    old_tables: Vec<(u64, u64)>,
    /// Whether the header must be rewritten to point at a new table.
    moved: bool,
    blocks: HashMap<u64, Vec<u8>>,
    dirty: BTreeSet<u64>,
}

impl Snapshot {
    fn is_empty(&self) -> bool {
        self.blocks.is_empty()
            && self.table.is_none()
            && self.moved.is_none()
            && self.l2s.is_empty()
            && self.l1.is_none()
            && self.frees.is_empty()
    }
}

/// A moved refcount table: its offset and clusters, and the tables it
/// replaced (offset, clusters).
type Moved = (u64, u64, Vec<(u64, u64)>);

/// The metadata to write back at a flush, taken at one moment.
struct Snapshot {
    blocks: Vec<(u64, Vec<u8>)>,
    table: Option<(u64, Vec<u8>)>,
    moved: Option<Moved>,
    l2s: Vec<(u64, Vec<u8>)>,
    l1: Option<Vec<u8>>,
    frees: Vec<(u64, u64)>,
}

struct State {
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: HashMap<u64, Vec<u64>>,
    l2_dirty: BTreeSet<u64>,
    rc: Option<Refcounts>,
    /// The next free host offset (cluster aligned).
    end: u64,
    /// Host byte ranges to give back once the L2 tables no longer
    /// pointing to them are on disk.
    to_free: Vec<(u64, u64)>,
    /// Guest clusters whose allocating write is under way: host
    /// clusters allocated, data being written, L2 entry not set yet.
    inflight: HashSet<u64>,
}

/// Clusters marked in flight by a write, unmarked when it is done (or
/// fails, or is dropped), waking the writes that wait for them.
struct Inflight<'a> {
    img: &'a Image,
    cis: Vec<u64>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if self.cis.is_empty() {
            return;
        }
        {
            let mut st = self.img.lock();
            for ci in &self.cis {
                st.inflight.remove(ci);
            }
        }
        self.img.alloc_done.notify_waiters();
    }
}

/// An open image (shared by every connection to it).
pub struct Image {
    pub h: Header,
    cb: u32,
    cs: u64,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    ext: bool,
    st: Mutex<State>,
    /// Serialises allocating writes, zero, trim and flush.
    alloc: tokio::sync::Mutex<()>,
    /// Woken when in-flight clusters are done.
    alloc_done: tokio::sync::Notify,
    /// Serialises flushes.
    flushing: tokio::sync::Mutex<()>,
    file_len: AtomicU64,
    /// Data written since the last flush began.
    unsynced: AtomicBool,
    /// The image file, to start the writeback of freshly allocated
    /// clusters early (see [`Image::set_writeback`]).
    writeback: Option<Arc<std::fs::File>>,
    /// Host offset up to which writeback was started.
    writeback_from: AtomicU64,
    pub backing: Option<Backing>,
    zcache: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
    /// The enabled persistent bitmaps, kept up to date by writes.
    bitmaps: tokio::sync::Mutex<bitmaps::Bitmaps>,
    has_bitmaps: bool,
    /// Bits gathered in memory, not yet written back.
    bitmaps_in_use: AtomicBool,
    /// Why the bitmaps could not be kept up to date, if so.
    bitmap_refusal: Option<String>,
    /// Connections open for writing.
    pub writers: AtomicUsize,
}

fn rc_get(b: &[u8], i: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        b[i * n..i * n + n]
            .iter()
            .fold(0u64, |a, &x| (a << 8) | x as u64)
    } else {
        let bit = i * bits;
        ((b[bit / 8] >> (bit % 8)) as u64) & ((1 << bits) - 1)
    }
}

fn rc_set(b: &mut [u8], i: usize, order: u32, v: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        for (k, x) in b[i * n..i * n + n].iter_mut().enumerate() {
            *x = (v >> (8 * (n - 1 - k))) as u8;
        }
    } else {
        let bit = i * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        b[bit / 8] = (b[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
    }
}

/// Add the piece of a buffer `[from, to)` going to host offset `host`,
/// merged into the last one when both are contiguous.
fn push_piece(pieces: &mut Vec<(u64, usize, usize)>, host: u64, from: usize, to: usize) {
    match pieces.last_mut() {
        Some((h, f, t)) if *h + (*t - *f) as u64 == host && *t == from => *t = to,
        _ => pieces.push((host, from, to)),
    }
}

fn to_be_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

fn from_be_bytes(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

impl Image {
    /// Open the image held by `io`, and its backing chain (`backing`
    /// and `fmt` instead of what the image names, when given; relative
    /// names from `dir`).
    pub fn open<'a>(
        io: &'a dyn Handle,
        dir: Option<&'a Path>,
        backing: Option<&'a str>,
        fmt: Option<&'a str>,
        depth: u32,
    ) -> BoxFut<'a, Result<Image>> {
        Box::pin(async move {
            let file_len = io.size()?;
            let mut first = vec![0u8; 512.min(file_len as usize)];
            io.pread(&mut first, 0, Flags::NONE).await?;
            let cb = Header::peek_cluster_bits(&first)?;
            let mut b = vec![0u8; (1usize << cb).min(file_len as usize)];
            io.pread(&mut b, 0, Flags::NONE).await?;
            let h = Header::parse(&b)?;
            let cs = 1u64 << cb;
            let l2_bits = cb - if h.ext_l2() { 4 } else { 3 };
            let l1_bytes = h.l1_size as u64 * 8;
            if h.l1_table_offset + l1_bytes > file_len {
                return Err(bad("L1 table beyond the end of the file"));
            }
            let mut l1 = vec![0u8; l1_bytes as usize];
            io.pread(&mut l1, h.l1_table_offset, Flags::NONE).await?;
            let l1 = from_be_bytes(&l1);
            let backing = Backing::open(&h, dir, backing, fmt, depth).await?;
            let mut img = Image {
                cb,
                cs,
                l2_bits,
                ext: h.ext_l2(),
                st: Mutex::new(State {
                    l1,
                    l1_dirty: false,
                    l2: HashMap::new(),
                    l2_dirty: BTreeSet::new(),
                    rc: None,
                    end: file_len.div_ceil(cs) * cs,
                    to_free: Vec::new(),
                    inflight: HashSet::new(),
                }),
                alloc: tokio::sync::Mutex::new(()),
                alloc_done: tokio::sync::Notify::new(),
                flushing: tokio::sync::Mutex::new(()),
                file_len: AtomicU64::new(file_len),
                unsynced: AtomicBool::new(false),
                writeback: None,
                writeback_from: AtomicU64::new(file_len),
                backing,
                zcache: Mutex::new(Vec::new()),
                bitmaps: Default::default(),
                has_bitmaps: false,
                bitmaps_in_use: AtomicBool::new(false),
                bitmap_refusal: None,
                writers: AtomicUsize::new(0),
                h,
            };
            if depth == 0 {
                match img.load_bitmaps(io).await {
                    Ok(b) => {
                        img.has_bitmaps = !b.list.is_empty();
                        *img.bitmaps.get_mut() = b;
                    }
                    Err(e) => img.bitmap_refusal = Some(e.msg),
                }
            }
            Ok(img)
        })
    }

    /// Are there bits of persistent bitmaps not yet written back?
    pub fn bitmaps_pending(&self) -> bool {
        self.bitmaps_in_use.load(Ordering::Acquire)
    }

    /// The virtual disk size.
    pub fn size(&self) -> u64 {
        self.h.size
    }

    /// Why writes cannot be done, if they cannot.
    pub fn write_refusal(&self) -> Option<String> {
        if let Some(why) = &self.bitmap_refusal {
            return Some(format!(
                "{why}: the image's persistent bitmaps could not be kept up to date"
            ));
        }
        self.h.write_refusal()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn read_host(&self, io: &dyn Handle, buf: &mut [u8], off: u64) -> Result<()> {
        let len = self.file_len.load(Ordering::Acquire);
        let avail = len.saturating_sub(off).min(buf.len() as u64) as usize;
        if avail > 0 {
            io.pread(&mut buf[..avail], off, Flags::NONE).await?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    async fn load_l2(&self, io: &dyn Handle, l2off: u64) -> Result<Vec<u64>> {
        if !l2off.is_multiple_of(self.cs) {
            return Err(bad(format!("L2 table offset {l2off:#x} not aligned")));
        }
        let mut b = vec![0u8; self.cs as usize];
        self.read_host(io, &mut b, l2off).await?;
        Ok(from_be_bytes(&b))
    }

    /// The L2 offset for guest cluster `ci` (0 if none), and the guest
    /// bytes from `ci` that its L1 entry spans.
    fn l1_entry(&self, ci: u64) -> (u64, u64) {
        let l1i = ci >> self.l2_bits;
        let st = self.lock();
        (st.l1.get(l1i as usize).copied().unwrap_or(0), l1i)
    }

    /// The L2 entry (and bitmap, for extended L2) of guest cluster `ci`.
    async fn entry(&self, io: &dyn Handle, ci: u64) -> Result<(u64, u64)> {
        let (l1e, _) = self.l1_entry(ci);
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok((0, 0));
        }
        let idx = (ci & ((1 << self.l2_bits) - 1)) as usize;
        let get = |t: &Vec<u64>| {
            if self.ext {
                (t[2 * idx], t[2 * idx + 1])
            } else {
                (t[idx], 0)
            }
        };
        if let Some(t) = self.lock().l2.get(&l2off) {
            return Ok(get(t));
        }
        let t = self.load_l2(io, l2off).await?;
        let mut st = self.lock();
        if st.l2.len() >= L2_CACHE_MAX {
            let clean: Vec<u64> = st
                .l2
                .keys()
                .filter(|k| !st.l2_dirty.contains(k))
                .take(L2_CACHE_MAX / 4)
                .copied()
                .collect();
            for k in clean {
                st.l2.remove(&k);
            }
        }
        let t = st.l2.entry(l2off).or_insert(t);
        Ok(get(t))
    }

    /// The mapping of the run of guest bytes at `pos` (at most `max`
    /// bytes, not crossing a cluster unless unmapped by L1).
    pub async fn map(&self, io: &dyn Handle, pos: u64, max: u64) -> Result<(Map, u64)> {
        let cs = self.cs;
        let ci = pos >> self.cb;
        let inc = pos & (cs - 1);
        let (l1e, l1i) = self.l1_entry(ci);
        if l1e & OFFSET_MASK == 0 {
            let span_end = (l1i + 1) << (self.l2_bits + self.cb);
            return Ok((Map::Unalloc, (span_end - pos).min(max)));
        }
        let (e, bm) = self.entry(io, ci).await?;
        let len = (cs - inc).min(max);
        if e & COMPRESSED != 0 {
            return Ok((Map::Compressed(e & !(COPIED | COMPRESSED)), len));
        }
        let host = e & OFFSET_MASK;
        if !self.ext {
            if self.h.version >= 3 && e & ZERO_FLAG != 0 {
                return Ok((Map::Zero, len));
            }
            if host == 0 {
                return Ok((Map::Unalloc, len));
            }
            return Ok((Map::Data(host + inc), len));
        }
        // Subclusters.
        let sc = cs / 32;
        let si = inc / sc;
        let kind = |i: u64| {
            if bm >> i & 1 != 0 {
                0
            } else if bm >> (32 + i) & 1 != 0 {
                1
            } else {
                2
            }
        };
        let k = kind(si);
        let mut j = si + 1;
        while j < 32 && kind(j) == k {
            j += 1;
        }
        let len = (j * sc - inc).min(max);
        Ok(match k {
            0 if host == 0 => return Err(bad("allocated subcluster without host offset")),
            0 => (Map::Data(host + inc), len),
            1 => (Map::Zero, len),
            _ => (Map::Unalloc, len),
        })
    }

    /// The runs of `[off, off+len)`, host-contiguous data merged.
    async fn runs(&self, io: &dyn Handle, off: u64, len: u64) -> Result<Vec<(Map, u64)>> {
        let mut out: Vec<(Map, u64)> = Vec::new();
        let mut done = 0;
        while done < len {
            let (m, n) = self.map(io, off + done, len - done).await?;
            match (out.last_mut(), m) {
                (Some((Map::Data(h), l)), Map::Data(h2)) if *h + *l == h2 => *l += n,
                (Some((Map::Zero, l)), Map::Zero) => *l += n,
                (Some((Map::Unalloc, l)), Map::Unalloc) => *l += n,
                _ => out.push((m, n)),
            }
            done += n;
        }
        Ok(out)
    }

    async fn decompress(&self, io: &dyn Handle, desc: u64) -> Result<Arc<Vec<u8>>> {
        {
            let c = self.zcache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, d)) = c.iter().find(|(k, _)| *k == desc) {
                return Ok(d.clone());
            }
        }
        let x = 62 - (self.cb - 8);
        let host = desc & ((1u64 << x) - 1);
        let nsec = ((desc >> x) & ((1u64 << (self.cb - 8)) - 1)) + 1;
        let clen = nsec * 512 - (host & 511);
        let mut input = vec![0u8; clen as usize];
        self.read_host(io, &mut input, host).await?;
        let mut out = vec![0u8; self.cs as usize];
        match self.h.compression {
            Compression::Zlib => {
                let mut d = flate2::Decompress::new(false);
                let r = d.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
                if let Err(e) = r {
                    if d.total_out() < self.cs {
                        return Err(bad(format!("compressed cluster at {host:#x}: {e}")));
                    }
                }
                if d.total_out() < self.cs {
                    return Err(bad(format!("compressed cluster at {host:#x} is truncated")));
                }
            }
            Compression::Zstd => {
                use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
                let mut d = Decoder::new().map_err(|e| bad(format!("zstd: {e}")))?;
                let mut inb = InBuffer::around(&input);
                let mut outb = OutBuffer::around(&mut out[..]);
                while outb.pos() < self.cs as usize {
                    let before = (inb.pos(), outb.pos());
                    if let Err(e) = d.run(&mut inb, &mut outb) {
                        return Err(bad(format!("compressed cluster at {host:#x}: {e}")));
                    }
                    if (inb.pos(), outb.pos()) == before {
                        return Err(bad(format!("compressed cluster at {host:#x} is truncated")));
                    }
                }
            }
        }
        let out = Arc::new(out);
        let mut c = self.zcache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= COMPRESSED_CACHE {
            c.remove(0);
        }
        c.push((desc, out.clone()));
        Ok(out)
    }

    /// Read guest bytes.
    pub fn read<'a>(
        &'a self,
        io: &'a dyn Handle,
        buf: &'a mut [u8],
        off: u64,
    ) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            let runs = self.runs(io, off, buf.len() as u64).await?;
            let mut at = 0usize;
            for (m, n) in runs {
                let piece = &mut buf[at..at + n as usize];
                let pos = off + at as u64;
                match m {
                    Map::Data(h) => self.read_host(io, piece, h).await?,
                    Map::Zero => piece.fill(0),
                    Map::Unalloc => match &self.backing {
                        Some(b) => b.read(piece, pos).await?,
                        None => piece.fill(0),
                    },
                    Map::Compressed(d) => {
                        let data = self.decompress(io, d).await?;
                        let inc = (pos & (self.cs - 1)) as usize;
                        piece.copy_from_slice(&data[inc..inc + n as usize]);
                    }
                }
                at += n as usize;
            }
            Ok(())
        })
    }

    /// `base:allocation` of `[off, off+count)` into `ext`.
    pub fn extents<'a>(
        &'a self,
        io: &'a dyn Handle,
        count: u64,
        off: u64,
        one: bool,
        ext: &'a mut Extents,
    ) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            let end = (off + count).min(self.h.size);
            let mut pos = off;
            while pos < end {
                let (m, n) = self.map(io, pos, end - pos).await?;
                match m {
                    Map::Data(_) | Map::Compressed(_) => ext.add(pos, n, 0)?,
                    Map::Zero => ext.add(pos, n, HOLE_ZERO)?,
                    Map::Unalloc => match &self.backing {
                        Some(b) => b.extents(n, pos, ext).await?,
                        None => ext.add(pos, n, HOLE_ZERO)?,
                    },
                }
                pos += n;
                if one || ext.is_full() {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `qemu:allocation-depth` of `[off, off+count)`: 0 where no layer
    /// has the data, 1 for this image, 2 for its backing file...
    pub fn depth<'a>(
        &'a self,
        io: &'a dyn Handle,
        count: u64,
        off: u64,
        base: u32,
        ext: &'a mut Extents,
    ) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            let end = (off + count).min(self.h.size);
            let mut pos = off;
            while pos < end {
                let (m, n) = self.map(io, pos, end - pos).await?;
                match m {
                    Map::Unalloc => match &self.backing {
                        Some(b) => b.depth(n, pos, base + 1, ext).await?,
                        None => ext.add(pos, n, 0)?,
                    },
                    _ => ext.add(pos, n, base)?,
                }
                pos += n;
                if ext.is_full() {
                    break;
                }
            }
            Ok(())
        })
    }

    // ---- Writing ----

    async fn load_refcounts(&self, io: &dyn Handle) -> Result<()> {
        if self.lock().rc.is_some() {
            return Ok(());
        }
        // Auto-clear features we do not keep up to date: clear their bits
        // before the first write, as the specification requires (bit 0,
        // the bitmaps, is kept: we update them).
        let keep = self.h.autoclear & 1;
        if self.h.autoclear != keep {
            io.pwrite(&keep.to_be_bytes(), 88, Flags::NONE).await?;
            io.flush(Flags::NONE).await?;
        }
        let cs = self.cs;
        let toff = self.h.refcount_table_offset;
        let tcl = self.h.refcount_table_clusters as u64;
        let mut b = vec![0u8; (tcl * cs) as usize];
        self.read_host(io, &mut b, toff).await?;
        let table = from_be_bytes(&b);
        let mut blocks = HashMap::new();
        for &e in &table {
            let off = e & OFFSET_MASK;
            if off != 0 {
                let mut blk = vec![0u8; cs as usize];
                self.read_host(io, &mut blk, off).await?;
                blocks.insert(off, blk);
            }
        }
        self.lock().rc = Some(Refcounts {
            table,
            table_off: toff,
            table_clusters: tcl,
            table_dirty: false,
            old_tables: Vec::new(),
            moved: false,
            blocks,
            dirty: BTreeSet::new(),
        });
        Ok(())
    }

    fn per_block(&self) -> u64 {
        (self.cs * 8) >> self.h.refcount_order
    }

    /// Add `delta` to the refcount of the cluster at `host`.
    fn rc_add(&self, st: &mut State, host: u64, delta: i64) -> Result<()> {
        let idx = host >> self.cb;
        let t = (idx / self.per_block()) as usize;
        let bi = (idx % self.per_block()) as usize;
        let boff = self.ensure_block(st, t)?;
        let order = self.h.refcount_order;
        let rc = st.rc.as_mut().unwrap();
        let blk = rc
            .blocks
            .get_mut(&boff)
            .ok_or_else(|| bad("refcount block not loaded"))?;
        let v = rc_get(blk, bi, order);
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let nv = if delta >= 0 {
            v.checked_add(delta as u64).filter(|&n| n <= max)
        } else {
            v.checked_sub(delta.unsigned_abs())
        };
        let Some(nv) = nv else {
            return Err(bad(format!(
                "refcount of cluster {host:#x} would go out of range ({v}{delta:+})"
            )));
        };
        rc_set(blk, bi, order, nv);
        rc.dirty.insert(boff);
        Ok(())
    }

    /// The offset of refcount block `t`, allocating it (and growing the
    /// refcount table) if needed.
    fn ensure_block(&self, st: &mut State, t: usize) -> Result<u64> {
        let cs = self.cs;
        if t >= st.rc.as_ref().unwrap().table.len() {
            self.grow_table(st, t)?;
        }
        let rc = st.rc.as_mut().unwrap();
        let off = rc.table[t] & OFFSET_MASK;
        if off != 0 {
            if !rc.blocks.contains_key(&off) {
                return Err(bad("refcount block not loaded"));
            }
            return Ok(off);
        }
        let off = st.end;
        st.end += cs;
        let rc = st.rc.as_mut().unwrap();
        rc.table[t] = off;
        rc.table_dirty = true;
        rc.blocks.insert(off, vec![0u8; cs as usize]);
        rc.dirty.insert(off);
        self.rc_add(st, off, 1)?;
        Ok(off)
    }

    fn grow_table(&self, st: &mut State, t: usize) -> Result<()> {
        let cs = self.cs;
        let pb = self.per_block();
        let old_len = st.rc.as_ref().unwrap().table.len() as u64;
        let mut entries = (t as u64 + 1).max(old_len * 2).max(cs / 8);
        let (clusters, off) = loop {
            let clusters = (entries * 8).div_ceil(cs);
            // The table must also cover its own clusters.
            let last = ((st.end + clusters * cs) >> self.cb) / pb;
            if last < clusters * cs / 8 {
                break (clusters, st.end);
            }
            entries = entries.max(last + 1) * 2;
        };
        if clusters * cs > 8 << 20 {
            return Err(Error::enospc("qcow2: refcount table would exceed 8 MiB"));
        }
        st.end += clusters * cs;
        let rc = st.rc.as_mut().unwrap();
        rc.old_tables.push((rc.table_off, rc.table_clusters));
        rc.table.resize((clusters * cs / 8) as usize, 0);
        rc.table_off = off;
        rc.table_clusters = clusters;
        rc.table_dirty = true;
        rc.moved = true;
        for i in 0..clusters {
            self.rc_add(st, off + i * cs, 1)?;
        }
        Ok(())
    }

    fn alloc_clusters(&self, st: &mut State, n: u64) -> Result<u64> {
        let off = st.end;
        st.end += n * self.cs;
        for i in 0..n {
            self.rc_add(st, off + i * self.cs, 1)?;
        }
        Ok(off)
    }

    /// Make sure guest cluster `ci` has an L2 table; returns its offset.
    async fn ensure_l2(&self, io: &dyn Handle, ci: u64) -> Result<u64> {
        let l1i = (ci >> self.l2_bits) as usize;
        let e = {
            let st = self.lock();
            *st.l1
                .get(l1i)
                .ok_or_else(|| bad("write beyond the L1 table"))?
        };
        let off = e & OFFSET_MASK;
        if off != 0 && e & COPIED != 0 {
            // Load it.
            self.entry(io, ci).await?;
            return Ok(off);
        }
        // None yet, or one shared with an internal snapshot (its refcount
        // above 1): a table of our own, a copy of the shared one. The data
        // clusters it points to keep their refcounts (one path to each
        // moves from the old table to the copy) and their entries keep
        // COPIED clear, so writes still copy them first; the old table
        // loses a reference once the L1 table no longer points to it.
        let table = if off != 0 {
            let cached = self.lock().l2.get(&off).cloned();
            match cached {
                Some(t) => t,
                None => self.load_l2(io, off).await?,
            }
        } else {
            vec![0u64; (self.cs / 8) as usize]
        };
        // Replaced meanwhile? (Not while the caller holds the allocation
        // lock, as writers do.) Then use what is there.
        if self.lock().l1[l1i] != e {
            return Box::pin(self.ensure_l2(io, ci)).await;
        }
        let mut st = self.lock();
        let new = self.alloc_clusters(&mut st, 1)?;
        if off != 0 {
            st.to_free.push((off, self.cs));
        }
        let off = new;
        st.l2.insert(off, table);
        st.l2_dirty.insert(off);
        st.l1[l1i] = off | COPIED;
        st.l1_dirty = true;
        Ok(off)
    }

    /// The subclusters of guest cluster `ci` inside the disk, as bits of
    /// an extended L2 bitmap.
    fn sub_mask(&self, ci: u64) -> u64 {
        let sc = self.cs / 32;
        let n = (self.h.size - ci * self.cs).min(self.cs).div_ceil(sc);
        (1u64 << n) - 1
    }

    /// Does guest cluster `ci` with entry `e` (and bitmap `bm`) read as
    /// zeroes all through, with nothing below it?
    fn all_zero(&self, ci: u64, e: u64, bm: u64) -> bool {
        if e & COMPRESSED != 0 {
            return false;
        }
        if self.ext {
            let m = self.sub_mask(ci);
            (bm >> 32) & m == m || (bm & m == 0 && self.backing.is_none())
        } else {
            (self.h.version >= 3 && e & ZERO_FLAG != 0)
                || (e & OFFSET_MASK == 0 && self.backing.is_none())
        }
    }

    /// Set the L2 entry of guest cluster `ci` (its table loaded by
    /// `ensure_l2`), returning the old entry. `v` is in the standard
    /// form (a host offset with COPIED: allocated; `ZERO_FLAG`: zeroes;
    /// 0: unallocated); with extended L2 entries its bitmap says the
    /// same of every subcluster.
    async fn set_entry(&self, io: &dyn Handle, ci: u64, v: u64) -> Result<u64> {
        let l2off = self.ensure_l2(io, ci).await?;
        let idx = (ci & ((1 << self.l2_bits) - 1)) as usize;
        loop {
            {
                let mut st = self.lock();
                if let Some(t) = st.l2.get_mut(&l2off) {
                    let old = if self.ext {
                        let m = self.sub_mask(ci);
                        let (e, bm) = if v & ZERO_FLAG != 0 {
                            (v & !ZERO_FLAG, m << 32)
                        } else if v & OFFSET_MASK != 0 {
                            (v, m)
                        } else {
                            (v, 0)
                        };
                        t[2 * idx + 1] = bm;
                        std::mem::replace(&mut t[2 * idx], e)
                    } else {
                        std::mem::replace(&mut t[idx], v)
                    };
                    st.l2_dirty.insert(l2off);
                    return Ok(old);
                }
            }
            // Dropped from the cache meanwhile: load again.
            self.entry(io, ci).await?;
        }
    }

    /// Give back the host clusters that old entry `e` pointed to, once
    /// the new entry is on disk.
    fn free_later(&self, st: &mut State, e: u64) {
        if e & COMPRESSED != 0 {
            let desc = e & !(COPIED | COMPRESSED);
            let x = 62 - (self.cb - 8);
            let host = desc & ((1u64 << x) - 1);
            let nsec = ((desc >> x) & ((1u64 << (self.cb - 8)) - 1)) + 1;
            let len = nsec * 512 - (host & 511);
            st.to_free.push((host, len));
        } else if e & OFFSET_MASK != 0 {
            st.to_free.push((e & OFFSET_MASK, self.cs));
        }
    }

    /// The whole content of guest cluster `ci` as it reads now.
    async fn cluster_content(&self, io: &dyn Handle, ci: u64) -> Result<Vec<u8>> {
        let cs = self.cs;
        let start = ci * cs;
        let len = cs.min(self.h.size - start);
        let mut b = vec![0u8; cs as usize];
        self.read(io, &mut b[..len as usize], start).await?;
        Ok(b)
    }

    /// Write guest bytes.
    ///
    /// Clusters that need allocating get their host clusters (and L2
    /// tables) under the allocation lock, and are marked in flight; the
    /// data is written with the lock released, so that allocating writes
    /// of several requests go on at once; then, under the lock again,
    /// the L2 entries are set. Until then reads of those clusters see
    /// what they held before, and a second write into one of them waits
    /// for the first to be done (it then writes in place).
    pub async fn write(&self, io: &dyn Handle, buf: &[u8], off: u64) -> Result<()> {
        self.write_where(io, buf, off, false).await
    }

    /// Copy-on-read: write `buf` (what the backing chain holds there)
    /// into the clusters of `[off, off + len)` that are still unallocated
    /// all through, leaving every other cluster as it is. Which ones is
    /// decided under the allocation lock, after the writes allocating
    /// them are done, so that a guest write, even one still in flight
    /// when the backing data was read, is never overwritten by it.
    pub async fn copy_up_write(&self, io: &dyn Handle, buf: &[u8], off: u64) -> Result<()> {
        self.write_where(io, buf, off, true).await
    }

    /// Is guest cluster `ci` unallocated all through (it reads from the
    /// backing chain, or as zeroes without one)?
    fn unallocated(&self, ci: u64, e: u64, bm: u64) -> bool {
        if e & COMPRESSED != 0 {
            return false;
        }
        if self.ext {
            let m = self.sub_mask(ci);
            bm & (m | m << 32) == 0
        } else {
            e & OFFSET_MASK == 0 && !(self.h.version >= 3 && e & ZERO_FLAG != 0)
        }
    }

    async fn write_where(
        &self,
        io: &dyn Handle,
        buf: &[u8],
        off: u64,
        only_unallocated: bool,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.mark(io, off, buf.len() as u64).await?;
        // Fast path: every cluster one to write in place (as the slow
        // path would: a cluster it would reallocate, such as one with
        // some subclusters unallocated, must not be written here, or a
        // concurrent reallocation could copy what it held before).
        if let Some(pieces) = self.in_place_pieces(io, off, buf.len() as u64).await? {
            if only_unallocated {
                // All allocated already.
                return Ok(());
            }
            for (h, f, t) in pieces {
                io.pwrite(&buf[f..t], h, Flags::NONE).await?;
                self.wrote(h + (t - f) as u64);
            }
            return Ok(());
        }
        let cs = self.cs;
        let end = off + buf.len() as u64;
        let first = off >> self.cb;
        let last = (end - 1) >> self.cb;
        // Classify each cluster.
        struct C {
            ci: u64,
            e: u64,
            keep: bool,
            /// Reads as zeroes all through.
            zero: bool,
            /// Left as it is (copy-on-read into an allocated cluster).
            skip: bool,
        }
        let (cl, base, _inflight) = {
            // Clusters another write is allocating: that write done first
            // (its L2 entries set), then they are classified here.
            let _g = self.alloc_lock_idle(first, last).await;
            self.load_refcounts(io).await?;
            let mut cl = Vec::new();
            for ci in first..=last {
                let (e, bm) = self.entry(io, ci).await?;
                let skip = only_unallocated && !self.unallocated(ci, e, bm);
                let keep = !skip && self.in_place(ci, e, bm);
                let zero = self.all_zero(ci, e, bm);
                cl.push(C {
                    ci,
                    e,
                    keep,
                    zero,
                    skip,
                });
            }
            // Allocate fresh clusters for the others, contiguously.
            let alloc = |c: &&C| !c.keep && !c.skip;
            let need = cl.iter().filter(alloc).count() as u64;
            for c in cl.iter().filter(alloc) {
                self.ensure_l2(io, c.ci).await?;
            }
            let mut st = self.lock();
            let base = if need > 0 {
                self.alloc_clusters(&mut st, need)?
            } else {
                0
            };
            let fresh: Vec<u64> = cl.iter().filter(alloc).map(|c| c.ci).collect();
            st.inflight.extend(fresh.iter().copied());
            drop(st);
            let guard = Inflight {
                img: self,
                cis: fresh,
            };
            (cl, base, guard)
        };
        let mut k = 0;
        let mut newe = Vec::new();
        // Pieces of `buf` for host offsets, merged when both are
        // contiguous: one pwrite for a run of fresh clusters.
        let mut pieces: Vec<(u64, usize, usize)> = Vec::new();
        let mut add = |host: u64, from: usize, to: usize| push_piece(&mut pieces, host, from, to);
        for c in cl.iter().filter(|c| !c.skip) {
            let cstart = c.ci * cs;
            let s = off.max(cstart);
            let e = end.min(cstart + cs);
            let (from, to) = ((s - off) as usize, (e - off) as usize);
            if c.keep {
                add((c.e & OFFSET_MASK) + (s - cstart), from, to);
                continue;
            }
            let host = base + k * cs;
            k += 1;
            let disk_end = self.h.size.min(cstart + cs);
            let full = s == cstart && e >= disk_end;
            if full || c.zero {
                // The rest of a fresh cluster reads as zeroes.
                add(host + (s - cstart), from, to);
            } else {
                // What the rest of the cluster holds now (the entry is
                // still the old one: writes and zeroes into the cluster
                // wait for this write to be done).
                let mut content = self.cluster_content(io, c.ci).await?;
                content[(s - cstart) as usize..(e - cstart) as usize]
                    .copy_from_slice(&buf[from..to]);
                let wl = (disk_end - cstart) as usize;
                io.pwrite(&content[..wl], host, Flags::NONE).await?;
                self.wrote(host + wl as u64);
            }
            newe.push((c.ci, host | COPIED));
        }
        for (h, f, t) in pieces {
            io.pwrite(&buf[f..t], h, Flags::NONE).await?;
            self.wrote(h + (t - f) as u64);
        }
        if !newe.is_empty() {
            let _g = self.alloc.lock().await;
            for (ci, v) in newe {
                let old = self.set_entry(io, ci, v).await?;
                let mut st = self.lock();
                self.free_later(&mut st, old);
            }
        }
        Ok(())
    }

    /// Take the allocation lock once no cluster of `first..=last` is in
    /// flight (an allocating write's data still being written): the
    /// writes into them are done and their L2 entries set, and none can
    /// start while the lock is held.
    async fn alloc_lock_idle(&self, first: u64, last: u64) -> tokio::sync::MutexGuard<'_, ()> {
        loop {
            let g = self.alloc.lock().await;
            let done = self.alloc_done.notified();
            tokio::pin!(done);
            {
                let st = self.lock();
                if !st.inflight.iter().any(|ci| (first..=last).contains(ci)) {
                    return g;
                }
                done.as_mut().enable();
            }
            drop(g);
            done.await;
        }
    }

    /// Data was written up to host offset `end`.
    fn wrote(&self, end: u64) {
        let len = self.file_len.fetch_max(end, Ordering::AcqRel).max(end);
        self.unsynced.store(true, Ordering::Release);
        self.start_writeback(len);
    }

    /// Start early writeback with `file`, the image file (any descriptor
    /// of it): as clusters allocated at the end of the file are written
    /// (a copy into the image), their writeback to the disk is started
    /// every [`WRITEBACK_STEP`] bytes (`sync_file_range`, which does not
    /// wait), so that the disk writes while the copy goes on and the sync
    /// of a flush or of the close waits for the last few MiB only, not
    /// for the whole image. Rewrites of clusters in place start nothing.
    pub fn set_writeback(&mut self, file: Arc<std::fs::File>) {
        self.writeback = Some(file);
    }

    /// The file has been written up to `len`: start the writeback of
    /// what lies [`WRITEBACK_LAG`] behind it, a step at a time (writes
    /// still in flight just before `len` are left for the next step).
    fn start_writeback(&self, len: u64) {
        let Some(f) = &self.writeback else { return };
        let from = self.writeback_from.load(Ordering::Acquire);
        let to = len.saturating_sub(WRITEBACK_LAG);
        if to < from + WRITEBACK_STEP
            || self
                .writeback_from
                .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let f = f.clone();
        let run = move || {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on a descriptor `f` keeps open.
            unsafe {
                libc::sync_file_range(
                    f.as_raw_fd(),
                    from as i64,
                    (to - from) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        };
        // It may block while the disk's queue is full: not on a worker
        // thread of the runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Is guest cluster `ci` (entry `e`, subcluster bitmap `bm`) written
    /// in place? Only a cluster of ours alone, allocated all through
    /// (with subclusters: every one of them).
    fn in_place(&self, ci: u64, e: u64, bm: u64) -> bool {
        e & COMPRESSED == 0
            && e & COPIED != 0
            && e & OFFSET_MASK != 0
            && if self.ext {
                bm & self.sub_mask(ci) == self.sub_mask(ci)
            } else {
                !(self.h.version >= 3 && e & ZERO_FLAG != 0)
            }
    }

    /// Where `len` guest bytes at `off` go when every cluster of them is
    /// written in place: (host offset, from, to) pieces of the buffer,
    /// merged where the host clusters are contiguous; `None` otherwise.
    async fn in_place_pieces(
        &self,
        io: &dyn Handle,
        off: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, usize, usize)>>> {
        let end = off + len;
        let mut pieces: Vec<(u64, usize, usize)> = Vec::new();
        for ci in (off >> self.cb)..=((end - 1) >> self.cb) {
            let (e, bm) = self.entry(io, ci).await?;
            if !self.in_place(ci, e, bm) {
                return Ok(None);
            }
            let cstart = ci * self.cs;
            let s = off.max(cstart);
            let t = end.min(cstart + self.cs);
            let host = (e & OFFSET_MASK) + (s - cstart);
            let (from, to) = ((s - off) as usize, (t - off) as usize);
            push_piece(&mut pieces, host, from, to);
        }
        Ok(Some(pieces))
    }

    /// Zero (or with `trim`, discard) guest bytes.
    pub async fn zero(&self, io: &dyn Handle, count: u64, off: u64, trim: bool) -> Result<()> {
        self.mark(io, off, count).await?;
        let cs = self.cs;
        let end = (off + count).min(self.h.size);
        let mut partial = Vec::new();
        {
            let _g = self
                .alloc_lock_idle(off >> self.cb, end.saturating_sub(1) >> self.cb)
                .await;
            self.load_refcounts(io).await?;
            let mut ci = off >> self.cb;
            while ci * cs < end {
                let cstart = ci * cs;
                let s = off.max(cstart);
                let e = end.min(cstart + cs);
                let disk_end = self.h.size.min(cstart + cs);
                let (l1e, l1i) = self.l1_entry(ci);
                if l1e & OFFSET_MASK == 0 && self.backing.is_none() {
                    // A whole unmapped L2 span reads as zeroes already.
                    ci = (l1i + 1) << self.l2_bits;
                    continue;
                }
                let (ce, cbm) = self.entry(io, ci).await?;
                let reads_zero = self.all_zero(ci, ce, cbm);
                if s == cstart && e >= disk_end {
                    let v3 = self.h.version >= 3;
                    let new = if self.backing.is_none() {
                        if l1e & OFFSET_MASK == 0 {
                            None
                        } else if trim || !v3 {
                            Some(0)
                        } else {
                            Some(ZERO_FLAG)
                        }
                    } else if v3 {
                        Some(ZERO_FLAG)
                    } else if trim {
                        None
                    } else {
                        partial.push((s, e));
                        None
                    };
                    if let Some(v) = new {
                        if ce != v && !(l1e & OFFSET_MASK == 0 && v == 0) {
                            let old = self.set_entry(io, ci, v).await?;
                            // Only a cluster of ours alone: a snapshot may
                            // still read one without COPIED.
                            if old & OFFSET_MASK != 0 && old & COMPRESSED == 0 && old & COPIED != 0
                            {
                                let _ = io.trim(cs, old & OFFSET_MASK, Flags::NONE).await;
                                self.unsynced.store(true, Ordering::Release);
                            }
                            let mut st = self.lock();
                            self.free_later(&mut st, old);
                        }
                    }
                } else if !trim && !reads_zero {
                    partial.push((s, e));
                }
                ci += 1;
            }
        }
        for (s, e) in partial {
            let z = vec![0u8; (e - s) as usize];
            self.write(io, &z, s).await?;
        }
        Ok(())
    }

    /// Write the metadata back, in an order that keeps the image
    /// consistent, and make everything stable. The metadata is taken as
    /// it stands at one moment, under the allocation lock only for that
    /// moment: writes go on while it is written and synced (qemu-nbd
    /// holds its metadata lock through every sync). Every L2 entry in
    /// it points to data whose write was done before (entries are set
    /// after their data is written), so the first sync, after the
    /// refcount blocks are written, makes both the data and the
    /// refcounts stable before any table points to them.
    pub async fn flush(&self, io: &dyn Handle) -> Result<()> {
        let _f = self.flushing.lock().await;
        // Whether data was written since the last flush (cleared before
        // the snapshot: a write done after it is for the next flush).
        let unsynced = self.unsynced.swap(false, Ordering::AcqRel);
        let snap = {
            let _g = self.alloc.lock().await;
            let mut st = self.lock();
            let st = &mut *st;
            st.rc.as_mut().map(|rc| {
                let blocks: Vec<(u64, Vec<u8>)> = std::mem::take(&mut rc.dirty)
                    .into_iter()
                    .map(|o| (o, rc.blocks[&o].clone()))
                    .collect();
                let table = rc
                    .table_dirty
                    .then(|| (rc.table_off, to_be_bytes(&rc.table)));
                rc.table_dirty = false;
                let moved = rc.moved.then(|| {
                    (
                        rc.table_off,
                        rc.table_clusters,
                        std::mem::take(&mut rc.old_tables),
                    )
                });
                rc.moved = false;
                let l2s: Vec<(u64, Vec<u8>)> = std::mem::take(&mut st.l2_dirty)
                    .into_iter()
                    .filter_map(|o| st.l2.get(&o).map(|t| (o, to_be_bytes(t))))
                    .collect();
                let l1 = st.l1_dirty.then(|| to_be_bytes(&st.l1));
                st.l1_dirty = false;
                let frees = std::mem::take(&mut st.to_free);
                Snapshot {
                    blocks,
                    table,
                    moved,
                    l2s,
                    l1,
                    frees,
                }
            })
        };
        let Some(snap) = snap else {
            // Nothing allocated yet: only data to sync.
            if !unsynced {
                return Ok(());
            }
            let r = io.flush(Flags::NONE).await;
            if r.is_err() {
                self.unsynced.store(true, Ordering::Release);
            }
            return r;
        };
        if !unsynced && snap.is_empty() {
            // Nothing written since the last flush.
            return Ok(());
        }
        let r = self.write_back(io, &snap).await;
        if r.is_err() {
            // Written again at the next flush.
            self.unsynced.store(true, Ordering::Release);
            let mut st = self.lock();
            let st = &mut *st;
            let rc = st.rc.as_mut().unwrap();
            rc.dirty.extend(snap.blocks.iter().map(|(o, _)| *o));
            rc.table_dirty |= snap.table.is_some();
            if let Some((_, _, old)) = snap.moved {
                rc.moved = true;
                rc.old_tables.extend(old);
            }
            st.l2_dirty.extend(snap.l2s.iter().map(|(o, _)| *o));
            st.l1_dirty |= snap.l1.is_some();
            st.to_free.extend(snap.frees);
        }
        r
    }

    async fn write_back(&self, io: &dyn Handle, snap: &Snapshot) -> Result<()> {
        let cs = self.cs;
        // 1. Refcount blocks, stable with the data in one sync; then the
        // refcount table (moved: the header).
        for (o, b) in &snap.blocks {
            io.pwrite(b, *o, Flags::NONE).await?;
            self.file_len.fetch_max(o + cs, Ordering::AcqRel);
        }
        io.flush(Flags::NONE).await?;
        if let Some((o, b)) = &snap.table {
            io.pwrite(b, *o, Flags::NONE).await?;
            self.file_len
                .fetch_max(o + b.len() as u64, Ordering::AcqRel);
            io.flush(Flags::NONE).await?;
        }
        let mut frees = snap.frees.clone();
        if let Some((o, n, old)) = &snap.moved {
            let mut h = [0u8; 12];
            h[..8].copy_from_slice(&o.to_be_bytes());
            h[8..].copy_from_slice(&(*n as u32).to_be_bytes());
            io.pwrite(&h, 48, Flags::NONE).await?;
            io.flush(Flags::NONE).await?;
            frees.extend(old.iter().map(|(o, n)| (*o, n * cs)));
        }
        // 2. L2 tables, then L1.
        for (o, b) in &snap.l2s {
            io.pwrite(b, *o, Flags::NONE).await?;
            self.file_len.fetch_max(o + cs, Ordering::AcqRel);
        }
        if let Some(b) = &snap.l1 {
            io.pwrite(b, self.h.l1_table_offset, Flags::NONE).await?;
        }
        if !snap.l2s.is_empty() || snap.l1.is_some() {
            io.flush(Flags::NONE).await?;
        }
        // 3. Give back what the old metadata pointed to.
        if !frees.is_empty() {
            let blocks: Vec<(u64, Vec<u8>)> = {
                let _g = self.alloc.lock().await;
                let mut st = self.lock();
                for (o, len) in frees {
                    let mut c = o & !(cs - 1);
                    while c < o + len {
                        if let Err(e) = self.rc_add(&mut st, c, -1) {
                            libnbd::elog!("nbdkit: qcow2: {}", e.msg);
                        }
                        c += cs;
                    }
                }
                let rc = st.rc.as_mut().unwrap();
                std::mem::take(&mut rc.dirty)
                    .into_iter()
                    .map(|o| (o, rc.blocks[&o].clone()))
                    .collect()
            };
            for (o, b) in &blocks {
                io.pwrite(b, *o, Flags::NONE).await?;
            }
            io.flush(Flags::NONE).await?;
        }
        Ok(())
    }

    /// Is there metadata not yet written back?
    pub fn is_dirty(&self) -> bool {
        let st = self.lock();
        st.l1_dirty
            || !st.l2_dirty.is_empty()
            || !st.to_free.is_empty()
            || st
                .rc
                .as_ref()
                .is_some_and(|r| !r.dirty.is_empty() || r.table_dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_bits() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let n = (64 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..n {
                rc_set(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&b, i, order),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // 16-bit refcounts are big-endian.
        let mut b = vec![0u8; 4];
        rc_set(&mut b, 1, 4, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
        // 1-bit refcounts: bit 0 is the least significant.
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 0, 0, 1);
        assert_eq!(b, [1]);
    }
}
