//! The FUSE file system: one file (in a directory, or mounted over a
//! regular file) whose reads and writes are NBD requests.
//!
//! Every request that talks to the server is handed to a tokio task
//! and answered from there, so the FUSE threads only read requests
//! from `/dev/fuse` and never wait for the server: many requests are
//! in flight at once, spread over the connections of a
//! [`MultiConn`].
//!
//! Writes are answered once they are queued (write-behind, as a local
//! file's page cache does), up to [`WRITE_BEHIND`] bytes at a time: a
//! sequential writer then keeps several NBD writes in flight instead of
//! waiting for each. A request touching bytes still being written waits
//! for that write (NBD orders nothing between requests in flight, nor
//! between connections); `fsync` and `close` wait for every write and
//! report a failed one (`EIO`, or the server's error), as a local file
//! reports write-back errors. Files opened `O_SYNC`, `O_DSYNC` or
//! `O_DIRECT` get synchronous writes (`FUA` for the first two when the
//! server has it).

use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use libnbd::client::{Error, MultiConn};
use libnbd::protocol::{alloc, errno};
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore};

/// How long the kernel may cache attributes and names (libfuse's
/// default).
const TTL: Duration = Duration::from_secs(1);
/// The inode of the directory (or of the file, mounted over a file).
const ROOT: INodeNo = INodeNo(1);
/// The inode of the file inside the directory.
const FILE: INodeNo = INodeNo(2);
/// The largest write the kernel is asked to send in one request.
const MAX_WRITE: u32 = 1 << 20;
/// Bytes of answered writes that may still be on their way.
pub const WRITE_BEHIND: u32 = 32 << 20;

/// What the file system shows and how.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file's name inside the mount point directory; `None` when
    /// mounted over a regular file.
    pub file_name: Option<OsString>,
    /// Read-only (`-r`, or a read-only server).
    pub readonly: bool,
    /// Owner of the file.
    pub uid: u32,
    /// Group of the file.
    pub gid: u32,
    /// Permission bits to take away (`-o umask=`).
    pub umask: u16,
    /// `-o kernel_cache`: keep the page cache across opens.
    pub kernel_cache: bool,
    /// `-o direct_io`: bypass the page cache.
    pub direct_io: bool,
    /// `-o writeback_cache`: the kernel gathers writes in the page
    /// cache and sends them later, many at once (errors then show at
    /// `fsync` or `close`).
    pub writeback_cache: bool,
    /// `-v`: trace requests on stderr.
    pub verbose: bool,
}

/// The file system over an NBD export.
pub struct NbdFs {
    nbd: Arc<MultiConn>,
    /// The server's minimum block size: requests are widened to it
    /// (reads), or read, patched and written (writes).
    align: u64,
    writes: Arc<Writes>,
    rt: Handle,
    s: Settings,
    size: u64,
    started: SystemTime,
}

impl NbdFs {
    /// Serve `nbd`; requests run on `rt`.
    pub fn new(nbd: Arc<MultiConn>, rt: Handle, s: Settings) -> NbdFs {
        let size = nbd.size();
        let align = nbd
            .first()
            .block_size()
            .map_or(1, |b| u64::from(b.minimum.max(1)));
        NbdFs {
            align,
            nbd,
            writes: Arc::new(Writes::new()),
            rt,
            s,
            size,
            started: SystemTime::now(),
        }
    }

    /// The writes in flight, for waiting on them at the end.
    pub fn writes(&self) -> Arc<Writes> {
        self.writes.clone()
    }

