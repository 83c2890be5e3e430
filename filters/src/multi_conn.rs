//! # multi-conn: enable, emulate or disable multi-conn
//!
//! `NBD_FLAG_CAN_MULTI_CONN` promises a client that a flush on one
//! connection makes every write finished before it visible on all
//! connections to the export, so it may spread its requests over several
//! connections. A plugin must opt in; this filter can emulate the promise
//! for one that does not (by replicating each flush to every connection),
//! take it away from one that does, or make it (unsafely) regardless, and
//! it can skip flushes that have nothing to flush.
//!
//! ```text
//! nbdkit --filter=multi-conn file disk.img
//! nbdkit --filter=multi-conn file disk.img multi-conn-mode=plugin multi-conn-track-dirty=fast
//! ```
//!
//! ## Parameters
//!
//! - `multi-conn-mode=auto` (default): `disable` if the server runs one
//!   client at a time (a `serialize=connections` noparallel filter),
//!   else `plugin` if the layer below advertises multi-conn, else
//!   `emulate`.
//! - `multi-conn-mode=emulate`: advertise multi-conn and keep its
//!   promise: a flush on any connection (or a write with FUA, done as a
//!   write then such a flush) is replicated to every connection of the
//!   export. A client cannot connect if the layer below cannot flush.
//! - `multi-conn-mode=plugin`: advertise what the layer below does, do
//!   not replicate flushes, but still skip needless ones (see
//!   `multi-conn-track-dirty`).
//! - `multi-conn-mode=disable`: never advertise multi-conn, and do not
//!   replicate flushes (to test that a client flushes every connection
//!   itself).
//! - `multi-conn-mode=unsafe`: advertise multi-conn even when the layer
//!   below lacks it; dangerous, a client may lose data it thought
//!   flushed.
//! - `multi-conn-track-dirty=connection` (default; `conn` also works):
//!   track writes, zeroes and trims per connection and reads since the
//!   last flush: a replicated flush goes only to connections that wrote,
//!   and to those that read while the image had unflushed writes (they
//!   may hold stale data). Without emulation, a flush is skipped while
//!   nothing has been written since the image was last flushed (which a
//!   flush only achieves for the whole image when the layer below has
//!   multi-conn).
//! - `multi-conn-track-dirty=fast`: track only whether anything was
//!   written since the last flush anywhere; a flush when nothing was is
//!   skipped, and any flush counts as flushing every connection (safe
//!   with `emulate`, possibly not with `plugin` over a layer without
//!   multi-conn).
//! - `multi-conn-track-dirty=off`: pass every flush on (replicated to
//!   every connection with `emulate`).
//! - `multi-conn-exportname=false` (default): replicate flushes to every
//!   connection whatever its export name; `multi-conn-exportname=true`:
//!   only to connections to the same export (unsafe if the plugin serves
//!   the same data under several names).
//!
//! ## Behaviour
//!
//! It assumes the connections share their data underneath, except for
//! caching; it is no use over a plugin that gives each connection its own
//! data (tmpdisk). The fua filter gives more control over flushes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use libnbd::{
    parse_bool, Caps, ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Fua, Handle,
    Next, OpenContext, Params, Result, ThreadModel,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "multi-conn",
    help: "\
multi-conn-mode=<MODE>          'auto' (default), 'emulate', 'plugin',
                                'disable', or 'unsafe'.
multi-conn-track-dirty=<LEVEL>  'conn' (default), 'fast', or 'off'.
multi-conn-exportname=<BOOL>    true to limit emulation by export name.",
    create,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Emulate,
    Plugin,
    Disable,
    Unsafe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Track {
    Connection,
    Fast,
    Off,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mode = match p.take("multi-conn-mode").as_deref() {
        None | Some("auto") => Mode::Auto,
        Some("emulate") => Mode::Emulate,
        Some("plugin") => Mode::Plugin,
        Some("disable") => Mode::Disable,
        Some("unsafe") => Mode::Unsafe,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown multi-conn mode '{v}' (auto, emulate, plugin, disable or unsafe)"
            )))
        }
    };
    let track = match p.take("multi-conn-track-dirty").as_deref() {
        None | Some("connection") | Some("conn") => Track::Connection,
        Some("fast") => Track::Fast,
        Some("off") => Track::Off,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown multi-conn dirty-tracking mode '{v}' (connection, fast or off)"
            )))
        }
    };
    let by_export = match p.take("multi-conn-exportname") {
        Some(v) => {
            parse_bool(&v).map_err(|e| ConfigError::new(format!("multi-conn-exportname: {e}")))?
        }
        None => false,
    };
    Ok(Arc::new(MultiConn {
        mode,
        track,
        by_export,
        groups: Arc::new(Mutex::new(HashMap::new())),
    }))
}

