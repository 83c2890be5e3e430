//! NBD exports: a URI (`nbd://host/export`, `nbd+unix:///?socket=S`)
//! or a captive server run for the copy (`[ qemu-nbd -f qcow2 x ]`).
//!
//! One connection is made first; once both sides are known, the copy
//! asks for more, which are made only when the server advertises
//! multi-conn: one on each lane's thread ([`Endpoint::start_lanes`]),
//! which takes that lane's requests while the first one answers the
//! extent queries; or, with one thread, several used in turn
//! ([`Endpoint::start_multi_conn`]). Many requests are in flight on
//! each. A captive server gets every connection and is stopped when
//! the endpoint goes.
//!
//! Extents come from `base:allocation`: a source's holes are not read,
//! and a destination's ranges that already read as zeroes are not
//! zeroed again. Zeroing is `NBD_CMD_WRITE_ZEROES`, with `FAST_ZERO`
//! while the server offers and honours it, and `NO_HOLE` for
//! `--allocated`; a server without write zeroes gets data instead.
//!
//! A destination the copy keeps waiting is flushed in the background as
//! the copy goes ([`Writeback`]).

use std::ffi::OsString;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::try_join_all;
use libnbd::captive::{CaptiveServer, Target};
use libnbd::client::{
    errno_text, ConnectOptions, Connection, Error as NbdError, StatusExtent, Transport,
};
use libnbd::protocol::{alloc, cmdflag, errno, CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION};
use libnbd::uri::Uri;

use super::endpoint::{unaligned, widen, zero_pieces, Data, Endpoint, Extent, Hole};
use super::lanes::{self, Lanes};

/// The request size for writing to a server that takes one connection,
/// unless `--request-size` says (see
/// [`Endpoint::write_request_size`]).
const SINGLE_CONN_WRITE_SIZE: u64 = 2 << 20;

/// Bytes written between flushes of a destination the copy keeps
/// waiting (see [`Writeback`]).
const FLUSH_EVERY: u64 = 16 << 20;

/// Requests in flight per connection to a server on a Unix socket
/// (captive servers included) and over a network, unless `-R` says.
const UNIX_DEPTH: usize = 8;
const NETWORK_DEPTH: usize = 64;

/// Where more connections come from.
#[derive(Clone)]
enum Server {
    Uri(Uri),
    Captive(Arc<CaptiveServer>),
}

impl Server {
    async fn connect(&self, opts: &ConnectOptions) -> libnbd::client::Result<Connection> {
        match self {
            Server::Uri(u) => u.connect(opts).await,
            Server::Captive(s) => s.connect(opts).await,
        }
    }
}

/// An NBD export over one or more connections.
pub struct NbdEndpoint {
    name: String,
    server: Server,
    opts: ConnectOptions,
    conns: Vec<Arc<Connection>>,
    /// One connection per lane, made on that lane's thread; a lane's
    /// requests go to its own.
    lane_conns: Vec<Arc<Connection>>,
    /// Round-robin position.
    next: AtomicUsize,
    /// `base:allocation` was negotiated and is wanted.
    extents: bool,
    /// `--shallow`: `qemu:allocation-depth` was negotiated, and extents
    /// below the top layer are skipped.
    shallow: bool,
    /// Still worth sending `FAST_ZERO` (cleared when the server says
    /// it cannot zero fast).
    fast_zero: AtomicBool,
    /// Flushing a destination during the copy.
    writeback: Writeback,
    /// Held across the read-modify-write of a partial block (a server
    /// with a minimum block size), so two requests that share a block
    /// do not undo each other.
    partial: tokio::sync::Mutex<()>,
}

