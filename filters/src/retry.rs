//! # retry: reopen the layers below when a request fails
//!
//! When a request fails, the filter waits, closes its handle of the
//! layers below, opens a new one (as if a client had connected again) and
//! retries the request, up to a number of times; only then does the client
//! see the error. This can make a long copy survive a temporary failure of
//! a remote source (an SSH or HTTP connection dropped, a firewall
//! restarted) without changes to the plugin or the client.
//!
//! ```text
//! nbdkit -U - --filter=retry curl https://example.com/disk.iso \
//!     --run 'nbdcopy $uri disk.iso'
//! ```
//!
//! ## Parameters
//!
//! - `retries=N`: how many times one request is retried before its error
//!   goes to the client (default 5).
//! - `retry-delay=N`: seconds to wait before the first retry (default 2;
//!   fractions are allowed).
//! - `retry-exponential=yes|no`: double the delay after each retry
//!   (default yes; with the defaults all retries take about a minute).
//! - `retry-readonly=yes|no`: reopen the layers below read-only after the
//!   first failure, for the rest of the connection (default no); writes
//!   then fail with EPERM (EROFS) without being retried.
//!
//! After a reopen the export must still be large enough for the request,
//! else the request fails. Requests already in flight when a reopen
//! happens finish on the old handle; concurrent failures share one
//! reopen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use libnbd::{
    BlockSize, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle,
    Next, OpenContext, OwnedNext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "retry",
    help: "\
retries=<N>              Number of retries (default: 5).
retry-delay=<N>          Seconds to wait before retry (default: 2).
retry-exponential=yes|no Exponential back-off (default: yes).
retry-readonly=yes|no    Force read-only on failure (default: no).",
    create,
};

#[derive(Debug, Clone, Copy)]
struct Config {
    retries: u32,
    delay: f64,
    exponential: bool,
    readonly: bool,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let retries = p.take_parsed::<u32>("retries")?.unwrap_or(5);
    let delay = p.take_parsed::<f64>("retry-delay")?.unwrap_or(2.0);
    if !(delay.is_finite() && delay >= 0.0) {
        return Err(ConfigError::new(format!(
            "retry-delay: must be a number of seconds >= 0, not {delay}"
        )));
    }
    let exponential = p.take_bool("retry-exponential")?.unwrap_or(true);
    let readonly = p.take_bool("retry-readonly")?.unwrap_or(false);
    Ok(Arc::new(RetryFilter {
        cfg: Config {
            retries,
            delay,
            exponential,
            readonly,
        },
    }))
}

struct RetryFilter {
    cfg: Config,
}

#[async_trait]
impl Filter for RetryFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h: Arc<dyn Handle> = Arc::from(next.open(ctx).await?);
        let size = h.size()?;
        let next = next.to_owned();
        Ok(Box::new(RetryHandle {
            next,
            ctx: ctx.clone(),
            cfg: self.cfg,
            size,
            state: RwLock::new(State {
                handle: Some(h),
                generation: 0,
                readonly: ctx.readonly,
            }),
            reopen: tokio::sync::Mutex::new(()),
            reopens: AtomicU64::new(0),
        }))
    }
}

/// The current handle of the layers below.
struct State {
    /// None after a reopen failed.
    handle: Option<Arc<dyn Handle>>,
    /// Bumped at each reopen, so concurrent failures reopen once.
    generation: u64,
    /// Opened read-only (by the client or by `retry-readonly`).
    readonly: bool,
}

struct RetryHandle {
    /// The layers below, to reopen them after a failure.
    next: OwnedNext,
    ctx: OpenContext,
    cfg: Config,
    /// The size the client was told.
    size: u64,
    state: RwLock<State>,
    reopen: tokio::sync::Mutex<()>,
    reopens: AtomicU64,
}

/// The retry budget of one request.
struct Attempt {
    done: u32,
    delay: f64,
}

impl RetryHandle {
    fn current(&self) -> (Option<Arc<dyn Handle>>, u64, bool) {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        (s.handle.clone(), s.generation, s.readonly)
    }

