//! Writing replies: simple replies (header, then the data of a read),
//! or structured replies (data split into data and hole chunks, block
//! status, errors with a message) once the client negotiated them, with
//! 32-byte extended chunk headers (and `BLOCK_STATUS_EXT`'s 64-bit
//! extents) once it negotiated extended headers.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::transmission::BufPool;
use super::{Negotiated, ServerContext, Writer};
use crate::backend::Error;
use crate::protocol::{self as p, cmd, cmdflag, errno};

/// The outcome of a request, ready to be written.
pub(super) enum Reply {
    /// Success with no payload.
    Ok,
    /// Read data.
    Data(ReadData),
    /// Block status extents, for each meta context id.
    Extents(Vec<(u32, Vec<crate::backend::Extent>)>),
    /// The request broke the protocol's rules (bad flags, past the end,
    /// not allowed on this export): this error, told to the client but
    /// only logged with `-v`, as nbdkit does.
    Invalid(u32),
    /// The layers failed the request: logged, and told to the client.
    Error(Error),
}

/// Read data: a pooled buffer the plugin filled, or data a layer held.
pub(super) enum ReadData {
    Pooled(Vec<u8>),
    Shared(crate::backend::SharedData),
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Pooled(b) => b,
            ReadData::Shared(s) => s,
        }
    }
}

impl ReadData {
    /// Done with: a pooled buffer goes back to the pool.
    pub(super) fn recycle(self, pool: &BufPool) {
        if let ReadData::Pooled(b) = self {
            pool.put(b);
        }
    }
}
/// The error a client gets, as nbdkit sends it: ENOTSUP only to a fast
/// zero (the answer that tells it to write zeroes itself) and EOVERFLOW
/// only to a read with DF; both are EINVAL to anything else.
pub(super) fn wire_errno(e: u32, flags: u16) -> u32 {
    match e {
        errno::ENOTSUP if flags & cmdflag::FAST_ZERO == 0 => errno::EINVAL,
        errno::EOVERFLOW if flags & cmdflag::DF == 0 => errno::EINVAL,
        e => e,
    }
}

