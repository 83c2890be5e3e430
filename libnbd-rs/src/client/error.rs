//! The client's error type.

use std::io;
use std::sync::Arc;

use crate::protocol::{cmd, errno, opt, rep};
use crate::uri::UriError;

/// Result of client operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong on the client side.
///
/// The type is `Clone` because a connection that fails fails every
/// request in flight with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket or process error.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing (`connect: localhost:10809`, ...).
        context: String,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },

    /// The server broke the protocol; the connection is closed.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// The server answered a request with an error.
    #[error("{}", server_error_message(command, *offset, *count, *errno, message))]
    Server {
        /// The request: `pread`, `pwrite`, `flush`, `trim`, `zero`,
        /// `cache` or `block_status`.
        command: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        count: u64,
        /// The NBD error number (`protocol::errno`).
        errno: u32,
        /// The server's message, empty if it sent none.
        message: String,
        /// Where the error happened, if the server said
        /// (`NBD_REPLY_TYPE_ERROR_OFFSET`).
        error_offset: Option<u64>,
    },

    /// The server refused an option during negotiation.
    #[error("{}: server replied {}{}", opt::name(*option), rep_name(*reply), colon(message))]
    OptionRefused {
        /// The option (`protocol::opt`).
        option: u32,
        /// The error reply (`protocol::rep::ERR_*`).
        reply: u32,
        /// The server's message, empty if it sent none.
        message: String,
    },

    /// The server (or this library) does not support what was asked.
    #[error("{0}")]
    Unsupported(String),

    /// A bad argument: misaligned request, flag not allowed for a
    /// command, name too long, ...
    #[error("{0}")]
    InvalidArgument(String),

    /// The connection was closed by [`disconnect`](super::Connection::disconnect)
    /// or because the server is shutting down.
    #[error("the connection is closed")]
    Closed,

    /// TLS failed: bad credentials, a refused STARTTLS when TLS is
    /// required, a failed handshake (wrong CA, wrong key, ...).
    #[error("TLS: {0}")]
    Tls(String),

    /// A malformed NBD URI.
    #[error("{0}")]
    Uri(#[from] UriError),
}

impl Error {
    /// An I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// The NBD error number this error corresponds to, if any:
    /// the server's for [`Error::Server`], `EINVAL` for invalid
    /// arguments, `ENOTSUP` for unsupported operations.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Server { errno, .. } => Some(*errno),
            Error::InvalidArgument(_) => Some(errno::EINVAL),
            Error::Unsupported(_) => Some(errno::ENOTSUP),
            Error::Closed => Some(errno::ESHUTDOWN),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Server { errno, .. } => {
                io::Error::from_raw_os_error(errno::to_host(*errno)).kind()
            }
            Error::InvalidArgument(_) | Error::Uri(_) => io::ErrorKind::InvalidInput,
            Error::Unsupported(_) => io::ErrorKind::Unsupported,
            Error::Closed => io::ErrorKind::NotConnected,
            Error::Protocol(_) => io::ErrorKind::InvalidData,
            Error::OptionRefused { .. } => io::ErrorKind::ConnectionRefused,
            Error::Tls(_) => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e)
    }
}

/// The name of an option reply type, like `NBD_REP_ERR_UNKNOWN`.
pub fn rep_name(r: u32) -> String {
    let s = match r {
        rep::ACK => "NBD_REP_ACK",
        rep::SERVER => "NBD_REP_SERVER",
        rep::INFO => "NBD_REP_INFO",
        rep::META_CONTEXT => "NBD_REP_META_CONTEXT",
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => return format!("unknown reply type {r:#x}"),
    };
    s.to_string()
}

/// The symbolic name of an NBD error number (`EINVAL`, ...).
pub fn errno_name(e: u32) -> &'static str {
    match e {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// `strerror` for an NBD error, without std's "(os error N)" suffix.
pub fn errno_text(e: u32) -> String {
    let s = errno::describe(e);
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The API name of a command, as used in error messages.
pub(crate) fn command_name(c: u16) -> &'static str {
    match c {
        cmd::READ => "pread",
        cmd::WRITE => "pwrite",
        cmd::FLUSH => "flush",
        cmd::TRIM => "trim",
        cmd::CACHE => "cache",
        cmd::WRITE_ZEROES => "zero",
        cmd::BLOCK_STATUS => "block_status",
        cmd::DISC => "disconnect",
        _ => "unknown command",
    }
}

fn colon(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

fn server_error_message(command: &str, offset: u64, count: u64, e: u32, message: &str) -> String {
    format!(
        "{command}: offset {offset}, count {count}: server error {} ({}){}",
        errno_name(e),
        errno_text(e),
        colon(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = Error::Server {
            command: "pread",
            offset: 1048576,
            count: 512,
            errno: errno::EINVAL,
            message: "out of range".into(),
            error_offset: None,
        };
        assert_eq!(
            e.to_string(),
            "pread: offset 1048576, count 512: server error EINVAL (Invalid argument): out of range"
        );
        assert_eq!(e.errno(), Some(errno::EINVAL));
        let e = Error::OptionRefused {
            option: opt::GO,
            reply: rep::ERR_UNKNOWN,
            message: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "NBD_OPT_GO: server replied NBD_REP_ERR_UNKNOWN"
        );
        assert_eq!(rep_name(rep::ERR | 99), "unknown reply type 0x80000063");
        let io: io::Error = Error::Closed.into();
        assert_eq!(io.kind(), io::ErrorKind::NotConnected);
    }
}