    /// The handle to use now for a request over `[offset, offset+count)`
    /// and its generation; the inner error is worth a retry, the outer
    /// one (a write after reopening read-only) is not.
    fn pick(&self, count: u64, offset: u64, write: bool) -> Result<(Result<Arc<dyn Handle>>, u64)> {
        let (h, generation, readonly) = self.current();
        if write && readonly {
            return Err(Error::eperm("retry: the export was reopened read-only"));
        }
        let r = match h {
            None => Err(Error::eio("retry: the layers below are not open")),
            Some(h) => match h.size() {
                Ok(size) if offset.checked_add(count).is_some_and(|e| e <= size) => Ok(h),
                Ok(size) => Err(Error::eio(format!(
                    "retry: the export shrank to {size} bytes after reopening"
                ))),
                Err(e) => Err(e),
            },
        };
        Ok((r, generation))
    }

    /// The capability answer of the current handle.
    fn ask<T>(&self, f: impl FnOnce(&dyn Handle) -> Result<T>) -> Result<T> {
        match self.current().0 {
            Some(h) => f(&*h),
            None => Err(Error::eio("retry: the layers below are not open")),
        }
    }

    /// After `err`, wait and reopen if retries are left (Ok: try again),
    /// else give `err` back.
    async fn retry(&self, a: &mut Attempt, generation: u64, what: &str, err: Error) -> Result<()> {
        if a.done >= self.cfg.retries {
            libnbd::debug!("retry: {what} failed after {} retries: {}", a.done, err.msg);
            return Err(err);
        }
        libnbd::debug!(
            "retry: {what} failed ({}), waiting {} seconds before retrying",
            err.msg,
            a.delay
        );
        tokio::time::sleep(Duration::from_secs_f64(a.delay)).await;
        a.done += 1;
        if self.cfg.exponential {
            a.delay *= 2.0;
        }
        let _one_at_a_time = self.reopen.lock().await;
        if self.current().1 != generation {
            // Another request reopened while we waited.
            return Ok(());
        }
        let mut ctx = self.ctx.clone();
        {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            // Close the old handle (requests still using it keep it alive
            // until they finish).
            s.handle = None;
            if self.cfg.readonly {
                s.readonly = true;
            }
            ctx.readonly = s.readonly;
        }
        let n = self.reopens.fetch_add(1, Ordering::Relaxed) + 1;
        libnbd::debug!("retry: reopening the layers below (reopen {n})");
        let opened = self.next.get().open(&ctx).await;
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.generation += 1;
        match opened {
            Ok(h) => s.handle = Some(Arc::from(h)),
            Err(e) => libnbd::debug!("retry: reopen failed: {}", e.msg),
        }
        Ok(())
    }

    fn attempt(&self) -> Attempt {
        Attempt {
            done: 0,
            delay: self.cfg.delay,
        }
    }
}

/// Run a request against the current handle, retrying on failure.
macro_rules! retrying {
    ($self:ident, $what:literal, $count:expr, $offset:expr, $write:expr, |$h:ident| $call:expr) => {{
        let mut a = $self.attempt();
        loop {
            let (h, generation) = $self.pick($count, $offset, $write)?;
            let r = match h {
                Ok($h) => $call.await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) => $self.retry(&mut a, generation, $what, e).await?,
            }
        }
    }};
}

