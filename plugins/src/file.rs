//! # file: serve a file, a block device, or the files of a directory
//!
//! Serves a local file or block device over NBD, or, with `dir=`, every
//! regular file and block device in a directory, chosen by the client
//! through the export name.
//!
//! ```text
//! nbdkit file disk.img
//! nbdkit file /dev/sdb
//! nbdkit file disk.img fadvise=sequential cache=none
//! nbdkit file dir=/var/lib/images
//! ```
//!
//! ## Parameters
//!
//! Exactly one of `file` and `dir` must be given.
//!
//! - `[file=]FILENAME`: the file or block device to serve. The export
//!   name the client asks for is ignored.
//! - `dir=DIRECTORY` (or `directory=DIRECTORY`, as upstream): serve the regular files and block devices directly
//!   inside the directory (following symbolic links; subdirectories and
//!   other special files are ignored). The client picks one by export
//!   name and can list them (`NBD_OPT_LIST`). The default export `""` is
//!   rejected, and so are names containing `/`.
//! - `cache=default|none`: with `none`, try to keep what was read or
//!   written out of the page cache: after each read the range is dropped
//!   with `posix_fadvise(DONTNEED)`; after each write the range is written
//!   back with `sync_file_range` and then dropped.
//! - `fadvise=normal|random|sequential`: a hint for the kernel's
//!   read-ahead (`posix_fadvise` on the whole file), default `normal`.
//!
//! ## Behaviour
//!
//! The file is opened read-write, or read-only when the server is
//! read-only or the file cannot be opened for writing (then the export is
//! read-only). Each connection opens the file itself.
//!
//! - Reads and writes use `pread`/`pwrite` at the offset; flush and FUA
//!   use `fdatasync` (FUA is native: a sync after the write).
//! - Trim punches a hole (`fallocate(PUNCH_HOLE)`, or the `BLKDISCARD`
//!   ioctl on a block device); trim is advisory, so where neither works
//!   it succeeds doing nothing.
//! - Zero tries, in order: punching a hole (only if the client allows
//!   trimming), `fallocate(ZERO_RANGE)`, and then for files a hole
//!   punched and re-allocated, for block devices the `BLKZEROOUT` ioctl;
//!   methods the file system refuses are not tried again on that
//!   connection. If none works (or, on a block device, the range is not
//!   aligned to its logical block size) the server writes zeroes instead.
//!   Fast zero is not advertised, as upstream.
//! - Extents come from `lseek(SEEK_DATA/SEEK_HOLE)` on regular files
//!   that support it; holes read as zeroes.
//! - Cache is `posix_fadvise(WILLNEED)`; multi-conn is safe.
//!
//! The system calls block, so each is run inside
//! `tokio::task::block_in_place` when the server runs on tokio's
//! multi-thread runtime (as ours does): the worker thread hands its
//! other tasks to another worker while it waits, and the request's
//! buffer is used in place, with no copy (which `spawn_blocking` would
//! need, since it requires owned `'static` data). On a current-thread
//! runtime (some tests) the call is made directly.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    run_blocking, Caps, ConfigError, ConfigResult, Error, ExportEntry, Extents, Flags, Handle,
    OpenContext, Params, Plugin, PluginEntry, Result,
};
use nix::errno::Errno;
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

/// The registry entry of the file plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "file",
    help: "[file=]<FILENAME>     The filename to serve.\n\
           dir=<DIRNAME>         A directory containing files to serve.\n\
           cache=<MODE>          Set use of caching (default, none).\n\
           fadvise=<LEVEL>       Set fadvise hint (normal, random, sequential).",
    magic: Some("file"),
    create,
};

/// What the plugin serves.
#[derive(Debug, Clone)]
enum Mode {
    /// One file or block device (absolute path).
    File(PathBuf),
    /// The files of a directory (absolute path).
    Dir(PathBuf),
}

/// The `fadvise=` hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fadvise {
    /// `normal` (the default).
    Normal,
    /// `random`: no read-ahead.
    Random,
    /// `sequential`: more read-ahead.
    Sequential,
}

/// The configured file plugin.
pub struct FilePlugin {
    mode: Mode,
    cache_none: bool,
    fadvise: Fadvise,
}

