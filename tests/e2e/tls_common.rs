//! Credentials for the TLS tests, made as nbdkit-tls(1) shows: X.509
//! certificates with GnuTLS's `certtool` (a CA, a server certificate for
//! `localhost`/127.0.0.1, a client certificate; and an unrelated CA), and
//! pre-shared keys with `psktool`. Made once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::*;

/// Directories of credentials, in upstream's layouts.
pub struct Creds {
    _dir: tempfile::TempDir,
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
    /// `client-cert.pem`, `client-key.pem`: for servers and clients.
    pub pki: PathBuf,
    /// `ca-cert.pem` alone: a client that trusts the CA but has no
    /// certificate of its own.
    pub ca_only: PathBuf,
    /// `ca-cert.pem` of another CA, which signed nothing here.
    pub other_ca: PathBuf,
    /// `keys.psk`: user `alice`.
    pub psk: PathBuf,
    /// `keys.psk` with another key for `alice`.
    pub wrong_psk: PathBuf,
}

/// Are certtool and psktool installed (gnutls-bin)?
pub fn require_gnutls_tools() -> bool {
    require(&["certtool", "psktool"])
}

fn certtool(args: &[&str], out: &Path) {
    let o = run(Command::new("certtool").args(args));
    assert!(
        o.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(out, o.stdout).unwrap();
}

fn privkey(out: &Path, ecdsa: bool) {
    let mut args = vec!["--generate-privkey"];
    if ecdsa {
        args.push("--key-type=ecdsa");
    }
    certtool(&args, out);
}

fn ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    privkey(&dir.join("ca-key.pem"), false);
    let info = dir.join("ca.info");
    std::fs::write(
        &info,
        format!("cn = {cn}\nca\ncert_signing_key\nexpiration_days = 30\n"),
    )
    .unwrap();
    certtool(
        &[
            "--generate-self-signed",
            "--load-privkey",
            dir.join("ca-key.pem").to_str().unwrap(),
            "--template",
            info.to_str().unwrap(),
        ],
        &dir.join("ca-cert.pem"),
    );
}

fn issue(ca: &Path, name: &str, template: &str, ecdsa: bool) {
    let key = ca.join(format!("{name}-key.pem"));
    privkey(&key, ecdsa);
    let info = ca.join(format!("{name}.info"));
    std::fs::write(&info, template).unwrap();
    certtool(
        &[
            "--generate-certificate",
            "--load-ca-certificate",
            ca.join("ca-cert.pem").to_str().unwrap(),
            "--load-ca-privkey",
            ca.join("ca-key.pem").to_str().unwrap(),
            "--load-privkey",
            key.to_str().unwrap(),
            "--template",
            info.to_str().unwrap(),
        ],
        &ca.join(format!("{name}-cert.pem")),
    );
}

fn psk(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let o = run(Command::new("psktool")
        .args(["-u", "alice", "-p"])
        .arg(path));
    assert!(o.status.success(), "psktool: {o:?}");
}

/// The credentials (made on first use).
pub fn creds() -> &'static Creds {
    static CREDS: OnceLock<Creds> = OnceLock::new();
    CREDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        ca(&pki, "nbd-rs test CA");
        issue(
            &pki,
            "server",
            "organization = nbd-rs\ncn = localhost\ndns_name = localhost\n\
             ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n\
             expiration_days = 30\n",
            false,
        );
        issue(
            &pki,
            "client",
            "organization = nbd-rs\ncn = client.example.com\ntls_www_client\n\
             encryption_key\nsigning_key\nexpiration_days = 30\n",
            true,
        );
        let ca_only = dir.path().join("ca-only");
        std::fs::create_dir_all(&ca_only).unwrap();
        std::fs::copy(pki.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
        let other = dir.path().join("other-ca");
        ca(&other, "someone else's CA");
        let psk_file = dir.path().join("psk/keys.psk");
        psk(&psk_file);
        let wrong = dir.path().join("wrong-psk/keys.psk");
        psk(&wrong);
        Creds {
            pki,
            ca_only,
            other_ca: other,
            psk: psk_file,
            wrong_psk: wrong,
            _dir: dir,
        }
    })
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nbds+unix://` of a server's socket with extra query parameters.
pub fn nbds_unix(server: &Server, user: Option<&str>, query: &str) -> String {
    let user = user.map(|u| format!("{u}@")).unwrap_or_default();
    format!(
        "nbds+unix://{user}/?socket={}&{query}",
        server.socket.display()
    )
}

/// `tls-certificates=DIR`.
pub fn certs_param(dir: &Path) -> String {
    format!("tls-certificates={}", dir.display())
}

/// `tls-psk-file=FILE`.
pub fn psk_param(file: &Path) -> String {
    format!("tls-psk-file={}", file.display())
}

/// A file of `len` pseudo-random bytes in `dir`.
pub fn data_file(dir: &Path, len: usize) -> PathBuf {
    let f = dir.join("data");
    random_file(&f, len, 7);
    f
}

/// Copy `file` into `uri` with `nbdcopy`, back out into another file,
/// and check the bytes came back the same.
pub fn round_trip(nbdcopy: &Path, uri: &str, file: &Path) {
    let back = file.with_extension("back");
    run_ok(Command::new(nbdcopy).arg(file).arg(uri));
    run_ok(Command::new(nbdcopy).arg(uri).arg(&back));
    assert!(
        std::fs::read(file).unwrap() == std::fs::read(&back).unwrap(),
        "{} changed through {uri}",
        file.display()
    );
}

/// Run `script` in libnbd's `nbdsh` connected to `uri` (with the local
/// files a TLS URI names allowed, which `nbdsh -u` refuses); stdout.
pub fn nbdsh(uri: &str, script: &str) -> String {
    run_ok(
        Command::new("nbdsh")
            .env("PYTHONPATH", "/usr/lib/python3/dist-packages")
            .args(["-c", "h.set_uri_allow_local_file(True)", "-c"])
            .arg(format!("h.connect_uri({uri:?})"))
            .args(["-c", script]),
    )
}
