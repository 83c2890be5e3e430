//! # nbd: a proxy to another NBD server
//!
//! Forwards every request to another NBD server, so that our filters can
//! sit in front of `qemu-nbd`, upstream nbdkit or a remote server, TLS
//! can be added or removed, or a qcow2 can be served through `qemu-nbd`
//! run as a captive command.
//!
//! ```text
//! nbdkit nbd nbd://remote.example.com/export
//! nbdkit nbd socket=/tmp/sock export=disk
//! nbdkit --filter=partition nbd command=qemu-nbd arg=-f arg=qcow2 arg=$PWD/disk.qcow2 partition=1
//! nbdkit --tls=require nbd hostname=old.example.com port=10809
//! ```
//!
//! ## Parameters
//!
//! Exactly one of these says where the server is:
//!
//! - `[uri=]URI`: an NBD URI (`nbd://`, `nbds://`, `nbd+unix://`,
//!   `nbd+vsock://`, ... with their `tls-*` query parameters).
//! - `socket=PATH`: a Unix domain socket.
//! - `hostname=HOST` [`port=PORT`]: TCP; the port (default 10809) is a
//!   number or a service name from `/etc/services`.
//! - `vsock=CID` [`port=PORT`]: `AF_VSOCK`.
//! - `command=PROGRAM` [`arg=ARG` ...]: run PROGRAM with its arguments as
//!   a captive server with systemd socket activation (for example
//!   `qemu-nbd`); it is stopped when nbdkit exits. Implies `shared=true`.
//! - `socket-fd=FD`: a connected socket inherited as file descriptor FD.
//!   Implies `shared=true`.
//!
//! And these how:
//!
//! - `export=NAME` (default the empty name): the export to open (with
//!   `uri=` the URI's export name is used instead).
//! - `dynamic-export=BOOL` (default false): open the export each client
//!   asks for, and list the server's exports; not with `shared=true` nor
//!   an explicit `export=`.
//! - `retry=N` (default 0): if connecting fails, try N more times, one
//!   second apart.
//! - `shared=BOOL` (default false, true for `command=` and
//!   `socket-fd=`): one connection made when nbdkit starts, which all
//!   clients share, instead of one per client.
//! - `tls=off|on|require` (default off, or on when another `tls-*`
//!   parameter is given, or require for `nbds` URIs): TLS to the server.
//! - `tls-certificates=DIR`: X.509 certificates to present.
//! - `tls-verify=BOOL` (default true): check the server's certificate.
//! - `tls-username=NAME`: the PSK user name (default the login name).
//! - `tls-psk=FILE`: a PSK file (`username:hexkey` lines): PSK instead
//!   of X.509.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's nbd plugin: what the server advertises is
//! what this plugin answers (read-only, flush, FUA, trim, zero, fast
//! zero, cache, multi-conn, rotational, block size, description), with
//! `base:allocation` extents passed through when the server has them
//! (`REQ_ONE` included). Requests of any number run in parallel on each
//! connection (thread model parallel); the server's errors come back to
//! the client with their errno. A closed client connection sends the
//! server `NBD_CMD_DISC`. `--dump-plugin` says `libnbd_version=`,
//! `libnbd_tls=1`, `libnbd_uri=1`, `libnbd_vsock=1` and
//! `libnbd_dynamic_list=1`.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use libnbd::captive::CaptiveServer;
use libnbd::client::{
    cmdflag, ClientTlsOptions, ConnectOptions, Connection, Negotiation, Stream, TlsPolicy,
    Transport, DEFAULT_PORT,
};
use libnbd::protocol::{errno, CONTEXT_BASE_ALLOCATION};
use libnbd::server::ServerContext;
use libnbd::uri::Uri;
use libnbd::{
    BlockSize, Cache, Caps, ConfigError, ConfigResult, Error, ExportEntry, Extents, Flags, Fua,
    Handle, OpenContext, Params, Plugin, PluginEntry, Result, SharedData,
};

