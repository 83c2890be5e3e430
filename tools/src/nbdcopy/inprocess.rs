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
//! when the last client goes and it is told to exit.
//!
//! Commands with options beyond the stack's own (`-v`, TLS, listening
//! options, ...) and `--shallow` sources (which need
//! `qemu:allocation-depth` over NBD) are spawned as before, and so is
//! every captive server when `$NBDCOPY_SPAWN_CAPTIVE` is set.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use libnbd::client::errno_text;
use libnbd::protocol::{alloc, errno, MAX_REQUEST_SIZE};
use libnbd::server::ServerContext;
use libnbd::ThreadModel;
use libnbd::{Caps, Disconnect, Error, Extents, Flags, Handle, OpenContext, PeerCred, Stack};

use super::endpoint::{Data, Endpoint, Extent};
use crate::nbdkit::InProcess;

/// Requests in flight: as for a server on a Unix socket.
const DEPTH: usize = 8;

/// Writes of this size when the export is not multi-conn (one
/// connection's worth of parallelism), as over NBD.
const SINGLE_CONN_WRITE_SIZE: u64 = 2 << 20;

/// The stack of a captive nbdkit, opened as one client.
pub struct InProcessEndpoint {
    name: String,
    stack: Stack,
    /// Taken by [`close`](Endpoint::close): dropping it closes the
    /// layers' handles.
    handle: RwLock<Option<Arc<dyn Handle>>>,
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
    unloaded: AtomicBool,
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
        let InProcess { stack, server } = server;
        let fail = |e: Error| io::Error::other(format!("{name}: {}", e.msg));
        stack.after_fork(&server).map_err(fail)?;
        match Self::open_handle(&stack, &server).await {
            Ok((handle, size, caps, block)) => {
                let write = !server.readonly() && caps.write;
                let min_block = block.map_or(1, |b| u64::from(b.minimum.max(1)));
                let preferred = match block {
                    Some(b) if b.preferred >= 512 => u64::from(b.preferred),
                    _ => 4096,
                };
                Ok(InProcessEndpoint {
                    name,
                    multi_conn: caps.multi_conn
                        && stack.thread_model() > ThreadModel::SerializeConnections,
                    stack,
                    handle: RwLock::new(Some(handle)),
                    size,
                    caps,
                    write,
                    min_block,
                    preferred,
                    extents,
                    fast_zero: AtomicBool::new(true),
                    partial: tokio::sync::Mutex::new(()),
                    unloaded: AtomicBool::new(false),
                })
            }
            Err(e) => {
                stack.unload();
                // As the spawned server says it before the client fails.
                libnbd::elog!("nbdkit: error: {}", e.msg);
                Err(io::Error::other(format!(
                    "{name}: the server refused the connection: {}",
                    e.msg
                )))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn open_handle(
        stack: &Stack,
        server: &Arc<ServerContext>,
    ) -> libnbd::Result<(Arc<dyn Handle>, u64, Caps, Option<libnbd::BlockSize>)> {
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
        let h: Arc<dyn Handle> = Arc::from(stack.open(&ctx).await?);
        let size = h.size()?;
        let caps = h.caps()?;
        let block = h.block_size()?;
        Ok((h, size, caps, block))
    }

    fn handle(&self) -> io::Result<Arc<dyn Handle>> {
        self.handle
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| io::Error::other(format!("{}: already closed", self.name)))
    }

    fn unaligned(&self, offset: u64, len: u64) -> bool {
        let m = self.min_block;
        m > 1 && !(offset.is_multiple_of(m) && len.is_multiple_of(m))
    }

    /// `[offset, offset + len)` widened to whole blocks (within the export).
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let m = self.min_block;
        let start = offset / m * m;
        let end = (offset + len).div_ceil(m).saturating_mul(m);
        (start, end.min(self.size))
    }

    async fn read_unaligned(&self, mut buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        let (start, end) = self.widen(offset, buf.len() as u64);
        let mut whole = vec![0u8; (end - start) as usize];
        self.handle()?
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
        let h = self.handle()?;
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

    fn unload(&self) {
        if !self.unloaded.swap(true, Ordering::AcqRel) {
            self.stack.unload();
        }
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
        self.handle()?
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
        self.handle()?
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
        self.handle()?
            .pwrite(&data, offset, Flags::NONE)
            .await
            .map_err(io_err)
    }

    async fn zero(&self, offset: u64, length: u64, allocate: bool) -> io::Result<bool> {
        if !(self.write && self.caps.zero) {
            return Ok(false);
        }
        if self.unaligned(offset, length) {
            let m = self.min_block;
            let first = offset.div_ceil(m) * m;
            let last = (offset + length) / m * m;
            if first >= last {
                self.write_unaligned(None, offset, length).await?;
                return Ok(true);
            }
            if first > offset {
                self.write_unaligned(None, offset, first - offset).await?;
            }
            if offset + length > last {
                self.write_unaligned(None, last, offset + length - last)
                    .await?;
            }
            return Box::pin(self.zero(first, last - first, allocate)).await;
        }
        let h = self.handle()?;
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
        self.handle()?.flush(Flags::NONE).await.map_err(io_err)
    }

    async fn close(&self) -> io::Result<()> {
        let h = self
            .handle
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        // The last reference: the layers' handles close here (on this
        // runtime, which their close work may need).
        drop(h);
        self.unload();
        Ok(())
    }
}

impl Drop for InProcessEndpoint {
    fn drop(&mut self) {
        // A copy that failed: the layers close as a killed server's
        // would on its way out.
        if let Ok(mut h) = self.handle.write() {
            drop(h.take());
        }
        self.unload();
    }
}
