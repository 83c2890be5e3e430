//! # memory: a virtual RAM disk
//!
//! Serves a single disk image held in memory, initially all zeroes and
//! thrown away when the server exits. Every connection sees the same
//! disk.
//!
//! ```text
//! nbdkit memory 1G
//! nbdkit memory $(( 2**63 - 1 ))
//! nbdkit memory size=64M allocator=malloc,mlock=true
//! nbdkit memory 10G allocator=zstd
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE` (required): the virtual size, in nbdkit's size syntax
//!   (`1G`, `512M`, `2048s`, ...), up to 2^63-1 bytes.
//! - `allocator=sparse` (default): a sparse page table of 32 KiB pages;
//!   only pages with data use memory, so the virtual size can be huge.
//! - `allocator=malloc[,mlock=true]`: one flat allocation of the whole
//!   size (optionally locked into RAM); not sparse.
//! - `allocator=zstd`: the sparse page table with every page compressed
//!   by zstd: about half the memory for typical disk data, some CPU more.
//!
//! ## Behaviour
//!
//! Writable; flush and FUA are no-ops; trim and zero (including fast
//! zero) free whole pages and clear partial ones; extents report absent
//! pages as holes reading as zeroes; multi-conn is safe; cache is a no-op.
//! See [`crate::sparse`] for the store itself.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigError, ConfigResult, Handle, OpenContext, Params, Plugin, PluginEntry, Result};

use crate::sparse::{Allocator, Store, StoreHandle};

/// The registry entry of the memory plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "memory",
    help: "size=<SIZE>  (required) Size of the backing disk\n\
           allocator=sparse|...    Backend allocation strategy",
    magic: Some("size"),
    create,
};

/// The configured memory plugin: one store shared by all connections.
pub struct MemoryPlugin {
    store: Arc<Store>,
}

/// Build the memory plugin from `size=` and `allocator=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let size = params.take_size("size")?;
    let alloc = match params.take("allocator") {
        Some(a) => Allocator::parse(&a)?,
        None => Allocator::Sparse,
    };
    let size = size.ok_or_else(|| {
        ConfigError::new("memory: you must specify size=<SIZE> on the command line")
    })?;
    let store = Store::new(alloc, size)?;
    Ok(Arc::new(MemoryPlugin {
        store: Arc::new(store),
    }))
}

