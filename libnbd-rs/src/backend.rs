//! The plugin and filter contract, mirroring nbdkit's callbacks.
//!
//! A [`Plugin`] is configured once from `key=value` parameters and opens
//! one [`Handle`] per client connection. A [`Filter`] opens its own
//! handle around the handle of the next layer (`next`); every [`Handle`]
//! method has a default that passes the call to `next` when there is one,
//! so a filter overrides only what it changes, and a plugin (which has no
//! `next`) gets conservative defaults: read-only, no flush, no trim, no
//! extents. The server puts [`Emulated`] over the plugin's handle, which
//! fills the gaps nbdkit's server fills: zero by writing zeroes, FUA by
//! flushing, cache by reading, extents as "all data".

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::protocol::{alloc, errno};
use crate::server::ServerContext;

/// An error from a plugin or filter: an NBD errno for the client and a
/// message for the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    /// The error sent to the client (`protocol::errno`).
    pub errno: u32,
    /// What went wrong, for the server's log or a tool's stderr.
    pub msg: String,
}

impl Error {
    /// An error with a given wire errno.
    pub fn new(errno: u32, msg: impl Into<String>) -> Self {
        Error {
            errno,
            msg: msg.into(),
        }
    }
    /// EIO.
    pub fn eio(msg: impl Into<String>) -> Self {
        Self::new(errno::EIO, msg)
    }
    /// EINVAL.
    pub fn einval(msg: impl Into<String>) -> Self {
        Self::new(errno::EINVAL, msg)
    }
    /// EPERM.
    pub fn eperm(msg: impl Into<String>) -> Self {
        Self::new(errno::EPERM, msg)
    }
    /// ENOTSUP.
    pub fn enotsup(msg: impl Into<String>) -> Self {
        Self::new(errno::ENOTSUP, msg)
    }
    /// ENOSPC.
    pub fn enospc(msg: impl Into<String>) -> Self {
        Self::new(errno::ENOSPC, msg)
    }
    /// ENOMEM.
    pub fn enomem(msg: impl Into<String>) -> Self {
        Self::new(errno::ENOMEM, msg)
    }
    /// An I/O error with its context.
    pub fn io(context: impl fmt::Display, e: std::io::Error) -> Self {
        let code = e.raw_os_error().map(errno::from_host).unwrap_or(errno::EIO);
        Self::new(code, format!("{context}: {e}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let code = e.raw_os_error().map(errno::from_host).unwrap_or(errno::EIO);
        Error::new(code, e.to_string())
    }
}

/// Result of a plugin or filter call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Flags on a data call, as nbdkit's `NBDKIT_FLAG_*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(pub u32);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Zero: the range may be trimmed (the client did not say NO_HOLE).
    pub const MAY_TRIM: Flags = Flags(1 << 0);
    /// Write, zero, trim: force unit access.
    pub const FUA: Flags = Flags(1 << 1);
    /// Extents: only the first extent is wanted.
    pub const REQ_ONE: Flags = Flags(1 << 2);
    /// Zero: fail at once with ENOTSUP unless the zero is fast.
    pub const FAST_ZERO: Flags = Flags(1 << 3);

    /// Are all of `other`'s bits set?
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// These flags without `other`'s bits.
    pub fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
}

/// How a layer supports FUA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fua {
    /// Not at all.
    None,
    /// By a flush after the write (the server or a lower layer does it).
    Emulate,
    /// The layer honours `Flags::FUA` itself.
    Native,
}

/// How a layer supports the cache (prefetch) request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Not advertised.
    None,
    /// By reading and discarding.
    Emulate,
    /// The layer implements `cache` itself.
    Native,
}

