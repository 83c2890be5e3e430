//! TLS for both sides of NBD (`NBD_OPT_STARTTLS`, `nbds://`,
//! `nbdkit --tls`): X.509 certificates with rustls, pre-shared keys with
//! OpenSSL (rustls has no external PSKs), both interoperable with the
//! GnuTLS of nbdkit, libnbd and qemu.
//!
//! - X.509, server: a directory as nbdkit's `--tls-certificates`
//!   (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, optional
//!   `ca-crl.pem`); with `--tls-verify-peer` clients must present a
//!   certificate the CA signed.
//! - X.509, client: a directory as libnbd's `tls-certificates=`
//!   (`ca-cert.pem`, optional `client-cert.pem` + `client-key.pem`,
//!   `ca-crl.pem`), or libnbd's default directories, else the system's
//!   CAs. The server's name is checked against `tls-hostname=` or the
//!   URI's host; over a Unix socket without `tls-hostname` only the
//!   chain is. `tls-verify-peer=0` checks nothing.
//! - PSK: psktool's file of `username:hexkey` lines, on both sides.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream TLS can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Bad TLS configuration: missing or unreadable files, bad keys.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

type TlsResult<T> = std::result::Result<T, TlsError>;

/// A reader and a writer used as one stream (a socket's halves).
#[derive(Debug)]
pub struct Joined<R, W> {
    /// The reading half.
    pub reader: R,
    /// The writing half.
    pub writer: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<R, W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<R, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.writer.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// An established TLS session over a connection.
pub enum TlsStream {
    /// X.509, either side.
    Rustls(Box<tokio_rustls::TlsStream<BoxIo>>),
    /// PSK, either side.
    Openssl(Box<tokio_openssl::SslStream<BoxIo>>),
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsStream::Rustls(_) => "TlsStream(X.509)",
            TlsStream::Openssl(_) => "TlsStream(PSK)",
        })
    }
}

impl TlsStream {
    /// The PSK username the peer used (server side), if PSK.
    pub fn psk_identity(&self) -> Option<String> {
        match self {
            TlsStream::Openssl(s) => s
                .ssl()
                .psk_identity()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            TlsStream::Rustls(_) => None,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            TlsStream::Rustls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            TlsStream::Openssl($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            TlsStream::Rustls(s) => s.is_write_vectored(),
            TlsStream::Openssl(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_shutdown(cx))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> TlsResult<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in `path`, as PKCS#8 that rustls takes. GnuTLS's
/// certtool writes an EC key's scalar as a minimal integer (31 or 33
/// bytes about one time in 256 and half the time), which ring refuses in
/// the SEC1 form; OpenSSL reads every form and writes the canonical one.
fn key(path: &Path) -> TlsResult<PrivateKeyDer<'static>> {
    let fail = |e: &dyn std::fmt::Display| TlsError(format!("{}: {e}", path.display()));
    let pem = std::fs::read(path).map_err(|e| fail(&e))?;
    let der = match openssl::pkey::PKey::private_key_from_pem(&pem) {
        Ok(k) => PrivateKeyDer::Pkcs8(k.private_key_to_pkcs8().map_err(|e| fail(&e))?.into()),
        Err(_) => PrivateKeyDer::from_pem_slice(&pem).map_err(|e| fail(&e))?,
    };
    provider()
        .key_provider
        .load_private_key(der.clone_key())
        .map_err(|e| fail(&e))?;
    Ok(der)
}

fn roots(path: &Path) -> TlsResult<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The CRLs of `dir/ca-crl.pem`, none if there is no such file.
fn crls(dir: &Path) -> TlsResult<Vec<CertificateRevocationListDer<'static>>> {
    let path = dir.join("ca-crl.pem");
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(&path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))
}

fn need(path: PathBuf) -> TlsResult<PathBuf> {
    match path.exists() {
        true => Ok(path),
        false => Err(TlsError(format!("{}: not found", path.display()))),
    }
}

/// The keys of a psktool file: `username:hexkey` lines.
pub fn read_psk_file(path: &Path) -> TlsResult<Vec<(String, Vec<u8>)>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let bad = || {
            TlsError(format!(
                "{}: line {}: expected username:hexkey",
                path.display(),
                n + 1
            ))
        };
        let (user, hex) = line.split_once(':').ok_or_else(bad)?;
        let key = decode_hex(hex).filter(|k| !k.is_empty()).ok_or_else(bad)?;
        if user.is_empty() || user.len() > 128 || key.len() > 256 {
            return Err(bad());
        }
        keys.push((user.to_string(), key));
    }
    if keys.is_empty() {
        return Err(TlsError(format!("{}: no keys in the file", path.display())));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// TLS 1.3 suites for PSK, AES first (AES-NI); the key schedule of an
/// external PSK is SHA-256, so no SHA-384 suite can be used.
const PSK_TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

fn ssl_err(what: &str, e: openssl::error::ErrorStack) -> TlsError {
    TlsError(format!("{what}: {e}"))
}

fn psk_context(server: bool) -> TlsResult<openssl::ssl::SslContextBuilder> {
    use openssl::ssl::{SslContext, SslMethod, SslOptions, SslVersion};
    let method = match server {
        true => SslMethod::tls_server(),
        false => SslMethod::tls_client(),
    };
    let mut b = SslContext::builder(method).map_err(|e| ssl_err("TLS", e))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| ssl_err("TLS", e))?;
    b.set_ciphersuites(PSK_TLS13_SUITES)
        .map_err(|e| ssl_err("TLS", e))?;
    b.set_options(SslOptions::NO_TICKET);
    Ok(b)
}

