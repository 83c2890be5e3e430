//! A hostile fake server (a thread on a Unix socket speaking raw bytes)
//! against our nbdinfo, nbdcopy and nbddump: each must exit non-zero with
//! a clear message, never panic, never hang, and never write wrong data.
//! libnbd 1.14 has no I/O timeout: against a server that stops answering
//! it waits until the server hangs up, and so do we (checked below).
//! The same misbehaviours are served after STARTTLS too (the fake does
//! TLS with OpenSSL and the tests' certificates): TLS must change
//! nothing in how the clients cope.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};

use crate::common::*;
use crate::tls_common::{certs_param, creds, require_gnutls_tools};

const SIZE: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    GreetingMagic,
    TruncatedGreeting,
    Size(u64),
    OptReplyMagic,
    OptReplyHuge,
    NoStructured,
    SimpleMagic,
    UnknownCookie,
    ChunkOutside,
    ChunkPastRequest,
    ChunkShort,
    DuplicateChunk,
    ErrorMessageTooLong,
    UnknownChunkType,
    StructuredUnasked,
    UnknownErrno,
    TruncatedReply,
    NoneNotDone,
    ZeroLengthExtent,
    ExtentsPastRequest,
    StopsAnswering,
    ReadOnlyAcceptsWrites,
    /// Selects 200,000 meta contexts we did not ask for.
    ManyMetaContexts,
    /// Lists 100,000 exports.
    ManyExports,
    // Extended headers (issue 25): a well-behaved server, then one
    // misbehaviour each of the new reply header and BLOCK_STATUS_EXT.
    ExtGood,
    ExtOffsetMismatch,
    ExtHugeLength,
    ExtSimpleReply,
    ExtStructuredChunk,
    ExtUnasked,
    ExtOldStatus,
    ExtStatusCount,
    ExtZeroExtent,
    ExtExtentsPastRequest,
    ExtLastExtentHuge,
}

impl Bad {
    /// Does the fake server acknowledge NBD_OPT_EXTENDED_HEADERS?
    fn extended(self) -> bool {
        matches!(
            self,
            Bad::ExtGood
                | Bad::ExtOffsetMismatch
                | Bad::ExtHugeLength
                | Bad::ExtSimpleReply
                | Bad::ExtStructuredChunk
                | Bad::ExtOldStatus
                | Bad::ExtStatusCount
                | Bad::ExtZeroExtent
                | Bad::ExtExtentsPastRequest
                | Bad::ExtLastExtentHuge
        )
    }
}

/// The fake's stream: a Unix socket, or TLS over one after STARTTLS.
trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

fn byte_at(off: u64) -> u8 {
    (off % 251) as u8
}

fn opt_reply(c: &mut dyn Io, opt: u32, typ: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x3_e889_0455_65a9u64.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    let _ = c.write_all(&b);
}