/// What a layer can do: the answers to nbdkit's `can_*` questions
/// (and `is_rotational`) in one value, asked once when a connection
/// opens. A plugin answers with a preset adjusted to taste
/// (`Caps { trim: false, ..Caps::FULL }`); a filter takes the next
/// layer's answer and changes what it changes
/// (`Caps { zero: false, ..self.next.caps()? }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// The client may write (the server still honours read-only).
    pub write: bool,
    /// `flush` does something.
    pub flush: bool,
    /// The storage is rotational (a hint to clients).
    pub rotational: bool,
    /// `trim` is supported.
    pub trim: bool,
    /// `zero` is implemented (for a plugin: natively, else the server
    /// emulates it by writes).
    pub zero: bool,
    /// A zero request with `FAST_ZERO` can succeed quickly.
    pub fast_zero: bool,
    /// Extents are meaningful (else everything is reported as data).
    pub extents: bool,
    /// How FUA is supported.
    pub fua: Fua,
    /// Several connections to this export see each other's writes once
    /// flushed.
    pub multi_conn: bool,
    /// How the cache (prefetch) request is supported.
    pub cache: Cache,
}

impl Caps {
    /// Read-only, no flush, trim, zero or extents, not safe for
    /// multi-conn: the conservative default of a plugin.
    pub const READ_ONLY: Caps = Caps {
        write: false,
        flush: false,
        rotational: false,
        trim: false,
        zero: false,
        fast_zero: false,
        extents: false,
        fua: Fua::None,
        multi_conn: false,
        cache: Cache::None,
    };
    /// Everything, natively: writable with flush, trim, zero and fast
    /// zero, extents, native FUA and cache, safe for multi-conn.
    pub const FULL: Caps = Caps {
        write: true,
        flush: true,
        rotational: false,
        trim: true,
        zero: true,
        fast_zero: true,
        extents: true,
        fua: Fua::Native,
        multi_conn: true,
        cache: Cache::Native,
    };
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest I/O, a power of 2 between 1 and 64K.
    pub minimum: u32,
    /// Preferred I/O, a power of 2 at least `minimum`.
    pub preferred: u32,
    /// Largest I/O, a multiple of `minimum`.
    pub maximum: u32,
}

/// How a layer may be called concurrently (reported by `--dump-plugin`),
/// strictest first: the stack runs at the least of its layers' models
/// ([`Stack::thread_model`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadModel {
    /// One connection at a time.
    SerializeConnections,
    /// One request at a time over all connections.
    SerializeAllRequests,
    /// One request at a time per connection.
    SerializeRequests,
    /// Anything in parallel.
    Parallel,
}

impl ThreadModel {
    /// The name nbdkit prints.
    pub fn name(self) -> &'static str {
        match self {
            ThreadModel::SerializeConnections => "serialize_connections",
            ThreadModel::SerializeAllRequests => "serialize_all_requests",
            ThreadModel::SerializeRequests => "serialize_requests",
            ThreadModel::Parallel => "parallel",
        }
    }
}

/// One extent: a range and its `base:allocation` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start in bytes.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// `alloc::HOLE` and/or `alloc::ZERO`.
    pub flags: u32,
}

/// The extents answer being built for one request, over the range
/// `[start, end)`. Layers `add` extents in increasing order; pieces
/// outside the range are clipped, adjacent pieces with equal flags merged.
#[derive(Debug, Clone)]
pub struct Extents {
    start: u64,
    end: u64,
    /// Where the next extent must begin.
    next: u64,
    list: Vec<Extent>,
}