#[async_trait]
impl Handle for RetryHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.ask(|h| h.block_size())
    }
    fn export_description(&self) -> Option<String> {
        self.ask(|h| Ok(h.export_description())).ok().flatten()
    }
    fn caps(&self) -> Result<Caps> {
        self.ask(|h| h.caps())
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let count = buf.len() as u64;
        retrying!(self, "pread", count, offset, false, |h| h
            .pread(buf, offset, flags))
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let count = buf.len() as u64;
        retrying!(self, "pwrite", count, offset, true, |h| h
            .pwrite(buf, offset, flags))
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        retrying!(self, "flush", 0, 0, false, |h| h.flush(flags))
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        retrying!(self, "trim", count, offset, true, |h| h
            .trim(count, offset, flags))
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        retrying!(self, "zero", count, offset, true, |h| h
            .zero(count, offset, flags))
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let mut a = self.attempt();
        loop {
            let (h, generation) = self.pick(count, offset, false)?;
            // A failed attempt may have added extents: start afresh each time.
            let mut mine = Extents::new(ext.start(), ext.end());
            let r = match h {
                Ok(h) => h.extents(count, offset, flags, &mut mine).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    for e in mine.list() {
                        ext.add(e.offset, e.length, e.flags)?;
                    }
                    return Ok(());
                }
                Err(e) => self.retry(&mut a, generation, "extents", e).await?,
            }
        }
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        retrying!(self, "cache", count, offset, false, |h| h
            .cache(count, offset, flags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::Stack;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        let mut p = params(words);
        let f = create(&mut p).unwrap();
        assert!(p.items().is_empty());
        f
    }

    /// A stack that outlives every handle (as the server's does).
    fn leaked(words: &[&str], mem: &Arc<Mem>) -> &'static Stack {
        Box::leak(Box::new(stack(vec![filter(words)], mem)))
    }

    #[tokio::test]
    async fn retry_reopens_and_succeeds() {
        let mem = Mem::with(vec![3; 4096]);
        let s = leaked(&["retries=3", "retry-delay=0.01"], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(mem.opens.load(Ordering::SeqCst), 1);
        mem.fail.store(2, Ordering::SeqCst);
        assert_eq!(try_read(&*h, 0, 16).await.unwrap(), vec![3; 16]);
        assert_eq!(mem.opens.load(Ordering::SeqCst), 3);
        // The old handles were closed.
        assert_eq!(mem.live.load(Ordering::SeqCst), 1);
        mem.fail.store(1, Ordering::SeqCst);
        h.pwrite(&[4; 16], 0, Flags::NONE).await.unwrap();
        mem.fail.store(1, Ordering::SeqCst);
        assert_eq!(try_extents(&*h, 0, 4096).await.unwrap(), vec![(0, 4096, 0)]);
        mem.fail.store(1, Ordering::SeqCst);
        h.flush(Flags::NONE).await.unwrap();
        assert_eq!(mem.opens.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn retry_gives_up_after_retries() {
        let mem = Mem::new(4096);
        let s = leaked(
            &["retries=2", "retry-delay=0.01", "retry-exponential=no"],
            &mem,
        );
        let h = s.open(&ctx(1)).await.unwrap();
        mem.fail.store(3, Ordering::SeqCst);
        let t = std::time::Instant::now();
        assert!(try_read(&*h, 0, 16).await.is_err());
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(mem.opens.load(Ordering::SeqCst), 3);
        // The next request gets its own retries.
        try_read(&*h, 0, 16).await.unwrap();
    }

    #[tokio::test]
    async fn retry_exponential_delay() {
        let mem = Mem::new(4096);
        let s = leaked(&["retries=3", "retry-delay=0.02"], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        mem.fail.store(3, Ordering::SeqCst);
        let t = std::time::Instant::now();
        try_read(&*h, 0, 16).await.unwrap();
        // 0.02 + 0.04 + 0.08
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn retry_readonly_after_failure() {
        let mem = Mem::new(4096);
        let s = leaked(&["retry-readonly=yes", "retry-delay=0"], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        h.pwrite(&[1; 16], 0, Flags::NONE).await.unwrap();
        mem.fail.store(1, Ordering::SeqCst);
        try_read(&*h, 0, 16).await.unwrap();
        assert_eq!(
            *mem.opened_readonly
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![false, true]
        );
        let e = h.pwrite(&[1; 16], 0, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, libnbd::protocol::errno::EPERM);
        assert_eq!(mem.opens.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retry_concurrent_failures_reopen_once() {
        let mem = Mem::new(4096);
        let s = leaked(&["retry-delay=0.05"], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        mem.fail.store(2, Ordering::SeqCst);
        let (a, b) = tokio::join!(try_read(&*h, 0, 16), try_read(&*h, 16, 16));
        a.unwrap();
        b.unwrap();
        assert_eq!(mem.opens.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn retry_parameters() {
        assert!(create(&mut params(&["retries=x"])).is_err());
        assert!(create(&mut params(&["retry-delay=-1"])).is_err());
        assert!(create(&mut params(&["retry-exponential=maybe"])).is_err());
        assert!(create(&mut params(&["retries=0", "retry-delay=1.5"])).is_ok());
    }
}