/// The connections whose flushes keep each other consistent: those of
/// one export (`multi-conn-exportname=true`) or all of them.
#[derive(Default)]
struct Group {
    /// Every connection open in the group.
    conns: Vec<Weak<Conn>>,
    /// Something was written since the group was last flushed as a
    /// whole.
    dirty: bool,
}

/// One connection, as the others see it.
struct Conn {
    next: Box<dyn Handle>,
    /// Wrote (write, zero, trim) since this connection was last flushed.
    wrote: AtomicBool,
    /// Read since this connection was last flushed.
    read: AtomicBool,
}

type Groups = Arc<Mutex<HashMap<String, Group>>>;

struct MultiConn {
    mode: Mode,
    track: Track,
    by_export: bool,
    groups: Groups,
}

#[async_trait]
impl Filter for MultiConn {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let model = next.thread_model();
        let h = next.open(ctx).await?;
        let caps = h.caps()?;
        let mode = match self.mode {
            Mode::Auto if model == ThreadModel::SerializeConnections => Mode::Disable,
            Mode::Auto if caps.multi_conn => Mode::Plugin,
            Mode::Auto => Mode::Emulate,
            m => m,
        };
        if mode == Mode::Emulate && !caps.flush {
            let msg = "emulating multi-conn requires working flush";
            libnbd::elog!("nbdkit: multi-conn[{}]: error: {msg}", ctx.id);
            return Err(Error::einval(msg));
        }
        let conn = Arc::new(Conn {
            next: h,
            wrote: AtomicBool::new(false),
            read: AtomicBool::new(false),
        });
        let key = if self.by_export {
            ctx.export_name.clone()
        } else {
            String::new()
        };
        {
            let mut groups = lock(&self.groups);
            let g = groups.entry(key.clone()).or_default();
            g.conns.retain(|c| c.strong_count() > 0);
            g.conns.push(Arc::downgrade(&conn));
        }
        Ok(Box::new(MultiConnHandle {
            conn,
            mode,
            track: self.track,
            next_multi_conn: caps.multi_conn,
            groups: self.groups.clone(),
            key,
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct MultiConnHandle {
    conn: Arc<Conn>,
    /// The mode `auto` resolved to for this connection.
    mode: Mode,
    track: Track,
    /// Does the layer below advertise multi-conn?
    next_multi_conn: bool,
    groups: Groups,
    /// This connection's group.
    key: String,
}

impl Drop for MultiConnHandle {
    fn drop(&mut self) {
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get_mut(&self.key) {
            let me = Arc::as_ptr(&self.conn);
            g.conns.retain(|c| c.strong_count() > 0 && c.as_ptr() != me);
            if g.conns.is_empty() {
                groups.remove(&self.key);
            }
        }
    }
}

impl MultiConnHandle {
    fn group<R>(&self, f: impl FnOnce(&mut Group) -> R) -> R {
        let mut groups = lock(&self.groups);
        f(groups.entry(self.key.clone()).or_default())
    }

    fn mark_written(&self) {
        if self.track != Track::Off {
            self.conn.wrote.store(true, Ordering::SeqCst);
            self.group(|g| g.dirty = true);
        }
    }

    fn mark_read(&self) {
        if self.track == Track::Connection {
            self.conn.read.store(true, Ordering::SeqCst);
        }
    }

    /// A write-like request: with emulation, FUA becomes the write then a
    /// flush of every connection that needs it.
    async fn write_like<F: std::future::Future<Output = Result<()>>>(
        &self,
        flags: Flags,
        op: impl FnOnce(Flags) -> F,
    ) -> Result<()> {
        let fua = flags.contains(Flags::FUA) && self.mode == Mode::Emulate;
        let r = op(if fua {
            flags.without(Flags::FUA)
        } else {
            flags
        })
        .await;
        self.mark_written();
        r?;
        if fua {
            self.flush_group().await?;
        }
        Ok(())
    }

    /// The emulated flush: every connection of the group that may hold
    /// something another connection needs to see, or may have seen stale
    /// data, is flushed.
    async fn flush_group(&self) -> Result<()> {
        let (conns, dirty) = self.group(|g| {
            let live: Vec<Arc<Conn>> = g.conns.iter().filter_map(Weak::upgrade).collect();
            (live, g.dirty)
        });
        for c in &conns {
            let wrote = c.wrote.load(Ordering::SeqCst);
            let read = c.read.load(Ordering::SeqCst);
            let needed = match self.track {
                Track::Off => true,
                Track::Fast => wrote || dirty,
                Track::Connection => wrote || (dirty && read),
            };
            if !needed {
                continue;
            }
            // Cleared first: a write racing with this flush marks again.
            c.wrote.store(false, Ordering::SeqCst);
            c.read.store(false, Ordering::SeqCst);
            if let Err(e) = c.next.flush(Flags::NONE).await {
                c.wrote.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.group(|g| g.dirty = false);
        Ok(())
    }

    /// A flush without emulation: skipped when the image is clean.
    async fn flush_own(&self, flags: Flags) -> Result<()> {
        if self.track != Track::Off && !self.group(|g| g.dirty) {
            return Ok(());
        }
        self.conn.next.flush(flags).await?;
        let whole_image = match self.track {
            Track::Off => return Ok(()),
            Track::Fast => true,
            // One connection's flush flushes the image only if the layer
            // below keeps connections consistent.
            Track::Connection => self.next_multi_conn,
        };
        self.conn.wrote.store(false, Ordering::SeqCst);
        self.conn.read.store(false, Ordering::SeqCst);
        if whole_image {
            let conns = self.group(|g| {
                g.dirty = false;
                g.conns.iter().filter_map(Weak::upgrade).collect::<Vec<_>>()
            });
            for c in conns {
                c.wrote.store(false, Ordering::SeqCst);
                c.read.store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for MultiConnHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.conn.next)
    }
    fn caps(&self) -> Result<Caps> {
        let next = self.conn.next.caps()?;
        Ok(match self.mode {
            Mode::Emulate => Caps {
                multi_conn: true,
                // FUA is done here, as a write then the replicated flush.
                fua: if next.write { Fua::Emulate } else { Fua::None },
                ..next
            },
            Mode::Disable => Caps {
                multi_conn: false,
                ..next
            },
            Mode::Unsafe => Caps {
                multi_conn: true,
                ..next
            },
            Mode::Plugin | Mode::Auto => next,
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.mark_read();
        self.conn.next.pread(buf, offset, flags).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.mark_read();
        self.conn.next.cache(count, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.write_like(flags, |f| self.conn.next.pwrite(buf, offset, f))
            .await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.write_like(flags, |f| self.conn.next.zero(count, offset, f))
            .await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.write_like(flags, |f| self.conn.next.trim(count, offset, f))
            .await
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        if self.mode == Mode::Emulate {
            self.flush_group().await
        } else {
            self.flush_own(flags).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    /// A layer that hides the multi-conn of the one below (most plugins
    /// here are multi-conn safe).
    struct NoMultiConn;

    #[async_trait]
    impl Filter for NoMultiConn {
        async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
            Ok(Box::new(NoMultiConnHandle(next.open(ctx).await?)))
        }
    }

    struct NoMultiConnHandle(Box<dyn Handle>);

    #[async_trait]
    impl Handle for NoMultiConnHandle {
        fn next(&self) -> Option<&dyn Handle> {
            Some(&*self.0)
        }
        fn caps(&self) -> Result<Caps> {
            Ok(Caps {
                multi_conn: false,
                ..self.0.caps()?
            })
        }
    }

    fn stack_of(words: &[&str], multi_conn_below: bool) -> (libnbd::Stack, Arc<Mem>) {
        let mem = Mem::new(1 << 20);
        let mut filters = vec![create(&mut params(words)).unwrap()];
        if !multi_conn_below {
            filters.push(Arc::new(NoMultiConn));
        }
        (stack(filters, &mem), mem)
    }

    async fn three(s: &libnbd::Stack) -> Vec<Box<dyn Handle>> {
        let mut v = Vec::new();
        for i in 1..=3 {
            v.push(s.open(&ctx(i)).await.unwrap());
        }
        v
    }

    fn flushes(mem: &Mem) -> usize {
        mem.take_calls().iter().filter(|c| *c == "flush").count()
    }

    /// The scenario run against upstream's filter (three connections a,
    /// b, c over the memory plugin); each step's flush count as upstream
    /// 1.32.5 gave it, in this order: flush a (clean); write a; flush b;
    /// flush a; read b; flush a; write a; read b; flush c; FUA write a;
    /// zero b; flush b; flush b.
    async fn scenario(words: &[&str], below: bool) -> Vec<usize> {
        let (s, mem) = stack_of(words, below);
        let h = three(&s).await;
        let (a, b, c) = (&h[0], &h[1], &h[2]);
        let mut out = Vec::new();
        let mut step = |mem: &Mem| out.push(flushes(mem));
        a.flush(Flags::NONE).await.unwrap();
        step(&mem);
        a.pwrite(&[1; 512], 0, Flags::NONE).await.unwrap();
        b.flush(Flags::NONE).await.unwrap();
        step(&mem);
        a.flush(Flags::NONE).await.unwrap();
        step(&mem);
        read(&**b, 0, 512).await;
        a.flush(Flags::NONE).await.unwrap();
        step(&mem);
        a.pwrite(&[2; 512], 0, Flags::NONE).await.unwrap();
        read(&**b, 0, 512).await;
        c.flush(Flags::NONE).await.unwrap();
        step(&mem);
        a.pwrite(&[3; 512], 0, Flags::FUA).await.unwrap();
        step(&mem);
        b.zero(512, 0, Flags::NONE).await.unwrap();
        b.flush(Flags::NONE).await.unwrap();
        step(&mem);
        b.flush(Flags::NONE).await.unwrap();
        step(&mem);
        out
    }

    #[tokio::test]
    async fn multi_conn_emulate_replicates_flushes_as_upstream() {
        let e = "multi-conn-mode=emulate";
        assert_eq!(scenario(&[e], true).await, [0, 1, 0, 0, 2, 1, 1, 0]);
        let fast = [e, "multi-conn-track-dirty=fast"];
        assert_eq!(scenario(&fast, true).await, [0, 3, 0, 0, 3, 3, 3, 0]);
        let off = [e, "multi-conn-track-dirty=off"];
        assert_eq!(scenario(&off, true).await, [3, 3, 3, 3, 3, 3, 3, 3]);
        // auto over a layer without multi-conn is emulate.
        assert_eq!(scenario(&[], false).await, [0, 1, 0, 0, 2, 1, 1, 0]);
    }

    #[tokio::test]
    async fn multi_conn_other_modes_skip_clean_flushes_as_upstream() {
        for mode in ["plugin", "disable", "unsafe", "auto"] {
            let m = format!("multi-conn-mode={mode}");
            assert_eq!(
                scenario(&[&m], true).await,
                [0, 1, 0, 0, 1, 0, 1, 0],
                "{mode}"
            );
            let fast = [m.as_str(), "multi-conn-track-dirty=fast"];
            assert_eq!(scenario(&fast, true).await, [0, 1, 0, 0, 1, 0, 1, 0]);
            let off = [m.as_str(), "multi-conn-track-dirty=off"];
            assert_eq!(scenario(&off, true).await, [1, 1, 1, 1, 1, 0, 1, 1]);
        }
        // Over a layer without multi-conn, one connection's flush does
        // not clean the image: every flush after the first write goes
        // through.
        let p = "multi-conn-mode=plugin";
        assert_eq!(scenario(&[p], false).await, [0, 1, 1, 1, 1, 0, 1, 1]);
        let fast = [p, "multi-conn-track-dirty=fast"];
        assert_eq!(scenario(&fast, false).await, [0, 1, 0, 0, 1, 0, 1, 0]);
    }

    #[tokio::test]
    async fn multi_conn_advertises_per_mode() {
        for (mode, below, want) in [
            ("emulate", false, true),
            ("plugin", false, false),
            ("plugin", true, true),
            ("disable", true, false),
            ("unsafe", false, true),
            ("auto", false, true),
            ("auto", true, true),
        ] {
            let (s, _) = stack_of(&[&format!("multi-conn-mode={mode}")], below);
            let h = s.open(&ctx(1)).await.unwrap();
            assert_eq!(h.caps().unwrap().multi_conn, want, "{mode} {below}");
        }
        for bad in [
            "multi-conn-mode=on",
            "multi-conn-track-dirty=slow",
            "multi-conn-exportname=perhaps",
        ] {
            assert!(create(&mut params(&[bad])).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn multi_conn_auto_is_disable_when_serialising_connections() {
        let mem = Mem::new(4096);
        let s = stack(
            vec![
                create(&mut params(&[])).unwrap(),
                (crate::noparallel::ENTRY.create)(&mut params(&["serialize=connections"])).unwrap(),
            ],
            &mem,
        );
        let h = s.open(&ctx(1)).await.unwrap();
        assert!(!h.caps().unwrap().multi_conn);
    }

    #[tokio::test]
    async fn multi_conn_exportname_limits_replication() {
        let (s, mem) = stack_of(
            &["multi-conn-mode=emulate", "multi-conn-exportname=true"],
            true,
        );
        let on = |name: &str, id| OpenContext {
            export_name: name.into(),
            ..ctx(id)
        };
        let a = s.open(&on("x", 1)).await.unwrap();
        let b = s.open(&on("y", 2)).await.unwrap();
        let a2 = s.open(&on("x", 3)).await.unwrap();
        a.pwrite(&[1], 0, Flags::NONE).await.unwrap();
        b.pwrite(&[1], 1, Flags::NONE).await.unwrap();
        mem.take_calls();
        a2.flush(Flags::NONE).await.unwrap();
        assert_eq!(flushes(&mem), 1, "only export x's writer");
        b.flush(Flags::NONE).await.unwrap();
        assert_eq!(flushes(&mem), 1, "export y still needed its own");
        drop(a);
        a2.pwrite(&[1], 0, Flags::NONE).await.unwrap();
        a2.flush(Flags::NONE).await.unwrap();
        assert_eq!(flushes(&mem), 1, "a closed connection is not flushed");
    }
}