impl Extents {
    /// An empty answer for `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Extents {
            start,
            end,
            next: start,
            list: Vec::new(),
        }
    }
    /// Start of the range asked for.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// End of the range asked for.
    pub fn end(&self) -> u64 {
        self.end
    }
    /// Where the next added extent must begin (the end of the last one).
    pub fn next_offset(&self) -> u64 {
        self.next
    }
    /// Is the whole range covered?
    pub fn is_full(&self) -> bool {
        self.next >= self.end
    }
    /// Add an extent. It must begin at or before `next_offset()` (the part
    /// already covered is dropped) and is clipped to the range.
    pub fn add(&mut self, offset: u64, length: u64, flags: u32) -> Result<()> {
        let end = offset.saturating_add(length);
        if length == 0 || end <= self.next || self.next >= self.end {
            return Ok(());
        }
        if offset > self.next {
            return Err(Error::eio(format!(
                "extents: gap before offset {offset} (expected {})",
                self.next
            )));
        }
        let end = end.min(self.end);
        let offset = self.next;
        match self.list.last_mut() {
            Some(last) if last.flags == flags => last.length += end - offset,
            _ => self.list.push(Extent {
                offset,
                length: end - offset,
                flags,
            }),
        }
        self.next = end;
        Ok(())
    }
    /// The extents so far.
    pub fn list(&self) -> &[Extent] {
        &self.list
    }
    /// Consume into the list.
    pub fn into_list(self) -> Vec<Extent> {
        self.list
    }
}

/// A connection's switch that a layer flips to have the server drop the
/// connection at once, as nbdkit's `nbdkit_disconnect(force)`: no reply
/// is sent to the request that flipped it nor to any later one, and the
/// socket closes. A request's error alone cannot say this, since layers
/// above may retry or rewrap it. Clones share the switch; a default one is
/// watched by nobody (tests, contexts a filter makes for itself).
#[derive(Clone, Default)]
pub struct Disconnect(Arc<DisconnectState>);

#[derive(Default)]
struct DisconnectState {
    requested: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Disconnect {
    /// Ask the server to drop the connection.
    pub fn request(&self) {
        self.0
            .requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
    /// Has a layer asked?
    pub fn is_requested(&self) -> bool {
        self.0.requested.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Resolves once a layer has asked.
    pub async fn requested(&self) {
        loop {
            // Register before looking, or a request in between is missed.
            let n = self.0.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_requested() {
                return;
            }
            n.await;
        }
    }
}

impl fmt::Debug for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Disconnect")
            .field(&self.is_requested())
            .finish()
    }
}

/// Who is at the other end of a Unix domain socket: its credentials
/// (`SO_PEERCRED`) and security label (`SO_PEERSEC`, e.g. SELinux's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCred {
    /// The client's process id.
    pub pid: u32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
    /// Its security label, where the system has labels.
    pub security: Option<String>,
}

impl PeerCred {
    /// The credentials of the peer of Unix socket `fd`; `None` when `fd`
    /// is not a connected Unix socket.
    pub fn of_socket(fd: std::os::fd::RawFd) -> Option<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 || cred.pid <= 0 {
            return None;
        }
        let mut label = vec![0u8; 4096];
        let mut len = label.len() as libc::socklen_t;
        // SAFETY: as above, into `label`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERSEC,
                label.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let security = (r == 0 && len > 0).then(|| {
            label.truncate(len as usize);
            while label.last() == Some(&0) {
                label.pop();
            }
            String::from_utf8_lossy(&label).into_owned()
        });
        Some(PeerCred {
            pid: cred.pid as u32,
            uid: cred.uid,
            gid: cred.gid,
            security,
        })
    }
}

/// Who a connection is, as a layer sees it when opening.
#[derive(Debug, Clone, Default)]
pub struct OpenContext {
    /// The client asked for (or the server forces) read-only.
    pub readonly: bool,
    /// The export name the client chose; when it asked for the default
    /// export (an empty name), the name the stack gives that
    /// ([`Next::default_export`]).
    pub export_name: String,
    /// The client asked for the default export (sent an empty name).
    pub default_export: bool,
    /// The client's address (`ip:port`, or empty for Unix sockets).
    pub peer: Option<std::net::SocketAddr>,
    /// A Unix socket client's credentials.
    pub cred: Option<PeerCred>,
    /// Is the connection using TLS?
    pub tls: bool,
    /// Connection number, from 1, for logs.
    pub id: u64,
    /// Drops this connection when a layer asks (see [`Disconnect`]).
    pub disconnect: Disconnect,
    /// The meta contexts other than `base:allocation` that the client
    /// selected ([`Plugin::meta_contexts`]), which it will ask
    /// [`Handle::meta_extents`] about.
    pub meta_contexts: Vec<String>,
}