fn chunk(flags: u16, typ: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn data_chunk(flags: u16, cookie: u64, off: u64, len: u64) -> Vec<u8> {
    let mut p = off.to_be_bytes().to_vec();
    p.extend((off..off + len).map(byte_at));
    chunk(flags, 1, cookie, &p)
}

/// An extended reply chunk: `offset` is the request's, `length` the
/// payload length it claims.
fn xchunk_len(
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x6e8a_278cu32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn xchunk(flags: u16, typ: u16, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    xchunk_len(flags, typ, cookie, offset, payload.len() as u64, payload)
}

/// A BLOCK_STATUS_EXT payload for context 1: `count` says how many
/// descriptors follow.
fn status_ext(count: u32, extents: &[(u64, u64)]) -> Vec<u8> {
    let mut p = 1u32.to_be_bytes().to_vec();
    p.extend_from_slice(&count.to_be_bytes());
    for (len, flags) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    p
}

fn simple(err: u32, cookie: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x6744_6698u32.to_be_bytes());
    b.extend_from_slice(&err.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

/// One connection of the fake server. Returns when the client goes or
/// the misbehaviour ends it.
fn serve(raw: UnixStream, bad: Bad, tls: Option<Arc<SslAcceptor>>) -> Option<()> {
    raw.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut c: Box<dyn Io> = Box::new(raw);
    let mut g = Vec::new();
    g.extend_from_slice(if bad == Bad::GreetingMagic {
        b"NBDMAGIX"
    } else {
        b"NBDMAGIC"
    });
    g.extend_from_slice(b"IHAVEOPT");
    g.extend_from_slice(&3u16.to_be_bytes());
    if bad == Bad::TruncatedGreeting {
        c.write_all(&g[..10]).ok()?;
        return None;
    }
    c.write_all(&g).ok()?;
    let mut flags = [0u8; 4];
    c.read_exact(&mut flags).ok()?;
    let size = if let Bad::Size(s) = bad { s } else { SIZE };
    let mut structured = false;
    let mut ext = false;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).ok()?;
        let opt = be32(&h[8..12]);
        let mut data = vec![0u8; be32(&h[12..16]) as usize];
        c.read_exact(&mut data).ok()?;
        if bad == Bad::OptReplyMagic {
            c.write_all(&[0x42; 20]).ok()?;
            return None;
        }
        if bad == Bad::OptReplyHuge {
            // Claims a 100 MB reply and sends a little of it.
            let mut b = 0x3_e889_0455_65a9u64.to_be_bytes().to_vec();
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&3u32.to_be_bytes());
            b.extend_from_slice(&100_000_000u32.to_be_bytes());
            b.extend_from_slice(&[0; 1000]);
            c.write_all(&b).ok()?;
            return None;
        }
        match opt {
            5 if tls.is_some() => {
                opt_reply(&mut c, opt, 1, &[]);
                let acceptor = tls.as_ref()?;
                c = Box::new(acceptor.accept(c).ok()?);
            }
            3 if bad == Bad::ManyExports => {
                // One write: the client reads while we send.
                let mut b = Vec::new();
                for i in 0..100_000u32 {
                    let name = format!("export{i}");
                    let mut p = (name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    b.extend_from_slice(&0x3_e889_0455_65a9u64.to_be_bytes());
                    b.extend_from_slice(&3u32.to_be_bytes());
                    b.extend_from_slice(&2u32.to_be_bytes());
                    b.extend_from_slice(&(p.len() as u32).to_be_bytes());
                    b.extend_from_slice(&p);
                }
                c.write_all(&b).ok()?;
                opt_reply(&mut c, opt, 1, &[]);
            }
            10 if structured && bad == Bad::ManyMetaContexts => {
                let mut b = Vec::new();
                for i in 0..200_000u32 {
                    let mut p = i.to_be_bytes().to_vec();
                    p.extend_from_slice(format!("fake:context{i}").as_bytes());
                    b.extend_from_slice(&0x3_e889_0455_65a9u64.to_be_bytes());
                    b.extend_from_slice(&opt.to_be_bytes());
                    b.extend_from_slice(&4u32.to_be_bytes());
                    b.extend_from_slice(&(p.len() as u32).to_be_bytes());
                    b.extend_from_slice(&p);
                }
                c.write_all(&b).ok()?;
                opt_reply(&mut c, opt, 1, &[]);
            }
            11 if bad.extended() => {
                ext = true;
                structured = true;
                opt_reply(&mut c, opt, 1, &[]);
            }
            8 if bad != Bad::NoStructured && bad != Bad::StructuredUnasked => {
                structured = true;
                opt_reply(&mut c, opt, 1, &[]);
            }
            10 | 9 if structured => {
                let mut p = 1u32.to_be_bytes().to_vec();
                p.extend_from_slice(b"base:allocation");
                opt_reply(&mut c, opt, 4, &p);
                opt_reply(&mut c, opt, 1, &[]);
            }
            6 | 7 => {
                let mut flags: u16 = 1; // HAS_FLAGS
                flags |= 1 << 2 | 1 << 5; // FLUSH, TRIM
                if bad == Bad::ReadOnlyAcceptsWrites {
                    flags |= 1 << 1;
                }
                let mut p = 0u16.to_be_bytes().to_vec();
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
                opt_reply(&mut c, opt, 3, &p);
                opt_reply(&mut c, opt, 1, &[]);
                if opt == 7 {
                    break;
                }
            }
            2 => {
                opt_reply(&mut c, opt, 1, &[]);
                return None;
            }
            3 => opt_reply(&mut c, opt, 1, &[]),
            _ => opt_reply(&mut c, opt, 0x8000_0001, &[]),
        }
    }
    if ext || bad == Bad::ExtUnasked {
        return serve_extended(c, bad, ext);
    }
    loop {
        let mut h = [0u8; 28];
        c.read_exact(&mut h).ok()?;
        let typ = u16::from_be_bytes([h[6], h[7]]);
        let cookie = be64(&h[8..16]);
        let off = be64(&h[16..24]);
        let len = be32(&h[24..28]) as u64;
        match typ {
            2 => return None,
            1 => {
                let mut junk = vec![0u8; len as usize];
                c.read_exact(&mut junk).ok()?;
                c.write_all(&simple(0, cookie)).ok()?;
                continue;
            }
            0 | 7 => {}
            _ => {
                let r = if structured {
                    chunk(1, 0, cookie, &[])
                } else {
                    simple(0, cookie)
                };
                c.write_all(&r).ok()?;
                continue;
            }
        }
        if typ == 7 {
            let mut p = 1u32.to_be_bytes().to_vec();
            match bad {
                Bad::ZeroLengthExtent => {
                    p.extend_from_slice(&0u32.to_be_bytes());
                    p.extend_from_slice(&0u32.to_be_bytes());
                }
                Bad::ExtentsPastRequest => {
                    p.extend_from_slice(&(len as u32).saturating_add(1 << 20).to_be_bytes());
                    p.extend_from_slice(&0u32.to_be_bytes());
                }
                _ => {
                    p.extend_from_slice(&(len as u32).to_be_bytes());
                    p.extend_from_slice(&0u32.to_be_bytes());
                }
            }
            c.write_all(&chunk(1, 5, cookie, &p)).ok()?;
            continue;
        }
        // A read.
        let out = match bad {
            Bad::SimpleMagic => vec![0x55; 16],
            Bad::UnknownCookie if structured => data_chunk(1, cookie ^ 0xdead, off, len),
            Bad::UnknownCookie => simple(0, cookie ^ 0xdead),
            Bad::ChunkOutside => data_chunk(1, cookie, off + len, len),
            Bad::ChunkPastRequest => data_chunk(1, cookie, off, len + 512),
            Bad::ChunkShort => chunk(1, 1, cookie, &[0, 0, 0]),
            Bad::DuplicateChunk => {
                let mut b = data_chunk(0, cookie, off, len);
                b.extend(data_chunk(1, cookie, off, len));
                b
            }
            Bad::ErrorMessageTooLong => {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(&1000u16.to_be_bytes());
                p.extend_from_slice(b"short");
                chunk(1, 0x8001, cookie, &p)
            }
            Bad::UnknownChunkType => chunk(1, 77, cookie, &[0; 16]),
            Bad::StructuredUnasked => data_chunk(1, cookie, off, len),
            Bad::UnknownErrno => simple(9999, cookie),
            Bad::TruncatedReply => {
                let mut b = data_chunk(1, cookie, off, len);
                b.truncate(b.len() / 2);
                c.write_all(&b).ok()?;
                return None;
            }
            Bad::NoneNotDone => {
                c.write_all(&chunk(0, 0, cookie, &[])).ok()?;
                return None;
            }
            Bad::StopsAnswering => {
                std::thread::sleep(Duration::from_secs(3));
                return None;
            }
            _ if structured => data_chunk(1, cookie, off, len),
            _ => {
                let mut b = simple(0, cookie);
                b.extend((off..off + len).map(byte_at));
                b
            }
        };
        c.write_all(&out).ok()?;
    }
}

/// Transmission after NBD_OPT_EXTENDED_HEADERS (`ext`; or, for
/// `ExtUnasked`, after structured replies only): 32-byte requests (28
/// bytes when not negotiated), extended replies and their misbehaviours.
fn serve_extended(mut c: Box<dyn Io>, bad: Bad, ext: bool) -> Option<()> {
    let hlen = if ext { 32 } else { 28 };
    loop {
        let mut h = [0u8; 32];
        c.read_exact(&mut h[..hlen]).ok()?;
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let typ = u16::from_be_bytes([h[6], h[7]]);
        let cookie = be64(&h[8..16]);
        let off = be64(&h[16..24]);
        let len = if ext {
            be64(&h[24..32])
        } else {
            be32(&h[24..28]) as u64
        };
        // A write's payload follows (our client says PAYLOAD_LEN).
        if typ == 1 || flags & (1 << 5) != 0 {
            let mut junk = vec![0u8; len as usize];
            c.read_exact(&mut junk).ok()?;
        }
        let out = match (typ, bad) {
            (2, _) => return None,
            (7, Bad::ExtOldStatus) => {
                let mut p = 1u32.to_be_bytes().to_vec();
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&0u32.to_be_bytes());
                xchunk(1, 5, cookie, off, &p)
            }
            (7, Bad::ExtStatusCount) => xchunk(1, 6, cookie, off, &status_ext(2, &[(len, 0)])),
            (7, Bad::ExtZeroExtent) => xchunk(1, 6, cookie, off, &status_ext(1, &[(0, 0)])),
            (7, Bad::ExtExtentsPastRequest) => xchunk(
                1,
                6,
                cookie,
                off,
                &status_ext(2, &[(len + (1 << 20), 0), (4096, 0)]),
            ),
            (7, Bad::ExtLastExtentHuge) => {
                xchunk(1, 6, cookie, off, &status_ext(1, &[(u64::MAX - 4095, 0)]))
            }
            (7, _) => xchunk(1, 6, cookie, off, &status_ext(1, &[(len, 0)])),
            (0, _) => {
                let mut p = off.to_be_bytes().to_vec();
                p.extend((off..off + len).map(byte_at));
                match bad {
                    Bad::ExtOffsetMismatch => xchunk(1, 1, cookie, off + 512, &p),
                    Bad::ExtHugeLength => {
                        let mut b = xchunk_len(1, 1, cookie, off, 1 << 40, &p);
                        b.truncate(b.len() / 2);
                        c.write_all(&b).ok()?;
                        return None;
                    }
                    Bad::ExtSimpleReply => {
                        let mut b = simple(0, cookie);
                        b.extend_from_slice(&p[8..]);
                        b
                    }
                    Bad::ExtStructuredChunk => chunk(1, 1, cookie, &p),
                    _ => xchunk(1, 1, cookie, off, &p),
                }
            }
            _ => xchunk(1, 0, cookie, off, &[]),
        };
        c.write_all(&out).ok()?;
    }
}

