//! Where a server is ([`Transport`]) and an open socket to it
//! ([`Stream`]): TCP, Unix domain (including the Linux abstract
//! namespace), `AF_VSOCK`, a server on the far side of an `ssh`
//! tunnel ([`SshTarget`], `nbd+ssh://`), or any already-connected
//! stream or fd.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::error::{Error, Result};

/// The default NBD TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;
/// The vsock CID of the host, the default for `nbd+vsock://`.
pub const VSOCK_CID_HOST: u32 = 2;
/// The default ssh port, for `nbd+ssh://`.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// How to reach a server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP. `host` is a name or an IP address (IPv6 without brackets).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port number.
        port: u16,
    },
    /// A Unix domain socket. A path starting with a NUL byte names a
    /// socket in the Linux abstract namespace.
    Unix(PathBuf),
    /// `AF_VSOCK`.
    Vsock {
        /// Context id (2 is the host).
        cid: u32,
        /// Port number.
        port: u32,
    },
    /// A server on another machine, reached by running `ssh` there with
    /// `nc` forwarding to its socket (`nbd+ssh://`).
    Ssh(Box<SshTarget>),
}

/// Where the NBD server is on the far side of an ssh tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SshRemote {
    /// A Unix socket there (`nc -U PATH`).
    Unix(PathBuf),
    /// A TCP port on its localhost (`nc localhost PORT`).
    Tcp(u16),
}

/// An NBD server reached through `ssh`, as libnbd 1.22 does for
/// `nbd+ssh://` URIs: we run
///
/// ```text
/// ssh [-C] -p PORT [-o User=USER] -- HOST nc -U SOCKET
/// ssh [-C] -p PORT [-o User=USER] -- HOST nc localhost NBD-PORT
/// ```
///
/// (the first `ssh` in `PATH`) with a socket as its stdin and stdout;
/// its stderr is ours, so ssh's own messages (host key, authentication)
/// reach the user. The connection is that socket. A host name starting
/// with `-` is refused before anything runs, so it cannot become an ssh
/// option (`nbd+ssh://-oProxyCommand=...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshTarget {
    /// The ssh server.
    pub host: String,
    /// Its port (22 by default).
    pub port: u16,
    /// The ssh user (`-o User=`), if not ssh's default.
    pub user: Option<String>,
    /// Ask ssh to compress (`-C`).
    pub compress: bool,
    /// Where `nc` connects on the far side.
    pub remote: SshRemote,
}

/// Quote `s` for the remote shell (ssh passes the command as one
/// string): left alone if it is made of harmless characters, else in
/// single quotes.
fn shell_quote(s: &[u8]) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let safe = |b: &u8| b.is_ascii_alphanumeric() || b"/._-+,:=@%".contains(b);
    if !s.is_empty() && s.iter().all(safe) {
        return OsString::from_vec(s.to_vec());
    }
    let mut out = vec![b'\''];
    for (i, part) in s.split(|&b| b == b'\'').enumerate() {
        if i > 0 {
            out.extend_from_slice(b"'\\''");
        }
        out.extend_from_slice(part);
    }
    out.push(b'\'');
    OsString::from_vec(out)
}

impl SshTarget {
    /// Check the host (and user) cannot be taken for ssh options.
    pub fn check(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::InvalidArgument(
                "nbd+ssh: the ssh host is empty".into(),
            ));
        }
        if self.host.starts_with('-') {
            return Err(Error::InvalidArgument(format!(
                "nbd+ssh: the host name {:?} starts with '-' (refused: ssh would take it for an option)",
                self.host
            )));
        }
        if self.host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(Error::InvalidArgument(format!(
                "nbd+ssh: the host name {:?} contains spaces or control characters",
                self.host
            )));
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(Error::InvalidArgument(format!(
                    "nbd+ssh: bad ssh user name {u:?}"
                )));
            }
        }
        if let SshRemote::Unix(p) = &self.remote {
            let b = p.as_os_str().as_bytes();
            if b.is_empty() || b.contains(&0) {
                return Err(Error::InvalidArgument(
                    "nbd+ssh: the remote socket path is empty or has a NUL byte \
                     (abstract sockets cannot be reached with nc)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// The command line that opens the tunnel (`ssh` first).
    pub fn argv(&self) -> Result<Vec<OsString>> {
        self.check()?;
        let mut v: Vec<OsString> = vec!["ssh".into()];
        if self.compress {
            v.push("-C".into());
        }
        v.push("-p".into());
        v.push(self.port.to_string().into());
        if let Some(u) = &self.user {
            v.push("-o".into());
            v.push(format!("User={u}").into());
        }
        v.push("--".into());
        v.push(self.host.clone().into());
        v.push("nc".into());
        match &self.remote {
            SshRemote::Unix(p) => {
                v.push("-U".into());
                // A relative path starting with '-' must not become an
                // option of nc's.
                let b = p.as_os_str().as_bytes();
                if b.starts_with(b"-") {
                    let mut dotted = b"./".to_vec();
                    dotted.extend_from_slice(b);
                    v.push(shell_quote(&dotted));
                } else {
                    v.push(shell_quote(b));
                }
            }
            SshRemote::Tcp(port) => {
                v.push("localhost".into());
                v.push(port.to_string().into());
            }
        }
        Ok(v)
    }
}

impl fmt::Display for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ssh ")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        match &self.remote {
            SshRemote::Unix(p) => write!(f, " -> {}", p.display()),
            SshRemote::Tcp(port) => write!(f, " -> localhost:{port}"),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Transport::Tcp { host, port } => write!(f, "{host}:{port}"),
            Transport::Unix(p) => write!(f, "{}", p.display()),
            Transport::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Transport::Ssh(t) => t.fmt(f),
        }
    }
}