fn io_other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

enum ServerCreds {
    X509(tokio_rustls::TlsAcceptor),
    Psk(openssl::ssl::SslContext),
}

/// The server's TLS credentials (`nbdkit --tls-certificates` or
/// `--tls-psk`).
pub struct ServerTls {
    creds: ServerCreds,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.creds {
            ServerCreds::X509(_) => "ServerTls(X.509)",
            ServerCreds::Psk(_) => "ServerTls(PSK)",
        })
    }
}

impl ServerTls {
    /// X.509 credentials from `dir` (`ca-cert.pem` is needed only to
    /// verify clients, with `verify_peer`).
    pub fn x509(dir: &Path, verify_peer: bool) -> TlsResult<ServerTls> {
        let chain = certs(&need(dir.join("server-cert.pem"))?)?;
        let key = key(&need(dir.join("server-key.pem"))?)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = if verify_peer {
            let roots = roots(&need(dir.join("ca-cert.pem"))?)?;
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .with_crls(crls(dir)?)
            .build()
            .map_err(|e| TlsError(format!("{}: {e}", dir.display())))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError(format!("{}: {e}", dir.display())))?;
        Ok(ServerTls {
            creds: ServerCreds::X509(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// PSK credentials: clients log in with a username and key of `file`.
    pub fn psk(file: &Path) -> TlsResult<ServerTls> {
        let keys = read_psk_file(file)?;
        let mut b = psk_context(true)?;
        b.set_psk_server_callback(move |_, identity, out| {
            let Some(identity) = identity else {
                return Ok(0);
            };
            match keys.iter().find(|(u, _)| u.as_bytes() == identity) {
                Some((_, k)) if k.len() <= out.len() => {
                    out[..k.len()].copy_from_slice(k);
                    Ok(k.len())
                }
                _ => Ok(0),
            }
        });
        Ok(ServerTls {
            creds: ServerCreds::Psk(b.build()),
        })
    }

    /// Where nbdkit looks for certificates without `--tls-certificates`:
    /// `$HOME/.pki/nbdkit`, `$HOME/.config/pki/nbdkit`, or as root
    /// `/etc/pki/nbdkit`; the first that holds a server certificate.
    pub fn default_certificates_dir() -> Option<PathBuf> {
        default_dirs("nbdkit")
            .into_iter()
            .find(|d| d.join("server-cert.pem").exists())
    }

    /// Run the server's side of the TLS handshake on `io`.
    pub async fn accept(&self, io: BoxIo) -> io::Result<TlsStream> {
        match &self.creds {
            ServerCreds::X509(a) => {
                let s = a.accept(io).await?;
                Ok(TlsStream::Rustls(Box::new(
                    tokio_rustls::TlsStream::Server(s),
                )))
            }
            ServerCreds::Psk(ctx) => {
                let ssl = openssl::ssl::Ssl::new(ctx).map_err(io_other)?;
                let mut s = tokio_openssl::SslStream::new(ssl, io).map_err(io_other)?;
                Pin::new(&mut s).accept().await.map_err(io_other)?;
                Ok(TlsStream::Openssl(Box::new(s)))
            }
        }
    }
}

/// libnbd's or nbdkit's default certificate directories, in order.
fn default_dirs(program: &str) -> Vec<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return vec![PathBuf::from(format!("/etc/pki/{program}"))];
    }
    match std::env::var_os("HOME") {
        Some(home) => {
            let home = PathBuf::from(home);
            vec![
                home.join(".pki").join(program),
                home.join(".config/pki").join(program),
            ]
        }
        None => Vec::new(),
    }
}

/// What a client asks of TLS (from an `nbds://` URI's parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// `tls-certificates=DIR`.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer=0` turns verification off (default on).
    pub verify_peer: Option<bool>,
    /// `tls-psk-file=FILE`: PSK instead of X.509.
    pub psk_file: Option<PathBuf>,
    /// The PSK username (the URI's user, `tls-username=`); default the
    /// login name.
    pub username: Option<String>,
    /// `tls-hostname=`, else the URI's host, to check the certificate.
    pub hostname: Option<String>,
}

enum ClientCreds {
    X509 {
        connector: tokio_rustls::TlsConnector,
        name: ServerName<'static>,
    },
    Psk(openssl::ssl::SslContext),
}

/// A client's TLS credentials, ready to connect.
pub struct ClientTls {
    creds: ClientCreds,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.creds {
            ClientCreds::X509 { .. } => "ClientTls(X.509)",
            ClientCreds::Psk(_) => "ClientTls(PSK)",
        })
    }
}

