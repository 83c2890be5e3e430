//! The server in process, over `tokio::io::duplex`: the bytes of option
//! replies, request checks, and simple against structured replies.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::transmission::validate;
use super::*;
use crate::backend::{Caps, Flags, OpenContext, Plugin, Result};
use crate::protocol::{cmd, cmdflag, errno, opt, rep, reply, tflags, Request};

/// A read-only export of `size` bytes: the first half reads as 0xAB, the
/// rest as zeroes (so a large read has a hole to find).
struct Half {
    size: u64,
}

struct HalfHandle {
    size: u64,
}

#[async_trait]
impl Plugin for Half {
    async fn open(&self, _: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(HalfHandle { size: self.size }))
    }
}

#[async_trait]
impl Handle for HalfHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            flush: true,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _: Flags) -> Result<()> {
        assert_ne!(offset, PANIC_AT, "a plugin bug");
        for (i, b) in buf.iter_mut().enumerate() {
            *b = if offset + (i as u64) < self.size / 2 {
                0xAB
            } else {
                0
            };
        }
        Ok(())
    }
}

const SIZE: u64 = 1 << 20;
/// A read here panics in the plugin.
const PANIC_AT: u64 = 12345;

fn config() -> ServerConfig {
    ServerConfig::new(Stack {
        filters: Vec::new(),
        plugin: Arc::new(Half { size: SIZE }),
    })
}

/// A client's end of a server serving `cfg`, past the greeting and the
/// client's flags (fixed newstyle, no zeroes).
async fn connect(cfg: ServerConfig) -> DuplexStream {
    let (mut client, server) = tokio::io::duplex(4 << 20);
    let (r, w) = tokio::io::split(server);
    tokio::spawn(serve(Arc::new(cfg), r, w, Peer::default()));
    let mut hello = [0u8; 18];
    client.read_exact(&mut hello).await.unwrap();
    assert_eq!(p::be64(&hello[..8]), p::NBDMAGIC);
    assert_eq!(p::be64(&hello[8..16]), p::IHAVEOPT);
    assert_eq!(
        p::be16(&hello[16..]),
        p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES
    );
    client
        .write_all(&(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    client
}

async fn send_option(c: &mut DuplexStream, option: u32, data: &[u8]) {
    c.write_all(&p::option_header(option, data.len() as u32))
        .await
        .unwrap();
    c.write_all(data).await.unwrap();
}

/// One option reply: its type and payload.
async fn option_reply(c: &mut DuplexStream, option: u32) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).await.unwrap();
    let r = p::OptionReply::decode(&h).expect("option reply magic");
    assert_eq!(r.option, option);
    let mut data = vec![0u8; r.len as usize];
    c.read_exact(&mut data).await.unwrap();
    (r.reply, data)
}

/// GO with no info requests; the transmission flags.
async fn go(c: &mut DuplexStream) -> u16 {
    send_option(c, opt::GO, &[0, 0, 0, 0, 0, 0]).await;
    let mut flags = None;
    loop {
        match option_reply(c, opt::GO).await {
            (rep::INFO, d) if p::be16(&d) == 0 => {
                assert_eq!(p::be64(&d[2..10]), SIZE);
                flags = Some(p::be16(&d[10..]));
            }
            (rep::INFO, _) => {}
            (rep::ACK, _) => return flags.expect("NBD_INFO_EXPORT before ACK"),
            (r, d) => panic!("GO: reply {r:#x} {:?}", String::from_utf8_lossy(&d)),
        }
    }
}

async fn request(c: &mut DuplexStream, typ: u16, flags: u16, offset: u64, count: u32) {
    let req = Request {
        flags,
        typ,
        cookie: 0x1234,
        offset,
        count: count.into(),
    };
    c.write_all(&req.encode()).await.unwrap();
}

/// A simple reply's error.
async fn simple_reply(c: &mut DuplexStream) -> u32 {
    let mut h = [0u8; p::SIMPLE_REPLY_LEN];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(p::be32(&h), p::SIMPLE_REPLY_MAGIC);
    assert_eq!(p::be64(&h[8..]), 0x1234);
    p::be32(&h[4..])
}

