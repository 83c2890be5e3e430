//! The server framework: the fixed-newstyle handshake, option
//! negotiation, and the transmission loop that runs a connection's
//! requests concurrently and writes each reply as it completes.
//!
//! Everything the client sends is checked: a bad magic or an oversized
//! option closes the connection, a bad request gets the error the
//! protocol prescribes, and one connection's failure never touches the
//! others.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Notify, Semaphore};

use crate::backend::{
    Cache, Disconnect, Error, Extents, Flags, Fua, Handle, OpenContext, Stack, ThreadModel,
};
use crate::protocol::{self as p, cmd, cmdflag, errno, info, opt, rep, tflags};

/// Server-wide settings shared by every connection.
pub struct ServerConfig {
    /// The plugin and its filters.
    pub stack: Stack,
    /// `-r`: serve every export read-only.
    pub readonly: bool,
    /// Offer structured replies (`--no-sr` turns them off).
    pub structured_replies: bool,
    /// Offer meta contexts (`--no-mc` turns them off).
    pub meta_contexts: bool,
    /// Requests of one connection handled at once (`-t`).
    pub threads: usize,
    /// Bytes of request and reply buffers one connection may hold at once,
    /// so a client flooding large writes cannot grow the server unbounded.
    pub max_inflight_bytes: usize,
}

impl ServerConfig {
    /// Defaults as nbdkit's for a stack.
    pub fn new(stack: Stack) -> Self {
        ServerConfig {
            stack,
            readonly: false,
            structured_replies: true,
            meta_contexts: true,
            threads: 16,
            max_inflight_bytes: 2 * p::MAX_REQUEST_SIZE as usize,
        }
    }
}

static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turn debug messages (`-v`) on or off.
pub fn set_verbose(v: bool) {
    VERBOSE.store(v, Ordering::Relaxed);
}

/// Are debug messages on?
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Print a debug message on stderr when `-v` is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::server::verbose() {
            eprintln!("nbdkit: debug: {}", format_args!($($arg)*));
        }
    };
}

/// Connections open now (for `exitlast` and the like).
pub static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static SHUTDOWN: Notify = Notify::const_new();
static SHUTTING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ask the server to stop accepting and exit (filters like `exitlast`).
pub fn request_shutdown() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    SHUTDOWN.notify_waiters();
}

/// Resolves when [`request_shutdown`] has been called.
pub async fn shutdown_requested() {
    loop {
        // Register interest before checking the flag, or a shutdown
        // between the check and the await would be missed.
        let n = SHUTDOWN.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if SHUTTING_DOWN.load(Ordering::SeqCst) {
            return;
        }
        n.await;
    }
}

/// Has a shutdown been requested?
pub fn is_shutting_down() -> bool {
    SHUTTING_DOWN.load(Ordering::SeqCst)
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

type Writer<W> = Arc<tokio::sync::Mutex<BufWriter<W>>>;

/// What the negotiation chose, carried into transmission.
struct Negotiated {
    handle: Arc<dyn Handle>,
    flags: u16,
    size: u64,
    structured: bool,
    base_allocation: Option<u32>,
    /// The export opened: the default export's own name when the client
    /// asked for "" (NBD_INFO_NAME tells it, as nbdkit does).
    export_name: String,
    /// Set by a layer that wants this connection dropped.
    disconnect: Disconnect,
}

/// Per-connection option state.
struct OptState {
    structured: bool,
    no_zeroes: bool,
    /// Context id of `base:allocation` if the client selected it.
    base_allocation: Option<u32>,
}

/// Context id we give `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;
/// Buffer for reading requests: room for many request headers per read
/// call, small enough that a write's payload is read straight into its
/// own buffer once the buffered bytes are used up (with a buffer as large
/// as the payload, most of every payload went through it: an extra copy
/// of all data written, 20% of the CPU of a file -> memory copy).
const REQUEST_BUFFER: usize = 4 * 1024;

/// Serve one client on a reader and a writer (a socket's halves, or
/// stdin/stdout for `-s`). Returns when the client disconnects.
pub async fn serve<R, W>(cfg: Arc<ServerConfig>, reader: R, writer: W, peer: Option<SocketAddr>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    CONNECTIONS.fetch_add(1, Ordering::SeqCst);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    crate::debug!("connection {id} opened");
    let mut reader = BufReader::with_capacity(REQUEST_BUFFER, reader);
    let writer: Writer<W> = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        256 * 1024,
        writer,
    )));
    let r = async {
        let neg = handshake(&cfg, &mut reader, &writer, peer, id).await?;
        transmission(&cfg, reader, writer.clone(), neg).await
    }
    .await;
    match r {
        Ok(()) | Err(Close::Done) => crate::debug!("connection {id} closed"),
        Err(Close::Io(e)) => crate::debug!("connection {id}: {e}"),
        Err(Close::Protocol(m)) => eprintln!("nbdkit: connection {id}: {m}"),
    }
    CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
}

