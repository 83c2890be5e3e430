//! The client against a scripted fake server on a socketpair: chunked
//! and sparse reads, errors, garbage from the server, fallbacks, option
//! mode.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::protocol::{
    self as p, alloc, cmd, cmdflag, errno, info, opt, rep, reply, tflags, Request, IHAVEOPT,
    NBDMAGIC, OLDSTYLE_MAGIC, REQUEST_LEN,
};

use super::*;

const FLAGS: u16 = tflags::HAS_FLAGS
    | tflags::SEND_FLUSH
    | tflags::SEND_FUA
    | tflags::SEND_TRIM
    | tflags::SEND_WRITE_ZEROES
    | tflags::SEND_DF
    | tflags::CAN_MULTI_CONN
    | tflags::SEND_CACHE;

/// The server end of a socketpair.
struct Fake {
    s: UnixStream,
}

/// How the fake server answers negotiation.
#[derive(Clone)]
struct Script {
    structured: bool,
    contexts: Vec<(u32, &'static str)>,
    go_unsupported: bool,
    block_size: Option<(u32, u32, u32)>,
    size: u64,
    flags: u16,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            structured: true,
            contexts: vec![(5, "base:allocation")],
            go_unsupported: false,
            block_size: None,
            size: 1 << 20,
            flags: FLAGS,
        }
    }
}

impl Fake {
    async fn greet(&mut self, hflags: u16) {
        let mut b = Vec::new();
        b.extend_from_slice(&NBDMAGIC.to_be_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&hflags.to_be_bytes());
        self.s.write_all(&b).await.unwrap();
        let cflags = self.s.read_u32().await.unwrap();
        assert_eq!(cflags, u32::from(hflags));
    }

    async fn read_opt(&mut self) -> (u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), IHAVEOPT);
        let o = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut payload = vec![0; len as usize];
        self.s.read_exact(&mut payload).await.unwrap();
        (o, payload)
    }

    async fn reply(&mut self, o: u32, r: u32, payload: &[u8]) {
        self.s
            .write_all(&p::option_reply_header(o, r, payload.len() as u32))
            .await
            .unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    /// Answer options until GO (or EXPORT_NAME) succeeds.
    async fn negotiate(&mut self, sc: &Script) {
        self.greet(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).await;
        loop {
            let (o, payload) = self.read_opt().await;
            match o {
                opt::STRUCTURED_REPLY if sc.structured => self.reply(o, rep::ACK, &[]).await,
                opt::SET_META_CONTEXT if sc.structured => {
                    for (id, name) in &sc.contexts {
                        let mut b = id.to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        self.reply(o, rep::META_CONTEXT, &b).await;
                    }
                    self.reply(o, rep::ACK, &[]).await;
                }
                opt::GO if sc.go_unsupported => self.reply(o, rep::ERR_UNSUP, &[]).await,
                opt::GO | opt::INFO => {
                    let mut rd = p::Reader::new(&payload);
                    let name = rd.string32().unwrap();
                    let n = rd.u16().unwrap();
                    let wanted: Vec<u16> = (0..n).map(|_| rd.u16().unwrap()).collect();
                    self.reply(o, rep::INFO, &p::info_export(sc.size, sc.flags))
                        .await;
                    if wanted.contains(&info::NAME) {
                        self.reply(
                            o,
                            rep::INFO,
                            &p::info_string(info::NAME, &format!("canon-{name}")),
                        )
                        .await;
                    }
                    if wanted.contains(&info::DESCRIPTION) {
                        self.reply(
                            o,
                            rep::INFO,
                            &p::info_string(info::DESCRIPTION, "a fake disk"),
                        )
                        .await;
                    }
                    if let Some((a, b, c)) = sc.block_size {
                        self.reply(o, rep::INFO, &p::info_block_size(a, b, c)).await;
                    }
                    // An information type the client must ignore.
                    self.reply(o, rep::INFO, &[0, 99, 1, 2, 3]).await;
                    self.reply(o, rep::ACK, &[]).await;
                    if o == opt::GO {
                        return;
                    }
                }
                opt::EXPORT_NAME => {
                    self.s.write_all(&sc.size.to_be_bytes()).await.unwrap();
                    self.s.write_all(&sc.flags.to_be_bytes()).await.unwrap();
                    return;
                }
                _ => self.reply(o, rep::ERR_UNSUP, b"not in this script").await,
            }
        }
    }

    async fn request(&mut self) -> (Request, Vec<u8>) {
        let mut b = [0u8; REQUEST_LEN];
        self.s.read_exact(&mut b).await.unwrap();
        let r = Request::decode(&b).expect("request magic");
        let mut data = Vec::new();
        if r.typ == cmd::WRITE {
            data.resize(r.count as usize, 0);
            self.s.read_exact(&mut data).await.unwrap();
        }
        (r, data)
    }

    async fn simple(&mut self, cookie: u64, error: u32, data: &[u8]) {
        self.s
            .write_all(&p::simple_reply(cookie, error))
            .await
            .unwrap();
        self.s.write_all(data).await.unwrap();
    }

    async fn chunk(&mut self, cookie: u64, flags: u16, typ: u16, payload: &[u8]) {
        self.s
            .write_all(&p::structured_reply(
                cookie,
                flags,
                typ,
                payload.len() as u32,
            ))
            .await
            .unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    async fn data(&mut self, cookie: u64, done: bool, offset: u64, data: &[u8]) {
        let mut b = offset.to_be_bytes().to_vec();
        b.extend_from_slice(data);
        let f = if done { reply::FLAG_DONE } else { 0 };
        self.chunk(cookie, f, reply::TYPE_OFFSET_DATA, &b).await;
    }

    async fn hole(&mut self, cookie: u64, done: bool, offset: u64, len: u32) {
        let mut b = offset.to_be_bytes().to_vec();
        b.extend_from_slice(&len.to_be_bytes());
        let f = if done { reply::FLAG_DONE } else { 0 };
        self.chunk(cookie, f, reply::TYPE_OFFSET_HOLE, &b).await;
    }

    async fn error(&mut self, cookie: u64, typ: u16, e: u32, msg: &str, off: Option<u64>) {
        let mut b = e.to_be_bytes().to_vec();
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg.as_bytes());
        if let Some(o) = off {
            b.extend_from_slice(&o.to_be_bytes());
        }
        self.chunk(cookie, reply::FLAG_DONE, typ, &b).await;
    }

    async fn done(&mut self, cookie: u64) {
        self.chunk(cookie, reply::FLAG_DONE, reply::TYPE_NONE, &[])
            .await;
    }

    async fn status(&mut self, cookie: u64, done: bool, id: u32, extents: &[(u32, u32)]) {
        let mut b = id.to_be_bytes().to_vec();
        for (l, f) in extents {
            b.extend_from_slice(&l.to_be_bytes());
            b.extend_from_slice(&f.to_be_bytes());
        }
        let f = if done { reply::FLAG_DONE } else { 0 };
        self.chunk(cookie, f, reply::TYPE_BLOCK_STATUS, &b).await;
    }
}