/// One structured reply chunk: flags, type, payload.
async fn chunk(c: &mut DuplexStream) -> (u16, u16, Vec<u8>) {
    let mut h = [0u8; p::STRUCTURED_REPLY_LEN];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(p::be32(&h), p::STRUCTURED_REPLY_MAGIC);
    assert_eq!(p::be64(&h[8..]), 0x1234);
    let mut data = vec![0u8; p::be32(&h[16..]) as usize];
    c.read_exact(&mut data).await.unwrap();
    (p::be16(&h[4..]), p::be16(&h[6..]), data)
}

#[tokio::test]
async fn options_are_answered_as_the_protocol_says() {
    let mut c = connect(config()).await;
    // Unknown options: unsupported; STARTTLS without TLS: policy (as upstream).
    send_option(&mut c, 99, b"junk").await;
    assert_eq!(option_reply(&mut c, 99).await.0, rep::ERR_UNSUP);
    send_option(&mut c, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut c, opt::STARTTLS).await.0, rep::ERR_POLICY);
    // Payloads where none belongs: invalid.
    send_option(&mut c, opt::LIST, b"x").await;
    assert_eq!(option_reply(&mut c, opt::LIST).await.0, rep::ERR_INVALID);
    send_option(&mut c, opt::STRUCTURED_REPLY, b"x").await;
    let (r, _) = option_reply(&mut c, opt::STRUCTURED_REPLY).await;
    assert_eq!(r, rep::ERR_INVALID);
    // Setting meta contexts needs structured replies first; listing them
    // does not (as upstream).
    let mut q = Vec::new();
    p::put_string32(&mut q, "");
    q.extend_from_slice(&0u32.to_be_bytes());
    send_option(&mut c, opt::SET_META_CONTEXT, &q).await;
    let (r, _) = option_reply(&mut c, opt::SET_META_CONTEXT).await;
    assert_eq!(r, rep::ERR_INVALID);
    send_option(&mut c, opt::LIST_META_CONTEXT, &q).await;
    let (r, d) = option_reply(&mut c, opt::LIST_META_CONTEXT).await;
    assert_eq!(r, rep::META_CONTEXT);
    assert_eq!(&d[4..], p::CONTEXT_BASE_ALLOCATION.as_bytes());
    assert_eq!(
        option_reply(&mut c, opt::LIST_META_CONTEXT).await.0,
        rep::ACK
    );
    // LIST: one export (the default, ""), then ACK.
    send_option(&mut c, opt::LIST, &[]).await;
    let (r, d) = option_reply(&mut c, opt::LIST).await;
    assert_eq!((r, d), (rep::SERVER, vec![0, 0, 0, 0]));
    assert_eq!(option_reply(&mut c, opt::LIST).await.0, rep::ACK);
    // A truncated GO: invalid, and negotiation goes on.
    send_option(&mut c, opt::GO, &[0, 0]).await;
    assert_eq!(option_reply(&mut c, opt::GO).await.0, rep::ERR_INVALID);
    send_option(&mut c, opt::STRUCTURED_REPLY, &[]).await;
    let (r, _) = option_reply(&mut c, opt::STRUCTURED_REPLY).await;
    assert_eq!(r, rep::ACK);
    send_option(&mut c, opt::LIST_META_CONTEXT, &q).await;
    let (r, d) = option_reply(&mut c, opt::LIST_META_CONTEXT).await;
    assert_eq!(r, rep::META_CONTEXT);
    assert_eq!(&d[4..], p::CONTEXT_BASE_ALLOCATION.as_bytes());
    assert_eq!(
        option_reply(&mut c, opt::LIST_META_CONTEXT).await.0,
        rep::ACK
    );
    let flags = go(&mut c).await;
    assert_ne!(flags & tflags::READ_ONLY, 0);
    // In transmission, NBD_CMD_DISC ends the connection cleanly.
    request(&mut c, cmd::DISC, 0, 0, 0).await;
    assert_eq!(c.read(&mut [0u8; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn abort_gets_an_ack_and_the_end() {
    let mut c = connect(config()).await;
    send_option(&mut c, opt::ABORT, &[]).await;
    assert_eq!(option_reply(&mut c, opt::ABORT).await.0, rep::ACK);
    assert_eq!(c.read(&mut [0u8; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn bad_option_magic_closes_the_connection() {
    let mut c = connect(config()).await;
    c.write_all(&[0u8; 16]).await.unwrap();
    assert_eq!(c.read(&mut [0u8; 1]).await.unwrap(), 0);
}

fn negotiated(flags: u16, structured: bool) -> Negotiated {
    Negotiated {
        handle: Arc::new(HalfHandle { size: SIZE }),
        flags,
        size: SIZE,
        structured,
        extended: false,
        base_allocation: None,
        contexts: Vec::new(),
        export_name: String::new(),
        disconnect: Default::default(),
    }
}

fn req(typ: u16, flags: u16, offset: u64, count: u32) -> Request {
    Request {
        flags,
        typ,
        cookie: 1,
        offset,
        count: count.into(),
    }
}

#[test]
fn requests_are_checked_against_the_negotiation() {
    let ro = negotiated(tflags::HAS_FLAGS | tflags::READ_ONLY, false);
    let sr = negotiated(tflags::HAS_FLAGS | tflags::SEND_FLUSH, true);
    assert_eq!(validate(&req(cmd::READ, 0, 0, 512), &ro), Ok(()));
    // Past the end, overflowing, empty.
    assert_eq!(
        validate(&req(cmd::READ, 0, SIZE - 1, 2), &ro),
        Err(errno::EINVAL)
    );
    assert_eq!(
        validate(&req(cmd::READ, 0, u64::MAX, 2), &ro),
        Err(errno::EINVAL)
    );
    assert_eq!(validate(&req(cmd::READ, 0, 0, 0), &ro), Err(errno::EINVAL));
    // Writes to a read-only export; past the end of a writable one.
    assert_eq!(validate(&req(cmd::WRITE, 0, 0, 1), &ro), Err(errno::EPERM));
    assert_eq!(
        validate(&req(cmd::WRITE, 0, SIZE, 1), &sr),
        Err(errno::ENOSPC)
    );
    // Flags: DF needs structured replies, FUA needs SEND_FUA, unknown
    // flags and commands are invalid; trim needs SEND_TRIM.
    assert_eq!(
        validate(&req(cmd::READ, cmdflag::DF, 0, 1), &ro),
        Err(errno::EINVAL)
    );
    assert_eq!(validate(&req(cmd::READ, cmdflag::DF, 0, 1), &sr), Ok(()));
    assert_eq!(
        validate(&req(cmd::WRITE, cmdflag::FUA, 0, 1), &sr),
        Err(errno::EINVAL)
    );
    assert_eq!(
        validate(&req(cmd::READ, 0x8000, 0, 1), &sr),
        Err(errno::EINVAL)
    );
    assert_eq!(validate(&req(77, 0, 0, 1), &sr), Err(errno::EINVAL));
    assert_eq!(validate(&req(cmd::TRIM, 0, 0, 1), &sr), Err(errno::EINVAL));
    assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &sr), Ok(()));
    // Too large a read: EOVERFLOW with DF, else EINVAL.
    let big = p::MAX_REQUEST_SIZE + 1;
    assert_eq!(
        validate(&req(cmd::READ, cmdflag::DF, 0, big), &sr),
        Err(errno::EOVERFLOW)
    );
    assert_eq!(
        validate(&req(cmd::READ, 0, 0, big), &sr),
        Err(errno::EINVAL)
    );
}

#[test]
fn extended_requests_are_checked() {
    let mut eh = negotiated(
        tflags::HAS_FLAGS | tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES,
        true,
    );
    eh.extended = true;
    eh.size = 8 << 40;
    let mut r = req(cmd::WRITE_ZEROES, 0, 0, 0);
    // 64-bit effect lengths: a 4 TiB zero or trim is one request.
    r.count = 4 << 40;
    assert_eq!(validate(&r, &eh), Ok(()));
    r.typ = cmd::TRIM;
    assert_eq!(validate(&r, &eh), Ok(()));
    r.count = (8 << 40) + 512;
    assert_eq!(validate(&r, &eh), Err(errno::EINVAL));
    // A write should say PAYLOAD_LEN (qemu's do not); nothing else may.
    assert_eq!(validate(&req(cmd::WRITE, 0, 0, 512), &eh), Ok(()));
    assert_eq!(
        validate(&req(cmd::WRITE, cmdflag::PAYLOAD_LEN, 0, 512), &eh),
        Ok(())
    );
    assert_eq!(
        validate(&req(cmd::TRIM, cmdflag::PAYLOAD_LEN, 0, 512), &eh),
        Err(errno::EINVAL)
    );
    // Reads and writes stay within the payload limit.
    let mut big = req(cmd::READ, 0, 0, 0);
    big.count = 1 << 33;
    assert_eq!(validate(&big, &eh), Err(errno::EINVAL));
    // Without extended headers PAYLOAD_LEN is an unknown flag.
    let sr = negotiated(tflags::HAS_FLAGS, true);
    assert_eq!(
        validate(&req(cmd::WRITE, cmdflag::PAYLOAD_LEN, 0, 1), &sr),
        Err(errno::EINVAL)
    );
}

#[tokio::test]
async fn simple_replies_without_structured_replies() {
    let mut c = connect(config()).await;
    let flags = go(&mut c).await;
    assert_eq!(
        flags & tflags::SEND_DF,
        0,
        "SEND_DF without structured replies"
    );
    request(&mut c, cmd::READ, 0, SIZE / 2 - 2, 4).await;
    assert_eq!(simple_reply(&mut c).await, 0);
    let mut data = [9u8; 4];
    c.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [0xAB, 0xAB, 0, 0]);
    // An invalid request: the error alone, no data follows.
    request(&mut c, cmd::READ, 0, SIZE, 4).await;
    assert_eq!(simple_reply(&mut c).await, errno::EINVAL);
    // A write to a read-only export: its payload is skipped, EPERM.
    request(&mut c, cmd::WRITE, 0, 0, 3).await;
    c.write_all(b"abc").await.unwrap();
    assert_eq!(simple_reply(&mut c).await, errno::EPERM);
    request(&mut c, cmd::CACHE, 0, 0, 1).await;
    assert_eq!(simple_reply(&mut c).await, errno::EINVAL);
    // A plugin that panics: EIO, and the connection goes on.
    request(&mut c, cmd::READ, 0, PANIC_AT, 4).await;
    assert_eq!(simple_reply(&mut c).await, errno::EIO);
    request(&mut c, cmd::READ, 0, 0, 1).await;
    assert_eq!(simple_reply(&mut c).await, 0);
    c.read_exact(&mut data[..1]).await.unwrap();
    assert_eq!(data[0], 0xAB);
    request(&mut c, cmd::FLUSH, 0, 0, 0).await;
    assert_eq!(simple_reply(&mut c).await, 0);
}

#[tokio::test]
async fn an_oversized_option_is_refused_and_negotiation_goes_on() {
    let mut c = connect(config()).await;
    // A 1 MB export name in GO: NBD_REP_ERR_TOO_BIG, then a normal GO.
    let mut data = vec![0u8; 4 + (1 << 20) + 2];
    data[..4].copy_from_slice(&(1u32 << 20).to_be_bytes());
    send_option(&mut c, opt::GO, &data).await;
    assert_eq!(option_reply(&mut c, opt::GO).await.0, rep::ERR_TOO_BIG);
    go(&mut c).await;
}

#[tokio::test]
async fn an_invalid_write_too_large_to_skip_ends_the_connection() {
    let mut c = connect(config()).await;
    go(&mut c).await;
    request(&mut c, cmd::WRITE, 0, 0, u32::MAX).await;
    // No reply: the connection is closed rather than 4 GiB read.
    assert_eq!(c.read(&mut [0u8; 16]).await.unwrap(), 0);
}

#[tokio::test]
async fn structured_replies_split_data_and_holes() {
    let mut c = connect(config()).await;
    send_option(&mut c, opt::STRUCTURED_REPLY, &[]).await;
    option_reply(&mut c, opt::STRUCTURED_REPLY).await;
    assert_ne!(go(&mut c).await & tflags::SEND_DF, 0);
    // 128 KiB of data then 128 KiB of zeroes: a data chunk and a hole.
    let at = SIZE / 2 - (128 << 10);
    request(&mut c, cmd::READ, 0, at, 256 << 10).await;
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!((flags, typ), (0, reply::TYPE_OFFSET_DATA));
    assert_eq!(p::be64(&d), at);
    assert_eq!(d.len(), 8 + (128 << 10));
    assert!(d[8..].iter().all(|&b| b == 0xAB));
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!((flags, typ), (reply::FLAG_DONE, reply::TYPE_OFFSET_HOLE));
    assert_eq!(p::be64(&d), SIZE / 2);
    assert_eq!(p::be32(&d[8..]), 128 << 10);
    // With DF the same read is one data chunk.
    request(&mut c, cmd::READ, cmdflag::DF, at, 256 << 10).await;
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!((flags, typ), (reply::FLAG_DONE, reply::TYPE_OFFSET_DATA));
    assert_eq!(d.len(), 8 + (256 << 10));
    // An invalid request: an error chunk with errno and message.
    request(&mut c, cmd::READ, 0, SIZE, 1).await;
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!((flags, typ), (reply::FLAG_DONE, reply::TYPE_ERROR));
    assert_eq!(p::be32(&d), errno::EINVAL);
    assert_eq!(&d[6..], b"invalid request");
    // Success without data: one NONE chunk.
    request(&mut c, cmd::FLUSH, 0, 0, 0).await;
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!(
        (flags, typ, d.len()),
        (reply::FLAG_DONE, reply::TYPE_NONE, 0)
    );
}

#[tokio::test]
async fn shutdown_ends_transmission() {
    let cfg = config();
    let server = cfg.server.clone();
    let mut c = connect(cfg).await;
    go(&mut c).await;
    assert_eq!(server.connections(), 1);
    server.request_shutdown();
    assert_eq!(c.read(&mut [0u8; 1]).await.unwrap(), 0);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(server.connections(), 0);
}

#[test]
fn errors_on_the_wire_as_nbdkit_sends_them() {
    use super::reply::wire_errno;
    use crate::protocol::{cmdflag, errno};
    assert_eq!(wire_errno(errno::ENOTSUP, 0), errno::EINVAL);
    assert_eq!(
        wire_errno(errno::ENOTSUP, cmdflag::FAST_ZERO),
        errno::ENOTSUP
    );
    assert_eq!(wire_errno(errno::EOVERFLOW, 0), errno::EINVAL);
    assert_eq!(wire_errno(errno::EOVERFLOW, cmdflag::DF), errno::EOVERFLOW);
    assert_eq!(wire_errno(errno::ENOSPC, 0), errno::ENOSPC);
    assert_eq!(wire_errno(errno::EPERM, cmdflag::FUA), errno::EPERM);
}

/// `Half` with a meta context of its own, `test:half`: status 1 over the
/// first half, 0 over the rest.
struct HalfWithContext;

#[async_trait]
impl Plugin for HalfWithContext {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        assert_eq!(ctx.meta_contexts, ["test:half"]);
        Ok(Box::new(HalfCtxHandle(HalfHandle { size: SIZE })))
    }
    async fn meta_contexts(&self, _: &str, queries: &[String], list: bool) -> Result<Vec<String>> {
        let name = "test:half";
        let all = list && queries.is_empty();
        let asked = queries
            .iter()
            .any(|q| crate::backend::meta_context_matches(name, q, list));
        Ok(if all || asked {
            vec![name.to_string()]
        } else {
            Vec::new()
        })
    }
}

struct HalfCtxHandle(HalfHandle);

#[async_trait]
impl Handle for HalfCtxHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&self.0)
    }
    async fn meta_extents(
        &self,
        context: &str,
        _: u64,
        _: u64,
        _: Flags,
        ext: &mut crate::backend::Extents,
    ) -> Result<()> {
        assert_eq!(context, "test:half");
        ext.add(0, SIZE / 2, 1)?;
        ext.add(SIZE / 2, SIZE / 2, 0)
    }
}

