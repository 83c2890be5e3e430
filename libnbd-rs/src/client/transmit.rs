//! The transmission phase: [`Connection`], many requests in flight on
//! one socket.
//!
//! A request registers itself (cookie, what it asked for, a oneshot
//! sender) in the pending table, then writes its header and payload under
//! the writer lock. One reader task per connection reads replies, checks
//! each against the request its cookie names, writes read data straight
//! into the request's buffer, and completes the request when its reply is
//! done. Anything malformed from the server fails the whole connection:
//! every pending and later request gets the same error.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::try_join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::protocol::{
    be16, be32, be64, cmd, cmdflag, errno, reply, Request, EXTENDED_REPLY_MAGIC, MAX_REQUEST_SIZE,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use crate::uri::Uri;

use super::error::{command_name, Error, Result};
use super::negotiate::KeepAlive;
use super::reply::{
    check_extents, parse_block_status, parse_block_status_ext, parse_error, ChunkError,
    ChunkHeader, Coverage, MAX_ERROR_CHUNK, MAX_STATUS_CHUNK, MAX_STATUS_EXT_CHUNK,
};
use super::stream::{shutdown_socket, BoxRead, BoxWrite, Stream, Transport};
use super::types::{
    BlockSizes, BlockStatus, ConnectOptions, ContextStatus, ExportInfo, MetaContext, Stats,
    StatusExtent, TransmissionFlags,
};
use super::Negotiation;

/// Largest read or write sent when the server advertised no maximum
/// (the spec's interoperable default).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest effect length of one trim, zero or cache request without
/// extended headers; larger requests are split (with extended headers
/// they go in one request).
pub const MAX_EFFECT_LENGTH: u64 = 1 << 30;
/// Largest length asked for in one block status request without
/// extended headers; larger requests are clamped (the reply may cover
/// less anyway).
pub const MAX_STATUS_LENGTH: u64 = 1 << 31;
const WRITE_BUFFER: usize = 64 * 1024;
/// Buffer for reading replies: room for many small replies per read
/// call, little enough that read payloads are hardly ever copied
/// through it.
const REPLY_BUFFER: usize = 4 * 1024;

/// What a finished request produced.
enum Outcome {
    Done,
    /// Read data, and the holes left unfilled in it (see
    /// [`Connection::pread_sparse`]).
    Data(Vec<u8>, Vec<Hole>),
    Status(Vec<(u32, Vec<StatusExtent>)>),
}

/// A range of a read buffer that the server sent as a hole.
pub type Hole = std::ops::Range<usize>;

/// Where a read's data goes.
struct ReadInto {
    buf: Vec<u8>,
    /// Leave the server's holes unfilled and report them.
    report_holes: bool,
}

/// A request waiting for (the rest of) its reply.
struct Pending {
    typ: u16,
    flags: u16,
    offset: u64,
    count: u64,
    /// Read buffer, `count` bytes (taken by the reader while it fills
    /// part of it).
    buf: Option<Vec<u8>>,
    /// The holes not filled in `buf`, when the caller asked for them.
    holes: Option<Vec<Hole>>,
    coverage: Coverage,
    statuses: Vec<(u32, Vec<StatusExtent>)>,
    /// Filtered block status: the only context ids the reply may have.
    filter: Option<Vec<u32>>,
    error: Option<ChunkError>,
    chunks: u32,
    tx: oneshot::Sender<Result<Outcome>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the connection has failed or closed.
    dead: Option<Error>,
    /// No new requests (disconnecting, or the server is shutting down).
    closing: bool,
    /// The server said ESHUTDOWN: disconnect once idle.
    server_shutdown: bool,
    disc_sent: bool,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    simple_replies: AtomicU64,
    chunks: AtomicU64,
    hole_chunks: AtomicU64,
}

struct Shared {
    writer: tokio::sync::Mutex<BufWriter<BoxWrite>>,
    state: Mutex<State>,
    /// Signalled when the pending table becomes empty or the connection
    /// dies.
    idle: Notify,
    /// Stops the reader task.
    kill: Notify,
    next_cookie: AtomicU64,
    structured: bool,
    /// Extended headers: 32-byte requests and reply chunks.
    extended: bool,
    contexts: Vec<MetaContext>,
    counters: Counters,
    /// A duplicate of the socket, to hang up at once on failure.
    socket: Option<OwnedFd>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data; carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dead(&self) -> Option<Error> {
        self.state().dead.clone()
    }

    /// Fail the connection: every pending request and every later one
    /// gets `e` (or the first error, if it had already failed).
    fn fail(&self, e: Error) {
        let (pending, err, first) = {
            let mut st = self.state();
            let first = st.dead.is_none();
            if first {
                st.dead = Some(e);
            }
            let err = st.dead.clone().unwrap_or(Error::Closed);
            (std::mem::take(&mut st.pending), err, first)
        };
        if first {
            // A hard disconnect: the server sees it at once, even while
            // the reader task still holds the socket.
            if let Some(s) = &self.socket {
                shutdown_socket(s);
            }
        }
        for (_, p) in pending {
            let _ = p.tx.send(Err(err.clone()));
        }
        self.idle.notify_waiters();
        self.kill.notify_one();
    }

    fn complete(&self, cookie: u64) -> Option<Pending> {
        let mut st = self.state();
        let p = st.pending.remove(&cookie);
        if st.pending.is_empty() {
            self.idle.notify_waiters();
        }
        p
    }

    fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Send `NBD_CMD_DISC` once.
    async fn send_disc(&self) -> io::Result<()> {
        let mut w = self.writer.lock().await;
        {
            let mut st = self.state();
            if st.disc_sent || st.dead.is_some() {
                return Ok(());
            }
            st.disc_sent = true;
        }
        let req = Request {
            flags: 0,
            typ: cmd::DISC,
            cookie: self.next_cookie.fetch_add(1, Ordering::Relaxed),
            offset: 0,
            count: 0,
        };
        if self.extended {
            w.write_all(&req.encode_extended()).await?;
        } else {
            w.write_all(&req.encode()).await?;
        }
        w.flush().await?;
        w.shutdown().await
    }
}

/// What happens to a request whose future is dropped.
enum Phase {
    /// Registered, not sent: forget it.
    Registered,
    /// Partly sent: the stream is corrupt, fail the connection.
    Writing,
    /// Sent: the reader will consume and discard the reply.
    Sent,
}

struct SubmitGuard<'a> {
    shared: &'a Shared,
    cookie: u64,
    phase: Phase,
}

impl Drop for SubmitGuard<'_> {
    fn drop(&mut self) {
        match self.phase {
            Phase::Registered => {
                self.shared.complete(self.cookie);
            }
            Phase::Writing => self.shared.fail(Error::io(
                "send request",
                io::Error::new(
                    io::ErrorKind::Interrupted,
                    "request cancelled while it was being sent; connection closed",
                ),
            )),
            Phase::Sent => {}
        }
    }
}

/// What the negotiation hands to transmission besides the export.
pub(crate) struct Handover {
    /// `newstyle-fixed`, ...
    pub protocol: &'static str,
    /// TLS is running.
    pub tls: bool,
    /// The URI we connected by.
    pub uri: Option<Uri>,
    /// Where we connected.
    pub transport: Option<Transport>,
    /// The socket, to shut down when the connection drops.
    pub socket: Option<OwnedFd>,
    /// Objects to keep alive as long as the connection.
    pub keepalive: KeepAlive,
}

/// One connection in the transmission phase.
///
/// Every I/O method takes `&self`, so many requests can be in flight at
/// once: run them with `futures::future::join_all`, or share the
/// connection between tasks with an `Arc`.
///
/// Flags are bitwise-or of [`crate::protocol::cmdflag`] values.
/// Requests are checked before they are sent: flags the command does not
/// take or the server did not advertise, commands the server did not
/// advertise, and offsets or counts not aligned to the server's minimum
/// block size are refused. Bounds and writes to a read-only export are
/// left to the server, which answers `EINVAL` and `EPERM`. Reads and
/// writes larger than the server's maximum payload (32M when it states
/// none, never more than 64M) are split and sent concurrently.
///
/// Dropping the connection closes the socket (without `NBD_CMD_DISC`:
/// call [`disconnect`](Self::disconnect) for a clean close).
pub struct Connection {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    info: ExportInfo,
    protocol: &'static str,
    /// TLS is running.
    tls: bool,
    /// The URI we connected by, for [`Connection::uri`].
    uri_base: Option<Uri>,
    transport: Option<Transport>,
    min_block: u32,
    max_payload: u32,
    // Dropped last: a captive server outlives the socket.
    _keepalive: KeepAlive,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("protocol", &self.protocol)
            .field("transport", &self.transport)
            .field("info", &self.info)
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        // This also shuts the socket down, so the server sees the close
        // before a captive server is told to stop (the aborted reader
        // task holds the socket until the runtime drops it).
        self.shared.fail(Error::Closed);
    }
}

macro_rules! delegate_flags {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        $(
            $(#[$m])*
            pub fn $name(&self) -> bool {
                self.info.$name()
            }
        )*
    };
}

impl Connection {
    /// Connect to a server and open the export named in `opts`.
    pub async fn connect(transport: &Transport, opts: &ConnectOptions) -> Result<Connection> {
        Negotiation::connect(transport, opts).await?.go().await
    }

    /// Connect to an NBD URI (`nbd://host/export`,
    /// `nbd+unix:///export?socket=PATH`, ...). The URI's export name
    /// replaces the one in `opts`.
    pub async fn connect_uri(uri: &str, opts: &ConnectOptions) -> Result<Connection> {
        Uri::parse(uri)?.connect(opts).await
    }

    /// Negotiate on an open stream and open the export named in `opts`.
    pub async fn handshake(stream: Stream, opts: &ConnectOptions) -> Result<Connection> {
        Negotiation::start(stream, opts).await?.go().await
    }