/// A connected client and fake server, negotiated per `sc`.
async fn pair(sc: Script, opts: ConnectOptions) -> (Connection, Fake) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut fake = Fake { s: b };
    let server = async {
        fake.negotiate(&sc).await;
    };
    let client = Connection::handshake(Stream::from_io(a), &opts);
    let (c, ()) = tokio::join!(client, server);
    (c.unwrap(), fake)
}

async fn setup() -> (Connection, Fake) {
    pair(Script::default(), ConnectOptions::new()).await
}

#[tokio::test]
async fn negotiated_properties() {
    let (c, _f) = setup().await;
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.protocol(), "newstyle-fixed");
    assert!(c.structured_replies());
    assert!(!c.tls());
    assert_eq!(c.canonical_name(), Some("canon-"));
    assert_eq!(c.description(), Some("a fake disk"));
    assert_eq!(
        c.meta_contexts(),
        &[MetaContext {
            id: 5,
            name: "base:allocation".into()
        }]
    );
    assert!(c.can_meta_context("base:allocation"));
    assert!(!c.is_read_only() && !c.is_rotational());
    assert!(c.can_flush() && c.can_fua() && c.can_trim() && c.can_zero());
    assert!(c.can_df() && c.can_multi_conn() && c.can_cache() && !c.can_fast_zero());
    assert_eq!(c.block_size(), None);
    assert_eq!(c.max_payload(), DEFAULT_MAX_PAYLOAD);
    assert!(c.uri().is_none());
}

#[tokio::test]
async fn chunked_sparse_read() {
    let (c, mut f) = setup().await;
    let server = async {
        let (r, _) = f.request().await;
        assert_eq!((r.typ, r.offset, r.count), (cmd::READ, 8192, 4096));
        // Chunks out of order: data in the middle, a hole at the start,
        // data at the end, then a NONE chunk to finish.
        f.data(r.cookie, false, 8192 + 2048, &[0xaa; 1024]).await;
        f.hole(r.cookie, false, 8192, 2048).await;
        f.data(r.cookie, false, 8192 + 3072, &[0xbb; 1024]).await;
        f.done(r.cookie).await;
    };
    // A reused buffer full of garbage: the hole must be zeroed.
    let (buf, ()) = tokio::join!(c.pread_owned(vec![0x55; 4096], 8192, 0), server);
    let buf = buf.unwrap();
    assert!(buf[..2048].iter().all(|&b| b == 0));
    assert!(buf[2048..3072].iter().all(|&b| b == 0xaa));
    assert!(buf[3072..].iter().all(|&b| b == 0xbb));
    let st = c.stats();
    assert_eq!(
        (st.requests, st.chunks, st.hole_chunks, st.bytes_received),
        (1, 4, 1, 2048)
    );
}

