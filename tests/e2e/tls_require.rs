//! `--tls=require` and `--tls=on` of our server: a plaintext client is
//! refused before anything about an export moves (the bytes on the
//! wire), `--tls=on` serves both kinds, `$tls` and `$uri` in `--run`,
//! bad TLS options, and a captive server that requires TLS.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use crate::common::*;
use crate::tls_common::*;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const ERR_TLS_REQD: u32 = 0x8000_0005;

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// One option reply: (option, type, payload).
fn reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..].try_into().unwrap());
    assert!(len < 4096, "an error reply carries a short message");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    )
}

#[test]
fn tls_require_refuses_plaintext_before_any_export_data() {
    if !require_gnutls_tools() {
        return;
    }
    let c = creds();
    let psk = format!("--tls-psk={}", c.psk.display());
    // An export whose bytes and size are easy to spot on the wire.
    let s = Server::ours(&["--tls=require", &psk, "pattern", "3M"]);
    let mut sock = UnixStream::connect(&s.socket).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut hello = [0u8; 18];
    sock.read_exact(&mut hello).unwrap();
    sock.write_all(&3u32.to_be_bytes()).unwrap();
    // GO, INFO, LIST, STRUCTURED_REPLY, meta contexts, an unknown option:
    // all NBD_REP_ERR_TLS_REQD.
    let go = [0u8; 6];
    let mut meta = [0, 0, 0, 0, 0, 0, 0, 0];
    meta[4..].copy_from_slice(&0u32.to_be_bytes());
    for (opt, data) in [
        (7u32, &go[..]),
        (6, &go[..]),
        (3, &[][..]),
        (8, &[][..]),
        (9, &meta[..]),
        (10, &meta[..]),
        (4242, &b"x"[..]),
    ] {
        send_option(&mut sock, opt, data);
        let (o, typ, msg) = reply(&mut sock);
        assert_eq!((o, typ), (opt, ERR_TLS_REQD), "option {opt}");
        assert!(String::from_utf8_lossy(&msg).contains("TLS is required"));
    }
    // EXPORT_NAME cannot be refused: the server hangs up, sending
    // nothing (no size, no flags, no data).
    send_option(&mut sock, 1, b"");
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "server sent {rest:?} after EXPORT_NAME");

    // STARTTLS is acknowledged, then the TLS handshake must follow.
    let mut sock = UnixStream::connect(&s.socket).unwrap();
    sock.read_exact(&mut hello).unwrap();
    sock.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut sock, 5, &[]);
    assert_eq!(reply(&mut sock), (5, 1, Vec::new()));

    // libnbd's client in plaintext: refused.
    if require(&["nbdinfo"]) {
        let o = run(Command::new("nbdinfo").arg(s.uri()));
        assert!(!o.status.success());
        assert!(!String::from_utf8_lossy(&o.stdout).contains("3145728"));
    }
}

#[test]
fn tls_on_serves_both_plaintext_and_tls() {
    if !require_gnutls_tools() || !require(&["nbdinfo"]) {
        return;
    }
    let c = creds();
    let certs = format!("--tls-certificates={}", c.pki.display());
    let s = Server::ours(&["--tls=on", &certs, "memory", "1M"]);
    let out = run_ok(Command::new("nbdinfo").arg(s.uri()));
    assert!(out.contains("without TLS"), "{out}");
    let uri = nbds_unix(&s, None, &certs_param(&c.ca_only));
    let out = run_ok(Command::new("nbdinfo").arg(&uri));
    assert!(out.contains("with TLS"), "{out}");
    // Certificates and no --tls: on, as nbdkit decides.
    let s = Server::ours(&[&certs, "memory", "1M"]);
    let out = run_ok(Command::new(our_bin("nbdinfo")).arg(s.uri()));
    assert!(out.contains("without TLS"), "{out}");
    let uri = nbds_unix(&s, None, &certs_param(&c.ca_only));
    let out = run_ok(Command::new(our_bin("nbdinfo")).arg(&uri));
    assert!(out.contains("with TLS"), "{out}");
}

