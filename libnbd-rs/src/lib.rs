//! libnbd-rs: a pure-Rust Network Block Device library.
//!
//! - [`protocol`]: wire constants and encoding, no I/O;
//! - [`backend`]: the plugin and filter contract and the filter stack;
//! - [`config`]: `key=value` parameters, sizes, the registry entries;
//! - [`server`]: handshake and concurrent transmission for one client;
//! - [`listen`]: listening sockets (TCP, Unix, socket activation);
//! - [`client`]: the async client (negotiation, pipelined transmission);
//! - [`uri`]: NBD URIs;
//! - [`captive`]: servers run as subprocesses (`[ cmd args ]`);
//! - [`tls`]: TLS for both sides (X.509 and PSK);
//! - [`zeroes`]: zero detection;
//! - [`testing`]: what the test suites share (is a peer installed?).
#![warn(missing_docs)]

/// Print a line on stderr in one write, as `eprintln!` does but without
/// its piecewise writes (stderr is unbuffered, so `eprintln!` writes each
/// piece of its format on its own, and a `--run` command's output or
/// another process's log could land in the middle of our line).
#[macro_export]
macro_rules! elog {
    () => {
        $crate::stderr_line(::std::format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stderr_line(::std::format_args!($($arg)*))
    };
}

/// The line [`elog!`] prints.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut s = args.to_string();
    s.push('\n');
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

pub mod backend;
pub mod captive;
pub mod client;
pub mod config;
pub mod listen;
pub mod protocol;
pub mod server;
pub mod testing;
pub mod tls;
pub mod trace;
pub mod uri;
pub mod zeroes;

pub use backend::{
    run_blocking, BlockSize, Cache, Caps, Disconnect, Error, ExportEntry, Extent, Extents, Filter,
    Flags, Fua, Handle, Next, OpenContext, OwnedNext, PeerCred, Plugin, Result, SharedData, Stack,
    ThreadModel,
};
pub use config::{
    parse_bool, parse_size, ConfigError, ConfigResult, FilterEntry, Params, PluginEntry,
};