/// An export in a listing (`NBD_OPT_LIST`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// The export name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
}

/// A per-connection handle of a plugin or filter. Every method has a
/// default: pass to [`Handle::next`] when there is one (filters), else a
/// conservative answer (plugins).
#[async_trait]
pub trait Handle: Send + Sync {
    /// The next layer, for filters; `None` for plugins.
    fn next(&self) -> Option<&dyn Handle> {
        None
    }
    /// Export size in bytes.
    fn size(&self) -> Result<u64> {
        match self.next() {
            Some(n) => n.size(),
            None => Err(Error::eio("size not implemented")),
        }
    }
    /// Block size constraints, if any.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.next().map_or(Ok(None), |n| n.block_size())
    }
    /// A description of the export for `NBD_INFO_DESCRIPTION`.
    fn export_description(&self) -> Option<String> {
        self.next().and_then(|n| n.export_description())
    }
    /// What this layer can do (see [`Caps`]). Asked once per
    /// connection, when it opens.
    fn caps(&self) -> Result<Caps> {
        self.next().map_or(Ok(Caps::READ_ONLY), |n| n.caps())
    }

    /// Read `count` bytes at `offset` as a part of data this layer
    /// already holds in memory (a cache), for the server to send without
    /// copying it; `Ok(None)` when it does not hold them, and the server
    /// calls [`pread`](Self::pread) instead. Only the outermost layer is
    /// asked, and the default never asks the layer below: a filter that
    /// changes what it reads must not be bypassed.
    async fn pread_shared(
        &self,
        _count: u32,
        _offset: u64,
        _flags: Flags,
    ) -> Result<Option<SharedData>> {
        Ok(None)
    }
    /// Read `buf.len()` bytes at `offset`.
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        match self.next() {
            Some(n) => n.pread(buf, offset, flags).await,
            None => Err(Error::eio("pread not implemented")),
        }
    }
    /// Write `buf` at `offset`.
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        match self.next() {
            Some(n) => n.pwrite(buf, offset, flags).await,
            None => Err(Error::eperm("the export is read-only")),
        }
    }
    /// Flush to stable storage.
    async fn flush(&self, flags: Flags) -> Result<()> {
        match self.next() {
            Some(n) => n.flush(flags).await,
            None => Ok(()),
        }
    }
    /// Discard a range (reads afterwards may return anything).
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.next() {
            Some(n) => n.trim(count, offset, flags).await,
            None => Err(Error::enotsup("trim not supported")),
        }
    }
    /// Make a range read as zeroes.
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.next() {
            Some(n) => n.zero(count, offset, flags).await,
            None => Err(Error::enotsup("zero not supported")),
        }
    }
    /// Report allocation of `[ext.start(), ext.end())` into `ext`.
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        match self.next() {
            Some(n) => n.extents(count, offset, flags, ext).await,
            None => ext.add(offset, count, 0),
        }
    }
    /// Prefetch a range.
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.next() {
            Some(n) => n.cache(count, offset, flags).await,
            None => Ok(()),
        }
    }
    /// Report the status of `[ext.start(), ext.end())` in meta context
    /// `context` (one the plugin offered in [`Plugin::meta_contexts`],
    /// other than `base:allocation`), with that context's flags. Only
    /// asked through filters that [pass meta
    /// contexts](Filter::passes_meta_contexts), so the default passes the
    /// call down unchanged.
    async fn meta_extents(
        &self,
        context: &str,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        match self.next() {
            Some(n) => n.meta_extents(context, count, offset, flags, ext).await,
            None => Err(Error::enotsup(format!("no meta context {context}"))),
        }
    }
}

