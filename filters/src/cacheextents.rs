//! # cacheextents: remember the last extents answer
//!
//! The answer of the last extents request that reached the layers below
//! is kept, and later requests that start inside it are answered from
//! it. This helps clients that walk the image asking for one extent at a
//! time (`qemu-img convert`, `qemu-img map`) over a plugin that can
//! report many extents for the price of one (the vddk and curl plugins,
//! say).
//!
//! ```text
//! nbdkit -U - --filter=cacheextents --run 'qemu-img map $nbd' file disk.img
//! ```
//!
//! ## Parameters
//!
//! There are no parameters; all of them go to the layers below.
//!
//! ## Behaviour
//!
//! Only metadata is cached (put the cache filter before this one to
//! cache data as well). The layers below are asked without the client's
//! "one extent only" flag, so that one answer covers as much as they
//! report; whatever they report past the range asked for is kept too.
//! Any write, zero or trim, on any connection, forgets the answer; the
//! answer is shared by all connections to the same export.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use libnbd::{
    ConfigResult, Extent, Extents, Filter, FilterEntry, Flags, Handle, Next, OpenContext, Params,
    Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "cacheextents",
    help: "",
    create,
};

fn create(_: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(CacheExtents {
        shared: Arc::new(Mutex::new(Cached::default())),
    }))
}

/// The remembered answer, shared by every connection.
#[derive(Default)]
struct Cached {
    /// Bumped by every write-like request, before and after it, so an
    /// answer fetched while one was running is not kept.
    generation: u64,
    /// The export the answer is of.
    export: String,
    /// The extents, contiguous; empty when nothing is remembered.
    list: Vec<Extent>,
}

impl Cached {
    /// The remembered extents from `offset` on, if `offset` is inside.
    fn lookup(&self, export: &str, offset: u64) -> Option<Vec<Extent>> {
        let (first, last) = (self.list.first()?, self.list.last()?);
        if self.export != export || offset < first.offset || offset >= last.offset + last.length {
            return None;
        }
        Some(
            self.list
                .iter()
                .filter(|e| e.offset + e.length > offset)
                .copied()
                .collect(),
        )
    }
}

struct CacheExtents {
    shared: Arc<Mutex<Cached>>,
}

#[async_trait]
impl Filter for CacheExtents {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(CacheExtentsHandle {
            next: next.open(ctx).await?,
            shared: self.shared.clone(),
            export: ctx.export_name.clone(),
        }))
    }
}

struct CacheExtentsHandle {
    next: Box<dyn Handle>,
    shared: Arc<Mutex<Cached>>,
    export: String,
}

impl CacheExtentsHandle {
    fn cached(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Forget the answer around a write-like request.
    async fn invalidating<F: std::future::Future<Output = Result<()>>>(&self, f: F) -> Result<()> {
        self.forget();
        let r = f.await;
        self.forget();
        r
    }
    fn forget(&self) {
        let mut c = self.cached();
        c.generation += 1;
        c.list.clear();
    }
}

#[async_trait]
impl Handle for CacheExtentsHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let (hit, generation) = {
            let c = self.cached();
            (c.lookup(&self.export, offset), c.generation)
        };
        if let Some(list) = hit {
            for e in list {
                ext.add(e.offset, e.length, e.flags)?;
            }
            return Ok(());
        }
        // Room for everything the layers below care to report.
        let mut fresh = Extents::new(offset, self.next.size()?.max(offset + count));
        self.next
            .extents(count, offset, flags.without(Flags::REQ_ONE), &mut fresh)
            .await?;
        for e in fresh.list() {
            ext.add(e.offset, e.length, e.flags)?;
        }
        let mut c = self.cached();
        if c.generation == generation {
            c.export.clone_from(&self.export);
            c.list = fresh.into_list();
        }
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.invalidating(self.next.pwrite(buf, offset, flags))
            .await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.invalidating(self.next.zero(count, offset, flags))
            .await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.invalidating(self.next.trim(count, offset, flags))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::backend::HOLE_ZERO;

    #[tokio::test]
    async fn cacheextents_answers_from_the_last_answer() {
        let mut data = vec![0u8; 4096];
        data[1024..1536].fill(1);
        let mem = Mem::with(data);
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        let a = s.open(&ctx(1)).await.unwrap();
        let b = s.open(&ctx(2)).await.unwrap();
        assert_eq!(
            extents(&*a, 0, 4096).await,
            vec![
                (0, 1024, HOLE_ZERO),
                (1024, 512, 0),
                (1536, 2560, HOLE_ZERO)
            ]
        );
        assert_eq!(mem.take_calls(), vec!["extents 0 4096"]);
        // Inside the answer, on any connection: not asked again.
        assert_eq!(extents(&*b, 1100, 100).await, vec![(1100, 100, 0)]);
        let mut e = Extents::new(2000, 2100);
        a.extents(100, 2000, Flags::REQ_ONE, &mut e).await.unwrap();
        assert_eq!(e.list().len(), 1);
        assert!(mem.take_calls().is_empty());
        // A write anywhere forgets it; the next request asks, without
        // REQ_ONE.
        b.pwrite(&[2; 512], 0, Flags::NONE).await.unwrap();
        let mut e = Extents::new(0, 512);
        a.extents(512, 0, Flags::REQ_ONE, &mut e).await.unwrap();
        assert_eq!(e.list()[0].flags, 0);
        assert_eq!(mem.take_calls(), vec!["pwrite 0 512", "extents 0 512"]);
        // Another export's connection does not see this export's answer.
        let other = OpenContext {
            export_name: "other".into(),
            ..ctx(3)
        };
        let c = s.open(&other).await.unwrap();
        extents(&*c, 0, 512).await;
        assert_eq!(mem.take_calls(), vec!["extents 0 512"]);
    }
}
