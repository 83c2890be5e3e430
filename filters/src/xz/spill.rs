//! The spill: progressive decoding of big blocks (typically the only
//! block of a file written by plain `xz`), each part decoded at most once.
//!
//! A big block is decoded from its start by one liblzma decoder that only
//! moves forward. Everything it produces is kept, in 1 MiB chunks, in one
//! sparse, unnamed temporary file (in `$TMPDIR`, default `/var/tmp`; it
//! vanishes when the server exits) at the chunk's uncompressed offset.
//! All-zero chunks are never written: they stay holes and cost no disk.
//! A read of decoded chunks is a read of the file; a read beyond the
//! decoder waits for it (and moves it on); when reads are sequential the
//! decoder runs ahead of them in the background.
//!
//! The spill holds at most `xz-spill-max` bytes of data: past that the
//! least recently used chunks are dropped (their space is punched out) and
//! a later read of one restarts its block's decoder from the block start.
//!
//! Integrity: liblzma rejects most corruption as it goes, but the block's
//! check (CRC or SHA-256 over the whole block) can only be verified at its
//! end. A block whose check fails there fails every later read with EIO.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libnbd::zeroes::is_zero;
use libnbd::{Error, Flags, Handle, Result};
use tokio::sync::Semaphore;

use super::decode::{Piece, Progressive};
use super::index::Block;

/// The unit of storage and eviction.
pub const CHUNK: u64 = 1 << 20;
/// Compressed bytes fetched from the layer below at once.
const IN_PIECE: u64 = 2 << 20;
/// Most output produced by one decoding step (the decoder lock is released
/// between steps so readers of decoded data are not held up long).
const STEP_OUT: u64 = 8 << 20;
/// How far ahead of a sequential reader the decoder runs.
pub const AHEAD: u64 = 32 << 20;
/// The smallest spill limit accepted.
pub const MIN_MAX: u64 = 4 * AHEAD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not decoded yet.
    Absent,
    /// Decoded, all zeroes: a hole in the file.
    Zero,
    /// Decoded and in the file.
    Stored,
    /// Was stored, dropped to stay within the limit.
    Evicted,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    state: State,
    /// Bumped on every eviction, so a reader can tell its data went away
    /// while it was reading.
    generation: u32,
    /// Last use (a key of `Meta::lru` while stored).
    tick: u64,
}

/// The chunks of one big block.
struct BlockChunks {
    uoffset: u64,
    usize: u64,
    chunks: Vec<Chunk>,
}

impl BlockChunks {
    fn extent(&self, c: usize) -> (u64, u64) {
        let start = c as u64 * CHUNK;
        (self.uoffset + start, CHUNK.min(self.usize - start))
    }
}

struct Meta {
    /// By block position in the index.
    blocks: HashMap<usize, BlockChunks>,
    /// Stored chunks by last use: tick -> (block, chunk).
    lru: BTreeMap<u64, (usize, usize)>,
    tick: u64,
    /// Bytes of data in the file.
    stored: u64,
}

impl Meta {
    fn block(&mut self, pos: usize, b: &Block) -> &mut BlockChunks {
        self.blocks.entry(pos).or_insert_with(|| BlockChunks {
            uoffset: b.uoffset,
            usize: b.usize,
            chunks: vec![
                Chunk {
                    state: State::Absent,
                    generation: 0,
                    tick: 0,
                };
                b.usize.div_ceil(CHUNK) as usize
            ],
        })
    }
    /// Mark chunk `c` of block `pos` as just used.
    fn touch(&mut self, pos: usize, c: usize) {
        self.tick += 1;
        let tick = self.tick;
        let ch = &mut self.blocks.get_mut(&pos).unwrap().chunks[c];
        if ch.state == State::Stored {
            let old = std::mem::replace(&mut ch.tick, tick);
            self.lru.remove(&old);
            self.lru.insert(tick, (pos, c));
        }
    }
}

/// What a read needs.
enum Plan {
    /// Everything is decoded: read the file, then check these generations
    /// are unchanged.
    Ready(Vec<u32>),
    /// Some chunk is missing.
    Missing,
}

