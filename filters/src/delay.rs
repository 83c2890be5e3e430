//! # delay: make requests slow on purpose
//!
//! Every request of a chosen kind sleeps for a fixed time before it is
//! passed to the layer below, which simulates a slow or distant server
//! (or provokes races in clients). To limit bandwidth rather than add
//! latency, use the rate filter instead.
//!
//! ```text
//! nbdkit --filter=delay file disk.img rdelay=100ms wdelay=100ms
//! nbdkit --filter=delay file disk.img delay-zero=1
//! ```
//!
//! ## Parameters
//!
//! A delay is whole or fractional seconds, `SECS`, or
//! milliseconds, `NNms`; when one kind of request is set twice, the
//! last setting on the command line wins.
//!
//! - `rdelay=` / `delay-read=`: delay reads.
//! - `wdelay=`: delay writes, zeroes and trims.
//! - `delay-write=`: delay writes only.
//! - `delay-zero=`: delay zero requests (see `delay-fast-zero`).
//! - `delay-trim=`: delay trim (discard) requests.
//! - `delay-extents=`: delay block status (extents) requests.
//! - `delay-cache=`: delay cache (prefetch) requests.
//! - `delay-fast-zero=BOOL` (default true): when false, a zero request
//!   with the fast-zero flag fails at once with `ENOTSUP` without waiting
//!   and without asking the plugin (and fast zero is then advertised).
//! - `delay-open=`: delay each client connection (the open).
//! - `delay-close=`: delay each disconnection (the close of the layers
//!   below). Our server closes a connection's handle by dropping it, so
//!   the delay runs there; see the note in the code.
//!
//! Flush is never delayed, as upstream.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libnbd::{
    parse_bool, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags,
    Handle, Next, OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "delay",
    help: "\
rdelay=<NN>[ms]                Read delay in seconds/milliseconds.
delay-read=<NN>[ms]            Read delay in seconds/milliseconds.
delay-write=<NN>[ms]           Write delay in seconds/milliseconds.
delay-zero=<NN>[ms]            Zero delay in seconds/milliseconds.
delay-trim=<NN>[ms]            Trim delay in seconds/milliseconds.
delay-extents=<NN>[ms]         Extents delay in seconds/milliseconds.
delay-cache=<NN>[ms]           Cache delay in seconds/milliseconds.
wdelay=<NN>[ms]                Write, zero and trim delay in secs/msecs.
delay-fast-zero=<BOOL>         Delay fast zero requests (default true).
delay-open=<NN>[ms]            Open delay in seconds/milliseconds.
delay-close=<NN>[ms]           Close delay in seconds/milliseconds.
",
    create,
};

/// Every key this filter takes.
const KEYS: &[&str] = &[
    "rdelay",
    "delay-read",
    "wdelay",
    "delay-write",
    "delay-zero",
    "delay-trim",
    "delay-extents",
    "delay-cache",
    "delay-fast-zero",
    "delay-open",
    "delay-close",
];

/// The configured delays.
#[derive(Debug, Clone, Default, PartialEq)]
struct Delays {
    read: Duration,
    write: Duration,
    zero: Duration,
    trim: Duration,
    extents: Duration,
    cache: Duration,
    open: Duration,
    close: Duration,
    /// Fast zero requests wait and go to the plugin (true) or fail at
    /// once (false).
    fast_zero: bool,
}

/// Parse `SECS` (whole or fractional) or `NNms`.
fn parse_delay(key: &str, value: &str) -> ConfigResult<Duration> {
    let v = value.trim();
    let bad =
        |why: &str| ConfigError::new(format!("{key}: could not parse delay '{value}': {why}"));
    if v.starts_with('-') {
        return Err(bad("negative numbers are not allowed"));
    }
    let (num, millis) = match v.strip_suffix("ms") {
        Some(n) => (n, true),
        None => (v, false),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad("expected SECS or NNms"));
    }
    let n: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let secs = if millis { n / 1000.0 } else { n };
    if !secs.is_finite() || secs > 1e9 {
        return Err(bad("too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse(p: &mut Params) -> ConfigResult<Delays> {
    let mut d = Delays {
        fast_zero: true,
        ..Default::default()
    };
    // Apply in command-line order so that e.g. `wdelay=1 delay-zero=2`
    // and `delay-zero=2 wdelay=1` differ as they do upstream.
    let items: Vec<(String, String)> = p
        .items()
        .iter()
        .filter(|(k, _)| KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    for (k, v) in &items {
        match k.as_str() {
            "rdelay" | "delay-read" => d.read = parse_delay(k, v)?,
            "wdelay" => {
                d.write = parse_delay(k, v)?;
                d.zero = d.write;
                d.trim = d.write;
            }
            "delay-write" => d.write = parse_delay(k, v)?,
            "delay-zero" => d.zero = parse_delay(k, v)?,
            "delay-trim" => d.trim = parse_delay(k, v)?,
            "delay-extents" => d.extents = parse_delay(k, v)?,
            "delay-cache" => d.cache = parse_delay(k, v)?,
            "delay-open" => d.open = parse_delay(k, v)?,
            "delay-close" => d.close = parse_delay(k, v)?,
            "delay-fast-zero" => {
                d.fast_zero = parse_bool(v).map_err(|e| ConfigError::new(format!("{k}: {e}")))?
            }
            _ => unreachable!(),
        }
    }
    for k in KEYS {
        p.take_all(k);
    }
    Ok(d)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(DelayFilter {
        d: Arc::new(parse(p)?),
    }))
}

struct DelayFilter {
    d: Arc<Delays>,
}

async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

#[async_trait]
impl Filter for DelayFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        pause(self.d.open).await;
        let next = next.open(ctx).await?;
        Ok(Box::new(DelayHandle {
            next: Some(next),
            d: self.d.clone(),
        }))
    }
}