/// The registry entry of the nbd plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "nbd",
    help: "[uri=]<URI>             URI of an NBD socket to connect to (if supported).\n\
socket=<SOCKNAME>       The Unix socket to connect to.\n\
hostname=<HOST>         The hostname for the TCP socket to connect to.\n\
port=<PORT>             TCP/vsock port or service name to use (default 10809).\n\
vsock=<CID>             The Vsock Context IDentifier to connect to.\n\
command=<COMMAND>       The command to run.\n\
arg=<ARG>               Parameters for command.\n\
socket-fd=<FD>          Socket file descriptor to connect to.\n\
export=<NAME>           Export name to connect to (default \"\").\n\
dynamic-export=<BOOL>   True to enable export name pass-through.\n\
retry=<N>               Retry connection up to N seconds (default 0).\n\
shared=<BOOL>           True to share one server connection among all clients,\n\
                        rather than a connection per client (default false).\n\
tls=<MODE>              How to use TLS; one of 'off', 'on', or 'require'.\n\
tls-certificates=<DIR>  Directory containing files for X.509 certificates.\n\
tls-verify=<BOOL>       False to disable server name verification.\n\
tls-username=<NAME>     Override username presented in X.509 TLS.\n\
tls-psk=<FILE>          File containing Pre-Shared Key for TLS.",
    magic: Some("uri"),
    create,
};

/// Where the server is.
#[derive(Debug, Clone)]
enum Remote {
    /// A URI, or a socket/host/vsock turned into a transport.
    Transport(Transport),
    /// `command=` with its `arg=`s, started in `after_fork`.
    Command(Vec<OsString>),
    /// `socket-fd=`, used once.
    Fd(i32),
}

/// The configured nbd plugin.
pub struct NbdPlugin {
    remote: Remote,
    /// Options for the server: export name, TLS.
    opts: ConnectOptions,
    dynamic_export: bool,
    retry: u32,
    shared: bool,
    /// The captive server of `command=`.
    captive: Mutex<Option<Arc<CaptiveServer>>>,
    /// The connection all clients share (`shared=true`), made in
    /// `after_fork`, with every meta context the server has.
    conn: OnceLock<Arc<Connection>>,
}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError::new(msg)
}

/// A TCP port: a number or a service name (`getservbyname`).
fn parse_port(s: &str) -> ConfigResult<u16> {
    if let Ok(n) = s.parse::<u16>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(s).map_err(|_| err(format!("port: invalid '{s}'")))?;
    // SAFETY: both arguments are NUL-terminated strings; the result is
    // read at once, during configuration (single-threaded).
    let ent = unsafe { libc::getservbyname(name.as_ptr(), c"tcp".as_ptr()) };
    if ent.is_null() {
        return Err(err(format!("port: unknown port or service name '{s}'")));
    }
    // SAFETY: a non-null servent from getservbyname.
    Ok(u16::from_be(unsafe { (*ent).s_port } as u16))
}