/// Meta context replies up to the ACK: (id, name).
async fn meta_replies(c: &mut DuplexStream, option: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    loop {
        match option_reply(c, option).await {
            (rep::META_CONTEXT, d) => {
                out.push((p::be32(&d), String::from_utf8(d[4..].to_vec()).unwrap()))
            }
            (rep::ACK, _) => return out,
            (r, _) => panic!("reply {r:#x}"),
        }
    }
}

#[tokio::test]
async fn a_plugins_own_meta_context_is_listed_set_and_answered() {
    let mut c = connect(ServerConfig::new(Stack {
        filters: Vec::new(),
        plugin: Arc::new(HalfWithContext),
    }))
    .await;
    send_option(&mut c, opt::STRUCTURED_REPLY, &[]).await;
    option_reply(&mut c, opt::STRUCTURED_REPLY).await;
    let query = |names: &[&str]| {
        let mut q = Vec::new();
        p::put_string32(&mut q, "");
        q.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for n in names {
            p::put_string32(&mut q, n);
        }
        q
    };
    // Listing all, by namespace, and a name nobody has.
    send_option(&mut c, opt::LIST_META_CONTEXT, &query(&[])).await;
    let all = meta_replies(&mut c, opt::LIST_META_CONTEXT).await;
    let names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["base:allocation", "test:half"]);
    send_option(&mut c, opt::LIST_META_CONTEXT, &query(&["test:"])).await;
    assert_eq!(meta_replies(&mut c, opt::LIST_META_CONTEXT).await.len(), 1);
    send_option(&mut c, opt::SET_META_CONTEXT, &query(&["test:"])).await;
    assert!(meta_replies(&mut c, opt::SET_META_CONTEXT).await.is_empty());
    send_option(&mut c, opt::LIST_META_CONTEXT, &query(&["other:x"])).await;
    assert!(meta_replies(&mut c, opt::LIST_META_CONTEXT)
        .await
        .is_empty());
    // Select both: two ids; block status answers one chunk for each,
    // DONE on the last.
    send_option(
        &mut c,
        opt::SET_META_CONTEXT,
        &query(&["base:allocation", "test:half"]),
    )
    .await;
    let set = meta_replies(&mut c, opt::SET_META_CONTEXT).await;
    assert_eq!(set.len(), 2);
    go(&mut c).await;
    request(&mut c, cmd::BLOCK_STATUS, 0, 0, SIZE as u32).await;
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!((flags, typ), (0, reply::TYPE_BLOCK_STATUS));
    assert_eq!(p::be32(&d), set[0].0);
    let (flags, typ, d) = chunk(&mut c).await;
    assert_eq!((flags, typ), (reply::FLAG_DONE, reply::TYPE_BLOCK_STATUS));
    assert_eq!(p::be32(&d), set[1].0);
    let ext: Vec<u32> = d[4..].chunks(4).map(p::be32).collect();
    assert_eq!(ext, [SIZE as u32 / 2, 1, SIZE as u32 / 2, 0]);
    // With REQ_ONE, one extent of each.
    request(&mut c, cmd::BLOCK_STATUS, cmdflag::REQ_ONE, 0, SIZE as u32).await;
    assert_eq!(chunk(&mut c).await.2.len(), 12);
    assert_eq!(chunk(&mut c).await.2.len(), 12);
}

