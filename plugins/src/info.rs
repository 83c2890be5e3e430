//! # info: serve information about the client and server
//!
//! A test plugin whose disk holds information about the connection: the
//! export name the client asked for (raw or base64-decoded), the
//! client's address, or the server's wallclock time, uptime or the time
//! since the connection was opened.
//!
//! ```text
//! nbdkit info                       # nbd://localhost/hello is 5 bytes "hello"
//! nbdkit info mode=base64exportname # nbd://localhost/aGVsbG8= too
//! nbdkit info time --run 'nbdsh -u "$uri" -c "print(h.pread(12, 0))"'
//! ```
//!
//! ## Parameters
//!
//! - `[mode=]exportname` (the default): the disk is the raw export name.
//! - `[mode=]base64exportname`: the export name is base64 (whitespace
//!   ignored, padding required), the disk is what it decodes to; a name
//!   that is not valid base64 makes the open fail.
//! - `[mode=]address`: the client's address and port as text
//!   (`127.0.0.1:40000`, `[::1]:40000`), or `unix` for Unix sockets.
//! - `[mode=]time`: 12 bytes, the wallclock time as seconds since the
//!   Epoch (64-bit big endian) then microseconds (32-bit big endian),
//!   taken at each read; read all 12 bytes in one request to read them
//!   atomically.
//! - `[mode=]uptime`: the same format, the time since the server
//!   started.
//! - `[mode=]conntime`: the same format, the time since this connection
//!   was opened.
//!
//! ## Behaviour
//!
//! Read-only (add the cow filter to write); extents are not advertised
//! (everything is data); cache is a no-op. Multi-conn is advertised in
//! the export name modes, whose data are the same on every connection to
//! the same export, and not in the others.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Error, Flags, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

/// The registry entry of the info plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "info",
    help: "mode=exportname|base64exportname|address|time|uptime|conntime\n\
           \x20                       Plugin mode (default exportname).",
    magic: Some("mode"),
    create,
};

/// What the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The raw export name.
    ExportName,
    /// The export name, base64-decoded.
    Base64ExportName,
    /// The client's address.
    Address,
    /// Server wallclock time.
    Time,
    /// Server uptime.
    Uptime,
    /// Time since the connection opened.
    ConnTime,
}

/// The configured info plugin.
pub struct InfoPlugin {
    mode: Mode,
    started: Instant,
}

/// Build the plugin from `mode=` (default `exportname`).
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let mode = match params.take("mode").as_deref() {
        None => Mode::ExportName,
        Some(m) => match m.to_ascii_lowercase().as_str() {
            "exportname" | "export-name" => Mode::ExportName,
            "base64exportname" | "base64-export-name" => Mode::Base64ExportName,
            "address" => Mode::Address,
            "time" => Mode::Time,
            "uptime" => Mode::Uptime,
            "conntime" => Mode::ConnTime,
            _ => return Err(ConfigError::new(format!("unknown mode: '{m}'"))),
        },
    };
    Ok(Arc::new(InfoPlugin {
        mode,
        started: Instant::now(),
    }))
}

/// Decode base64 as GnuTLS does for nbdkit: whitespace is skipped, the
/// rest must be whole groups of 4 with `=` padding only at the end and
/// unused bits zero.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let chars: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(chars).ok()
}

/// A duration as the 12 bytes of the time modes.
fn time_bytes(d: Duration) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&d.as_secs().to_be_bytes());
    b[8..].copy_from_slice(&d.subsec_micros().to_be_bytes());
    b
}

