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
//!   zeroes, so nothing is done for zero ranges.
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
const WRITEBACK_EVERY: u64 = 64 << 20;

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
    /// Bytes written since writeback to disk was last started.
    unstarted: AtomicU64,
}

/// A write for the writer threads.
#[derive(Debug)]
struct WriteJob {
    data: Data,
    /// Bytes of `data` already written.
    skip: usize,
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
            unstarted: AtomicU64::new(0),
        }))
    }

    /// Count `len` more bytes written; every [`WRITEBACK_EVERY`] bytes,
    /// have the kernel start writing the file's dirty pages to disk
    /// (`sync_file_range`, on a blocking thread: it may wait for the
    /// device's queue). Otherwise the kernel waits for its dirty
    /// thresholds and the disk idles during the copy, then has it all to
    /// write at the end (or at the next `sync`): 2 GiB file to file then
    /// `sync` took 1.24 s, as long as libnbd's, which writes back as it
    /// goes.
    fn start_writeback(&self, len: u64) {
        let before = self.unstarted.fetch_add(len, Ordering::Relaxed);
        if before + len < WRITEBACK_EVERY {
            return;
        }
        self.unstarted.store(0, Ordering::Relaxed);
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            // SAFETY: a plain system call on an open descriptor; an error
            // only means no early writeback.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        });
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
            out.push(Extent {
                offset: start,
                length: stop - start,
                zero,
            });
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
        if self.block_device {
            "block device"
        } else {
            "file"
        }
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
            return Ok(vec![Extent {
                offset,
                length,
                zero: false,
            }]);
        }
        let end = offset + length;
        let mut v = self
            .blocking(false, move |f| seek_extents(f, offset, end))
            .await?;
        if v.is_empty() {
            v.push(Extent {
                offset,
                length,
                zero: false,
            });
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
        self.start_writeback(len as u64);
        // The kernel only reads from the buffer for a write.
        let ptr = data.as_ptr().cast_mut();
        let done = nowait(&self.file, ptr, len, offset, true, &self.nowait_write);
        if done == len {
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