/// Bytes of a reference-counted buffer that a layer holds (see
/// [`Handle::pread_shared`]).
#[derive(Clone)]
pub struct SharedData {
    buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: std::ops::Range<usize>,
}

impl SharedData {
    /// `range` of `buf`; `None` if the range is outside it. `buf` is any
    /// shared buffer: one that goes back to a pool when its last
    /// reference drops keeps doing so when that reference is a reply's.
    pub fn new<B: AsRef<[u8]> + Send + Sync + 'static>(
        buf: Arc<B>,
        range: std::ops::Range<usize>,
    ) -> Option<SharedData> {
        let len = (*buf).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(SharedData { buf, range })
    }
}

impl std::fmt::Debug for SharedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedData")
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for SharedData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.buf).as_ref()[self.range.clone()]
    }
}

/// A configured plugin: opens per-connection handles.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Open a handle for a new connection.
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>>;
    /// The exports for `NBD_OPT_LIST`.
    async fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        Ok(vec![ExportEntry {
            name: self.default_export(),
            description: None,
        }])
    }
    /// The name the empty export name stands for.
    fn default_export(&self) -> String {
        String::new()
    }
    /// The meta contexts besides `base:allocation` (which the server
    /// answers from [`Handle::extents`]) that export `export` has and
    /// that match `queries`: for `NBD_OPT_LIST_META_CONTEXT` (`list`),
    /// an empty list asks for all of them and a query ending in `:` for a
    /// whole namespace; for `NBD_OPT_SET_META_CONTEXT`, only exact names.
    /// The default is none (as every nbdkit 1.32 plugin).
    async fn meta_contexts(
        &self,
        _export: &str,
        _queries: &[String],
        _list: bool,
    ) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// How the plugin may be called concurrently.
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }
    /// Extra `key=value` lines for `--dump-plugin`; a pair with an empty
    /// key is printed as its value alone (a line a script printed).
    fn dump(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Called once the command line is complete, before the server binds
    /// its sockets and forks, but not for `--dump-plugin` (nbdkit's
    /// `config_complete` and `get_ready`): an error stops the server.
    fn get_ready(&self) -> Result<(), crate::config::ConfigError> {
        Ok(())
    }
    /// Called for each new connection before the handshake (nbdkit's
    /// `preconnect`); an error drops the connection.
    async fn preconnect(&self, _readonly: bool) -> Result<()> {
        Ok(())
    }
    /// Called once the server has forked into the background (or decided
    /// not to), inside the async runtime: start background tasks and
    /// threads here, never in `create`. `server` is what the server's
    /// connections share (its shutdown, its connection count), for layers
    /// that watch or stop it.
    fn after_fork(&self, _server: &Arc<ServerContext>) -> Result<()> {
        Ok(())
    }
    /// Called once when the server exits cleanly.
    fn unload(&self) {}
}

