//! # checkwrite: check that writes match what is already there
//!
//! Every write-like request becomes a check: a write succeeds (doing
//! nothing) if its data equals what the layer below holds, a zero or
//! trim if the range already reads as zeroes; anything else fails with
//! EIO. The layers below are opened read-only and never written. It is
//! for testing copying tools: copy an export onto itself and a correct
//! tool sees no error.
//!
//! ```text
//! nbdkit -U - --filter=checkwrite data "@32768 1" --run 'nbdcopy "$uri" "$uri"'
//! nbdkit -U - --filter=checkwrite file disk.img --run 'qemu-img convert -n "$uri" "$uri"'
//! ```
//!
//! ## Parameters
//!
//! There are no parameters; all of them go to the layers below.
//!
//! ## Behaviour
//!
//! The check is of logical content, not sparseness: zeroes written over
//! a hole and a zero request over written zeroes both pass. A zero or
//! trim first asks the layer below for extents, so ranges it reports as
//! zero are not read; a fast zero over data fails at once with ENOTSUP,
//! since checking it would mean reading. Flush and FUA do nothing (there
//! is nothing to make durable); the export advertises write, flush, FUA,
//! trim, zero and fast zero whatever the layers below can do.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::protocol::alloc;
use libnbd::{
    Caps, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Fua, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "checkwrite",
    help: "",
    create,
};

fn create(_: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(CheckWrite))
}

struct CheckWrite;

#[async_trait]
impl Filter for CheckWrite {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let below = OpenContext {
            readonly: true,
            ..ctx.clone()
        };
        let next = next.open(&below).await?;
        let extents = next.caps()?.extents;
        Ok(Box::new(CheckWriteHandle { next, extents }))
    }
}

struct CheckWriteHandle {
    next: Box<dyn Handle>,
    /// Are the layer's extents worth asking?
    extents: bool,
}

/// Bytes read at a time when checking for zeroes.
const CHUNK: u64 = 1 << 20;

fn mismatch() -> Error {
    Error::eio("data written does not match expected")
}

impl CheckWriteHandle {
    /// Check that `[offset, offset+count)` reads as zeroes.
    async fn read_zeroes(&self, count: u64, offset: u64) -> Result<()> {
        let mut buf = vec![0u8; count.min(CHUNK) as usize];
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK) as usize;
            self.next
                .pread(&mut buf[..n], offset + done, Flags::NONE)
                .await?;
            if !libnbd::zeroes::is_zero(&buf[..n]) {
                return Err(mismatch());
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Check that a zero (or trim) of the range changes nothing: what the
    /// layer below reports as zero is taken as such, the rest is read
    /// (or, for a fast zero, refused).
    async fn check_zero(&self, count: u64, offset: u64, fast: bool) -> Result<()> {
        let end = offset + count;
        if !self.extents {
            if fast {
                return Err(Error::enotsup("checkwrite: fast zero would need a read"));
            }
            return self.read_zeroes(count, offset).await;
        }
        let mut at = offset;
        while at < end {
            let mut ext = Extents::new(at, end);
            self.next
                .extents(end - at, at, Flags::NONE, &mut ext)
                .await?;
            if ext.list().is_empty() {
                // Nothing known: the rest is data to read.
                ext.add(at, end - at, 0)?;
            }
            for e in ext.list() {
                if e.flags & alloc::ZERO != 0 {
                    continue;
                }
                if fast {
                    return Err(Error::enotsup("checkwrite: fast zero would need a read"));
                }
                self.read_zeroes(e.length, e.offset).await?;
            }
            at = ext.next_offset();
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for CheckWriteHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: true,
            flush: true,
            trim: true,
            zero: true,
            fast_zero: true,
            fua: Fua::Native,
            ..self.next.caps()?
        })
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let mut old = vec![0u8; buf.len()];
        self.next.pread(&mut old, offset, Flags::NONE).await?;
        if old != buf {
            return Err(mismatch());
        }
        Ok(())
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check_zero(count, offset, flags.contains(Flags::FAST_ZERO))
            .await
    }
    async fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.check_zero(count, offset, false).await
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::protocol::errno;

    async fn open() -> (Box<dyn Handle>, Arc<Mem>) {
        let mut data = vec![0u8; 4096];
        data[..3].copy_from_slice(&[1, 2, 3]);
        let mem = Mem::with(data);
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        (s.open(&ctx(1)).await.unwrap(), mem)
    }

    #[tokio::test]
    async fn checkwrite_checks_writes() {
        let (h, mem) = open().await;
        assert_eq!(
            *mem.opened_readonly
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![true]
        );
        let c = h.caps().unwrap();
        assert!(c.write && c.flush && c.trim && c.zero && c.fast_zero);
        h.pwrite(&[1, 2, 3], 0, Flags::FUA).await.unwrap();
        let e = h.pwrite(&[1, 2, 4], 0, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, errno::EIO);
        h.flush(Flags::NONE).await.unwrap();
        let calls = mem.take_calls();
        assert_eq!(calls, vec!["pread 0 3", "pread 0 3"], "never written");
    }

    #[tokio::test]
    async fn checkwrite_zero_uses_extents() {
        let (h, mem) = open().await;
        // A hole (by the test plugin's 512-byte extents): no read.
        h.zero(1024, 2048, Flags::FAST_ZERO).await.unwrap();
        assert_eq!(mem.take_calls(), vec!["extents 2048 1024"]);
        // Data that is not zero.
        assert_eq!(
            h.zero(512, 0, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        assert_eq!(
            h.zero(512, 0, Flags::FAST_ZERO).await.unwrap_err().errno,
            errno::ENOTSUP
        );
        assert_eq!(
            h.trim(4096, 0, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        // Data that reads as zeroes passes.
        mem.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[..3]
            .fill(0);
        h.trim(4096, 0, Flags::NONE).await.unwrap();
    }
}