/// Write the reply to `req`: simple or structured as negotiated.
pub(super) async fn write_reply<W: AsyncWrite + Unpin>(
    server: &ServerContext,
    w: &Writer<W>,
    req: &p::Request,
    neg: &Negotiated,
    res: Reply,
    pool: &BufPool,
) -> std::io::Result<()> {
    if neg.disconnect.is_requested() {
        // A layer dropped the connection: no more replies.
        return Ok(());
    }
    let mut res = res;
    if let Reply::Error(e) = &mut res {
        e.errno = wire_errno(e.errno, req.flags);
    }
    match &res {
        Reply::Error(e) => {
            crate::elog!("nbdkit: {}: {}", cmd::name(req.typ).to_lowercase(), e.msg)
        }
        Reply::Invalid(code) => server.debug(format_args!(
            "{}: invalid request: {}",
            cmd::name(req.typ),
            errno::describe(*code)
        )),
        _ => {}
    }
    let mut w = w.lock().await;
    let c = req.cookie;
    if !neg.structured {
        match res {
            Reply::Error(Error { errno: code, .. }) | Reply::Invalid(code) => {
                w.write_all(&p::simple_reply(c, code)).await?
            }
            Reply::Data(buf) => {
                write_two(&mut *w, &p::simple_reply(c, 0), &buf).await?;
                buf.recycle(pool);
            }
            Reply::Ok | Reply::Extents(_) => w.write_all(&p::simple_reply(c, 0)).await?,
        }
        return w.flush().await;
    }
    use p::reply as r;
    let hdr = Header {
        extended: neg.extended,
        cookie: c,
        offset: req.offset,
    };
    match res {
        Reply::Ok => {
            w.write_all(&hdr.make(r::FLAG_DONE, r::TYPE_NONE, 0))
                .await?
        }
        Reply::Data(buf) if req.flags & cmdflag::DF != 0 => {
            write_data_chunks(&mut *w, hdr, &buf, &[]).await?;
            buf.recycle(pool);
        }
        Reply::Data(buf) => {
            let runs = hole_runs(&buf, req.offset);
            write_data_chunks(&mut *w, hdr, &buf, &runs).await?;
            buf.recycle(pool);
        }
        Reply::Extents(contexts) => {
            let last = contexts.len().saturating_sub(1);
            for (i, (id, list)) in contexts.iter().enumerate() {
                let (typ, pl) = if hdr.extended {
                    // 64-bit lengths and status, with a descriptor count.
                    let mut pl = Vec::with_capacity(8 + 16 * list.len());
                    pl.extend_from_slice(&id.to_be_bytes());
                    pl.extend_from_slice(&(list.len() as u32).to_be_bytes());
                    for e in list {
                        pl.extend_from_slice(&e.length.to_be_bytes());
                        pl.extend_from_slice(&u64::from(e.flags).to_be_bytes());
                    }
                    (r::TYPE_BLOCK_STATUS_EXT, pl)
                } else {
                    // The request was under 4G and the extents are clipped
                    // to it: every length fits in 32 bits.
                    let mut pl = Vec::with_capacity(4 + 8 * list.len());
                    pl.extend_from_slice(&id.to_be_bytes());
                    for e in list {
                        pl.extend_from_slice(&(e.length.min(u32::MAX as u64) as u32).to_be_bytes());
                        pl.extend_from_slice(&e.flags.to_be_bytes());
                    }
                    (r::TYPE_BLOCK_STATUS, pl)
                };
                let done = if i == last { r::FLAG_DONE } else { 0 };
                w.write_all(&hdr.make(done, typ, pl.len() as u32)).await?;
                w.write_all(&pl).await?;
            }
        }
        Reply::Error(Error { errno: code, msg }) => {
            write_error_chunk(&mut *w, hdr, code, &msg).await?
        }
        Reply::Invalid(code) => write_error_chunk(&mut *w, hdr, code, "invalid request").await?,
    }
    w.flush().await
}

/// How a reply's chunk headers are made: structured (20 bytes) or, with
/// extended headers, 32 bytes that repeat the request's offset.
#[derive(Clone, Copy)]
pub(super) struct Header {
    pub(super) extended: bool,
    pub(super) cookie: u64,
    /// The request's offset (extended headers echo it).
    pub(super) offset: u64,
}

/// A chunk header's bytes.
pub(super) struct HeaderBytes {
    b: [u8; p::EXTENDED_REPLY_LEN],
    n: usize,
}

impl std::ops::Deref for HeaderBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.b[..self.n]
    }
}

impl Header {
    /// The header of a chunk with a `len` byte payload.
    pub(super) fn make(&self, flags: u16, typ: u16, len: u32) -> HeaderBytes {
        let mut b = [0u8; p::EXTENDED_REPLY_LEN];
        let n = if self.extended {
            b.copy_from_slice(&p::extended_reply(
                self.cookie,
                flags,
                typ,
                self.offset,
                u64::from(len),
            ));
            p::EXTENDED_REPLY_LEN
        } else {
            b[..p::STRUCTURED_REPLY_LEN].copy_from_slice(&p::structured_reply(
                self.cookie,
                flags,
                typ,
                len,
            ));
            p::STRUCTURED_REPLY_LEN
        };
        HeaderBytes { b, n }
    }
}

/// Write a structured error reply: the error and its message (cut to
/// 1 KiB, well within what clients accept).
async fn write_error_chunk<W: AsyncWrite + Unpin>(
    w: &mut W,
    hdr: Header,
    code: u32,
    msg: &str,
) -> std::io::Result<()> {
    use p::reply as r;
    let msg = msg.as_bytes();
    let msg = &msg[..msg.len().min(1024)];
    let mut pl = Vec::with_capacity(6 + msg.len());
    pl.extend_from_slice(&code.to_be_bytes());
    pl.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    pl.extend_from_slice(msg);
    w.write_all(&hdr.make(r::FLAG_DONE, r::TYPE_ERROR, pl.len() as u32))
        .await?;
    w.write_all(&pl).await
}

