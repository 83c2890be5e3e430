//! The default copy strategy: a pipeline with many operations in
//! flight.
//!
//! A walker task reads the source's extents a few windows ahead and
//! turns them into operations ([`Planner`]); the loop here starts each
//! operation as its own task as soon as the budget allows: at most
//! `requests` operations and `queue_bytes` bytes of buffers at once
//! (libnbd's `-R` and `--queue-size`, per connection). Operations finish
//! in any order, spread over the runtime's threads and the endpoints'
//! connections. With lanes (`lanes.rs`), each lane runs this loop with
//! its own budget, all taking operations from the one walker.
//!
//! A stream (a pipe) must be read, or written, in order: operations
//! then pass a baton along for that side only, so a pipe is read one
//! request at a time while the writes to the other side still overlap,
//! and the reverse. The first failure stops everything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::{stream, StreamExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::endpoint::{Endpoint, Extent, OpError};
use super::lanes::Lanes;
use super::ops::{extents_of, Copier, Op, Planner};
use super::progress::Progress;

/// Windows whose extents are fetched concurrently ahead of the copy.
const LOOKAHEAD: usize = 8;
/// Granularity of the byte budget.
const UNIT: u64 = 4096;

/// How much may be in flight.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Operations at once.
    pub requests: usize,
    /// Bytes of data buffers at once.
    pub queue_bytes: u64,
}

/// A place in the order in which a stream must be read or written.
struct Baton {
    /// Fires when the previous operation is done with the stream.
    prev: Option<oneshot::Receiver<()>>,
    /// Fires when this one is.
    next: oneshot::Sender<()>,
}

/// Wait for our turn; `false` if an earlier operation failed (it
/// reports the error; we just stop).
async fn wait(b: &mut Option<Baton>) -> bool {
    match b.as_mut().and_then(|b| b.prev.take()) {
        Some(rx) => rx.await.is_ok(),
        None => true,
    }
}

fn pass(b: Option<Baton>) {
    if let Some(b) = b {
        let _ = b.next.send(());
    }
}

/// The next baton in a chain (`None` when that side needs no order).
fn baton(ordered: bool, last: &mut Option<oneshot::Receiver<()>>) -> Option<Baton> {
    if !ordered {
        return None;
    }
    let (tx, rx) = oneshot::channel();
    Some(Baton {
        prev: last.replace(rx),
        next: tx,
    })
}

