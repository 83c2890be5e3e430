//! # rate: limit bandwidth, per connection and/or for the whole server
//!
//! Reads and writes take tokens (one per bit of data) from token buckets
//! before they go to the layers below: one pair of buckets (reads,
//! writes) shared by every connection for `rate=`, and one pair per
//! connection for `connection-rate=`. A request waits until its tokens
//! have accrued, in arrival order, so the long-run throughput is the
//! configured rate. Zero, trim and the other requests carry no data and
//! are free. Reads and writes are limited separately (download and
//! upload).
//!
//! A bucket holds `burstiness` seconds' worth of tokens and starts full,
//! so after a period of inactivity a client may burst that much before
//! being held to the rate.
//!
//! ```text
//! nbdkit --filter=rate memory 64M rate=1M
//! nbdkit --filter=rate memory 64M connection-rate=50K rate=1M
//! nbdkit --filter=rate memory 64M rate=1M rate-file=/tmp/rate
//! ```
//!
//! ## Parameters
//!
//! `BITSPERSEC` is a number of bits per second, with the
//! usual `K`, `M`, `G` suffixes meaning powers of 1024, as upstream: `1M`
//! is 1048576 bits per second; 0 means no limit.
//!
//! - `rate=BITSPERSEC`: limit the total bandwidth of all connections.
//! - `connection-rate=BITSPERSEC`: limit each connection.
//! - `rate-file=FILENAME`, `connection-rate-file=FILENAME`: read the rate
//!   from this file, again about once a second while the server runs, so
//!   writing a new rate into it (atomically: write a new file and rename
//!   it over) changes the limit within a second or so. While the file is
//!   missing or unreadable, the last rate (initially `rate=` /
//!   `connection-rate=`, else unlimited) stays in force.
//! - `burstiness=SECS`: the bucket size in seconds at the rate (default
//!   2.0).
//!
//! With neither a rate nor a rate file the filter does nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use libnbd::{
    parse_size, ConfigError, ConfigResult, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "rate",
    help: "\
rate=BITSPERSEC                Limit total bandwidth.
connection-rate=BITSPERSEC     Limit per-connection bandwidth.
rate-file=FILENAME             Dynamically adjust total bandwidth.
connection-rate-file=FILENAME  Dynamically adjust per-connection bandwidth.
burstiness=SECS                Bucket capacity in seconds (default 2.0).
",
    create,
};

/// How often the rate files are read again.
const POLL: Duration = Duration::from_secs(1);
/// Longest single sleep of a waiting request, so that a rate change
/// reaches requests already waiting.
const MAX_NAP: f64 = 0.2;

fn parse_rate(key: &str, v: &str) -> ConfigResult<u64> {
    parse_size(v).map_err(|e| ConfigError::new(format!("{key}: {e}")))
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let rate = p.take("rate").map(|v| parse_rate("rate", &v)).transpose()?;
    let conn_rate = p
        .take("connection-rate")
        .map(|v| parse_rate("connection-rate", &v))
        .transpose()?;
    let rate_file = p.take("rate-file").map(PathBuf::from);
    let conn_rate_file = p.take("connection-rate-file").map(PathBuf::from);
    let burst = match p.take("burstiness") {
        None => 2.0,
        Some(v) => match v.trim().parse::<f64>() {
            Ok(b) if b.is_finite() && b > 0.0 => b,
            _ => {
                return Err(ConfigError::new(format!(
                    "burstiness: '{v}' is not a positive number of seconds"
                )))
            }
        },
    };
    // A rate file present at start-up wins over the parameter.
    let rate = rate_file
        .as_deref()
        .and_then(read_rate)
        .or(rate)
        .unwrap_or(0);
    let conn_rate = conn_rate_file
        .as_deref()
        .and_then(read_rate)
        .or(conn_rate)
        .unwrap_or(0);
    let start = Instant::now();
    Ok(Arc::new(RateFilter {
        shared: Arc::new(Shared {
            read: Mutex::new(Bucket::new(rate, burst, start)),
            write: Mutex::new(Bucket::new(rate, burst, start)),
            conn_rate: AtomicU64::new(conn_rate),
            conn_gen: AtomicU64::new(0),
            rate_file,
            conn_rate_file,
            burst,
            start,
            last_poll_ms: AtomicI64::new(0),
        }),
    }))
}

/// The rate in a rate file, if it can be read and parsed.
fn read_rate(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    parse_size(s.trim()).ok()
}