/// Reads that take a while, counting how many run at once.
struct Slow {
    now: Arc<std::sync::atomic::AtomicUsize>,
    max: Arc<std::sync::atomic::AtomicUsize>,
}

struct SlowHandle {
    now: Arc<std::sync::atomic::AtomicUsize>,
    max: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl Plugin for Slow {
    async fn open(&self, _: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(SlowHandle {
            now: self.now.clone(),
            max: self.max.clone(),
        }))
    }
}

#[async_trait]
impl Handle for SlowHandle {
    fn size(&self) -> Result<u64> {
        Ok(SIZE)
    }
    async fn pread(&self, buf: &mut [u8], _: u64, _: Flags) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        buf.fill(7);
        self.now.fetch_sub(1, SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_across_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let max = Arc::new(AtomicUsize::new(0));
    let mut cfg = ServerConfig::new(Stack {
        filters: Vec::new(),
        plugin: Arc::new(Slow {
            now: Arc::default(),
            max: max.clone(),
        }),
    });
    // Room for two 256K reads in the whole server, though each
    // connection alone could have many more.
    const READ: u32 = 256 << 10;
    let units = (READ as usize / 1024 + 1) * 2;
    cfg.total_inflight = Arc::new(tokio::sync::Semaphore::new(units));
    let cfg = Arc::new(cfg);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut client, server) = tokio::io::duplex(4 << 20);
        let (r, w) = tokio::io::split(server);
        tokio::spawn(serve(cfg.clone(), r, w, Peer::default()));
        let mut hello = [0u8; 18];
        client.read_exact(&mut hello).await.unwrap();
        client
            .write_all(&(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        go(&mut client).await;
        clients.push(client);
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                request(&mut c, cmd::READ, 0, i * u64::from(READ), READ).await;
            }
            for _ in 0..4 {
                assert_eq!(simple_reply(&mut c).await, 0);
                let mut data = vec![0u8; READ as usize];
                c.read_exact(&mut data).await.unwrap();
                assert!(data.iter().all(|&b| b == 7));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Twelve reads, never more than two at once, and two at once did
    // happen (the bound is not one connection at a time).
    assert_eq!(max.load(SeqCst), 2);
}