#[test]
fn tls_run_sets_tls_and_uri() {
    if !require_gnutls_tools() {
        return;
    }
    let c = creds();
    let psk = format!("--tls-psk={}", c.psk.display());
    let run_tls = |mode: &str| {
        let mut cmd = Command::new(nbdkit());
        cmd.args(["-U", "-"]);
        if !mode.is_empty() {
            cmd.arg(mode).arg(&psk);
        }
        cmd.args(["memory", "1M", "--run", "echo \"${tls-unset} $uri\""]);
        run_ok(&mut cmd)
    };
    let out = run_tls("--tls=require");
    assert!(out.starts_with("2 nbds+unix://?socket="), "{out}");
    let out = run_tls("--tls=on");
    assert!(out.starts_with("1 nbd+unix://?socket="), "{out}");
    let out = run_tls("");
    assert!(out.starts_with("unset nbd+unix://?socket="), "{out}");
    // $uri and $tls as upstream's; and our nbdinfo on $uri with the key.
    let script = format!(
        "{} \"nbds+unix://alice@/?socket=$unixsocket&tls-psk-file={}\"",
        our_bin("nbdinfo").display(),
        c.psk.display()
    );
    let out = run_ok(Command::new(nbdkit()).args([
        "-U",
        "-",
        "--tls=require",
        &psk,
        "memory",
        "1M",
        "--run",
        &script,
    ]));
    assert!(out.contains("with TLS"), "{out}");
}

#[test]
fn tls_bad_options_fail_at_startup() {
    let home = tempfile::tempdir().unwrap();
    let fails = |args: &[&str], want: &str| {
        let o = run(Command::new(nbdkit())
            .env("HOME", home.path())
            .args(["-U", "-"])
            .args(args)
            .args(["memory", "1M", "--run", "true"]));
        assert_eq!(o.status.code(), Some(1), "{args:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    };
    // Run as root, nbdkit looks in /etc/pki/nbdkit: only without it there
    // are no certificates to be found.
    if !std::path::Path::new("/etc/pki/nbdkit/server-cert.pem").exists() {
        fails(
            &["--tls=require"],
            "--tls=require but could not load TLS certificates",
        );
    }
    fails(&["--tls=bogus"], "--tls: could not decipher 'bogus'");
    fails(
        &["--tls=require", "--tls-psk=/nonexistent/keys.psk"],
        "/nonexistent/keys.psk",
    );
    let empty = tempfile::tempdir().unwrap();
    let certs = format!("--tls-certificates={}", empty.path().display());
    fails(&["--tls=on", &certs], "server-cert.pem: not found");
}

#[test]
fn tls_captive_server_that_requires_tls_is_refused() {
    if !require_gnutls_tools() || !require(&["nbdinfo"]) {
        return;
    }
    let c = creds();
    let psk = format!("--tls-psk={}", c.psk.display());
    // libnbd connects to captive servers without TLS, and so do we: a
    // server that requires it refuses the export, for both alike.
    for nbdinfo in [our_bin("nbdinfo"), "nbdinfo".into()] {
        let o = run(Command::new(&nbdinfo).args([
            "--size",
            "--",
            "[",
            nbdkit().to_str().unwrap(),
            "--tls=require",
            &psk,
            "memory",
            "1M",
            "]",
        ]));
        assert_eq!(o.status.code(), Some(1), "{nbdinfo:?}: {o:?}");
        assert!(o.stdout.is_empty());
    }
    let o = run(Command::new(our_bin("nbdinfo")).args([
        "--",
        "[",
        nbdkit().to_str().unwrap(),
        "--tls=require",
        &psk,
        "memory",
        "1M",
        "]",
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("NBD_REP_ERR_TLS_REQD"), "{err}");
}
