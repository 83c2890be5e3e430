//! # noextents: hide which parts of the export are sparse
//!
//! Clients that ask for block status (`base:allocation`) are told the
//! whole export is allocated data, and the layers below are never asked.
//! This can help with a plugin whose extents are slow to compute (the
//! file plugin on tmpfs, say), or to test clients. Running nbdkit with
//! `--no-sr` also stops clients from asking, along with everything else
//! structured replies bring.
//!
//! ```text
//! nbdkit --filter=noextents file disk.img
//! ```
//!
//! ## Parameters
//!
//! There are no parameters.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigResult, Extents, Filter, FilterEntry, Flags, Handle, Next, OpenContext, Params,
    Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "noextents",
    help: "",
    create,
};

fn create(_: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(NoExtents))
}

struct NoExtents;

#[async_trait]
impl Filter for NoExtents {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NoExtentsHandle {
            next: next.open(ctx).await?,
        }))
    }
}

struct NoExtentsHandle {
    next: Box<dyn Handle>,
}

#[async_trait]
impl Handle for NoExtentsHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            extents: false,
            ..self.next.caps()?
        })
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        ext.add(offset, count, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offset::testing::*;

    #[tokio::test]
    async fn noextents_reports_all_data() {
        let mem = Mem::new(4096);
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert!(!h.caps().unwrap().extents);
        assert_eq!(extents(&*h, 512, 1024).await.unwrap(), vec![(512, 1024, 0)]);
        assert!(mem.take_calls().is_empty());
    }
}