/// Build the nbd plugin from its parameters.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let uri = params.take("uri");
    let socket = params.take("socket");
    let hostname = params.take("hostname");
    let vsock = params.take("vsock");
    let port = params.take("port");
    let command = params.take("command");
    let args = params.take_all("arg");
    let socket_fd = params.take("socket-fd");
    let export = params.take("export");
    let dynamic_export = params.take_bool("dynamic-export")?.unwrap_or(false);
    let retry = params.take_parsed::<u32>("retry")?.unwrap_or(0);
    let shared = params.take_bool("shared")?;
    let tls = params.take("tls");
    let tls_certificates = params.take("tls-certificates");
    let tls_verify = params.take_bool("tls-verify")?;
    let tls_username = params.take("tls-username");
    let tls_psk = params.take("tls-psk");
    params.finish("nbd")?;

    let given = [
        uri.is_some(),
        socket.is_some(),
        hostname.is_some(),
        vsock.is_some(),
        command.is_some(),
        socket_fd.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if given == 0 {
        return Err(err(
            "exactly one of 'socket', 'hostname', 'vsock', 'command', 'socket-fd' and 'uri' \
             parameters must be specified",
        ));
    }
    if given > 1 {
        return Err(err(
            "cannot mix Unix 'socket', TCP 'hostname'/'port', 'vsock', 'command', 'socket-fd' \
             and 'uri' parameters",
        ));
    }
    if port.is_some() && hostname.is_none() && vsock.is_none() {
        return Err(err("'port' needs 'hostname' or 'vsock'"));
    }
    if command.is_none() && !args.is_empty() {
        return Err(err("'arg' needs 'command'"));
    }

    let mut opts = ConnectOptions::new().export_name(export.clone().unwrap_or_default());
    let mut tls_opts = ClientTlsOptions {
        certificates: tls_certificates.map(PathBuf::from),
        verify_peer: tls_verify,
        psk_file: tls_psk.map(PathBuf::from),
        username: tls_username,
        hostname: hostname.clone(),
    };
    let any_tls_param = tls_opts
        != ClientTlsOptions {
            hostname: hostname.clone(),
            ..Default::default()
        };
    let mut tls_required = false;

    let remote = if let Some(u) = &uri {
        let u = Uri::parse(u).map_err(|e| err(format!("uri: {e}")))?;
        if export.is_none() {
            opts.export_name = u.export_name.clone();
        }
        // The URI's TLS parameters, then ours over them.
        let from_uri = u.tls_options();
        tls_opts = ClientTlsOptions {
            certificates: tls_opts.certificates.or(from_uri.certificates),
            verify_peer: tls_opts.verify_peer.or(from_uri.verify_peer),
            psk_file: tls_opts.psk_file.or(from_uri.psk_file),
            username: tls_opts.username.or(from_uri.username),
            hostname: from_uri.hostname,
        };
        tls_required = u.tls;
        Remote::Transport(u.transport)
    } else if let Some(s) = socket {
        Remote::Transport(Transport::Unix(PathBuf::from(s)))
    } else if let Some(h) = hostname {
        let port = port.as_deref().map(parse_port).transpose()?;
        Remote::Transport(Transport::Tcp {
            host: h,
            port: port.unwrap_or(DEFAULT_PORT),
        })
    } else if let Some(cid) = vsock {
        let cid = cid
            .parse::<u32>()
            .map_err(|_| err(format!("vsock: could not parse CID '{cid}'")))?;
        let port = match &port {
            Some(p) => p
                .parse::<u32>()
                .map_err(|_| err(format!("port: could not parse vsock port '{p}'")))?,
            None => u32::from(DEFAULT_PORT),
        };
        Remote::Transport(Transport::Vsock { cid, port })
    } else if let Some(c) = command {
        let mut argv = vec![OsString::from(c)];
        argv.extend(args.into_iter().map(OsString::from));
        Remote::Command(argv)
    } else {
        let s = socket_fd.unwrap_or_default();
        let fd = s
            .parse::<i32>()
            .ok()
            .filter(|&fd| fd >= 0)
            .ok_or_else(|| err(format!("socket-fd: could not parse '{s}'")))?;
        // SAFETY: F_GETFD only looks the descriptor up.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(err(format!("socket-fd: {fd}: Bad file descriptor")));
        }
        Remote::Fd(fd)
    };

    let shared = match (&remote, shared) {
        (Remote::Command(_) | Remote::Fd(_), _) => true,
        (_, s) => s.unwrap_or(false),
    };
    if dynamic_export && shared {
        return Err(err("cannot use 'dynamic-export' with shared connection"));
    }
    if dynamic_export && export.is_some() {
        return Err(err("cannot mix 'dynamic-export' with explicit export name"));
    }

    opts.tls = match tls.as_deref() {
        _ if tls_required => TlsPolicy::Require(tls_opts),
        Some("require" | "required" | "force") => TlsPolicy::Require(tls_opts),
        Some(t) => match libnbd::parse_bool(t) {
            Ok(true) => TlsPolicy::Allow(tls_opts),
            Ok(false) => TlsPolicy::Disable,
            Err(_) => {
                return Err(err(format!(
                    "tls: could not decipher '{t}': expected off, on or require"
                )))
            }
        },
        None if any_tls_param => TlsPolicy::Allow(tls_opts),
        None => TlsPolicy::Disable,
    };

    Ok(Arc::new(NbdPlugin {
        remote,
        opts,
        dynamic_export,
        retry,
        shared,
        captive: Mutex::new(None),
        conn: OnceLock::new(),
    }))
}

/// A failed request: the client library's error (which names the
/// request) with the server's errno.
fn request_error(e: libnbd::client::Error) -> Error {
    Error::new(e.errno().unwrap_or(errno::EIO), e.to_string())
}