#[tokio::test]
async fn sparse_read_reports_holes_unfilled() {
    let (c, mut f) = setup().await;
    let server = async {
        let (r, _) = f.request().await;
        assert_eq!((r.typ, r.offset, r.count), (cmd::READ, 0, 8192));
        // Two holes, the later one first.
        f.hole(r.cookie, false, 6144, 2048).await;
        f.data(r.cookie, false, 1024, &[0xaa; 5120]).await;
        f.hole(r.cookie, true, 0, 1024).await;
    };
    let (got, ()) = tokio::join!(c.pread_sparse(vec![0x55; 8192], 0, 0), server);
    let (buf, holes) = got.unwrap();
    assert_eq!(holes, vec![0..1024, 6144..8192]);
    // The holes keep what the buffer held; the data is there.
    assert!(buf[..1024].iter().all(|&b| b == 0x55));
    assert!(buf[1024..6144].iter().all(|&b| b == 0xaa));
    assert!(buf[6144..].iter().all(|&b| b == 0x55));
}

#[tokio::test]
async fn out_of_order_replies() {
    let (c, mut f) = setup().await;
    let server = async {
        let mut reqs = Vec::new();
        for _ in 0..4 {
            reqs.push(f.request().await);
        }
        reqs.reverse();
        for (r, data) in reqs {
            match r.typ {
                cmd::READ => {
                    let fill = (r.offset / 512) as u8;
                    f.data(r.cookie, true, r.offset, &vec![fill; r.count as usize])
                        .await;
                }
                cmd::WRITE => {
                    assert_eq!(r.flags, cmdflag::FUA);
                    assert_eq!(data, vec![9; 512]);
                    f.simple(r.cookie, 0, &[]).await;
                }
                _ => panic!("unexpected {r:?}"),
            }
        }
    };
    let client = async {
        let mut b = [0u8; 512];
        let (x, y, z, w) = tokio::join!(
            c.pread_vec(512, 512, 0),
            c.pread_vec(512, 1024, 0),
            c.pread(&mut b, 1536, cmdflag::DF),
            c.pwrite(&[9; 512], 0, cmdflag::FUA),
        );
        assert_eq!(x.unwrap(), vec![1; 512]);
        assert_eq!(y.unwrap(), vec![2; 512]);
        z.unwrap();
        assert_eq!(b, [3; 512]);
        w.unwrap();
    };
    tokio::join!(client, server);
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn server_errors_keep_the_connection() {
    let (c, mut f) = setup().await;
    let server = async {
        let (r, _) = f.request().await;
        f.data(r.cookie, false, r.offset, &[1; 512]).await;
        f.error(
            r.cookie,
            reply::TYPE_ERROR_OFFSET,
            errno::EIO,
            "bad sector",
            Some(r.offset + 512),
        )
        .await;
        let (r, _) = f.request().await;
        f.simple(r.cookie, errno::EPERM, &[]).await;
        let (r, _) = f.request().await;
        f.error(r.cookie, reply::TYPE_ERROR, errno::ENOSPC, "", None)
            .await;
        let (r, _) = f.request().await;
        assert_eq!(r.typ, cmd::FLUSH);
        f.simple(r.cookie, 0, &[]).await;
    };
    let client = async {
        match c.pread_vec(1024, 4096, 0).await.unwrap_err() {
            Error::Server {
                command,
                offset,
                count,
                errno: e,
                message,
                error_offset,
            } => {
                assert_eq!(
                    (command, offset, count, e),
                    ("pread", 4096, 1024, errno::EIO)
                );
                assert_eq!(message, "bad sector");
                assert_eq!(error_offset, Some(4608));
            }
            e => panic!("{e:?}"),
        }
        let e = c.pwrite(&[0; 512], 0, 0).await.unwrap_err();
        assert_eq!(e.errno(), Some(errno::EPERM));
        assert!(e.to_string().contains("EPERM"), "{e}");
        let e = c.zero(512, 0, 0).await.unwrap_err();
        assert_eq!(e.errno(), Some(errno::ENOSPC));
        c.flush().await.unwrap();
    };
    tokio::join!(client, server);
}

/// Run a read against a misbehaving server; it must fail with a
/// protocol error mentioning `want`, and so must every later request.
async fn fatal(
    want: &str,
    misbehave: impl for<'a> FnOnce(&'a mut Fake, Request) -> futures::future::BoxFuture<'a, ()>,
) {
    let (c, mut f) = setup().await;
    let server = async {
        let (r, _) = f.request().await;
        misbehave(&mut f, r).await;
        f
    };
    let (res, f) = tokio::join!(c.pread_vec(4096, 0, 0), server);
    let e = res.unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    assert!(
        e.to_string().contains(want),
        "{e} does not mention {want:?}"
    );
    // The connection is dead: later requests fail at once with the same
    // error, without being sent.
    let e2 = c.flush().await.unwrap_err();
    assert_eq!(e2.to_string(), e.to_string());
    assert!(c.is_closed());
    drop(f);
}