/// A token bucket counted in bits. Tokens accrue continuously at `rate`
/// into `avail`; requests claim tokens in arrival order by advancing
/// `claimed` and wait until `avail` reaches their claim. Both counters
/// only grow, so a rate change applies to requests already waiting.
#[derive(Debug)]
struct Bucket {
    /// Bits per second; 0 is unlimited.
    rate: f64,
    /// Capacity in seconds at the rate.
    burst: f64,
    /// Tokens produced so far.
    avail: f64,
    /// Tokens claimed so far.
    claimed: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    fn new(rate: u64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate: rate as f64,
            burst,
            avail: rate as f64 * burst,
            claimed: 0.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        if self.rate > 0.0 {
            self.avail += self.rate * dt;
            let cap = self.rate * self.burst;
            if self.avail - self.claimed > cap {
                self.avail = self.claimed + cap;
            }
        }
    }

    fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        let was_unlimited = self.rate <= 0.0;
        self.rate = rate as f64;
        if was_unlimited && self.rate > 0.0 {
            // Start limiting with a full bucket.
            self.avail = self.claimed + self.rate * self.burst;
        }
        self.refill(now);
    }

    /// Claim `bits` (once, `claim` remembers it) and say how long to wait
    /// until they have accrued; `None` when the request may go now.
    fn wait_for(&mut self, bits: f64, claim: &mut Option<f64>, now: Instant) -> Option<f64> {
        self.refill(now);
        if self.rate <= 0.0 {
            return None;
        }
        let target = *claim.get_or_insert_with(|| {
            self.claimed += bits;
            self.claimed
        });
        if self.avail >= target {
            None
        } else {
            Some((target - self.avail) / self.rate)
        }
    }
}

struct Shared {
    /// The server-wide buckets.
    read: Mutex<Bucket>,
    write: Mutex<Bucket>,
    /// The per-connection rate and a counter of its changes.
    conn_rate: AtomicU64,
    conn_gen: AtomicU64,
    rate_file: Option<PathBuf>,
    conn_rate_file: Option<PathBuf>,
    burst: f64,
    start: Instant,
    /// When the rate files were last read (ms since `start`).
    last_poll_ms: AtomicI64,
}

