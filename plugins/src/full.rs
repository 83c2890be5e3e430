//! # full: a disk that is always full
//!
//! Reads return zeroes; writes and the similar zero and trim requests
//! fail with `ENOSPC` (no space left on device). It behaves like a
//! thin-provisioned disk whose host has run out of space.
//!
//! ```text
//! nbdkit full 1G
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE` (required): the virtual size, in nbdkit's size syntax,
//!   up to 2^63-1 bytes.
//!
//! ## Behaviour
//!
//! As nbdkit 1.32's full plugin: writable (but every write fails with
//! `ENOSPC`), trim fails with `ENOSPC`, zero is not implemented natively
//! so the server emulates it by writes, which fail with `ENOSPC` (fast
//! zero requests fail at once with `ENOTSUP`); no flush, hence no FUA;
//! extents report the whole disk as a hole reading as zeroes; multi-conn
//! is safe and cache is a no-op.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Extents, Flags, Fua, Handle, OpenContext, Params,
    Plugin, PluginEntry, Result,
};

/// The registry entry of the full plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "full",
    help: "size=<SIZE>  (required) Size of the backing disk",
    magic: Some("size"),
    create,
};

/// The configured full plugin.
pub struct FullPlugin {
    size: u64,
}

/// Build the full plugin from `size=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let size = params.take_size("size")?;
    let size = size.ok_or_else(|| ConfigError::new("full: size parameter is required"))?;
    Ok(Arc::new(FullPlugin { size }))
}

#[async_trait]
impl Plugin for FullPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(FullHandle { size: self.size }))
    }
}

/// A connection to the full plugin.
pub struct FullHandle {
    size: u64,
}

fn full() -> Error {
    Error::enospc("No space left on device")
}

#[async_trait]
impl Handle for FullHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            flush: false,
            zero: false,
            fast_zero: false,
            fua: Fua::None,
            ..Caps::FULL
        })
    }

    async fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    async fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Err(full())
    }
    async fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(full())
    }
    async fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(full())
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        ext.add(offset, count, HOLE_ZERO)
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::protocol::errno;
    use libnbd::{Fua, Stack};

    #[tokio::test]
    async fn full_disk() {
        let mut p = Params::parse(&["1M"], Some("size")).unwrap();
        let h = ENTRY
            .configure(&mut p)
            .unwrap()
            .open(&OpenContext::default())
            .await
            .unwrap();
        assert_eq!(h.size().unwrap(), 1 << 20);
        assert!(h.caps().unwrap().write && h.caps().unwrap().trim && h.caps().unwrap().extents);
        assert!(!h.caps().unwrap().zero && !h.caps().unwrap().flush);
        assert_eq!(h.caps().unwrap().fua, Fua::None);
        assert!(h.caps().unwrap().multi_conn);
        let mut b = [7u8; 8];
        h.pread(&mut b, 100, Flags::NONE).await.unwrap();
        assert_eq!(b, [0; 8]);
        assert_eq!(
            h.pwrite(b"x", 0, Flags::NONE).await.unwrap_err().errno,
            errno::ENOSPC
        );
        assert_eq!(
            h.trim(1, 0, Flags::NONE).await.unwrap_err().errno,
            errno::ENOSPC
        );
        let mut e = Extents::new(0, 1 << 20);
        h.extents(1 << 20, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(e.list()[0].flags, HOLE_ZERO);
    }

    #[tokio::test]
    async fn emulated_zero_fails_with_enospc() {
        let mut p = Params::parse(&["1M"], Some("size")).unwrap();
        let stack = Stack {
            filters: vec![],
            plugin: ENTRY.configure(&mut p).unwrap(),
        };
        let h = stack.open(&OpenContext::default()).await.unwrap();
        assert!(h.caps().unwrap().zero && h.caps().unwrap().fast_zero);
        assert!(!h.caps().unwrap().flush);
        assert_eq!(h.caps().unwrap().fua, Fua::None);
        assert_eq!(
            h.zero(10, 0, Flags::NONE).await.unwrap_err().errno,
            errno::ENOSPC
        );
        assert_eq!(
            h.zero(10, 0, Flags::FAST_ZERO).await.unwrap_err().errno,
            errno::ENOTSUP
        );
    }

    #[test]
    fn size_required() {
        let mut p = Params::parse::<&str>(&[], Some("size")).unwrap();
        assert!(ENTRY
            .configure(&mut p)
            .err()
            .unwrap()
            .0
            .contains("required"));
    }
}