#[async_trait]
impl Plugin for MemoryPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(StoreHandle::new(self.store.clone())))
    }
    fn after_fork(&self, _: &Arc<libnbd::server::ServerContext>) -> Result<()> {
        self.store.lock()
    }
    fn dump(&self) -> Vec<(String, String)> {
        vec![
            ("mlock".into(), "yes".into()),
            ("zstd".into(), "yes".into()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::backend::HOLE_ZERO;
    use libnbd::testing::open_plugin;
    use libnbd::{Cache, Extents, Flags, Fua};

    fn map_of(e: &Extents) -> Vec<(u64, u64, u32)> {
        e.list()
            .iter()
            .map(|x| (x.offset, x.length, x.flags))
            .collect()
    }

    #[test]
    fn config_errors() {
        let err = |args: &[&str]| {
            let mut p = Params::parse(args, Some("size")).unwrap();
            ENTRY.configure(&mut p).err().expect("should fail").0
        };
        assert!(err(&[]).contains("size"));
        assert!(err(&["1M", "foo=bar"]).contains("unknown parameter 'foo'"));
        assert!(err(&["1M", "allocator=bogus"]).contains("unknown allocator"));
        assert!(err(&["8E"]).contains("size"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn capabilities() {
        for alloc in ["allocator=sparse", "allocator=malloc", "allocator=zstd"] {
            let h = open_plugin(&ENTRY, &["1M", alloc]).await;
            assert_eq!(h.size().unwrap(), 1 << 20);
            assert!(h.caps().unwrap().write);
            assert!(h.caps().unwrap().flush);
            assert!(h.caps().unwrap().trim);
            assert!(h.caps().unwrap().zero);
            assert!(h.caps().unwrap().fast_zero);
            assert!(h.caps().unwrap().extents);
            assert!(h.caps().unwrap().multi_conn);
            assert!(!h.caps().unwrap().rotational);
            assert_eq!(h.caps().unwrap().fua, Fua::Native);
            assert_eq!(h.caps().unwrap().cache, Cache::Native);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn read_write_zero_extents() {
        let h = open_plugin(&ENTRY, &["size=1M"]).await;
        let mut e = Extents::new(0, 1 << 20);
        h.extents(1 << 20, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(map_of(&e), vec![(0, 1 << 20, HOLE_ZERO)]);

        h.pwrite(b"abc", 40000, Flags::FUA).await.unwrap();
        let mut b = [1u8; 5];
        h.pread(&mut b, 39999, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"\0abc\0");
        let mut e = Extents::new(0, 1 << 20);
        h.extents(1 << 20, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(
            map_of(&e),
            vec![
                (0, 32768, HOLE_ZERO),
                (32768, 32768, 0),
                (65536, (1 << 20) - 65536, HOLE_ZERO)
            ]
        );
        // REQ_ONE: the first extent is complete.
        let mut e = Extents::new(32768, 1 << 20);
        h.extents((1 << 20) - 32768, 32768, Flags::REQ_ONE, &mut e)
            .await
            .unwrap();
        assert_eq!(e.list()[0].length, 32768);

        h.zero(1, 40001, Flags::FAST_ZERO).await.unwrap();
        h.pread(&mut b, 39999, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"\0a\0c\0");
        h.trim(10, 40000, Flags::NONE).await.unwrap();
        let mut e = Extents::new(0, 1 << 20);
        h.extents(1 << 20, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(map_of(&e), vec![(0, 1 << 20, HOLE_ZERO)]);
        h.flush(Flags::NONE).await.unwrap();
        h.cache(4096, 0, Flags::NONE).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn shared_between_connections() {
        let mut p = Params::parse(&["1M"], Some("size")).unwrap();
        let plugin = ENTRY.configure(&mut p).unwrap();
        let a = plugin.open(&OpenContext::default()).await.unwrap();
        let b = plugin.open(&OpenContext::default()).await.unwrap();
        a.pwrite(b"shared", 1000, Flags::NONE).await.unwrap();
        let mut buf = [0u8; 6];
        b.pread(&mut buf, 1000, Flags::NONE).await.unwrap();
        assert_eq!(&buf, b"shared");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn largest_size() {
        let size = i64::MAX as u64;
        let h = open_plugin(&ENTRY, &[&size.to_string()]).await;
        assert_eq!(h.size().unwrap(), size);
        // Write at the very end and read it back.
        h.pwrite(b"end!", size - 4, Flags::NONE).await.unwrap();
        let mut b = [0u8; 8];
        h.pread(&mut b, size - 8, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"\0\0\0\0end!");
        // The beginning is one big hole, found without scanning.
        let mut e = Extents::new(0, size);
        h.extents(size, 0, Flags::NONE, &mut e).await.unwrap();
        let last_page = (size / 32768) * 32768;
        assert_eq!(
            map_of(&e),
            vec![(0, last_page, HOLE_ZERO), (last_page, size - last_page, 0)]
        );
        h.zero(4, size - 4, Flags::NONE).await.unwrap();
        let mut e = Extents::new(0, size);
        h.extents(size, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(map_of(&e), vec![(0, size, HOLE_ZERO)]);
        // Bad requests are errors, never panics.
        assert!(h.pwrite(b"x", size, Flags::NONE).await.is_err());
        assert!(h.pread(&mut b, u64::MAX - 3, Flags::NONE).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_connections() {
        let mut p = Params::parse(&["16M"], Some("size")).unwrap();
        let plugin = ENTRY.configure(&mut p).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let h: Arc<dyn Handle> = Arc::from(plugin.open(&OpenContext::default()).await.unwrap());
            tasks.push(tokio::spawn(async move {
                let buf = vec![t + 1; 100_000];
                for i in 0..20u64 {
                    let off = (i * 8 + t as u64) * 100_000;
                    h.pwrite(&buf, off, Flags::NONE).await.unwrap();
                    let mut back = vec![0u8; 100_000];
                    h.pread(&mut back, off, Flags::NONE).await.unwrap();
                    assert_eq!(back, buf);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}
