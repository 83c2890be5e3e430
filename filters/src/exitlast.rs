//! # exitlast: exit when the last client disconnects
//!
//! nbdkit keeps running until it has served at least one client and then
//! has none left, whereupon it exits (it never exits before the first
//! client). Useful with a superserver, to free resources when nbdkit is
//! not in use, or to make sure nbdkit goes away after its client (see
//! also `--run` and the exitwhen filter).
//!
//! ```text
//! nbdkit --filter=exitlast file disk.img
//! ```
//!
//! ## Parameters
//!
//! There are no parameters.
//!
//! nbdkit 1.32 exits as soon as its last open export closes, even when
//! the client is about to open another on the same connection (as
//! `nbdinfo` does with `NBD_OPT_INFO` then `NBD_OPT_GO`). This filter
//! waits until no client is connected to the server at all, so such
//! clients work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use libnbd::server::ServerContext;
use libnbd::{ConfigResult, Filter, FilterEntry, Handle, Next, OpenContext, Params, Result};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "exitlast",
    help: "",
    create,
};

/// The server a filter watches and stops: known from `after_fork` on
/// (before that, and in a stack no server runs, there is nothing to stop).
#[derive(Default)]
pub(crate) struct ServerSlot(OnceLock<Arc<ServerContext>>);

impl ServerSlot {
    /// Remember the server (the first one given wins).
    pub fn set(&self, server: &Arc<ServerContext>) {
        let _ = self.0.set(server.clone());
    }
    /// Ask the server to exit.
    pub fn shutdown(&self) {
        if let Some(s) = self.0.get() {
            s.request_shutdown();
        }
    }
    /// Clients connected to the server now.
    pub fn connections(&self) -> usize {
        self.0.get().map_or(0, |s| s.connections())
    }
}

/// How often we look at the server's connection count while waiting for
/// the last client to go.
const WATCH: Duration = Duration::from_millis(10);

fn create(_: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(ExitLast {
        shared: Arc::new(Shared {
            handles: AtomicUsize::new(0),
            server: ServerSlot::default(),
        }),
    }))
}

struct Shared {
    /// Exports open now.
    handles: AtomicUsize,
    /// The server whose clients we count.
    server: ServerSlot,
}

/// After the last export closed: exit once no client is connected,
/// unless an export is opened again first.
fn exit_when_idle(s: Arc<Shared>) {
    let watch = move || loop {
        if s.handles.load(Ordering::SeqCst) > 0 {
            return;
        }
        // The closing connection still counts until its handle is gone
        // and the server has finished with it.
        if s.server.connections() == 0 {
            libnbd::debug!("exitlast: last client disconnected, exiting");
            s.server.shutdown();
            return;
        }
        std::thread::sleep(WATCH);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("exitlast".into())
        .spawn(watch)
    {
        libnbd::elog!("nbdkit: exitlast: cannot start a thread: {e}");
    }
}

struct ExitLast {
    shared: Arc<Shared>,
}

#[async_trait]
impl Filter for ExitLast {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    fn after_fork(&self, server: &Arc<ServerContext>) -> Result<()> {
        self.shared.server.set(server);
        Ok(())
    }

    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = next.open(ctx).await?;
        self.shared.handles.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(ExitLastHandle {
            next,
            shared: self.shared.clone(),
        }))
    }
}

struct ExitLastHandle {
    next: Box<dyn Handle>,
    shared: Arc<Shared>,
}

impl Drop for ExitLastHandle {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            exit_when_idle(self.shared.clone());
        }
    }
}

#[async_trait]
impl Handle for ExitLastHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    async fn settle() {
        tokio::time::sleep(WATCH * 5).await;
    }

    #[tokio::test]
    async fn exitlast_exits_after_last_client() {
        let server = ServerContext::new(false);
        let f = create(&mut params(&[])).unwrap();
        f.after_fork(&server).unwrap();
        let s = stack(vec![f], &Mem::new(512));
        let (c1, c2) = (server.connect(), server.connect());
        let a = s.open(&ctx(1)).await.unwrap();
        let b = s.open(&ctx(2)).await.unwrap();
        drop(a);
        drop(c1);
        settle().await;
        assert!(!server.is_shutting_down());
        // Like NBD_OPT_INFO then NBD_OPT_GO on one connection.
        drop(b);
        settle().await;
        assert!(!server.is_shutting_down());
        let c = s.open(&ctx(2)).await.unwrap();
        settle().await;
        drop(c);
        drop(c2);
        settle().await;
        assert!(server.is_shutting_down());
    }
}
