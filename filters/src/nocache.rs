//! # nocache: turn off or change the client's cache (prefetch) requests
//!
//! `NBD_CMD_CACHE` asks the server to prefetch a range. This filter
//! hides, emulates or ignores it, to measure what the layers' own cache
//! handling is worth (it is unrelated to the cache filter, which caches
//! reads and writes; the two can be combined).
//!
//! ```text
//! nbdkit --filter=nocache file disk.img
//! nbdkit --filter=nocache file disk.img cachemode=nop
//! ```
//!
//! ## Parameters
//!
//! - `cachemode=none` (default): cache support is not advertised.
//! - `cachemode=emulate`: cache requests are done by reading the range
//!   from the layer below (and dropping the data), whatever the layer
//!   below does with cache requests itself.
//! - `cachemode=nop`: cache requests are accepted and ignored at once.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "nocache",
    help: "cachemode=<MODE>     Either 'none' (default), 'emulate', or 'nop'.",
    create,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Emulate,
    Nop,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mode = match p.take("cachemode").as_deref() {
        None | Some("none") => Mode::None,
        Some("emulate") => Mode::Emulate,
        Some("nop") => Mode::Nop,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown cachemode '{v}' (none, emulate or nop)"
            )))
        }
    };
    Ok(Arc::new(NoCache(mode)))
}

struct NoCache(Mode);

#[async_trait]
impl Filter for NoCache {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NoCacheHandle {
            next: next.open(ctx).await?,
            mode: self.0,
        }))
    }
}

struct NoCacheHandle {
    next: Box<dyn Handle>,
    mode: Mode,
}

/// Bytes read at a time when emulating a cache request.
const CHUNK: u64 = 1 << 20;

#[async_trait]
impl Handle for NoCacheHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        let cache = match self.mode {
            Mode::None => Cache::None,
            Mode::Emulate => Cache::Emulate,
            Mode::Nop => Cache::Native,
        };
        Ok(Caps {
            cache,
            ..self.next.caps()?
        })
    }
    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        match self.mode {
            // The server does not send what is not advertised.
            Mode::None => Err(libnbd::Error::einval("nocache: cache is not supported")),
            Mode::Nop => Ok(()),
            Mode::Emulate => {
                let mut buf = vec![0u8; count.min(CHUNK) as usize];
                let mut done = 0;
                while done < count {
                    let n = (count - done).min(CHUNK) as usize;
                    self.next
                        .pread(&mut buf[..n], offset + done, Flags::NONE)
                        .await?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    async fn open(words: &[&str]) -> (Box<dyn Handle>, Arc<Mem>) {
        let mem = Mem::new(4 << 20);
        let s = stack(vec![create(&mut params(words)).unwrap()], &mem);
        (s.open(&ctx(1)).await.unwrap(), mem)
    }

    #[tokio::test]
    async fn nocache_modes() {
        let (h, _) = open(&[]).await;
        assert_eq!(h.caps().unwrap().cache, Cache::None);
        let (h, mem) = open(&["cachemode=nop"]).await;
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
        h.cache(4096, 0, Flags::NONE).await.unwrap();
        assert!(mem.take_calls().is_empty());
        let (h, mem) = open(&["cachemode=emulate"]).await;
        assert_eq!(h.caps().unwrap().cache, Cache::Emulate);
        h.cache(CHUNK + 512, 512, Flags::NONE).await.unwrap();
        assert_eq!(
            mem.take_calls(),
            vec![
                format!("pread 512 {CHUNK}"),
                format!("pread {} 512", CHUNK + 512)
            ]
        );
        assert!(create(&mut params(&["cachemode=all"])).is_err());
    }
}