#[tokio::test]
async fn garbage_fails_the_connection() {
    fatal("unknown cookie", |f, r| {
        Box::pin(async move { f.simple(r.cookie + 100, 0, &[]).await })
    })
    .await;
    fatal("outside the request", |f, r| {
        Box::pin(async move { f.data(r.cookie, true, 4096, &[0; 16]).await })
    })
    .await;
    fatal("overlaps", |f, r| {
        Box::pin(async move {
            f.data(r.cookie, false, 0, &[0; 2048]).await;
            f.hole(r.cookie, true, 1024, 2048).await;
        })
    })
    .await;
    fatal("bad reply magic", |f, _| {
        Box::pin(async move { f.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap() })
    })
    .await;
    fatal("unknown structured reply type", |f, r| {
        Box::pin(async move { f.chunk(r.cookie, reply::FLAG_DONE, 77, &[]).await })
    })
    .await;
    fatal("simple reply to a read", |f, r| {
        Box::pin(async move { f.simple(r.cookie, 0, &[0; 4096]).await })
    })
    .await;
    fatal("block status chunk in reply", |f, r| {
        Box::pin(async move { f.status(r.cookie, true, 5, &[(4096, 0)]).await })
    })
    .await;
    fatal("NONE chunk without the DONE flag", |f, r| {
        Box::pin(async move { f.chunk(r.cookie, 0, reply::TYPE_NONE, &[]).await })
    })
    .await;
    fatal("hole chunk of 8 bytes", |f, r| {
        Box::pin(async move { f.chunk(r.cookie, 0, reply::TYPE_OFFSET_HOLE, &[0; 8]).await })
    })
    .await;
    fatal("message length", |f, r| {
        Box::pin(async move {
            f.chunk(
                r.cookie,
                reply::FLAG_DONE,
                reply::TYPE_ERROR,
                &[0, 0, 0, 5, 0, 50, b'x'],
            )
            .await
        })
    })
    .await;
    fatal("error at offset", |f, r| {
        Box::pin(async move {
            f.error(
                r.cookie,
                reply::TYPE_ERROR_OFFSET,
                errno::EIO,
                "",
                Some(1 << 30),
            )
            .await
        })
    })
    .await;
}