/// A destination that the copy keeps waiting for data (a slow or
/// decoding source) is flushed in the background every [`FLUSH_EVERY`]
/// bytes, so that the server's disk works during the copy instead of
/// only when the server closes: qemu-nbd, the usual destination, leaves
/// the image in its page cache until then, and its flush at exit left
/// both cores idle for a good part of the headline copy. Each flush
/// also holds up qcow2's allocating writes until the data is on disk
/// (qcow2 syncs the file under its metadata lock), so smaller, more
/// frequent flushes stall less. "Waiting" is: no other write or zero
/// request in flight when a write completes. A destination that is the
/// bottleneck is not flushed (each flush holds up qcow2's writes a
/// little). One flush
/// at a time; its failure fails the copy at [`Endpoint::flush`] or
/// [`Endpoint::close`], which wait for it.
///
/// Flushes are paced: the next one starts no sooner after the last one
/// ended than that one took ([`flush_due`]), so that they hold up the
/// writes at most half of the time, and a slow disk gets fewer, larger
/// flushes (the bytes keep counting meanwhile). A flush has a fixed cost
/// as well as one per byte, and when the disk is slow back-to-back 16M
/// flushes kept qcow2's writes waiting most of the time.
/// `bench/slow-disk.sh` runs a benchmark under such a throttle. Still
/// open: a destination that turns into the bottleneck for a while (the
/// source's decoding got ahead) is not flushed meanwhile, and what it
/// gathers is flushed at the end. Flushing a busy destination too, once
/// it has been flushed for waiting, was better on a throttled disk but
/// worse on the normal one, so it is not done.
#[derive(Default)]
struct Writeback {
    /// Writes and zero requests in flight.
    writing: AtomicUsize,
    /// Bytes written since the last flush.
    unflushed: AtomicU64,
    /// Held by the flush running; when the last flush ended, and how
    /// long it took.
    running: Arc<tokio::sync::Mutex<Option<(Instant, Duration)>>>,
    /// The first failure of a background flush.
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

/// A write or zero request in flight, counted while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
    /// Done: how many others are still in flight.
    fn others(self) -> usize {
        let n = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        std::mem::forget(self);
        n
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Writeback {
    /// A write of `len` bytes on `conn` completed, with `others` still
    /// in flight: start a flush if one is due.
    fn wrote(&self, conn: &Arc<Connection>, len: u64, others: usize) {
        let unflushed = self.unflushed.fetch_add(len, Ordering::Relaxed) + len;
        if others > 0 || !conn.can_flush() {
            return;
        }
        let Ok(mut last) = self.running.clone().try_lock_owned() else {
            return;
        };
        if !flush_due(unflushed, *last, Instant::now()) {
            return;
        }
        self.unflushed.store(0, Ordering::Relaxed);
        let (conn, failed) = (conn.clone(), self.failed.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let r = conn.flush().await;
            *last = Some((Instant::now(), start.elapsed()));
            if let Err(e) = r {
                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                f.get_or_insert_with(|| io_err(e).to_string());
            }
            drop(last);
        });
    }

    /// Wait for a flush running; report one that failed.
    async fn settle(&self) -> io::Result<()> {
        drop(self.running.lock().await);
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(io::Error::other(format!("background flush: {e}"))),
            None => Ok(()),
        }
    }
}

/// Whether a background flush is due, `unflushed` bytes written since
/// the last one, which ended at and took `last` (see [`Writeback`]).
fn flush_due(unflushed: u64, last: Option<(Instant, Duration)>, now: Instant) -> bool {
    unflushed >= FLUSH_EVERY
        && last.is_none_or(|(ended, took)| now.saturating_duration_since(ended) >= took)
}

/// A client error as an `io::Error` whose message is the server's error
/// (like `Input/output error`), or the client's own description.
fn io_err(e: NbdError) -> io::Error {
    match &e {
        NbdError::Server { errno, message, .. } => {
            let kind = io::Error::from_raw_os_error(errno::to_host(*errno)).kind();
            let text = errno_text(*errno);
            if message.is_empty() {
                io::Error::new(kind, text)
            } else {
                io::Error::new(kind, format!("{text}: {message}"))
            }
        }
        _ => e.into(),
    }
}

