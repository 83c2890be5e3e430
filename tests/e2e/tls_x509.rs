//! TLS with X.509 certificates: libnbd's clients against our server, our
//! clients against upstream nbdkit and qemu-nbd, and what must be
//! refused (a server signed by another CA, a client without a
//! certificate under `--tls-verify-peer`).

use std::process::{Command, Stdio};

use crate::common::*;
use crate::tls_common::*;

fn tls_args(c: &Creds) -> Vec<String> {
    vec![
        "--tls=require".into(),
        format!("--tls-certificates={}", c.pki.display()),
    ]
}

#[test]
fn tls_x509_libnbd_clients_against_ours() {
    if !require_gnutls_tools() || !require(&["nbdinfo", "nbdcopy"]) || !require_nbdsh() {
        return;
    }
    let c = creds();
    let mut args = tls_args(c);
    args.extend(["memory".into(), "4M".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::ours(&args);
    let uri = nbds_unix(&s, None, &certs_param(&c.ca_only));
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
    let out = nbdsh(&uri, "print(h.get_tls_negotiated(), h.get_size())");
    assert_eq!(out.trim(), "True 4194304");
}

#[test]
fn tls_x509_ours_against_upstream_nbdkit() {
    if !require_gnutls_tools() || !require(&["nbdkit"]) {
        return;
    }
    let c = creds();
    // Over TCP, where the certificate's name is checked.
    let port = free_port().to_string();
    let mut args = tls_args(c);
    args.extend(
        ["-f", "-i", "127.0.0.1", "-p", &port, "memory", "4M"]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut child = Command::new("nbdkit")
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
        assert!(t.elapsed().as_secs() < 20, "upstream nbdkit did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let check = || {
        let uri = format!("nbds://localhost:{port}/?{}", certs_param(&c.ca_only));
        let out = run_ok(Command::new(our_bin("nbdinfo")).arg(&uri));
        assert!(
            out.contains("protocol: newstyle-fixed with TLS, using structured packets"),
            "{out}"
        );
        assert!(out.contains(&format!("uri: {uri}")), "{out}");
        let st = run(Command::new(our_bin("nbdinfo")).args(["--is", "tls", &uri]));
        assert!(st.status.success(), "--is tls: {st:?}");
        let json = run_ok(Command::new(our_bin("nbdinfo")).args(["--json", &uri]));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["TLS"], true);
        let dir = tempfile::tempdir().unwrap();
        round_trip(&our_bin("nbdcopy"), &uri, &data_file(dir.path(), 4 << 20));
        // 127.0.0.1 is in the certificate too; other.example is not.
        let ip = format!("nbds://127.0.0.1:{port}/?{}", certs_param(&c.ca_only));
        run_ok(Command::new(our_bin("nbdinfo")).args(["--size", &ip]));
        let wrong = format!("{ip}&tls-hostname=other.example");
        let o = run(Command::new(our_bin("nbdinfo")).arg(&wrong));
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not valid for name"), "{err}");
        assert!(o.stdout.is_empty());
    };
    let r = std::panic::catch_unwind(check);
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn tls_x509_wrong_ca_is_refused_by_the_client() {
    if !require_gnutls_tools() || !require(&["nbdkit"]) {
        return;
    }
    let c = creds();
    let mut args = tls_args(c);
    args.extend(["memory".into(), "1M".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::upstream(&args);
    let uri = nbds_unix(&s, None, &certs_param(&c.other_ca));
    let o = run(Command::new(our_bin("nbdinfo")).arg(&uri));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TLS: handshake failed"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(o.stdout.is_empty(), "nothing about the export is printed");
    // Not verifying (tls-verify-peer=0) connects whatever signed it.
    let uri = format!("{uri}&tls-verify-peer=0");
    run_ok(Command::new(our_bin("nbdinfo")).args(["--size", &uri]));
}

#[test]
fn tls_x509_verify_peer_refuses_a_client_without_certificate() {
    if !require_gnutls_tools() || !require(&["nbdinfo"]) {
        return;
    }
    let c = creds();
    let mut args = tls_args(c);
    args.extend(["--tls-verify-peer".into(), "memory".into(), "1M".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::ours(&args);
    // With the client certificate (in the same directory): served.
    for nbdinfo in [our_bin("nbdinfo"), "nbdinfo".into()] {
        let ok = nbds_unix(&s, None, &certs_param(&c.pki));
        let out = run_ok(Command::new(&nbdinfo).args(["--size", &ok]));
        assert_eq!(out.trim(), "1048576");
        // Without: refused.
        let none = nbds_unix(&s, None, &certs_param(&c.ca_only));
        let o = run(Command::new(&nbdinfo).args(["--size", &none]));
        assert!(
            !o.status.success(),
            "{nbdinfo:?} without a certificate: {o:?}"
        );
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn tls_x509_ours_against_qemu_nbd() {
    if !require_gnutls_tools() || !require(&["qemu-nbd"]) {
        return;
    }
    let c = creds();
    let dir = tempfile::tempdir().unwrap();
    let img = data_file(dir.path(), 1 << 20);
    let sock = dir.path().join("sock");
    // qemu's X.509 server verifies clients by default: ours presents
    // client-cert.pem from the directory.
    let mut child = Command::new("qemu-nbd")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            c.pki.display()
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
    let check = || {
        let uri = format!(
            "nbds+unix:///?socket={}&{}",
            sock.display(),
            certs_param(&c.pki)
        );
        let out = run_ok(Command::new(our_bin("nbdinfo")).arg(&uri));
        assert!(out.contains("with TLS"), "{out}");
        assert!(out.contains("export-size: 1048576"), "{out}");
        let back = dir.path().join("back");
        run_ok(Command::new(our_bin("nbdcopy")).arg(&uri).arg(&back));
        assert!(std::fs::read(&img).unwrap() == std::fs::read(&back).unwrap());
        // Plaintext is refused by qemu-nbd.
        let plain = format!("nbd+unix:///?socket={}", sock.display());
        let o = run(Command::new(our_bin("nbdinfo")).arg(&plain));
        assert!(!o.status.success());
    };
    let r = std::panic::catch_unwind(check);
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}
