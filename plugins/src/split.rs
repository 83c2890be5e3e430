//! # split: several files concatenated into one disk
//!
//! The files named by `file=` are logically concatenated, in the order
//! they appear on the command line, into a single disk whose size is
//! the sum of theirs. Requests that cross a file boundary are split
//! across the files.
//!
//! ```text
//! nbdkit split disk.part1 disk.part2 disk.part3
//! nbdkit split file=a.img file=b.img
//! ```
//!
//! ## Parameters
//!
//! - `[file=]FILENAME` (required, may be repeated): a plain file to
//!   serve. Each is resolved to its real path when the server starts, so
//!   a missing file is an error then. As upstream, giving none at all
//!   serves a zero-sized disk.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's split plugin:
//!
//! - Each connection opens every file, read-write unless the server or
//!   connection is read-only; the files must not be resized meanwhile.
//! - Reads and writes use `pread`/`pwrite` on the files a request spans;
//!   a read beyond a file's end is "unexpected end of file".
//! - Flush and FUA are not advertised (upstream's plugin has no flush),
//!   trim is not supported, and zero is emulated by the server by
//!   writing zeroes (fast zero fails at once, as upstream).
//! - Extents come from `lseek(SEEK_DATA/SEEK_HOLE)` on each file that
//!   supports it (others report data).
//! - Cache is native (`posix_fadvise(WILLNEED)` on each file spanned).
//! - Thread model `serialize_requests`; not safe for multi-conn.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::{run_blocking, HOLE_ZERO};
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Error, Extents, Flags, Handle, OpenContext, Params,
    Plugin, PluginEntry, Result, ThreadModel,
};
use nix::errno::Errno;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

/// The registry entry of the split plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "split",
    help: "file=<FILENAME>  (required) File(s) to serve.",
    magic: Some("file"),
    create,
};

/// The configured split plugin: the files' real paths, in order.
pub struct SplitPlugin {
    files: Vec<String>,
}

/// Build the split plugin from one or more `file=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let mut files = Vec::new();
    for f in params.take_all("file") {
        let p = std::fs::canonicalize(&f)
            .map_err(|e| ConfigError::new(format!("realpath: {f}: {}", os_msg(&e))))?;
        files.push(p.to_string_lossy().into_owned());
    }
    params.finish("split")?;
    Ok(Arc::new(SplitPlugin { files }))
}

/// The message of an OS error without Rust's " (os error N)" suffix.
fn os_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn nix_err(context: impl std::fmt::Display, e: Errno) -> Error {
    Error::io(context, std::io::Error::from_raw_os_error(e as i32))
}

#[async_trait]
impl Plugin for SplitPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let readonly = ctx.readonly;
        let names = self.files.clone();
        run_blocking(move || SplitHandle::open(&names, readonly)).map(|h| Box::new(h) as _)
    }
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::SerializeRequests
    }
}

/// One of the files of a connection.
struct Part {
    name: String,
    file: File,
    /// Where it starts in the disk.
    offset: u64,
    size: u64,
    can_extents: bool,
}

/// A connection to the split plugin: every file, opened.
pub struct SplitHandle {
    parts: Vec<Part>,
    size: u64,
    writable: bool,
}

