//! TLS with pre-shared keys (psktool's `username:hexkey` files): libnbd's
//! clients against our server, ours against upstream nbdkit and qemu-nbd,
//! and a wrong key or user refused.

use std::process::{Command, Stdio};

use crate::common::*;
use crate::tls_common::*;

fn psk_server(prog: &std::path::Path, c: &Creds) -> Server {
    let psk = format!("--tls-psk={}", c.psk.display());
    Server::start_with(prog, &["--tls=require", &psk, "memory", "4M"])
}

#[test]
fn tls_psk_libnbd_clients_against_ours() {
    if !require_gnutls_tools() || !require(&["nbdinfo", "nbdcopy"]) || !require_nbdsh() {
        return;
    }
    let c = creds();
    let s = psk_server(&nbdkit(), c);
    let uri = nbds_unix(&s, Some("alice"), &psk_param(&c.psk));
    let out = run_ok(Command::new("nbdinfo").arg(&uri));
    assert!(
        out.contains("protocol: newstyle-fixed with TLS, using structured packets"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        std::path::Path::new("nbdcopy"),
        &uri,
        &data_file(dir.path(), 4 << 20),
    );
    let out = nbdsh(&uri, "print(h.get_tls_negotiated(), h.get_tls_username())");
    assert_eq!(out.trim(), "True alice");
}

#[test]
fn tls_psk_ours_against_upstream_nbdkit() {
    if !require_gnutls_tools() || !require(&["nbdkit"]) {
        return;
    }
    let c = creds();
    let s = psk_server(std::path::Path::new("nbdkit"), c);
    let uri = nbds_unix(&s, Some("alice"), &psk_param(&c.psk));
    let out = run_ok(Command::new(our_bin("nbdinfo")).arg(&uri));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains(&format!("uri: {uri}")), "{out}");
    // tls-username= says the same as the authority's user.
    let by_param = format!(
        "nbds+unix:///?socket={}&tls-username=alice&{}",
        s.socket.display(),
        psk_param(&c.psk)
    );
    let out = run_ok(Command::new(our_bin("nbdinfo")).args(["--size", &by_param]));
    assert_eq!(out.trim(), "4194304");
    let dir = tempfile::tempdir().unwrap();
    round_trip(&our_bin("nbdcopy"), &uri, &data_file(dir.path(), 4 << 20));
}

#[test]
fn tls_psk_wrong_key_or_user_is_refused() {
    if !require_gnutls_tools() || !require(&["nbdkit"]) {
        return;
    }
    let c = creds();
    for prog in [nbdkit(), "nbdkit".into()] {
        let s = psk_server(&prog, c);
        // The same user with another key: the handshake fails.
        let uri = nbds_unix(&s, Some("alice"), &psk_param(&c.wrong_psk));
        let o = run(Command::new(our_bin("nbdinfo")).arg(&uri));
        assert_eq!(o.status.code(), Some(1), "{prog:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("TLS: handshake failed"), "{prog:?}: {err}");
        assert!(o.stdout.is_empty());
        // A user the file does not have: refused before connecting.
        let uri = nbds_unix(&s, Some("bob"), &psk_param(&c.psk));
        let o = run(Command::new(our_bin("nbdinfo")).arg(&uri));
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("no key for username 'bob'"), "{err}");
    }
    // libnbd's client with the wrong key against our server.
    if require(&["nbdinfo"]) {
        let s = psk_server(&nbdkit(), c);
        let uri = nbds_unix(&s, Some("alice"), &psk_param(&c.wrong_psk));
        let o = run(Command::new("nbdinfo").arg(&uri));
        assert!(!o.status.success());
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn tls_psk_ours_against_qemu_nbd() {
    if !require_gnutls_tools() || !require(&["qemu-nbd"]) {
        return;
    }
    let c = creds();
    let dir = tempfile::tempdir().unwrap();
    let img = data_file(dir.path(), 1 << 20);
    let sock = dir.path().join("sock");
    // qemu's PSK credentials: DIR/keys.psk.
    let mut child = Command::new("qemu-nbd")
        .arg("--object")
        .arg(format!(
            "tls-creds-psk,id=tls0,dir={},endpoint=server",
            c.psk.parent().unwrap().display()
        ))
        .args(["--tls-creds", "tls0", "-f", "raw", "-t", "-k"])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed().as_secs() < 20, "qemu-nbd did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!(
        "nbds+unix://alice@/?socket={}&{}",
        sock.display(),
        psk_param(&c.psk)
    );
    let back = dir.path().join("back");
    let o = run(Command::new(our_bin("nbdcopy")).arg(&uri).arg(&back));
    let _ = child.kill();
    let _ = child.wait();
    assert!(o.status.success(), "{o:?}");
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&back).unwrap());
}