fn missing(st: State) -> bool {
    matches!(st, State::Absent | State::Evicted)
}

/// The spill file shared by the big blocks of one xz file.
pub struct Spill {
    file: File,
    meta: Mutex<Meta>,
    max: u64,
}

impl Spill {
    /// A new spill file in `$TMPDIR` (default `/var/tmp`) for `size`
    /// bytes of uncompressed data (a hole at first), holding at most `max`
    /// bytes of it.
    pub fn new(size: u64, max: u64) -> std::io::Result<Spill> {
        let dir = std::env::var_os("TMPDIR")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/var/tmp".into());
        let file = tempfile::tempfile_in(&dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        // Parts never written (zeroes) must read back as zeroes, also at
        // the end.
        file.set_len(size)?;
        Ok(Spill {
            file,
            meta: Mutex::new(Meta {
                blocks: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
                stored: 0,
            }),
            max,
        })
    }

    fn plan(&self, pos: usize, b: &Block, lo: usize, hi: usize) -> Plan {
        let mut m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bc = m.block(pos, b);
        if bc.chunks[lo..=hi].iter().any(|c| missing(c.state)) {
            return Plan::Missing;
        }
        let gens = bc.chunks[lo..=hi].iter().map(|c| c.generation).collect();
        for c in lo..=hi {
            m.touch(pos, c);
        }
        Plan::Ready(gens)
    }

    fn unchanged(&self, pos: usize, lo: usize, gens: &[u32]) -> bool {
        let m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let chunks = &m.blocks[&pos].chunks[lo..];
        gens.iter()
            .zip(chunks)
            .all(|(g, ch)| ch.generation == *g && !missing(ch.state))
    }

    fn first_missing(&self, pos: usize, b: &Block, lo: usize, hi: usize) -> Option<usize> {
        let mut m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bc = m.block(pos, b);
        (lo..=hi).find(|&c| missing(bc.chunks[c].state))
    }

    /// Keep decoded chunk `c` of block `pos`, unless it is kept already;
    /// then drop the least recently used chunks to stay within the limit.
    fn commit(&self, pos: usize, b: &Block, c: usize, data: &[u8]) -> std::io::Result<()> {
        let needed = missing(
            self.meta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .block(pos, b)
                .chunks[c]
                .state,
        );
        if !needed {
            return Ok(());
        }
        let zero = is_zero(data);
        if !zero {
            self.file.write_all_at(data, b.uoffset + c as u64 * CHUNK)?;
        }
        let mut m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let m = &mut *m;
        let ch = &mut m.block(pos, b).chunks[c];
        if zero {
            ch.state = State::Zero;
            return Ok(());
        }
        ch.state = State::Stored;
        m.stored += data.len() as u64;
        m.touch(pos, c);
        while m.stored > self.max {
            let Some((&t, &(vpos, vc))) = m.lru.iter().next() else {
                break;
            };
            if (vpos, vc) == (pos, c) {
                break;
            }
            m.lru.remove(&t);
            let bc = m.blocks.get_mut(&vpos).unwrap();
            let (off, len) = bc.extent(vc);
            let ch = &mut bc.chunks[vc];
            ch.state = State::Evicted;
            ch.generation = ch.generation.wrapping_add(1);
            m.stored -= len;
            // Under the lock, so a reader's generation check after its
            // read always sees an eviction that happened during it.
            punch(&self.file, off, len);
        }
        Ok(())
    }
}

fn punch(file: &File, off: u64, len: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    let _ = fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off as i64,
        len as i64,
    );
}

/// The decoder of a big block, with its partly filled chunk.
struct Dec {
    p: Progressive,
    scratch: Vec<u8>,
    filled: usize,
}

impl Dec {
    /// Uncompressed bytes committed to the spill (a multiple of CHUNK, or
    /// the block size).
    fn committed(&self) -> u64 {
        self.p.out_pos - self.filled as u64
    }
}

