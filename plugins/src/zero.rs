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
//! ## Parameters
//!
//! There are no parameters.
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
    Cache, Caps, ConfigError, ConfigResult, Flags, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

/// The registry entry of the zero plugin (no parameters, no magic key).
pub const ENTRY: PluginEntry = PluginEntry {
    name: "zero",
    help: "",
    magic: None,
    create,
};

/// The zero plugin.
pub struct ZeroPlugin;

/// Build the zero plugin, which takes no parameters.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    if !params.items().is_empty() {
        return Err(ConfigError::new(
            "zero: this plugin does not need command line configuration",
        ));
    }
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
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            multi_conn: true,
            cache: Cache::Native,
            ..Caps::READ_ONLY
        })
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
        let h = ENTRY
            .configure(&mut p)
            .unwrap()
            .open(&OpenContext::default())
            .await
            .unwrap();
        assert_eq!(h.size().unwrap(), 0);
        assert!(!h.caps().unwrap().write);
        assert!(!h.caps().unwrap().flush);
        assert!(!h.caps().unwrap().trim);
        assert!(!h.caps().unwrap().zero);
        assert!(!h.caps().unwrap().extents);
        assert!(h.caps().unwrap().multi_conn);
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
        h.pread(&mut [], 0, Flags::NONE).await.unwrap();
        assert!(h.pwrite(b"x", 0, Flags::NONE).await.is_err());
    }

    #[test]
    fn no_parameters() {
        let mut p = Params::parse(&["size=1"], None).unwrap();
        let e = ENTRY.configure(&mut p).err().unwrap();
        assert!(e.0.contains("does not need"));
        assert!(Params::parse(&["1M"], None).is_err());
    }
}
