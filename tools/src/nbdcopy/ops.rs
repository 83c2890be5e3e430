//! What both copy strategies share: turning the source's extents into
//! operations ([`Planner`]), and carrying out one operation
//! ([`Copier`]): read a range, find its zero blocks, write the data and
//! zero the rest.
//!
//! The disk is cut into chunks of the request size. A chunk that is all
//! zero extents joins a zero operation (which may span many chunks); a
//! chunk with data is read from its first to its last data byte in one
//! request, and zero detection deals with small holes inside it. So
//! there is at most one read per chunk however fragmented the source is,
//! and no read at all for the holes of a sparse one. A zero operation
//! first asks the destination which of its range already reads as
//! zeroes (a fresh export or image) and zeroes only the rest.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::try_join_all;

use super::blkhash::BlockHasher;
use super::endpoint::{Data, Endpoint, Extent, Hole, OpError};
use super::progress::Progress;
use libnbd::zeroes as sparse;

/// One operation: copy (read, then write) or zero a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Start of the range, the same in source and destination.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// The source reads as zeroes here: nothing to read.
    pub zero: bool,
}

/// Turns consecutive extents into operations (see the module doc).
#[derive(Debug)]
pub struct Planner {
    chunk: u64,
    max_zero: u64,
    /// Pieces of the current chunk, in order.
    pieces: Vec<Extent>,
    /// A zero range still growing.
    zero: Option<(u64, u64)>,
    out: VecDeque<Op>,
    /// Bytes of skipped extents not yet reported (`--shallow`).
    skipped: u64,
}

impl Planner {
    /// Chunks of `chunk` bytes (the request size); zero operations of at
    /// most `max_zero` bytes.
    pub fn new(chunk: u64, max_zero: u64) -> Planner {
        Planner {
            chunk,
            max_zero,
            pieces: Vec::new(),
            zero: None,
            out: VecDeque::new(),
            skipped: 0,
        }
    }

    /// Add the next extent (they must be consecutive). A skipped one
    /// makes no operation, and no read or zero spans it.
    pub fn push(&mut self, e: Extent) {
        if e.skip {
            self.end_chunk();
            self.flush_zero();
            self.skipped += e.length;
            return;
        }
        let mut at = e.offset;
        while at < e.end() {
            let chunk_end = (at / self.chunk + 1) * self.chunk;
            let end = chunk_end.min(e.end());
            if let Some(last) = self.pieces.last() {
                if last.offset / self.chunk != at / self.chunk {
                    self.end_chunk();
                }
            }
            match self.pieces.last_mut() {
                Some(p) if p.zero == e.zero => p.length += end - at,
                _ => self.pieces.push(Extent::new(at, end - at, e.zero)),
            }
            at = end;
        }
    }

    /// No more extents.
    pub fn finish(&mut self) {
        self.end_chunk();
        self.flush_zero();
    }

    /// The next operation, if one is ready.
    pub fn pop(&mut self) -> Option<Op> {
        self.out.pop_front()
    }

    /// Bytes skipped since the last call (done as far as progress is
    /// concerned).
    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }

    fn end_chunk(&mut self) {
        let pieces = std::mem::take(&mut self.pieces);
        let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
            return;
        };
        let (start, end) = (first.offset, last.end());
        let data_start = pieces.iter().find(|p| !p.zero).map(|p| p.offset);
        let data_end = pieces.iter().rev().find(|p| !p.zero).map(|p| p.end());
        let (Some(ds), Some(de)) = (data_start, data_end) else {
            self.add_zero(start, end);
            return;
        };
        self.add_zero(start, ds);
        self.flush_zero();
        self.out.push_back(Op {
            offset: ds,
            length: de - ds,
            zero: false,
        });
        self.add_zero(de, end);
    }

    fn add_zero(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        match &mut self.zero {
            Some((_, e)) if *e == start => *e = end,
            _ => {
                self.flush_zero();
                self.zero = Some((start, end));
            }
        }
    }

    fn flush_zero(&mut self) {
        if let Some((mut s, e)) = self.zero.take() {
            while s < e {
                let len = (e - s).min(self.max_zero);
                self.out.push_back(Op {
                    offset: s,
                    length: len,
                    zero: true,
                });
                s += len;
            }
        }
    }
}

