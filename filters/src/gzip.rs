//! # gzip: serve the uncompressed content of a gzip file
//!
//! The layer below holds a `.gz` file; clients see the data it
//! compresses, read-only. gzip cannot be read at random, so, as
//! upstream, the whole file is decompressed once, when the first
//! connection to an export opens, into a hidden temporary file in
//! `$TMPDIR` (default `/var/tmp`), and reads are served from there.
//!
//! ```text
//! nbdkit file --filter=gzip disk.img.gz
//! nbdkit curl --filter=gzip https://example.com/disk.gz
//! nbdkit curl --filter=tar --filter=gzip https://example.com/file.tar.gz tar-entry=disk.img
//! ```
//!
//! ## Parameters
//!
//! There are no parameters specific to this filter.
//!
//! ## Behaviour
//!
//! The layer below is opened read-only and read in 4M pieces. The export
//! is read-only, its size is the uncompressed size, safe for multi-conn;
//! extents report all data (the temporary file is sparse where the data
//! is zeroes), flush passes down and cache is accepted. The export
//! description is `expansion of gzip-compressed image: ...` when the
//! layer below has one. If the size of the layer below changes, new
//! connections fail: restart nbdkit so the file is decompressed again.
//!
//! Each member's CRC-32 and length are checked: a corrupt or truncated
//! file fails the connection (and the next connection tries again), never
//! serves wrong data. Bytes after the last member that do not start
//! another member are ignored, as `gzip -d` does.
//!
//! Unlike upstream 1.32, which stops at the end of the first member,
//! every member of a multi-member file (`cat a.gz b.gz`, `pigz`
//! output) is served, as `gzip -dc` writes them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use flate2::{Crc, Decompress, FlushDecompress, Status};
use libnbd::backend::run_blocking;
use libnbd::{
    Cache, Caps, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Fua, Handle, Next,
    OpenContext, Params, Result,
};
use tokio::sync::OnceCell;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "gzip",
    help: "",
    create,
};

/// Compressed bytes read from the layer below at a time (as upstream).
const IN_CHUNK: u64 = 4 << 20;
/// Decompressed bytes produced at a time.
const OUT_CHUNK: usize = 1 << 20;
/// The largest gzip header (file name, comment, extra field) accepted.
const MAX_HEADER: usize = 1 << 20;

fn create(_p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(GzipFilter {
        files: Mutex::new(HashMap::new()),
    }))
}

struct GzipFilter {
    /// The decompressed data of each export, shared by its connections.
    files: Mutex<HashMap<String, Arc<OnceCell<Arc<Decoded>>>>>,
}

/// A decompressed file.
struct Decoded {
    /// The size of the compressed file it came from.
    compressed: u64,
    file: File,
    size: u64,
}

#[async_trait]
impl Filter for GzipFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let below = OpenContext {
            readonly: true,
            ..ctx.clone()
        };
        let next = next.open(&below).await?;
        let compressed = next.size()?;
        let cell = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(ctx.export_name.clone())
            .or_default()
            .clone();
        let data = cell
            .get_or_try_init(|| async {
                decompress(&*next, compressed)
                    .await
                    .map(Arc::new)
                    .inspect_err(|e| libnbd::elog!("nbdkit: gzip[{}]: error: {}", ctx.id, e.msg))
            })
            .await?
            .clone();
        if data.compressed != compressed {
            let e = Error::eio(
                "plugin size changed unexpectedly: you must restart nbdkit so the gzip filter can uncompress the data again",
            );
            libnbd::elog!("nbdkit: gzip[{}]: error: {}", ctx.id, e.msg);
            return Err(e);
        }
        let description = next
            .export_description()
            .map(|base| format!("expansion of gzip-compressed image: {base}"));
        Ok(Box::new(GzipHandle {
            next,
            data,
            description,
        }))
    }
}

/// Decompress the `compressed` bytes of the layer below into a new
/// temporary file.
async fn decompress(next: &dyn Handle, compressed: u64) -> Result<Decoded> {
    let dir = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let file = tempfile::tempfile_in(&dir).map_err(|e| {
        Error::io(
            format_args!("gzip: cannot create a temporary file in {}", dir.display()),
            e,
        )
    })?;
    let mut dec = GzDecoder::new();
    let mut written = 0u64;
    let mut input = vec![0u8; IN_CHUNK.min(compressed) as usize];
    let mut at = 0u64;
    while at < compressed && !dec.done() {
        let n = (compressed - at).min(IN_CHUNK) as usize;
        next.pread(&mut input[..n], at, Flags::NONE).await?;
        at += n as u64;
        run_blocking(|| {
            dec.feed(&input[..n], &mut |chunk| {
                // Zeroes are left as holes.
                if chunk.iter().any(|&b| b != 0) {
                    file.write_all_at(chunk, written)
                        .map_err(|e| Error::io("gzip: writing the temporary file", e))?;
                }
                written += chunk.len() as u64;
                Ok(())
            })
        })?;
    }
    dec.finish()?;
    file.set_len(written)
        .map_err(|e| Error::io("gzip: writing the temporary file", e))?;
    Ok(Decoded {
        compressed,
        file,
        size: written,
    })
}

