//! The one interface every kind of source and destination implements.
//!
//! An endpoint is an NBD export (`nbd.rs`), a local file or block device
//! (`file.rs`), a stream on stdin or stdout (`pipe.rs`) or the `null:`
//! sink (`null.rs`). The copy strategies (`multi.rs`, `synch.rs`) only
//! ever call these methods, so they work for every pair of kinds.
//!
//! Methods answer plain `io::Result`s about their own operation; the
//! copy loop adds the endpoint's name, the operation and the offset when
//! it reports a failure (see [`OpError`]).

use std::fmt;
use std::io;
use std::ops::{Deref, Range};
use std::sync::Arc;

use async_trait::async_trait;

use super::lanes::Lanes;

/// A run of the source with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where the run starts.
    pub offset: u64,
    /// Its length in bytes (never 0).
    pub length: u64,
    /// The run reads as zeroes (a hole or a zeroed range): no need to
    /// read it.
    pub zero: bool,
    /// Not to be copied at all (`--shallow`: a range the source's top
    /// layer does not hold); the destination is left as it is there.
    pub skip: bool,
}

impl Extent {
    /// A run of data (`zero: false`) or of zeroes, to be copied.
    pub fn new(offset: u64, length: u64, zero: bool) -> Extent {
        Extent {
            offset,
            length,
            zero,
            skip: false,
        }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Bytes to write: a range of a buffer shared with the copy loop, so a
/// write can run on another thread without copying and the buffer goes
/// back to the pool once the last write using it is done.
#[derive(Debug, Clone)]
pub struct Data {
    buf: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Data {
    /// `range` of `buf`.
    pub fn new(buf: Arc<Vec<u8>>, range: Range<usize>) -> Data {
        assert!(range.end <= buf.len(), "range outside the buffer");
        Data { buf, range }
    }
}

impl Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

/// A range of a read buffer that reads as zeroes but was not filled.
pub type Hole = Range<usize>;

/// The operations table of one source or destination.
///
/// Defaults are the conservative answers: no extents (everything is
/// data), one connection's worth of parallelism is not assumed, zeroes
/// are not known to be cheap.
#[async_trait]
pub trait Endpoint: Send + Sync {
    /// How the user named it (`nbd://...`, a file name, `-`, `null:`),
    /// for messages.
    fn name(&self) -> &str;

    /// The kind, for `-v`, in upstream's words: `nbd_ops`, `file_ops`,
    /// `pipe_ops`, `null_ops`.
    fn kind(&self) -> &'static str;

    /// Size in bytes; `None` for a stream, whose end is found by
    /// reading.
    fn size(&self) -> Option<u64>;

    /// Writing is refused (a read-only NBD export).
    fn is_read_only(&self) -> bool {
        false
    }

    /// A destination that takes the source's size (a regular file):
    /// [`truncate`](Self::truncate) resizes it, and writes may extend it.
    fn is_resizable(&self) -> bool {
        false
    }

    /// Reads must be issued in order, one at a time, and writes likewise
    /// (stdin, stdout, pipes, sockets).
    fn is_stream(&self) -> bool {
        false
    }

    /// The block size I/O should be a multiple of for efficiency.
    fn preferred_block_size(&self) -> u64 {
        4096
    }

    /// The largest single read or write worth issuing (an NBD server's
    /// maximum payload); `None` for no limit.
    fn max_request_size(&self) -> Option<u64> {
        None
    }

    /// The request size to copy in when `--request-size` is not given,
    /// if this destination is better written in requests larger than
    /// libnbd's 256K; `None` for the default.
    fn write_request_size(&self) -> Option<u64> {
        None
    }

    /// Requests worth having in flight per connection, unless `-R`
    /// says otherwise: a few for local files and sinks, which answer at
    /// once; more for a server, to cover the round trip. The copy uses
    /// the larger of the two sides'.
    fn queue_depth(&self) -> usize {
        4
    }

    /// Can several connections (or threads) work on it at once? For NBD
    /// this is the server's multi-conn flag.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Open up to `n` connections in all (NBD only; others have nothing
    /// to open and keep their one). Returns how many there are now.
    async fn start_multi_conn(&mut self, _n: usize) -> io::Result<usize> {
        Ok(1)
    }

    /// Would it use lanes (threads with a connection each)? NBD with
    /// multi-conn only; nothing else is worth starting them for.
    fn takes_lanes(&self) -> bool {
        false
    }

    /// Open a connection on each lane for that lane's requests (where
    /// [`takes_lanes`](Self::takes_lanes)).
    async fn start_lanes(&mut self, _lanes: &Lanes) -> io::Result<()> {
        Ok(())
    }

    /// The largest zero operation worth making as a destination: 1G
    /// (about a second of zeroing anywhere), or everything in one request
    /// for an NBD server with extended headers.
    fn max_zero(&self) -> u64 {
        1 << 30
    }

    /// The source range whose extents are asked for at once: 1G, or 64G
    /// from an NBD server with extended headers (whose one block status
    /// reply can say 64G is a hole).
    fn extents_window(&self) -> u64 {
        1 << 30
    }

    /// Does [`extents`](Self::extents) say more than "all data"?
    fn can_extents(&self) -> bool {
        false
    }

    /// Allocation status from `offset` on, for at most `length` bytes;
    /// the extents are consecutive and start at `offset`, and may cover
    /// less than asked (but not nothing).
    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent::new(offset, length, false)])
    }