/// Boxed read half.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// Boxed write half.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// An open, not yet negotiated connection to a server.
pub struct Stream {
    pub(crate) reader: BoxRead,
    pub(crate) writer: BoxWrite,
    /// A duplicate of the socket, to shut it down when the connection is
    /// dropped (the read half lives in a task that may be dropped later).
    pub(crate) socket: Option<OwnedFd>,
    /// The ssh process of an `nbd+ssh` connection, kept as long as it.
    pub(crate) tunnel: Option<Arc<crate::captive::SshTunnel>>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Stream")
    }
}

impl Stream {
    /// Connect to `transport`.
    pub async fn connect(transport: &Transport) -> Result<Stream> {
        let ctx = || format!("connect: {transport}");
        match transport {
            Transport::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
                let _ = s.set_nodelay(true);
                let dup = s.as_fd().try_clone_to_owned().ok();
                let (r, w) = s.into_split();
                Ok(Stream::from_halves(r, w).with_socket(dup))
            }
            Transport::Unix(path) => {
                let s = connect_unix(path).await.map_err(|e| Error::io(ctx(), e))?;
                let dup = s.as_fd().try_clone_to_owned().ok();
                let (r, w) = s.into_split();
                Ok(Stream::from_halves(r, w).with_socket(dup))
            }
            Transport::Vsock { cid, port } => {
                let fd = connect_vsock(*cid, *port)
                    .await
                    .map_err(|e| Error::io(ctx(), e))?;
                let dup = fd.fd.get_ref().try_clone().ok();
                Ok(Stream::from_io(fd).with_socket(dup))
            }
            Transport::Ssh(t) => {
                let (fd, tunnel) = crate::captive::SshTunnel::spawn(t)?;
                let mut s = Stream::from_fd(fd)?;
                s.tunnel = Some(tunnel);
                Ok(s)
            }
        }
    }

    /// Use separate read and write halves.
    pub fn from_halves<R, W>(reader: R, writer: W) -> Stream
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        Stream {
            reader: Box::new(reader),
            writer: Box::new(writer),
            socket: None,
            tunnel: None,
        }
    }

    fn with_socket(mut self, socket: Option<OwnedFd>) -> Stream {
        self.socket = socket;
        self
    }

    /// Use any connected bidirectional stream.
    pub fn from_io<S>(io: S) -> Stream
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(io);
        Stream::from_halves(r, w)
    }

    /// Use an already-connected socket (or other stream fd). The fd is
    /// made non-blocking and owned by the stream. Must be called from
    /// within a tokio runtime.
    pub fn from_fd(fd: OwnedFd) -> Result<Stream> {
        let dup = fd.try_clone().ok();
        let s = FdStream::new(fd).map_err(|e| Error::io("register fd", e))?;
        Ok(Stream::from_io(s).with_socket(dup))
    }
}

async fn connect_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if let Some(name) = bytes.strip_prefix(b"\0") {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            s.set_nonblocking(true)?;
            return tokio::net::UnixStream::from_std(s);
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract Unix sockets are only supported on Linux",
            ));
        }
    }
    tokio::net::UnixStream::connect(path).await
}

#[cfg(any(target_os = "linux", target_os = "android"))]
async fn connect_vsock(cid: u32, port: u32) -> io::Result<FdStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = VsockAddr::new(cid, port);
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let afd = register(fd)?;
            let _ = afd.writable().await?;
            let err = socket::getsockopt(afd.get_ref(), socket::sockopt::SocketError)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
            return Ok(FdStream { fd: afd });
        }
        Err(e) => return Err(e.into()),
    }
    FdStream::new(fd)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
async fn connect_vsock(_cid: u32, _port: u32) -> io::Result<FdStream> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "vsock is only supported on Linux",
    ))
}

/// Shut down both directions of a socket (so the peer sees EOF at
/// once, whoever still holds the socket open).
pub(crate) fn shutdown_socket(fd: &OwnedFd) {
    // SAFETY: shutdown on an fd we own; errors (not a socket, not
    // connected) do not matter.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// A non-blocking stream fd driven by the tokio reactor.
struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    fn new(fd: OwnedFd) -> io::Result<FdStream> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(FdStream { fd: register(fd)? })
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open, and stays the same fd until the
    // AsyncFd that owns it is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with no pointers involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: reading into a valid, initialised buffer.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| {
                // SAFETY: writing from a valid buffer.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown on an fd we own. Not a socket: nothing to do.
        let r = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOTSOCK) && e.raw_os_error() != Some(libc::ENOTCONN)
            {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}