/// The extents of `[offset, offset + length)` from a `base:allocation`
/// list and a `qemu:allocation-depth` list, as far as both go: skipped
/// where the depth is not 1, zero where `base:allocation` says so,
/// adjacent runs of the same kind merged.
fn shallow_merge(
    offset: u64,
    length: u64,
    alloc: &[StatusExtent],
    depth: &[StatusExtent],
) -> Vec<Extent> {
    let end = offset + length;
    let mut out: Vec<Extent> = Vec::new();
    let (mut a, mut d) = (alloc.iter().peekable(), depth.iter().peekable());
    // What is left of the current extent of each list.
    let (mut a_left, mut d_left) = (0u64, 0u64);
    let mut at = offset;
    while at < end {
        if a_left == 0 {
            match a.peek() {
                Some(e) => a_left = e.length,
                None => break,
            }
        }
        if d_left == 0 {
            match d.peek() {
                Some(e) => d_left = e.length,
                None => break,
            }
        }
        let (Some(ae), Some(de)) = (a.peek(), d.peek()) else {
            break;
        };
        let len = a_left.min(d_left).min(end - at);
        if len == 0 {
            // A zero-length extent from the server: step over it.
            if a_left == 0 {
                a.next();
            }
            if d_left == 0 {
                d.next();
            }
            continue;
        }
        let skip = de.flags != 1;
        let zero = !skip && ae.flags & alloc::ZERO != 0;
        match out.last_mut() {
            Some(l) if l.skip == skip && l.zero == zero => l.length += len,
            _ => out.push(Extent {
                offset: at,
                length: len,
                zero,
                skip,
            }),
        }
        at += len;
        a_left -= len;
        d_left -= len;
        if a_left == 0 {
            a.next();
        }
        if d_left == 0 {
            d.next();
        }
    }
    out
}

/// A name for `[ cmd args ]` in messages.
pub(super) fn command_name(argv: &[OsString]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("[ {} ]", words.join(" "))
}

impl NbdEndpoint {
    /// Connect (once) to `target`: a URI, or a command to start.
    /// `extents`: ask for `base:allocation` (a source's holes; on a
    /// destination, the ranges that need no zeroing). `shallow`: a
    /// source for `--shallow`, which must offer `qemu:allocation-depth`
    /// too.
    pub async fn open(target: Target, extents: bool, shallow: bool) -> io::Result<NbdEndpoint> {
        let contexts: &[&str] = match (extents, shallow) {
            (_, true) => &[CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH],
            (true, false) => &[CONTEXT_BASE_ALLOCATION],
            (false, false) => &[],
        };
        let opts = ConnectOptions::new()
            .meta_contexts(contexts.iter().copied())
            .full_info(false);
        let (name, server) = match target {
            Target::Uri(u) => (u.to_string(), Server::Uri(u)),
            Target::Command(argv) => {
                let name = command_name(&argv);
                let s = CaptiveServer::spawn(&argv).map_err(io_err)?;
                (name, Server::Captive(Arc::new(s)))
            }
        };
        let first = server
            .connect(&opts)
            .await
            .map_err(|e| io::Error::other(format!("{name}: {}", io_err(e))))?;
        if shallow && !first.can_meta_context(CONTEXT_ALLOCATION_DEPTH) {
            return Err(io::Error::other(format!(
                "{name}: --shallow: the server does not offer \
                 {CONTEXT_ALLOCATION_DEPTH} (serve the image with qemu-nbd -A, \
                 or nbdkit --filter=qcow2)"
            )));
        }
        let extents = extents && first.can_meta_context(CONTEXT_BASE_ALLOCATION);
        Ok(NbdEndpoint {
            name,
            server,
            opts,
            conns: vec![Arc::new(first)],
            lane_conns: Vec::new(),
            next: AtomicUsize::new(0),
            extents,
            shallow,
            fast_zero: AtomicBool::new(true),
            writeback: Writeback::default(),
            partial: tokio::sync::Mutex::new(()),
        })
    }