struct Fake {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    tls: bool,
}

impl Fake {
    fn start(bad: Bad) -> Fake {
        Fake::start_with(bad, None)
    }

    /// A fake that does STARTTLS with the tests' server certificate.
    fn start_tls(bad: Bad) -> Fake {
        let pki = &creds().pki;
        let mut a = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        a.set_private_key_file(pki.join("server-key.pem"), SslFiletype::PEM)
            .unwrap();
        a.set_certificate_chain_file(pki.join("server-cert.pem"))
            .unwrap();
        Fake::start_with(bad, Some(Arc::new(a.build())))
    }

    fn start_with(bad: Bad, tls: Option<Arc<SslAcceptor>>) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sock");
        let l = UnixListener::bind(&sock).unwrap();
        let with_tls = tls.is_some();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let tls = tls.clone();
                std::thread::spawn(move || serve(c, bad, tls));
            }
        });
        Fake {
            _dir: dir,
            sock,
            tls: with_tls,
        }
    }

    fn uri(&self) -> String {
        if self.tls {
            format!(
                "nbds+unix:///?socket={}&{}",
                self.sock.display(),
                certs_param(&creds().ca_only)
            )
        } else {
            format!("nbd+unix:///?socket={}", self.sock.display())
        }
    }
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

/// Run one of our tools with a 30 s limit.
fn run_tool(name: &str, args: &[&str]) -> Outcome {
    let t = Instant::now();
    let mut child = Command::new(our_bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code,
        stderr: reader.join().unwrap(),
        took: t.elapsed(),
    }
}