async fn send_reply<W: AsyncWrite + Unpin>(
    w: &Writer<W>,
    option: u32,
    reply: u32,
    payload: &[u8],
) -> Result<(), Close> {
    let mut w = w.lock().await;
    w.write_all(&p::option_reply_header(option, reply, payload.len() as u32))
        .await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

async fn send_error<W: AsyncWrite + Unpin>(
    w: &Writer<W>,
    option: u32,
    reply: u32,
    msg: &str,
) -> Result<(), Close> {
    crate::debug!("{}: {msg}", opt::name(option));
    send_reply(w, option, reply, msg.as_bytes()).await
}

async fn handshake<R, W>(
    cfg: &Arc<ServerConfig>,
    r: &mut R,
    w: &Writer<W>,
    peer: Option<SocketAddr>,
    id: u64,
) -> Result<Negotiated, Close>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    {
        let mut w = w.lock().await;
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&p::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes());
        w.write_all(&hello).await?;
        w.flush().await?;
    }
    let cflags = r.read_u32().await?;
    if cflags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES) != 0 {
        return Err(Close::Protocol(format!(
            "client sent unknown handshake flags {cflags:#x}"
        )));
    }
    let mut st = OptState {
        structured: false,
        no_zeroes: cflags & p::FLAG_C_NO_ZEROES != 0,
        base_allocation: None,
    };
    let mut count = 0u32;
    loop {
        count += 1;
        if count > 1000 {
            return Err(Close::Protocol("too many options".into()));
        }
        let magic = r.read_u64().await?;
        if magic != p::IHAVEOPT {
            return Err(Close::Protocol(format!(
                "client sent bad option magic {magic:#x}"
            )));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > p::MAX_OPTION_LEN {
            return Err(Close::Protocol(format!(
                "client sent {} with oversized payload ({len} bytes)",
                opt::name(option)
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        crate::debug!(
            "connection {id}: option {} ({len} bytes)",
            opt::name(option)
        );
        match option {
            opt::EXPORT_NAME => {
                let name = match String::from_utf8(data) {
                    Ok(n) if n.len() <= p::MAX_STRING => n,
                    _ => return Err(Close::Protocol("bad export name".into())),
                };
                let neg = match open_export(cfg, &name, peer, id, &st).await {
                    Ok(n) => n,
                    Err(e) => {
                        return Err(Close::Protocol(format!(
                            "cannot open export '{name}': {}",
                            e.msg
                        )))
                    }
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&neg.size.to_be_bytes());
                out.extend_from_slice(&neg.flags.to_be_bytes());
                if !st.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                let mut w = w.lock().await;
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(neg);
            }
            opt::ABORT => {
                // Best effort: the client may already be gone.
                let _ = send_reply(w, option, rep::ACK, &[]).await;
                return Err(Close::Done);
            }
            opt::LIST => {
                if !data.is_empty() {
                    send_error(w, option, rep::ERR_INVALID, "LIST takes no payload").await?;
                    continue;
                }
                match cfg.stack.top().list_exports(cfg.readonly).await {
                    Ok(list) => {
                        for e in list {
                            let mut pl = Vec::new();
                            p::put_string32(&mut pl, &e.name);
                            if let Some(d) = &e.description {
                                pl.extend_from_slice(d.as_bytes());
                            }
                            send_reply(w, option, rep::SERVER, &pl).await?;
                        }
                        send_reply(w, option, rep::ACK, &[]).await?;
                    }
                    Err(e) => send_error(w, option, rep::ERR_PLATFORM, &e.msg).await?,
                }
            }
            opt::STARTTLS => {
                send_error(
                    w,
                    option,
                    rep::ERR_UNSUP,
                    "TLS is not enabled on this server",
                )
                .await?
            }
            opt::INFO | opt::GO => {
                let mut rd = p::Reader::new(&data);
                let parsed = (|| {
                    let name = rd.string32()?;
                    let n = rd.u16()? as usize;
                    let mut reqs = Vec::with_capacity(n);
                    for _ in 0..n {
                        reqs.push(rd.u16()?);
                    }
                    if rd.remaining() != 0 {
                        return None;
                    }
                    Some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    send_error(w, option, rep::ERR_INVALID, "malformed INFO/GO request").await?;
                    continue;
                };
                let neg = match open_export(cfg, &name, peer, id, &st).await {
                    Ok(n) => n,
                    Err(e) => {
                        let code = if e.errno == errno::EPERM {
                            rep::ERR_POLICY
                        } else {
                            rep::ERR_UNKNOWN
                        };
                        send_error(w, option, code, &format!("{name}: {}", e.msg)).await?;
                        continue;
                    }
                };
                send_info(w, option, &reqs, &neg).await?;
                send_reply(w, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    return Ok(neg);
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        w,
                        option,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no payload",
                    )
                    .await?;
                } else if !cfg.structured_replies {
                    send_error(w, option, rep::ERR_UNSUP, "structured replies are disabled")
                        .await?;
                } else {
                    st.structured = true;
                    send_reply(w, option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(cfg, w, option, &data, &mut st).await?;
            }
            _ => {
                send_error(
                    w,
                    option,
                    rep::ERR_UNSUP,
                    &format!("option {option} ({}) not supported", opt::name(option)),
                )
                .await?
            }
        }
    }
}

async fn meta_context<W: AsyncWrite + Unpin>(
    cfg: &Arc<ServerConfig>,
    w: &Writer<W>,
    option: u32,
    data: &[u8],
    st: &mut OptState,
) -> Result<(), Close> {
    if !cfg.meta_contexts {
        return send_error(w, option, rep::ERR_UNSUP, "meta contexts are disabled").await;
    }
    if !st.structured {
        return send_error(
            w,
            option,
            rep::ERR_INVALID,
            "meta contexts need structured replies first",
        )
        .await;
    }
    let mut rd = p::Reader::new(data);
    let parsed = (|| {
        let _export = rd.string32()?;
        let n = rd.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(rd.string32()?);
        }
        if rd.remaining() != 0 {
            return None;
        }
        Some(queries)
    })();
    let Some(queries) = parsed else {
        return send_error(
            w,
            option,
            rep::ERR_INVALID,
            "malformed meta context request",
        )
        .await;
    };
    let set = option == opt::SET_META_CONTEXT;
    let wanted = if set {
        queries.iter().any(|q| q == p::CONTEXT_BASE_ALLOCATION)
    } else {
        queries.is_empty()
            || queries
                .iter()
                .any(|q| q == "base:" || q == p::CONTEXT_BASE_ALLOCATION)
    };
    if set {
        st.base_allocation = wanted.then_some(BASE_ALLOCATION_ID);
    }
    if wanted {
        let mut pl = Vec::new();
        pl.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        pl.extend_from_slice(p::CONTEXT_BASE_ALLOCATION.as_bytes());
        send_reply(w, option, rep::META_CONTEXT, &pl).await?;
    }
    send_reply(w, option, rep::ACK, &[]).await
}

async fn send_info<W: AsyncWrite + Unpin>(
    w: &Writer<W>,
    option: u32,
    reqs: &[u16],
    neg: &Negotiated,
) -> Result<(), Close> {
    send_reply(w, option, rep::INFO, &p::info_export(neg.size, neg.flags)).await?;
    if reqs.contains(&info::NAME) {
        let name = p::info_string(info::NAME, &neg.export_name);
        send_reply(w, option, rep::INFO, &name).await?;
    }
    if reqs.contains(&info::DESCRIPTION) {
        if let Some(d) = neg.handle.export_description() {
            send_reply(w, option, rep::INFO, &p::info_string(info::DESCRIPTION, &d)).await?;
        }
    }
    if let Ok(Some(bs)) = neg.handle.block_size() {
        send_reply(
            w,
            option,
            rep::INFO,
            &p::info_block_size(bs.minimum, bs.preferred, bs.maximum),
        )
        .await?;
    }
    Ok(())
}

/// Open the stack for an export and compute the transmission flags.
async fn open_export(
    cfg: &Arc<ServerConfig>,
    name: &str,
    peer: Option<SocketAddr>,
    id: u64,
    st: &OptState,
) -> Result<Negotiated, Error> {
    let export_name = if name.is_empty() {
        cfg.stack.top().default_export()
    } else {
        name.to_string()
    };
    let ctx = OpenContext {
        readonly: cfg.readonly,
        export_name,
        default_export: name.is_empty(),
        peer,
        tls: false,
        id,
        disconnect: Disconnect::default(),
    };
    let h: Arc<dyn Handle> = Arc::from(cfg.stack.open(&ctx).await?);
    let size = h.size()?;
    let caps = h.caps()?;
    let write = !cfg.readonly && caps.write;
    let mut flags = tflags::HAS_FLAGS | tflags::SEND_DF;
    for (on, flag) in [
        (!write, tflags::READ_ONLY),
        (caps.flush, tflags::SEND_FLUSH),
        (write && caps.fua != Fua::None, tflags::SEND_FUA),
        (caps.rotational, tflags::ROTATIONAL),
        (write && caps.trim, tflags::SEND_TRIM),
        (write && caps.zero, tflags::SEND_WRITE_ZEROES),
        (write && caps.zero && caps.fast_zero, tflags::SEND_FAST_ZERO),
        // One client at a time cannot share anything (as nbdkit).
        (
            caps.multi_conn && cfg.stack.thread_model() > ThreadModel::SerializeConnections,
            tflags::CAN_MULTI_CONN,
        ),
        (caps.cache != Cache::None, tflags::SEND_CACHE),
    ] {
        if on {
            flags |= flag;
        }
    }
    Ok(Negotiated {
        handle: h,
        flags,
        size,
        structured: st.structured,
        base_allocation: st.base_allocation,
        export_name: ctx.export_name,
        disconnect: ctx.disconnect,
    })
}

/// A read buffer pool, so steady-state reads do not allocate.
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self.free.lock().unwrap().pop().unwrap_or_default();
        // The bytes are overwritten by the plugin but must be initialised;
        // a recycled buffer keeps its old contents, so only growth is
        // zeroed.
        b.resize(len, 0);
        b
    }
    fn put(&self, b: Vec<u8>) {
        let mut free = self.free.lock().unwrap();
        if free.len() < 16 && b.capacity() <= 8 * 1024 * 1024 {
            free.push(b);
        }
    }
}

/// Check a request and say which error it earns, if any.
fn validate(req: &p::Request, neg: &Negotiated) -> Result<(), u32> {
    let f = req.flags;
    let write = neg.flags & tflags::READ_ONLY == 0;
    let allowed = match req.typ {
        cmd::READ => cmdflag::DF,
        cmd::WRITE | cmd::TRIM => cmdflag::FUA,
        cmd::WRITE_ZEROES => cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmdflag::REQ_ONE,
        cmd::FLUSH | cmd::CACHE => 0,
        _ => return Err(errno::EINVAL),
    };
    if f & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    if f & cmdflag::FUA != 0 && neg.flags & tflags::SEND_FUA == 0 {
        return Err(errno::EINVAL);
    }
    if f & cmdflag::FAST_ZERO != 0 && neg.flags & tflags::SEND_FAST_ZERO == 0 {
        return Err(errno::EINVAL);
    }
    if f & cmdflag::DF != 0 && !neg.structured {
        return Err(errno::EINVAL);
    }
    let needs = |flag: u16| {
        if neg.flags & flag == 0 {
            Err(errno::EINVAL)
        } else {
            Ok(())
        }
    };
    match req.typ {
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if !write => return Err(errno::EPERM),
        cmd::TRIM => needs(tflags::SEND_TRIM)?,
        cmd::WRITE_ZEROES => needs(tflags::SEND_WRITE_ZEROES)?,
        cmd::FLUSH => needs(tflags::SEND_FLUSH)?,
        cmd::CACHE => needs(tflags::SEND_CACHE)?,
        cmd::BLOCK_STATUS if neg.base_allocation.is_none() => return Err(errno::EINVAL),
        _ => {}
    }
    if req.typ == cmd::FLUSH {
        // Offset and count of flush must be zero, but be lenient as nbdkit is.
        return Ok(());
    }
    if req.count == 0 {
        return Err(errno::EINVAL);
    }
    if matches!(req.typ, cmd::READ | cmd::WRITE) && req.count > p::MAX_REQUEST_SIZE {
        return Err(if req.typ == cmd::READ && f & cmdflag::DF != 0 {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        });
    }
    let end = req.offset.checked_add(req.count as u64);
    if end.is_none_or(|e| e > neg.size) {
        return Err(match req.typ {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        });
    }
    Ok(())
}

fn to_flags(req: &p::Request) -> Flags {
    let mut f = Flags::NONE;
    if req.flags & cmdflag::FUA != 0 {
        f = f | Flags::FUA;
    }
    if req.typ == cmd::WRITE_ZEROES && req.flags & cmdflag::NO_HOLE == 0 {
        f = f | Flags::MAY_TRIM;
    }
    if req.flags & cmdflag::REQ_ONE != 0 {
        f = f | Flags::REQ_ONE;
    }
    if req.flags & cmdflag::FAST_ZERO != 0 {
        f = f | Flags::FAST_ZERO;
    }
    f
}

async fn transmission<R, W>(
    cfg: &Arc<ServerConfig>,
    mut r: BufReader<R>,
    w: Writer<W>,
    neg: Negotiated,
) -> Result<(), Close>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let neg = Arc::new(neg);
    let pool = Arc::new(BufPool::default());
    // Budget in KiB units: bounds the memory held by requests in flight.
    let budget_units = (cfg.max_inflight_bytes / 1024).max(p::MAX_REQUEST_SIZE as usize / 1024);
    let budget = Arc::new(Semaphore::new(budget_units));
    let slots = Arc::new(Semaphore::new(cfg.threads.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let result = loop {
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; p::REQUEST_LEN];
        tokio::select! {
            r = r.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Err(Close::Done)
                    } else {
                        Err(Close::Io(e))
                    };
                }
            }
            _ = shutdown_requested() => break Err(Close::Done),
            _ = neg.disconnect.requested() => break Err(Close::Done),
        }
        let Some(req) = p::Request::decode(&hdr) else {
            break Err(Close::Protocol(
                "client sent a request with bad magic".into(),
            ));
        };
        crate::debug!(
            "{} flags={:#x} offset={} count={}",
            cmd::name(req.typ),
            req.flags,
            req.offset,
            req.count
        );
        if req.typ == cmd::DISC {
            break Ok(());
        }
        let verdict = validate(&req, &neg);
        let mut payload = None;
        let units = if matches!(req.typ, cmd::READ | cmd::WRITE) {
            (req.count as usize).min(p::MAX_REQUEST_SIZE as usize) / 1024 + 1
        } else {
            1
        };
        let permit = budget
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .expect("semaphore never closed");
        if req.typ == cmd::WRITE {
            // The payload follows the header whatever we think of the
            // request; consume it to stay in sync.
            if verdict.is_ok() {
                let mut buf = pool.get(req.count as usize);
                r.read_exact(&mut buf).await?;
                payload = Some(buf);
            } else {
                let mut left = req.count as u64;
                let mut junk = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = left.min(junk.len() as u64) as usize;
                    r.read_exact(&mut junk[..n]).await?;
                    left -= n as u64;
                }
            }
        }
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (w, neg, pool) = (w.clone(), neg.clone(), pool.clone());
        tasks.spawn(async move {
            let res = match verdict {
                Err(e) => Reply::Error(Error::new(e, "invalid request")),
                Ok(()) => run_request(&req, &neg, payload, &pool).await,
            };
            let r = write_reply(&w, &req, &neg, res, &pool).await;
            drop(slot);
            drop(permit);
            r
        });
    };
    // Let requests in flight finish and reply before closing.
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            crate::debug!("writing reply: {e}");
        }
    }
    let _ = w.lock().await.flush().await;
    result
}