/// Build the file plugin from `file=` or `dir=`, `cache=` and `fadvise=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let file = params.take("file");
    // `directory=` is upstream's other name for `dir=`.
    let directory = params.take("directory");
    let dir = params.take("dir").or(directory);
    let cache_none = match params.take("cache").as_deref() {
        None | Some("default") => false,
        Some("none") => true,
        Some(other) => return Err(ConfigError::new(format!("unknown cache mode: {other}"))),
    };
    let fadvise = match params.take("fadvise").as_deref() {
        None | Some("normal") => Fadvise::Normal,
        Some("random") => Fadvise::Random,
        Some("sequential") => Fadvise::Sequential,
        Some(other) => return Err(ConfigError::new(format!("unknown fadvise mode: {other}"))),
    };
    let realpath = |p: &str| {
        std::fs::canonicalize(p).map_err(|e| ConfigError::new(format!("realpath: {p}: {e}")))
    };
    let mode = match (file, dir) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "file= and dir= cannot be used at the same time",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                "you must supply either [file=]<FILENAME> or dir=<DIRNAME> parameter \
                 after the plugin name on the command line",
            ))
        }
        (Some(f), None) => {
            let path = realpath(&f)?;
            if path.is_dir() {
                return Err(ConfigError::new(format!(
                    "use dir= to serve files within {}",
                    path.display()
                )));
            }
            Mode::File(path)
        }
        (None, Some(d)) => {
            let path = realpath(&d)?;
            if !path.is_dir() {
                return Err(ConfigError::new(format!(
                    "expecting a directory: {}",
                    path.display()
                )));
            }
            Mode::Dir(path)
        }
    };
    Ok(Arc::new(FilePlugin {
        mode,
        cache_none,
        fadvise,
    }))
}

/// Is this error "operation not supported" (by this file system or
/// device)?
fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::ENOTTY)
}

fn nix_err(context: impl std::fmt::Display, e: Errno) -> Error {
    Error::io(context, std::io::Error::from(e))
}

/// Is this file usable: a regular file or a block device?
fn servable(meta: &std::fs::Metadata) -> bool {
    meta.is_file() || meta.file_type().is_block_device()
}

impl FilePlugin {
    fn open_path(&self, path: &Path, name: &str, readonly: bool) -> Result<FileHandle> {
        let open = |write: bool| OpenOptions::new().read(true).write(write).open(path);
        let (file, writable) = if readonly {
            (open(false), false)
        } else {
            match open(true) {
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY)
                    ) =>
                {
                    (open(false), false)
                }
                r => (r, true),
            }
        };
        let file = file.map_err(|e| Error::io(format!("open: {name}"), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("fstat: {name}"), e))?;
        if !servable(&meta) {
            return Err(Error::einval(format!(
                "file is not regular or block device: {name}"
            )));
        }
        let fd = file.as_raw_fd();
        let advice = match self.fadvise {
            Fadvise::Normal => PosixFadviseAdvice::POSIX_FADV_NORMAL,
            Fadvise::Random => PosixFadviseAdvice::POSIX_FADV_RANDOM,
            Fadvise::Sequential => PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        };
        // Only a hint: failure does not matter.
        let _ = posix_fadvise(fd, 0, 0, advice);
        let is_block = meta.file_type().is_block_device();
        // Extents only where SEEK_HOLE works (not on block devices, nor
        // on empty files, where there is nothing to report anyway).
        let can_extents = !is_block && lseek(fd, 0, Whence::SeekHole).is_ok();
        Ok(FileHandle {
            file,
            name: name.to_string(),
            writable,
            is_block,
            cache_none: self.cache_none,
            can_extents,
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
            can_fallocate: AtomicBool::new(true),
            can_ioctl: AtomicBool::new(true),
        })
    }

    fn list_dir(dir: &Path) -> Result<Vec<ExportEntry>> {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("opendir: {}", dir.display()), e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("readdir: {}", dir.display()), e))?;
            let Ok(name) = ent.file_name().into_string() else {
                continue;
            };
            // Follow symbolic links; skip dangling ones and special files.
            match std::fs::metadata(ent.path()) {
                Ok(m) if servable(&m) => out.push(ExportEntry {
                    name,
                    description: None,
                }),
                _ => {}
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Plugin for FilePlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h = match &self.mode {
            Mode::File(path) => {
                let name = path.display().to_string();
                run_blocking(|| self.open_path(path, &name, ctx.readonly))?
            }
            Mode::Dir(dir) => {
                let name = ctx.export_name.as_str();
                if name.is_empty() {
                    return Err(Error::einval(
                        "dir= mode has no default export: the client must choose a file \
                         by export name (see the export list)",
                    ));
                }
                if name.contains('/') {
                    return Err(Error::einval("exportname cannot contain /"));
                }
                let path = dir.join(name);
                run_blocking(|| self.open_path(&path, name, ctx.readonly))?
            }
        };
        Ok(Box::new(h))
    }

    async fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        match &self.mode {
            Mode::File(_) => Ok(vec![ExportEntry {
                name: String::new(),
                description: None,
            }]),
            Mode::Dir(dir) => run_blocking(|| Self::list_dir(dir)),
        }
    }

    fn dump(&self) -> Vec<(String, String)> {
        [
            "file_blksszget",
            "file_blkzeroout",
            "file_falloc_fl_punch_hole",
            "file_falloc_fl_zero_range",
        ]
        .iter()
        .map(|k| (k.to_string(), "yes".to_string()))
        .collect()
    }
}

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A connection's open file.
pub struct FileHandle {
    file: File,
    name: String,
    writable: bool,
    is_block: bool,
    cache_none: bool,
    can_extents: bool,
    /// Methods not yet refused by the file system or device.
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
    can_fallocate: AtomicBool,
    can_ioctl: AtomicBool,
}