fn must_fail(o: &Outcome, what: &str) {
    eprintln!("{what}: exit {:?}: {}", o.code, o.stderr.trim());
    assert!(
        !o.stderr.contains("panicked"),
        "{what}: panic: {}",
        o.stderr
    );
    assert!(
        o.code.is_some() && o.code != Some(0),
        "{what}: exit {:?} (stderr: {})",
        o.code,
        o.stderr
    );
    assert!(
        !o.stderr.trim().is_empty(),
        "{what}: failed without a message"
    );
}

/// Every tool against one misbehaviour of the read path; each must fail,
/// or succeed (nbdinfo never reads) and then only with the right data.
fn all_tools_fail(bad: Bad, nbdinfo_too: bool) {
    all_tools_fail_on(Fake::start(bad), bad, nbdinfo_too);
}

fn all_tools_fail_on(f: Fake, bad: Bad, nbdinfo_too: bool) {
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("out.img");
    let what = format!("{bad:?}{}", if f.tls { " over TLS" } else { "" });
    let info = run_tool("nbdinfo", &[&f.uri()]);
    if nbdinfo_too {
        must_fail(&info, &format!("nbdinfo {what}"));
    } else {
        assert!(
            !info.stderr.contains("panicked"),
            "nbdinfo {what}: {}",
            info.stderr
        );
    }
    must_fail(
        &run_tool("nbddump", &[&f.uri()]),
        &format!("nbddump {what}"),
    );
    let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
    must_fail(&o, &format!("nbdcopy {what}"));
}