/// Where a [`GzDecoder`] is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a member's header (`first`: of the first member).
    Header { first: bool },
    /// In a member's deflate data.
    Body,
    /// Expecting a member's CRC-32 and length.
    Trailer,
    /// After a member: another one, or the end.
    Between,
    /// After the last member: the rest is ignored.
    Done,
}

/// A gzip (RFC 1952) decoder fed with pieces of the file as they are
/// read, for any number of members.
struct GzDecoder {
    state: State,
    inflate: Decompress,
    crc: Crc,
    /// Input not consumed yet (headers and trailers split across pieces).
    pending: Vec<u8>,
    out: Vec<u8>,
}

fn corrupt(what: &str) -> Error {
    Error::eio(format!("gzip: {what}"))
}

/// The length of the gzip header at the start of `b`, `None` if `b`
/// holds only part of it.
fn header_len(b: &[u8]) -> Result<Option<usize>> {
    if b.len() < 10 {
        if b.len() >= 2 && b[..2] != [0x1f, 0x8b] {
            return Err(corrupt("not in gzip format"));
        }
        return Ok(None);
    }
    if b[..2] != [0x1f, 0x8b] {
        return Err(corrupt("not in gzip format"));
    }
    if b[2] != 8 {
        return Err(corrupt(&format!("unknown compression method {}", b[2])));
    }
    let flags = b[3];
    if flags & 0xe0 != 0 {
        return Err(corrupt("reserved header flags are set"));
    }
    let mut at = 10;
    if flags & 4 != 0 {
        let Some(x) = b.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + u16::from_le_bytes([x[0], x[1]]) as usize;
    }
    for flag in [8, 16] {
        if flags & flag != 0 {
            match b.get(at..).and_then(|r| r.iter().position(|&c| c == 0)) {
                Some(nul) => at += nul + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & 2 != 0 {
        at += 2;
    }
    Ok((at <= b.len()).then_some(at))
}

impl GzDecoder {
    fn new() -> Self {
        GzDecoder {
            state: State::Header { first: true },
            inflate: Decompress::new(false),
            crc: Crc::new(),
            pending: Vec::new(),
            out: vec![0; OUT_CHUNK],
        }
    }

    /// Has the last member ended (the rest of the file is ignored)?
    fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode the next piece of the file, handing the data to `emit`.
    fn feed(&mut self, input: &[u8], emit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.pending.extend_from_slice(input);
        let mut pos = 0;
        let r = self.run(&mut pos, emit);
        self.pending.drain(..pos);
        r
    }

    fn run(&mut self, pos: &mut usize, emit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        loop {
            let buf = &self.pending[*pos..];
            match self.state {
                State::Header { .. } => match header_len(buf)? {
                    Some(n) => {
                        *pos += n;
                        self.inflate.reset(false);
                        self.crc.reset();
                        self.state = State::Body;
                    }
                    None if buf.len() > MAX_HEADER => {
                        return Err(corrupt("the header is too long"));
                    }
                    None => return Ok(()),
                },
                State::Body => {
                    let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
                    let status = self
                        .inflate
                        .decompress(buf, &mut self.out, FlushDecompress::None)
                        .map_err(|e| corrupt(&format!("invalid compressed data: {e}")))?;
                    let used = (self.inflate.total_in() - in0) as usize;
                    let made = (self.inflate.total_out() - out0) as usize;
                    *pos += used;
                    if made > 0 {
                        self.crc.update(&self.out[..made]);
                        emit(&self.out[..made])?;
                    }
                    if status == Status::StreamEnd {
                        self.state = State::Trailer;
                    } else if used == 0 && made == 0 {
                        return Ok(());
                    }
                }
                State::Trailer => {
                    if buf.len() < 8 {
                        return Ok(());
                    }
                    let crc = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    if crc != self.crc.sum() {
                        return Err(corrupt("invalid compressed data: crc error"));
                    }
                    if len != self.inflate.total_out() as u32 {
                        return Err(corrupt("invalid compressed data: length error"));
                    }
                    *pos += 8;
                    self.state = State::Between;
                }
                State::Between => {
                    if buf.len() < 2 {
                        return Ok(());
                    }
                    self.state = if buf[..2] == [0x1f, 0x8b] {
                        State::Header { first: false }
                    } else {
                        State::Done
                    };
                }
                State::Done => {
                    *pos = self.pending.len();
                    return Ok(());
                }
            }
        }
    }

    /// The end of the file: it must not be in the middle of a member.
    fn finish(&self) -> Result<()> {
        match self.state {
            State::Header { first: true } if self.pending.len() < 2 => {
                Err(corrupt("unexpected end of file (not a gzip file?)"))
            }
            State::Between | State::Done => Ok(()),
            _ => Err(corrupt("unexpected end of file")),
        }
    }
}

struct GzipHandle {
    next: Box<dyn Handle>,
    data: Arc<Decoded>,
    description: Option<String>,
}

#[async_trait]
impl Handle for GzipHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.data.size)
    }
    fn export_description(&self) -> Option<String> {
        self.description.clone()
    }
    fn caps(&self) -> Result<Caps> {
        let below = self.next.caps()?;
        Ok(Caps {
            write: false,
            trim: false,
            zero: false,
            fast_zero: false,
            extents: false,
            fua: Fua::None,
            multi_conn: true,
            cache: Cache::Emulate,
            ..below
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.data.size)
        {
            return Err(Error::einval("gzip: read beyond the end of the export"));
        }
        run_blocking(|| self.data.file.read_exact_at(buf, offset))
            .map_err(|e| Error::io("gzip: reading the temporary file", e))
    }
    async fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eperm("gzip: the export is read-only"))
    }
    async fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eperm("gzip: the export is read-only"))
    }
    async fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eperm("gzip: the export is read-only"))
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        ext.add(offset, count, 0)
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        // The data is in a local file already.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn decode(file: &[u8], piece: usize) -> Result<Vec<u8>> {
        let mut d = GzDecoder::new();
        let mut out = Vec::new();
        for p in file.chunks(piece.max(1)) {
            d.feed(p, &mut |c| {
                out.extend_from_slice(c);
                Ok(())
            })?;
        }
        d.finish()?;
        Ok(out)
    }

    fn sample(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        pattern(&mut v[..n / 2], 0);
        v
    }

    #[test]
    fn gzip_decodes_members_in_any_pieces() {
        let a = sample(300_000);
        let b = b"second member".to_vec();
        let mut file = gz(&a);
        file.extend(gz(&b));
        // Trailing zeroes (padding) are ignored.
        file.extend([0u8; 100]);
        let mut want = a.clone();
        want.extend(&b);
        for piece in [1, 7, 512, 1 << 20] {
            assert_eq!(decode(&file, piece).unwrap(), want, "piece {piece}");
        }
        // A header with a name, a comment, an extra field and a CRC.
        let mut h = vec![
            0x1f,
            0x8b,
            8,
            4 | 8 | 16 | 2,
            0,
            0,
            0,
            0,
            0,
            3,
            3,
            0,
            1,
            2,
            3,
        ];
        h.extend(b"name\0comment\0");
        h.extend([0, 0]);
        h.extend(&gz(b"x")[10..]);
        assert_eq!(decode(&h, 3).unwrap(), b"x");
    }

    #[test]
    fn gzip_corruption_is_an_error() {
        let file = gz(&sample(100_000));
        for bad in [
            file[..file.len() - 1].to_vec(),
            file[..file.len() / 2].to_vec(),
            Vec::new(),
            b"not gzip at all".to_vec(),
            {
                let mut f = file.clone();
                let n = f.len();
                f[n - 6] ^= 1; // CRC
                f
            },
            {
                let mut f = file.clone();
                let n = f.len();
                f[n - 2] ^= 1; // length
                f
            },
        ] {
            assert!(decode(&bad, 4096).is_err(), "{} bytes", bad.len());
        }
    }

    #[tokio::test]
    async fn gzip_serves_the_data_read_only() {
        let data = sample(200_000);
        let mem = Mem::with(gz(&data));
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(h.size().unwrap(), 200_000);
        assert_eq!(read(&*h, 0, 200_000).await, data);
        assert_eq!(read(&*h, 99_999, 3).await, data[99_999..100_002]);
        let caps = h.caps().unwrap();
        assert!(!caps.write && caps.multi_conn && !caps.extents);
        assert!(h.pwrite(&[1], 0, Flags::NONE).await.is_err());
        assert_eq!(extents(&*h, 0, 200_000).await, vec![(0, 200_000, 0)]);
        assert!(mem.opened_readonly.lock().unwrap()[0]);
        // A second connection does not decompress again.
        let reads = mem.log.bytes_read();
        let h2 = s.open(&ctx(2)).await.unwrap();
        assert_eq!(read(&*h2, 0, 10).await, data[..10]);
        assert_eq!(mem.log.bytes_read(), reads);
        // A changed size fails new connections.
        mem.data.lock().unwrap().push(0);
        assert!(s.open(&ctx(3)).await.is_err());
    }

    #[tokio::test]
    async fn gzip_bad_file_fails_each_connection() {
        let mem = Mem::with(b"plain text, not gzip".to_vec());
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        for id in 1..3 {
            let e = s.open(&ctx(id)).await.err().unwrap();
            assert!(e.msg.contains("not in gzip format"), "{}", e.msg);
        }
    }
}