/// How to copy, decided once from the options and the endpoints.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest read or write (a power of 2).
    pub request_size: u64,
    /// Zero detection block size (a power of 2), or 0 for none.
    pub sparse_size: u64,
    /// Write zeroes as allocated blocks (`--allocated`).
    pub allocated: bool,
    /// The destination already reads as zeroes: skip zero ranges.
    pub skip_zeroes: bool,
    /// Zero every zero range, even where the destination reads as
    /// zeroes already (`--shallow`: the zeroes of the top layer are
    /// part of it, and the destination is an overlay whose backing
    /// shows through).
    pub zero_all: bool,
}

/// The state of one copy shared by its operations: the endpoints, the
/// settings, reusable buffers.
pub struct Copier {
    /// Where data comes from.
    pub src: Arc<dyn Endpoint>,
    /// Where it goes.
    pub dst: Arc<dyn Endpoint>,
    /// How.
    pub settings: Settings,
    /// Bytes done, for the progress bar.
    pub progress: Arc<Progress>,
    /// `--blkhash`: fed everything copied, data and zeroes.
    pub hasher: Option<Arc<BlockHasher>>,
    /// Free buffers (request size), reused so that steady copying
    /// allocates nothing and touches no new memory.
    pool: Mutex<Vec<Vec<u8>>>,
    /// Zeroes for a destination that cannot zero otherwise.
    zeroes: OnceLock<Arc<Vec<u8>>>,
}

impl Copier {
    /// A copy from `src` to `dst`.
    pub fn new(
        src: Arc<dyn Endpoint>,
        dst: Arc<dyn Endpoint>,
        settings: Settings,
        progress: Arc<Progress>,
    ) -> Copier {
        Copier {
            src,
            dst,
            settings,
            progress,
            hasher: None,
            pool: Mutex::new(Vec::new()),
            zeroes: OnceLock::new(),
        }
    }

    fn src_err(&self, op: &'static str, offset: u64, e: io::Error) -> OpError {
        OpError::new(&*self.src, op, Some(offset), e)
    }

    fn dst_err(&self, op: &'static str, offset: u64, e: io::Error) -> OpError {
        OpError::new(&*self.dst, op, Some(offset), e)
    }

