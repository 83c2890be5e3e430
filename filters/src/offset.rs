//! # offset: serve only a byte range of the layer below
//!
//! Requests are limited to `[offset, offset+range)` of the underlying
//! export and shifted there; the client sees an export of `range` bytes
//! (or the rest of the export after `offset` when `range` is not given).
//! Extents are shifted back so they describe the window.
//!
//! ```text
//! nbdkit --filter=offset file disk.img offset=1M range=100M
//! ```
//!
//! ## Parameters
//!
//! - `offset=OFFSET`: where the window starts (default 0).
//! - `range=LENGTH`: how long it is (default: to the end of the export).
//!
//! It is an error (reported when a client connects) if the window does
//! not lie within the underlying export; use the truncate filter to change
//! the size of a plugin. The partition filter serves a partition the same
//! way after finding it in the partition table.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigResult, Error, Filter, FilterEntry, Handle, Next, OpenContext, Params, Result};

use crate::window::Window;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "offset",
    help: "\
offset=<OFFSET>            The start offset to serve (default 0).
range=<LENGTH>             The total size to serve (default rest of file).",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let offset = p.take_size("offset")?.unwrap_or(0);
    let range = p.take_size("range")?;
    Ok(Arc::new(OffsetFilter { offset, range }))
}

struct OffsetFilter {
    offset: u64,
    range: Option<u64>,
}

#[async_trait]
impl Filter for OffsetFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h = next.open(ctx).await?;
        let real = h.size()?;
        let len = match self.range {
            Some(r) => r,
            None => real.checked_sub(self.offset).ok_or_else(|| {
                Error::einval(format!(
                    "offset: offset {} is beyond the end of the underlying export ({real} bytes)",
                    self.offset
                ))
            })?,
        };
        if self.offset.checked_add(len).is_none_or(|end| end > real) {
            return Err(Error::einval(format!(
                "offset: offset {} + range {len} is beyond the end of the underlying export ({real} bytes)",
                self.offset
            )));
        }
        Ok(Box::new(Window::new(h, self.offset, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::backend::HOLE_ZERO;
    use libnbd::Flags;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        let mut p = params(words);
        let f = create(&mut p).unwrap();
        assert!(p.items().is_empty(), "left: {:?}", p.items());
        f
    }

    #[tokio::test]
    async fn offset_shifts_reads_writes_and_extents() {
        let mut data = vec![0u8; 8192];
        data[1024..1536].fill(7);
        let mem = Mem::with(data);
        let s = stack(vec![filter(&["offset=1024", "range=2048"])], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(h.size().unwrap(), 2048);
        assert_eq!(try_read(&*h, 0, 512).await.unwrap(), vec![7; 512]);
        h.pwrite(&[9; 512], 1536, Flags::FUA).await.unwrap();
        assert_eq!(
            mem.data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[2560..3072],
            [9; 512]
        );
        assert_eq!(
            try_extents(&*h, 0, 2048).await.unwrap(),
            vec![(0, 512, 0), (512, 1024, HOLE_ZERO), (1536, 512, 0)]
        );
        h.zero(512, 0, Flags::NONE).await.unwrap();
        h.trim(512, 1536, Flags::NONE).await.unwrap();
        h.cache(512, 512, Flags::NONE).await.unwrap();
        let calls = mem.take_calls();
        assert!(
            calls.contains(&"pwrite 2560 512 fua".to_string()),
            "{calls:?}"
        );
        assert!(calls.contains(&"zero 1024 512".to_string()), "{calls:?}");
        assert!(calls.contains(&"trim 2560 512".to_string()), "{calls:?}");
        assert!(calls.contains(&"cache 1536 512".to_string()), "{calls:?}");
        assert!(h.pread(&mut [0; 2], 2047, Flags::NONE).await.is_err());
    }

    #[tokio::test]
    async fn offset_without_range_serves_the_rest() {
        let mem = Mem::new(4096);
        let s = stack(vec![filter(&["offset=1k"])], &mem);
        assert_eq!(s.open(&ctx(1)).await.unwrap().size().unwrap(), 3072);
        let s = stack(vec![filter(&["range=1000"])], &mem);
        assert_eq!(s.open(&ctx(1)).await.unwrap().size().unwrap(), 1000);
    }

    #[tokio::test]
    async fn offset_beyond_the_end_is_an_error() {
        let mem = Mem::new(4096);
        for w in [
            &["offset=5000"][..],
            &["offset=1024", "range=3073"],
            &["range=5000"],
        ] {
            let s = stack(vec![filter(w)], &mem);
            let e = s.open(&ctx(1)).await.err().expect("must fail");
            assert!(e.msg.contains("beyond the end"), "{}", e.msg);
        }
    }

    #[test]
    fn offset_bad_sizes_are_config_errors() {
        assert!(create(&mut params(&["offset=x"])).is_err());
        assert!(create(&mut params(&["range=-1"])).is_err());
        // Unknown keys are left for the plugin.
        let mut p = params(&["offset=1", "file=x"]);
        create(&mut p).unwrap();
        assert_eq!(p.items().len(), 1);
    }
}