    /// Start transmission on a negotiated socket.
    pub(crate) fn start(
        reader: BufReader<BoxRead>,
        writer: BoxWrite,
        info: ExportInfo,
        h: Handover,
    ) -> Connection {
        let Handover {
            protocol,
            tls,
            uri,
            transport,
            socket,
            keepalive,
        } = h;
        let (min_block, max_payload) = limits(info.block_size);
        // Replies are read through a small buffer: read data is read
        // straight into the request's buffer once the buffered bytes
        // are used up, so a large buffer here would pull most of every
        // payload through itself (an extra copy of all data read).
        let reader = if reader.buffer().is_empty() {
            BufReader::with_capacity(REPLY_BUFFER, reader.into_inner())
        } else {
            reader
        };
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(WRITE_BUFFER, writer)),
            state: Mutex::new(State::default()),
            idle: Notify::new(),
            kill: Notify::new(),
            next_cookie: AtomicU64::new(1),
            structured: info.structured_replies,
            extended: info.extended_headers,
            contexts: info.meta_contexts.clone(),
            counters: Counters::default(),
            socket,
        });
        let handle = tokio::spawn(reader_task(shared.clone(), reader));
        Connection {
            shared,
            reader: Mutex::new(Some(handle)),
            info,
            protocol,
            tls,
            uri_base: uri,
            transport,
            min_block,
            max_payload,
            _keepalive: keepalive,
        }
    }

    /// Keep `obj` alive as long as this connection.
    pub fn keep_alive(&mut self, obj: Arc<dyn Any + Send + Sync>) {
        self._keepalive.push(obj);
    }

    /// Everything the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.info.flags
    }

    /// The export name we asked for.
    pub fn export_name(&self) -> &str {
        &self.info.export_name
    }

    /// The server's canonical name of the export, if it sent one.
    pub fn canonical_name(&self) -> Option<&str> {
        self.info.canonical_name.as_deref()
    }

    /// The export's description, if the server sent one.
    pub fn description(&self) -> Option<&str> {
        self.info.description.as_deref()
    }

    /// Block size constraints, if the server advertised them.
    pub fn block_size(&self) -> Option<BlockSizes> {
        self.info.block_size
    }

    /// The largest read or write sent in one request (larger ones are
    /// split).
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// `newstyle-fixed`, `newstyle` or `oldstyle`.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Were structured replies negotiated? (Also true with extended
    /// headers.)
    pub fn structured_replies(&self) -> bool {
        self.info.structured_replies
    }

    /// Were extended headers negotiated (64-bit requests: a zero, trim,
    /// cache or block status of any length is one request)?
    pub fn extended_headers(&self) -> bool {
        self.info.extended_headers
    }

    /// Is the connection using TLS?
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The negotiated meta contexts.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.info.meta_contexts
    }

    /// Was meta context `name` negotiated?
    pub fn can_meta_context(&self, name: &str) -> bool {
        self.info.can_meta_context(name)
    }

    delegate_flags! {
        /// The export is read-only.
        is_read_only,
        /// The export is on rotational media.
        is_rotational,
        /// The server understands flush.
        can_flush,
        /// The server understands FUA.
        can_fua,
        /// The server understands trim.
        can_trim,
        /// The server understands write zeroes.
        can_zero,
        /// The server understands fast zero.
        can_fast_zero,
        /// The server understands "don't fragment" reads.
        can_df,
        /// Several connections see a consistent view.
        can_multi_conn,
        /// The server understands cache.
        can_cache,
    }

    /// Where we connected, if known.
    pub fn transport(&self) -> Option<&Transport> {
        self.transport.as_ref()
    }

    /// A URI to connect back to this export, like libnbd's
    /// `nbd_get_uri`: `nbd://localhost:10809/` or
    /// `nbd+unix:///?socket=/tmp/sock`. `None` when the connection was
    /// made on a stream, an fd, or to a captive server.
    pub fn uri(&self) -> Option<String> {
        super::negotiate::uri_for(
            self.uri_base.as_ref(),
            self.transport.as_ref(),
            &self.info.export_name,
        )
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.state().pending.len()
    }

    /// Has the connection failed or been closed?
    pub fn is_closed(&self) -> bool {
        let st = self.shared.state();
        st.dead.is_some() || st.closing
    }

    /// Traffic counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: g(&c.requests),
            bytes_sent: g(&c.bytes_sent),
            bytes_received: g(&c.bytes_received),
            simple_replies: g(&c.simple_replies),
            chunks: g(&c.chunks),
            hole_chunks: g(&c.hole_chunks),
        }
    }

    // ---- checks --------------------------------------------------------

    fn check_flags(&self, name: &str, flags: u16, allowed: u16) -> Result<()> {
        let bad = flags & !allowed;
        if bad != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: flags {bad:#x} are not valid for this command"
            )));
        }
        let unsupported = |f: &str| {
            Err(Error::Unsupported(format!(
                "{name}: the server does not support the {f} flag"
            )))
        };
        if flags & cmdflag::FUA != 0 && !self.can_fua() {
            return unsupported("FUA");
        }
        if flags & cmdflag::DF != 0 && !self.can_df() {
            return unsupported("DF");
        }
        if flags & cmdflag::FAST_ZERO != 0 && !self.can_fast_zero() {
            return unsupported("FAST_ZERO");
        }
        Ok(())
    }

    fn check_range(&self, name: &str, offset: u64, count: u64) -> Result<()> {
        if !matches!(offset.checked_add(count), Some(end) if end <= i64::MAX as u64) {
            return Err(Error::InvalidArgument(format!(
                "{name}: offset {offset} + count {count} overflows"
            )));
        }
        let min = u64::from(self.min_block);
        // The minimum block size is a power of 2.
        if (offset | count) & (min - 1) != 0 {
            return Err(Error::InvalidArgument(format!(
                "{name}: offset {offset} and count {count} must be multiples of \
                 the server's minimum block size {min}"
            )));
        }
        Ok(())
    }

    fn check_command(&self, name: &str, supported: bool) -> Result<()> {
        if supported {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{name}: the server does not support this command"
            )))
        }
    }

    // ---- requests ------------------------------------------------------

    /// Send one request and wait for its reply.
    async fn submit(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        count: u64,
        payload: Option<&[u8]>,
        read: Option<ReadInto>,
    ) -> Result<Outcome> {
        self.submit_filtered(typ, flags, offset, count, payload, read, None)
            .await
    }

    /// [`submit`](Self::submit); with a `filter` (filtered block status)
    /// the payload is the effect length and the ids, the header's length
    /// is the payload's, and `count` is the effect length.
    #[allow(clippy::too_many_arguments)]
    async fn submit_filtered(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        count: u64,
        payload: Option<&[u8]>,
        read: Option<ReadInto>,
        filter: Option<Vec<u32>>,
    ) -> Result<Outcome> {
        let shared = &*self.shared;
        let wire_count = match (&filter, payload) {
            (Some(_), Some(p)) => p.len() as u64,
            _ => count,
        };
        let cookie = shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.state();
            if st.closing {
                return Err(Error::Closed);
            }
            if let Some(e) = &st.dead {
                return Err(e.clone());
            }
            st.pending.insert(
                cookie,
                Pending {
                    typ,
                    flags,
                    offset,
                    count,
                    holes: read.as_ref().and_then(|r| r.report_holes.then(Vec::new)),
                    buf: read.map(|r| r.buf),
                    coverage: Coverage::default(),
                    statuses: Vec::new(),
                    filter,
                    error: None,
                    chunks: 0,
                    tx,
                },
            );
        }
        let mut guard = SubmitGuard {
            shared,
            cookie,
            phase: Phase::Registered,
        };
        let req = Request {
            // With extended headers a payload is announced as such.
            flags: if shared.extended && payload.is_some() {
                flags | cmdflag::PAYLOAD_LEN
            } else {
                flags
            },
            typ,
            cookie,
            offset,
            count: wire_count,
        };
        let (ext, compact);
        let hdr: &[u8] = if shared.extended {
            ext = req.encode_extended();
            &ext
        } else {
            compact = req.encode();
            &compact
        };
        {
            let mut w = shared.writer.lock().await;
            if let Some(e) = shared.dead() {
                return Err(e);
            }
            guard.phase = Phase::Writing;
            let sent = async {
                match payload {
                    Some(p) => write_request(&mut w, hdr, p).await?,
                    None => w.write_all(hdr).await?,
                }
                w.flush().await
            }
            .await;
            guard.phase = Phase::Sent;
            if let Err(e) = sent {
                let e = Error::io("send request", e);
                shared.fail(e.clone());
                return Err(shared.dead().unwrap_or(e));
            }
        }
        shared.add(&shared.counters.requests, 1);
        if let Some(p) = payload {
            shared.add(&shared.counters.bytes_sent, p.len() as u64);
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(shared.dead().unwrap_or(Error::Closed)),
        }
    }

    async fn read_one(
        &self,
        read: ReadInto,
        offset: u64,
        flags: u16,
    ) -> Result<(Vec<u8>, Vec<Hole>)> {
        let count = read.buf.len() as u64;
        match self
            .submit(cmd::READ, flags, offset, count, None, Some(read))
            .await?
        {
            Outcome::Data(d, mut holes) => {
                holes.sort_by_key(|h| h.start);
                Ok((d, holes))
            }
            _ => Err(Error::Protocol("internal: read without data".into())),
        }
    }

    /// Like [`pread_owned`](Self::pread_owned), but the parts the server
    /// sends as holes (structured replies) are not filled with zeroes:
    /// their ranges in the buffer are returned, sorted, and what the
    /// buffer holds there is unspecified. For a caller that treats those
    /// ranges as zeroes without looking (a copy skipping zero blocks). A
    /// read above the server's largest request is filled as by
    /// `pread_owned`, holes and all. Flags: `DF`.
    pub async fn pread_sparse(
        &self,
        buf: Vec<u8>,
        offset: u64,
        flags: u16,
    ) -> Result<(Vec<u8>, Vec<Hole>)> {
        self.check_flags("pread", flags, cmdflag::DF)?;
        let count = buf.len() as u64;
        self.check_range("pread", offset, count)?;
        if count == 0 || count > u64::from(self.max_payload) {
            return Ok((self.pread_owned(buf, offset, flags).await?, Vec::new()));
        }
        let read = ReadInto {
            buf,
            report_holes: true,
        };
        self.read_one(read, offset, flags).await
    }

    /// Read into an owned buffer (all of it, from `offset`) and give it
    /// back: the reader task fills it straight from the socket, with no
    /// copy. Flags: `DF`.
    pub async fn pread_owned(&self, buf: Vec<u8>, offset: u64, flags: u16) -> Result<Vec<u8>> {
        self.check_flags("pread", flags, cmdflag::DF)?;
        let count = buf.len() as u64;
        self.check_range("pread", offset, count)?;
        if count == 0 {
            return Ok(buf);
        }
        let max = u64::from(self.max_payload);
        let read = |buf| ReadInto {
            buf,
            report_holes: false,
        };
        if count <= max {
            return Ok(self.read_one(read(buf), offset, flags).await?.0);
        }
        let pieces = (0..count).step_by(max as usize).map(|start| {
            let len = max.min(count - start) as usize;
            self.read_one(read(vec![0u8; len]), offset + start, flags)
        });
        let pieces = try_join_all(pieces).await?;
        let mut buf = buf;
        let mut at = 0;
        for (p, _) in pieces {
            buf[at..at + p.len()].copy_from_slice(&p);
            at += p.len();
        }
        Ok(buf)
    }

    /// Read `count` bytes at `offset` into a new buffer. Flags: `DF`.
    pub async fn pread_vec(&self, count: usize, offset: u64, flags: u16) -> Result<Vec<u8>> {
        self.pread_owned(vec![0u8; count], offset, flags).await
    }

    /// Read `buf.len()` bytes at `offset` into `buf`. Flags: `DF`.
    pub async fn pread(&self, buf: &mut [u8], offset: u64, flags: u16) -> Result<()> {
        let data = self.pread_vec(buf.len(), offset, flags).await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Write `data` at `offset`. Flags: `FUA`.
    pub async fn pwrite(&self, data: &[u8], offset: u64, flags: u16) -> Result<()> {
        self.check_flags("pwrite", flags, cmdflag::FUA)?;
        let count = data.len() as u64;
        self.check_range("pwrite", offset, count)?;
        if count == 0 {
            return Ok(());
        }
        let max = self.max_payload as usize;
        let pieces = data.chunks(max).enumerate().map(|(i, d)| async move {
            let off = offset + (i * max) as u64;
            self.submit(cmd::WRITE, flags, off, d.len() as u64, Some(d), None)
                .await
                .map(|_| ())
        });
        try_join_all(pieces).await.map(|_| ())
    }

    /// Flush the server's caches to permanent storage.
    pub async fn flush(&self) -> Result<()> {
        self.check_command("flush", self.can_flush())?;
        self.submit(cmd::FLUSH, 0, 0, 0, None, None)
            .await
            .map(|_| ())
    }

    async fn effect(
        &self,
        typ: u16,
        name: &str,
        count: u64,
        offset: u64,
        flags: u16,
    ) -> Result<()> {
        self.check_range(name, offset, count)?;
        if count == 0 {
            return Ok(());
        }
        if self.shared.extended {
            // One request, whatever its length; a server that finds it
            // too large (EOVERFLOW, as the spec allows) gets it in pieces.
            match self.submit(typ, flags, offset, count, None, None).await {
                Err(Error::Server {
                    errno: errno::EOVERFLOW,
                    ..
                }) if count > MAX_EFFECT_LENGTH => {}
                r => return r.map(|_| ()),
            }
        }
        let step = MAX_EFFECT_LENGTH;
        let pieces = (0..count).step_by(step as usize).map(|start| {
            let len = step.min(count - start);
            self.submit(typ, flags, offset + start, len, None, None)
        });
        try_join_all(pieces).await.map(|_| ())
    }

    /// Discard `count` bytes at `offset`. Flags: `FUA`.
    pub async fn trim(&self, count: u64, offset: u64, flags: u16) -> Result<()> {
        self.check_command("trim", self.can_trim())?;
        self.check_flags("trim", flags, cmdflag::FUA)?;
        self.effect(cmd::TRIM, "trim", count, offset, flags).await
    }

    /// Write zeroes over `count` bytes at `offset`. Flags: `FUA`,
    /// `NO_HOLE`, `FAST_ZERO`.
    pub async fn zero(&self, count: u64, offset: u64, flags: u16) -> Result<()> {
        self.check_command("zero", self.can_zero())?;
        self.check_flags(
            "zero",
            flags,
            cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        )?;
        self.effect(cmd::WRITE_ZEROES, "zero", count, offset, flags)
            .await
    }

    /// Ask the server to prefetch `count` bytes at `offset`.
    pub async fn cache(&self, count: u64, offset: u64, flags: u16) -> Result<()> {
        self.check_command("cache", self.can_cache())?;
        self.check_flags("cache", flags, 0)?;
        self.effect(cmd::CACHE, "cache", count, offset, flags).await
    }

    /// Block status of `count` bytes at `offset`, for every negotiated
    /// meta context. The server may describe less than asked (or, for
    /// the last extent, more); without extended headers a `count` over
    /// 2G is clamped. Flags: `REQ_ONE`.
    pub async fn block_status(&self, count: u64, offset: u64, flags: u16) -> Result<BlockStatus> {
        self.block_status_for(count, offset, flags, None).await
    }

    /// Can block status be asked for some of the negotiated contexts
    /// only (extended headers and `NBD_FLAG_BLOCK_STATUS_PAYLOAD`)?
    pub fn can_block_status_payload(&self) -> bool {
        self.shared.extended && self.info.flags.can_block_status_payload()
    }

    /// Block status for the negotiated meta contexts named in
    /// `contexts` only (in the order negotiated), as
    /// [`block_status`](Self::block_status) otherwise. When the server
    /// can filter ([`can_block_status_payload`](Self::can_block_status_payload))
    /// and `contexts` is not every negotiated one, the request is the
    /// filtered form (`NBD_CMD_FLAG_PAYLOAD_LEN` with the contexts' ids)
    /// and a reply for any other context is a protocol error; else the
    /// plain request is sent and the other contexts' answers dropped. A
    /// name not negotiated is an error.
    pub async fn block_status_filtered(
        &self,
        count: u64,
        offset: u64,
        flags: u16,
        contexts: &[&str],
    ) -> Result<BlockStatus> {
        let mut ids = Vec::with_capacity(contexts.len());
        for name in contexts {
            let c = self
                .info
                .meta_contexts
                .iter()
                .find(|c| c.name == *name)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "block_status: meta context {name:?} was not negotiated"
                    ))
                })?;
            if !ids.contains(&c.id) {
                ids.push(c.id);
            }
        }
        if ids.is_empty() {
            return Err(Error::InvalidArgument(
                "block_status: no meta context asked for".into(),
            ));
        }
        let all = ids.len() == self.info.meta_contexts.len();
        let mut out = if all || !self.can_block_status_payload() {
            self.block_status_for(count, offset, flags, None).await?
        } else {
            self.block_status_for(count, offset, flags, Some(ids))
                .await?
        };
        out.contexts.retain(|c| contexts.contains(&c.name.as_str()));
        Ok(out)
    }

    async fn block_status_for(
        &self,
        count: u64,
        offset: u64,
        flags: u16,
        filter: Option<Vec<u32>>,
    ) -> Result<BlockStatus> {
        if self.info.meta_contexts.is_empty() {
            return Err(Error::Unsupported(
                "block_status: no meta context was negotiated".into(),
            ));
        }
        self.check_flags("block_status", flags, cmdflag::REQ_ONE)?;
        if count == 0 {
            return Err(Error::InvalidArgument(
                "block_status: count cannot be 0".into(),
            ));
        }
        let count = if self.shared.extended {
            count
        } else {
            count.min(MAX_STATUS_LENGTH)
        };
        self.check_range("block_status", offset, count)?;
        let payload = filter.as_ref().map(|ids| {
            let mut b = Vec::with_capacity(8 + 4 * ids.len());
            b.extend_from_slice(&count.to_be_bytes());
            for id in ids {
                b.extend_from_slice(&id.to_be_bytes());
            }
            b
        });
        let statuses = match self
            .submit_filtered(
                cmd::BLOCK_STATUS,
                flags,
                offset,
                count,
                payload.as_deref(),
                None,
                filter,
            )
            .await?
        {
            Outcome::Status(s) => s,
            _ => {
                return Err(Error::Protocol(
                    "internal: block status without status".into(),
                ))
            }
        };
        let mut out = BlockStatus::default();
        for c in &self.info.meta_contexts {
            if let Some((_, ex)) = statuses.iter().find(|(id, _)| *id == c.id) {
                out.contexts.push(ContextStatus {
                    name: c.name.clone(),
                    extents: ex.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Close cleanly: refuse new requests, wait for those in flight,
    /// send `NBD_CMD_DISC`, and wait (a few seconds at most) for the
    /// server to close.
    pub async fn disconnect(&self) -> Result<()> {
        let shared = &*self.shared;
        {
            let mut st = shared.state();
            if st.dead.is_some() {
                return Ok(());
            }
            st.closing = true;
        }
        loop {
            let idle = shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let st = shared.state();
                if st.pending.is_empty() || st.dead.is_some() {
                    break;
                }
            }
            idle.await;
        }
        let _ = shared.send_disc().await;
        let handle = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut h) = handle {
            tokio::select! {
                _ = &mut h => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => h.abort(),
            }
        }
        shared.fail(Error::Closed);
        Ok(())
    }
}

/// Write a request header and its payload together: one `writev` for
/// a large payload (which bypasses the buffer) rather than a write of
/// the header alone and another of the payload.
async fn write_request(w: &mut BufWriter<BoxWrite>, hdr: &[u8], payload: &[u8]) -> io::Result<()> {
    let (mut hdr, mut payload) = (hdr, payload);
    while !hdr.is_empty() {
        let n = w
            .write_vectored(&[io::IoSlice::new(hdr), io::IoSlice::new(payload)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < hdr.len() {
            hdr = &hdr[n..];
        } else {
            payload = &payload[n - hdr.len()..];
            hdr = &[];
        }
    }
    w.write_all(payload).await
}

/// The minimum block size and the largest read/write payload to use.
fn limits(bs: Option<BlockSizes>) -> (u32, u32) {
    match bs {
        Some(b) => {
            let min = b.minimum.max(1);
            let max = b.maximum.min(MAX_REQUEST_SIZE);
            let max = (max - max % min).max(min);
            (min, max)
        }
        None => (1, DEFAULT_MAX_PAYLOAD),
    }
}

// ---- the reader task ---------------------------------------------------

async fn reader_task(shared: Arc<Shared>, mut r: BufReader<BoxRead>) {
    let result = tokio::select! {
        r = read_loop(&shared, &mut r) => r,
        _ = shared.kill.notified() => Err(Error::Closed),
    };
    shared.fail(result.err().unwrap_or(Error::Closed));
}

fn eof_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::io(
            "read reply",
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection in the middle of a reply",
            ),
        )
    } else {
        Error::io("read reply", e)
    }
}

async fn rd(r: &mut BufReader<BoxRead>, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).await.map(|_| ()).map_err(eof_error)
}