#[tokio::test]
async fn incomplete_read_is_an_error() {
    let (c, mut f) = setup().await;
    let server = async {
        let (r, _) = f.request().await;
        f.data(r.cookie, true, 0, &[1; 1024]).await;
        let (r, _) = f.request().await;
        f.simple(r.cookie, 0, &[]).await;
    };
    let client = async {
        let e = c.pread_vec(4096, 0, 0).await.unwrap_err();
        assert!(e.to_string().contains("covered 1024 of 4096"), "{e}");
        // Only that request failed.
        c.flush().await.unwrap();
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn server_closes() {
    let (c, mut f) = setup().await;
    let server = async {
        let _ = f.request().await;
        drop(f);
    };
    let (e, ()) = tokio::join!(c.pread_vec(512, 0, 0), server);
    let e = e.unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains("server closed the connection"),
        "{e}"
    );
}

#[tokio::test]
async fn block_status_two_contexts() {
    let sc = Script {
        contexts: vec![(5, "base:allocation"), (9, "qemu:dirty-bitmap:b")],
        ..Script::default()
    };
    let opts = ConnectOptions::new().meta_context("qemu:dirty-bitmap:b");
    let (c, mut f) = pair(sc, opts).await;
    let server = async {
        let (r, _) = f.request().await;
        assert_eq!(
            (r.typ, r.flags, r.offset, r.count),
            (cmd::BLOCK_STATUS, 0, 0, 1 << 20)
        );
        f.status(r.cookie, false, 9, &[(1 << 20, 1)]).await;
        f.status(
            r.cookie,
            true,
            5,
            &[(4096, 0), (65536, alloc::HOLE | alloc::ZERO), (1 << 20, 0)],
        )
        .await;
        let (r, _) = f.request().await;
        assert_eq!(r.flags, cmdflag::REQ_ONE);
        // Only one context: the reply is incomplete.
        f.status(r.cookie, true, 5, &[(512, 0)]).await;
        let (r, _) = f.request().await;
        // Two extents for REQ_ONE: fatal.
        f.status(r.cookie, false, 5, &[(512, 0), (512, 3)]).await;
    };
    let client = async {
        let bs = c.block_status(c.size(), 0, 0).await.unwrap();
        assert_eq!(bs.contexts.len(), 2);
        assert_eq!(bs.contexts[0].name, "base:allocation");
        assert_eq!(
            bs.get("base:allocation").unwrap(),
            &[
                StatusExtent {
                    length: 4096,
                    flags: 0
                },
                StatusExtent {
                    length: 65536,
                    flags: 3
                },
                StatusExtent {
                    length: 1 << 20,
                    flags: 0
                },
            ]
        );
        assert_eq!(
            bs.get("qemu:dirty-bitmap:b").unwrap(),
            &[StatusExtent {
                length: 1 << 20,
                flags: 1
            }]
        );
        let e = c.block_status(4096, 0, cmdflag::REQ_ONE).await.unwrap_err();
        assert!(e.to_string().contains("1 of 2 meta contexts"), "{e}");
        let e = c.block_status(4096, 0, cmdflag::REQ_ONE).await.unwrap_err();
        assert!(e.to_string().contains("REQ_ONE"), "{e}");
        assert!(c.is_closed());
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn block_status_filtered_without_the_payload_flag() {
    // No extended headers, so no NBD_FLAG_BLOCK_STATUS_PAYLOAD: the
    // plain request goes, and the other context's answer is dropped.
    let sc = Script {
        contexts: vec![(5, "base:allocation"), (9, "qemu:dirty-bitmap:b")],
        ..Script::default()
    };
    let opts = ConnectOptions::new().meta_context("qemu:dirty-bitmap:b");
    let (c, mut f) = pair(sc, opts).await;
    assert!(!c.can_block_status_payload());
    let server = async {
        let (r, _) = f.request().await;
        assert_eq!((r.typ, r.flags, r.count), (cmd::BLOCK_STATUS, 0, 4096));
        f.status(r.cookie, false, 5, &[(4096, 0)]).await;
        f.status(r.cookie, true, 9, &[(4096, 1)]).await;
    };
    let client = async {
        let bs = c
            .block_status_filtered(4096, 0, 0, &["qemu:dirty-bitmap:b"])
            .await
            .unwrap();
        assert_eq!(bs.contexts.len(), 1);
        assert_eq!(
            bs.get("qemu:dirty-bitmap:b").unwrap(),
            &[StatusExtent {
                length: 4096,
                flags: 1
            }]
        );
        // A context not negotiated, or none: errors, nothing sent.
        let e = c
            .block_status_filtered(4096, 0, 0, &["qemu:allocation-depth"])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not negotiated"), "{e}");
        assert!(c.block_status_filtered(4096, 0, 0, &[]).await.is_err());
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn without_structured_replies() {
    let sc = Script {
        structured: false,
        ..Script::default()
    };
    let (c, mut f) = pair(sc, ConnectOptions::new()).await;
    assert!(!c.structured_replies());
    assert!(c.meta_contexts().is_empty());
    assert!(!c.can_df(), "DF needs structured replies");
    let server = async {
        let (r, _) = f.request().await;
        f.simple(r.cookie, 0, &vec![4; r.count as usize]).await;
        let (r, _) = f.request().await;
        f.simple(r.cookie, errno::EINVAL, &[]).await;
    };
    let client = async {
        assert_eq!(c.pread_vec(1000, 24, 0).await.unwrap(), vec![4; 1000]);
        let e = c.pread_vec(10, 1 << 20, 0).await.unwrap_err();
        assert_eq!(e.errno(), Some(errno::EINVAL));
        assert!(matches!(
            c.block_status(512, 0, 0).await.unwrap_err(),
            Error::Unsupported(_)
        ));
        assert!(matches!(
            c.pread_vec(512, 0, cmdflag::DF).await.unwrap_err(),
            Error::Unsupported(_)
        ));
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn go_unsupported_falls_back_to_export_name() {
    let sc = Script {
        go_unsupported: true,
        ..Script::default()
    };
    let (c, _f) = pair(sc, ConnectOptions::new().export_name("disk")).await;
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.export_name(), "disk");
    assert_eq!(c.canonical_name(), None);
    assert!(c.can_meta_context("base:allocation"));
}

#[tokio::test]
async fn nonfixed_newstyle_and_zeroes() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut f = Fake { s: b };
    let server = async {
        f.greet(0).await;
        let (o, name) = f.read_opt().await;
        assert_eq!((o, name.as_slice()), (opt::EXPORT_NAME, &b"x"[..]));
        f.s.write_all(&4096u64.to_be_bytes()).await.unwrap();
        f.s.write_all(&(tflags::HAS_FLAGS | tflags::READ_ONLY).to_be_bytes())
            .await
            .unwrap();
        f.s.write_all(&[0; 124]).await.unwrap();
        let (r, _) = f.request().await;
        f.simple(r.cookie, 0, &[6; 512]).await;
    };
    let client = async {
        let c = Connection::handshake(Stream::from_io(a), &ConnectOptions::new().export_name("x"))
            .await
            .unwrap();
        assert_eq!(c.protocol(), "newstyle");
        assert!(c.is_read_only());
        assert!(!c.structured_replies());
        assert_eq!(c.pread_vec(512, 0, 0).await.unwrap(), vec![6; 512]);
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn oldstyle() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut f = Fake { s: b };
    let server = async {
        let mut g = Vec::new();
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        g.extend_from_slice(&8192u64.to_be_bytes());
        g.extend_from_slice(&u32::from(tflags::HAS_FLAGS | tflags::SEND_FLUSH).to_be_bytes());
        g.extend_from_slice(&[0; 124]);
        f.s.write_all(&g).await.unwrap();
        let (r, _) = f.request().await;
        f.simple(r.cookie, 0, &[8; 512]).await;
    };
    let client = async {
        let mut n = Negotiation::start(Stream::from_io(a), &ConnectOptions::new())
            .await
            .unwrap();
        assert_eq!(n.protocol(), "oldstyle");
        assert!(matches!(
            n.list_exports().await.unwrap_err(),
            Error::Unsupported(_)
        ));
        let c = n.go().await.unwrap();
        assert_eq!(c.size(), 8192);
        assert!(c.can_flush());
        assert_eq!(c.pread_vec(512, 0, 0).await.unwrap(), vec![8; 512]);
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn handshake_garbage_and_eof() {
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(b"HTTP/1.1 400 Bad Request\r\n").await.unwrap();
    let e = Connection::handshake(Stream::from_io(a), &ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not an NBD server"), "{e}");

    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
    drop(b);
    let e = Connection::handshake(Stream::from_io(a), &ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains("server closed the connection"),
        "{e}"
    );
}

#[tokio::test]
async fn option_mode() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut f = Fake { s: b };
    let server = async {
        f.greet(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).await;
        // Extended headers first; refused, structured replies next.
        let (o, _) = f.read_opt().await;
        assert_eq!(o, opt::EXTENDED_HEADERS);
        f.reply(o, rep::ERR_UNSUP, &[]).await;
        let (o, _) = f.read_opt().await;
        assert_eq!(o, opt::STRUCTURED_REPLY);
        f.reply(o, rep::ACK, &[]).await;
        // LIST
        let (o, payload) = f.read_opt().await;
        assert_eq!((o, payload.len()), (opt::LIST, 0));
        for (name, desc) in [("a", ""), ("b", "disk b")] {
            let mut b = Vec::new();
            p::put_string32(&mut b, name);
            b.extend_from_slice(desc.as_bytes());
            f.reply(o, rep::SERVER, &b).await;
        }
        f.reply(o, rep::ACK, &[]).await;
        // LIST_META_CONTEXT for "b", all contexts.
        let (o, payload) = f.read_opt().await;
        assert_eq!(o, opt::LIST_META_CONTEXT);
        let mut rd = p::Reader::new(&payload);
        assert_eq!(rd.string32().as_deref(), Some("b"));
        assert_eq!(rd.u32(), Some(0));
        for name in ["base:allocation", "qemu:allocation-depth"] {
            let mut b = 0u32.to_be_bytes().to_vec();
            b.extend_from_slice(name.as_bytes());
            f.reply(o, rep::META_CONTEXT, &b).await;
        }
        f.reply(o, rep::ACK, &[]).await;
        // INFO "a" and GO "nope": the rest of the script.
        let sc = Script::default();
        let (o, _) = f.read_opt().await;
        assert_eq!(o, opt::SET_META_CONTEXT);
        f.reply(o, rep::META_CONTEXT, b"\0\0\0\x05base:allocation")
            .await;
        f.reply(o, rep::ACK, &[]).await;
        let (o, _) = f.read_opt().await;
        assert_eq!(o, opt::INFO);
        f.reply(
            o,
            rep::INFO,
            &p::info_export(12345, tflags::HAS_FLAGS | tflags::READ_ONLY),
        )
        .await;
        f.reply(o, rep::ACK, &[]).await;
        let (o, _) = f.read_opt().await;
        assert_eq!(o, opt::SET_META_CONTEXT);
        f.reply(o, rep::ERR_UNSUP, &[]).await;
        let (o, _) = f.read_opt().await;
        assert_eq!(o, opt::GO);
        f.reply(o, rep::ERR_UNKNOWN, b"no export called nope").await;
        // Then a successful GO for "a".
        f.negotiate_rest(&sc).await;
    };
    let client = async {
        let mut n = Negotiation::start(Stream::from_io(a), &ConnectOptions::new())
            .await
            .unwrap();
        assert!(n.structured_replies());
        let list = n.list_exports().await.unwrap();
        assert_eq!(
            list,
            vec![
                ExportEntry {
                    name: "a".into(),
                    description: None
                },
                ExportEntry {
                    name: "b".into(),
                    description: Some("disk b".into())
                }
            ]
        );
        assert_eq!(
            n.list_meta_contexts("b", &[]).await.unwrap(),
            vec!["base:allocation", "qemu:allocation-depth"]
        );
        let i = n.info("a").await.unwrap();
        assert_eq!(i.size, 12345);
        assert!(i.is_read_only());
        assert!(i.can_meta_context("base:allocation"));
        n.set_export_name("nope");
        let e = n.go().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "NBD_OPT_GO: server replied NBD_REP_ERR_UNKNOWN: no export called nope"
        );
        // A refused option leaves the negotiation usable.
        n.set_export_name("a");
        let c = n.go().await.unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert_eq!(c.export_name(), "a");
        assert!(matches!(n.info("a").await.unwrap_err(), Error::Closed));
    };
    tokio::join!(client, server);
}

impl Fake {
    /// Like `negotiate` after the greeting and structured replies.
    async fn negotiate_rest(&mut self, sc: &Script) {
        loop {
            let (o, payload) = self.read_opt().await;
            match o {
                opt::SET_META_CONTEXT => {
                    for (id, name) in &sc.contexts {
                        let mut b = id.to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        self.reply(o, rep::META_CONTEXT, &b).await;
                    }
                    self.reply(o, rep::ACK, &[]).await;
                }
                opt::GO => {
                    let _ = payload;
                    self.reply(o, rep::INFO, &p::info_export(sc.size, sc.flags))
                        .await;
                    self.reply(o, rep::ACK, &[]).await;
                    return;
                }
                _ => self.reply(o, rep::ERR_UNSUP, &[]).await,
            }
        }
    }
}

#[tokio::test]
async fn block_size_constraints() {
    let sc = Script {
        block_size: Some((512, 4096, 1 << 20)),
        size: 8 << 20,
        ..Script::default()
    };
    let (c, mut f) = pair(sc, ConnectOptions::new()).await;
    assert_eq!(
        c.block_size(),
        Some(BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 20
        })
    );
    assert_eq!(c.max_payload(), 1 << 20);
    // Misaligned requests never reach the server.
    for e in [
        c.pread_vec(100, 0, 0).await.unwrap_err(),
        c.pwrite(&[0; 512], 1, 0).await.unwrap_err(),
        c.trim(513, 0, 0).await.unwrap_err(),
    ] {
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("minimum block size 512"), "{e}");
    }
    // Flags the command does not take, or the server does not support.
    assert!(matches!(
        c.pwrite(&[0; 512], 0, cmdflag::REQ_ONE).await.unwrap_err(),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        c.zero(512, 0, cmdflag::FAST_ZERO).await.unwrap_err(),
        Error::Unsupported(_)
    ));
    assert_eq!(c.stats().requests, 0);
    // A 3M read and a 2.5M write are split at the 1M maximum.
    let server = async {
        let mut reads = Vec::new();
        for _ in 0..3 {
            let (r, _) = f.request().await;
            assert_eq!(r.typ, cmd::READ);
            reads.push(r);
        }
        reads.sort_by_key(|r| r.offset);
        assert_eq!(
            reads
                .iter()
                .map(|r| (r.offset, r.count))
                .collect::<Vec<_>>(),
            vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)]
        );
        for r in reads.iter().rev() {
            let fill = (r.offset >> 20) as u8 + 1;
            f.data(r.cookie, true, r.offset, &vec![fill; r.count as usize])
                .await;
        }
        let mut writes = Vec::new();
        for _ in 0..3 {
            let (r, data) = f.request().await;
            assert_eq!(r.typ, cmd::WRITE);
            assert!(data.iter().all(|&b| b == 7));
            writes.push((r.offset, r.count));
            f.simple(r.cookie, 0, &[]).await;
        }
        writes.sort();
        assert_eq!(
            writes,
            vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 512 << 10)]
        );
    };
    let client = async {
        let data = c.pread_vec(3 << 20, 0, 0).await.unwrap();
        assert!(data[..1 << 20].iter().all(|&b| b == 1));
        assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 2));
        assert!(data[2 << 20..].iter().all(|&b| b == 3));
        c.pwrite(&vec![7; 5 << 19], 0, 0).await.unwrap();
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn bad_block_size_is_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut f = Fake { s: b };
    let sc = Script {
        block_size: Some((3, 4096, 1 << 20)),
        ..Script::default()
    };
    let opts = ConnectOptions::new();
    let (c, ()) = tokio::join!(Connection::handshake(Stream::from_io(a), &opts), async {
        // The client hangs up on the bad reply; stop at the GO.
        f.greet(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).await;
        loop {
            let (o, _) = f.read_opt().await;
            match o {
                opt::GO => {
                    f.reply(o, rep::INFO, &p::info_export(sc.size, sc.flags))
                        .await;
                    f.reply(o, rep::INFO, &p::info_block_size(3, 4096, 1 << 20))
                        .await;
                    f.reply(o, rep::ACK, &[]).await;
                    return;
                }
                _ => f.reply(o, rep::ACK, &[]).await,
            }
        }
    });
    let e = c.unwrap_err();
    assert!(e.to_string().contains("minimum block size 3"), "{e}");
}

