//! # readonly: make the layers below read-only, always or while a file exists
//!
//! Without a parameter the export is read-only, as with `nbdkit -r`, and
//! the layers below are opened read-only. With `readonly-file=PATHNAME`
//! the export stays writable as far as clients are told, but every write,
//! trim and zero fails with EPERM while `PATHNAME` exists: creating and
//! removing the file switches write protection at run time. (This is
//! nbdkit 1.38's filter.)
//!
//! ```text
//! nbdkit --filter=readonly file disk.img
//! rm -f /tmp/ro
//! nbdkit --filter=readonly file disk.img readonly-file=/tmp/ro
//! sleep 60; touch /tmp/ro
//! ```
//!
//! ## Parameters
//!
//! - `readonly-file=PATHNAME`: while `PATHNAME` exists, requests that
//!   would change the data are refused; when it does not, they go
//!   through. Without this parameter the export is always read-only.
//!
//! ## Behaviour
//!
//! Flush is never refused: writes made before the file appeared may
//! still need it. The file is looked at by each write, trim and zero
//! request, so the switch takes effect for the next request (a request
//! already past the check completes). The protect filter write-protects
//! parts of an export instead.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "readonly",
    help: "readonly-file=FILENAME         If FILENAME present, set to readonly",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mut files = p.take_all("readonly-file");
    if files.len() > 1 {
        return Err(ConfigError::new(
            "readonly-file parameter appears multiple times",
        ));
    }
    Ok(Arc::new(ReadOnly {
        file: files.pop().map(PathBuf::from).map(Arc::new),
    }))
}

struct ReadOnly {
    /// The switch file; `None`: always read-only.
    file: Option<Arc<PathBuf>>,
}

#[async_trait]
impl Filter for ReadOnly {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        // Permanently read-only: the layers below may do better knowing
        // it. With a switch file they must stay writable.
        let below = OpenContext {
            readonly: ctx.readonly || self.file.is_none(),
            ..ctx.clone()
        };
        Ok(Box::new(ReadOnlyHandle {
            next: next.open(&below).await?,
            file: self.file.clone(),
        }))
    }
}

struct ReadOnlyHandle {
    next: Box<dyn Handle>,
    file: Option<Arc<PathBuf>>,
}

impl ReadOnlyHandle {
    /// Refuse `what` while read-only.
    async fn check(&self, what: &str) -> Result<()> {
        let refused = match &self.file {
            None => true,
            // An error looking (a directory on the way we may not search)
            // counts as present: refusing is the safe side.
            Some(f) => tokio::fs::try_exists(&**f).await.unwrap_or(true),
        };
        if refused {
            return Err(Error::eperm(format!(
                "{what} operation rejected by readonly filter"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for ReadOnlyHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        let next = self.next.caps()?;
        Ok(Caps {
            write: next.write && self.file.is_some(),
            ..next
        })
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check("pwrite").await?;
        self.next.pwrite(buf, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("trim").await?;
        self.next.trim(count, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("zero").await?;
        self.next.zero(count, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::protocol::errno;

    #[tokio::test]
    async fn readonly_without_file_is_always_read_only() {
        let mem = Mem::new(4096);
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert!(!h.caps().unwrap().write);
        assert_eq!(
            *mem.opened_readonly
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![true]
        );
        let e = h.pwrite(&[1], 0, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, errno::EPERM);
        h.flush(Flags::NONE).await.unwrap();
        assert_eq!(read(&*h, 0, 1).await, vec![0]);
    }

    #[tokio::test]
    async fn readonly_file_switches_at_run_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ro");
        let word = format!("readonly-file={}", file.display());
        let mem = Mem::new(4096);
        let s = stack(vec![create(&mut params(&[&word])).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert!(h.caps().unwrap().write);
        assert_eq!(
            *mem.opened_readonly
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![false]
        );
        h.pwrite(&[1], 0, Flags::NONE).await.unwrap();
        std::fs::write(&file, b"").unwrap();
        for e in [
            h.pwrite(&[2], 0, Flags::NONE).await.unwrap_err(),
            h.zero(1, 0, Flags::NONE).await.unwrap_err(),
            h.trim(1, 0, Flags::NONE).await.unwrap_err(),
        ] {
            assert_eq!(e.errno, errno::EPERM, "{}", e.msg);
        }
        h.flush(Flags::NONE).await.unwrap();
        std::fs::remove_file(&file).unwrap();
        h.zero(1, 0, Flags::NONE).await.unwrap();
        assert_eq!(mem.take_calls(), vec!["pwrite 0 1", "flush", "zero 0 1"]);
        assert!(create(&mut params(&[&word, &word])).is_err());
    }
}
