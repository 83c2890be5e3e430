//! A window on the layer below: the bytes `[start, start+len)` of it
//! served as an export of `len` bytes, requests shifted there and extents
//! shifted back. The offset and partition filters are this window, placed
//! by a parameter or by a partition table.

use async_trait::async_trait;
use libnbd::{Error, Extents, Flags, Handle, Result};

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
async fn shifted_extents(
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