async fn read_loop(shared: &Shared, r: &mut BufReader<BoxRead>) -> Result<()> {
    loop {
        let mut magic = [0u8; 4];
        let n = r
            .read(&mut magic)
            .await
            .map_err(|e| Error::io("read reply", e))?;
        if n == 0 {
            let st = shared.state();
            if st.closing && st.pending.is_empty() {
                return Ok(());
            }
            return Err(Error::io(
                "read reply",
                io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"),
            ));
        }
        rd(r, &mut magic[n..]).await?;
        match be32(&magic) {
            // With extended headers every reply is an extended chunk.
            SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC if shared.extended => {
                return Err(Error::Protocol(format!(
                    "{} reply although extended headers were negotiated",
                    if be32(&magic) == SIMPLE_REPLY_MAGIC {
                        "simple"
                    } else {
                        "structured"
                    }
                )))
            }
            SIMPLE_REPLY_MAGIC => simple_reply(shared, r).await?,
            STRUCTURED_REPLY_MAGIC => {
                let mut b = [0u8; 16];
                rd(r, &mut b).await?;
                if !shared.structured {
                    return Err(Error::Protocol(
                        "structured reply chunk although structured replies were not negotiated"
                            .into(),
                    ));
                }
                chunk(shared, r, ChunkHeader::decode(&b)).await?
            }
            EXTENDED_REPLY_MAGIC => {
                let h = extended_header(shared, r).await?;
                chunk(shared, r, h).await?
            }
            m => return Err(Error::Protocol(format!("bad reply magic {m:#010x}"))),
        }
        let shutdown = {
            let st = shared.state();
            st.server_shutdown && !st.disc_sent && st.pending.is_empty()
        };
        if shutdown {
            let _ = shared.send_disc().await;
        }
    }
}

