//! # zero: a zero-length disk
//!
//! Serves a read-only virtual disk of length zero bytes, for testing
//! corner cases of servers, the NBD protocol and clients. It takes no
//! parameters.
//!
//! ```text
//! nbdkit zero
//! ```
//!
//! ## Behaviour
//!
//! As nbdkit 1.32's zero plugin: size 0, read-only, no flush, trim or
//! zero; multi-conn is safe and cache is a no-op. (Every request is out
//! of bounds, so the server rejects them before they get here; a read of
//! nothing returns nothing.)

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Cache, ConfigError, ConfigResult, Flags, Handle, OpenContext, Params, Plugin, PluginEntry,
    Result,
};

/// The registry entry of the zero plugin (no parameters, no magic key).
pub fn entry() -> PluginEntry {
    PluginEntry {
        name: "zero",
        help: "",
        magic: None,
        create,
    }
}

/// The zero plugin.
pub struct ZeroPlugin;

/// Build the zero plugin, which takes no parameters.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    if !params.items().is_empty() {
        return Err(ConfigError::new(
            "zero: this plugin does not need command line configuration",
        ));
    }
    params.finish("zero")?;
    Ok(Arc::new(ZeroPlugin))
}

#[async_trait]
impl Plugin for ZeroPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ZeroHandle))
    }
}

/// A connection to the zero plugin.
pub struct ZeroHandle;

#[async_trait]
impl Handle for ZeroHandle {
    fn size(&self) -> Result<u64> {
        Ok(0)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_cache(&self) -> Result<Cache> {
        Ok(Cache::Native)
    }
    async fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn zero_disk() {
        let mut p = Params::parse::<&str>(&[], None).unwrap();
        let h = create(&mut p)
            .unwrap()
            .open(&OpenContext::default())
            .await
            .unwrap();
        assert_eq!(h.size().unwrap(), 0);
        assert!(!h.can_write().unwrap());
        assert!(!h.can_flush().unwrap());
        assert!(!h.can_trim().unwrap());
        assert!(!h.can_zero().unwrap());
        assert!(!h.can_extents().unwrap());
        assert!(h.can_multi_conn().unwrap());
        assert_eq!(h.can_cache().unwrap(), Cache::Native);
        h.pread(&mut [], 0, Flags::NONE).await.unwrap();
        assert!(h.pwrite(b"x", 0, Flags::NONE).await.is_err());
    }

    #[test]
    fn no_parameters() {
        let mut p = Params::parse(&["size=1"], None).unwrap();
        let e = create(&mut p).err().unwrap();
        assert!(e.0.contains("does not need"));
        assert!(Params::parse(&["1M"], None).is_err());
    }
}