/// Carry out one operation.
async fn run(
    c: Arc<Copier>,
    op: Op,
    mut read_turn: Option<Baton>,
    mut write_turn: Option<Baton>,
    eof: Arc<AtomicU64>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> Result<(), OpError> {
    if op.zero {
        if wait(&mut write_turn).await {
            c.zero(&op).await?;
            pass(write_turn);
        }
        return Ok(());
    }
    if !wait(&mut read_turn).await {
        return Ok(());
    }
    if op.offset >= eof.load(Ordering::Acquire) {
        // Past the end of a stream: nothing to do but keep the order.
        pass(read_turn);
        if wait(&mut write_turn).await {
            pass(write_turn);
        }
        return Ok(());
    }
    let (buf, holes) = c.read(&op).await?;
    if (buf.len() as u64) < op.length {
        eof.fetch_min(op.offset + buf.len() as u64, Ordering::AcqRel);
    }
    pass(read_turn);
    if wait(&mut write_turn).await {
        c.write(buf, holes, op.offset).await?;
        pass(write_turn);
    }
    Ok(())
}

/// Walk the source's extents `[0, size)` ahead of the copy and send
/// the operations they make, in order.
async fn walk(
    src: Arc<dyn Endpoint>,
    size: u64,
    chunk: u64,
    max_zero: u64,
    use_extents: bool,
    progress: Arc<Progress>,
    tx: mpsc::Sender<Result<Vec<Op>, OpError>>,
) {
    let mut planner = Planner::new(chunk, max_zero);
    let window = src.extents_window();
    let windows = (0..size)
        .step_by(window as usize)
        .map(move |o| (o, window.min(size - o)));
    let mut lists = stream::iter(windows)
        .map(|(offset, length)| {
            let src = src.clone();
            async move {
                if use_extents {
                    extents_of(&*src, offset, length).await
                } else {
                    Ok(vec![Extent::new(offset, length, false)])
                }
            }
        })
        .buffered(LOOKAHEAD);
    while let Some(r) = lists.next().await {
        match r {
            Ok(list) => {
                for e in list {
                    planner.push(e);
                }
                progress.add(planner.take_skipped());
                let ops: Vec<Op> = std::iter::from_fn(|| planner.pop()).collect();
                if !ops.is_empty() && tx.send(Ok(ops)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
    planner.finish();
    let ops: Vec<Op> = std::iter::from_fn(|| planner.pop()).collect();
    if !ops.is_empty() {
        let _ = tx.send(Ok(ops)).await;
    }
}

/// Where operations come from.
enum Ops {
    /// Planned from extents by the walker task.
    Planned {
        rx: mpsc::Receiver<Result<Vec<Op>, OpError>>,
        ready: std::vec::IntoIter<Op>,
    },
    /// A stream of unknown length: request after request until the
    /// end is found.
    Stream { offset: u64, chunk: u64 },
}

impl Ops {
    async fn next(&mut self, eof: &AtomicU64) -> Result<Option<Op>, OpError> {
        match self {
            Ops::Planned { rx, ready } => loop {
                if let Some(op) = ready.next() {
                    return Ok(Some(op));
                }
                match rx.recv().await {
                    Some(batch) => *ready = batch?.into_iter(),
                    None => return Ok(None),
                }
            },
            Ops::Stream { offset, chunk } => {
                if *offset >= eof.load(Ordering::Acquire) {
                    return Ok(None);
                }
                let op = Op {
                    offset: *offset,
                    length: *chunk,
                    zero: false,
                };
                *offset += *chunk;
                Ok(Some(op))
            }
        }
    }
}

/// Copy everything, on `lanes` if given (each with `limits`) or else
/// on the current runtime; returns the number of bytes copied (the
/// source's size, or a stream's length).
pub async fn copy(
    c: Arc<Copier>,
    limits: Limits,
    use_extents: bool,
    lanes: Option<&Lanes>,
) -> Result<u64, OpError> {
    let chunk = c.settings.request_size;
    let eof = Arc::new(AtomicU64::new(u64::MAX));
    let mut walker = None;
    let ops = match c.src.size() {
        Some(size) => {
            let (tx, rx) = mpsc::channel(4);
            let use_extents = use_extents && c.src.can_extents();
            walker = Some(tokio::spawn(walk(
                c.src.clone(),
                size,
                chunk,
                c.dst.max_zero(),
                use_extents,
                c.progress.clone(),
                tx,
            )));
            Ops::Planned {
                rx,
                ready: Vec::new().into_iter(),
            }
        }
        None => Ops::Stream { offset: 0, chunk },
    };
    let ops = Arc::new(tokio::sync::Mutex::new(ops));
    let stop = Arc::new(AtomicBool::new(false));
    let result = match lanes {
        None => pipeline(c.clone(), limits, ops, eof.clone(), stop).await,
        Some(lanes) => {
            let running: Vec<_> = (0..lanes.len())
                .map(|k| {
                    let p = pipeline(c.clone(), limits, ops.clone(), eof.clone(), stop.clone());
                    lanes.spawn(k, p)
                })
                .collect();
            let mut result = Ok(());
            for r in futures::future::join_all(running).await {
                let r = r.expect("copy lane panicked");
                if result.is_ok() {
                    result = r;
                }
            }
            result
        }
    };
    if let Some(w) = walker {
        w.abort();
    }
    result?;
    Ok(match c.src.size() {
        Some(s) => s,
        None => eof.load(Ordering::Acquire),
    })
}

/// Start operations as the budget allows until there are no more or
/// `stop` is set; the first failure sets `stop` for the other lanes.
async fn pipeline(
    c: Arc<Copier>,
    limits: Limits,
    ops: Arc<tokio::sync::Mutex<Ops>>,
    eof: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(), OpError> {
    let result = run_pipeline(&c, limits, &ops, &eof, &stop).await;
    if result.is_err() {
        stop.store(true, Ordering::Release);
    }
    result
}

async fn run_pipeline(
    c: &Arc<Copier>,
    limits: Limits,
    ops: &tokio::sync::Mutex<Ops>,
    eof: &Arc<AtomicU64>,
    stop: &AtomicBool,
) -> Result<(), OpError> {
    let requests = Arc::new(Semaphore::new(limits.requests.max(1)));
    let max_units = (limits.queue_bytes / UNIT)
        .max(c.settings.request_size.div_ceil(UNIT))
        .min(u64::from(u32::MAX >> 1));
    let bytes = Arc::new(Semaphore::new(max_units as usize));
    let (ordered_reads, ordered_writes) = (c.src.is_stream(), c.dst.is_stream());
    let mut last_read = None;
    let mut last_write = None;
    let mut tasks = JoinSet::new();
    loop {
        let slot = requests
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(op) = ops.lock().await.next(eof).await? else {
            break;
        };
        let buf = if op.zero {
            None
        } else {
            let units = op.length.div_ceil(UNIT).min(max_units) as u32;
            Some(
                bytes
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .expect("semaphore never closed"),
            )
        };
        // Stop at the first failure.
        while let Some(r) = tasks.try_join_next() {
            r.expect("copy task panicked")?;
        }
        let read_turn = baton(ordered_reads && !op.zero, &mut last_read);
        let write_turn = baton(ordered_writes, &mut last_write);
        tasks.spawn(run(
            c.clone(),
            op,
            read_turn,
            write_turn,
            eof.clone(),
            (slot, buf),
        ));
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("copy task panicked")?;
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
    }
    Ok(())
}