#[test]
fn hostile_server_handshake() {
    for bad in [
        Bad::GreetingMagic,
        Bad::TruncatedGreeting,
        Bad::OptReplyMagic,
        Bad::OptReplyHuge,
        Bad::Size(1 << 63),
        Bad::Size(u64::MAX),
    ] {
        all_tools_fail(bad, true);
    }
}

#[test]
fn hostile_server_replies() {
    for bad in [
        Bad::SimpleMagic,
        Bad::UnknownCookie,
        Bad::ChunkOutside,
        Bad::ChunkPastRequest,
        Bad::ChunkShort,
        Bad::DuplicateChunk,
        Bad::ErrorMessageTooLong,
        Bad::UnknownChunkType,
        Bad::UnknownErrno,
        Bad::TruncatedReply,
        Bad::NoneNotDone,
    ] {
        all_tools_fail(bad, false);
    }
}

#[test]
fn hostile_server_simple_replies() {
    // Without structured replies: a structured chunk is garbage.
    all_tools_fail(Bad::StructuredUnasked, false);
    {
        // A well-behaved old server: everything works, data is right.
        let f = Fake::start(Bad::NoStructured);
        let out = tempfile::tempdir().unwrap();
        let img = out.path().join("out.img");
        let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        let want: Vec<u8> = (0..SIZE).map(byte_at).collect();
        assert!(std::fs::read(&img).unwrap() == want, "wrong data");
    }
}

#[test]
fn hostile_server_block_status() {
    // nbdcopy asks for extents: it must fail, or copy the right data.
    for bad in [Bad::ZeroLengthExtent, Bad::ExtentsPastRequest] {
        let f = Fake::start(bad);
        let out = tempfile::tempdir().unwrap();
        let img = out.path().join("out.img");
        let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
        assert!(!o.stderr.contains("panicked"), "{bad:?}: {}", o.stderr);
        if o.code == Some(0) {
            let want: Vec<u8> = (0..SIZE).map(byte_at).collect();
            assert!(std::fs::read(&img).unwrap() == want, "{bad:?}: wrong data");
        } else {
            must_fail(&o, &format!("nbdcopy {bad:?}"));
        }
        let o = run_tool("nbdinfo", &["--map", &f.uri()]);
        assert!(!o.stderr.contains("panicked"), "{bad:?}: {}", o.stderr);
    }
}

