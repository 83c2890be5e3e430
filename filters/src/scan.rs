//! # scan: prefetch the whole disk ahead of a sequential reader
//!
//! While a client is connected, the filter walks the export from start
//! to end sending cache (prefetch) requests to the layers below, so a
//! client that then reads the disk sequentially finds its data already
//! fetched. A plugin that implements cache (curl) prefetches itself; for
//! the others put the cache filter (or the cow filter with
//! `cow-on-cache=true`) after this one. The readahead filter is a
//! lighter alternative that follows the client instead.
//!
//! ```text
//! nbdkit --filter=scan --filter=cache curl https://example.com/disk.img
//! nbdkit --filter=scan --filter=cow curl https://example.com/disk.img cow-on-cache=true
//! ```
//!
//! ## Parameters
//!
//! - `scan-ahead=false`: prefetch strictly in order (by default, a
//!   client read past the prefetch point moves the scan on to just after
//!   that read, to keep ahead of the client).
//! - `scan-clock=false`: when the last client has gone and another
//!   connects, start again at the beginning (by default the scan resumes
//!   where it stopped, like a clock stopped and started).
//! - `scan-forever=true`: once the whole disk is done, start over, for as
//!   long as clients are connected (by default it scans once).
//! - `scan-size=NN`: bytes per cache request, a power of 2 from 512 to
//!   32M (default 2M).
//!
//! ## Behaviour
//!
//! The scan runs on a client's connection while one is connected (it
//! moves to another client's when that one leaves), and only for clients
//! of the default export. It does nothing, with a warning, when the
//! layers below cannot cache or when the server's thread model is not
//! parallel (a noparallel filter): prefetching could not overlap the
//! client's requests. Prefetching a disk through the cache or cow filter
//! stores all of it in their temporary file.

use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use libnbd::{
    Cache, ConfigError, ConfigResult, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result, ThreadModel,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "scan",
    help: "\
scan-ahead=false         Skip ahead when client reads faster.
scan-clock=false         Always start prefetching from beginning.
scan-forever=true        Scan in a loop while clients connected.
scan-size=NN             Set scan block size.",
    create,
};

#[derive(Debug, Clone, Copy)]
struct Config {
    ahead: bool,
    clock: bool,
    forever: bool,
    size: u64,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let ahead = p.take_bool("scan-ahead")?.unwrap_or(true);
    let clock = p.take_bool("scan-clock")?.unwrap_or(true);
    let forever = p.take_bool("scan-forever")?.unwrap_or(false);
    let size = p.take_size("scan-size")?.unwrap_or(2 << 20);
    if !(512..=32 << 20).contains(&size) || !size.is_power_of_two() {
        return Err(ConfigError::new(
            "scan-size parameter should be [512..32M] and a power of two",
        ));
    }
    Ok(Arc::new(Scan {
        cfg: Config {
            ahead,
            clock,
            forever,
            size,
        },
        state: Arc::new(Mutex::new(State::default())),
    }))
}

/// The scan, shared by every connection.
#[derive(Default)]
struct State {
    /// Connections of the default export the scan may use.
    clients: Vec<Weak<dyn Handle>>,
    /// Is a scanning task running?
    running: bool,
    /// Where the next prefetch starts.
    position: u64,
    /// The disk has been scanned once (and `scan-forever` is off).
    done: bool,
}

struct Scan {
    cfg: Config,
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prefetch from the state's position on, through any live client, until
/// done or no client is left.
async fn scan(cfg: Config, state: Arc<Mutex<State>>) {
    loop {
        let step = {
            let mut s = lock(&state);
            s.clients.retain(|c| c.strong_count() > 0);
            match s.clients.iter().find_map(Weak::upgrade) {
                Some(h) if !s.done => Some((h, s.position)),
                Some(_) => None,
                None => {
                    // The last client has gone: the scan pauses.
                    if !cfg.clock {
                        s.position = 0;
                        s.done = false;
                    }
                    None
                }
            }
        };
        let Some((h, at)) = step else {
            lock(&state).running = false;
            return;
        };
        let size = match h.size() {
            Ok(s) => s,
            Err(_) => break,
        };
        if at >= size {
            let mut s = lock(&state);
            libnbd::debug!("scan: finished scanning the disk");
            if cfg.forever {
                s.position = 0;
            } else {
                s.done = true;
            }
            continue;
        }
        let n = cfg.size.min(size - at);
        if let Err(e) = h.cache(n, at, Flags::NONE).await {
            libnbd::debug!("scan: cache at {at} failed, stopping: {}", e.msg);
            break;
        }
        drop(h);
        {
            let mut s = lock(&state);
            // A client read may have moved the position on meanwhile.
            s.position = s.position.max(at + n);
        }
        // A cache that completes at once would otherwise never let the
        // worker thread go.
        tokio::task::yield_now().await;
    }
    lock(&state).running = false;
}

#[async_trait]
impl Filter for Scan {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let model = next.thread_model();
        let default = ctx.default_export || ctx.export_name == next.default_export();
        let h: Arc<dyn Handle> = Arc::from(next.open(ctx).await?);
        let warn = |m: &str| libnbd::elog!("nbdkit: scan[{}]: warning: {m}", ctx.id);
        let scanning = if h.caps()?.cache == Cache::None {
            warn(
                "underlying plugin does not support NBD_CMD_CACHE, not scanning; \
                 try adding --filter=cache after this filter",
            );
            false
        } else if model != ThreadModel::Parallel {
            warn("underlying plugin does not support the PARALLEL thread model, not scanning");
            false
        } else {
            default
        };
        if scanning {
            let start = {
                let mut s = lock(&self.state);
                s.clients.push(Arc::downgrade(&h));
                !std::mem::replace(&mut s.running, true)
            };
            if start {
                tokio::spawn(scan(self.cfg, self.state.clone()));
            }
        }
        Ok(Box::new(ScanHandle {
            next: h,
            state: scanning.then(|| self.state.clone()),
            ahead: self.cfg.ahead,
        }))
    }
}