fn unknown_cookie(cookie: u64) -> Error {
    Error::Protocol(format!("reply for unknown cookie {cookie:#x}"))
}

async fn simple_reply(shared: &Shared, r: &mut BufReader<BoxRead>) -> Result<()> {
    let mut b = [0u8; 12];
    rd(r, &mut b).await?;
    let error = be32(&b[0..4]);
    let cookie = be64(&b[4..12]);
    shared.add(&shared.counters.simple_replies, 1);
    let mut p = shared
        .complete(cookie)
        .ok_or_else(|| unknown_cookie(cookie))?;
    if p.chunks > 0 {
        return Err(Error::Protocol(format!(
            "simple reply after structured chunks for cookie {cookie:#x}"
        )));
    }
    let result = if error != 0 {
        Err(server_error(&p, error, String::new(), None))
    } else {
        match p.typ {
            cmd::READ => {
                if shared.structured {
                    return Err(Error::Protocol(
                        "simple reply to a read although structured replies were negotiated".into(),
                    ));
                }
                let mut buf = p.buf.take().unwrap_or_default();
                rd(r, &mut buf).await?;
                shared.add(&shared.counters.bytes_received, buf.len() as u64);
                Ok(Outcome::Data(buf, Vec::new()))
            }
            cmd::BLOCK_STATUS => Err(Error::Protocol(
                "block status answered by a simple reply without status".into(),
            )),
            _ => Ok(Outcome::Done),
        }
    };
    finish(shared, p, result);
    Ok(())
}