#[tokio::test]
async fn disconnect_waits_then_sends_disc() {
    let (c, mut f) = setup().await;
    let c = std::sync::Arc::new(c);
    let server = async {
        let (r, _) = f.request().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.simple(r.cookie, 0, &[]).await;
        let (r, _) = f.request().await;
        assert_eq!(r.typ, cmd::DISC);
        // The client half-closes after DISC.
        let mut rest = Vec::new();
        f.s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(f);
    };
    let client = async {
        let c2 = c.clone();
        let flush = tokio::spawn(async move { c2.flush().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        c.disconnect().await.unwrap();
        flush.await.unwrap().unwrap();
        assert!(matches!(c.flush().await.unwrap_err(), Error::Closed));
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn eshutdown_leads_to_disconnect() {
    let (c, mut f) = setup().await;
    let server = async {
        let (r, _) = f.request().await;
        f.error(
            r.cookie,
            reply::TYPE_ERROR,
            errno::ESHUTDOWN,
            "going away",
            None,
        )
        .await;
        let (r, _) = f.request().await;
        assert_eq!(r.typ, cmd::DISC);
    };
    let client = async {
        let e = c.flush().await.unwrap_err();
        assert_eq!(e.errno(), Some(errno::ESHUTDOWN));
        assert!(matches!(c.flush().await.unwrap_err(), Error::Closed));
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn cancelled_requests() {
    let (c, mut f) = setup().await;
    // A read whose future is dropped after it was sent: its reply is
    // read and thrown away, and the connection carries on.
    let fut = c.pread_vec(512, 0, 0);
    let server = async {
        let (r, _) = f.request().await;
        (r, f)
    };
    let (r, mut f) = tokio::select! {
        _ = fut => unreachable!(),
        x = server => x,
    };
    assert_eq!(c.in_flight(), 1);
    let server = async {
        f.data(r.cookie, true, 0, &[1; 512]).await;
        let (r, _) = f.request().await;
        f.data(r.cookie, true, 0, &[2; 512]).await;
    };
    let (d, ()) = tokio::join!(c.pread_vec(512, 0, 0), server);
    assert_eq!(d.unwrap(), vec![2; 512]);
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn from_fd() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let mut f = Fake {
        s: UnixStream::from_std(b).unwrap(),
    };
    let server = async {
        f.negotiate(&Script::default()).await;
        let (r, data) = f.request().await;
        assert_eq!(data, vec![3; 4096]);
        f.simple(r.cookie, 0, &[]).await;
    };
    let client = async {
        let s = Stream::from_fd(std::os::fd::OwnedFd::from(a)).unwrap();
        let c = Connection::handshake(s, &ConnectOptions::new())
            .await
            .unwrap();
        c.pwrite(&[3; 4096], 0, 0).await.unwrap();
    };
    tokio::join!(client, server);
}

#[tokio::test]
async fn multi_conn_round_robin() {
    let mut conns = Vec::new();
    let mut fakes = Vec::new();
    for _ in 0..3 {
        let (c, f) = setup().await;
        conns.push(c);
        fakes.push(f);
    }
    let m = MultiConn::new(conns).unwrap();
    assert_eq!(m.len(), 3);
    let servers = fakes.into_iter().enumerate().map(|(i, mut f)| async move {
        for _ in 0..2 {
            let (r, _) = f.request().await;
            f.data(r.cookie, true, r.offset, &vec![i as u8; r.count as usize])
                .await;
        }
        let (r, _) = f.request().await;
        assert_eq!(r.typ, cmd::FLUSH);
        f.simple(r.cookie, 0, &[]).await;
    });
    let client = async {
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(m.pread_vec(512, 0, 0).await.unwrap()[0]);
        }
        assert_eq!(seen, vec![0, 1, 2, 0, 1, 2]);
        m.flush().await.unwrap();
    };
    tokio::join!(client, futures::future::join_all(servers));
}

#[tokio::test]
async fn vsock_connect_fails_cleanly() {
    // No vsock server here (usually no vsock transport at all): an error,
    // not a hang or a panic.
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        Connection::connect_uri("nbd+vsock://1:10997/", &ConnectOptions::new()),
    )
    .await
    .expect("vsock connect must not hang");
    match r {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("vsock 1:10997"), "{e}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => crate::elog!("a vsock NBD server answered on CID 1 port 10997"),
    }
}

/// The futures tools will `tokio::spawn` must be `Send` (checked at
/// compile time; never run).
#[allow(dead_code)]
fn futures_are_send(
    c: &Connection,
    m: &MultiConn,
    n: &mut Negotiation,
    t: &crate::captive::Target,
    o: &ConnectOptions,
) {
    fn send<T: Send>(_: T) {}
    send(c.pread_vec(1, 0, 0));
    send(c.pwrite(&[], 0, 0));
    send(c.block_status(1, 0, 0));
    send(c.zero(1, 0, 0));
    send(c.disconnect());
    send(m.pread_vec(1, 0, 0));
    send(m.flush());
    send(n.list_exports());
    send(n.info(""));
    send(n.go());
    send(t.connect(o));
    send(t.negotiate(o));
    send(t.connect_multi(o, 2));
    send(Connection::connect_uri("", o));
    fn sync<T: Send + Sync>(_: &T) {}
    sync(c);
    sync(m);
}
