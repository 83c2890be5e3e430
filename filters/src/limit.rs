//! # limit: limit how many clients may be connected at once
//!
//! A client that opens an export while `limit` clients already have one
//! open is refused with `NBD_REP_ERR_POLICY` ("limit: too many clients
//! connected, connection rejected"). When a client disconnects its place
//! is free again.
//!
//! ```text
//! nbdkit --filter=limit file disk.img limit=2
//! ```
//!
//! ## Parameters
//!
//! - `limit=N`: the most clients connected at once (default 1); 0 means
//!   no limit.
//!
//! Clients are counted while they hold an open export; a client that asks
//! for `NBD_OPT_INFO` before `NBD_OPT_GO` releases its place in between.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigResult, Error, Filter, FilterEntry, Handle, Next, OpenContext, Params, Result};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "limit",
    help: "limit=<N>                Limit the number of clients (default: 1; 0 = no limit).",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let limit = p.take_parsed::<usize>("limit")?.unwrap_or(1);
    Ok(Arc::new(LimitFilter {
        limit,
        clients: Arc::new(AtomicUsize::new(0)),
    }))
}

struct LimitFilter {
    limit: usize,
    clients: Arc<AtomicUsize>,
}

#[async_trait]
impl Filter for LimitFilter {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        if self.limit == 0 {
            return next.open(ctx).await;
        }
        let took = self
            .clients
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            });
        if took.is_err() {
            let e = Error::eperm("limit: too many clients connected, connection rejected");
            libnbd::elog!("nbdkit: {}", e.msg);
            return Err(e);
        }
        // The place is given back when the handle (or this guard) drops.
        let place = Place(self.clients.clone());
        let next = next.open(ctx).await?;
        Ok(Box::new(LimitHandle {
            next,
            _place: place,
        }))
    }
}

/// One client's place in the count.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct LimitHandle {
    next: Box<dyn Handle>,
    _place: Place,
}

#[async_trait]
impl Handle for LimitHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn stack_of(words: &[&str]) -> libnbd::Stack {
        stack(vec![create(&mut params(words)).unwrap()], &Mem::new(512))
    }

    #[tokio::test]
    async fn limit_refuses_beyond_n() {
        let s = stack_of(&["limit=2"]);
        let a = s.open(&ctx(1)).await.unwrap();
        let b = s.open(&ctx(2)).await.unwrap();
        let e = s.open(&ctx(3)).await.err().unwrap();
        assert_eq!(e.errno, libnbd::protocol::errno::EPERM);
        drop(a);
        let c = s.open(&ctx(4)).await.unwrap();
        assert!(s.open(&ctx(5)).await.is_err());
        drop((b, c));
        s.open(&ctx(6)).await.unwrap();
    }

    #[tokio::test]
    async fn limit_default_one_and_zero_unlimited() {
        let s = stack_of(&[]);
        let _a = s.open(&ctx(1)).await.unwrap();
        assert!(s.open(&ctx(2)).await.is_err());
        let s = stack_of(&["limit=0"]);
        let hs: Vec<_> = open_many(&s, 10).await;
        assert_eq!(hs.len(), 10);
        assert!(create(&mut params(&["limit=-1"])).is_err());
    }

    async fn open_many(s: &libnbd::Stack, n: u64) -> Vec<Box<dyn Handle>> {
        let mut v = Vec::new();
        for i in 0..n {
            v.push(s.open(&ctx(i)).await.unwrap());
        }
        v
    }
}