struct DelayHandle {
    /// Always `Some` until dropped.
    next: Option<Box<dyn Handle>>,
    d: Arc<Delays>,
}

impl Drop for DelayHandle {
    fn drop(&mut self) {
        // The contract has no asynchronous close: the server drops the
        // handle when the client has gone. Sleep on this worker thread
        // when the runtime allows it (so the server's shutdown waits, as
        // upstream's does), else delay closing the layers below in a task.
        let d = self.d.close;
        if d.is_zero() {
            return;
        }
        let next = self.next.take();
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| std::thread::sleep(d));
                drop(next);
            }
            Ok(h) => {
                h.spawn(async move {
                    tokio::time::sleep(d).await;
                    drop(next);
                });
            }
            Err(_) => {
                std::thread::sleep(d);
                drop(next);
            }
        }
    }
}

#[async_trait]
impl Handle for DelayHandle {
    fn next(&self) -> Option<&dyn Handle> {
        self.next.as_deref()
    }
    fn caps(&self) -> Result<Caps> {
        let next = self.inner().caps()?;
        // Without delay-fast-zero, fast zeroes are answered here, at once.
        let fast_zero = !self.d.fast_zero || next.fast_zero;
        Ok(Caps { fast_zero, ..next })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        pause(self.d.read).await;
        self.inner().pread(buf, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        pause(self.d.write).await;
        self.inner().pwrite(buf, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if !self.d.fast_zero && flags.contains(Flags::FAST_ZERO) {
            return Err(Error::enotsup("delay: fast zero requests are refused"));
        }
        pause(self.d.zero).await;
        self.inner().zero(count, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        pause(self.d.trim).await;
        self.inner().trim(count, offset, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        pause(self.d.extents).await;
        self.inner().extents(count, offset, flags, ext).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        pause(self.d.cache).await;
        self.inner().cache(count, offset, flags).await
    }
}

impl DelayHandle {
    fn inner(&self) -> &dyn Handle {
        self.next.as_deref().expect("handle in use")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::testkit::{mem_stack, Op};
    use std::time::Instant;

    fn params(words: &[&str]) -> Params {
        Params::parse(words, None).unwrap()
    }

    #[test]
    fn parses_seconds_and_millis() {
        assert_eq!(parse_delay("k", "2").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_delay("k", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_delay("k", "0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_delay("k", "-1").is_err());
        assert!(parse_delay("k", "5us").is_err());
        assert!(parse_delay("k", "").is_err());
        assert!(parse_delay("k", "ms").is_err());
    }

    #[test]
    fn order_matters_and_other_keys_stay() {
        let mut p = params(&["wdelay=1", "delay-zero=2", "size=1M", "rdelay=10ms"]);
        let d = parse(&mut p).unwrap();
        assert_eq!(d.write, Duration::from_secs(1));
        assert_eq!(d.trim, Duration::from_secs(1));
        assert_eq!(d.zero, Duration::from_secs(2));
        assert_eq!(d.read, Duration::from_millis(10));
        assert_eq!(p.items(), &[("size".to_string(), "1M".to_string())]);
        let mut p = params(&["delay-zero=2", "wdelay=1"]);
        assert_eq!(parse(&mut p).unwrap().zero, Duration::from_secs(1));
        let mut p = params(&["delay-fast-zero=maybe"]);
        assert!(parse(&mut p).is_err());
    }

    #[tokio::test]
    async fn reads_wait_writes_do_not() {
        let (stack, log, _) = mem_stack(
            create(&mut params(&["rdelay=150ms", "delay-trim=1"])).unwrap(),
            1 << 20,
        );
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let t = Instant::now();
        let mut buf = vec![0u8; 512];
        h.pread(&mut buf, 0, Flags::NONE).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(150));
        let t = Instant::now();
        h.pwrite(&buf, 0, Flags::NONE).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(150));
        assert!(log.ops().contains(&Op::Write(0, 512)));
    }

    #[tokio::test]
    async fn fast_zero_refused_without_plugin() {
        let (stack, log, _) = mem_stack(
            create(&mut params(&["delay-fast-zero=false", "delay-zero=5"])).unwrap(),
            1 << 20,
        );
        let h = stack.open(&OpenContext::default()).await.unwrap();
        assert!(h.caps().unwrap().fast_zero);
        let t = Instant::now();
        let e = h.zero(4096, 0, Flags::FAST_ZERO).await.unwrap_err();
        assert_eq!(e.errno, libnbd::protocol::errno::ENOTSUP);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(log.ops().is_empty());
    }

    #[tokio::test]
    async fn open_is_delayed() {
        let (stack, _, _) = mem_stack(create(&mut params(&["delay-open=100ms"])).unwrap(), 1 << 20);
        let t = Instant::now();
        let _h = stack.open(&OpenContext::default()).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
    }
}