/// The outcome of one zeroing method.
enum Tried {
    Done,
    /// Not supported here: try the next method.
    Unsupported,
}

impl FileHandle {
    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("fdatasync: {}", self.name), e))
    }

    /// Try `f` if `flag` still allows it; an "unsupported" answer clears
    /// the flag.
    fn attempt(
        &self,
        flag: &AtomicBool,
        what: &str,
        f: impl FnOnce() -> nix::Result<()>,
    ) -> Result<Tried> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(Tried::Unsupported);
        }
        match f() {
            Ok(()) => Ok(Tried::Done),
            Err(e) if unsupported(e) => {
                flag.store(false, Ordering::Relaxed);
                Ok(Tried::Unsupported)
            }
            // Block devices refuse ranges not aligned to their logical
            // block size: not this time, but maybe for the next request.
            Err(Errno::EINVAL) if self.is_block => Ok(Tried::Unsupported),
            Err(e) => Err(nix_err(format!("{what}: {}", self.name), e)),
        }
    }

    fn punch(&self, count: u64, offset: u64) -> Result<Tried> {
        self.attempt(&self.can_punch, "fallocate(PUNCH_HOLE)", || {
            fallocate(
                self.fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                count as i64,
            )
        })
    }

    fn ioctl_range(&self, req: libc::c_ulong, count: u64, offset: u64) -> nix::Result<()> {
        let range: [u64; 2] = [offset, count];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64s (start, length)
        // from the pointer, which points to a live local array.
        let r = unsafe { libc::ioctl(self.fd(), req as _, range.as_ptr()) };
        Errno::result(r).map(drop)
    }

    fn do_trim(&self, count: u64, offset: u64) -> Result<()> {
        if let Tried::Done = self.punch(count, offset)? {
            return Ok(());
        }
        if self.is_block {
            match self.ioctl_range(BLKDISCARD, count, offset) {
                Ok(()) => return Ok(()),
                // Misaligned or unsupported: trim is only advisory.
                Err(e) if unsupported(e) || e == Errno::EINVAL => {}
                Err(e) => return Err(nix_err(format!("BLKDISCARD: {}", self.name), e)),
            }
        }
        Ok(())
    }

    fn do_zero(&self, count: u64, offset: u64, may_trim: bool) -> Result<()> {
        if may_trim {
            if let Tried::Done = self.punch(count, offset)? {
                return Ok(());
            }
        }
        let zr = self.attempt(&self.can_zero_range, "fallocate(ZERO_RANGE)", || {
            fallocate(
                self.fd(),
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                count as i64,
            )
        })?;
        if let Tried::Done = zr {
            return Ok(());
        }
        if self.is_block {
            if self.can_ioctl.load(Ordering::Relaxed) {
                match self.ioctl_range(BLKZEROOUT, count, offset) {
                    Ok(()) => return Ok(()),
                    Err(e) if unsupported(e) => self.can_ioctl.store(false, Ordering::Relaxed),
                    // Misaligned: let the server write zeroes.
                    Err(Errno::EINVAL) => {}
                    Err(e) => return Err(nix_err(format!("BLKZEROOUT: {}", self.name), e)),
                }
            }
        } else if self.can_fallocate.load(Ordering::Relaxed) {
            // A hole punched and allocated again reads as zeroes.
            if let Tried::Done = self.punch(count, offset)? {
                let _ = self.attempt(&self.can_fallocate, "fallocate", || {
                    fallocate(
                        self.fd(),
                        FallocateFlags::empty(),
                        offset as i64,
                        count as i64,
                    )
                })?;
                return Ok(());
            }
        }
        Err(Error::enotsup(format!(
            "zero: {}: no efficient way to zero",
            self.name
        )))
    }

    /// cache=none: drop a range read from the page cache.
    fn evict_read(&self, count: u64, offset: u64) {
        let _ = posix_fadvise(
            self.fd(),
            offset as i64,
            count as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }

    /// cache=none: write a range back and drop it from the page cache.
    fn evict_write(&self, count: u64, offset: u64) {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: a plain system call on an open descriptor; no memory is
        // passed. Failure only means the pages stay cached.
        unsafe {
            libc::sync_file_range(self.fd(), offset as i64, count as i64, flags);
        }
        self.evict_read(count, offset);
    }

    fn do_extents(&self, count: u64, offset: u64, req_one: bool, ext: &mut Extents) -> Result<()> {
        let fd = self.fd();
        let end = offset + count;
        let mut pos = offset;
        while pos < end {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => (d as u64).max(pos),
                // No data from here to the end of the file.
                Err(Errno::ENXIO) => end,
                Err(e) => return Err(nix_err(format!("lseek(SEEK_DATA): {}", self.name), e)),
            };
            if data > pos {
                let stop = data.min(end);
                ext.add(pos, stop - pos, HOLE_ZERO)?;
                pos = stop;
            } else {
                let hole = match lseek(fd, pos as i64, Whence::SeekHole) {
                    Ok(h) => h as u64,
                    // The file shrank under us: the rest reads as zeroes.
                    Err(Errno::ENXIO) => pos,
                    Err(e) => return Err(nix_err(format!("lseek(SEEK_HOLE): {}", self.name), e)),
                };
                if hole <= pos {
                    ext.add(pos, end - pos, HOLE_ZERO)?;
                    break;
                }
                let stop = hole.min(end);
                ext.add(pos, stop - pos, 0)?;
                pos = stop;
            }
            if req_one {
                break;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for FileHandle {
    fn size(&self) -> Result<u64> {
        if self.is_block {
            lseek(self.fd(), 0, Whence::SeekEnd)
                .map(|n| n as u64)
                .map_err(|e| nix_err(format!("lseek: {}", self.name), e))
        } else {
            self.file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| Error::io(format!("fstat: {}", self.name), e))
        }
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: self.writable,
            fast_zero: false,
            extents: self.can_extents,
            ..Caps::FULL
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.file.read_exact_at(buf, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::eio(format!("pread: {}: unexpected end of file", self.name))
                } else {
                    Error::io(format!("pread: {}", self.name), e)
                }
            })?;
            if self.cache_none {
                self.evict_read(buf.len() as u64, offset);
            }
            Ok(())
        })
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        if !self.writable {
            return Err(Error::eperm("the file is open read-only"));
        }
        run_blocking(|| {
            self.file
                .write_all_at(buf, offset)
                .map_err(|e| Error::io(format!("pwrite: {}", self.name), e))?;
            if flags.contains(Flags::FUA) {
                self.sync()?;
            }
            if self.cache_none {
                self.evict_write(buf.len() as u64, offset);
            }
            Ok(())
        })
    }

    async fn flush(&self, _flags: Flags) -> Result<()> {
        run_blocking(|| self.sync())
    }

    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if !self.writable {
            return Err(Error::eperm("the file is open read-only"));
        }
        run_blocking(|| {
            self.do_trim(count, offset)?;
            if flags.contains(Flags::FUA) {
                self.sync()?;
            }
            Ok(())
        })
    }

    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if !self.writable {
            return Err(Error::eperm("the file is open read-only"));
        }
        run_blocking(|| {
            self.do_zero(count, offset, flags.contains(Flags::MAY_TRIM))?;
            if flags.contains(Flags::FUA) {
                self.sync()?;
            }
            Ok(())
        })
    }

    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        if !self.can_extents {
            return ext.add(offset, count, 0);
        }
        run_blocking(|| self.do_extents(count, offset, flags.contains(Flags::REQ_ONE), ext))
    }

    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        posix_fadvise(
            self.fd(),
            offset as i64,
            count as i64,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(|e| nix_err(format!("posix_fadvise: {}", self.name), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::protocol::errno;
    use libnbd::Stack;
    use libnbd::{Cache, Fua};

    fn plugin(args: &[&str]) -> ConfigResult<Arc<dyn Plugin>> {
        let mut p = Params::parse(args, Some("file"))?;
        ENTRY.configure(&mut p)
    }

    fn ctx(export: &str, readonly: bool) -> OpenContext {
        OpenContext {
            readonly,
            export_name: export.into(),
            ..Default::default()
        }
    }

    fn map_of(e: &Extents) -> Vec<(u64, u64, u32)> {
        e.list()
            .iter()
            .map(|x| (x.offset, x.length, x.flags))
            .collect()
    }

    /// A 10 MiB sparse file with 128 KiB of data at 640 KiB.
    fn sparse_file(dir: &Path) -> PathBuf {
        let path = dir.join("f.img");
        let f = File::create(&path).unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_all_at(&vec![0xABu8; 128 << 10], 640 << 10).unwrap();
        path
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn read_write_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let p = plugin(&[path.to_str().unwrap()]).unwrap();
        let h = p.open(&ctx("ignored", false)).await.unwrap();
        assert_eq!(h.size().unwrap(), 10 << 20);
        assert!(h.caps().unwrap().write && h.caps().unwrap().flush && h.caps().unwrap().trim);
        assert!(h.caps().unwrap().zero && !h.caps().unwrap().fast_zero);
        assert!(h.caps().unwrap().multi_conn);
        assert_eq!(h.caps().unwrap().fua, Fua::Native);
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
        let mut b = [0u8; 4];
        h.pread(&mut b, (640 << 10) - 2, Flags::NONE).await.unwrap();
        assert_eq!(b, [0, 0, 0xAB, 0xAB]);
        h.pwrite(b"hello", 100, Flags::FUA).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        h.cache(1 << 20, 0, Flags::NONE).await.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[100..105], b"hello");
        // Reading past the end is an error, not a panic.
        let e = h
            .pread(&mut b, (10 << 20) - 2, Flags::NONE)
            .await
            .unwrap_err();
        assert_eq!(e.errno, errno::EIO);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn extents_trim_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let p = plugin(&[&format!("file={}", path.display())]).unwrap();
        let h = p.open(&ctx("", false)).await.unwrap();
        if !h.caps().unwrap().extents {
            libnbd::elog!("SEEK_HOLE not supported here: skipping");
            return;
        }
        let size = 10 << 20;
        let mut e = Extents::new(0, size);
        h.extents(size, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(
            map_of(&e),
            vec![
                (0, 640 << 10, HOLE_ZERO),
                (640 << 10, 128 << 10, 0),
                (768 << 10, size - (768 << 10), HOLE_ZERO)
            ]
        );
        let mut one = Extents::new(0, size);
        h.extents(size, 0, Flags::REQ_ONE, &mut one).await.unwrap();
        assert_eq!(map_of(&one), vec![(0, 640 << 10, HOLE_ZERO)]);

        // Trim the first half of the data, zero (with MAY_TRIM) the rest.
        h.trim(64 << 10, 640 << 10, Flags::NONE).await.unwrap();
        h.zero(64 << 10, 704 << 10, Flags::MAY_TRIM | Flags::FUA)
            .await
            .unwrap();
        let mut e = Extents::new(0, size);
        h.extents(size, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(map_of(&e), vec![(0, size, HOLE_ZERO)]);

        // Zero without MAY_TRIM leaves allocated zeroes.
        h.pwrite(&[1u8; 8192], 1 << 20, Flags::NONE).await.unwrap();
        h.zero(4096, 1 << 20, Flags::NONE).await.unwrap();
        let mut b = vec![9u8; 8192];
        h.pread(&mut b, 1 << 20, Flags::NONE).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 1));
        let mut e = Extents::new(1 << 20, (1 << 20) + 8192);
        h.extents(8192, 1 << 20, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(map_of(&e), vec![(1 << 20, 8192, 0)]);
        // Unaligned zero of part of a block.
        h.zero(10, (1 << 20) + 5000, Flags::MAY_TRIM).await.unwrap();
        h.pread(&mut b, 1 << 20, Flags::NONE).await.unwrap();
        assert!(b[5000..5010].iter().all(|&x| x == 0));
        assert_eq!(b[5010], 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn through_the_server_layer() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let stack = Stack {
            filters: vec![],
            plugin: plugin(&[path.to_str().unwrap(), "cache=none", "fadvise=sequential"]).unwrap(),
        };
        let h = stack.open(&ctx("", false)).await.unwrap();
        // As nbdinfo shows upstream: fast zero is not advertised.
        assert!(h.caps().unwrap().zero && !h.caps().unwrap().fast_zero);
        assert_eq!(
            h.zero(10, 0, Flags::FAST_ZERO).await.unwrap_err().errno,
            errno::ENOTSUP
        );
        h.pwrite(b"abc", 5, Flags::FUA).await.unwrap();
        let mut b = [0u8; 3];
        h.pread(&mut b, 5, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"abc");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn readonly() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let p = plugin(&[path.to_str().unwrap()]).unwrap();
        let h = p.open(&ctx("", true)).await.unwrap();
        assert!(!h.caps().unwrap().write);
        assert_eq!(
            h.pwrite(b"x", 0, Flags::NONE).await.unwrap_err().errno,
            errno::EPERM
        );
        let mut b = [0u8; 1];
        h.pread(&mut b, 640 << 10, Flags::NONE).await.unwrap();
        assert_eq!(b[0], 0xAB);
    }

    #[tokio::test]
    async fn current_thread_runtime_works_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let p = plugin(&[path.to_str().unwrap()]).unwrap();
        let h = p.open(&ctx("", false)).await.unwrap();
        h.pwrite(b"q", 0, Flags::NONE).await.unwrap();
        let mut b = [0u8; 1];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"q");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn directory_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        File::create(d.join("a.img"))
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        File::create(d.join("b.img"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::os::unix::fs::symlink("b.img", d.join("link")).unwrap();
        std::os::unix::fs::symlink("nowhere", d.join("dangling")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let p = plugin(&[&format!("dir={}", d.display())]).unwrap();
        let mut names: Vec<_> = p
            .list_exports(false)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["a.img", "b.img", "link"]);
        assert_eq!(p.default_export(), "");
        let h = p.open(&ctx("a.img", false)).await.unwrap();
        assert_eq!(h.size().unwrap(), 2 << 20);
        let h = p.open(&ctx("link", false)).await.unwrap();
        assert_eq!(h.size().unwrap(), 1 << 20);
        for bad in ["", "sub", "nothere", "dangling", "x/y", "..", "../a.img"] {
            assert!(p.open(&ctx(bad, false)).await.is_err(), "{bad}");
        }
    }

    #[test]
    fn config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path());
        let f = path.to_str().unwrap();
        let d = dir.path().to_str().unwrap();
        let err = |args: &[&str]| plugin(args).err().expect("should fail").0;
        assert!(err(&[]).contains("you must supply"));
        assert!(err(&["/no/such/file"]).contains("No such file"));
        assert!(err(&[f, &format!("dir={d}")]).contains("same time"));
        assert!(err(&[f, "cache=x"]).contains("unknown cache mode"));
        assert!(err(&[f, "fadvise=x"]).contains("unknown fadvise mode"));
        assert!(err(&[d]).contains("use dir="));
        assert!(err(&[&format!("dir={f}")]).contains("expecting a directory"));
        assert!(err(&[f, "rdelay=1"]).contains("unknown parameter 'rdelay'"));
        assert!(plugin(&[f, "cache=default", "fadvise=random"]).is_ok());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn special_files_are_refused() {
        let p = plugin(&["/dev/null"]).unwrap();
        let e = p.open(&ctx("", true)).await.err().unwrap();
        assert!(e.msg.contains("not regular or block device"));
    }
}
