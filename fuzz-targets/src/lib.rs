//! The fuzz targets: one function per target, taking the fuzzer's bytes.
//!
//! `fuzz/` wraps each in libFuzzer's `fuzz_target!` (built with
//! coverage instrumentation by `fuzz/run.sh`); `tests/corpus.rs` replays
//! every file of `fuzz/corpus/TARGET/` and `fuzz/regressions/TARGET/`
//! through the same functions in a plain `cargo test`, so the seeds and
//! every crash once found stay tested without a fuzzer.
//!
//! A target fails by panicking (libfuzzer-sys aborts on any panic, even
//! one a task or `catch_unwind` would swallow; the corpus test counts
//! them with a panic hook) or by hanging (libFuzzer's `-timeout`; the
//! network targets also give up after [`HANG`] with a panic).
//!
//! | target | what it feeds |
//! |---|---|
//! | `server` | the bytes a client sends, from its flags on: handshake, options, requests |
//! | `server_requests` | requests (and write payloads) after a fixed valid handshake |
//! | `client_negotiate` | the bytes a server sends, from its greeting on, to a client listing exports and meta contexts, asking INFO and GO |
//! | `client_replies` | replies, after a fixed valid handshake, to a client with 9 requests in flight |
//! | `uri` | an NBD URI; one that parses must print as a URI that parses to the same |
//! | `data_expr` | a `data` plugin expression (no files, no scripts) |
//! | `xz` | an .xz file under the xz filter: its index, then reads |
//! | `partition` | byte 0: a partition number - 1; then a disk under the partition filter (MBR, EBR chain, GPT) |

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libnbd::client::{ConnectOptions, Connection, Negotiation, Stream};
use libnbd::protocol::{self as p, info, opt, rep, tflags};
use libnbd::server::{serve, Peer, ServerConfig};
use libnbd::{Caps, Flags, Handle, OpenContext, Params, Plugin, Result, Stack};
use tokio::io::AsyncWriteExt;

/// A fuzz target: it takes the fuzzer's bytes.
pub type Target = fn(&[u8]);

/// Every target, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("server", server),
    ("server_requests", server_requests),
    ("client_negotiate", client_negotiate),
    ("client_replies", client_replies),
    ("uri", uri),
    ("data_expr", data_expr),
    ("xz", xz),
    ("partition", partition),
];

/// A network target that has not finished after this long has hung.
pub const HANG: Duration = Duration::from_secs(10);

