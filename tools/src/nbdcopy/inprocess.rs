//! A captive `[ nbdkit ... ]` of this build, served inside nbdcopy.
//!
//! When a source or destination is `[ nbdkit PLUGIN ... ]` and that
//! `nbdkit` is the one installed next to this nbdcopy, the plugin and
//! its filters are configured here ([`crate::nbdkit::in_process`]) and
//! the copy calls the stack's handle directly: no second process, no
//! socket, no NBD encoding, and the bytes of a write reach the plugin
//! from the copy's own buffer (over a Unix socket each byte is copied
//! into the kernel and out again, and both ends pay the system calls
//! and wakeups; a third of the CPU of a copy into a local qcow2).
//!
//! What a client of the spawned server would see is kept: the export is
//! opened as one client over a Unix socket (default export, our own
//! credentials as the peer's, no TLS), with the server's `-r`, its
//! capabilities worked out as the server advertises them (writes,
//! flush, trim, zero and fast zero only when writable; multi-conn only
//! above `serialize_connections`), extents through `base:allocation`,
//! requests no larger than the server takes, and I/O the layers say
//! must be aligned done by read-modify-write as nbdcopy does over NBD.
//! Closing drops the handle (a layer's close work, e.g. the qcow2
//! filter's sync, runs then) and unloads the layers, as the server does
//! when the last client goes and it is told to exit. On `SIGINT`,
//! `SIGTERM` or `SIGHUP` the same happens before nbdcopy exits, once the
//! requests in flight are done (waiting at most as long as for a spawned
//! server to go), as a spawned server closes on the `SIGTERM` nbdcopy
//! sends it.
//!
//! Commands with options beyond the stack's own (`-v`, TLS, listening
//! options, ...) and `--shallow` sources (which need
//! `qemu:allocation-depth` over NBD) are spawned as before, and so is
//! every captive server when `$NBDCOPY_SPAWN_CAPTIVE` is set.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock, Weak};
use std::time::Instant;

use async_trait::async_trait;
use libnbd::client::errno_text;
use libnbd::protocol::{alloc, errno, MAX_REQUEST_SIZE};
use libnbd::server::ServerContext;
use libnbd::ThreadModel;
use libnbd::{Caps, Disconnect, Error, Extents, Flags, Handle, OpenContext, PeerCred, Stack};

use super::endpoint::{unaligned, widen, zero_pieces, Data, Endpoint, Extent};
use crate::nbdkit::InProcess;

/// Requests in flight: as for a server on a Unix socket.
const DEPTH: usize = 8;

/// Writes of this size when the export is not multi-conn (one
/// connection's worth of parallelism), as over NBD.
const SINGLE_CONN_WRITE_SIZE: u64 = 2 << 20;

/// The stack and its open handle: what closing (by the copy, or on a
/// signal) tears down.
struct Shared {
    stack: Stack,
    /// Taken when closing: dropping the last reference closes the
    /// layers' handles.
    handle: RwLock<Option<Arc<dyn Handle>>>,
    /// Held through closing, so that a second closer (the signal
    /// handler, while a failed copy's drop closes) waits for the first
    /// to finish; true once closed.
    closed: Mutex<bool>,
    /// Closed by a signal: requests still coming wait for the exit
    /// rather than fail (a failing copy would race the signal's exit
    /// status with its own).
    by_signal: AtomicBool,
}

/// Every in-process server open, for the signal handler.
static OPEN: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

