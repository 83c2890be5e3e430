//! The NBD client: connect, negotiate, and run many requests at once on
//! one connection (or several, with [`MultiConn`]).
//!
//! ```no_run
//! # async fn f() -> libnbd::client::Result<()> {
//! use libnbd::client::{ConnectOptions, Connection};
//! use libnbd::protocol::cmdflag;
//!
//! let c = Connection::connect_uri("nbd+unix:///?socket=/tmp/sock", &ConnectOptions::new()).await?;
//! println!("{} bytes, {}", c.size(), c.protocol());
//! c.pwrite(&[1; 4096], 0, cmdflag::FUA).await?;
//! let data = c.pread_vec(4096, 0, 0).await?;
//! let map = c.block_status(c.size(), 0, 0).await?;
//! c.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! - [`Negotiation`]: the handshake and option mode (list exports, list
//!   meta contexts, ask about several exports, then go);
//! - [`Connection`]: the transmission phase;
//! - [`MultiConn`]: round-robin over several connections;
//! - [`Stream`] and [`Transport`]: sockets (TCP, Unix, vsock, ssh
//!   tunnels, fds);
//! - [`Error`]: what can go wrong.
//!
//! Captive servers (`[ qemu-nbd -f qcow2 disk.qcow2 ]`) are in
//! [`crate::captive`], URIs in [`crate::uri`].

mod error;
mod multi;
mod negotiate;
mod reply;
mod stream;
mod transmit;
mod types;

#[cfg(test)]
mod fake_tests;
#[cfg(test)]
mod integration_tests;

pub use crate::backend::ExportEntry;
pub use crate::protocol::cmdflag;
pub use error::{errno_name, errno_text, rep_name, Error, Result};
pub use multi::MultiConn;
pub use negotiate::Negotiation;
pub(crate) use stream::shutdown_socket;
pub use stream::{
    BoxRead, BoxWrite, SshRemote, SshTarget, Stream, Transport, DEFAULT_PORT, DEFAULT_SSH_PORT,
    VSOCK_CID_HOST,
};
pub use transmit::{Connection, DEFAULT_MAX_PAYLOAD, MAX_EFFECT_LENGTH, MAX_STATUS_LENGTH};
pub use types::{
    BlockSizes, BlockStatus, ClientTlsOptions, ConnectOptions, ContextStatus, ExportInfo,
    MetaContext, Stats, StatusExtent, TlsPolicy, TransmissionFlags,
};
