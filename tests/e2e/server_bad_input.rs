//! A client sending garbage gets the answer the protocol prescribes (or
//! a clean disconnect), and the server keeps serving its other clients.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x3_e889_0455_65a9;

fn connect(s: &Server) -> UnixStream {
    let c = UnixStream::connect(&s.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

fn greet(c: &mut UnixStream) {
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    c.write_all(&3u32.to_be_bytes()).unwrap();
}

fn send_opt(c: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).unwrap();
}

/// Read one option reply: (option, reply type, payload).
fn read_opt_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        OPT_REPLY_MAGIC
    );
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut p = vec![0u8; len as usize];
    c.read_exact(&mut p).unwrap();
    (opt, typ, p)
}

/// Negotiate structured replies and GO on the default export.
fn go(c: &mut UnixStream) {
    greet(c);
    send_opt(c, 8, &[]);
    assert_eq!(read_opt_reply(c).1, 1);
    send_opt(c, 7, &[0, 0, 0, 0, 0, 0]);
    loop {
        let (_, typ, _) = read_opt_reply(c);
        assert!(typ < 0x8000_0000, "GO failed: {typ:#x}");
        if typ == 1 {
            break;
        }
    }
}

fn request(c: &mut UnixStream, flags: u16, typ: u16, cookie: u64, offset: u64, count: u32) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    c.write_all(&b).unwrap();
}

/// Read one structured reply chunk: (flags, type, cookie, payload).
fn read_chunk(c: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x668e_33ef);
    let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
    let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut p = vec![0u8; len as usize];
    c.read_exact(&mut p).unwrap();
    (flags, typ, cookie, p)
}

fn error_of(chunk: &(u16, u16, u64, Vec<u8>)) -> u32 {
    assert_eq!(
        chunk.1 & 0x8000,
        0x8000,
        "expected an error chunk, got {chunk:?}"
    );
    u32::from_be_bytes(chunk.3[0..4].try_into().unwrap())
}

fn closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

/// Another client still gets served.
fn still_serving(s: &Server) {
    if !require(&["nbdinfo"]) {
        return;
    }
    let out = run_ok(Command::new("nbdinfo").args(["--size", &s.uri()]));
    assert_eq!(out.trim(), "1048576");
}

#[test]
fn bad_input_wrong_option_magic_closes() {
    let s = Server::ours(&["memory", "1M"]);
    let mut c = connect(&s);
    greet(&mut c);
    c.write_all(&[0xffu8; 16]).unwrap();
    assert!(closed(&mut c));
    still_serving(&s);
}

#[test]
fn bad_input_unknown_option_is_unsupported() {
    let s = Server::ours(&["memory", "1M"]);
    let mut c = connect(&s);
    greet(&mut c);
    send_opt(&mut c, 999, b"junk");
    let (opt, typ, _) = read_opt_reply(&mut c);
    assert_eq!((opt, typ), (999, 0x8000_0001));
    // Meta context before structured replies is invalid.
    send_opt(&mut c, 10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read_opt_reply(&mut c).1, 0x8000_0003);
    // A malformed GO is invalid, not fatal.
    send_opt(&mut c, 7, &[0, 0, 0, 9]);
    assert_eq!(read_opt_reply(&mut c).1, 0x8000_0003);
    // Negotiation still works afterwards.
    send_opt(&mut c, 8, &[]);
    assert_eq!(read_opt_reply(&mut c).1, 1);
    send_opt(&mut c, 7, &[0, 0, 0, 0, 0, 0]);
    let mut got_ack = false;
    for _ in 0..10 {
        if read_opt_reply(&mut c).1 == 1 {
            got_ack = true;
            break;
        }
    }
    assert!(got_ack);
    still_serving(&s);
}

#[test]
fn bad_input_oversized_option_closes() {
    let s = Server::ours(&["memory", "1M"]);
    let mut c = connect(&s);
    greet(&mut c);
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.write_all(&b).unwrap();
    assert!(closed(&mut c));
    still_serving(&s);
}

#[test]
fn bad_input_bad_requests_get_errors() {
    let s = Server::ours(&["memory", "1M"]);
    let mut c = connect(&s);
    go(&mut c);
    // Oversized read.
    request(&mut c, 0, 0, 1, 0, 0x7fff_ffff);
    let r = read_chunk(&mut c);
    assert_eq!(r.2, 1);
    assert_eq!(error_of(&r), 22);
    // Out of range read, and offset overflow.
    request(&mut c, 0, 0, 2, 1 << 20, 512);
    assert_eq!(error_of(&read_chunk(&mut c)), 22);
    request(&mut c, 0, 0, 3, u64::MAX - 10, 512);
    assert_eq!(error_of(&read_chunk(&mut c)), 22);
    // Unknown command and unknown flags.
    request(&mut c, 0, 99, 4, 0, 512);
    assert_eq!(error_of(&read_chunk(&mut c)), 22);
    request(&mut c, 0x4000, 0, 5, 0, 512);
    assert_eq!(error_of(&read_chunk(&mut c)), 22);
    // Zero-length read.
    request(&mut c, 0, 0, 6, 0, 0);
    assert_eq!(error_of(&read_chunk(&mut c)), 22);
    // A good read still works on the same connection.
    request(&mut c, 0, 0, 7, 0, 512);
    let r = read_chunk(&mut c);
    assert_eq!((r.1, r.2, r.3.len()), (1, 7, 8 + 512));
    // Bad request magic: the server hangs up.
    c.write_all(&[0u8; 28]).unwrap();
    assert!(closed(&mut c));
    still_serving(&s);
}

#[test]
fn bad_input_disconnect_mid_request() {
    let s = Server::ours(&["memory", "1M"]);
    for _ in 0..3 {
        let mut c = connect(&s);
        go(&mut c);
        request(&mut c, 0, 1, 1, 0, 65536);
        c.write_all(&[7u8; 1000]).unwrap();
        drop(c);
    }
    // Many requests in flight and then a hang-up without reading replies.
    let mut c = connect(&s);
    go(&mut c);
    for i in 0..64 {
        request(&mut c, 0, 0, i, 0, 65536);
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    still_serving(&s);
}
