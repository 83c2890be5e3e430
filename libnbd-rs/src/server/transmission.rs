//! The transmission phase: read requests, check each against what was
//! negotiated, run the valid ones on the layers concurrently (bounded in
//! number and in bytes held), and hand each outcome to the reply writer.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;

use super::reply::{write_reply, ReadData, Reply};
use super::{Close, Negotiated, ServerConfig, Writer};
use crate::backend::{Error, Extents, Flags};
use crate::protocol::{self as p, cmd, cmdflag, errno, tflags};

/// A read buffer pool, so steady-state reads do not allocate.
#[derive(Default)]
pub(super) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        // The bytes are overwritten by the plugin but must be initialised;
        // a recycled buffer keeps its old contents, so only growth is
        // zeroed.
        b.resize(len, 0);
        b
    }
    pub(super) fn put(&self, b: Vec<u8>) {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if free.len() < 16 && b.capacity() <= 8 * 1024 * 1024 {
            free.push(b);
        }
    }
}

/// Check a request and say which error it earns, if any.
pub(super) fn validate(req: &p::Request, neg: &Negotiated) -> Result<(), u32> {
    let f = req.flags;
    let write = neg.flags & tflags::READ_ONLY == 0;
    // With extended headers a write says its payload with PAYLOAD_LEN
    // (the spec's MUST; qemu 10 leaves it out, and a write's payload
    // follows either way, as qemu's server takes it), and no other
    // command takes one; in the compact header the flag does not exist.
    let f = if neg.extended && req.typ == cmd::WRITE {
        f & !cmdflag::PAYLOAD_LEN
    } else {
        f
    };
    let allowed = match req.typ {
        cmd::READ => cmdflag::DF,
        cmd::WRITE | cmd::TRIM => cmdflag::FUA,
        cmd::WRITE_ZEROES => cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmdflag::REQ_ONE,
        cmd::FLUSH | cmd::CACHE => 0,
        _ => return Err(errno::EINVAL),
    };
    if f & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    if f & cmdflag::FUA != 0 && neg.flags & tflags::SEND_FUA == 0 {
        return Err(errno::EINVAL);
    }
    if f & cmdflag::FAST_ZERO != 0 && neg.flags & tflags::SEND_FAST_ZERO == 0 {
        return Err(errno::EINVAL);
    }
    if f & cmdflag::DF != 0 && !neg.structured {
        return Err(errno::EINVAL);
    }
    let needs = |flag: u16| {
        if neg.flags & flag == 0 {
            Err(errno::EINVAL)
        } else {
            Ok(())
        }
    };
    match req.typ {
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if !write => return Err(errno::EPERM),
        cmd::TRIM => needs(tflags::SEND_TRIM)?,
        cmd::WRITE_ZEROES => needs(tflags::SEND_WRITE_ZEROES)?,
        cmd::FLUSH => needs(tflags::SEND_FLUSH)?,
        cmd::CACHE => needs(tflags::SEND_CACHE)?,
        cmd::BLOCK_STATUS if neg.base_allocation.is_none() && neg.contexts.is_empty() => {
            return Err(errno::EINVAL)
        }
        _ => {}
    }
    if req.typ == cmd::FLUSH {
        // Offset and count of flush must be zero, but be lenient as nbdkit is.
        return Ok(());
    }
    if req.count == 0 {
        // As upstream: a zero-length write or zero is out of range (ENOSPC).
        return Err(match req.typ {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        });
    }
    if matches!(req.typ, cmd::READ | cmd::WRITE) && req.count > u64::from(p::MAX_REQUEST_SIZE) {
        return Err(if req.typ == cmd::READ && f & cmdflag::DF != 0 {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        });
    }
    let end = req.offset.checked_add(req.count);
    if end.is_none_or(|e| e > neg.size) {
        return Err(match req.typ {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        });
    }
    Ok(())
}

fn to_flags(req: &p::Request) -> Flags {
    let mut f = Flags::NONE;
    if req.flags & cmdflag::FUA != 0 {
        f = f | Flags::FUA;
    }
    if req.typ == cmd::WRITE_ZEROES && req.flags & cmdflag::NO_HOLE == 0 {
        f = f | Flags::MAY_TRIM;
    }
    if req.flags & cmdflag::REQ_ONE != 0 {
        f = f | Flags::REQ_ONE;
    }
    if req.flags & cmdflag::FAST_ZERO != 0 {
        f = f | Flags::FAST_ZERO;
    }
    f
}