fn server_error(p: &Pending, errno: u32, message: String, error_offset: Option<u64>) -> Error {
    Error::Server {
        command: command_name(p.typ),
        offset: p.offset,
        count: p.count,
        errno,
        message,
        error_offset,
    }
}

/// Deliver a request's result, noting a server shutting down.
fn finish(shared: &Shared, p: Pending, result: Result<Outcome>) {
    if let Err(Error::Server { errno: e, .. }) = &result {
        if *e == errno::ESHUTDOWN {
            let mut st = shared.state();
            st.closing = true;
            st.server_shutdown = true;
        }
    }
    let _ = p.tx.send(result);
}

/// Look up a pending request and run `f` on it.
fn with_pending<T>(
    shared: &Shared,
    cookie: u64,
    f: impl FnOnce(&mut Pending) -> Result<T>,
) -> Result<T> {
    let mut st = shared.state();
    let p = st
        .pending
        .get_mut(&cookie)
        .ok_or_else(|| unknown_cookie(cookie))?;
    f(p)
}

/// Read the rest of an extended reply chunk header and check it: only
/// after negotiating extended headers, its offset the request's, its
/// payload length within 32 bits (the spec: replies carry payloads only,
/// never over the 32-bit limit).
async fn extended_header(shared: &Shared, r: &mut BufReader<BoxRead>) -> Result<ChunkHeader> {
    let mut b = [0u8; 28];
    rd(r, &mut b).await?;
    if !shared.extended {
        return Err(Error::Protocol(
            "extended reply chunk although extended headers were not negotiated".into(),
        ));
    }
    let (flags, typ, cookie) = (be16(&b[0..2]), be16(&b[2..4]), be64(&b[4..12]));
    let (offset, length) = (be64(&b[12..20]), be64(&b[20..28]));
    let req_offset = with_pending(shared, cookie, |p| Ok(p.offset))?;
    if offset != req_offset {
        return Err(Error::Protocol(format!(
            "extended reply chunk with offset {offset} to a request at offset {req_offset}"
        )));
    }
    let length = u32::try_from(length).map_err(|_| {
        Error::Protocol(format!(
            "extended reply chunk with a {length} byte payload is too large"
        ))
    })?;
    Ok(ChunkHeader {
        flags,
        typ,
        cookie,
        length,
    })
}

