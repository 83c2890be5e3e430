//! # nofilter: pass every request through unchanged
//!
//! A filter that does nothing: every call goes to the layer below as it
//! came. It is there for testing the server's filter plumbing and for
//! scripts that always name a filter.
//!
//! ```text
//! nbdkit --filter=nofilter memory 1G
//! ```
//!
//! ## Parameters
//!
//! There are no parameters; all of them go to the layers below.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigResult, Filter, FilterEntry, Handle, Next, OpenContext, Params, Result};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "nofilter",
    help: "",
    create,
};

fn create(_: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(NoFilter))
}

struct NoFilter;

#[async_trait]
impl Filter for NoFilter {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        // The layers' own handle is this filter's: every Handle method
        // of it already is what passing through would be.
        next.open(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::Flags;

    #[tokio::test]
    async fn nofilter_passes_everything() {
        let mem = Mem::with(vec![3; 4096]);
        let mut p = params(&["size=1"]);
        let s = stack(vec![create(&mut p).unwrap()], &mem);
        assert_eq!(p.items().len(), 1, "nofilter takes no parameters");
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(h.size().unwrap(), 4096);
        h.pwrite(&[9; 512], 512, Flags::FUA).await.unwrap();
        assert_eq!(read(&*h, 512, 2).await, vec![9, 9]);
        h.flush(Flags::NONE).await.unwrap();
        assert_eq!(
            mem.take_calls(),
            vec!["pwrite 512 512 fua", "pread 512 2", "flush"]
        );
    }
}