/// The outcome of a request, ready to be written.
enum Reply {
    /// Success with no payload.
    Ok,
    /// Read data.
    Data(ReadData),
    /// Block status extents.
    Extents(Vec<crate::backend::Extent>),
    /// Failure.
    Error(Error),
}

/// Read data: a pooled buffer the plugin filled, or data a layer held.
enum ReadData {
    Pooled(Vec<u8>),
    Shared(crate::backend::SharedData),
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Pooled(b) => b,
            ReadData::Shared(s) => s,
        }
    }
}

impl ReadData {
    /// Done with: a pooled buffer goes back to the pool.
    fn recycle(self, pool: &BufPool) {
        if let ReadData::Pooled(b) = self {
            pool.put(b);
        }
    }
}

async fn run_request(
    req: &p::Request,
    neg: &Negotiated,
    payload: Option<Vec<u8>>,
    pool: &BufPool,
) -> Reply {
    let h = &*neg.handle;
    let flags = to_flags(req);
    let count = req.count as u64;
    let r = match req.typ {
        cmd::READ => {
            match h.pread_shared(req.count, req.offset, flags).await {
                Ok(Some(s)) if s.len() == req.count as usize => {
                    return Reply::Data(ReadData::Shared(s))
                }
                Ok(Some(_)) => return Reply::Error(Error::eio("shared read of the wrong length")),
                Ok(None) => {}
                Err(e) => return Reply::Error(e),
            }
            let mut buf = pool.get(req.count as usize);
            match h.pread(&mut buf, req.offset, flags).await {
                Ok(()) => return Reply::Data(ReadData::Pooled(buf)),
                Err(e) => {
                    pool.put(buf);
                    Err(e)
                }
            }
        }
        cmd::WRITE => {
            let buf = payload.expect("write has payload");
            let r = h.pwrite(&buf, req.offset, flags).await;
            pool.put(buf);
            r
        }
        cmd::FLUSH => h.flush(Flags::NONE).await,
        cmd::TRIM => h.trim(count, req.offset, flags).await,
        cmd::WRITE_ZEROES => h.zero(count, req.offset, flags).await,
        cmd::CACHE => h.cache(count, req.offset, flags).await,
        cmd::BLOCK_STATUS => {
            let mut ext = Extents::new(req.offset, req.offset + count);
            match h.extents(count, req.offset, flags, &mut ext).await {
                Ok(()) if ext.list().is_empty() => {
                    Err(Error::eio("extents callback returned no extents"))
                }
                Ok(()) => {
                    let mut list = ext.into_list();
                    if flags.contains(Flags::REQ_ONE) {
                        list.truncate(1);
                    }
                    return Reply::Extents(list);
                }
                Err(e) => Err(e),
            }
        }
        _ => Err(Error::einval("unknown command")),
    };
    match r {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::Error(e),
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &Writer<W>,
    req: &p::Request,
    neg: &Negotiated,
    res: Reply,
    pool: &BufPool,
) -> std::io::Result<()> {
    if neg.disconnect.is_requested() {
        // A layer dropped the connection: no more replies.
        return Ok(());
    }
    if let Reply::Error(e) = &res {
        if e.msg != "invalid request" {
            eprintln!("nbdkit: {}: {}", cmd::name(req.typ).to_lowercase(), e.msg);
        } else {
            crate::debug!(
                "{}: invalid request: {}",
                cmd::name(req.typ),
                errno::describe(e.errno)
            );
        }
    }
    let mut w = w.lock().await;
    let c = req.cookie;
    if !neg.structured {
        match res {
            Reply::Error(e) => w.write_all(&p::simple_reply(c, e.errno)).await?,
            Reply::Data(buf) => {
                write_two(&mut *w, &p::simple_reply(c, 0), &buf).await?;
                buf.recycle(pool);
            }
            Reply::Ok | Reply::Extents(_) => w.write_all(&p::simple_reply(c, 0)).await?,
        }
        return w.flush().await;
    }
    use p::reply as r;
    match res {
        Reply::Ok => {
            w.write_all(&p::structured_reply(c, r::FLAG_DONE, r::TYPE_NONE, 0))
                .await?
        }
        Reply::Data(buf) if req.flags & cmdflag::DF != 0 => {
            write_data_chunks(&mut *w, c, req.offset, &buf, &[]).await?;
            buf.recycle(pool);
        }
        Reply::Data(buf) => {
            let runs = hole_runs(&buf, req.offset);
            write_data_chunks(&mut *w, c, req.offset, &buf, &runs).await?;
            buf.recycle(pool);
        }
        Reply::Extents(list) => {
            let id = neg.base_allocation.unwrap_or(BASE_ALLOCATION_ID);
            let mut pl = Vec::with_capacity(4 + 8 * list.len());
            pl.extend_from_slice(&id.to_be_bytes());
            for e in &list {
                pl.extend_from_slice(&(e.length.min(u32::MAX as u64) as u32).to_be_bytes());
                pl.extend_from_slice(&e.flags.to_be_bytes());
            }
            w.write_all(&p::structured_reply(
                c,
                r::FLAG_DONE,
                r::TYPE_BLOCK_STATUS,
                pl.len() as u32,
            ))
            .await?;
            w.write_all(&pl).await?;
        }
        Reply::Error(e) => {
            let msg = e.msg.as_bytes();
            let msg = &msg[..msg.len().min(1024)];
            let mut pl = Vec::with_capacity(6 + msg.len());
            pl.extend_from_slice(&e.errno.to_be_bytes());
            pl.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            pl.extend_from_slice(msg);
            w.write_all(&p::structured_reply(
                c,
                r::FLAG_DONE,
                r::TYPE_ERROR,
                pl.len() as u32,
            ))
            .await?;
            w.write_all(&pl).await?;
        }
    }
    w.flush().await
}

/// Zero runs shorter than this travel as data: a hole chunk costs a
/// 32-byte header and the client a `memset`, data costs a copy on each
/// side of the socket.
const HOLE_MIN: usize = 64 * 1024;

/// The ranges of a read reply's data that are zeroes worth sending as
/// holes: whole 4 KiB blocks of the device, in runs of at least
/// [`HOLE_MIN`] bytes. Mostly-data buffers cost a look at the first bytes
/// of each block; zeroes found save copying them through the socket
/// (a decompressed disk image is often a third free space).
fn hole_runs(buf: &[u8], offset: u64) -> Vec<std::ops::Range<usize>> {
    if buf.len() < HOLE_MIN {
        return Vec::new();
    }
    crate::zeroes::runs(buf, offset, 4096)
        .into_iter()
        .filter(|r| r.zero && r.range.len() >= HOLE_MIN)
        .map(|r| r.range)
        .collect()
}

/// Write a structured read reply: `buf` (the data at `offset`) as
/// `OFFSET_DATA` chunks, except the ranges in `holes` (sorted, disjoint)
/// which go as `OFFSET_HOLE` chunks; the last chunk carries `DONE`. All of
/// it in as few `writev` calls as the socket allows.
async fn write_data_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    cookie: u64,
    offset: u64,
    buf: &[u8],
    holes: &[std::ops::Range<usize>],
) -> std::io::Result<()> {
    use p::reply as r;
    // (range, is hole) in order.
    let mut parts = Vec::with_capacity(2 * holes.len() + 1);
    let mut at = 0;
    for h in holes {
        if h.start > at {
            parts.push((at..h.start, false));
        }
        parts.push((h.clone(), true));
        at = h.end;
    }
    if at < buf.len() || parts.is_empty() {
        parts.push((at..buf.len(), false));
    }
    const HDR: usize = p::STRUCTURED_REPLY_LEN + 12;
    let mut headers = vec![[0u8; HDR]; parts.len()];
    let mut lens = Vec::with_capacity(parts.len());
    for (i, ((range, hole), h)) in parts.iter().zip(headers.iter_mut()).enumerate() {
        let flags = if i + 1 == parts.len() {
            r::FLAG_DONE
        } else {
            0
        };
        let (typ, len) = match hole {
            true => (r::TYPE_OFFSET_HOLE, 12),
            false => (r::TYPE_OFFSET_DATA, 8 + range.len() as u32),
        };
        h[..p::STRUCTURED_REPLY_LEN].copy_from_slice(&p::structured_reply(cookie, flags, typ, len));
        h[p::STRUCTURED_REPLY_LEN..][..8]
            .copy_from_slice(&(offset + range.start as u64).to_be_bytes());
        h[p::STRUCTURED_REPLY_LEN + 8..].copy_from_slice(&(range.len() as u32).to_be_bytes());
        lens.push(if *hole { HDR } else { HDR - 4 });
    }
    let mut slices = Vec::with_capacity(2 * parts.len());
    for (((range, hole), h), n) in parts.iter().zip(&headers).zip(lens) {
        slices.push(std::io::IoSlice::new(&h[..n]));
        if !hole {
            slices.push(std::io::IoSlice::new(&buf[range.clone()]));
        }
    }
    write_all_vectored(w, &mut slices).await
}

/// Write a reply header and its data, in one `writev` when the socket
/// takes it all (large data bypasses the `BufWriter`'s buffer).
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    write_all_vectored(w, &mut [std::io::IoSlice::new(a), std::io::IoSlice::new(b)]).await
}

/// Write all of `bufs`, as many of them per `writev` as the system takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(&bufs[..bufs.len().min(1024)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}