impl Shared {
    /// Close the handle once no request holds it any more (waiting at
    /// most until `deadline`), then unload the layers; once, and a
    /// caller returns only when that is done.
    fn close(&self, deadline: Option<Instant>) {
        let mut closed = self
            .closed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *closed {
            return;
        }
        let h = self
            .handle
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let (Some(h), Some(deadline)) = (&h, deadline) {
            while Arc::strong_count(h) > 1 && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        // The last reference (unless a request outlived the deadline):
        // the layers' handles close here, on this runtime, which their
        // close work may need.
        drop(h);
        self.stack.unload();
        *closed = true;
    }
}

/// On a signal: close every in-process server as a spawned one closes
/// on `SIGTERM`.
fn close_all() {
    let open: Vec<Arc<Shared>> = OPEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let deadline = Instant::now() + libnbd::captive::KILL_TIMEOUT;
    for s in &open {
        s.by_signal.store(true, Ordering::Release);
    }
    for s in open {
        s.close(Some(deadline));
    }
}

/// The stack of a captive nbdkit, opened as one client.
pub struct InProcessEndpoint {
    name: String,
    shared: Arc<Shared>,
    size: u64,
    caps: Caps,
    write: bool,
    multi_conn: bool,
    min_block: u64,
    preferred: u64,
    extents: bool,
    fast_zero: AtomicBool,
    /// Read-modify-writes of unaligned pieces, one at a time.
    partial: tokio::sync::Mutex<()>,
}

/// A layer's error as the NBD client would report the server's reply.
fn io_err(e: Error) -> io::Error {
    let kind = io::Error::from_raw_os_error(errno::to_host(e.errno)).kind();
    let text = errno_text(e.errno);
    if e.msg.is_empty() {
        io::Error::new(kind, text)
    } else {
        io::Error::new(kind, format!("{text}: {}", e.msg))
    }
}

impl InProcessEndpoint {
    /// Open the export of `server` (configured by
    /// [`crate::nbdkit::in_process`]) as a client would; `name` is the
    /// command as the user wrote it, for messages.
    pub async fn open(name: String, server: InProcess, extents: bool) -> io::Result<Self> {
        let InProcess {
            stack,
            server,
            block_status,
        } = server;
        let extents = extents && block_status;
        let opened = async {
            stack.after_fork(&server)?;
            let h = Self::open_handle(&stack, &server).await?;
            Ok::<_, Error>((h.size()?, h.caps()?, h.block_size()?, h))
        };
        match opened.await {
            Ok((size, caps, block, handle)) => {
                let write = !server.readonly() && caps.write;
                let min_block = block.map_or(1, |b| u64::from(b.minimum.max(1)));
                let preferred = match block {
                    Some(b) if b.preferred >= 512 => u64::from(b.preferred),
                    _ => 4096,
                };
                let multi_conn =
                    caps.multi_conn && stack.thread_model() > ThreadModel::SerializeConnections;
                let shared = Arc::new(Shared {
                    stack,
                    handle: RwLock::new(Some(handle)),
                    closed: Mutex::new(false),
                    by_signal: AtomicBool::new(false),
                });
                static HOOK: Once = Once::new();
                HOOK.call_once(|| libnbd::captive::on_signal(close_all));
                let mut open = OPEN
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                open.retain(|w| w.strong_count() > 0);
                open.push(Arc::downgrade(&shared));
                drop(open);
                Ok(InProcessEndpoint {
                    name,
                    multi_conn,
                    shared,
                    size,
                    caps,
                    write,
                    min_block,
                    preferred,
                    extents,
                    fast_zero: AtomicBool::new(true),
                    partial: tokio::sync::Mutex::new(()),
                })
            }
            Err(e) => {
                // (The layer that failed has logged it, as in a server.)
                stack.unload();
                Err(io::Error::other(format!("{name}: {}", e.msg)))
            }
        }
    }

    /// Open the stack as one client over a Unix socket.
    async fn open_handle(
        stack: &Stack,
        server: &Arc<ServerContext>,
    ) -> libnbd::Result<Arc<dyn Handle>> {
        let readonly = server.readonly();
        stack.preconnect(readonly).await?;
        let ctx = OpenContext {
            readonly,
            export_name: stack.top().default_export(),
            default_export: true,
            peer: None,
            cred: Some(PeerCred {
                pid: std::process::id(),
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                security: None,
            }),
            tls: false,
            id: 1,
            disconnect: Disconnect::default(),
            meta_contexts: Vec::new(),
        };
        Ok(Arc::from(stack.open(&ctx).await?))
    }

    async fn handle(&self) -> io::Result<Arc<dyn Handle>> {
        let h = self
            .shared
            .handle
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match h {
            Some(h) => Ok(h),
            None if self.shared.by_signal.load(Ordering::Acquire) => std::future::pending().await,
            None => Err(io::Error::other(format!("{}: already closed", self.name))),
        }
    }

    fn unaligned(&self, offset: u64, len: u64) -> bool {
        unaligned(offset, len, self.min_block)
    }

    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        widen(offset, len, self.min_block, self.size)
    }

    async fn read_unaligned(&self, mut buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        let (start, end) = self.widen(offset, buf.len() as u64);
        let mut whole = vec![0u8; (end - start) as usize];
        self.handle()
            .await?
            .pread(&mut whole, start, Flags::NONE)
            .await
            .map_err(io_err)?;
        let at = (offset - start) as usize;
        let len = buf.len();
        buf.copy_from_slice(&whole[at..at + len]);
        Ok(buf)
    }

