//! # null: a bit bucket
//!
//! Everything written is thrown away and every read returns zeroes.
//! Useful for testing clients and as the plugin under filters that
//! generate their own data.
//!
//! ```text
//! nbdkit null 1G
//! nbdkit null            # a zero-sized disk
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE` (optional, default 0): the virtual size, in nbdkit's
//!   size syntax, up to 2^63-1 bytes.
//!
//! ## Behaviour
//!
//! Writable; writes, trim, zero (including fast zero), flush, FUA and
//! cache all succeed at once without doing anything; extents report the
//! whole disk as a hole reading as zeroes; multi-conn is safe.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    Caps, ConfigResult, Extents, Flags, Handle, OpenContext, Params, Plugin, PluginEntry, Result,
};

/// The registry entry of the null plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "null",
    help: "size=<SIZE>             Size of the backing disk",
    magic: Some("size"),
    create,
};

/// The configured null plugin.
pub struct NullPlugin {
    size: u64,
}

/// Build the null plugin from `size=` (default 0).
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let size = params.take_size("size")?.unwrap_or(0);
    Ok(Arc::new(NullPlugin { size }))
}

#[async_trait]
impl Plugin for NullPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NullHandle { size: self.size }))
    }
}

/// A connection to the null plugin.
pub struct NullHandle {
    size: u64,
}

#[async_trait]
impl Handle for NullHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps::FULL)
    }

    async fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    async fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
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
    use libnbd::testing::open_plugin;
    use libnbd::{Cache, Fua};

    #[tokio::test]
    async fn null_disk() {
        let h = open_plugin(&ENTRY, &["1M"]).await;
        assert_eq!(h.size().unwrap(), 1 << 20);
        assert!(h.caps().unwrap().write && h.caps().unwrap().flush && h.caps().unwrap().trim);
        assert!(h.caps().unwrap().zero && h.caps().unwrap().fast_zero && h.caps().unwrap().extents);
        assert!(h.caps().unwrap().multi_conn);
        assert_eq!(h.caps().unwrap().fua, Fua::Native);
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
        h.pwrite(b"data", 0, Flags::FUA).await.unwrap();
        let mut b = [9u8; 16];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert_eq!(b, [0u8; 16]);
        h.zero(100, 0, Flags::FAST_ZERO).await.unwrap();
        h.trim(100, 0, Flags::NONE).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        let mut e = Extents::new(0, 1 << 20);
        h.extents(1 << 20, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(e.list().len(), 1);
        assert_eq!(e.list()[0].length, 1 << 20);
        assert_eq!(e.list()[0].flags, HOLE_ZERO);
    }

    #[tokio::test]
    async fn default_size_and_errors() {
        assert_eq!(open_plugin::<&str>(&ENTRY, &[]).await.size().unwrap(), 0);
        assert_eq!(open_plugin(&ENTRY, &["size=5"]).await.size().unwrap(), 5);
        let mut p = Params::parse(&["1M", "x=1"], Some("size")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
        let mut p = Params::parse(&["lots"], Some("size")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
    }
}