    fn file_ino(&self) -> INodeNo {
        if self.s.file_name.is_some() {
            FILE
        } else {
            ROOT
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let t = self.started;
        let (kind, perm, nlink, size) = if ino == self.file_ino() {
            let perm = if self.s.readonly { 0o444 } else { 0o666 };
            (FileType::RegularFile, perm, 1, self.size)
        } else if ino == ROOT {
            (FileType::Directory, 0o555, 2, 0)
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: perm & !self.s.umask,
            nlink,
            uid: self.s.uid,
            gid: self.s.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Run `f` on the runtime and answer from there.
    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f);
    }

    /// The part of `[offset, offset + len)` within the export.
    fn clamp(&self, offset: u64, len: u64) -> u64 {
        len.min(self.size.saturating_sub(offset))
    }

    fn trace(&self, what: std::fmt::Arguments<'_>) {
        if self.s.verbose {
            libnbd::elog!("nbdfuse: {what}");
        }
    }
}

/// Writes in flight: their ranges, the byte budget, and the first
/// error of a write already answered.
pub struct Writes {
    state: std::sync::Mutex<WriteState>,
    done: Notify,
    budget: Semaphore,
}

#[derive(Default)]
struct WriteState {
    next: u64,
    ranges: Vec<(u64, u64, u64)>,
    error: Option<Errno>,
    /// Has any write answered early failed (for the exit status)?
    failed: bool,
}

impl Writes {
    fn new() -> Writes {
        Writes {
            state: Default::default(),
            done: Notify::new(),
            budget: Semaphore::new(WRITE_BEHIND as usize),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no write in flight overlaps `[offset, offset + len)`
    /// (every write: `len` = `u64::MAX`); then, with `register`, record
    /// this range as a write in flight (under the same lock) and return
    /// its id.
    async fn wait_clear(&self, offset: u64, len: u64, register: bool) -> u64 {
        let end = offset.saturating_add(len);
        loop {
            let notified = self.done.notified();
            {
                let mut st = self.state();
                let busy = st.ranges.iter().any(|&(_, o, l)| o < end && offset < o + l);
                if !busy {
                    if !register {
                        return 0;
                    }
                    st.next += 1;
                    let id = st.next;
                    st.ranges.push((id, offset, len));
                    return id;
                }
            }
            notified.await;
        }
    }

    fn finish(&self, id: u64, error: Option<Errno>) {
        let mut st = self.state();
        st.ranges.retain(|&(i, _, _)| i != id);
        if error.is_some() {
            st.failed = true;
        }
        if st.error.is_none() {
            st.error = error;
        }
        drop(st);
        self.done.notify_waiters();
    }

    /// Has any write answered before it landed failed?
    pub fn any_failed(&self) -> bool {
        self.state().failed
    }

    /// Wait for every write in flight; the first failure since the last
    /// call, if any.
    pub async fn drain(&self) -> Result<(), Errno> {
        self.wait_clear(0, u64::MAX, false).await;
        match self.state().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The errno a failed request gives the caller: the server's, or `EIO`
/// (a dead server or connection included).
fn errno_of(e: &Error) -> Errno {
    match e {
        Error::Server { errno: n, .. } => Errno::from_i32(errno::to_host(*n)),
        Error::InvalidArgument(_) => Errno::EINVAL,
        Error::Unsupported(_) => Errno::from_i32(libc::EOPNOTSUPP),
        _ => Errno::EIO,
    }
}

fn fail(verbose: bool, op: &str, e: &Error) -> Errno {
    if verbose {
        libnbd::elog!("nbdfuse: {op}: {e}");
    }
    errno_of(e)
}

/// Where SEEK_DATA or SEEK_HOLE from `offset` lands, from block status.
async fn seek(nbd: &MultiConn, size: u64, offset: u64, data: bool) -> Result<u64, Errno> {
    if offset >= size {
        return Err(Errno::ENXIO);
    }
    let mut at = offset;
    while at < size {
        let bs = match nbd.block_status(size - at, at, 0).await {
            Ok(bs) => bs,
            // No block status: all data, as the kernel's default.
            Err(Error::Unsupported(_)) => {
                return Ok(if data { offset } else { size });
            }
            Err(e) => return Err(errno_of(&e)),
        };
        let extents = bs.get(libnbd::protocol::CONTEXT_BASE_ALLOCATION);
        let Some(extents) = extents.filter(|e| !e.is_empty()) else {
            return Ok(if data { offset } else { size });
        };
        for e in extents {
            let hole = e.flags & alloc::HOLE != 0;
            if hole != data {
                return Ok(at.min(size));
            }
            at += e.length;
            if at >= size {
                break;
            }
        }
    }
    if data {
        Err(Errno::ENXIO)
    } else {
        Ok(size)
    }
}

impl Filesystem for NbdFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests, and many in flight.
        let _ = config.add_capabilities(InitFlags::FUSE_MAX_PAGES);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_max_readahead(MAX_WRITE);
        if self.s.writeback_cache && !self.s.readonly && !self.s.direct_io {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match &self.s.file_name {
            Some(n) if parent == ROOT && n == name => {
                let a = self.attr(FILE).expect("the file has attributes");
                reply.entry(&TTL, &a, fuser::Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The size of an NBD export is fixed, and so are the owner and
        // mode; times are accepted and not kept (`touch` works).
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        match size {
            Some(s) if s != a.size => reply.error(Errno::from_i32(libc::ENOSYS)),
            _ => reply.attr(&TTL, &a),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != self.file_ino() {
            return reply.error(Errno::EISDIR);
        }
        if self.s.readonly && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let mut f = FopenFlags::empty();
        if self.s.kernel_cache {
            f |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        if self.s.direct_io {
            f |= FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        reply.opened(FileHandle(0), f);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self.clamp(offset, u64::from(size)) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        self.trace(format_args!("read {len} @ {offset}"));
        let nbd = self.nbd.clone();
        let writes = self.writes.clone();
        let v = self.s.verbose;
        let align = self.align;
        self.spawn(async move {
            writes.wait_clear(offset, len as u64, false).await;
            let (a_off, a_len) = widen(align, offset, len as u64);
            match nbd.pread_owned(vec![0u8; a_len as usize], a_off, 0).await {
                Ok(buf) => {
                    let at = (offset - a_off) as usize;
                    reply.data(&buf[at..at + len])
                }
                Err(e) => reply.error(fail(v, "read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.s.readonly {
            return reply.error(Errno::EROFS);
        }
        if offset >= self.size && !data.is_empty() {
            return reply.error(Errno::from_i32(libc::ENOSPC));
        }
        // A write past the end is cut at the end, as a block device's.
        let len = self.clamp(offset, data.len() as u64) as usize;
        self.trace(format_args!("write {len} @ {offset}"));
        let data = data[..len].to_vec();
        let nbd = self.nbd.clone();
        let writes = self.writes.clone();
        let v = self.s.verbose;
        let align = self.align;
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT) != 0;
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0 && nbd.info().can_fua();
        self.spawn(async move {
            let permit = match writes.budget.acquire_many(len.max(1) as u32).await {
                Ok(p) => p,
                Err(_) => return reply.error(Errno::EIO),
            };
            // Whole blocks of the server's: a partial one is read and
            // written back, and no other write may touch it meanwhile.
            let (a_off, a_len) = widen(align, offset, len as u64);
            let id = writes.wait_clear(a_off, a_len, true).await;
            if sync {
                let flags = if fua {
                    libnbd::protocol::cmdflag::FUA
                } else {
                    0
                };
                let r = write_aligned(&nbd, align, &data, offset, flags).await;
                writes.finish(id, None);
                drop(permit);
                match r {
                    Ok(()) => reply.written(len as u32),
                    Err(e) => reply.error(fail(v, "write", &e)),
                }
                return;
            }
            reply.written(len as u32);
            let r = write_aligned(&nbd, align, &data, offset, 0).await;
            drop(data);
            let err = r.err().map(|e| fail(true, "write", &e));
            writes.finish(id, err);
            drop(permit);
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): the writes must have landed (a failed one is
        // reported here); fsync flushes the server.
        let writes = self.writes.clone();
        self.spawn(async move {
            match writes.drain().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let can_flush = !self.s.readonly && self.nbd.info().can_flush();
        self.trace(format_args!("flush"));
        let nbd = self.nbd.clone();
        let writes = self.writes.clone();
        let v = self.s.verbose;
        self.spawn(async move {
            if let Err(e) = writes.drain().await {
                return reply.error(e);
            }
            if !can_flush {
                return reply.ok();
            }
            match flush_once(&nbd).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(v, "flush", &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == ROOT && self.s.file_name.is_some() {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(name) = self.s.file_name.as_ref().filter(|_| ino == ROOT) else {
            return reply.error(Errno::ENOTDIR);
        };
        let entries = [
            (ROOT, FileType::Directory, OsStr::new(".")),
            (ROOT, FileType::Directory, OsStr::new("..")),
            (FILE, FileType::RegularFile, name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size.div_ceil(4096);
        reply.statfs(blocks, 0, 0, 1, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.s.readonly {
            return reply.error(Errno::EROFS);
        }
        let len = self.clamp(offset, length);
        let info = self.nbd.info();
        let (can_trim, can_zero) = (info.can_trim(), info.can_zero());
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if punch && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        if !punch && !zero {
            // Plain allocation: every byte of an export is there already.
            return if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 && offset + length <= self.size {
                reply.ok()
            } else {
                reply.error(Errno::from_i32(libc::EOPNOTSUPP))
            };
        }
        if len == 0 {
            return reply.ok();
        }
        self.trace(format_args!(
            "{} {len} @ {offset}",
            if punch { "trim" } else { "zero" }
        ));
        let nbd = self.nbd.clone();
        let v = self.s.verbose;
        let writes = self.writes.clone();
        let align = self.align;
        self.spawn(async move {
            let (a_off, a_len) = widen(align, offset, len);
            let id = writes.wait_clear(a_off, a_len, true).await;
            // The whole blocks inside, then zeroes written at the edges.
            let end = offset + len;
            let inner = offset.next_multiple_of(align);
            let inner_end = (end / align * align).max(inner);
            let mut r = Ok(());
            if inner_end > inner {
                let n = inner_end - inner;
                r = if punch && can_trim {
                    nbd.trim(n, inner, 0).await
                } else if can_zero {
                    nbd.zero(n, inner, 0).await
                } else {
                    // No zero command: write zeroes.
                    write_zeroes(&nbd, n, inner).await
                };
            }
            for (o, n) in [
                (offset, inner.min(end) - offset),
                (
                    inner_end.max(offset),
                    end.saturating_sub(inner_end.max(offset)),
                ),
            ] {
                if r.is_ok() && n > 0 {
                    r = write_aligned(&nbd, align, &vec![0u8; n as usize], o, 0).await;
                }
            }
            writes.finish(id, None);
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(v, "fallocate", &e)),
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            // The kernel does the others itself.
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        let nbd = self.nbd.clone();
        let size = self.size;
        let writes = self.writes.clone();
        self.spawn(async move {
            writes.wait_clear(0, u64::MAX, false).await;
            match seek(&nbd, size, offset as u64, data).await {
                Ok(o) => reply.offset(o as i64),
                Err(e) => reply.error(e),
            }
        });
    }
}

/// `[offset, offset + len)` widened to whole blocks of `align` bytes.
fn widen(align: u64, offset: u64, len: u64) -> (u64, u64) {
    let start = offset / align * align;
    let end = (offset + len).next_multiple_of(align);
    (start, end - start)
}

/// Write `data` at `offset` on a server that takes only whole blocks of
/// `align` bytes: the partial blocks at either end are read first and
/// patched. (The caller has made sure no other write touches them.)
async fn write_aligned(
    nbd: &MultiConn,
    align: u64,
    data: &[u8],
    offset: u64,
    flags: u16,
) -> Result<(), Error> {
    let (a_off, a_len) = widen(align, offset, data.len() as u64);
    if a_off == offset && a_len == data.len() as u64 {
        return nbd.pwrite(data, offset, flags).await;
    }
    let mut buf = vec![0u8; a_len as usize];
    let a = align as usize;
    let head = nbd.pread_vec(a, a_off, 0).await?;
    buf[..a].copy_from_slice(&head);
    if a_len > align {
        let tail = nbd.pread_vec(a, a_off + a_len - align, 0).await?;
        buf[a_len as usize - a..].copy_from_slice(&tail);
    }
    let at = (offset - a_off) as usize;
    buf[at..at + data.len()].copy_from_slice(data);
    nbd.pwrite(&buf, a_off, flags).await
}

/// Zeroes written as data, for a server without a zero command.
async fn write_zeroes(nbd: &MultiConn, len: u64, offset: u64) -> Result<(), Error> {
    const STEP: u64 = 1 << 20;
    let zeroes = vec![0u8; STEP.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = STEP.min(len - at) as usize;
        nbd.pwrite(&zeroes[..n], offset + at, 0).await?;
        at += n as u64;
    }
    Ok(())
}

/// Flush the server: on one connection, which covers the writes done on
/// all of them (that is what multi-conn promises).
pub async fn flush_once(nbd: &MultiConn) -> Result<(), Error> {
    nbd.next().flush().await
}