/// A client library error as the plugin's, keeping the server's errno.
fn from_client(what: &str, e: libnbd::client::Error) -> Error {
    Error::new(e.errno().unwrap_or(errno::EIO), format!("{what}: {e}"))
}

impl NbdPlugin {
    /// Connect once (no retry) with `opts`, stopping in negotiation.
    async fn negotiate_once(&self, opts: &ConnectOptions) -> libnbd::client::Result<Negotiation> {
        match &self.remote {
            Remote::Transport(t) => Negotiation::connect(t, opts).await,
            Remote::Command(_) => {
                let captive = self
                    .captive
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                match captive {
                    Some(c) => c.negotiate(opts).await,
                    None => Err(libnbd::client::Error::Closed),
                }
            }
            Remote::Fd(fd) => {
                // SAFETY: the fd was checked open at configuration and is
                // used only here, once (socket-fd implies shared).
                let fd = unsafe { OwnedFd::from_raw_fd(*fd) };
                Negotiation::start(Stream::from_fd(fd)?, opts).await
            }
        }
    }

    /// Connect with `opts`, retrying as `retry=` says (a socket fd is
    /// only tried once).
    /// With `all_contexts`, every meta context the server lists is
    /// selected (for the shared connection, made before any client says
    /// which it wants).
    async fn connect(&self, opts: &ConnectOptions, all_contexts: bool) -> Result<Connection> {
        let mut tries = 0;
        loop {
            let r = match self.negotiate_once(opts).await {
                Ok(mut n) if all_contexts => {
                    match n.list_meta_contexts(&opts.export_name, &[]).await {
                        Ok(names) => {
                            n.options_mut().meta_contexts = names;
                            n.go().await
                        }
                        // A server without structured replies has none.
                        Err(_) => n.go().await,
                    }
                }
                Ok(mut n) => n.go().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(c) => return Ok(c),
                Err(e) if tries >= self.retry || matches!(self.remote, Remote::Fd(_)) => {
                    return Err(from_client("connecting to the NBD server", e))
                }
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

#[async_trait]
impl Plugin for NbdPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        if self.shared {
            let conn = self
                .conn
                .get()
                .cloned()
                .ok_or_else(|| Error::eio("the shared connection to the NBD server is gone"))?;
            return Ok(Box::new(NbdHandle {
                conn,
                owned: false,
                pool: Arc::default(),
            }));
        }
        let mut opts = self.opts.clone();
        if self.dynamic_export {
            opts.export_name = ctx.export_name.clone();
        }
        for c in &ctx.meta_contexts {
            opts = opts.meta_context(c.clone());
        }
        let conn = Arc::new(self.connect(&opts, false).await?);
        Ok(Box::new(NbdHandle {
            conn,
            owned: true,
            pool: Arc::default(),
        }))
    }

    async fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        if !self.dynamic_export {
            return Ok(vec![ExportEntry {
                name: String::new(),
                description: None,
            }]);
        }
        let mut n = self
            .negotiate_once(&self.opts)
            .await
            .map_err(|e| from_client("connecting to the NBD server", e))?;
        let list = n
            .list_exports()
            .await
            .map_err(|e| from_client("listing the NBD server's exports", e))?;
        let _ = n.abort().await;
        Ok(list)
    }

    async fn meta_contexts(
        &self,
        export: &str,
        queries: &[String],
        list: bool,
    ) -> Result<Vec<String>> {
        if let Some(conn) = self.conn.get() {
            // Shared: what the one connection selected.
            let names = conn.meta_contexts().iter().map(|c| c.name.clone());
            return Ok(names
                .filter(|n| {
                    (list && queries.is_empty())
                        || queries
                            .iter()
                            .any(|q| libnbd::backend::meta_context_matches(n, q, list))
                })
                .collect());
        }
        let mut opts = self.opts.clone();
        if self.dynamic_export {
            opts.export_name = export.to_string();
        }
        let mut n = self
            .negotiate_once(&opts)
            .await
            .map_err(|e| from_client("connecting to the NBD server", e))?;
        let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
        let names = n
            .list_meta_contexts(&opts.export_name, &queries)
            .await
            .map_err(|e| from_client("listing the NBD server's meta contexts", e));
        let _ = n.abort().await;
        names
    }

    fn dump(&self) -> Vec<(String, String)> {
        dump_lines()
    }

    fn after_fork(&self, _server: &Arc<ServerContext>) -> Result<()> {
        // The captive server and the shared connection are made now, in
        // the server's process and runtime (the captive server must not be
        // a child of a process that forks away).
        if let Remote::Command(argv) = &self.remote {
            let c = CaptiveServer::spawn(argv)
                .map_err(|e| from_client(&format!("{}", argv[0].to_string_lossy()), e))?;
            *self.captive.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(c));
        }
        if self.shared {
            let rt = tokio::runtime::Handle::current();
            let conn = rt.block_on(self.connect(&self.opts, true))?;
            let _ = self.conn.set(Arc::new(conn));
        }
        Ok(())
    }