impl SplitHandle {
    fn open(names: &[String], readonly: bool) -> Result<SplitHandle> {
        let mut parts = Vec::with_capacity(names.len());
        let mut offset = 0u64;
        for name in names {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!readonly)
                .open(name)
                .map_err(|e| Error::io(format!("open: {name}"), e))?;
            let size = file
                .metadata()
                .map_err(|e| Error::io(format!("stat: {name}"), e))?
                .len();
            // ENXIO: no data at all (a wholly sparse file), which is an answer.
            let can_extents = matches!(
                lseek(file.as_raw_fd(), 0, Whence::SeekData),
                Ok(_) | Err(Errno::ENXIO)
            );
            parts.push(Part {
                name: name.clone(),
                file,
                offset,
                size,
                can_extents,
            });
            offset += size;
        }
        Ok(SplitHandle {
            parts,
            size: offset,
            writable: !readonly,
        })
    }

    /// The index of the file holding `offset` (which is < size).
    fn find(&self, offset: u64) -> usize {
        self.parts
            .partition_point(|p| p.offset + p.size <= offset)
            .min(self.parts.len() - 1)
    }

    /// Call `f(part, offset in part, start in request, length)` for each
    /// piece of `[offset, offset+count)`.
    fn each(
        &self,
        count: u64,
        offset: u64,
        mut f: impl FnMut(&Part, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < count {
            if self.parts.is_empty() {
                return Err(Error::eio("request beyond the end of the disk"));
            }
            let pos = offset + done;
            let p = &self.parts[self.find(pos)];
            let within = pos - p.offset;
            let n = (p.size - within).min(count - done);
            if n == 0 {
                return Err(Error::eio("request beyond the end of the disk"));
            }
            f(p, within, done as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }
}

fn part_extents(p: &Part, within: u64, n: u64, req_one: bool, ext: &mut Extents) -> Result<bool> {
    let base = p.offset;
    if !p.can_extents {
        ext.add(base + within, n, 0)?;
        return Ok(req_one);
    }
    let fd = p.file.as_raw_fd();
    let end = within + n;
    let mut pos = within;
    while pos < end {
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => (d as u64).max(pos),
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(nix_err(format!("lseek(SEEK_DATA): {}", p.name), e)),
        };
        if data > pos {
            let stop = data.min(end);
            ext.add(base + pos, stop - pos, HOLE_ZERO)?;
            pos = stop;
        } else {
            let hole = match lseek(fd, pos as i64, Whence::SeekHole) {
                Ok(h) => h as u64,
                Err(Errno::ENXIO) => pos,
                Err(e) => return Err(nix_err(format!("lseek(SEEK_HOLE): {}", p.name), e)),
            };
            if hole <= pos {
                ext.add(base + pos, end - pos, HOLE_ZERO)?;
                break;
            }
            let stop = hole.min(end);
            ext.add(base + pos, stop - pos, 0)?;
            pos = stop;
        }
        if req_one {
            return Ok(true);
        }
    }
    Ok(false)
}

#[async_trait]
impl Handle for SplitHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: self.writable,
            cache: Cache::Native,
            extents: true,
            ..Caps::READ_ONLY
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.each(buf.len() as u64, offset, |p, within, at, n| {
                p.file
                    .read_exact_at(&mut buf[at..at + n], within)
                    .map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            Error::eio("pread: unexpected end of file")
                        } else {
                            Error::io(format!("pread: {}", p.name), e)
                        }
                    })
            })
        })
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.each(buf.len() as u64, offset, |p, within, at, n| {
                p.file
                    .write_all_at(&buf[at..at + n], within)
                    .map_err(|e| Error::io(format!("pwrite: {}", p.name), e))
            })
        })
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let req_one = flags.contains(Flags::REQ_ONE);
        run_blocking(|| {
            let mut stop = false;
            self.each(count, offset, |p, within, _, n| {
                if !stop {
                    stop = part_extents(p, within, n as u64, req_one, ext)?;
                }
                Ok(())
            })
        })
    }
    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.each(count, offset, |p, within, _, n| {
            posix_fadvise(
                p.file.as_raw_fd(),
                within as i64,
                n as i64,
                PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            )
            .map_err(|e| nix_err(format!("posix_fadvise: {}", p.name), e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::testing::open_plugin;
    use libnbd::Fua;

    #[tokio::test]
    async fn concatenated_and_split_writes() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"hello").unwrap();
        std::fs::write(&b, b"world!").unwrap();
        let args = [a.display().to_string(), format!("file={}", b.display())];
        let h = open_plugin(&ENTRY, &args).await;
        assert_eq!(h.size().unwrap(), 11);
        let c = h.caps().unwrap();
        assert!(c.write && !c.flush && !c.trim && !c.zero && c.extents);
        assert_eq!(c.fua, Fua::None);
        let mut buf = [0u8; 11];
        h.pread(&mut buf, 0, Flags::NONE).await.unwrap();
        assert_eq!(&buf, b"helloworld!");
        h.pwrite(b"XYZ", 4, Flags::NONE).await.unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"hellX");
        assert_eq!(std::fs::read(&b).unwrap(), b"YZrld!");
        let mut e = Extents::new(0, 11);
        h.extents(11, 0, Flags::NONE, &mut e).await.unwrap();
        assert_eq!(e.next_offset(), 11);
        h.cache(11, 0, Flags::NONE).await.unwrap();
    }

    #[test]
    fn errors() {
        let mut p = Params::parse(&["x=1"], Some("file")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
        let mut p = Params::parse(&["/no/such/file"], Some("file")).unwrap();
        let e = ENTRY.configure(&mut p).err().unwrap();
        assert!(e.to_string().contains("realpath"), "{e}");
    }
}