/// One big block, decoded progressively into the spill.
pub struct SpillBlock {
    pos: usize,
    block: Block,
    dec: tokio::sync::Mutex<Option<Dec>>,
    /// Mirror of the decoder's committed position, read without the lock.
    frontier: AtomicU64,
    /// How far (relative to the block) the background decoder should go.
    target: AtomicU64,
    running: AtomicBool,
    /// Set when the block proved corrupt.
    poison: Mutex<Option<String>>,
}

impl SpillBlock {
    /// Block `block`, at position `pos` in the index.
    pub fn new(pos: usize, block: Block) -> Self {
        SpillBlock {
            pos,
            block,
            dec: tokio::sync::Mutex::new(None),
            frontier: AtomicU64::new(0),
            target: AtomicU64::new(0),
            running: AtomicBool::new(false),
            poison: Mutex::new(None),
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::eio(format!(
            "xz: block {} (compressed offset {}, {} bytes uncompressed): {msg}",
            self.pos, self.block.coffset, self.block.usize
        ))
    }

    fn poisoned(&self) -> Result<()> {
        match &*self
            .poison
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(m) => Err(self.err(m)),
            None => Ok(()),
        }
    }

    /// Where the decoder is (bytes from the block start).
    pub fn frontier(&self) -> u64 {
        self.frontier.load(Ordering::Relaxed)
    }

    /// Read `buf.len()` bytes at `off` (relative to the block start).
    pub async fn read(
        &self,
        spill: &Arc<Spill>,
        slots: &Arc<Semaphore>,
        next: &Arc<dyn Handle>,
        buf: &mut [u8],
        off: u64,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let lo = (off / CHUNK) as usize;
        let hi = ((off + buf.len() as u64 - 1) / CHUNK) as usize;
        for _ in 0..16 {
            self.poisoned()?;
            match spill.plan(self.pos, &self.block, lo, hi) {
                Plan::Missing => self.ensure(spill, slots, next, lo, hi).await?,
                Plan::Ready(gens) => {
                    let s = spill.clone();
                    let at = self.block.uoffset + off;
                    let len = buf.len();
                    let data = tokio::task::spawn_blocking(move || {
                        let mut v = vec![0u8; len];
                        s.file.read_exact_at(&mut v, at).map(|_| v)
                    })
                    .await
                    .map_err(|e| self.err(e))?
                    .map_err(|e| self.err(format!("reading the spill file: {e}")))?;
                    if spill.unchanged(self.pos, lo, &gens) {
                        buf.copy_from_slice(&data);
                        return Ok(());
                    }
                }
            }
        }
        Err(self.err(
            "decoded data was dropped from the spill before it could be read (raise xz-spill-max)",
        ))
    }

    /// Decode until chunks `lo..=hi` are all in the spill.
    async fn ensure(
        &self,
        spill: &Arc<Spill>,
        slots: &Arc<Semaphore>,
        next: &Arc<dyn Handle>,
        lo: usize,
        hi: usize,
    ) -> Result<()> {
        let mut g = self.dec.lock().await;
        while let Some(m) = spill.first_missing(self.pos, &self.block, lo, hi) {
            self.poisoned()?;
            let restart = match &*g {
                None => true,
                Some(d) => d.committed() > m as u64 * CHUNK || d.p.ended,
            };
            if restart {
                *g = Some(self.start()?);
            }
            self.step(&mut g, spill, slots, next, (hi as u64 + 1) * CHUNK)
                .await?;
        }
        Ok(())
    }

    fn start(&self) -> Result<Dec> {
        Ok(Dec {
            p: Progressive::new(self.block).map_err(|e| self.err(e))?,
            scratch: vec![0u8; CHUNK as usize],
            filled: 0,
        })
    }

