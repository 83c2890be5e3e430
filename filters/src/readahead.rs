//! # readahead: prefetch data ahead of sequential readers
//!
//! The filter watches each connection's reads. When a read starts where
//! the previous one ended (or inside data already prefetched), the reader
//! is sequential: the filter reads ahead of it, in the background and in
//! parallel with the client, into a bounded in-memory buffer of that
//! connection, and serves the following reads from the buffer (waiting
//! for a prefetch already under way rather than asking twice). The
//! prefetch window starts small (128K), doubles with each sequential read
//! up to 16M and falls back to nothing at the first random read, which
//! also empties the buffer: random readers are not slowed down, they only
//! pay for a lock and a lookup.
//!
//! Unlike upstream nbdkit's filter, which only sends cache (prefetch)
//! requests down and so needs a plugin or filter below that implements
//! them (file, or `--filter=cache`), this one keeps the data itself and
//! therefore speeds up any slow plugin, such as one behind a network.
//!
//! Writes, trims and zeroes on any connection drop the overlapping
//! prefetched data of every connection first (and prefetches under way
//! over that range are discarded), so a read never returns data older
//! than a write that completed before it was sent.
//!
//! Memory: at most 24M of prefetched data per connection, in pieces of up
//! to 2M, with at most 8 prefetches in flight.
//!
//! ```text
//! nbdkit --filter=readahead curl https://example.com/disk.img
//! nbdkit --filter=readahead --filter=delay memory 1G rdelay=10ms
//! ```
//!
//! ## Parameters
//!
//! There are no parameters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use libnbd::{ConfigResult, Filter, FilterEntry, Flags, Handle, Next, OpenContext, Params, Result};
use tokio::sync::watch;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "readahead",
    help: "",
    create,
};

/// Window after the first sequential reads.
const INITIAL_WINDOW: u64 = 128 * 1024;
/// Largest window.
const MAX_WINDOW: u64 = 16 * 1024 * 1024;
/// Largest single prefetch.
const CHUNK: u64 = 2 * 1024 * 1024;
/// Most prefetched (or being prefetched) bytes held per connection.
const MAX_HELD: u64 = 24 * 1024 * 1024;
/// Most prefetches in flight per connection.
const MAX_TASKS: usize = 8;
/// Sequential reads in a row before prefetching starts.
const STREAK: u32 = 2;

fn create(_p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(ReadaheadFilter {
        global: Arc::new(Global::default()),
    }))
}

/// State over all connections.
#[derive(Default)]
struct Global {
    conns: Mutex<Vec<Weak<Conn>>>,
    /// Writes in flight: (id, start, end).
    writes: Mutex<Vec<(u64, u64, u64)>>,
    next_write: AtomicU64,
}

impl Global {
    /// Drop prefetched data over `[s, e)` everywhere, and keep it from
    /// being prefetched until the returned guard is dropped.
    fn begin_write(self: &Arc<Self>, s: u64, e: u64) -> WriteGuard {
        let id = self.next_write.fetch_add(1, Ordering::Relaxed);
        self.writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((id, s, e));
        let conns: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for c in conns {
            c.st.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .invalidate(s, e);
        }
        WriteGuard {
            global: self.clone(),
            id,
        }
    }

    fn write_in_flight(&self, s: u64, e: u64) -> bool {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .any(|&(_, ws, we)| ws < e && s < we)
    }
}

struct WriteGuard {
    global: Arc<Global>,
    id: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.global
            .writes
            .lock()
            .unwrap()
            .retain(|&(id, _, _)| id != self.id);
    }
}

struct ReadaheadFilter {
    global: Arc<Global>,
}

#[async_trait]
impl Filter for ReadaheadFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next: Arc<dyn Handle> = Arc::from(next.open(ctx).await?);
        let size = next.size()?;
        let conn = Arc::new(Conn {
            next,
            size,
            st: Mutex::new(State::new()),
        });
        let mut conns = self
            .global
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        drop(conns);
        Ok(Box::new(ReadaheadHandle {
            conn,
            global: self.global.clone(),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
        }))
    }
}