/// Run `f` on a fresh single-threaded runtime (so nothing a run left
/// behind reaches the next), panicking if it hangs.
fn run<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let out = rt.block_on(async {
        tokio::time::timeout(HANG, f)
            .await
            .expect("fuzz target hung")
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

// ---------------------------------------------------------------------
// The server.

/// The export the server targets serve: a 1 MiB memory disk.
pub const SERVER_EXPORT_SIZE: u64 = 1 << 20;

/// A server on a memory disk of [`SERVER_EXPORT_SIZE`]: fed `input` as
/// everything its client sends, read until it closes.
fn run_server(input: &[u8]) {
    let entry = nbdkit_plugins::memory::ENTRY;
    let mut params = Params::parse(&["size=1M"], entry.magic).expect("params");
    let plugin = entry.configure(&mut params).expect("memory plugin");
    let mut cfg = ServerConfig::new(Stack {
        filters: Vec::new(),
        plugin,
    });
    cfg.threads = 4;
    let cfg = Arc::new(cfg);
    run(async move {
        let (client, server) = tokio::io::duplex(256 << 10);
        let (sr, sw) = tokio::io::split(server);
        let srv = tokio::spawn(serve(cfg, sr, sw, Peer::default()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let send = async {
            // The server may hang up before reading it all.
            let _ = cw.write_all(input).await;
            let _ = cw.shutdown().await;
        };
        let recv = async {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut cr, &mut sink).await;
        };
        tokio::join!(send, recv);
        srv.await.expect("server task panicked");
    })
}

/// `server`: the client's bytes, from its handshake flags on.
pub fn server(data: &[u8]) {
    run_server(data)
}

/// The client side of a valid handshake to transmission: flags, then
/// STRUCTURED_REPLY, SET_META_CONTEXT base:allocation and GO "".
pub fn client_handshake() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes());
    v.extend_from_slice(&p::option_header(opt::STRUCTURED_REPLY, 0));
    let mut meta = Vec::new();
    p::put_string32(&mut meta, "");
    meta.extend_from_slice(&1u32.to_be_bytes());
    p::put_string32(&mut meta, p::CONTEXT_BASE_ALLOCATION);
    v.extend_from_slice(&p::option_header(opt::SET_META_CONTEXT, meta.len() as u32));
    v.extend_from_slice(&meta);
    let go = [0u8, 0, 0, 0, 0, 0];
    v.extend_from_slice(&p::option_header(opt::GO, go.len() as u32));
    v.extend_from_slice(&go);
    v
}

/// `server_requests`: requests and write payloads after
/// [`client_handshake`].
pub fn server_requests(data: &[u8]) {
    let mut input = client_handshake();
    input.extend_from_slice(data);
    run_server(&input)
}

// ---------------------------------------------------------------------
// The client.

/// A client on a connection whose server sends `input` (and reads and
/// drops whatever the client sends), running `body`.
fn run_client<F, Fut>(input: &[u8], body: F)
where
    F: FnOnce(Stream) -> Fut,
    Fut: Future<Output = ()>,
{
    run(async move {
        let (client, server) = tokio::io::duplex(256 << 10);
        let (cr, cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let fake = async {
            let _ = sw.write_all(input).await;
            // EOF after the script: a client still waiting sees the
            // server go.
            let _ = sw.shutdown().await;
            drop(sw);
        };
        let drain = async {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut sr, &mut sink).await;
        };
        let client = body(Stream::from_halves(cr, cw));
        tokio::join!(fake, drain, client);
    })
}

/// `client_negotiate`: byte 0 chooses what the client does (bit 0: list
/// exports, 1: list meta contexts, 2: INFO, 3: no structured replies,
/// 4: no meta context asked, 5: full info, 6: block sizes, 7: a read and
/// a block status after GO); the rest is what the server sends, from its
/// greeting on.
pub fn client_negotiate(data: &[u8]) {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    run_client(input, |s| negotiate_script(s, ctl));
}

/// What [`client_negotiate`] does on a connection, byte 0 of its input
/// being `ctl` (public for the examples that record seeds from a real
/// server).
pub async fn negotiate_script(s: Stream, ctl: u8) {
    // The seeds were recorded without extended headers (their replies
    // start with STRUCTURED_REPLY's), so the client does not ask for them.
    let mut opts = ConnectOptions::new()
        .extended_headers(false)
        .structured_replies(ctl & 8 == 0)
        .full_info(ctl & 32 != 0)
        .block_size(ctl & 64 != 0);
    if ctl & 16 == 0 {
        opts = opts.meta_context(p::CONTEXT_BASE_ALLOCATION);
    }
    let Ok(mut n) = Negotiation::start(s, &opts).await else {
        return;
    };
    if ctl & 1 != 0 {
        let _ = n.list_exports().await;
    }
    if ctl & 2 != 0 {
        let _ = n.list_meta_contexts("", &[]).await;
    }
    if ctl & 4 != 0 {
        let _ = n.info("").await;
    }
    let Ok(c) = n.go().await else {
        return;
    };
    check_connection(&c);
    if ctl & 128 != 0 {
        let size = c.size().min(4096);
        let _ = c.pread_vec(size as usize, 0, 0).await;
        let _ = c.block_status(size.max(1), 0, 0).await;
    }
    let _ = c.disconnect().await;
}

/// What a negotiated connection claims must hold together.
fn check_connection(c: &Connection) {
    if let Some(bs) = c.block_size() {
        let _ = (bs.minimum, bs.preferred, bs.maximum);
    }
    assert!(c.max_payload() > 0, "max payload 0");
    let _ = (c.size(), c.flags(), c.canonical_name(), c.description());
}

/// What the server sends up to transmission in [`client_replies`]: a
/// greeting and the answers to STRUCTURED_REPLY, SET_META_CONTEXT (id 1
/// for base:allocation) and GO (a 1 MiB export that can do everything).
pub fn server_handshake() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&p::NBDMAGIC.to_be_bytes());
    v.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes());
    let mut reply = |o: u32, r: u32, payload: &[u8]| {
        v.extend_from_slice(&p::option_reply_header(o, r, payload.len() as u32));
        v.extend_from_slice(payload);
    };
    reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
    let mut ctx = 1u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(p::CONTEXT_BASE_ALLOCATION.as_bytes());
    reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &ctx);
    reply(opt::SET_META_CONTEXT, rep::ACK, &[]);
    let flags = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_TRIM
        | tflags::SEND_WRITE_ZEROES
        | tflags::SEND_DF
        | tflags::SEND_CACHE
        | tflags::SEND_FAST_ZERO;
    reply(opt::GO, rep::INFO, &p::info_export(1 << 20, flags));
    reply(opt::GO, rep::INFO, &p::info_block_size(1, 4096, 1 << 20));
    reply(opt::GO, rep::INFO, &p::info_string(info::NAME, "disk"));
    reply(opt::GO, rep::ACK, &[]);
    v
}

/// `client_replies`: after [`server_handshake`], the server's replies to
/// nine requests the client has in flight at once, cookies 1 to 9 in
/// this order: read 4096 at 0, read 8192 at 4096 with DF, sparse read
/// 4096 at 65536, block status 1 MiB at 0, write 512 at 0, flush, trim,
/// zero and cache 4096 at 0.
pub fn client_replies(data: &[u8]) {
    let mut input = server_handshake();
    input.extend_from_slice(data);
    run_client(&input, |s| async move {
        // The fixed handshake is the structured-replies one.
        let c = Connection::handshake(s, &ConnectOptions::new().extended_headers(false))
            .await
            .expect("the fixed handshake");
        replies_script(&c).await;
        let _ = c.disconnect().await;
    })
}

