//! # retry-request: retry a failed request on the same connection
//!
//! A request that fails is tried again, after a pause, up to a number of
//! times before its error goes to the client; so is opening the layers
//! below. This suits plugins that fail now and then (a curl plugin
//! behind a load balancer with a bad backend). The retry filter is the
//! heavier alternative: it reopens the layers below after a failure.
//!
//! ```text
//! nbdkit --filter=retry-request curl https://example.com/disk.img
//! nbdkit --filter=retry-request curl https://example.com/disk.img \
//!     retry-request-retries=5 retry-request-delay=1 retry-request-open=false
//! ```
//!
//! ## Parameters
//!
//! - `retry-request-retries=N`: retries of one request before giving up
//!   (default 2, at most 1000; 0 turns retrying off).
//! - `retry-request-delay=N`: whole seconds to wait before each retry
//!   (default 2, at least 1).
//! - `retry-request-open=false`: do not retry opening the layers below
//!   (default true: a failed open is retried like a request).
//!
//! ## Behaviour
//!
//! Every data request is retried whatever its error (read, write, trim,
//! zero, flush, extents, cache); the last error is the one the client
//! sees.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Extents, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "retry-request",
    help: "\
retry-request-retries=<N> Number of retries (default: 2).
retry-request-delay=<N>   Seconds to wait before retry (default: 2).
retry-request-open=false  Do not retry opening the plugin (default: true).",
    create,
};

/// The most retries nbdkit accepts.
const MAX_RETRIES: u32 = 1000;

#[derive(Debug, Clone, Copy)]
struct Config {
    retries: u32,
    delay: Duration,
    open: bool,
}

/// A non-negative integer parameter (nbdkit_parse_unsigned's messages).
fn unsigned(p: &mut Params, key: &str) -> ConfigResult<Option<u32>> {
    let Some(v) = p.take(key) else {
        return Ok(None);
    };
    let t = v.trim();
    if t.starts_with('-') {
        return Err(ConfigError::new(format!(
            "{key}: negative numbers are not allowed"
        )));
    }
    t.parse::<u32>()
        .map(Some)
        .map_err(|_| ConfigError::new(format!("{key}: could not parse number: \"{v}\"")))
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let retries = unsigned(p, "retry-request-retries")?.unwrap_or(2);
    if retries > MAX_RETRIES {
        return Err(ConfigError::new("retry-request-retries: value too large"));
    }
    let delay = unsigned(p, "retry-request-delay")?.unwrap_or(2);
    if delay == 0 {
        return Err(ConfigError::new("retry-request-delay cannot be 0"));
    }
    let open = p.take_bool("retry-request-open")?.unwrap_or(true);
    Ok(Arc::new(RetryRequest(Config {
        retries,
        delay: Duration::from_secs(delay.into()),
        open,
    })))
}

struct RetryRequest(Config);

impl Config {
    /// Run `f` until it succeeds or the retries are spent.
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut tried = 0;
        loop {
            match f().await {
                Err(e) if tried < self.retries => {
                    tried += 1;
                    libnbd::debug!(
                        "retry-request: {what}: retry {tried}: original error: {}",
                        e.msg
                    );
                    tokio::time::sleep(self.delay).await;
                }
                r => return r,
            }
        }
    }
}

#[async_trait]
impl Filter for RetryRequest {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = if self.0.open {
            self.0.retry("open", || next.open(ctx)).await?
        } else {
            next.open(ctx).await?
        };
        Ok(Box::new(RetryRequestHandle { next, cfg: self.0 }))
    }
}

struct RetryRequestHandle {
    next: Box<dyn Handle>,
    cfg: Config,
}

#[async_trait]
impl Handle for RetryRequestHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        // The closure cannot lend `buf` to each attempt's future, so the
        // loop is spelled out here.
        let mut tried = 0;
        loop {
            match self.next.pread(buf, offset, flags).await {
                Err(e) if tried < self.cfg.retries => {
                    tried += 1;
                    libnbd::debug!(
                        "retry-request: pread: retry {tried}: original error: {}",
                        e.msg
                    );
                    tokio::time::sleep(self.cfg.delay).await;
                }
                r => return r,
            }
        }
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.cfg
            .retry("pwrite", || self.next.pwrite(buf, offset, flags))
            .await
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        self.cfg.retry("flush", || self.next.flush(flags)).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.cfg
            .retry("trim", || self.next.trim(count, offset, flags))
            .await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.cfg
            .retry("zero", || self.next.zero(count, offset, flags))
            .await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.cfg
            .retry("cache", || self.next.cache(count, offset, flags))
            .await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        // A failed attempt may have added some extents: start each
        // attempt from what there was.
        let start = ext.clone();
        let mut tried = 0;
        loop {
            match self.next.extents(count, offset, flags, ext).await {
                Err(e) if tried < self.cfg.retries => {
                    tried += 1;
                    libnbd::debug!(
                        "retry-request: extents: retry {tried}: original error: {}",
                        e.msg
                    );
                    ext.clone_from(&start);
                    tokio::time::sleep(self.cfg.delay).await;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use std::sync::atomic::Ordering;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut params(words)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn retry_request_retries_then_gives_up() {
        let mem = Mem::with(vec![7; 4096]);
        let s = stack(vec![filter(&["retry-request-delay=1"])], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        mem.fail.store(2, Ordering::SeqCst);
        let t = tokio::time::Instant::now();
        assert_eq!(read(&*h, 0, 4).await, vec![7; 4]);
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        assert_eq!(mem.take_calls().len(), 3);
        mem.fail.store(3, Ordering::SeqCst);
        assert!(h.pwrite(&[1], 0, Flags::NONE).await.is_err());
        assert_eq!(mem.take_calls().len(), 3, "first try and 2 retries");
        mem.fail.store(1, Ordering::SeqCst);
        assert_eq!(extents(&*h, 0, 1024).await, vec![(0, 1024, 0)]);
        mem.fail.store(1, Ordering::SeqCst);
        h.flush(Flags::NONE).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retry_request_zero_retries_and_config() {
        let mem = Mem::new(4096);
        let s = stack(vec![filter(&["retry-request-retries=0"])], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        mem.fail.store(1, Ordering::SeqCst);
        assert!(h.zero(512, 0, Flags::NONE).await.is_err());
        assert_eq!(mem.take_calls().len(), 1);
        for (bad, msg) in [
            ("retry-request-delay=0", "cannot be 0"),
            ("retry-request-delay=-1", "negative"),
            ("retry-request-delay=0.5", "could not parse"),
            ("retry-request-retries=1001", "too large"),
            ("retry-request-open=maybe", "boolean"),
        ] {
            let e = create(&mut params(&[bad])).err().unwrap();
            assert!(e.0.contains(msg), "{bad}: {}", e.0);
        }
        filter(&["retry-request-retries=1000", "retry-request-open=false"]);
    }
}