#[test]
fn hostile_server_extended_headers() {
    // A well-behaved server with extended headers: the copy is right and
    // nbdinfo says so.
    {
        let f = Fake::start(Bad::ExtGood);
        let out = tempfile::tempdir().unwrap();
        let img = out.path().join("out.img");
        let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        let want: Vec<u8> = (0..SIZE).map(byte_at).collect();
        assert!(std::fs::read(&img).unwrap() == want, "wrong data");
        let info = run_ok(Command::new(our_bin("nbdinfo")).arg(f.uri()));
        assert!(info.contains("using extended packets"), "{info}");
    }
    // Each tool must fail on a bad extended read reply: an offset that
    // is not the request's, a payload length past 32 bits, a simple or
    // structured reply where only extended ones may come, and extended
    // ones that were never negotiated.
    for bad in [
        Bad::ExtOffsetMismatch,
        Bad::ExtHugeLength,
        Bad::ExtSimpleReply,
        Bad::ExtStructuredChunk,
        Bad::ExtUnasked,
    ] {
        all_tools_fail(bad, false);
    }
    // Bad BLOCK_STATUS_EXT: nbdcopy and nbdinfo --map fail (never copy
    // wrong data): the 32-bit type under extended headers, a descriptor
    // count that is not the descriptors', a zero-length extent, extents
    // past the request, a last extent past any offset.
    for bad in [
        Bad::ExtOldStatus,
        Bad::ExtStatusCount,
        Bad::ExtZeroExtent,
        Bad::ExtExtentsPastRequest,
        Bad::ExtLastExtentHuge,
    ] {
        let f = Fake::start(bad);
        let out = tempfile::tempdir().unwrap();
        let img = out.path().join("out.img");
        let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
        must_fail(&o, &format!("nbdcopy {bad:?}"));
        let o = run_tool("nbdinfo", &["--map", &f.uri()]);
        must_fail(&o, &format!("nbdinfo --map {bad:?}"));
    }
}

#[test]
fn hostile_server_stops_answering() {
    // The fake server reads the request, says nothing for 3 s and hangs
    // up: we wait (as libnbd does) and fail promptly at the hang-up.
    let f = Fake::start(Bad::StopsAnswering);
    let o = run_tool("nbddump", &[&f.uri()]);
    must_fail(&o, "nbddump StopsAnswering");
    assert!(o.took < Duration::from_secs(15), "took {:?}", o.took);
}

#[test]
fn hostile_server_read_only_accepts_writes() {
    // The server says read-only (and would ack writes): we never write.
    let f = Fake::start(Bad::ReadOnlyAcceptsWrites);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![1u8; SIZE as usize]).unwrap();
    let o = run_tool("nbdcopy", &[src.to_str().unwrap(), &f.uri()]);
    must_fail(&o, "nbdcopy to a read-only server");
}

#[test]
fn hostile_server_many_meta_contexts() {
    // 200,000 contexts nobody asked for: refused at the first, at once.
    let f = Fake::start(Bad::ManyMetaContexts);
    let o = run_tool("nbdinfo", &["--map", &f.uri()]);
    must_fail(&o, "nbdinfo --map ManyMetaContexts");
    assert!(o.stderr.contains("did not ask for"), "{}", o.stderr);
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("out.img");
    let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
    must_fail(&o, "nbdcopy ManyMetaContexts");
    assert!(o.took < Duration::from_secs(10), "took {:?}", o.took);
}

#[test]
fn hostile_server_many_exports() {
    // 100,000 exports is big but legal: listed whole, promptly.
    let f = Fake::start(Bad::ManyExports);
    let t = Instant::now();
    let o = Command::new(our_bin("nbdinfo"))
        .args(["--list", "--json", &f.uri()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 100_000);
    assert_eq!(exports[99_999]["export-name"], "export99999");
    eprintln!("nbdinfo --list of 100,000 exports: {:?}", t.elapsed());
}

#[test]
fn hostile_server_over_tls() {
    // TLS changes nothing: the same misbehaviours after STARTTLS.
    if !require_gnutls_tools() {
        return;
    }
    for (bad, nbdinfo_too) in [
        (Bad::OptReplyMagic, true),
        (Bad::OptReplyHuge, true),
        (Bad::Size(u64::MAX), true),
        (Bad::ManyMetaContexts, false),
        (Bad::UnknownCookie, false),
        (Bad::ChunkOutside, false),
        (Bad::ChunkPastRequest, false),
        (Bad::DuplicateChunk, false),
        (Bad::ErrorMessageTooLong, false),
        (Bad::TruncatedReply, false),
        (Bad::NoneNotDone, false),
    ] {
        all_tools_fail_on(Fake::start_tls(bad), bad, nbdinfo_too);
    }
    // And a well-behaved fake over TLS: the copy is whole and right.
    let f = Fake::start_tls(Bad::Size(SIZE));
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("out.img");
    let o = run_tool("nbdcopy", &[&f.uri(), img.to_str().unwrap()]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let want: Vec<u8> = (0..SIZE).map(byte_at).collect();
    assert!(std::fs::read(&img).unwrap() == want, "wrong data over TLS");
}