    /// Write `data` (or zeroes) over `len` bytes at `offset` by reading
    /// the whole blocks around them first.
    async fn write_unaligned(&self, data: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = self.widen(offset, len);
        let h = self.handle().await?;
        let _one = self.partial.lock().await;
        let mut buf = vec![0u8; (end - start) as usize];
        h.pread(&mut buf, start, Flags::NONE)
            .await
            .map_err(io_err)?;
        let at = (offset - start) as usize;
        match data {
            Some(d) => buf[at..at + d.len()].copy_from_slice(d),
            None => buf[at..at + len as usize].fill(0),
        }
        h.pwrite(&buf, start, Flags::NONE).await.map_err(io_err)
    }
}

#[async_trait]
impl Endpoint for InProcessEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        // What the copy talks to is still an nbdkit export.
        "nbd_ops"
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn is_read_only(&self) -> bool {
        !self.write
    }

    fn preferred_block_size(&self) -> u64 {
        self.preferred
    }

    fn max_request_size(&self) -> Option<u64> {
        Some(u64::from(MAX_REQUEST_SIZE))
    }

    fn write_request_size(&self) -> Option<u64> {
        (!self.multi_conn).then_some(SINGLE_CONN_WRITE_SIZE)
    }

    fn queue_depth(&self) -> usize {
        DEPTH
    }

    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }

    fn max_zero(&self) -> u64 {
        1 << 62
    }

    fn extents_window(&self) -> u64 {
        1 << 36
    }

    fn can_extents(&self) -> bool {
        self.extents
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        if !self.extents {
            return Ok(vec![Extent::new(offset, length, false)]);
        }
        let mut ext = Extents::new(offset, offset + length);
        self.handle()
            .await?
            .extents(length, offset, Flags::NONE, &mut ext)
            .await
            .map_err(io_err)?;
        let mut out: Vec<Extent> = Vec::new();
        for e in ext.into_list() {
            let zero = e.flags & alloc::ZERO != 0;
            match out.last_mut() {
                Some(l) if l.zero == zero => l.length += e.length,
                _ => out.push(Extent::new(e.offset, e.length, zero)),
            }
        }
        if out.is_empty() {
            return Err(io::Error::other("extents: no extents returned"));
        }
        Ok(out)
    }

    async fn read(&self, mut buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        if self.unaligned(offset, buf.len() as u64) {
            return self.read_unaligned(buf, offset).await;
        }
        self.handle()
            .await?
            .pread(&mut buf, offset, Flags::NONE)
            .await
            .map_err(io_err)?;
        Ok(buf)
    }

    async fn write(&self, data: Data, offset: u64) -> io::Result<()> {
        if self.unaligned(offset, data.len() as u64) {
            return self
                .write_unaligned(Some(&data), offset, data.len() as u64)
                .await;
        }
        self.handle()
            .await?
            .pwrite(&data, offset, Flags::NONE)
            .await
            .map_err(io_err)
    }

    async fn zero(&self, offset: u64, length: u64, allocate: bool) -> io::Result<bool> {
        if !(self.write && self.caps.zero) {
            return Ok(false);
        }
        if self.unaligned(offset, length) {
            for (at, len, whole) in zero_pieces(offset, length, self.min_block) {
                match whole {
                    true => _ = Box::pin(self.zero(at, len, allocate)).await?,
                    false => self.write_unaligned(None, at, len).await?,
                }
            }
            return Ok(true);
        }
        let h = self.handle().await?;
        let flags = if allocate {
            Flags::NONE
        } else {
            Flags::MAY_TRIM
        };
        if self.caps.fast_zero && self.fast_zero.load(Ordering::Relaxed) {
            match h.zero(length, offset, flags | Flags::FAST_ZERO).await {
                Ok(()) => return Ok(true),
                Err(e) if e.errno == errno::ENOTSUP => {
                    self.fast_zero.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        h.zero(length, offset, flags).await.map_err(io_err)?;
        Ok(true)
    }

    async fn flush(&self) -> io::Result<()> {
        if !self.caps.flush {
            return Ok(());
        }
        self.handle()
            .await?
            .flush(Flags::NONE)
            .await
            .map_err(io_err)
    }

    async fn close(&self) -> io::Result<()> {
        // The copy is done: nothing is in flight.
        libnbd::run_blocking(|| self.shared.close(None));
        Ok(())
    }
}

impl Drop for InProcessEndpoint {
    fn drop(&mut self) {
        // A copy that failed: the layers close as a server's do when
        // its client goes and it is told to exit.
        libnbd::run_blocking(|| self.shared.close(None));
    }
}