    /// Are zero blocks worth finding in the data? (Not when writes cost
    /// nothing anyway, as for `null:`.)
    fn wants_sparse(&self) -> bool {
        true
    }

    /// Is the destination known to read as zeroes already (a file we
    /// created, or that was empty)?
    fn is_zero(&self) -> bool {
        false
    }

    /// Read `buf.len()` bytes at `offset` into `buf` and give it back.
    /// A stream returns fewer bytes only at its end (none after it).
    async fn read(&self, buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>>;

    /// As [`read`](Self::read), but ranges of the buffer known to be
    /// zeroes without looking (an NBD server's holes) may be left
    /// unfilled: they are returned, sorted, and the caller must not use
    /// the bytes there.
    async fn read_sparse(&self, buf: Vec<u8>, offset: u64) -> io::Result<(Vec<u8>, Vec<Hole>)> {
        Ok((self.read(buf, offset).await?, Vec::new()))
    }

    /// Write `data` at `offset`.
    async fn write(&self, data: Data, offset: u64) -> io::Result<()>;

    /// Make `length` bytes at `offset` read as zeroes, deallocating them
    /// unless `allocate`. Returns `false` when this endpoint cannot
    /// zero efficiently; the caller then writes zeroes.
    async fn zero(&self, offset: u64, length: u64, allocate: bool) -> io::Result<bool>;

    /// Set the size of a destination that can grow or shrink (a regular
    /// file) to the source's; others ignore it.
    async fn truncate(&self, _size: u64) -> io::Result<()> {
        Ok(())
    }

    /// Write everything to permanent storage (`--flush`).
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Finish cleanly: wait for requests in flight, disconnect, let a
    /// captive server go.
    async fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A failed operation, with what it was and where.
#[derive(Debug)]
pub struct OpError {
    /// The endpoint's name.
    pub endpoint: String,
    /// `read`, `write`, `zero`, `extents`, `flush`, ...
    pub op: &'static str,
    /// Where in the endpoint, if the operation has an offset.
    pub offset: Option<u64>,
    /// What went wrong.
    pub source: io::Error,
}

impl OpError {
    /// Wrap `source` with the endpoint `e`, the operation and offset.
    pub fn new(e: &dyn Endpoint, op: &'static str, offset: Option<u64>, source: io::Error) -> Self {
        OpError {
            endpoint: e.name().to_string(),
            op,
            offset,
            source,
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.endpoint, self.op)?;
        if let Some(o) = self.offset {
            write!(f, " at offset {o}")?;
        }
        write!(f, " failed: {}", describe(&self.source))
    }
}

impl std::error::Error for OpError {}

/// An `io::Error` as a message, without std's " (os error N)".
pub fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Is `[offset, offset + len)` not whole blocks of `m` bytes?
pub fn unaligned(offset: u64, len: u64, m: u64) -> bool {
    m > 1 && !(offset.is_multiple_of(m) && len.is_multiple_of(m))
}

/// `[offset, offset + len)` widened to whole blocks of `m` bytes, within
/// an export of `size` bytes (whose last block may be short).
pub fn widen(offset: u64, len: u64, m: u64, size: u64) -> (u64, u64) {
    let start = offset / m * m;
    let end = (offset + len).div_ceil(m).saturating_mul(m);
    (start, end.min(size))
}

/// A zero of `[offset, offset + len)` for an export with `m`-byte
/// blocks, in pieces `(offset, length, whole)`: the unaligned head and
/// tail (`whole` false: to be written by read-modify-write) and the
/// whole blocks between them (`whole` true: one zero request).
pub fn zero_pieces(offset: u64, len: u64, m: u64) -> Vec<(u64, u64, bool)> {
    let (first, last) = (offset.div_ceil(m) * m, (offset + len) / m * m);
    if first >= last {
        return vec![(offset, len, false)];
    }
    let mut out = Vec::with_capacity(3);
    if first > offset {
        out.push((offset, first - offset, false));
    }
    if offset + len > last {
        out.push((last, offset + len - last, false));
    }
    out.push((first, last - first, true));
    out
}

/// Zeroes to write where a destination cannot zero any other way.
pub static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pieces_split_at_whole_blocks() {
        // Head, tail, then the whole blocks between.
        assert_eq!(
            zero_pieces(100, 10_000, 4096),
            vec![(100, 3996, false), (8192, 1908, false), (4096, 4096, true)]
        );
        // Within one block: one piece to write.
        assert_eq!(zero_pieces(5000, 100, 4096), vec![(5000, 100, false)]);
        // Aligned at the start, short at the end.
        assert_eq!(
            zero_pieces(0, 5000, 4096),
            vec![(4096, 904, false), (0, 4096, true)]
        );
        assert!(unaligned(1, 4096, 4096) && !unaligned(4096, 8192, 4096));
        assert!(!unaligned(3, 5, 1));
        // Widened, and clipped at a short last block.
        assert_eq!(widen(100, 10, 4096, 1 << 20), (0, 4096));
        assert_eq!(widen(10_000, 100, 4096, 10_050), (8192, 10_050));
    }
}
