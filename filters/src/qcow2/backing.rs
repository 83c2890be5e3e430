//! Backing files: a raw file, a qcow2 image (with its own chain), or an
//! NBD export, and the I/O handles under them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::client::{ConnectOptions, Connection};
use libnbd::protocol::CONTEXT_BASE_ALLOCATION;
use libnbd::{run_blocking, Caps, Error, Extents, Flags, Handle, Result};

use super::header::{Header, MAGIC};
use super::image::{BoxFut, Image};

/// The longest chain of backing files followed.
const MAX_DEPTH: u32 = 16;

/// A file read (and, for copy-on-read targets, never written) directly.
pub struct FileIo {
    file: File,
    name: String,
    size: u64,
}

impl FileIo {
    pub fn open(path: &Path) -> Result<FileIo> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("open: {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("fstat: {}", path.display()), e))?
            .len();
        Ok(FileIo {
            file,
            name: path.display().to_string(),
            size,
        })
    }
}

#[async_trait]
impl Handle for FileIo {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            extents: true,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            let mut done = 0;
            while done < buf.len() {
                match self.file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => {
                        buf[done..].fill(0);
                        break;
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io(format!("pread: {}", self.name), e)),
                }
            }
            Ok(())
        })
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        use nix::unistd::{lseek, Whence};
        let fd = self.file.as_raw_fd();
        let end = (offset + count).min(self.size);
        let mut pos = offset;
        while pos < end {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => end,
                Err(_) => {
                    ext.add(pos, end - pos, 0)?;
                    return Ok(());
                }
            };
            if data > pos {
                ext.add(pos, data.min(end) - pos, HOLE_ZERO)?;
                pos = data.min(end);
                continue;
            }
            let hole = lseek(fd, pos as i64, Whence::SeekHole).map_or(end, |h| h as u64);
            ext.add(pos, hole.min(end) - pos, 0)?;
            pos = hole.min(end);
        }
        Ok(())
    }
}

/// An NBD export as a read-only handle. Its extents are the server's
/// `base:allocation` (holes and zeroes as it reports them), when it
/// offers that; otherwise all data.
pub struct NbdIo {
    conn: Connection,
}

impl NbdIo {
    /// Connect to `uri`, asking for `base:allocation`.
    pub async fn connect(uri: &str) -> libnbd::client::Result<NbdIo> {
        let opts = ConnectOptions::default().meta_context(CONTEXT_BASE_ALLOCATION);
        let conn = Connection::connect_uri(uri, &opts).await?;
        Ok(NbdIo { conn })
    }

    fn has_extents(&self) -> bool {
        self.conn.can_meta_context(CONTEXT_BASE_ALLOCATION)
    }
}

fn nbd_err(e: libnbd::client::Error) -> Error {
    Error::eio(format!("qcow2: backing NBD server: {e}"))
}

#[async_trait]
impl Handle for NbdIo {
    fn size(&self) -> Result<u64> {
        Ok(self.conn.size())
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            extents: self.has_extents(),
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.conn.pread(buf, offset, 0).await.map_err(nbd_err)
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        if !self.has_extents() {
            return ext.add(offset, count, 0);
        }
        // The server may describe less than asked: ask again from where
        // its answer ended, until all of it is described.
        let end = offset.saturating_add(count).min(self.conn.size());
        let mut at = offset;
        while at < end {
            let status = match self.conn.block_status(end - at, at, 0).await {
                Ok(s) => s,
                // The server refuses (extents are advice): the rest as
                // data, which it reads as.
                Err(libnbd::client::Error::Server { .. }) => return ext.add(at, end - at, 0),
                Err(e) => return Err(nbd_err(e)),
            };
            let before = at;
            for e in status.get(CONTEXT_BASE_ALLOCATION).unwrap_or(&[]) {
                if at >= end {
                    break;
                }
                let len = e.length.min(end - at);
                ext.add(at, len, e.flags & HOLE_ZERO)?;
                at += len;
            }
            if at == before {
                return Err(Error::eio(
                    "qcow2: backing NBD server: block status described nothing",
                ));
            }
        }
        Ok(())
    }
}

/// A backing file, opened.
pub enum Backing {
    Raw {
        io: Box<dyn Handle>,
        size: u64,
    },
    Qcow2 {
        img: Box<Image>,
        io: Box<dyn Handle>,
    },
}

/// qemu's `nbd:host:port[:exportname=X]` and `nbd:unix:PATH[:exportname=X]`
/// as an NBD URI; URIs pass unchanged.
pub fn nbd_uri(name: &str) -> Option<String> {
    if name.starts_with("nbd://")
        || name.starts_with("nbd+unix://")
        || name.starts_with("nbds://")
        || name.starts_with("nbd+tcp://")
    {
        return Some(name.to_string());
    }
    let rest = name.strip_prefix("nbd:")?;
    let (rest, export) = match rest.find(":exportname=") {
        Some(i) => (&rest[..i], &rest[i + ":exportname=".len()..]),
        None => (rest, ""),
    };
    let enc = |s: &str| percent_encode(s);
    if let Some(path) = rest.strip_prefix("unix:") {
        return Some(format!("nbd+unix:///{}?socket={}", enc(export), enc(path)));
    }
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "10809"));
    Some(format!("nbd://{host}:{port}/{}", enc(export)))
}

