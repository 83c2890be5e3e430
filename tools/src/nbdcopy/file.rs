//! Local files and block devices (`nbdcopy disk.img nbd://...`,
//! `nbdcopy nbd://... /dev/sdX`), and `-` when stdin or stdout is
//! redirected from or to one.
//!
//! - I/O never blocks the reactor: data already in the page cache is
//!   copied at once (`preadv2`/`pwritev2` with `RWF_NOWAIT`, which fail
//!   rather than wait for the disk); handing every request to another
//!   thread would cost more than the copy itself. Reads that would wait
//!   are `pread` on tokio's blocking threads, a few at once (a disk's
//!   queue depth). Writes that would wait go through a queue to a
//!   writer thread (one for a regular file, whose inode lock serializes
//!   buffered writes anyway; several for a block device), so a busy
//!   writer takes more work without a thread switch per write.
//! - A regular file as source reports its holes with
//!   `lseek(SEEK_DATA/SEEK_HOLE)`.
//! - A regular file as destination is created if missing and truncated
//!   to the source's size; one that was empty is known to read as
//!   zeroes, so nothing is done for zero ranges. What is written goes to
//!   disk during the copy and then leaves the page cache (see
//!   [`write_behind`] and [`Writeback`]).
//! - Zeroing punches a hole (`fallocate(PUNCH_HOLE)`), or with
//!   `--allocated` uses `fallocate(ZERO_RANGE)`; block devices also try
//!   `BLKZEROOUT`. Where none works, the copy writes zeroes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};
use tokio::sync::{oneshot, Semaphore};

use super::endpoint::{Data, Endpoint, Extent};

/// Largest read or write tried on the reactor with `RWF_NOWAIT`.
const MAX_NOWAIT: usize = 1 << 20;
/// Reads running at once: enough to keep a disk busy, few enough not to
/// flood the blocking pool.
const CONCURRENT_READS: usize = 8;
/// Writes (writer threads) and other changes running at once to a
/// block device. A regular file takes one at a time: the file system
/// serializes them on the inode lock anyway, and threads queueing on it
/// only burn CPU.
const CONCURRENT_WRITES: usize = 8;
/// Bytes written between starts of writeback to disk.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// How far behind the furthest write the written pages are dropped from
/// the page cache (once on disk).
const EVICT_BEHIND: u64 = 2 * WRITEBACK_EVERY;
/// How far behind each write on a writer thread that thread waits for
/// the written data to be on disk, and drops it from the page cache.
const WRITE_BEHIND: u64 = 16 << 20;

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileEndpoint {
    name: String,
    file: Arc<File>,
    /// Current size (a regular file destination is resized to the
    /// source's).
    size: AtomicU64,
    block_device: bool,
    block_size: u64,
    /// An empty regular file opened as destination: reads as zeroes
    /// once truncated to the source's size.
    was_empty: bool,
    /// Bound the reads and the changes in flight on blocking threads.
    read_limit: Semaphore,
    write_limit: Semaphore,
    /// The queue of the writer threads, started at the first write that
    /// cannot be done at once.
    writers: OnceLock<mpsc::Sender<WriteJob>>,
    /// Cleared when a way of zeroing turns out to be unsupported, so it
    /// is not tried again for every range.
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
    can_zeroout: AtomicBool,
    /// `RWF_NOWAIT` reads and writes work here (cleared when the kernel
    /// or file system refuses them).
    nowait_read: AtomicBool,
    nowait_write: AtomicBool,
    /// Writing back and dropping what was written.
    writeback: Arc<Writeback>,
}