#[async_trait]
impl Plugin for InfoPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let data = match self.mode {
            Mode::ExportName => ctx.export_name.as_bytes().to_vec(),
            Mode::Base64ExportName => base64_decode(&ctx.export_name)
                .ok_or_else(|| Error::einval("base64: Base64 decoding error."))?,
            Mode::Address => match ctx.peer {
                Some(a) => a.to_string().into_bytes(),
                None => b"unix".to_vec(),
            },
            Mode::Time | Mode::Uptime | Mode::ConnTime => Vec::new(),
        };
        Ok(Box::new(InfoHandle {
            mode: self.mode,
            data,
            started: self.started,
            opened: Instant::now(),
        }))
    }
    /// As upstream's: both optional modes are available.
    fn dump(&self) -> Vec<(String, String)> {
        vec![
            ("info_address".into(), "yes".into()),
            ("info_base64".into(), "yes".into()),
        ]
    }
}

/// A connection to the info plugin.
pub struct InfoHandle {
    mode: Mode,
    /// The disk, in the modes fixed at open.
    data: Vec<u8>,
    started: Instant,
    opened: Instant,
}

#[async_trait]
impl Handle for InfoHandle {
    fn size(&self) -> Result<u64> {
        Ok(match self.mode {
            Mode::Time | Mode::Uptime | Mode::ConnTime => 12,
            _ => self.data.len() as u64,
        })
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            multi_conn: matches!(self.mode, Mode::ExportName | Mode::Base64ExportName),
            cache: Cache::Native,
            ..Caps::READ_ONLY
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let now;
        let data: &[u8] = match self.mode {
            Mode::Time => {
                let d = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                now = time_bytes(d);
                &now
            }
            Mode::Uptime => {
                now = time_bytes(self.started.elapsed());
                &now
            }
            Mode::ConnTime => {
                now = time_bytes(self.opened.elapsed());
                &now
            }
            _ => &self.data,
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| data.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::einval("read beyond the end of the disk")),
        }
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(args: &[&str], export: &str) -> Result<Box<dyn Handle>> {
        let mut p = Params::parse(args, Some("mode")).unwrap();
        let ctx = OpenContext {
            export_name: export.into(),
            ..OpenContext::default()
        };
        ENTRY.configure(&mut p).unwrap().open(&ctx).await
    }

    async fn read_all(h: &dyn Handle) -> Vec<u8> {
        let mut b = vec![0u8; h.size().unwrap() as usize];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        b
    }

    #[tokio::test]
    async fn export_names() {
        let h = open(&[], "hello").await.unwrap();
        assert_eq!(read_all(&*h).await, b"hello");
        assert!(h.caps().unwrap().multi_conn && !h.caps().unwrap().write);
        let h = open(&["base64exportname"], "aGVs\nbG8=").await.unwrap();
        assert_eq!(read_all(&*h).await, b"hello");
        assert!(open(&["mode=base64exportname"], "aGVsbG8").await.is_err());
        let h = open(&["address"], "").await.unwrap();
        assert_eq!(read_all(&*h).await, b"unix");
        assert!(!h.caps().unwrap().multi_conn);
        let mut p = Params::parse(&["mode=foo"], Some("mode")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
    }

    #[tokio::test]
    async fn times() {
        let h = open(&["time"], "").await.unwrap();
        let b = read_all(&*h).await;
        let secs = u64::from_be_bytes(b[..8].try_into().unwrap());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(secs <= now && secs + 5 >= now, "{secs} {now}");
        assert!(u32::from_be_bytes(b[8..].try_into().unwrap()) < 1_000_000);
        let h = open(&["conntime"], "").await.unwrap();
        let b = read_all(&*h).await;
        assert_eq!(b[..8], [0; 8]);
        let mut tail = [0u8; 4];
        h.pread(&mut tail, 8, Flags::NONE).await.unwrap();
        assert!(u32::from_be_bytes(tail) < 1_000_000);
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbA==").unwrap(), b"hell");
        assert_eq!(base64_decode("QQ==").unwrap(), b"A");
        assert_eq!(base64_decode("").unwrap(), b"");
        for bad in ["QR==", "aGVsbA", "aGVsbG8==", "aGVsbG8=aGVs", "-_8="] {
            assert!(base64_decode(bad).is_none(), "{bad}");
        }
    }
}