/// Serve requests until the client disconnects or the server shuts down.
pub(super) async fn transmission<R, W>(
    cfg: &Arc<ServerConfig>,
    mut r: BufReader<R>,
    w: Writer<W>,
    neg: Negotiated,
) -> Result<(), Close>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let neg = Arc::new(neg);
    let pool = Arc::new(BufPool::default());
    // Budget in KiB units: bounds the memory held by requests in flight.
    let budget_units = (cfg.max_inflight_bytes / 1024).max(p::MAX_REQUEST_SIZE as usize / 1024);
    let budget = Arc::new(Semaphore::new(budget_units));
    let slots = Arc::new(Semaphore::new(cfg.threads.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let result = loop {
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; p::EXTENDED_REQUEST_LEN];
        let hdr_len = if neg.extended {
            p::EXTENDED_REQUEST_LEN
        } else {
            p::REQUEST_LEN
        };
        tokio::select! {
            r = r.read_exact(&mut hdr[..hdr_len]) => {
                if let Err(e) = r {
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Err(Close::Done)
                    } else {
                        Err(Close::Io(e))
                    };
                }
            }
            _ = cfg.server.shutdown_requested() => break Err(Close::Done),
            _ = neg.disconnect.requested() => break Err(Close::Done),
        }
        let req = if neg.extended {
            p::Request::decode_extended(&hdr)
        } else {
            p::Request::decode(hdr[..p::REQUEST_LEN].try_into().expect("28 bytes"))
        };
        let Some(req) = req else {
            break Err(Close::Protocol(format!(
                "client sent a request with bad magic{}",
                if neg.extended {
                    " (extended headers were negotiated)"
                } else {
                    ""
                }
            )));
        };
        cfg.server.debug(format_args!(
            "{} flags={:#x} offset={} count={}",
            cmd::name(req.typ),
            req.flags,
            req.offset,
            req.count
        ));
        if req.typ == cmd::DISC {
            break Ok(());
        }
        let mut req = req;
        let mut verdict = validate(&req, &neg);
        let mut payload = None;
        let mut filter = None;
        // A payload follows the header: a write's (always: qemu 10 does
        // not say PAYLOAD_LEN on its writes), or with extended headers any
        // command's that says PAYLOAD_LEN (refused, but read past).
        let has_payload =
            req.typ == cmd::WRITE || (neg.extended && req.flags & cmdflag::PAYLOAD_LEN != 0);
        let units = if req.typ == cmd::READ || has_payload {
            req.count.min(u64::from(p::MAX_REQUEST_SIZE)) as usize / 1024 + 1
        } else {
            1
        };
        // This connection's share first, then the server's: a client
        // waits (and is read no further) while either is spent.
        let permit = budget
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .expect("semaphore never closed");
        let total = cfg
            .total_inflight
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .expect("semaphore never closed");
        if has_payload
            && req.typ == cmd::BLOCK_STATUS
            && neg.flags & tflags::BLOCK_STATUS_PAYLOAD != 0
            && req.count <= MAX_STATUS_PAYLOAD
        {
            // NBD_FLAG_BLOCK_STATUS_PAYLOAD: the payload is the effect
            // length and the ids of the contexts to answer for.
            let mut b = vec![0u8; req.count as usize];
            r.read_exact(&mut b).await?;
            match status_payload(&b, &neg) {
                Ok((effect, ids)) => {
                    req.count = effect;
                    req.flags &= !cmdflag::PAYLOAD_LEN;
                    verdict = validate(&req, &neg);
                    filter = Some(ids);
                }
                Err(e) => verdict = Err(e),
            }
        } else if has_payload {
            // The payload follows the header whatever we think of the
            // request; consume it to stay in sync.
            if verdict.is_ok() && req.typ == cmd::WRITE {
                let mut buf = pool.get(req.count as usize);
                r.read_exact(&mut buf).await?;
                payload = Some(buf);
            } else if req.count > 2 * p::MAX_REQUEST_SIZE as u64 {
                // Skipping that much would let a client keep us reading
                // garbage; past twice the limit the connection ends.
                break Err(Close::Protocol(format!(
                    "client sent an invalid {} with a payload of {} bytes, too large to skip",
                    cmd::name(req.typ),
                    req.count
                )));
            } else {
                let mut left = req.count;
                let mut junk = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = left.min(junk.len() as u64) as usize;
                    r.read_exact(&mut junk[..n]).await?;
                    left -= n as u64;
                }
            }
        }
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let (w, neg, pool, server) = (w.clone(), neg.clone(), pool.clone(), cfg.server.clone());
        tasks.spawn(async move {
            let res = match verdict {
                Err(e) => Reply::Invalid(e),
                // A layer that panics fails its request with EIO; the
                // client is answered and the connection goes on.
                Ok(()) => AssertUnwindSafe(run_request(&req, &neg, payload, filter, &pool))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        Reply::Error(Error::eio(format!(
                            "{} request panicked in the plugin or a filter",
                            cmd::name(req.typ)
                        )))
                    }),
            };
            let r = write_reply(&server, &w, &req, &neg, res, &pool).await;
            drop(slot);
            drop(total);
            drop(permit);
            r
        });
    };
    // Let requests in flight finish and reply before closing.
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            cfg.server.debug(format_args!("writing reply: {e}"));
        }
    }
    let _ = w.lock().await.flush().await;
    result
}

