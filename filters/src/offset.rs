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
use libnbd::{
    ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next, OpenContext, Params,
    Result,
};

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

/// A handle serving the bytes `[start, start+len)` of the layer below as
/// an export of `len` bytes (the offset and partition filters).
pub(crate) struct Window {
    next: Box<dyn Handle>,
    start: u64,
    len: u64,
}

impl Window {
    /// A window of `len` bytes from `start` (the caller checked that it
    /// lies within `next`).
    pub(crate) fn new(next: Box<dyn Handle>, start: u64, len: u64) -> Self {
        Window { next, start, len }
    }

    /// The underlying offset of a request, checked against the window.
    fn shift(&self, offset: u64, count: u64) -> Result<u64> {
        match offset.checked_add(count) {
            Some(end) if end <= self.len => Ok(self.start + offset),
            _ => Err(Error::einval(format!(
                "request at {offset} for {count} bytes is beyond the end of the export ({} bytes)",
                self.len
            ))),
        }
    }
}

/// Ask `next` for the extents of `[offset, offset+count)` and add them to
/// `ext` shifted down by `shift` (so `offset` appears as `offset - shift`).
pub(crate) async fn shifted_extents(
    next: &dyn Handle,
    count: u64,
    offset: u64,
    shift: u64,
    flags: Flags,
    ext: &mut Extents,
) -> Result<()> {
    let mut below = Extents::new(offset, offset + count);
    next.extents(count, offset, flags, &mut below).await?;
    for e in below.list() {
        ext.add(e.offset - shift, e.length, e.flags)?;
    }
    Ok(())
}