/// The login name, as libnbd's default PSK username.
fn login_name() -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("LOGNAME").ok())
}

impl ClientTls {
    /// Credentials for `o`: PSK with a PSK file, else X.509.
    pub fn new(o: &ClientTlsOptions) -> TlsResult<ClientTls> {
        if let Some(file) = &o.psk_file {
            return Self::psk(file, o.username.as_deref());
        }
        Self::x509(o)
    }

    fn psk(file: &Path, username: Option<&str>) -> TlsResult<ClientTls> {
        let user = match username {
            Some(u) => u.to_string(),
            None => login_name().ok_or_else(|| {
                TlsError("TLS-PSK: no username given and no login name to use".into())
            })?,
        };
        let keys = read_psk_file(file)?;
        let key = keys
            .into_iter()
            .find(|(u, _)| *u == user)
            .map(|(_, k)| k)
            .ok_or_else(|| TlsError(format!("{}: no key for username '{user}'", file.display())))?;
        let mut b = psk_context(false)?;
        b.set_psk_client_callback(move |_, _hint, identity, out| {
            let u = user.as_bytes();
            // The identity goes out NUL-terminated.
            if u.len() >= identity.len() || key.len() > out.len() {
                return Ok(0);
            }
            identity[..u.len()].copy_from_slice(u);
            identity[u.len()] = 0;
            out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        Ok(ClientTls {
            creds: ClientCreds::Psk(b.build()),
        })
    }

    fn x509(o: &ClientTlsOptions) -> TlsResult<ClientTls> {
        let dir = match &o.certificates {
            Some(d) => Some(d.clone()),
            None => default_dirs("libnbd")
                .into_iter()
                .find(|d| d.join("ca-cert.pem").exists()),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let verify = o.verify_peer.unwrap_or(true);
        let builder = if verify {
            let (roots, crls) = match &dir {
                Some(d) => (roots(&need(d.join("ca-cert.pem"))?)?, crls(d)?),
                None => (system_roots()?, Vec::new()),
            };
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .with_crls(crls)
            .build()
            .map_err(|e| TlsError(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                    inner,
                    check_name: o.hostname.is_some(),
                }))
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerifier(provider())))
        };
        let client_cert = dir.as_ref().and_then(|d| {
            let (c, k) = (d.join("client-cert.pem"), d.join("client-key.pem"));
            (c.exists() && k.exists()).then_some((c, k))
        });
        let config = match client_cert {
            Some((c, k)) => builder
                .with_client_auth_cert(certs(&c)?, key(&k)?)
                .map_err(|e| TlsError(format!("{}: {e}", c.display())))?,
            None => builder.with_no_client_auth(),
        };
        // Over a Unix socket without tls-hostname there is no name to
        // check (only the chain is); rustls still wants one to send.
        let host = o.hostname.clone().unwrap_or_else(|| "localhost".into());
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| TlsError(format!("tls-hostname: '{host}' is not a valid name")))?;
        Ok(ClientTls {
            creds: ClientCreds::X509 {
                connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
                name,
            },
        })
    }

    /// Run the client's side of the TLS handshake on `io`.
    pub async fn connect(&self, io: BoxIo) -> io::Result<TlsStream> {
        match &self.creds {
            ClientCreds::X509 { connector, name } => {
                let s = connector.connect(name.clone(), io).await?;
                Ok(TlsStream::Rustls(Box::new(
                    tokio_rustls::TlsStream::Client(s),
                )))
            }
            ClientCreds::Psk(ctx) => {
                let ssl = openssl::ssl::Ssl::new(ctx).map_err(io_other)?;
                let mut s = tokio_openssl::SslStream::new(ssl, io).map_err(io_other)?;
                Pin::new(&mut s).connect().await.map_err(io_other)?;
                Ok(TlsStream::Openssl(Box::new(s)))
            }
        }
    }
}

