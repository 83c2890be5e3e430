//! # noparallel: handle one request (or one client) at a time
//!
//! Turns off parallelism between the client and the plugin: to measure
//! what parallelism is worth, to work around a plugin that is less
//! thread-safe than it claims, or for a client that batches requests but
//! cannot take replies out of order.
//!
//! ```text
//! nbdkit --filter=noparallel file disk.img
//! nbdkit --filter=noparallel file serialize=connections disk.img
//! ```
//!
//! ## Parameters
//!
//! - `serialize=requests` (default): one request at a time per
//!   connection; other connections go on in parallel.
//! - `serialize=all-requests`: one request at a time over all
//!   connections.
//! - `serialize=connections`: one client at a time (and one request at a
//!   time): a second client waits, in the handshake, until the first has
//!   gone, and multi-conn is not advertised.
//!
//! ## Behaviour
//!
//! The filter sets the server's thread model (what other layers, such as
//! the multi-conn and scan filters, see) and enforces it itself: a
//! request waits for the one before it to finish, replies come back in
//! order. To limit how many clients may connect at once, rather than
//! making them wait, use the limit filter.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigError, ConfigResult, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result, ThreadModel,
};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "noparallel",
    help: "serialize=<MODE>      'requests' (default), 'all-requests', or 'connections'.",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let model = match p.take("serialize").as_deref() {
        None | Some("requests") | Some("request") => ThreadModel::SerializeRequests,
        Some("all-requests") | Some("all_requests") => ThreadModel::SerializeAllRequests,
        Some("connections") | Some("connection") => ThreadModel::SerializeConnections,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown serialize mode '{v}' (requests, all-requests or connections)"
            )))
        }
    };
    Ok(Arc::new(NoParallel {
        model,
        all: Arc::new(Mutex::new(())),
        client: Arc::new(Semaphore::new(1)),
    }))
}

struct NoParallel {
    model: ThreadModel,
    /// One request at a time over all connections (all-requests).
    all: Arc<Mutex<()>>,
    /// One client at a time (connections).
    client: Arc<Semaphore>,
}

#[async_trait]
impl Filter for NoParallel {
    fn thread_model(&self) -> ThreadModel {
        self.model
    }

    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let client = match self.model {
            ThreadModel::SerializeConnections => Some(
                self.client
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| libnbd::Error::eio("noparallel: closed"))?,
            ),
            _ => None,
        };
        // Requests of this connection share a lock, or every
        // connection's share the filter's.
        let lock = match self.model {
            ThreadModel::SerializeAllRequests => self.all.clone(),
            _ => Arc::new(Mutex::new(())),
        };
        Ok(Box::new(NoParallelHandle {
            next: next.open(ctx).await?,
            lock,
            connections: self.model == ThreadModel::SerializeConnections,
            _client: client,
        }))
    }
}

struct NoParallelHandle {
    next: Box<dyn Handle>,
    /// Held for the whole of each request.
    lock: Arc<Mutex<()>>,
    connections: bool,
    /// The one client's place (connections), given back on close.
    _client: Option<OwnedSemaphorePermit>,
}

impl NoParallelHandle {
    async fn one<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        let _one = self.lock.lock().await;
        f.await
    }
}

#[async_trait]
impl Handle for NoParallelHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        let next = self.next.caps()?;
        Ok(Caps {
            multi_conn: next.multi_conn && !self.connections,
            ..next
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.one(self.next.pread(buf, offset, flags)).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.one(self.next.pwrite(buf, offset, flags)).await
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        self.one(self.next.flush(flags)).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.one(self.next.trim(count, offset, flags)).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.one(self.next.zero(count, offset, flags)).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.one(self.next.extents(count, offset, flags, ext)).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.one(self.next.cache(count, offset, flags)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A layer below noparallel whose flush takes a while and counts how
    /// many run at once.
    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    struct Slow(Arc<Gauge>);

    #[async_trait]
    impl Filter for Slow {
        async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
            Ok(Box::new(SlowHandle(next.open(ctx).await?, self.0.clone())))
        }
    }

    struct SlowHandle(Box<dyn Handle>, Arc<Gauge>);

    #[async_trait]
    impl Handle for SlowHandle {
        fn next(&self) -> Option<&dyn Handle> {
            Some(&*self.0)
        }
        async fn flush(&self, _flags: Flags) -> Result<()> {
            let n = self.1.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.1.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.1.now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn stack_of(words: &[&str]) -> (libnbd::Stack, Arc<Gauge>) {
        let g = Arc::new(Gauge::default());
        let f = create(&mut params(words)).unwrap();
        (
            stack(vec![f, Arc::new(Slow(g.clone()))], &Mem::new(4096)),
            g,
        )
    }

    #[tokio::test]
    async fn noparallel_models() {
        for (words, model, mc) in [
            (&[][..], ThreadModel::SerializeRequests, true),
            (
                &["serialize=all-requests"][..],
                ThreadModel::SerializeAllRequests,
                true,
            ),
            (
                &["serialize=connections"][..],
                ThreadModel::SerializeConnections,
                false,
            ),
        ] {
            let (s, _) = stack_of(words);
            assert_eq!(s.thread_model(), model);
            let h = s.open(&ctx(1)).await.unwrap();
            assert_eq!(h.caps().unwrap().multi_conn, mc, "{words:?}");
        }
        assert!(create(&mut params(&["serialize=none"])).is_err());
    }

    /// The most flushes running at once when each of `handles` sends two.
    async fn most_at_once(handles: &[Box<dyn Handle>], g: &Gauge) -> usize {
        g.most.store(0, Ordering::SeqCst);
        let all = handles
            .iter()
            .flat_map(|h| [h.flush(Flags::NONE), h.flush(Flags::NONE)]);
        for r in futures::future::join_all(all).await {
            r.unwrap();
        }
        g.most.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn noparallel_serialises_requests() {
        let (s, g) = stack_of(&["serialize=requests"]);
        let hs = vec![
            s.open(&ctx(1)).await.unwrap(),
            s.open(&ctx(2)).await.unwrap(),
        ];
        assert_eq!(most_at_once(&hs, &g).await, 2, "one per connection");
        let (s, g) = stack_of(&["serialize=all-requests"]);
        let hs = vec![
            s.open(&ctx(1)).await.unwrap(),
            s.open(&ctx(2)).await.unwrap(),
        ];
        assert_eq!(most_at_once(&hs, &g).await, 1, "one over all");
        // Without the filter they would overlap.
        let g = Arc::new(Gauge::default());
        let s = stack(vec![Arc::new(Slow(g.clone()))], &Mem::new(4096));
        let hs = vec![s.open(&ctx(1)).await.unwrap()];
        assert_eq!(most_at_once(&hs, &g).await, 2);
    }

    #[tokio::test]
    async fn noparallel_connections_waits_for_the_first_client() {
        let (s, g) = stack_of(&["serialize=connections"]);
        let a = s.open(&ctx(1)).await.unwrap();
        assert_eq!(most_at_once(std::slice::from_ref(&a), &g).await, 1);
        let s2 = s.clone();
        let second = tokio::spawn(async move { s2.open(&ctx(2)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second client waits");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second client gets in once the first has gone")
            .unwrap()
            .unwrap();
    }
}