#[async_trait]
impl Handle for Window {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.len)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let at = self.shift(offset, buf.len() as u64)?;
        self.next.pread(buf, at, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let at = self.shift(offset, buf.len() as u64)?;
        self.next.pwrite(buf, at, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let at = self.shift(offset, count)?;
        self.next.trim(count, at, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let at = self.shift(offset, count)?;
        self.next.zero(count, at, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let at = self.shift(offset, count)?;
        shifted_extents(&*self.next, count, at, self.start, flags, ext).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let at = self.shift(offset, count)?;
        self.next.cache(count, at, flags).await
    }
}

/// A small plugin for the filters' unit tests: memory that records the
/// calls it gets, with knobs to make it fail.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use libnbd::backend::HOLE_ZERO;
    use libnbd::{
        Caps, Error, Extents, Filter, Flags, Fua, Handle, OpenContext, Params, Plugin, Result,
        Stack,
    };

    /// The shared state of every handle of a [`MemPlugin`].
    pub struct Mem {
        /// The bytes.
        pub data: Mutex<Vec<u8>>,
        /// Calls received, as `"pwrite 0 512 fua"` and so on.
        pub calls: Mutex<Vec<String>>,
        /// Fail this many data calls (any kind) with EIO, then succeed.
        pub fail: AtomicUsize,
        /// Handles opened so far.
        pub opens: AtomicUsize,
        /// Handles open now.
        pub live: AtomicUsize,
        /// Read-only contexts seen by open, in order.
        pub readonly_opens: Mutex<Vec<bool>>,
        /// FUA support.
        pub fua: Fua,
        /// Native zero support.
        pub zero: bool,
        /// Fast zero support.
        pub fast_zero: bool,
    }

    impl Mem {
        /// Memory of `size` bytes.
        pub fn new(size: usize) -> Arc<Mem> {
            Self::with(vec![0; size])
        }
        /// Memory with these contents.
        pub fn with(data: Vec<u8>) -> Arc<Mem> {
            Arc::new(Mem {
                data: Mutex::new(data),
                calls: Mutex::new(Vec::new()),
                fail: AtomicUsize::new(0),
                opens: AtomicUsize::new(0),
                live: AtomicUsize::new(0),
                readonly_opens: Mutex::new(Vec::new()),
                fua: Fua::Native,
                zero: true,
                fast_zero: true,
            })
        }
        /// The calls so far, clearing the list.
        pub fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
        fn record(&self, s: String) -> Result<()> {
            self.calls.lock().unwrap().push(s);
            let left = self.fail.load(Ordering::SeqCst);
            if left > 0 {
                self.fail.store(left - 1, Ordering::SeqCst);
                return Err(Error::eio("test plugin: injected failure"));
            }
            Ok(())
        }
    }

    fn fl(flags: Flags) -> String {
        let mut s = String::new();
        for (f, n) in [
            (Flags::FUA, " fua"),
            (Flags::MAY_TRIM, " may_trim"),
            (Flags::FAST_ZERO, " fast"),
            (Flags::REQ_ONE, " req_one"),
        ] {
            if flags.contains(f) {
                s.push_str(n);
            }
        }
        s
    }

    /// The plugin.
    pub struct MemPlugin(pub Arc<Mem>);

    struct MemHandle {
        mem: Arc<Mem>,
        readonly: bool,
    }

    impl Drop for MemHandle {
        fn drop(&mut self) {
            self.mem.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Plugin for MemPlugin {
        async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
            self.0.opens.fetch_add(1, Ordering::SeqCst);
            self.0.live.fetch_add(1, Ordering::SeqCst);
            self.0.readonly_opens.lock().unwrap().push(ctx.readonly);
            Ok(Box::new(MemHandle {
                mem: self.0.clone(),
                readonly: ctx.readonly,
            }))
        }
    }

    fn range(len: usize, count: u64, offset: u64) -> Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(count)
            .filter(|e| *e <= len as u64)
            .ok_or_else(|| Error::einval("test plugin: out of range"))?;
        Ok(offset as usize..end as usize)
    }

    #[async_trait]
    impl Handle for MemHandle {
        fn size(&self) -> Result<u64> {
            Ok(self.mem.data.lock().unwrap().len() as u64)
        }
        fn caps(&self) -> Result<Caps> {
            Ok(Caps {
                write: !self.readonly,
                zero: self.mem.zero,
                fast_zero: self.mem.fast_zero,
                fua: self.mem.fua,
                ..Caps::FULL
            })
        }
        async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
            self.mem.record(format!("pread {offset} {}", buf.len()))?;
            let d = self.mem.data.lock().unwrap();
            let r = range(d.len(), buf.len() as u64, offset)?;
            buf.copy_from_slice(&d[r]);
            Ok(())
        }
        async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
            self.mem
                .record(format!("pwrite {offset} {}{}", buf.len(), fl(flags)))?;
            let mut d = self.mem.data.lock().unwrap();
            let r = range(d.len(), buf.len() as u64, offset)?;
            d[r].copy_from_slice(buf);
            Ok(())
        }
        async fn flush(&self, _flags: Flags) -> Result<()> {
            self.mem.record("flush".into())
        }
        async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.mem
                .record(format!("trim {offset} {count}{}", fl(flags)))?;
            let mut d = self.mem.data.lock().unwrap();
            let r = range(d.len(), count, offset)?;
            d[r].fill(0);
            Ok(())
        }
        async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
            self.mem
                .record(format!("zero {offset} {count}{}", fl(flags)))?;
            let mut d = self.mem.data.lock().unwrap();
            let r = range(d.len(), count, offset)?;
            d[r].fill(0);
            Ok(())
        }
        async fn extents(
            &self,
            count: u64,
            offset: u64,
            flags: Flags,
            ext: &mut Extents,
        ) -> Result<()> {
            self.mem
                .record(format!("extents {offset} {count}{}", fl(flags)))?;
            let d = self.mem.data.lock().unwrap();
            range(d.len(), count, offset)?;
            // 512-byte blocks: all zero is a hole, anything else data.
            let mut b = offset / 512 * 512;
            while b < offset + count && b < d.len() as u64 {
                let e = (b + 512).min(d.len() as u64);
                let zero = d[b as usize..e as usize].iter().all(|x| *x == 0);
                ext.add(b, e - b, if zero { HOLE_ZERO } else { 0 })?;
                b = e;
            }
            Ok(())
        }
        async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
            self.mem.record(format!("cache {offset} {count}"))
        }
    }

    /// Parameters from `key=value` words.
    pub fn params(words: &[&str]) -> Params {
        Params::parse(words, None).unwrap()
    }

    /// A stack of these filters over the memory.
    pub fn stack(filters: Vec<Arc<dyn Filter>>, mem: &Arc<Mem>) -> Stack {
        Stack {
            filters,
            plugin: Arc::new(MemPlugin(mem.clone())),
        }
    }

    /// A context for connection `id`.
    pub fn ctx(id: u64) -> OpenContext {
        OpenContext {
            readonly: false,
            export_name: String::new(),
            peer: None,
            tls: false,
            id,
        }
    }

    /// Read `len` bytes at `offset` through a handle.
    pub async fn read(h: &dyn Handle, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0xaa; len];
        h.pread(&mut b, offset, Flags::NONE).await?;
        Ok(b)
    }

    /// The extents of `[offset, offset+count)` through a handle.
    pub async fn extents(h: &dyn Handle, offset: u64, count: u64) -> Result<Vec<(u64, u64, u32)>> {
        let mut e = Extents::new(offset, offset + count);
        h.extents(count, offset, Flags::NONE, &mut e).await?;
        Ok(e.list()
            .iter()
            .map(|x| (x.offset, x.length, x.flags))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use libnbd::backend::HOLE_ZERO;

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
        assert_eq!(read(&*h, 0, 512).await.unwrap(), vec![7; 512]);
        h.pwrite(&[9; 512], 1536, Flags::FUA).await.unwrap();
        assert_eq!(mem.data.lock().unwrap()[2560..3072], [9; 512]);
        assert_eq!(
            extents(&*h, 0, 2048).await.unwrap(),
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