/// A prefetch's outcome: `None` while under way, then the data or
/// `Some(None)` when it failed or was invalidated.
type Outcome = Option<Option<Arc<Vec<u8>>>>;

/// A prefetched (or being prefetched) range.
struct Seg {
    end: u64,
    id: u64,
    rx: watch::Receiver<Outcome>,
    /// Bytes handed to readers so far.
    consumed: u64,
}

/// One connection's read pattern and buffer.
struct State {
    last_end: Option<u64>,
    window: u64,
    streak: u32,
    /// End of the range prefetched or being prefetched.
    ahead: u64,
    /// Prefetched ranges by start, never overlapping.
    segs: BTreeMap<u64, Seg>,
    held: u64,
    next_id: u64,
}

impl State {
    fn new() -> Self {
        State {
            last_end: None,
            window: 0,
            streak: 0,
            ahead: 0,
            segs: BTreeMap::new(),
            held: 0,
            next_id: 0,
        }
    }

    fn remove(&mut self, start: u64) {
        if let Some(s) = self.segs.remove(&start) {
            self.held -= s.end - start;
        }
    }

    /// Drop segments overlapping `[s, e)`.
    fn invalidate(&mut self, s: u64, e: u64) {
        let hit: Vec<u64> = self
            .segs
            .range(..e)
            .filter(|(_, g)| g.end > s)
            .map(|(k, _)| *k)
            .collect();
        for k in hit {
            self.remove(k);
        }
    }

    /// Is `off` inside a segment?
    fn covered(&self, off: u64) -> bool {
        self.segs
            .range(..=off)
            .next_back()
            .is_some_and(|(_, g)| g.end > off)
    }

    fn clear(&mut self) {
        self.segs.clear();
        self.held = 0;
    }
}

struct Conn {
    next: Arc<dyn Handle>,
    size: u64,
    st: Mutex<State>,
}

/// Part of a read: straight from the layer below, or from a segment.
enum Piece {
    Direct(u64, u64),
    Seg(u64, u64, u64, watch::Receiver<Outcome>),
}

struct ReadaheadHandle {
    conn: Arc<Conn>,
    global: Arc<Global>,
    /// Prefetches of this connection (aborted when it closes).
    tasks: Mutex<tokio::task::JoinSet<()>>,
}

impl ReadaheadHandle {
    /// Note a read of `[off, end)`, start the prefetches it calls for and
    /// say how to serve it.
    fn plan(&self, off: u64, end: u64) -> Vec<Piece> {
        let conn = &self.conn;
        let mut st = conn
            .st
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sequential = st.last_end == Some(off) || st.covered(off);
        if sequential {
            st.streak = st.streak.saturating_add(1);
            st.window = (st.window * 2)
                .max(INITIAL_WINDOW)
                .max(4 * (end - off))
                .min(MAX_WINDOW);
            // Segments wholly behind the reader are done with.
            let behind: Vec<u64> = st
                .segs
                .range(..off)
                .filter(|(_, g)| g.end <= off)
                .map(|(k, _)| *k)
                .collect();
            for k in behind {
                st.remove(k);
            }
        } else {
            st.streak = 0;
            st.window = 0;
            st.clear();
            st.ahead = end;
        }
        st.last_end = Some(end);

        // How to serve this read.
        let mut plan = Vec::new();
        let mut pos = off;
        let first = st
            .segs
            .range(..=off)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(off);
        for (&s, g) in st.segs.range(first..end) {
            if g.end <= pos {
                continue;
            }
            if s > pos {
                plan.push(Piece::Direct(pos, s));
                pos = s;
            }
            let pe = g.end.min(end);
            plan.push(Piece::Seg(pos, pe, s, g.rx.clone()));
            pos = pe;
        }
        if pos < end {
            plan.push(Piece::Direct(pos, end));
        }

        // Prefetch ahead.
        if st.streak >= STREAK {
            let mut from = st.ahead.max(end);
            let to = (end + st.window).min(conn.size);
            let mut tasks = self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while tasks.try_join_next().is_some() {}
            while from < to && st.held < MAX_HELD && tasks.len() < MAX_TASKS {
                let n = (to - from).min(CHUNK).min(MAX_HELD - st.held);
                if self.global.write_in_flight(from, from + n) {
                    break;
                }
                let (tx, rx) = watch::channel(None);
                let id = st.next_id;
                st.next_id += 1;
                st.segs.insert(
                    from,
                    Seg {
                        end: from + n,
                        id,
                        rx,
                        consumed: 0,
                    },
                );
                st.held += n;
                tasks.spawn(prefetch(conn.clone(), from, n, id, tx));
                from += n;
                st.ahead = from;
            }
        }
        plan
    }