fn system_roots() -> TlsResult<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsError(
            "no tls-certificates directory given, none in the default places, \
             and no system CA certificates"
                .into(),
        ));
    }
    Ok(roots)
}

/// The CA's verdict on the server's chain, and on its name when there is
/// one to check.
#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::UnixTime;
use rustls::{DigitallySignedStruct, SignatureScheme};

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError as C, Error as E};
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }))
                if !self.check_name =>
            {
                Ok(ServerCertVerified::assertion())
            }
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `tls-verify-peer=0`: any certificate is accepted (the handshake still
/// proves the server holds its key).
#[derive(Debug)]
struct NoVerifier(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EC key as certtool writes it one time in 256: a 31-byte scalar
    /// in SEC1, which ring alone refuses.
    const SHORT_SCALAR_EC_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHYCAQEEHwj2MhRR2iyFYiT/0pvghR1OY71EXmOiXLOL5Vs1fWSgCgYIKoZIzj0D
AQehRANCAAR6V/cPOSgt2gYomIeSAG7PatDRFyPP/3wJsn0HKLLCzEZBpRMec4F+
nqVCyRiBL3vNFX0vOSbKNR+pVcAQWkOK
-----END EC PRIVATE KEY-----
";

    #[test]
    fn keys_in_any_gnutls_form_load_and_bad_keys_name_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("client-key.pem");
        std::fs::write(&f, SHORT_SCALAR_EC_KEY).unwrap();
        assert!(matches!(key(&f).unwrap(), PrivateKeyDer::Pkcs8(_)));
        std::fs::write(
            &f,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = key(&f).unwrap_err().to_string();
        assert!(e.contains("client-key.pem"), "{e}");
    }

    #[test]
    fn psk_files_are_parsed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys.psk");
        std::fs::write(&f, "alice:00ff10\n\nbob:abcd\n").unwrap();
        assert_eq!(
            read_psk_file(&f).unwrap(),
            vec![
                ("alice".to_string(), vec![0, 0xff, 0x10]),
                ("bob".to_string(), vec![0xab, 0xcd])
            ]
        );
        for bad in ["alice", "alice:0", "alice:zz", ":00", "alice:", ""] {
            std::fs::write(&f, bad).unwrap();
            assert!(read_psk_file(&f).is_err(), "{bad:?}");
        }
        assert!(read_psk_file(&dir.path().join("none")).is_err());
    }

    #[test]
    fn missing_certificates_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = ServerTls::x509(dir.path(), false).unwrap_err();
        assert!(e.0.contains("server-cert.pem: not found"), "{e}");
        let e = ClientTls::new(&ClientTlsOptions {
            certificates: Some(dir.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("ca-cert.pem: not found"), "{e}");
        std::fs::write(dir.path().join("k.psk"), "alice:00ff\n").unwrap();
        let e = ClientTls::new(&ClientTlsOptions {
            psk_file: Some(dir.path().join("k.psk")),
            username: Some("bob".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("no key for username 'bob'"), "{e}");
    }
}