struct ScanHandle {
    next: Arc<dyn Handle>,
    /// The scan this connection takes part in, if any.
    state: Option<Arc<Mutex<State>>>,
    ahead: bool,
}

#[async_trait]
impl Handle for ScanHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        if let (true, Some(state)) = (self.ahead, &self.state) {
            // Prefetching what the client has read already is no use.
            let end = offset + buf.len() as u64;
            let mut s = lock(state);
            if end > s.position {
                s.position = end;
            }
        }
        self.next.pread(buf, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use std::time::Duration;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut params(words)).unwrap()
    }

    /// Wait until the scan stops, then take the calls the plugin saw.
    async fn settle(mem: &Mem) -> Vec<String> {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let calls = mem
                .calls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let caches = calls.iter().filter(|c| c.starts_with("cache")).count();
            if caches > 0 && calls.len() == caches {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if mem
                    .calls
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
                    == calls.len()
                {
                    break;
                }
            }
        }
        mem.take_calls()
    }

    #[tokio::test]
    async fn scan_prefetches_the_disk_once() {
        let mem = Mem::new(5000);
        let f = filter(&["scan-size=1024"]);
        let s = stack(vec![f.clone()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(
            settle(&mem).await,
            [
                "cache 0 1024",
                "cache 1024 1024",
                "cache 2048 1024",
                "cache 3072 1024",
                "cache 4096 904"
            ]
        );
        drop(h);
        // scan-clock (default): done stays done for the next client.
        let _h = s.open(&ctx(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(mem.take_calls().is_empty());
    }

    #[tokio::test]
    async fn scan_skips_ahead_of_client_reads() {
        let mem = Mem::new(1 << 20);
        let f = filter(&["scan-size=512"]);
        let s = stack(vec![f.clone()], &mem);
        // Not default: no scan.
        let other = OpenContext {
            export_name: "x".into(),
            default_export: false,
            ..ctx(1)
        };
        let o = s.open(&other).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(mem.take_calls().is_empty(), "no scan for other exports");
        drop(o);
        let h = s.open(&ctx(2)).await.unwrap();
        read(&*h, (1 << 20) - 1024, 512).await;
        let calls = settle(&mem).await;
        // The scan jumped to just after the read.
        assert!(
            calls.contains(&"cache 1048064 512".to_string()),
            "{calls:?}"
        );
        assert!(
            calls.len() < 100,
            "most of the disk was skipped: {}",
            calls.len()
        );
    }

    #[tokio::test]
    async fn scan_stops_without_clients_and_restarts_without_clock() {
        let mem = Mem::new(64 << 10);
        let f = filter(&["scan-size=512", "scan-clock=false", "scan-forever=true"]);
        let s = stack(vec![f.clone()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(h);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let calls = mem.take_calls();
        assert!(
            calls.len() > 128,
            "forever: more than one pass: {}",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(mem.take_calls().is_empty(), "no client, no scan");
        let _h = s.open(&ctx(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            mem.take_calls()[0],
            "cache 0 512",
            "scan-clock=false restarts"
        );
    }

    #[tokio::test]
    async fn scan_needs_cache_and_parallel() {
        let mem = Mem::new(4096);
        let nocache = (crate::nocache::ENTRY.create)(&mut params(&[])).unwrap();
        let s = stack(vec![filter(&[]), nocache], &mem);
        let _h = s.open(&ctx(1)).await.unwrap();
        let noparallel = (crate::noparallel::ENTRY.create)(&mut params(&[])).unwrap();
        let s = stack(vec![noparallel, filter(&[])], &mem);
        let _h = s.open(&ctx(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(mem.take_calls().is_empty());
        for bad in [
            "scan-size=3M",
            "scan-size=64M",
            "scan-size=256",
            "scan-ahead=maybe",
        ] {
            assert!(create(&mut params(&[bad])).is_err(), "{bad}");
        }
    }
}