fn percent_encode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

impl Backing {
    /// Open what header `h` names as its backing file (relative names
    /// from `dir`, the image's directory), or `name` instead when given.
    pub fn open<'a>(
        h: &'a Header,
        dir: Option<&'a Path>,
        name: Option<&'a str>,
        fmt: Option<&'a str>,
        depth: u32,
    ) -> BoxFut<'a, Result<Option<Backing>>> {
        Box::pin(async move {
            let Some(name) = name.or(h.backing_file.as_deref()) else {
                return Ok(None);
            };
            if depth >= MAX_DEPTH {
                return Err(Error::eio("qcow2: backing chain too long"));
            }
            let io: Box<dyn Handle>;
            let mut bdir = None;
            if let Some(uri) = nbd_uri(name) {
                let nbd = NbdIo::connect(&uri)
                    .await
                    .map_err(|e| Error::eio(format!("qcow2: backing file {name}: {e}")))?;
                io = Box::new(nbd);
            } else if name.starts_with("json:") {
                return Err(Error::eio(format!(
                    "qcow2: backing file {name}: json: file names are not supported"
                )));
            } else {
                let p = Path::new(name);
                let path: PathBuf = match dir {
                    Some(d) if p.is_relative() => d.join(p),
                    _ => p.to_path_buf(),
                };
                bdir = path.parent().map(Path::to_path_buf);
                io =
                    Box::new(FileIo::open(&path).map_err(|e| {
                        Error::new(e.errno, format!("qcow2: backing file: {}", e.msg))
                    })?);
            }
            let fmt = fmt.or(h.backing_format.as_deref());
            let is_qcow2 = match fmt {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(f) => {
                    return Err(Error::eio(format!(
                        "qcow2: backing file {name}: format {f} not supported (raw or qcow2)"
                    )))
                }
                None => {
                    let mut m = [0u8; 4];
                    if io.size()? >= 4 {
                        io.pread(&mut m, 0, Flags::NONE).await?;
                    }
                    &m == MAGIC
                }
            };
            if is_qcow2 {
                let img = Image::open(&*io, bdir.as_deref(), None, None, depth + 1).await?;
                Ok(Some(Backing::Qcow2 {
                    img: Box::new(img),
                    io,
                }))
            } else {
                let size = io.size()?;
                Ok(Some(Backing::Raw { io, size }))
            }
        })
    }

    fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2 { img, .. } => img.size(),
        }
    }

    /// Read guest bytes (zeroes past the backing file's end).
    pub async fn read(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let avail = self.size().saturating_sub(pos).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Raw { io, .. } => io.pread(head, pos, Flags::NONE).await,
            Backing::Qcow2 { img, io } => img.read(&**io, head, pos).await,
        }
    }

    pub async fn extents(&self, n: u64, pos: u64, ext: &mut Extents) -> Result<()> {
        let size = self.size();
        let inside = size.saturating_sub(pos).min(n);
        if inside > 0 {
            let mut e = Extents::new(pos, pos + inside);
            match self {
                Backing::Raw { io, .. } => io.extents(inside, pos, Flags::NONE, &mut e).await?,
                Backing::Qcow2 { img, io } => {
                    img.extents(&**io, inside, pos, false, &mut e).await?
                }
            }
            if e.next_offset() < pos + inside {
                let at = e.next_offset();
                e.add(at, pos + inside - at, 0)?;
            }
            for x in e.list() {
                ext.add(x.offset, x.length, x.flags)?;
            }
        }
        if inside < n {
            ext.add(pos + inside, n - inside, HOLE_ZERO)?;
        }
        Ok(())
    }

    pub async fn depth(&self, n: u64, pos: u64, base: u32, ext: &mut Extents) -> Result<()> {
        let size = self.size();
        let inside = size.saturating_sub(pos).min(n);
        if inside > 0 {
            match self {
                Backing::Raw { .. } => ext.add(pos, inside, base)?,
                Backing::Qcow2 { img, io } => {
                    let mut e = Extents::new(pos, pos + inside);
                    img.depth(&**io, inside, pos, base, &mut e).await?;
                    for x in e.list() {
                        ext.add(x.offset, x.length, x.flags)?;
                    }
                }
            }
        }
        if inside < n {
            // As qemu: past the backing file's end, the backing layer
            // "has" the zeroes read there.
            ext.add(pos + inside, n - inside, base)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_nbd_names() {
        assert_eq!(
            nbd_uri("nbd:localhost:10810").unwrap(),
            "nbd://localhost:10810/"
        );
        assert_eq!(
            nbd_uri("nbd:unix:/tmp/s.sock:exportname=disk").unwrap(),
            "nbd+unix:///disk?socket=/tmp/s.sock"
        );
        assert_eq!(nbd_uri("nbd://h:1/e").unwrap(), "nbd://h:1/e");
        assert!(nbd_uri("disk.img").is_none());
    }
}