/// Run a valid request on the layers.
async fn run_request(
    req: &p::Request,
    neg: &Negotiated,
    payload: Option<Vec<u8>>,
    filter: Option<Vec<u32>>,
    pool: &BufPool,
) -> Reply {
    let h = &*neg.handle;
    let flags = to_flags(req);
    let count = req.count;
    let r = match req.typ {
        cmd::READ => {
            // validate() kept reads within MAX_REQUEST_SIZE.
            match h.pread_shared(req.count as u32, req.offset, flags).await {
                Ok(Some(s)) if s.len() == req.count as usize => {
                    return Reply::Data(ReadData::Shared(s))
                }
                Ok(Some(_)) => return Reply::Error(Error::eio("shared read of the wrong length")),
                Ok(None) => {}
                Err(e) => return Reply::Error(e),
            }
            let mut buf = pool.get(req.count as usize);
            match h.pread(&mut buf, req.offset, flags).await {
                Ok(()) => return Reply::Data(ReadData::Pooled(buf)),
                Err(e) => {
                    pool.put(buf);
                    Err(e)
                }
            }
        }
        cmd::WRITE => {
            let buf = payload.expect("write has payload");
            let r = h.pwrite(&buf, req.offset, flags).await;
            pool.put(buf);
            r
        }
        cmd::FLUSH => h.flush(Flags::NONE).await,
        cmd::TRIM => h.trim(count, req.offset, flags).await,
        cmd::WRITE_ZEROES => h.zero(count, req.offset, flags).await,
        cmd::CACHE => h.cache(count, req.offset, flags).await,
        cmd::BLOCK_STATUS => match block_status(h, neg, count, req.offset, flags, filter).await {
            Ok(replies) => return Reply::Extents(replies),
            Err(e) => Err(e),
        },
        _ => Err(Error::einval("unknown command")),
    };
    match r {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::Error(e),
    }
}

/// Most descriptors in one block status chunk.
const MAX_EXTENTS: usize = 1 << 20;

/// Largest block status payload read (`NBD_FLAG_BLOCK_STATUS_PAYLOAD`):
/// an effect length and 4096 context ids.
const MAX_STATUS_PAYLOAD: u64 = 8 + 4 * 4096;

/// The effect length and context ids of a block status payload: every
/// id one this connection selected, none twice (else EINVAL, as the spec
/// says).
fn status_payload(b: &[u8], neg: &Negotiated) -> Result<(u64, Vec<u32>), u32> {
    if b.len() < 12 || !(b.len() - 8).is_multiple_of(4) {
        return Err(errno::EINVAL);
    }
    let effect = p::be64(&b[0..8]);
    let mut ids: Vec<u32> = Vec::with_capacity((b.len() - 8) / 4);
    for c in b[8..].chunks_exact(4) {
        let id = p::be32(c);
        let known = neg.base_allocation == Some(id) || neg.contexts.iter().any(|(i, _)| *i == id);
        if !known || ids.contains(&id) {
            return Err(errno::EINVAL);
        }
        ids.push(id);
    }
    Ok((effect, ids))
}

/// The extents of every selected meta context, with its id:
/// `base:allocation` from `extents`, the plugin's others from
/// `meta_extents`.
async fn block_status(
    h: &dyn crate::backend::Handle,
    neg: &Negotiated,
    count: u64,
    offset: u64,
    flags: Flags,
    filter: Option<Vec<u32>>,
) -> Result<Vec<(u32, Vec<crate::backend::Extent>)>, Error> {
    let wanted = |id: u32| filter.as_ref().is_none_or(|f| f.contains(&id));
    let mut out = Vec::with_capacity(1 + neg.contexts.len());
    let finish = |ext: Extents, what: &str| {
        let mut list = ext.into_list();
        if list.is_empty() {
            return Err(Error::eio(format!("{what}: no extents returned")));
        }
        if flags.contains(Flags::REQ_ONE) {
            list.truncate(1);
        }
        // The spec's advice: no more than 2^20 descriptors in a chunk
        // (a 64-bit request over a fragmented export could make more);
        // the client asks again from where the reply ends.
        list.truncate(MAX_EXTENTS);
        Ok(list)
    };
    if let Some(id) = neg.base_allocation.filter(|&id| wanted(id)) {
        let mut ext = Extents::new(offset, offset + count);
        h.extents(count, offset, flags, &mut ext).await?;
        out.push((id, finish(ext, "extents")?));
    }
    for (id, name) in neg.contexts.iter().filter(|(id, _)| wanted(*id)) {
        let mut ext = Extents::new(offset, offset + count);
        h.meta_extents(name, count, offset, flags, &mut ext).await?;
        out.push((*id, finish(ext, name)?));
    }
    Ok(out)
}