/// The written part of a destination goes to disk during the copy and
/// then leaves the page cache, as with libnbd's nbdcopy. A writer thread
/// does it itself, write by write (see [`write_behind`]). For writes
/// done at once on the reactor (`RWF_NOWAIT`, where the file system
/// takes it), this does it in the background: every
/// [`WRITEBACK_EVERY`] bytes, the kernel is told to start writing all
/// dirty pages back (`sync_file_range`), and the pages more than
/// [`EVICT_BEHIND`] bytes behind the furthest write are waited for and
/// dropped (`POSIX_FADV_DONTNEED`), on a blocking thread, one such job
/// at a time.
///
/// Otherwise the kernel waits for its dirty thresholds and the disk
/// idles during the copy, then has it all to write at the end; and a
/// copy fills the page cache with the whole destination, evicting what
/// the machine had cached. Dropped pages are also what the next writes
/// reuse, instead of fresh memory, which on a VM that hands free memory
/// back to its host costs a fault each.
#[derive(Debug, Default)]
struct Writeback {
    /// Bytes written since writeback was last started.
    unstarted: AtomicU64,
    /// The end of the furthest write.
    furthest: AtomicU64,
    /// Pages before this were dropped.
    dropped: AtomicU64,
    /// A job is running.
    busy: AtomicBool,
}

impl Writeback {
    /// Count a write of `len` bytes at `offset`, and start a job when
    /// one is due.
    fn wrote(self: &Arc<Self>, file: &Arc<File>, offset: u64, len: u64) {
        self.furthest.fetch_max(offset + len, Ordering::Relaxed);
        let before = self.unstarted.fetch_add(len, Ordering::Relaxed);
        if before + len < WRITEBACK_EVERY || self.busy.swap(true, Ordering::Acquire) {
            return;
        }
        self.unstarted.store(0, Ordering::Relaxed);
        let (me, file) = (self.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            me.job(&file);
            me.busy.store(false, Ordering::Release);
        });
    }

    /// Start writing back everything, then wait for and drop the pages
    /// well behind the writes. Errors only mean pages stay cached: a
    /// write error is also found by the writes or by `--flush`.
    fn job(&self, file: &File) {
        let fd = file.as_raw_fd();
        let from = self.dropped.load(Ordering::Relaxed);
        let to = self
            .furthest
            .load(Ordering::Relaxed)
            .saturating_sub(EVICT_BEHIND)
            & !(WRITEBACK_EVERY - 1);
        // SAFETY: a plain system call on an open descriptor, no memory
        // passed.
        unsafe {
            libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
        if to > from && settle_and_drop(fd, from, to - from) {
            self.dropped.store(to, Ordering::Relaxed);
        }
    }
}

/// Wait for `len` bytes at `offset` to be on disk (writing back what is
/// still dirty), then drop them from the page cache; `false` if the
/// kernel refused.
fn settle_and_drop(fd: libc::c_int, offset: u64, len: u64) -> bool {
    let (off, n) = (offset as libc::off64_t, len as libc::off64_t);
    let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain system calls on an open descriptor, no memory
    // passed.
    unsafe {
        if libc::sync_file_range(fd, off, n, all) != 0 {
            return false;
        }
        libc::posix_fadvise(fd, off, n, libc::POSIX_FADV_DONTNEED);
    }
    true
}

/// After a writer thread's write of `len` bytes at `offset`: start
/// writing them back, then wait for the same range [`WRITE_BEHIND`]
/// bytes earlier to be on disk and drop it from the page cache, as
/// libnbd's nbdcopy does 2M behind each 256K write. The writer keeps
/// pace with the disk, with little dirty and the pages it drops soon
/// reused; where the range behind was not written by this copy (writes
/// out of order), waiting costs nothing and only clean pages are
/// dropped; it did better than a background job over the whole file
/// (bench/NOTES.md). Errors only mean pages stay cached: the write
/// itself succeeded.
fn write_behind(file: &File, offset: u64, len: u64) {
    let fd = file.as_raw_fd();
    // SAFETY: a plain system call on an open descriptor, no memory
    // passed.
    unsafe {
        libc::sync_file_range(
            fd,
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
    if let Some(back) = offset.checked_sub(WRITE_BEHIND) {
        settle_and_drop(fd, back, len);
    }
}

/// A write for the writer threads.
#[derive(Debug)]
struct WriteJob {
    data: Data,
    /// Bytes of `data` already written.
    skip: usize,
    /// Where the part not yet written goes.
    offset: u64,
    done: oneshot::Sender<io::Result<()>>,
}

/// Start `n` threads writing the jobs sent to the returned queue to
/// `file`. A write that finds a thread busy costs no thread switch to
/// queue, and queued writes are done back to back; the threads end
/// when the queue is dropped.
fn start_writers(file: &Arc<File>, n: usize) -> io::Result<mpsc::Sender<WriteJob>> {
    let (tx, rx) = mpsc::channel::<WriteJob>();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..n {
        let (file, rx) = (file.clone(), rx.clone());
        std::thread::Builder::new()
            .name("nbdcopy-write".into())
            .spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok(job) = job else { return };
                let r = file.write_all_at(&job.data[job.skip..], job.offset);
                if r.is_ok() {
                    let start = job.offset - job.skip as u64;
                    write_behind(&file, start, job.data.len() as u64);
                }
                // Give the buffer back before the copy loop looks for it.
                drop(job.data);
                let _ = job.done.send(r);
            })?;
    }
    Ok(tx)
}