    /// The connection for the next request: the lane's own, or else
    /// the next in turn.
    fn conn(&self) -> &Arc<Connection> {
        if let Some(c) = lanes::current().and_then(|k| self.lane_conns.get(k)) {
            return c;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    /// The server's minimum block size: every request's offset and
    /// length must be multiples of it (1 when it states none).
    fn min_block(&self) -> u64 {
        self.conns[0]
            .block_size()
            .map_or(1, |b| u64::from(b.minimum.max(1)))
    }

    /// Read a range that is not whole blocks of a server with a minimum
    /// block size: the whole blocks, then the part wanted.
    async fn read_unaligned(&self, mut buf: Vec<u8>, offset: u64, m: u64) -> io::Result<Vec<u8>> {
        let (start, end) = widen(offset, buf.len() as u64, m, self.conns[0].size());
        let whole = self
            .conn()
            .pread_vec((end - start) as usize, start, 0)
            .await
            .map_err(io_err)?;
        let at = (offset - start) as usize;
        let len = buf.len();
        buf.copy_from_slice(&whole[at..at + len]);
        Ok(buf)
    }

    /// Write `data` (or zeroes, with `None`, of `len` bytes) where it is
    /// not whole blocks of a server with a minimum block size: the
    /// partial blocks at either end are read, patched and written back
    /// with the rest, under [`NbdEndpoint::partial`]. (Upstream nbdcopy
    /// fails such a copy: a source whose size is not a multiple of, say,
    /// qemu-nbd's 64K over an image with 64K sectors.)
    async fn write_unaligned(
        &self,
        data: Option<&[u8]>,
        offset: u64,
        len: u64,
        m: u64,
    ) -> io::Result<()> {
        let (start, end) = widen(offset, len, m, self.conns[0].size());
        let c = self.conn();
        let _partial = self.partial.lock().await;
        let mut buf = vec![0u8; (end - start) as usize];
        // The block holding the first byte, if the range starts inside it.
        let head_end = (start + m).min(end);
        if offset > start {
            let head = c
                .pread_vec((head_end - start) as usize, start, 0)
                .await
                .map_err(io_err)?;
            buf[..head.len()].copy_from_slice(&head);
        }
        // The block holding the last byte, if the range ends inside it
        // (and it is not the head block, read already).
        let tail = (offset + len) / m * m;
        if offset + len < end && !(offset > start && tail == start) {
            let t = c
                .pread_vec((end - tail) as usize, tail, 0)
                .await
                .map_err(io_err)?;
            buf[(tail - start) as usize..].copy_from_slice(&t);
        }
        let at = (offset - start) as usize;
        match data {
            Some(d) => buf[at..at + d.len()].copy_from_slice(d),
            None => buf[at..at + len as usize].fill(0),
        }
        c.pwrite(&buf, start, 0).await.map_err(io_err)
    }

    /// `--shallow`'s extents: those of the top layer (depth 1) as
    /// `base:allocation` says (data, or zeroes: holes and zeroed
    /// ranges), and the rest (unallocated, or in a backing file)
    /// skipped.
    async fn shallow_extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let status = self
            .conn()
            .block_status(length, offset, 0)
            .await
            .map_err(io_err)?;
        let none = [StatusExtent { length, flags: 0 }];
        let alloc = match self.extents {
            true => status.get(CONTEXT_BASE_ALLOCATION).unwrap_or(&[]),
            // Everything data (`--no-extents` is refused with
            // `--shallow`, but a server may lack base:allocation).
            false => &none[..],
        };
        let depth = status.get(CONTEXT_ALLOCATION_DEPTH).unwrap_or(&[]);
        let out = shallow_merge(offset, length, alloc, depth);
        if out.is_empty() {
            return Err(io::Error::other(
                "block status: the server described no extents",
            ));
        }
        Ok(out)
    }

    fn conn_error(&self, e: NbdError) -> io::Error {
        io::Error::other(format!("{}: {}", self.name, io_err(e)))
    }

    /// Check that further connections see the export as the first did.
    fn more_conns(&self, more: Vec<Connection>) -> io::Result<Vec<Arc<Connection>>> {
        let size = self.conns[0].size();
        if more.iter().any(|c| c.size() != size) {
            return Err(io::Error::other(format!(
                "{}: the export changed size between connections",
                self.name
            )));
        }
        Ok(more.into_iter().map(Arc::new).collect())
    }

    /// Every connection.
    fn all(&self) -> impl Iterator<Item = &Arc<Connection>> {
        self.conns.iter().chain(&self.lane_conns)
    }
}

#[async_trait]
impl Endpoint for NbdEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "nbd_ops"
    }

    fn size(&self) -> Option<u64> {
        Some(self.conns[0].size())
    }

    fn is_read_only(&self) -> bool {
        self.conns[0].is_read_only()
    }

    fn preferred_block_size(&self) -> u64 {
        match self.conns[0].block_size() {
            Some(b) if b.preferred >= 512 => u64::from(b.preferred),
            _ => 4096,
        }
    }

    fn max_request_size(&self) -> Option<u64> {
        Some(u64::from(self.conns[0].max_payload()))
    }

    /// A server without multi-conn gets every write on one connection;
    /// qemu-nbd (the usual one: it never offers multi-conn for a
    /// writable export) handles each request in its one main thread, a
    /// coroutine and a thread-pool job per request, and for qcow2 a
    /// cluster allocation under the image's lock. Larger requests share
    /// that out. Reads gain nothing from it (from qemu-nbd 2M reads were
    /// slower), so only a destination asks. The queue stays
    /// within libnbd's 16M.
    fn write_request_size(&self) -> Option<u64> {
        (!self.can_multi_conn()).then_some(SINGLE_CONN_WRITE_SIZE)
    }

    fn queue_depth(&self) -> usize {
        // A local socket answers in microseconds: a few requests cover
        // the round trip, and more only spread the copy over buffers
        // that no longer fit in the CPU cache (measured: 10-15% slower
        // with libnbd's 16M per connection). A network needs libnbd's.
        match self.conns[0].transport() {
            Some(Transport::Unix(_)) | None => UNIX_DEPTH,
            Some(_) => NETWORK_DEPTH,
        }
    }

    fn can_multi_conn(&self) -> bool {
        self.conns[0].can_multi_conn()
    }

    async fn start_multi_conn(&mut self, n: usize) -> io::Result<usize> {
        let have = self.conns.len();
        if n <= have || !self.can_multi_conn() {
            return Ok(have);
        }
        let (server, opts) = (&self.server, &self.opts);
        let more = try_join_all((have..n).map(|_| server.connect(opts))).await;
        let more = self.more_conns(more.map_err(|e| self.conn_error(e))?)?;
        self.conns.extend(more);
        Ok(self.conns.len())
    }

    fn takes_lanes(&self) -> bool {
        self.can_multi_conn()
    }

    async fn start_lanes(&mut self, lanes: &Lanes) -> io::Result<()> {
        if !self.takes_lanes() {
            return Ok(());
        }
        let made = try_join_all((0..lanes.len()).map(|k| {
            let (server, opts) = (self.server.clone(), self.opts.clone());
            lanes.spawn(k, async move { server.connect(&opts).await })
        }))
        .await
        .map_err(|e| io::Error::other(format!("{}: {e}", self.name)))?;
        let made = made.into_iter().collect::<Result<Vec<_>, _>>();
        self.lane_conns = self.more_conns(made.map_err(|e| self.conn_error(e))?)?;
        Ok(())
    }

    fn can_extents(&self) -> bool {
        self.extents || self.shallow
    }

    fn extents_window(&self) -> u64 {
        if self.conn().extended_headers() {
            1 << 36
        } else {
            1 << 30
        }
    }

    fn max_zero(&self) -> u64 {
        // Extended headers: a zero (or trim) of any length is one request.
        if self.conn().extended_headers() {
            1 << 62
        } else {
            1 << 30
        }
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        if self.shallow {
            return self.shallow_extents(offset, length).await;
        }
        if !self.extents {
            return Ok(vec![Extent::new(offset, length, false)]);
        }
        let status = self
            .conn()
            .block_status(length, offset, 0)
            .await
            .map_err(io_err)?;
        let list = status.get(CONTEXT_BASE_ALLOCATION).unwrap_or(&[]);
        let end = offset + length;
        let mut out = Vec::with_capacity(list.len());
        let mut at = offset;
        for e in list {
            if at >= end {
                break;
            }
            let len = e.length.min(end - at);
            let zero = e.flags & alloc::ZERO != 0;
            match out.last_mut() {
                Some(Extent {
                    zero: z, length, ..
                }) if *z == zero => *length += len,
                _ => out.push(Extent::new(at, len, zero)),
            }
            at += len;
        }
        if out.is_empty() {
            return Err(io::Error::other(
                "block status: the server described no extents",
            ));
        }
        Ok(out)
    }

    async fn read(&self, buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        let m = self.min_block();
        if unaligned(offset, buf.len() as u64, m) {
            return self.read_unaligned(buf, offset, m).await;
        }
        self.conn()
            .pread_owned(buf, offset, 0)
            .await
            .map_err(io_err)
    }

    async fn read_sparse(&self, buf: Vec<u8>, offset: u64) -> io::Result<(Vec<u8>, Vec<Hole>)> {
        let m = self.min_block();
        if unaligned(offset, buf.len() as u64, m) {
            return Ok((self.read_unaligned(buf, offset, m).await?, Vec::new()));
        }
        self.conn()
            .pread_sparse(buf, offset, 0)
            .await
            .map_err(io_err)
    }

    async fn write(&self, data: Data, offset: u64) -> io::Result<()> {
        let c = self.conn();
        let wb = &self.writeback;
        let req = InFlight::new(&wb.writing);
        let m = self.min_block();
        if unaligned(offset, data.len() as u64, m) {
            self.write_unaligned(Some(&data), offset, data.len() as u64, m)
                .await?;
        } else {
            c.pwrite(&data, offset, 0).await.map_err(io_err)?;
        }
        wb.wrote(c, data.len() as u64, req.others());
        Ok(())
    }

    async fn zero(&self, offset: u64, length: u64, allocate: bool) -> io::Result<bool> {
        let c = self.conn();
        if !c.can_zero() {
            return Ok(false);
        }
        let _req = InFlight::new(&self.writeback.writing);
        let m = self.min_block();
        if unaligned(offset, length, m) {
            // Zeroes written into the partial blocks at the ends, the
            // whole blocks between zeroed.
            for (at, len, whole) in zero_pieces(offset, length, m) {
                match whole {
                    true => _ = Box::pin(self.zero(at, len, allocate)).await?,
                    false => self.write_unaligned(None, at, len, m).await?,
                }
            }
            return Ok(true);
        }
        let flags = if allocate { cmdflag::NO_HOLE } else { 0 };
        if c.can_fast_zero() && self.fast_zero.load(Ordering::Relaxed) {
            match c.zero(length, offset, flags | cmdflag::FAST_ZERO).await {
                Ok(()) => return Ok(true),
                // Not fast here: zero the ordinary way from now on.
                Err(NbdError::Server { errno: e, .. }) if e == errno::ENOTSUP => {
                    self.fast_zero.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        c.zero(length, offset, flags).await.map_err(io_err)?;
        Ok(true)
    }

    async fn flush(&self) -> io::Result<()> {
        self.writeback.settle().await?;
        if !self.conns[0].can_flush() {
            return Ok(());
        }
        try_join_all(self.all().map(|c| c.flush()))
            .await
            .map_err(io_err)?;
        Ok(())
    }

    async fn close(&self) -> io::Result<()> {
        self.writeback.settle().await?;
        try_join_all(self.all().map(|c| c.disconnect()))
            .await
            .map_err(io_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(length: u64, flags: u32) -> StatusExtent {
        StatusExtent { length, flags }
    }

    #[test]
    fn shallow_extents_keep_the_top_layer_only() {
        let z = alloc::HOLE | alloc::ZERO;
        // base:allocation: data 0-100, zero 100-300, data 300-400.
        let a = [se(100, 0), se(200, z), se(100, 0)];
        // depth: top 0-50, backing 50-150, top 150-250, none 250-400.
        let d = [se(50, 1), se(100, 2), se(100, 1), se(150, 0)];
        let got: Vec<_> = shallow_merge(1000, 400, &a, &d)
            .into_iter()
            .map(|e| (e.offset, e.length, e.zero, e.skip))
            .collect();
        assert_eq!(
            got,
            vec![
                (1000, 50, false, false),
                (1050, 100, false, true),
                (1150, 100, true, false),
                (1250, 150, false, true),
            ]
        );
        // Only as far as both lists go, and no further than asked.
        let got = shallow_merge(0, 120, &a, &[se(80, 1)]);
        assert_eq!(got, vec![Extent::new(0, 80, false)]);
        let got = shallow_merge(0, 30, &a, &d);
        assert_eq!(got, vec![Extent::new(0, 30, false)]);
    }

    #[test]
    fn background_flushes_wait_for_16m_and_as_long_as_the_last_one_took() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // The first: as soon as 16M are written.
        assert!(!flush_due(FLUSH_EVERY - 1, None, t));
        assert!(flush_due(FLUSH_EVERY, None, t));
        // A 20 ms flush that ended at t: the next one from t + 20 ms.
        let last = Some((t, ms(20)));
        assert!(!flush_due(FLUSH_EVERY, last, t + ms(19)));
        assert!(flush_due(FLUSH_EVERY, last, t + ms(20)));
        // However much was written meanwhile (a slow disk gets fewer,
        // larger flushes).
        assert!(!flush_due(8 * FLUSH_EVERY, Some((t, ms(300))), t + ms(299)));
        assert!(flush_due(8 * FLUSH_EVERY, Some((t, ms(300))), t + ms(300)));
        // Not before 16M, however long ago the last one was.
        assert!(!flush_due(FLUSH_EVERY - 1, last, t + ms(10_000)));
    }
}