/// Zero runs shorter than this travel as data: a hole chunk costs a
/// 32-byte header and the client a `memset`, data costs a copy on each
/// side of the socket.
pub(super) const HOLE_MIN: usize = 64 * 1024;

/// The ranges of a read reply's data that are zeroes worth sending as
/// holes: whole 4 KiB blocks of the device, in runs of at least
/// [`HOLE_MIN`] bytes. Mostly-data buffers cost a look at the first bytes
/// of each block; zeroes found save copying them through the socket
/// (a decompressed disk image is often a third free space).
pub(super) fn hole_runs(buf: &[u8], offset: u64) -> Vec<std::ops::Range<usize>> {
    if buf.len() < HOLE_MIN {
        return Vec::new();
    }
    crate::zeroes::runs(buf, offset, 4096)
        .into_iter()
        .filter(|r| r.zero && r.range.len() >= HOLE_MIN)
        .map(|r| r.range)
        .collect()
}

/// Write a structured read reply: `buf` (the data at `offset`) as
/// `OFFSET_DATA` chunks, except the ranges in `holes` (sorted, disjoint)
/// which go as `OFFSET_HOLE` chunks; the last chunk carries `DONE`. All of
/// it in as few `writev` calls as the socket allows.
pub(super) async fn write_data_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    hdr: Header,
    buf: &[u8],
    holes: &[std::ops::Range<usize>],
) -> std::io::Result<()> {
    use p::reply as r;
    let offset = hdr.offset;
    // (range, is hole) in order.
    let mut parts = Vec::with_capacity(2 * holes.len() + 1);
    let mut at = 0;
    for h in holes {
        if h.start > at {
            parts.push((at..h.start, false));
        }
        parts.push((h.clone(), true));
        at = h.end;
    }
    if at < buf.len() || parts.is_empty() {
        parts.push((at..buf.len(), false));
    }
    const HDR: usize = p::EXTENDED_REPLY_LEN + 12;
    let mut headers = vec![[0u8; HDR]; parts.len()];
    let mut lens = Vec::with_capacity(parts.len());
    for (i, ((range, hole), h)) in parts.iter().zip(headers.iter_mut()).enumerate() {
        let flags = if i + 1 == parts.len() {
            r::FLAG_DONE
        } else {
            0
        };
        let (typ, len) = match hole {
            true => (r::TYPE_OFFSET_HOLE, 12),
            false => (r::TYPE_OFFSET_DATA, 8 + range.len() as u32),
        };
        let head = hdr.make(flags, typ, len);
        let n = head.len();
        h[..n].copy_from_slice(&head);
        h[n..][..8].copy_from_slice(&(offset + range.start as u64).to_be_bytes());
        h[n + 8..n + 12].copy_from_slice(&(range.len() as u32).to_be_bytes());
        lens.push(if *hole { n + 12 } else { n + 8 });
    }
    let mut slices = Vec::with_capacity(2 * parts.len());
    for (((range, hole), h), n) in parts.iter().zip(&headers).zip(lens) {
        slices.push(std::io::IoSlice::new(&h[..n]));
        if !hole {
            slices.push(std::io::IoSlice::new(&buf[range.clone()]));
        }
    }
    write_all_vectored(w, &mut slices).await
}

/// Write a reply header and its data, in one `writev` when the socket
/// takes it all (large data bypasses the `BufWriter`'s buffer).
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    write_all_vectored(w, &mut [std::io::IoSlice::new(a), std::io::IoSlice::new(b)]).await
}

/// Write all of `bufs`, as many of them per `writev` as the system takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(&bufs[..bufs.len().min(1024)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}