/// What is behind an opened file.
pub enum Opened {
    /// A regular file or block device.
    File(FileEndpoint),
    /// A pipe, socket, terminal or character device: a stream.
    Stream(File),
}

impl FileEndpoint {
    /// Open `path` for reading (source) or writing (destination,
    /// created if missing).
    pub fn open(path: &Path, write: bool) -> io::Result<Opened> {
        let file = if write {
            // Not truncated here: resized to the source later, and only
            // once the source is known to be readable.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)?
        } else {
            File::open(path)?
        };
        Self::from_file(path.display().to_string(), file)
    }

    /// Use an already open file (`-` redirected from or to a file).
    pub fn from_file(name: String, file: File) -> io::Result<Opened> {
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            return Ok(Opened::Stream(file));
        }
        let size = if block_device {
            lseek(file.as_raw_fd(), 0, Whence::SeekEnd).map_err(io::Error::from)? as u64
        } else {
            meta.len()
        };
        use std::os::unix::fs::MetadataExt;
        let block_size = match meta.blksize() {
            b if b.is_power_of_two() && (512..=1 << 20).contains(&b) => b,
            _ => 4096,
        };
        Ok(Opened::File(FileEndpoint {
            name,
            file: Arc::new(file),
            size: AtomicU64::new(size),
            block_device,
            block_size,
            was_empty: !block_device && size == 0,
            read_limit: Semaphore::new(CONCURRENT_READS),
            write_limit: Semaphore::new(if block_device { CONCURRENT_WRITES } else { 1 }),
            writers: OnceLock::new(),
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
            can_zeroout: AtomicBool::new(block_device),
            nowait_read: AtomicBool::new(true),
            nowait_write: AtomicBool::new(true),
            writeback: Arc::default(),
        }))
    }

    /// Run `f` on the file on a blocking thread, as a read (`write`
    /// false) or a change.
    async fn blocking<T, F>(&self, write: bool, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let limit = if write {
            &self.write_limit
        } else {
            &self.read_limit
        };
        let _permit = limit.acquire().await.map_err(io::Error::other)?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(io::Error::other)?
    }
}

/// Read or write at `offset` as far as possible without waiting for the
/// disk (`RWF_NOWAIT`): returns the bytes done, which stop short where
/// the page cache cannot serve the rest. `flag` is cleared for good if
/// the kernel or file system does not support it. Large requests go to
/// a blocking thread anyway: even a memory copy of many megabytes would
/// hold up the reactor too long.
fn nowait(
    file: &File,
    buf: *mut u8,
    len: usize,
    offset: u64,
    write: bool,
    flag: &AtomicBool,
) -> usize {
    if len > MAX_NOWAIT || !flag.load(Ordering::Relaxed) {
        return 0;
    }
    let mut done = 0;
    while done < len {
        let iov = libc::iovec {
            // SAFETY: within the caller's buffer.
            iov_base: unsafe { buf.add(done) }.cast(),
            iov_len: len - done,
        };
        let at = (offset + done as u64) as libc::off_t;
        // SAFETY: one iovec over memory the caller lends us for the call
        // (read into for a read, only read from for a write).
        let n = unsafe {
            if write {
                libc::pwritev2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT)
            } else {
                libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT)
            }
        };
        match n {
            n if n > 0 => done += n as usize,
            // End of file: let the blocking path report it.
            0 => break,
            _ => {
                let e = Errno::last();
                if !matches!(e, Errno::EAGAIN | Errno::EINTR) {
                    flag.store(false, Ordering::Relaxed);
                }
                if e != Errno::EINTR {
                    break;
                }
            }
        }
    }
    done
}