    fn unload(&self) {
        if let Some(c) = self
            .captive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            c.kill();
        }
    }
}

/// The `--dump-plugin` lines, which need no configuration (scripts look
/// for `libnbd_uri=1` and the like).
pub fn dump_lines() -> Vec<(String, String)> {
    [
        ("libnbd_version", env!("CARGO_PKG_VERSION")),
        ("libnbd_tls", "1"),
        ("libnbd_uri", "1"),
        ("libnbd_vsock", "1"),
        ("libnbd_dynamic_list", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Read buffers, reused: a fresh large `Vec` per read costs a page
/// fault per page (calloc maps new memory), which took a quarter of a
/// sequential copy's time through the proxy.
#[derive(Default)]
struct BufPool(Mutex<Vec<Vec<u8>>>);

impl BufPool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }
    fn put(&self, b: Vec<u8>) {
        let mut free = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < 64 && b.capacity() <= 64 << 20 {
            free.push(b);
        }
    }
}

/// Read data on its way to the client, back to the pool once sent.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// A client's view of the server: its own connection, or the shared one.
pub struct NbdHandle {
    conn: Arc<Connection>,
    /// This client's own connection, disconnected when it closes.
    owned: bool,
    pool: Arc<BufPool>,
}

impl Drop for NbdHandle {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let conn = self.conn.clone();
            rt.spawn(async move {
                let _ = conn.disconnect().await;
            });
        }
    }
}

impl NbdHandle {
    /// Block status of one meta context, from the server (asked for that
    /// context alone where the server can filter, so that the other
    /// contexts passed through are not computed and sent for nothing).
    async fn status(
        &self,
        context: &str,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let f = if flags.contains(Flags::REQ_ONE) {
            cmdflag::REQ_ONE
        } else {
            0
        };
        let status = self
            .conn
            .block_status_filtered(count, offset, f, &[context])
            .await
            .map_err(request_error)?;
        let list = status
            .contexts
            .iter()
            .find(|c| c.name == context)
            .map(|c| c.extents.as_slice())
            .unwrap_or_default();
        if list.is_empty() {
            return Err(Error::eio(format!(
                "block status: the server sent no {context} extents"
            )));
        }
        let mut at = offset;
        for e in list {
            ext.add(at, e.length, e.flags)?;
            at += e.length;
        }
        Ok(())
    }
}

/// nbdkit's FUA flag as the client library's.
fn fua(flags: Flags) -> u16 {
    if flags.contains(Flags::FUA) {
        cmdflag::FUA
    } else {
        0
    }
}

