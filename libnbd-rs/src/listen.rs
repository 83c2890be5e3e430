//! Listening sockets for the server: TCP, Unix, and sockets inherited by
//! systemd socket activation (`LISTEN_PID`/`LISTEN_FDS`), each accepted
//! connection served on its own task.

use std::os::fd::{FromRawFd, RawFd};

use nix::sys::socket::SockaddrLike;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use crate::server::{self, ServerConfig};

/// A listening socket.
pub enum Listener {
    /// TCP (IPv4 or IPv6).
    Tcp(TcpListener),
    /// A Unix domain socket.
    Unix(UnixListener),
}

/// The first fd systemd passes.
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// The listening sockets passed by socket activation, if `LISTEN_PID` is
/// our pid and `LISTEN_FDS` is set. The variables are removed so children
/// do not inherit them.
pub fn activation_fds() -> Option<Vec<RawFd>> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if n <= 0 {
        return None;
    }
    Some((SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n).collect())
}

impl Listener {
    /// Adopt an inherited listening socket, detecting its family.
    ///
    /// Must be called from within a tokio runtime. The fd is owned by the
    /// returned listener.
    pub fn from_fd(fd: RawFd) -> std::io::Result<Listener> {
        let family = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd)
            .map_err(std::io::Error::from)?
            .family();
        // Safety: the fd was passed to us to own (socket activation).
        if family == Some(nix::sys::socket::AddressFamily::Unix) {
            let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            Ok(Listener::Unix(UnixListener::from_std(l)?))
        } else {
            let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            Ok(Listener::Tcp(TcpListener::from_std(l)?))
        }
    }

    /// Accept connections and serve each on its own task until a shutdown
    /// is requested. Accept errors (EMFILE and the like) are reported and
    /// retried after a pause rather than ending the server.
    pub async fn run(self, cfg: Arc<ServerConfig>) {
        loop {
            let accepted = tokio::select! {
                a = self.accept(cfg.clone()) => a,
                _ = cfg.server.shutdown_requested() => return,
            };
            if let Err(e) = accepted {
                crate::elog!("nbdkit: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    async fn accept(&self, cfg: Arc<ServerConfig>) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                if cfg.keepalive {
                    let _ = nix::sys::socket::setsockopt(
                        &s,
                        nix::sys::socket::sockopt::KeepAlive,
                        &true,
                    );
                }
                let (r, w) = s.into_split();
                let peer = server::Peer {
                    addr: Some(peer),
                    cred: None,
                };
                tokio::spawn(server::serve(cfg, r, w, peer));
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let peer = server::Peer {
                    addr: None,
                    cred: crate::backend::PeerCred::of_socket(std::os::fd::AsRawFd::as_raw_fd(&s)),
                };
                let (r, w) = s.into_split();
                tokio::spawn(server::serve(cfg, r, w, peer));
            }
        }
        Ok(())
    }
}