impl Shared {
    /// Read the rate files again if it is time to.
    fn poll(&self) {
        if self.rate_file.is_none() && self.conn_rate_file.is_none() {
            return;
        }
        let now_ms = self.start.elapsed().as_millis() as i64;
        let last = self.last_poll_ms.load(Ordering::Relaxed);
        if now_ms - last < POLL.as_millis() as i64
            || self
                .last_poll_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Some(r) = self.rate_file.as_deref().and_then(read_rate) {
            let now = Instant::now();
            for b in [&self.read, &self.write] {
                let mut b = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if b.rate != r as f64 {
                    b.set_rate(r, now);
                }
            }
        }
        if let Some(r) = self.conn_rate_file.as_deref().and_then(read_rate) {
            if self.conn_rate.swap(r, Ordering::AcqRel) != r {
                self.conn_gen.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

struct RateFilter {
    shared: Arc<Shared>,
}

#[async_trait]
impl Filter for RateFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = next.open(ctx).await?;
        let s = &self.shared;
        let now = Instant::now();
        let r = s.conn_rate.load(Ordering::Acquire);
        Ok(Box::new(RateHandle {
            next,
            shared: s.clone(),
            read: Mutex::new(Bucket::new(r, s.burst, now)),
            write: Mutex::new(Bucket::new(r, s.burst, now)),
            gen: AtomicU64::new(s.conn_gen.load(Ordering::Acquire)),
        }))
    }
}

struct RateHandle {
    next: Box<dyn Handle>,
    shared: Arc<Shared>,
    /// This connection's buckets.
    read: Mutex<Bucket>,
    write: Mutex<Bucket>,
    /// The `conn_gen` these buckets follow.
    gen: AtomicU64,
}

impl RateHandle {
    /// Follow a change of the per-connection rate.
    fn follow(&self) {
        let g = self.shared.conn_gen.load(Ordering::Acquire);
        if self.gen.swap(g, Ordering::AcqRel) != g {
            let r = self.shared.conn_rate.load(Ordering::Acquire);
            let now = Instant::now();
            self.read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .set_rate(r, now);
            self.write
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .set_rate(r, now);
        }
    }

    /// Wait until `bytes` may pass both the server's and this
    /// connection's bucket.
    async fn throttle(&self, write: bool, bytes: usize) {
        let bits = bytes as f64 * 8.0;
        let (global, own) = if write {
            (&self.shared.write, &self.write)
        } else {
            (&self.shared.read, &self.read)
        };
        for (bucket, is_own) in [(global, false), (own, true)] {
            let mut claim = None;
            loop {
                self.shared.poll();
                if is_own {
                    self.follow();
                }
                let wait = bucket
                    .lock()
                    .unwrap()
                    .wait_for(bits, &mut claim, Instant::now());
                match wait {
                    None => break,
                    Some(w) => tokio::time::sleep(Duration::from_secs_f64(w.min(MAX_NAP))).await,
                }
            }
        }
    }
}

#[async_trait]
impl Handle for RateHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.throttle(false, buf.len()).await;
        self.next.pread(buf, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.throttle(true, buf.len()).await;
        self.next.pwrite(buf, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::mem_stack;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut Params::parse(words, None).unwrap()).unwrap()
    }

    #[test]
    fn bucket_arithmetic() {
        let t0 = Instant::now();
        // 1000 bits/s, 2 s of burst: 2000 bits go at once.
        let mut b = Bucket::new(1000, 2.0, t0);
        let mut c = None;
        assert_eq!(b.wait_for(2000.0, &mut c, t0), None);
        let mut c = None;
        let w = b.wait_for(500.0, &mut c, t0).unwrap();
        assert!((w - 0.5).abs() < 1e-9);
        // Half a second later it may go; the claim is not taken twice.
        assert_eq!(
            b.wait_for(500.0, &mut c, t0 + Duration::from_millis(500)),
            None
        );
        // Idle for an hour: the bucket holds 2 s only.
        let t1 = t0 + Duration::from_secs(3600);
        let mut c = None;
        assert_eq!(b.wait_for(2000.0, &mut c, t1), None);
        let mut c = None;
        assert!(b.wait_for(1.0, &mut c, t1).is_some());
        // A rate change applies to the request already waiting.
        let mut c = None;
        let w = b.wait_for(1000.0, &mut c, t1).unwrap();
        assert!((w - 1.001).abs() < 1e-6, "{w}");
        b.set_rate(1_000_000, t1);
        let w = b.wait_for(1000.0, &mut c, t1).unwrap();
        assert!(w < 0.002, "{w}");
        // Unlimited.
        b.set_rate(0, t1);
        assert_eq!(b.wait_for(1e12, &mut None, t1), None);
    }

    #[test]
    fn parameters() {
        let bad = |w: &[&str]| create(&mut Params::parse(w, None).unwrap()).is_err();
        assert!(bad(&["rate=fast"]));
        assert!(bad(&["burstiness=0"]));
        assert!(bad(&["burstiness=-1"]));
        assert!(!bad(&["rate=1M", "connection-rate=50K", "burstiness=0.5"]));
        let mut p = Params::parse(&["rate=1M", "size=1"], None).unwrap();
        create(&mut p).unwrap();
        assert_eq!(p.items().len(), 1);
    }

    #[tokio::test]
    async fn reads_are_held_to_the_rate() {
        // 8 Mbit/s = 1 MiB/s with a 0.1 s bucket: 512 KiB after the burst
        // takes about 0.4 s.
        let f = filter(&["rate=8M", "burstiness=0.1"]);
        let (stack, _, _) = mem_stack(f, 1 << 20);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let t = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        for i in 0..8 {
            h.pread(&mut buf, i * 65536, Flags::NONE).await.unwrap();
        }
        let e = t.elapsed().as_secs_f64();
        assert!((0.36..0.6).contains(&e), "{e}");
        // Writes have their own bucket (full), zeroes are free.
        let t = Instant::now();
        h.pwrite(&buf, 0, Flags::NONE).await.unwrap();
        h.zero(1 << 20, 0, Flags::NONE).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn connection_rate_file_changes_live() {
        let dir = tempfile::tempdir().unwrap();
        let rf = dir.path().join("rate");
        std::fs::write(&rf, "80M\n").unwrap();
        let f = filter(&[
            &format!("connection-rate-file={}", rf.display()),
            "burstiness=0.05",
        ]);
        let (stack, _, _) = mem_stack(f, 1 << 20);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let t = Instant::now();
        for _ in 0..8 {
            h.pread(&mut buf, 0, Flags::NONE).await.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(300));
        // 800K bits/s: 64 KiB takes about 0.65 s. Wait for the next poll.
        std::fs::write(&rf, "800K").unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        h.pread(&mut buf, 0, Flags::NONE).await.unwrap(); // reads the file
        let t = Instant::now();
        h.pread(&mut buf, 0, Flags::NONE).await.unwrap();
        h.pread(&mut buf, 0, Flags::NONE).await.unwrap();
        let e = t.elapsed().as_secs_f64();
        assert!(e > 0.8, "{e}");
    }
}