    /// A buffer of `len` bytes from the pool.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let buf = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = buf.unwrap_or_default();
        // Shrinking, or growing a reused buffer to its old length, costs
        // nothing; only a new buffer gets zeroed (by the allocator).
        if buf.capacity() < len {
            buf = vec![0u8; len];
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    fn recycle(&self, buf: Vec<u8>) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf);
    }

    /// Check that `[offset, offset + len)` fits in the destination (only
    /// needed when the source's size was not known up front).
    fn check_fits(&self, offset: u64, len: u64) -> Result<(), OpError> {
        if self.dst.is_resizable() {
            return Ok(());
        }
        match self.dst.size() {
            Some(size) if offset + len > size => Err(self.dst_err(
                "write",
                offset,
                io::Error::other(format!(
                    "the source is larger than the destination ({size} bytes)"
                )),
            )),
            _ => Ok(()),
        }
    }

    /// Does the copy look for zero blocks in the data it writes?
    fn finds_zeroes(&self) -> bool {
        self.settings.sparse_size > 0 && self.dst.wants_sparse()
    }

    /// Read the data of `op` from the source. A stream may return less
    /// (nothing at its end). When the copy looks for zero blocks, the
    /// source's holes may be left unfilled (returned: the bytes there
    /// are not to be used), saving filling them and then scanning them
    /// (a third of a decompressed disk image, from our xz filter).
    pub async fn read(&self, op: &Op) -> Result<(Vec<u8>, Vec<Hole>), OpError> {
        let buf = self.buffer(op.length as usize);
        let read = match self.finds_zeroes() {
            true => self.src.read_sparse(buf, op.offset).await,
            false => self.src.read(buf, op.offset).await.map(|b| (b, Vec::new())),
        };
        read.map_err(|e| self.src_err("read", op.offset, e))
    }

    /// Write data read at `offset` (with `holes` unfilled, see
    /// [`read`](Self::read)) to the destination, as zero requests where
    /// it is zero blocks; then put the buffer back in the pool.
    pub async fn write(
        &self,
        mut buf: Vec<u8>,
        holes: Vec<Hole>,
        offset: u64,
    ) -> Result<(), OpError> {
        let len = buf.len() as u64;
        if len == 0 {
            self.recycle(buf);
            return Ok(());
        }
        self.check_fits(offset, len)?;
        let runs = if self.finds_zeroes() {
            sparse::runs_around(&buf, offset, self.settings.sparse_size, &holes)
        } else {
            vec![sparse::Run {
                range: 0..buf.len(),
                zero: false,
            }]
        };
        // What of the holes goes out as data (parts of data blocks) is
        // zeroes.
        for h in &holes {
            for r in runs.iter().filter(|r| !r.zero) {
                let (from, to) = (h.start.max(r.range.start), h.end.min(r.range.end));
                if from < to {
                    buf[from..to].fill(0);
                }
            }
        }
        if let Some(h) = &self.hasher {
            // Zero runs may hold unfilled holes: hashed as zeroes.
            for r in &runs {
                let at = offset + r.range.start as u64;
                match r.zero {
                    true => h.zero(at, r.range.len() as u64),
                    false => h.data(at, &buf[r.range.clone()]),
                }
            }
        }
        let buf = Arc::new(buf);
        let holey = !holes.is_empty();
        let one = |run: sparse::Run| {
            let buf = buf.clone();
            async move {
                let at = offset + run.range.start as u64;
                let rlen = run.range.len() as u64;
                if run.zero && self.zero_is_done(at, rlen).await? {
                    return Ok(());
                }
                let data = match run.zero && holey {
                    // The destination cannot zero: write zeroes, not the
                    // unfilled holes.
                    true => Data::new(Arc::new(vec![0; run.range.len()]), 0..run.range.len()),
                    false => Data::new(buf, run.range),
                };
                self.dst
                    .write(data, at)
                    .await
                    .map_err(|e| self.dst_err("write", at, e))
            }
        };
        if self.dst.is_stream() {
            for run in runs {
                one(run).await?;
            }
        } else {
            try_join_all(runs.into_iter().map(one)).await?;
        }
        if let Ok(b) = Arc::try_unwrap(buf) {
            self.recycle(b);
        }
        self.progress.add(len);
        Ok(())
    }

    /// Make a range of the destination read as zeroes, by skipping it
    /// (destination already zero) or zeroing it; `Ok(false)` if the
    /// destination cannot, and zeroes must be written.
    async fn zero_is_done(&self, offset: u64, length: u64) -> Result<bool, OpError> {
        let s = &self.settings;
        if s.skip_zeroes && !s.allocated {
            return Ok(true);
        }
        self.dst
            .zero(offset, length, s.allocated)
            .await
            .map_err(|e| self.dst_err("zero", offset, e))
    }

    /// Carry out a zero operation: zero the range, except the parts the
    /// destination itself reports as reading zeroes already (a fresh
    /// export or image), which it would be pointless to zero again.
    pub async fn zero(&self, op: &Op) -> Result<(), OpError> {
        self.check_fits(op.offset, op.length)?;
        if let Some(h) = &self.hasher {
            h.zero(op.offset, op.length);
        }
        let s = &self.settings;
        let ask = self.dst.can_extents() && !s.skip_zeroes && !s.allocated && !s.zero_all;
        let ranges = match ask {
            // If the destination cannot say, zero it all.
            true => extents_of(&*self.dst, op.offset, op.length)
                .await
                .map(|list| {
                    list.into_iter()
                        .filter(|e| !e.zero)
                        .map(|e| (e.offset, e.length))
                        .collect()
                })
                .unwrap_or_else(|_| vec![(op.offset, op.length)]),
            false => vec![(op.offset, op.length)],
        };
        for (offset, length) in ranges {
            self.zero_range(offset, length).await?;
        }
        self.progress.add(op.length);
        Ok(())
    }

    async fn zero_range(&self, offset: u64, length: u64) -> Result<(), OpError> {
        if self.zero_is_done(offset, length).await? {
            return Ok(());
        }
        let rs = self.settings.request_size;
        let zeroes = self
            .zeroes
            .get_or_init(|| Arc::new(vec![0u8; rs as usize]))
            .clone();
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(rs);
            self.dst
                .write(Data::new(zeroes.clone(), 0..n as usize), at)
                .await
                .map_err(|e| self.dst_err("write", at, e))?;
            at += n;
        }
        Ok(())
    }
}