#[async_trait]
impl Handle for NbdHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.conn.size())
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.conn.block_size().map(|b| BlockSize {
            minimum: b.minimum,
            preferred: b.preferred,
            maximum: b.maximum,
        }))
    }
    fn export_description(&self) -> Option<String> {
        self.conn.description().map(str::to_string)
    }
    fn caps(&self) -> Result<Caps> {
        let c = &self.conn;
        Ok(Caps {
            write: !c.is_read_only(),
            flush: c.can_flush(),
            rotational: c.is_rotational(),
            trim: c.can_trim(),
            zero: c.can_zero(),
            fast_zero: c.can_fast_zero(),
            extents: c.can_meta_context(CONTEXT_BASE_ALLOCATION),
            fua: if c.can_fua() { Fua::Native } else { Fua::None },
            multi_conn: c.can_multi_conn(),
            cache: if c.can_cache() {
                Cache::Native
            } else {
                Cache::None
            },
        })
    }

    async fn pread_shared(
        &self,
        count: u32,
        offset: u64,
        _flags: Flags,
    ) -> Result<Option<SharedData>> {
        // The server sends the buffer the reply was read into.
        let buf = self.pool.get(count as usize);
        let buf = self
            .conn
            .pread_owned(buf, offset, 0)
            .await
            .map_err(request_error)?;
        let len = buf.len();
        let pooled = Arc::new(Pooled {
            buf,
            pool: self.pool.clone(),
        });
        Ok(SharedData::new(pooled, 0..len))
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let b = self.pool.get(buf.len());
        let b = self
            .conn
            .pread_owned(b, offset, 0)
            .await
            .map_err(request_error)?;
        buf.copy_from_slice(&b);
        self.pool.put(b);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.conn
            .pwrite(buf, offset, fua(flags))
            .await
            .map_err(request_error)
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        self.conn.flush().await.map_err(request_error)
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.conn
            .trim(count, offset, fua(flags))
            .await
            .map_err(request_error)
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let mut f = fua(flags);
        if !flags.contains(Flags::MAY_TRIM) {
            f |= cmdflag::NO_HOLE;
        }
        if flags.contains(Flags::FAST_ZERO) {
            f |= cmdflag::FAST_ZERO;
        }
        self.conn
            .zero(count, offset, f)
            .await
            .map_err(request_error)
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.status(CONTEXT_BASE_ALLOCATION, count, offset, flags, ext)
            .await
    }
    async fn meta_extents(
        &self,
        context: &str,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.status(context, count, offset, flags, ext).await
    }
    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.conn
            .cache(count, offset, 0)
            .await
            .map_err(request_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(args: &[&str]) -> std::result::Result<(), String> {
        let mut p = Params::parse(args, Some("uri")).map_err(|e| e.0)?;
        ENTRY.configure(&mut p).map(|_| ()).map_err(|e| e.0)
    }

    #[test]
    fn exactly_one_address() {
        assert!(configure(&[]).unwrap_err().contains("exactly one"));
        assert!(configure(&["socket=/x", "hostname=y"])
            .unwrap_err()
            .contains("cannot mix"));
        assert!(configure(&["nbd://h/e", "socket=/x"])
            .unwrap_err()
            .contains("cannot mix"));
        assert!(configure(&["socket=/x"]).is_ok());
        assert!(configure(&["nbd+unix:///e?socket=/x"]).is_ok());
        assert!(configure(&["hostname=h", "port=nbd"]).is_ok());
        assert!(configure(&["hostname=h", "port=no-such-service-here"])
            .unwrap_err()
            .contains("port"));
        assert!(configure(&["vsock=2", "port=x"]).is_err());
        assert!(configure(&["socket=/x", "port=1"]).is_err());
        assert!(configure(&["socket=/x", "arg=1"]).is_err());
        assert!(configure(&["nosuch://x"]).unwrap_err().contains("uri"));
        assert!(configure(&["socket-fd=-1"]).is_err());
        assert!(configure(&["socket-fd=999"])
            .unwrap_err()
            .contains("Bad file descriptor"));
    }

    #[test]
    fn port_service_names() {
        assert_eq!(parse_port("10809").unwrap(), 10809);
        // The nbd service is in Debian's /etc/services (netbase).
        if std::path::Path::new("/etc/services").exists() {
            if let Ok(p) = parse_port("nbd") {
                assert_eq!(p, 10809);
            }
        }
        assert!(parse_port("65536").is_err());
    }

    #[test]
    fn shared_and_dynamic_export() {
        assert!(
            configure(&["socket=/x", "dynamic-export=true", "shared=true"])
                .unwrap_err()
                .contains("shared")
        );
        assert!(configure(&["socket=/x", "dynamic-export=true", "export=a"])
            .unwrap_err()
            .contains("explicit export"));
        assert!(configure(&["socket=/x", "dynamic-export=true"]).is_ok());
        // command= implies shared, so it cannot be dynamic.
        assert!(configure(&["command=true", "dynamic-export=true"]).is_err());
        assert!(configure(&["socket=/x", "tls=maybe"])
            .unwrap_err()
            .contains("tls"));
        assert!(configure(&["socket=/x", "retry=x"]).is_err());
    }
}