/// A configured filter: wraps the next layer's handle per connection.
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    /// Open this filter's handle; `next.open(...)` opens the layers below,
    /// and a filter may change what they are asked (read-only, export).
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>>;
    /// The exports for `NBD_OPT_LIST`.
    async fn list_exports(&self, next: Next<'_>, readonly: bool) -> Result<Vec<ExportEntry>> {
        next.list_exports(readonly).await
    }
    /// The name the empty export name stands for.
    fn default_export(&self, next: Next<'_>) -> String {
        next.default_export()
    }
    /// How this filter may be called concurrently (nbdkit's
    /// `.thread_model`); the stack runs at the strictest of its layers'
    /// answers ([`Stack::thread_model`]), which layers read through
    /// [`Next::thread_model`]. The server does not serialise requests
    /// itself (it only stops advertising multi-conn under
    /// `SerializeConnections`): a filter that narrows the model also
    /// enforces it.
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }
    /// Called once the server has forked (see [`Plugin::after_fork`]).
    fn after_fork(&self, _server: &Arc<ServerContext>) -> Result<()> {
        Ok(())
    }
    /// Called once when the server exits cleanly.
    fn unload(&self) {}
    /// Does this filter leave the plugin's meta contexts other than
    /// `base:allocation` meaningful (same offsets, same data)? If any
    /// filter of the stack says no (the default, as a filter that moves,
    /// changes or caches data would make them lie), the server offers
    /// only `base:allocation`.
    fn passes_meta_contexts(&self) -> bool {
        false
    }
    /// Meta contexts this filter answers itself in
    /// [`Handle::meta_extents`] (the qcow2 filter's
    /// `qemu:allocation-depth`): offered when every filter above it
    /// passes meta contexts.
    fn own_meta_contexts(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Does meta context `name` match `query` (see [`Plugin::meta_contexts`])?
pub fn meta_context_matches(name: &str, query: &str, list: bool) -> bool {
    name == query || (list && query.ends_with(':') && name.starts_with(query))
}

/// A plugin with its filters, outermost filter first: what the server
/// serves.
#[derive(Clone)]
pub struct Stack {
    /// Filters from the client side in.
    pub filters: Vec<Arc<dyn Filter>>,
    /// The plugin at the bottom.
    pub plugin: Arc<dyn Plugin>,
}

/// The layers below a filter.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    stack: &'a Stack,
    level: usize,
}

impl<'a> Next<'a> {
    /// Open the layers below with the given context.
    pub async fn open(self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        // Under `nbdkit -v`, every layer's calls are printed.
        let traced = crate::trace::layer_name(self.level);
        if let Some(name) = traced {
            crate::trace::Traced::opening(name, ctx);
        }
        let wrap = |h: Box<dyn Handle>| -> Box<dyn Handle> {
            match traced {
                Some(name) => Box::new(crate::trace::Traced::new(name, ctx.id, h)),
                None => h,
            }
        };
        match self.stack.filters.get(self.level) {
            Some(f) => {
                let below = Next {
                    stack: self.stack,
                    level: self.level + 1,
                };
                Ok(wrap(f.open(below, ctx).await?))
            }
            None => {
                let h = wrap(self.stack.plugin.open(ctx).await?);
                Ok(Box::new(Emulated::new(h)?))
            }
        }
    }
    /// List the exports of the layers below.
    pub async fn list_exports(self, readonly: bool) -> Result<Vec<ExportEntry>> {
        match self.stack.filters.get(self.level) {
            Some(f) => {
                let below = Next {
                    stack: self.stack,
                    level: self.level + 1,
                };
                f.list_exports(below, readonly).await
            }
            None => self.stack.plugin.list_exports(readonly).await,
        }
    }
    /// The thread model the whole stack runs at, layers above this one
    /// included (what nbdkit's `get_ready` is told).
    pub fn thread_model(self) -> ThreadModel {
        self.stack.thread_model()
    }
    /// The default export name of the layers below.
    pub fn default_export(self) -> String {
        match self.stack.filters.get(self.level) {
            Some(f) => f.default_export(Next {
                stack: self.stack,
                level: self.level + 1,
            }),
            None => self.stack.plugin.default_export(),
        }
    }
}

/// The layers below a filter, owned, for a handle that must reopen them
/// after `open` returned (the retry filter). Cloning a [`Stack`] only
/// clones its `Arc`s.
#[derive(Clone)]
pub struct OwnedNext {
    stack: Stack,
    level: usize,
}

impl OwnedNext {
    /// Borrow as a [`Next`].
    pub fn get(&self) -> Next<'_> {
        Next {
            stack: &self.stack,
            level: self.level,
        }
    }
}

impl Next<'_> {
    /// An owned handle on the same layers.
    pub fn to_owned(self) -> OwnedNext {
        OwnedNext {
            stack: self.stack.clone(),
            level: self.level,
        }
    }
}