/// The kernel cannot zero this way on this file.
fn is_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL | Errno::ENOTTY | Errno::ENODEV
    )
}

/// `BLKZEROOUT`: zero a byte range of a block device.
fn blkzeroout(file: &File, offset: u64, length: u64) -> nix::Result<()> {
    const BLKZEROOUT: libc::c_ulong = 0x127f; // _IO(0x12, 127)
    let range = [offset, length];
    // SAFETY: the ioctl reads two u64s from a valid array.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    Errno::result(r).map(drop)
}

/// The allocation map of `[offset, end)` from `SEEK_DATA`/`SEEK_HOLE`.
fn seek_extents(file: &File, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut push = |start: u64, stop: u64, zero: bool| {
        if stop > start {
            out.push(Extent::new(start, stop - start, zero));
        }
    };
    let mut pos = offset;
    while pos < end {
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data from here to the end of the file.
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        push(pos, data.min(end), true);
        pos = data;
        if pos >= end {
            break;
        }
        let hole = match lseek(fd, pos as i64, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        // A hole at `pos` itself means the file changed under us: call
        // the rest data rather than loop.
        let hole = if hole <= pos { end } else { hole };
        push(pos, hole.min(end), false);
        pos = hole;
    }
    Ok(out)
}

#[async_trait]
impl Endpoint for FileEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        // Upstream's name for both (a block device is a file to it).
        "file_ops"
    }

    fn size(&self) -> Option<u64> {
        Some(self.size.load(Ordering::Relaxed))
    }

    fn is_resizable(&self) -> bool {
        !self.block_device
    }

    fn preferred_block_size(&self) -> u64 {
        self.block_size
    }

    fn can_extents(&self) -> bool {
        !self.block_device
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        if self.block_device {
            return Ok(vec![Extent::new(offset, length, false)]);
        }
        let end = offset + length;
        let mut v = self
            .blocking(false, move |f| seek_extents(f, offset, end))
            .await?;
        if v.is_empty() {
            v.push(Extent::new(offset, length, false));
        }
        Ok(v)
    }

    fn is_zero(&self) -> bool {
        self.was_empty
    }

    async fn read(&self, mut buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        let len = buf.len();
        let done = nowait(
            &self.file,
            buf.as_mut_ptr(),
            len,
            offset,
            false,
            &self.nowait_read,
        );
        if done == len {
            return Ok(buf);
        }
        self.blocking(false, move |f| {
            f.read_exact_at(&mut buf[done..], offset + done as u64)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        io::Error::new(e.kind(), "unexpected end of file (did it shrink?)")
                    } else {
                        e
                    }
                })?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, data: Data, offset: u64) -> io::Result<()> {
        let len = data.len();
        // The kernel only reads from the buffer for a write.
        let ptr = data.as_ptr().cast_mut();
        let done = nowait(&self.file, ptr, len, offset, true, &self.nowait_write);
        if done == len {
            self.writeback.wrote(&self.file, offset, len as u64);
            return Ok(());
        }
        let queue = match self.writers.get() {
            Some(q) => q,
            None => {
                let n = if self.block_device {
                    CONCURRENT_WRITES
                } else {
                    1
                };
                let q = start_writers(&self.file, n)?;
                self.writers.get_or_init(|| q)
            }
        };
        let (tx, rx) = oneshot::channel();
        let job = WriteJob {
            data,
            skip: done,
            offset: offset + done as u64,
            done: tx,
        };
        let gone = || io::Error::other("the writer thread has gone");
        queue.send(job).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    async fn zero(&self, offset: u64, length: u64, allocate: bool) -> io::Result<bool> {
        // Ways to zero, cheapest first; each is dropped for good once
        // the kernel says it does not support it here.
        let ways = [
            !allocate && self.can_punch.load(Ordering::Relaxed),
            self.can_zero_range.load(Ordering::Relaxed),
            self.can_zeroout.load(Ordering::Relaxed),
        ];
        if !ways.iter().any(|&w| w) {
            return Ok(false);
        }
        let (done, unsupported) = self
            .blocking(true, move |f| {
                let mut unsupported = [false; 3];
                for (i, _) in ways.iter().enumerate().filter(|(_, &w)| w) {
                    let r = match i {
                        0 => fallocate(
                            f.as_raw_fd(),
                            FallocateFlags::FALLOC_FL_PUNCH_HOLE
                                | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                            offset as i64,
                            length as i64,
                        ),
                        1 => fallocate(
                            f.as_raw_fd(),
                            FallocateFlags::FALLOC_FL_ZERO_RANGE
                                | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                            offset as i64,
                            length as i64,
                        ),
                        _ => blkzeroout(f, offset, length),
                    };
                    match r {
                        Ok(()) => return Ok((true, unsupported)),
                        Err(e) if is_unsupported(e) => unsupported[i] = true,
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok((false, unsupported))
            })
            .await?;
        let flags = [&self.can_punch, &self.can_zero_range, &self.can_zeroout];
        for (flag, u) in flags.into_iter().zip(unsupported) {
            if u {
                flag.store(false, Ordering::Relaxed);
            }
        }
        Ok(done)
    }

    async fn truncate(&self, size: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        self.blocking(true, move |f| f.set_len(size)).await?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(true, |f| f.sync_data()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `file` in `[offset, offset + len)` in the page cache.
    fn resident(file: &File, offset: usize, len: usize) -> usize {
        let page = 4096;
        // SAFETY: a read-only shared mapping of an open file, looked at
        // by mincore only and unmapped before returning.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    /// A new file in a temporary directory, with the directory; `None`
    /// (test skipped) where `$TMPDIR` is a tmpfs, whose pages are never
    /// dropped.
    fn scratch() -> Option<(tempfile::TempDir, File)> {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: statfs on a path we own, into a zeroed struct.
        let tmpfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
            libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        if tmpfs {
            libnbd::elog!("skipped: $TMPDIR is a tmpfs, whose pages are never dropped");
            return None;
        }
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("out.img"))
            .unwrap();
        Some((dir, file))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn write_behind_drops_what_is_well_behind_each_write() {
        let Some((_dir, file)) = scratch() else {
            return;
        };
        let (len, piece) = (48 << 20, 256 << 10);
        let data = pattern(len);
        for off in (0..len).step_by(piece) {
            file.write_all_at(&data[off..off + piece], off as u64)
                .unwrap();
            write_behind(&file, off as u64, piece as u64);
        }
        // Each write dropped the piece 16M before it: all but the last
        // 16M are gone from the page cache, and those are still there.
        let kept = WRITE_BEHIND as usize;
        assert_eq!(resident(&file, 0, len - kept), 0, "dropped");
        assert!(resident(&file, len - kept, kept) > 0, "kept");
        let mut back = vec![0u8; len];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "nothing is lost");
    }

    #[test]
    fn writeback_drops_pages_behind_the_writes_and_keeps_the_data() {
        let Some((_dir, file)) = scratch() else {
            return;
        };
        let len = 48 << 20;
        let data = pattern(len);
        file.write_all_at(&data, 0).unwrap();
        assert!(resident(&file, 0, len) > 0, "just written, so cached");

        let wb = Writeback::default();
        wb.furthest.store(len as u64, Ordering::Relaxed);
        wb.job(&file);
        // Up to 16M behind the end, in whole 8M windows: 32M dropped.
        let to = (len as u64 - EVICT_BEHIND) & !(WRITEBACK_EVERY - 1);
        assert_eq!(to, 32 << 20);
        assert_eq!(wb.dropped.load(Ordering::Relaxed), to);
        assert_eq!(resident(&file, 0, to as usize), 0, "dropped");
        assert!(resident(&file, to as usize, len - to as usize) > 0, "kept");

        // Nothing is lost: the dropped part reads back from the disk.
        let mut back = vec![0u8; len];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data);
    }
}