/// The requests of [`client_replies`], all in flight at once, and checks
/// of what they return.
pub async fn replies_script(c: &Connection) {
    let df = libnbd::client::cmdflag::DF;
    let (r1, r2, r3, bs, w, f, t, z, ca) = tokio::join!(
        c.pread_vec(4096, 0, 0),
        c.pread_vec(8192, 4096, df),
        c.pread_sparse(vec![0x55; 4096], 65536, 0),
        c.block_status(1 << 20, 0, 0),
        c.pwrite(&[1; 512], 0, 0),
        c.flush(),
        c.trim(4096, 0, 0),
        c.zero(4096, 0, 0),
        c.cache(4096, 0, 0),
    );
    if let Ok(v) = r1 {
        assert_eq!(v.len(), 4096, "read of the wrong length");
    }
    if let Ok(v) = r2 {
        assert_eq!(v.len(), 8192, "read of the wrong length");
    }
    if let Ok((v, holes)) = r3 {
        assert_eq!(v.len(), 4096, "sparse read of the wrong length");
        for h in holes {
            assert!(
                h.start < h.end && h.end <= 4096,
                "hole {h:?} outside the read"
            );
        }
    }
    let _ = (bs, w, f, t, z, ca);
}

// ---------------------------------------------------------------------
// Parsers.

/// `uri`: parse an NBD URI; one that parses prints as one that parses
/// back to the same.
pub fn uri(data: &[u8]) {
    use libnbd::uri::Uri;
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Uri::is_nbd_uri(s);
    let Ok(u) = Uri::parse(s) else {
        return;
    };
    let printed = u.to_string();
    let again = Uri::parse(&printed)
        .unwrap_or_else(|e| panic!("{s:?} parses, but as {printed:?} it does not: {e}"));
    assert_eq!(u, again, "{s:?} printed as {printed:?} parses differently");
    let _ = u.tls_options();
    let _ = u.options(&ConnectOptions::new());
}

/// `data_expr`: a data plugin expression, with variables `a` (bytes),
/// `b` (`$a` repeated) and `r` (recursive), never reading files or
/// running scripts.
pub fn data_expr(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let vars: HashMap<String, String> =
        [("a", "1 2 3 \"xyz\""), ("b", "$a*2 @+3 $a"), ("r", "0 $r")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let _ = nbdkit_plugins::data::fuzz_evaluate(s, &vars);
}

/// A read-only disk of given bytes, under the filter targets.
struct Bytes(Arc<Vec<u8>>);

struct BytesHandle(Arc<Vec<u8>>);

#[async_trait]
impl Plugin for Bytes {
    async fn open(&self, _: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(BytesHandle(self.0.clone())))
    }
}

#[async_trait]
impl Handle for BytesHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps::READ_ONLY)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _: Flags) -> Result<()> {
        // Layers must ask only for bytes inside the disk.
        let start = usize::try_from(offset).expect("offset past the disk");
        let end = start
            .checked_add(buf.len())
            .filter(|e| *e <= self.0.len())
            .unwrap_or_else(|| panic!("read {start}+{} past the disk", buf.len()));
        buf.copy_from_slice(&self.0[start..end]);
        Ok(())
    }
}

/// Open `filter` (configured with `params`) over a disk of `disk`; read
/// (up to `limit` bytes from) the start and the end of what it serves.
fn filter_over(entry: libnbd::FilterEntry, params: &[&str], disk: &[u8], limit: u64) {
    let mut params = Params::parse(params, None).expect("params");
    let filter = (entry.create)(&mut params).expect("filter");
    let stack = Stack {
        filters: vec![filter],
        plugin: Arc::new(Bytes(Arc::new(disk.to_vec()))),
    };
    run(async move {
        let Ok(h) = stack.open(&OpenContext::default()).await else {
            return;
        };
        let size = h.size().expect("size");
        let n = size.min(limit);
        let mut buf = vec![0u8; n as usize];
        let _ = h.pread(&mut buf, 0, Flags::NONE).await;
        if size > n {
            let _ = h.pread(&mut buf, size - n, Flags::NONE).await;
        }
    })
}

/// `xz`: an .xz file under the xz filter (blocks of at most 4 MiB in
/// memory): its streams and indexes, then a read at the start and at the
/// end.
pub fn xz(data: &[u8]) {
    filter_over(
        nbdkit_filters::xz::ENTRY,
        &["xz-max-block=4M"],
        data,
        64 << 10,
    )
}

/// `partition`: byte 0 + 1 is the partition number, the rest the disk
/// under the partition filter; the partition must lie inside the disk.
pub fn partition(data: &[u8]) {
    let Some((&n, disk)) = data.split_first() else {
        return;
    };
    let number = format!("partition={}", n as u32 + 1);
    filter_over(nbdkit_filters::partition::ENTRY, &[&number], disk, 1 << 20)
}
