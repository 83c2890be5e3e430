//! The server framework: the fixed-newstyle handshake, option
//! negotiation, and the transmission loop that runs a connection's
//! requests concurrently and writes each reply as it completes.
//!
//! One file per protocol phase:
//!
//! - [`handshake`](self::handshake): the greeting and option haggling up
//!   to `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`, and opening the export;
//! - `transmission`: reading requests, checking them, running them on the
//!   layers, concurrently;
//! - `reply`: writing simple and structured replies.
//!
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`, on unless
//! [`ServerConfig::extended_headers`] is off) change the framing only:
//! 32-byte requests whose length is 64 bits (a payload length with
//! `NBD_CMD_FLAG_PAYLOAD_LEN`, else an effect length, handed whole to the
//! layers, which take u64 counts), 32-byte reply chunks echoing the
//! request's offset, and `BLOCK_STATUS_EXT` with 64-bit extents; a block
//! status may then name the contexts it wants in its payload
//! (`NBD_FLAG_BLOCK_STATUS_PAYLOAD`). A write's payload follows its header
//! with or without `PAYLOAD_LEN` (qemu 10 leaves the flag out).
//!
//! Everything the client sends is checked: a bad magic or an oversized
//! option closes the connection, a bad request gets the error the
//! protocol prescribes, and one connection's failure never touches the
//! others. What the connections of one server share (shutdown, the
//! connection count, verbosity) is a [`ServerContext`], not statics, so
//! servers in one process (tests) do not see each other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::Notify;

use crate::backend::{Handle, Stack};
use crate::protocol as p;
use crate::tls::{BoxIo, Joined, ServerTls};

mod handshake;
mod reply;
mod transmission;

#[cfg(test)]
mod tests;

/// The memory all connections' requests in flight may hold together by
/// default: eight largest requests (512 MiB), whatever the number of
/// clients (each one may hold [`ServerConfig::max_inflight_bytes`]).
pub const DEFAULT_TOTAL_INFLIGHT: usize = 8 * p::MAX_REQUEST_SIZE as usize;

/// A server-wide budget of `bytes` for [`ServerConfig::total_inflight`]
/// (in KiB units; never less than one largest request).
pub fn inflight_budget(bytes: usize) -> Arc<tokio::sync::Semaphore> {
    let units = (bytes / 1024).max(p::MAX_REQUEST_SIZE as usize / 1024 + 1);
    Arc::new(tokio::sync::Semaphore::new(units))
}

/// Server-wide settings shared by every connection.
pub struct ServerConfig {
    /// The plugin and its filters.
    pub stack: Stack,
    /// Offer structured replies (`--no-sr` turns them off).
    pub structured_replies: bool,
    /// Offer meta contexts (`--no-mc` turns them off).
    pub meta_contexts: bool,
    /// Offer extended headers, `NBD_OPT_EXTENDED_HEADERS` (`--no-eh`
    /// turns them off): 64-bit requests and replies.
    pub extended_headers: bool,
    /// Requests of one connection handled at once (`-t`).
    pub threads: usize,
    /// Bytes of request and reply buffers one connection may hold at once,
    /// so a client flooding large writes cannot grow the server unbounded.
    pub max_inflight_bytes: usize,
    /// Bytes of request and reply buffers all connections together may
    /// hold at once, so that many flooding clients cannot either
    /// ([`DEFAULT_TOTAL_INFLIGHT`]; at least one largest request).
    pub total_inflight: Arc<tokio::sync::Semaphore>,
    /// What the connections share: shutdown, their count, verbosity.
    pub server: Arc<ServerContext>,
    /// TLS credentials (`--tls=on|require`): clients may start TLS.
    pub tls: Option<Arc<ServerTls>>,
    /// `--tls=require`: every option but STARTTLS and ABORT is refused
    /// until TLS runs.
    pub tls_required: bool,
    /// `--timeout=SECS`: a client that has not reached transmission
    /// within this time is dropped (off by default).
    pub handshake_timeout: Option<std::time::Duration>,
    /// `--keepalive`: SO_KEEPALIVE on accepted TCP sockets (off by default).
    pub keepalive: bool,
}

impl ServerConfig {
    /// Defaults as nbdkit's for a stack, in a fresh server context.
    pub fn new(stack: Stack) -> Self {
        ServerConfig {
            stack,
            structured_replies: true,
            meta_contexts: true,
            extended_headers: true,
            threads: 16,
            max_inflight_bytes: 2 * p::MAX_REQUEST_SIZE as usize,
            total_inflight: inflight_budget(DEFAULT_TOTAL_INFLIGHT),
            server: ServerContext::new(false),
            tls: None,
            tls_required: false,
            handshake_timeout: None,
            keepalive: false,
        }
    }
}

/// The state one server's connections, listeners and layers share.
#[derive(Debug, Default)]
pub struct ServerContext {
    /// `-v`: print the server's debug messages.
    verbose: bool,
    /// Clients connected now, for `exitlast` and the like.
    connections: AtomicUsize,
    /// The next connection's number (from 1), for messages.
    next_id: AtomicU64,
    /// Wakes everything waiting in [`ServerContext::shutdown_requested`].
    shutdown: Notify,
    /// A shutdown was requested (the flag a late waiter checks).
    shutting_down: AtomicBool,
    /// `-r`: every export is served read-only.
    readonly: AtomicBool,
}

impl ServerContext {
    /// A server context, shared by everything of one server.
    pub fn new(verbose: bool) -> Arc<ServerContext> {
        Arc::new(ServerContext {
            verbose,
            next_id: AtomicU64::new(1),
            ..Default::default()
        })
    }

    /// Say whether the server serves every export read-only (`-r`):
    /// connections and the layers that prepare for writes at start
    /// (`after_fork`) read it here.
    pub fn set_readonly(&self, readonly: bool) {
        self.readonly.store(readonly, Ordering::SeqCst);
    }

    /// Is the server read-only (`-r`)?
    pub fn readonly(&self) -> bool {
        self.readonly.load(Ordering::SeqCst)
    }

    /// Are debug messages (`-v`) on?
    pub fn verbose(&self) -> bool {
        self.verbose
    }

    /// Print a debug message on stderr when `-v` is on.
    pub fn debug(&self, msg: std::fmt::Arguments<'_>) {
        if self.verbose {
            crate::elog!("nbdkit: debug: {msg}");
        }
    }

    /// Clients connected now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Count a client as connected until the returned guard drops.
    pub fn connect(self: &Arc<Self>) -> Connected {
        self.connections.fetch_add(1, Ordering::SeqCst);
        Connected {
            server: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Ask the server to stop accepting and exit (filters like `exitlast`,
    /// signals, the end of `--run`).
    pub fn request_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown.notify_waiters();
    }

    /// Resolves when [`ServerContext::request_shutdown`] has been called.
    pub async fn shutdown_requested(&self) {
        loop {
            // Register interest before checking the flag, or a shutdown
            // between the check and the await would be missed.
            let n = self.shutdown.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }

    /// Has a shutdown been requested?
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// A connected client, counted in [`ServerContext::connections`] while it
/// lives.
#[derive(Debug)]
pub struct Connected {
    server: Arc<ServerContext>,
    /// The connection's number, from 1.
    pub id: u64,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.server.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Debug messages of the layers (`nbdkit_debug`): the layers log from
/// places no server context reaches (blocking threads, handles deep in a
/// stack), so their switch is process-wide, as a `log` crate logger is;
/// the binary sets it from the same `-v` as the server context.
static LAYER_VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turn the layers' debug messages (`-v`) on or off.
pub fn set_verbose(v: bool) {
    LAYER_VERBOSE.store(v, Ordering::Relaxed);
}

/// Are the layers' debug messages on?
pub fn verbose() -> bool {
    LAYER_VERBOSE.load(Ordering::Relaxed)
}

/// Print a plugin's or filter's debug message on stderr when `-v` is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::server::verbose() {
            $crate::elog!("nbdkit: debug: {}", format_args!($($arg)*));
        }
    };
}

/// Why a connection ended early (for debug messages only).
#[derive(Debug)]
enum Close {
    /// The socket failed or hit EOF.
    Io(std::io::Error),
    /// The client broke the protocol in a way we cannot answer.
    Protocol(String),
    /// The client aborted or disconnected cleanly.
    Done,
}

impl From<std::io::Error> for Close {
    fn from(e: std::io::Error) -> Self {
        Close::Io(e)
    }
}

/// A connection's writing half, shared by the tasks that reply.
type Writer<W> = Arc<tokio::sync::Mutex<BufWriter<W>>>;

/// A connection's reading half, plain or TLS.
type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// A connection's writing half, plain or TLS.
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Bytes a connection's writer gathers before writing to the socket.
const WRITE_BUFFER: usize = 256 * 1024;

/// What the negotiation chose, carried into transmission.
struct Negotiated {
    handle: Arc<dyn Handle>,
    flags: u16,
    size: u64,
    /// Structured replies or extended headers were negotiated: replies
    /// are chunks.
    structured: bool,
    /// Extended headers were negotiated: 32-byte requests and replies.
    extended: bool,
    base_allocation: Option<u32>,
    /// The plugin's other meta contexts selected, with their ids.
    contexts: Vec<(u32, String)>,
    /// The export opened: the default export's own name when the client
    /// asked for "" (NBD_INFO_NAME tells it, as nbdkit does).
    export_name: String,
    /// Set by a layer that wants this connection dropped.
    disconnect: crate::backend::Disconnect,
}

/// Buffer for reading requests: room for many request headers per read
/// call, small enough that a write's payload is read straight into its
/// own buffer once the buffered bytes are used up (with a buffer as large
/// as the payload, most of every payload went through it: an extra copy
/// of all data written, 20% of the CPU of a file -> memory copy).
const REQUEST_BUFFER: usize = 4 * 1024;

/// Who a client is: its TCP address, or a Unix socket client's
/// credentials (neither for `-s` on a pipe).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// A TCP client's address.
    pub addr: Option<SocketAddr>,
    /// A Unix socket client's credentials.
    pub cred: Option<crate::backend::PeerCred>,
}

/// Serve one client on a reader and a writer (a socket's halves, or
/// stdin/stdout for `-s`). Returns when the client disconnects.
pub async fn serve<R, W>(cfg: Arc<ServerConfig>, reader: R, writer: W, peer: Peer)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = cfg.server.connect();
    let id = conn.id;
    let server = &cfg.server;
    server.debug(format_args!("connection {id} opened"));
    let reader = BufReader::with_capacity(REQUEST_BUFFER, Box::new(reader) as BoxRead);
    let writer: Writer<BoxWrite> = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        WRITE_BUFFER,
        Box::new(writer),
    )));
    let r = async {
        if let Err(e) = cfg.stack.preconnect(cfg.server.readonly()).await {
            return Err(Close::Protocol(format!("preconnect: {}", e.msg)));
        }
        let handshake = negotiate(&cfg, reader, writer, peer, id);
        let (neg, reader, writer) = match cfg.handshake_timeout {
            None => handshake.await?,
            Some(t) => tokio::time::timeout(t, handshake).await.map_err(|_| {
                Close::Protocol(format!(
                    "handshake not completed within {} seconds (--timeout)",
                    t.as_secs()
                ))
            })??,
        };
        let r = transmission::transmission(&cfg, reader, writer.clone(), neg).await;
        // The end of a TLS session (close_notify), or of our side of the
        // socket.
        // Bounded: a client that stopped reading must not hold us.
        let mut w = writer.lock().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), w.shutdown()).await;
        r
    }
    .await;
    match r {
        Ok(()) | Err(Close::Done) => server.debug(format_args!("connection {id} closed")),
        Err(Close::Io(e)) => server.debug(format_args!("connection {id}: {e}")),
        Err(Close::Protocol(m)) => crate::elog!("nbdkit: connection {id}: {m}"),
    }
    drop(conn);
}

/// The handshake: greeting, options, and TLS when the client starts it;
/// the export chosen and the (maybe now TLS) reader and writer.
async fn negotiate(
    cfg: &Arc<ServerConfig>,
    mut reader: BufReader<BoxRead>,
    mut writer: Writer<BoxWrite>,
    peer: Peer,
    id: u64,
) -> Result<(Negotiated, BufReader<BoxRead>, Writer<BoxWrite>), Close> {
    let mut st = handshake::greet(&mut reader, &writer).await?;
    loop {
        match handshake::options(cfg, &mut reader, &writer, &peer, id, &mut st).await? {
            handshake::Outcome::Go(neg) => return Ok((neg, reader, writer)),
            handshake::Outcome::StartTls(tls) => {
                // Bytes the client sent past STARTTLS belong to the TLS
                // handshake.
                let early = std::io::Cursor::new(reader.buffer().to_vec());
                let r = reader.into_inner();
                let w = Arc::try_unwrap(writer)
                    .map_err(|_| Close::Protocol("internal error: writer still shared".into()))?
                    .into_inner()
                    .into_inner();
                let io: BoxIo = Box::new(Joined {
                    reader: early.chain(r),
                    writer: w,
                });
                let s = tls
                    .accept(io)
                    .await
                    .map_err(|e| Close::Protocol(format!("TLS handshake failed: {e}")))?;
                cfg.server
                    .debug(format_args!("connection {id}: TLS handshake completed"));
                st.tls_started();
                let (r, w) = tokio::io::split(s);
                reader = BufReader::with_capacity(REQUEST_BUFFER, Box::new(r));
                writer = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
                    WRITE_BUFFER,
                    Box::new(w),
                )));
            }
        }
    }
}