async fn chunk(shared: &Shared, r: &mut BufReader<BoxRead>, h: ChunkHeader) -> Result<()> {
    shared.add(&shared.counters.chunks, 1);
    let (typ, flags, offset, count) = with_pending(shared, h.cookie, |p| {
        p.chunks += 1;
        Ok((p.typ, p.flags, p.offset, p.count))
    })?;
    let wrong = |what: &str| {
        Err(Error::Protocol(format!(
            "{what} chunk in reply to {}",
            cmd::name(typ)
        )))
    };
    match h.typ {
        reply::TYPE_NONE => {
            if h.length != 0 {
                return Err(Error::Protocol(format!(
                    "NONE chunk with a {} byte payload",
                    h.length
                )));
            }
            if !h.done() {
                return Err(Error::Protocol("NONE chunk without the DONE flag".into()));
            }
        }
        reply::TYPE_OFFSET_DATA => {
            if typ != cmd::READ {
                return wrong("data");
            }
            if h.length < 9 {
                return Err(Error::Protocol(format!(
                    "data chunk of {} bytes is too short",
                    h.length
                )));
            }
            let mut ob = [0u8; 8];
            rd(r, &mut ob).await?;
            let off = be64(&ob);
            let len = u64::from(h.length - 8);
            let (start, buf) = with_pending(shared, h.cookie, |p| {
                let start = p
                    .coverage
                    .add(offset, count, off, len)
                    .map_err(Error::Protocol)?;
                Ok((start, p.buf.take()))
            })?;
            let mut buf =
                buf.ok_or_else(|| Error::Protocol("internal: read buffer missing".into()))?;
            rd(r, &mut buf[start..start + len as usize]).await?;
            shared.add(&shared.counters.bytes_received, len);
            let mut st = shared.state();
            if let Some(p) = st.pending.get_mut(&h.cookie) {
                p.buf = Some(buf);
            }
        }
        reply::TYPE_OFFSET_HOLE => {
            if typ != cmd::READ {
                return wrong("hole");
            }
            if h.length != 12 {
                return Err(Error::Protocol(format!(
                    "hole chunk of {} bytes, expected 12",
                    h.length
                )));
            }
            let mut pb = [0u8; 12];
            rd(r, &mut pb).await?;
            let off = be64(&pb[0..8]);
            let len = u64::from(be32(&pb[8..12]));
            with_pending(shared, h.cookie, |p| {
                let start = p
                    .coverage
                    .add(offset, count, off, len)
                    .map_err(Error::Protocol)?;
                let hole = start..start + len as usize;
                match (&mut p.holes, &mut p.buf) {
                    (Some(holes), _) => holes.push(hole),
                    (None, Some(buf)) => buf[hole].fill(0),
                    (None, None) => {}
                }
                Ok(())
            })?;
            shared.add(&shared.counters.hole_chunks, 1);
        }
        reply::TYPE_BLOCK_STATUS | reply::TYPE_BLOCK_STATUS_EXT => {
            if typ != cmd::BLOCK_STATUS {
                return wrong("block status");
            }
            let ext = h.typ == reply::TYPE_BLOCK_STATUS_EXT;
            // The spec: the 32-bit type only without extended headers,
            // the 64-bit one only with them.
            if ext != shared.extended {
                return Err(Error::Protocol(format!(
                    "{} chunk {} extended headers",
                    if ext {
                        "BLOCK_STATUS_EXT"
                    } else {
                        "BLOCK_STATUS"
                    },
                    if ext { "without" } else { "with" }
                )));
            }
            let max = if ext {
                MAX_STATUS_EXT_CHUNK
            } else {
                MAX_STATUS_CHUNK
            };
            if h.length > max {
                return Err(Error::Protocol(format!(
                    "block status chunk of {} bytes is too large",
                    h.length
                )));
            }
            let mut pb = vec![0u8; h.length as usize];
            rd(r, &mut pb).await?;
            let (id, extents) = if ext {
                parse_block_status_ext(&pb)
            } else {
                parse_block_status(&pb)
            }
            .map_err(Error::Protocol)?;
            if !shared.contexts.iter().any(|c| c.id == id) {
                return Err(Error::Protocol(format!(
                    "block status for meta context id {id}, which was not negotiated"
                )));
            }
            let asked = with_pending(shared, h.cookie, |p| {
                Ok(p.filter.as_ref().is_none_or(|f| f.contains(&id)))
            })?;
            if !asked {
                return Err(Error::Protocol(format!(
                    "block status for meta context id {id}, which the request did not ask for"
                )));
            }
            check_extents(&extents, flags & cmdflag::REQ_ONE != 0, count)
                .map_err(Error::Protocol)?;
            // The last extent may end past the request, but not past
            // what an offset can say.
            let end = extents
                .iter()
                .try_fold(offset, |at, e| at.checked_add(e.length))
                .filter(|&e| e <= i64::MAX as u64);
            if end.is_none() {
                return Err(Error::Protocol(
                    "block status extents end past the largest possible offset".into(),
                ));
            }
            with_pending(shared, h.cookie, |p| {
                if p.statuses.iter().any(|(i, _)| *i == id) {
                    return Err(Error::Protocol(format!(
                        "two block status chunks for meta context id {id}"
                    )));
                }
                p.statuses.push((id, extents));
                Ok(())
            })?;
        }
        t if reply::is_error(t) => {
            if h.length > MAX_ERROR_CHUNK {
                return Err(Error::Protocol(format!(
                    "error chunk of {} bytes is too large",
                    h.length
                )));
            }
            let mut pb = vec![0u8; h.length as usize];
            rd(r, &mut pb).await?;
            let e = parse_error(t, &pb).map_err(Error::Protocol)?;
            if let Some(eo) = e.offset {
                let offset_ok = matches!(
                    typ,
                    cmd::READ
                        | cmd::WRITE
                        | cmd::TRIM
                        | cmd::CACHE
                        | cmd::WRITE_ZEROES
                        | cmd::BLOCK_STATUS
                );
                if !offset_ok {
                    return wrong("error offset");
                }
                if !Coverage::in_request(offset, count, eo) {
                    return Err(Error::Protocol(format!(
                        "error at offset {eo}, outside the request \
                         (offset {offset} count {count})"
                    )));
                }
            }
            with_pending(shared, h.cookie, |p| {
                if p.error.is_none() {
                    p.error = Some(e);
                }
                Ok(())
            })?;
        }
        t => {
            return Err(Error::Protocol(format!(
                "unknown structured reply type {t}"
            )))
        }
    }
    if h.done() {
        let mut p = shared
            .complete(h.cookie)
            .ok_or_else(|| unknown_cookie(h.cookie))?;
        let result = if let Some(e) = p.error.take() {
            Err(server_error(&p, e.errno, e.message, e.offset))
        } else {
            match p.typ {
                cmd::READ => {
                    if p.coverage.total() != p.count {
                        Err(Error::Protocol(format!(
                            "read reply covered {} of {} bytes",
                            p.coverage.total(),
                            p.count
                        )))
                    } else {
                        let holes = p.holes.take().unwrap_or_default();
                        Ok(Outcome::Data(p.buf.take().unwrap_or_default(), holes))
                    }
                }
                cmd::BLOCK_STATUS => {
                    let want = p.filter.as_ref().map_or(shared.contexts.len(), Vec::len);
                    if p.statuses.len() != want {
                        Err(Error::Protocol(format!(
                            "block status reply for {} of {} meta contexts",
                            p.statuses.len(),
                            want
                        )))
                    } else {
                        Ok(Outcome::Status(std::mem::take(&mut p.statuses)))
                    }
                }
                _ => Ok(Outcome::Done),
            }
        };
        finish(shared, p, result);
    }
    Ok(())
}