impl Stack {
    /// The whole stack, from the outermost layer.
    pub fn top(&self) -> Next<'_> {
        Next {
            stack: self,
            level: 0,
        }
    }
    /// Open a connection's handle through every layer.
    pub async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        self.top().open(ctx).await
    }
    /// The plugin's meta contexts besides `base:allocation` (see
    /// [`Plugin::meta_contexts`]), if every filter passes them.
    pub async fn meta_contexts(
        &self,
        export: &str,
        queries: &[String],
        list: bool,
    ) -> Result<Vec<String>> {
        // A filter's own contexts, while every filter above it passes.
        let mut own = Vec::new();
        for f in &self.filters {
            for name in f.own_meta_contexts() {
                let wanted = (list && queries.is_empty())
                    || queries.iter().any(|q| meta_context_matches(name, q, list));
                if wanted && !own.iter().any(|n| n == name) {
                    own.push(name.to_string());
                }
            }
            if !f.passes_meta_contexts() {
                return Ok(own);
            }
        }
        let mut all = self.plugin.meta_contexts(export, queries, list).await?;
        all.retain(|n| !own.contains(n));
        own.extend(all);
        Ok(own)
    }
    /// Ask the plugin whether a new connection may go on (see
    /// [`Plugin::preconnect`]).
    pub async fn preconnect(&self, readonly: bool) -> Result<()> {
        self.plugin.preconnect(readonly).await
    }
    /// The strictest thread model of the plugin and every filter.
    pub fn thread_model(&self) -> ThreadModel {
        self.filters
            .iter()
            .map(|f| f.thread_model())
            .fold(self.plugin.thread_model(), Ord::min)
    }
    /// Run every layer's `after_fork`, plugin first.
    pub fn after_fork(&self, server: &Arc<ServerContext>) -> Result<()> {
        self.plugin.after_fork(server)?;
        for f in self.filters.iter().rev() {
            f.after_fork(server)?;
        }
        Ok(())
    }
    /// Run every layer's `unload`, outermost filter first.
    pub fn unload(&self) {
        for f in &self.filters {
            f.unload();
        }
        self.plugin.unload();
    }
}

/// Run blocking work (file I/O, a system call) from a data method
/// without stalling the other tasks of the runtime: on tokio's
/// multi-thread runtime the worker hands its other tasks to the rest
/// first (`block_in_place`); elsewhere (a current-thread runtime, as in
/// unit tests, or no runtime) it runs inline.
pub fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle as Runtime, RuntimeFlavor};
    match Runtime::try_current() {
        Ok(rt) if rt.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Size of the zero buffer used to emulate `zero` by writes.
const ZERO_CHUNK: usize = 1 << 20;

/// What the server adds over a plugin's handle, as nbdkit's server does:
/// zero emulated by writes, FUA by flush, cache by reads, extents as all
/// data, and bounds checks. Capabilities are asked once, at open.
pub struct Emulated {
    inner: Box<dyn Handle>,
    size: u64,
    /// What the plugin itself can do.
    plugin: Caps,
    /// What the layers above are told: the plugin's answer with the
    /// emulated capabilities added.
    caps: Caps,
}

impl Emulated {
    /// Wrap a plugin's freshly opened handle.
    pub fn new(inner: Box<dyn Handle>) -> Result<Self> {
        let plugin = inner.caps()?;
        let write = plugin.write;
        // As nbdkit: a plugin that says "emulate" gets emulated FUA (a
        // flush after the write) even if it does not advertise flush.
        let fua = match plugin.fua {
            Fua::Native => Fua::Native,
            Fua::Emulate if write => Fua::Emulate,
            _ if plugin.flush && write => Fua::Emulate,
            _ => Fua::None,
        };
        let caps = Caps {
            zero: write,
            // Emulated zeroes are slow, but answering fast requests with
            // an immediate ENOTSUP is itself "fast", as nbdkit does.
            fast_zero: write && (!plugin.zero || plugin.fast_zero),
            extents: true,
            fua,
            ..plugin
        };
        Ok(Emulated {
            size: inner.size()?,
            plugin,
            caps,
            inner,
        })
    }

    async fn after_write(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) && self.caps.fua == Fua::Emulate {
            self.inner.flush(Flags::NONE).await?;
        }
        Ok(())
    }

    fn pass_flags(&self, flags: Flags) -> Flags {
        if self.caps.fua == Fua::Native {
            flags
        } else {
            flags.without(Flags::FUA)
        }
    }
}