    /// Count bytes taken from a segment; drop it once all are taken.
    fn consumed(&self, start: u64, n: u64) {
        let mut st = self
            .conn
            .st
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = st.segs.get_mut(&start) {
            g.consumed += n;
            if g.consumed >= g.end - start {
                st.remove(start);
            }
        }
    }
}

/// Read `[off, off + n)` below and publish it, unless the segment was
/// dropped meanwhile (a write overlapped it).
async fn prefetch(conn: Arc<Conn>, off: u64, n: u64, id: u64, tx: watch::Sender<Outcome>) {
    let mut buf = vec![0u8; n as usize];
    let ok = conn.next.pread(&mut buf, off, Flags::NONE).await.is_ok();
    let mut st = conn
        .st
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let live = st.segs.get(&off).is_some_and(|g| g.id == id);
    if ok && live {
        let _ = tx.send(Some(Some(Arc::new(buf))));
    } else {
        if live {
            st.remove(off);
        }
        let _ = tx.send(Some(None));
    }
}

impl Drop for ReadaheadHandle {
    fn drop(&mut self) {
        if let Ok(t) = self.tasks.get_mut() {
            t.abort_all();
        }
    }
}

#[async_trait]
impl Handle for ReadaheadHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.conn.next)
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let end = offset + buf.len() as u64;
        let plan = self.plan(offset, end);
        for p in plan {
            match p {
                Piece::Direct(s, e) => {
                    let piece = &mut buf[(s - offset) as usize..(e - offset) as usize];
                    self.conn.next.pread(piece, s, flags).await?;
                }
                Piece::Seg(s, e, start, mut rx) => {
                    let piece = &mut buf[(s - offset) as usize..(e - offset) as usize];
                    let data = match rx.wait_for(|o| o.is_some()).await {
                        Ok(v) => v.clone().flatten(),
                        Err(_) => None,
                    };
                    match data {
                        Some(d) => {
                            let i = (s - start) as usize;
                            piece.copy_from_slice(&d[i..i + piece.len()]);
                            self.consumed(start, e - s);
                        }
                        None => self.conn.next.pread(piece, s, flags).await?,
                    }
                }
            }
        }
        Ok(())
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let _w = self.global.begin_write(offset, offset + buf.len() as u64);
        self.conn.next.pwrite(buf, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let _w = self.global.begin_write(offset, offset + count);
        self.conn.next.zero(count, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let _w = self.global.begin_write(offset, offset + count);
        self.conn.next.trim(count, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{mem_stack, pattern, read, Op};
    use std::time::{Duration, Instant};

    fn filter() -> Arc<dyn Filter> {
        create(&mut Params::default()).unwrap()
    }

    const MB: usize = 1 << 20;

    #[tokio::test]
    async fn sequential_reads_are_prefetched_and_correct() {
        let (stack, log, mem) = mem_stack(filter(), 32 * MB);
        *mem.read_delay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Duration::from_millis(20);
        let want = mem.snapshot();
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let t = Instant::now();
        let n = 64 * 1024;
        for i in 0..256u64 {
            let got = read(&*h, i * n as u64, n).await;
            assert!(
                got[..] == want[(i as usize) * n..(i as usize + 1) * n],
                "read {i}"
            );
        }
        // 256 reads of 20 ms each would take over 5 s.
        let e = t.elapsed();
        assert!(e < Duration::from_secs(2), "{e:?}");
        // The plugin saw far fewer, larger reads.
        let reads = log
            .ops()
            .iter()
            .filter(|o| matches!(o, Op::Read(..)))
            .count();
        assert!(reads < 64, "{reads} reads");
    }

    #[tokio::test]
    async fn random_reads_are_not_prefetched() {
        let (stack, log, _) = mem_stack(filter(), 8 * MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let off = rng.gen_range(0..2048u64) * 4096;
            let got = read(&*h, off, 4096).await;
            let mut want = vec![0u8; 4096];
            if off < 4 * MB as u64 {
                pattern(&mut want, off);
            }
            assert_eq!(got, want);
        }
        // Only the client's reads (an adjacent pair may start a tiny
        // prefetch, no more).
        assert!(
            log.bytes_read() <= 200 * 4096 + 2 * 1024 * 1024,
            "{}",
            log.bytes_read()
        );
    }

    #[tokio::test]
    async fn writes_invalidate_prefetched_data() {
        let f = filter();
        let (stack, _, _) = mem_stack(f, 8 * MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let h2 = stack.open(&OpenContext::default()).await.unwrap();
        for i in 0..8u64 {
            read(&*h, i * 4096, 4096).await;
        }
        // Let prefetches finish, then change data ahead of the reader
        // through another connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
        h2.pwrite(&[0xEE; 4096], 9 * 4096, Flags::NONE)
            .await
            .unwrap();
        h2.zero(4096, 10 * 4096, Flags::NONE).await.unwrap();
        let got = read(&*h, 8 * 4096, 3 * 4096).await;
        let mut want = vec![0u8; 3 * 4096];
        pattern(&mut want[..4096], 8 * 4096);
        want[4096..8192].fill(0xEE);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn write_during_prefetch_is_not_lost() {
        let (stack, _, mem) = mem_stack(filter(), 8 * MB);
        *mem.read_delay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Duration::from_millis(100);
        let h: Arc<dyn Handle> = Arc::from(stack.open(&OpenContext::default()).await.unwrap());
        for i in 0..4u64 {
            read(&*h, i * 4096, 4096).await;
        }
        // A prefetch of what follows is under way now: write into it.
        h.pwrite(&[0x77; 100], 5 * 4096, Flags::NONE).await.unwrap();
        let got = read(&*h, 4 * 4096, 2 * 4096).await;
        assert_eq!(&got[4096..4196], &[0x77; 100]);
    }

    #[tokio::test]
    async fn memory_is_bounded() {
        let f = Arc::new(ReadaheadFilter {
            global: Arc::new(Global::default()),
        });
        let (stack, _, _) = mem_stack(f.clone(), 256 * MB);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let held = || {
            let c = f
                .global
                .conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[0]
                .upgrade()
                .unwrap();
            let st =
                c.st.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            (st.held, st.segs.len(), st.window)
        };
        let mut max = 0;
        for i in 0..200u64 {
            read(&*h, i * 65536, 65536).await;
            tokio::task::yield_now().await;
            max = max.max(held().0);
        }
        assert!(max <= MAX_HELD, "{max}");
        assert!(max >= 4 * MB as u64, "it did prefetch: {max}");
        assert_eq!(held().2, MAX_WINDOW);
        // A random read empties the buffer.
        read(&*h, 200 * MB as u64, 4096).await;
        assert_eq!(held().0, 0);
        // Closing the connection stops its prefetches.
        drop(h);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(f
            .global
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[0]
            .upgrade()
            .is_none());
    }
}