    /// One bounded step of the decoder towards `target`: fetch input if
    /// needed, then decode (off the async threads) and commit chunks.
    async fn step(
        &self,
        g: &mut Option<Dec>,
        spill: &Arc<Spill>,
        slots: &Arc<Semaphore>,
        next: &Arc<dyn Handle>,
        target: u64,
    ) -> Result<()> {
        let mut d = g.take().expect("a decoder");
        if d.p.needs_input() {
            let before = d.p.input.pos;
            match d.p.input.next_piece(IN_PIECE) {
                Piece::Bytes(v) => d.p.inbuf = v,
                Piece::Read { offset, len } => {
                    let mut v = vec![0u8; len as usize];
                    if let Err(e) = next.pread(&mut v, offset, Flags::NONE).await {
                        // Not the block's fault: try again next time.
                        d.p.input.pos = before;
                        *g = Some(d);
                        return Err(self.err(format!("reading compressed data: {}", e.msg)));
                    }
                    d.p.inbuf = v;
                }
                Piece::End => return Err(self.err("the block ends early (truncated or corrupt)")),
            }
            d.p.in_used = 0;
        }
        let permit = slots.clone().acquire_owned().await.ok();
        let s = spill.clone();
        let (pos, block) = (self.pos, self.block);
        let (d, r) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut d = d;
            let r = decode_some(&mut d, &s, pos, &block, target);
            (d, r)
        })
        .await
        .map_err(|e| self.err(e))?;
        match r {
            Ok(()) => {
                self.frontier.store(d.committed(), Ordering::Relaxed);
                *g = Some(d);
                Ok(())
            }
            Err(Fail::Io(e)) => Err(self.err(format!("writing the spill file: {e}"))),
            Err(Fail::Data(m)) => {
                *self
                    .poison
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(m.clone());
                Err(self.err(m))
            }
        }
    }

    /// Let the decoder run ahead, in the background, to `upto` bytes
    /// from the block start.
    pub fn readahead(
        self: &Arc<Self>,
        spill: &Arc<Spill>,
        slots: &Arc<Semaphore>,
        next: &Arc<dyn Handle>,
        upto: u64,
    ) {
        let upto = upto.min(self.block.usize);
        self.target.fetch_max(upto, Ordering::Relaxed);
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, spill, slots, next) = (self.clone(), spill.clone(), slots.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let t = me.target.load(Ordering::Relaxed);
                let mut g = me.dec.lock().await;
                if me.poisoned().is_err() {
                    break;
                }
                if g.is_none() {
                    match me.start() {
                        Ok(d) => *g = Some(d),
                        Err(_) => break,
                    }
                }
                let d = g.as_ref().unwrap();
                // Past the target, unless the target is the block end:
                // then go on to the end of the stream to verify the check.
                if d.p.ended || (d.committed() >= t && t < me.block.usize) {
                    drop(g);
                    me.running.store(false, Ordering::Release);
                    // A reader may have raised the target meanwhile.
                    if me.target.load(Ordering::Relaxed) > t
                        && !me.running.swap(true, Ordering::AcqRel)
                    {
                        continue;
                    }
                    return;
                }
                if me.step(&mut g, &spill, &slots, &next, t).await.is_err() {
                    break;
                }
            }
            me.running.store(false, Ordering::Release);
        });
    }
}

enum Fail {
    Io(std::io::Error),
    Data(String),
}

/// Decode from the buffered input, committing each full chunk, until the
/// input runs out, `STEP_OUT` bytes were produced, or `target` is reached.
fn decode_some(d: &mut Dec, spill: &Spill, pos: usize, b: &Block, target: u64) -> Result<(), Fail> {
    let mut produced = 0u64;
    loop {
        let committed = d.committed();
        let c = (committed / CHUNK) as usize;
        let clen = CHUNK.min(b.usize - committed) as usize;
        let n =
            d.p.decode(&mut d.scratch[d.filled..clen])
                .map_err(Fail::Data)?;
        d.filled += n;
        produced += n as u64;
        if clen > 0 && d.filled == clen {
            spill
                .commit(pos, b, c, &d.scratch[..clen])
                .map_err(Fail::Io)?;
            d.filled = 0;
        }
        if d.p.ended || d.p.needs_input() {
            return Ok(());
        }
        if clen > 0 && (produced >= STEP_OUT || d.committed() >= target) {
            return Ok(());
        }
    }
}