#[async_trait]
impl Handle for Emulated {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.inner)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(self.caps)
    }

    async fn pread_shared(
        &self,
        count: u32,
        offset: u64,
        flags: Flags,
    ) -> Result<Option<SharedData>> {
        self.inner.pread_shared(count, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.inner
            .pwrite(buf, offset, self.pass_flags(flags))
            .await?;
        self.after_write(flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inner
            .trim(count, offset, self.pass_flags(flags))
            .await?;
        self.after_write(flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if self.plugin.zero {
            if flags.contains(Flags::FAST_ZERO) && !self.plugin.fast_zero {
                return Err(Error::enotsup("fast zero not supported"));
            }
            match self.inner.zero(count, offset, self.pass_flags(flags)).await {
                Err(e) if e.errno == errno::ENOTSUP && !flags.contains(Flags::FAST_ZERO) => {}
                r => {
                    r?;
                    return self.after_write(flags).await;
                }
            }
        }
        if flags.contains(Flags::FAST_ZERO) {
            return Err(Error::enotsup("fast zero not supported"));
        }
        let zeroes = vec![0u8; (count as usize).min(ZERO_CHUNK)];
        // A plugin with native FUA gets it on the writes that stand in
        // for the zero (emulated FUA is the flush after them).
        let wflags = if flags.contains(Flags::FUA) && self.caps.fua == Fua::Native {
            Flags::FUA
        } else {
            Flags::NONE
        };
        let mut done = 0u64;
        while done < count {
            let n = ((count - done) as usize).min(ZERO_CHUNK);
            self.inner
                .pwrite(&zeroes[..n], offset + done, wflags)
                .await?;
            done += n as u64;
        }
        self.after_write(flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        if self.plugin.extents {
            self.inner.extents(count, offset, flags, ext).await?;
        }
        if ext.next_offset() == offset {
            // Nothing reported (or no extents support): all data.
            ext.add(offset, count, 0)?;
        }
        Ok(())
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.caps.cache {
            Cache::Native => self.inner.cache(count, offset, flags).await,
            _ => {
                let mut buf = vec![0u8; (count as usize).min(ZERO_CHUNK)];
                let mut done = 0u64;
                while done < count {
                    let n = ((count - done) as usize).min(ZERO_CHUNK);
                    self.inner
                        .pread(&mut buf[..n], offset + done, Flags::NONE)
                        .await?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

/// Which `base:allocation` flags an all-zero hole has.
pub const HOLE_ZERO: u32 = alloc::HOLE | alloc::ZERO;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_clip() {
        let mut e = Extents::new(100, 1000);
        e.add(0, 200, 0).unwrap();
        e.add(200, 100, 0).unwrap();
        e.add(300, 5000, HOLE_ZERO).unwrap();
        assert_eq!(
            e.list(),
            &[
                Extent {
                    offset: 100,
                    length: 200,
                    flags: 0
                },
                Extent {
                    offset: 300,
                    length: 700,
                    flags: HOLE_ZERO
                }
            ]
        );
        assert!(e.is_full());
    }

    #[test]
    fn extents_reject_gaps() {
        let mut e = Extents::new(0, 100);
        assert!(e.add(10, 10, 0).is_err());
    }
}