/// The extents of `[offset, offset + length)`, all of it (asking again
/// where the source describes less than asked).
pub async fn extents_of(
    src: &dyn Endpoint,
    offset: u64,
    length: u64,
) -> Result<Vec<Extent>, OpError> {
    let end = offset + length;
    let mut at = offset;
    let mut out = Vec::new();
    while at < end {
        let got = src
            .extents(at, end - at)
            .await
            .map_err(|e| OpError::new(src, "extents", Some(at), e))?;
        let before = at;
        for e in got {
            let len = e.length.min(end - at);
            if len == 0 {
                break;
            }
            out.push(Extent {
                offset: at,
                length: len,
                ..e
            });
            at += len;
        }
        if at == before {
            return Err(OpError::new(
                src,
                "extents",
                Some(at),
                io::Error::other("no extents returned"),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, zero: bool) -> Extent {
        Extent::new(offset, length, zero)
    }

    fn plan(chunk: u64, max_zero: u64, exts: &[Extent]) -> Vec<(u64, u64, bool)> {
        let mut p = Planner::new(chunk, max_zero);
        for e in exts {
            p.push(*e);
        }
        p.finish();
        std::iter::from_fn(|| p.pop())
            .map(|o| (o.offset, o.length, o.zero))
            .collect()
    }

    #[test]
    fn dense_is_cut_at_chunk_boundaries() {
        assert_eq!(
            plan(100, 1000, &[ext(0, 250, false)]),
            vec![(0, 100, false), (100, 100, false), (200, 50, false)]
        );
    }

    #[test]
    fn holes_merge_and_data_is_read_once_per_chunk() {
        // chunk 0: data 10..20 and 50..60 with a hole between;
        // chunks 1-3: hole; chunk 4: data at its start.
        let exts = [
            ext(0, 10, true),
            ext(10, 10, false),
            ext(20, 30, true),
            ext(50, 10, false),
            ext(60, 340, true),
            ext(400, 20, false),
        ];
        assert_eq!(
            plan(100, 1000, &exts),
            vec![
                (0, 10, true),
                (10, 50, false),
                (60, 340, true),
                (400, 20, false)
            ]
        );
    }

    #[test]
    fn skipped_extents_make_no_operation_and_split_chunks() {
        let skip = |offset, length| Extent {
            skip: true,
            ..ext(offset, length, false)
        };
        // Data on both sides of a skip inside one chunk: two reads, not
        // one across the skipped range; zeroes either side stay apart.
        let exts = [
            ext(0, 10, false),
            skip(10, 30),
            ext(40, 10, false),
            ext(50, 60, true),
            skip(110, 100),
            ext(210, 90, true),
        ];
        let mut p = Planner::new(100, 1000);
        for e in exts {
            p.push(e);
        }
        p.finish();
        assert_eq!(p.take_skipped(), 130);
        assert_eq!(p.take_skipped(), 0);
        let ops: Vec<_> = std::iter::from_fn(|| p.pop())
            .map(|o| (o.offset, o.length, o.zero))
            .collect();
        assert_eq!(
            ops,
            vec![
                (0, 10, false),
                (40, 10, false),
                (50, 60, true),
                (210, 90, true)
            ]
        );
    }

    #[test]
    fn long_zero_ranges_are_split() {
        assert_eq!(
            plan(100, 250, &[ext(0, 600, true)]),
            vec![(0, 250, true), (250, 250, true), (500, 100, true)]
        );
    }
}
