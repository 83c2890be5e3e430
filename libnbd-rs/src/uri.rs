//! NBD URIs (`reference/nbd-uri.md`), parsed and formatted the way
//! libnbd's `nbd_connect_uri` and `nbd_get_uri` do.
//!
//! | URI                                    | transport | export |
//! |----------------------------------------|-----------|--------|
//! | `nbd://example.com/disk`               | TCP `example.com:10809` | `disk` |
//! | `nbd://[::1]:10810/`                   | TCP `[::1]:10810` | `""` |
//! | `nbd+unix:///disk?socket=/tmp/sock`    | Unix `/tmp/sock` | `disk` |
//! | `nbd+unix:///?socket=%00/abstract`     | abstract Unix socket | `""` |
//! | `nbd+vsock://2:10809/`                 | vsock CID 2, port 10809 | `""` |
//! | `nbd+ssh://bob@far:2222/d?socket=/s`   | `ssh -p 2222 -o User=bob -- far nc -U /s` | `d` |
//! | `nbd+ssh://far/?nbd-port=10810`        | `ssh -p 22 -- far nc localhost 10810` | `""` |
//! | `nbds://host/x`, `nbds+unix://...`     | as above, TLS required | |
//!
//! With `nbd+ssh` and `nbds+ssh` (as in libnbd 1.22) the authority is
//! the ssh server (port 22 by default, the userinfo is the ssh user), and
//! the connection is ssh's stdin and stdout, forwarded by `nc` on the far
//! side to `socket=PATH` there, or else to its localhost port `nbd-port`
//! (10809 by default); `compress=true` runs `ssh -C`. A host starting
//! with `-` is an error. `nbds+ssh` runs TLS over the tunnel (the TLS
//! user name is then `tls-username`, and the certificate is checked
//! against the ssh host name). See [`crate::client::SshTarget`].
//!
//! The export name is the path without its leading `/`,
//! percent-decoded: `nbd://h//disk` is `/disk`, `nbd://h/a%20b` is
//! `a b`. Query parameters: `socket`, `tls-certificates`,
//! `tls-psk-file`, `tls-username`, `tls-hostname`, `tls-type`,
//! `tls-verify-peer`, `nbd-port` and `compress` (ssh only), and
//! experimental `x-*` ones; anything else is an error. A `+` in the query is a plain `+` (not a space), as in libnbd.

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv6Addr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

use crate::client::{
    ClientTlsOptions, ConnectOptions, Connection, Error, Negotiation, Result, SshRemote, SshTarget,
    TlsPolicy, Transport, DEFAULT_PORT, DEFAULT_SSH_PORT, VSOCK_CID_HOST,
};

/// A malformed NBD URI; the message names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI {uri:?}: {message}")]
pub struct UriError {
    uri: String,
    message: String,
}

impl UriError {
    fn new(uri: &str, message: impl Into<String>) -> Self {
        UriError {
            uri: uri.to_string(),
            message: message.into(),
        }
    }
    /// What is wrong, without the URI.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Uri {
    /// TLS required (`nbds`, `nbds+unix`, `nbds+vsock`).
    pub tls: bool,
    /// Where the server is.
    pub transport: Transport,
    /// The export name (decoded).
    pub export_name: String,
    /// User name for TLS (the authority's userinfo, or `tls-username`;
    /// with ssh only `tls-username`, the userinfo being the ssh user).
    pub username: Option<String>,
    /// `tls-certificates=DIR`.
    pub tls_certificates: Option<String>,
    /// `tls-psk-file=FILE`.
    pub tls_psk_file: Option<String>,
    /// `tls-hostname=NAME`.
    pub tls_hostname: Option<String>,
    /// `tls-type=anon|x509|psk`.
    pub tls_type: Option<String>,
    /// `tls-verify-peer=0|1`.
    pub tls_verify_peer: Option<bool>,
    /// Experimental `x-*` parameters, in order.
    pub extra: Vec<(String, String)>,
}

const SCHEMES: &str = "nbd, nbds, nbd+unix, nbds+unix, nbd+vsock, nbds+vsock, nbd+ssh or nbds+ssh";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Unix,
    Vsock,
    Ssh,
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Decode `%XX` escapes.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn push_escaped(out: &mut String, b: u8) {
    out.push_str(&format!("%{b:02X}"));
}

/// Escape a path the way libnbd (libxml2) does: keep unreserved
/// characters and `/;@&=+$,!~*'()`, escape the rest.
fn escape_path(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()/;@&=+$,".contains(&b) {
            out.push(b as char);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// Escape a query value. libnbd prints query values raw; we escape only
/// what would change their meaning (`%`, `&`, `#`, space, control and
/// non-ASCII bytes), so common paths come out exactly as libnbd's.
fn escape_query(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_graphic() && !b"%&#".contains(&b) {
            out.push(b as char);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// Escape a host name (RFC 3986's reg-name: unreserved characters and
/// sub-delims are kept), so that one decoded from `%2F` or `%3A` prints
/// as a URI that parses back to it.
fn escape_host(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// Escape userinfo (user names).
fn escape_userinfo(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

impl Uri {
    /// A URI for `transport` and `export_name`, without TLS.
    pub fn new(transport: Transport, export_name: impl Into<String>) -> Uri {
        Uri {
            tls: false,
            transport,
            export_name: export_name.into(),
            username: None,
            tls_certificates: None,
            tls_psk_file: None,
            tls_hostname: None,
            tls_type: None,
            tls_verify_peer: None,
            extra: Vec::new(),
        }
    }

    /// Does `s` start with one of the NBD URI schemes? (For tools
    /// deciding between a URI and a file name.)
    pub fn is_nbd_uri(s: &str) -> bool {
        match s.split_once(':') {
            Some((scheme, _)) => scheme_kind(scheme).is_some(),
            None => false,
        }
    }

    /// Parse an NBD URI.
    pub fn parse(uri: &str) -> std::result::Result<Uri, UriError> {
        let err = |m: String| UriError::new(uri, m);
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| err(format!("no scheme (expected {SCHEMES})")))?;
        let (tls, kind) = scheme_kind(scheme)
            .ok_or_else(|| err(format!("unknown scheme {scheme:?} (expected {SCHEMES})")))?;
        if rest.contains('#') {
            return Err(err("NBD URIs have no fragment ('#')".into()));
        }
        let (hier, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match hier.strip_prefix("//") {
            Some(a) => match a.find('/') {
                Some(i) => (Some(&a[..i]), &a[i..]),
                None => (Some(a), ""),
            },
            None => (None, hier),
        };
        if !path.is_empty() && !path.starts_with('/') {
            return Err(err(format!(
                "export name path {path:?} must start with '/'"
            )));
        }

        // Export name.
        let export = path.strip_prefix('/').unwrap_or(path);
        let export = percent_decode(export)
            .ok_or_else(|| err("bad percent-encoding in the export name".into()))?;
        let export_name = String::from_utf8(export)
            .map_err(|_| err("the export name is not valid UTF-8".into()))?;
        if export_name.contains('\0') {
            return Err(err("the export name contains a NUL byte".into()));
        }
        if export_name.len() > crate::protocol::MAX_STRING {
            return Err(err("the export name is longer than 4096 bytes".into()));
        }

        // Authority: [userinfo@]host[:port]
        let mut username = None;
        let mut host = String::new();
        let mut port: Option<&str> = None;
        if let Some(a) = authority {
            let hostport = match a.rsplit_once('@') {
                Some((user, hp)) => {
                    if user.contains(':') {
                        return Err(err("passwords in the userinfo are not supported".into()));
                    }
                    let u = percent_decode(user)
                        .and_then(|u| String::from_utf8(u).ok())
                        .ok_or_else(|| err(format!("bad user name {user:?}")))?;
                    username = Some(u);
                    hp
                }
                None => a,
            };
            if let Some(v6) = hostport.strip_prefix('[') {
                let (addr, after) = v6
                    .split_once(']')
                    .ok_or_else(|| err(format!("host {hostport:?}: missing ']'")))?;
                addr.parse::<Ipv6Addr>()
                    .map_err(|_| err(format!("host: bad IPv6 address {addr:?}")))?;
                host = addr.to_string();
                if !after.is_empty() {
                    port = Some(after.strip_prefix(':').ok_or_else(|| {
                        err(format!("unexpected {after:?} after the IPv6 address"))
                    })?);
                }
            } else {
                let (h, p) = match hostport.split_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (hostport, None),
                };
                let bad = h
                    .bytes()
                    .find(|&b| !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b)));
                if let Some(b) = bad {
                    return Err(err(format!(
                        "host {h:?}: invalid character {:?}",
                        b as char
                    )));
                }
                let decoded = percent_decode(h)
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| err(format!("host {h:?}: bad percent-encoding")))?;
                host = decoded;
                port = p;
            }
        }
        // An empty port ("host:") means the default, as in RFC 3986.
        let port = port.filter(|p| !p.is_empty());

        // Query.
        let mut socket: Option<OsString> = None;
        let mut nbd_port: Option<u16> = None;
        let mut compress = false;
        let mut u = Uri::new(Transport::Unix(PathBuf::new()), export_name);
        u.tls = tls;
        let ssh_user = if kind == Kind::Ssh {
            username
        } else {
            u.username = username;
            None
        };
        let mut seen: Vec<String> = Vec::new();
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').ok_or_else(|| {
                err(format!(
                    "query parameter {param:?} has no value ('key=value')"
                ))
            })?;
            let key = percent_decode(k)
                .and_then(|k| String::from_utf8(k).ok())
                .ok_or_else(|| err(format!("query parameter {k:?}: bad percent-encoding")))?;
            let value = percent_decode(v)
                .ok_or_else(|| err(format!("query parameter {key}: bad percent-encoding")))?;
            if seen.contains(&key) {
                return Err(err(format!("query parameter {key} given twice")));
            }
            seen.push(key.clone());
            if key == "socket" {
                if value.is_empty() {
                    return Err(err("socket= is empty".into()));
                }
                socket = Some(OsString::from_vec(value));
                continue;
            }
            let value = String::from_utf8(value)
                .map_err(|_| err(format!("query parameter {key}: not valid UTF-8")))?;
            if matches!(key.as_str(), "nbd-port" | "compress") && kind != Kind::Ssh {
                return Err(err(format!(
                    "{key}= is only allowed with nbd+ssh and nbds+ssh, not {scheme}"
                )));
            }
            match key.as_str() {
                "nbd-port" => {
                    nbd_port = Some(match value.parse::<u16>() {
                        Ok(n) if n > 0 && value.bytes().all(|b| b.is_ascii_digit()) => n,
                        _ => {
                            return Err(err(format!(
                                "nbd-port={value}: not a number from 1 to 65535"
                            )))
                        }
                    })
                }
                "compress" => {
                    compress = match value.as_str() {
                        "1" | "true" | "on" | "yes" => true,
                        "0" | "false" | "off" | "no" => false,
                        _ => return Err(err(format!("compress={value}: expected true or false"))),
                    }
                }
                "tls-certificates" => u.tls_certificates = Some(value),
                "tls-psk-file" => u.tls_psk_file = Some(value),
                "tls-username" => u.username = Some(value),
                "tls-hostname" => u.tls_hostname = Some(value),
                "tls-type" => {
                    if !matches!(value.as_str(), "anon" | "x509" | "psk") {
                        return Err(err(format!("tls-type={value}: expected anon, x509 or psk")));
                    }
                    u.tls_type = Some(value)
                }
                "tls-verify-peer" => {
                    u.tls_verify_peer = Some(match value.as_str() {
                        "1" | "true" | "on" | "yes" => true,
                        "0" | "false" | "off" | "no" => false,
                        _ => return Err(err(format!("tls-verify-peer={value}: expected 0 or 1"))),
                    })
                }
                k if k.starts_with("x-") => u.extra.push((key.clone(), value)),
                _ => return Err(err(format!("unknown query parameter {key:?}"))),
            }
        }

        u.transport = match kind {
            Kind::Unix => {
                if !host.is_empty() || port.is_some() {
                    return Err(err(format!(
                        "{scheme}: a Unix socket URI has no host or port \
                         (use {scheme}:///EXPORT?socket=PATH)"
                    )));
                }
                let s = socket.ok_or_else(|| {
                    err(format!(
                        "{scheme}: the socket=PATH query parameter is required"
                    ))
                })?;
                Transport::Unix(PathBuf::from(s))
            }
            Kind::Tcp | Kind::Vsock if socket.is_some() => {
                return Err(err(format!(
                    "socket= is only allowed with nbd+unix, nbds+unix, nbd+ssh and nbds+ssh, \
                     not {scheme}"
                )))
            }
            Kind::Ssh => {
                if host.is_empty() {
                    return Err(err(format!(
                        "{scheme}: the ssh host is missing ({scheme}://[USER@]HOST[:PORT]/...)"
                    )));
                }
                if host.starts_with('-') {
                    return Err(err(format!(
                        "{scheme}: the host {host:?} starts with '-' (refused: ssh would take \
                         it for an option)"
                    )));
                }
                if socket.is_some() && nbd_port.is_some() {
                    return Err(err("socket= and nbd-port= cannot both be given".into()));
                }
                let port = match port {
                    None => DEFAULT_SSH_PORT,
                    Some(p) => match p.parse::<u16>() {
                        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                        _ => {
                            return Err(err(format!("port {p:?} is not a number from 1 to 65535")))
                        }
                    },
                };
                let remote = match socket {
                    Some(s) => SshRemote::Unix(PathBuf::from(s)),
                    None => SshRemote::Tcp(nbd_port.unwrap_or(DEFAULT_PORT)),
                };
                let t = SshTarget {
                    host,
                    port,
                    user: ssh_user,
                    compress,
                    remote,
                };
                t.check().map_err(|e| err(e.to_string()))?;
                Transport::Ssh(Box::new(t))
            }
            Kind::Tcp => {
                let port = match port {
                    None => DEFAULT_PORT,
                    Some(p) => match p.parse::<u16>() {
                        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                        _ => {
                            return Err(err(format!("port {p:?} is not a number from 1 to 65535")))
                        }
                    },
                };
                let host = if host.is_empty() {
                    "localhost".to_string()
                } else {
                    host
                };
                Transport::Tcp { host, port }
            }
            Kind::Vsock => {
                let cid = if host.is_empty() {
                    VSOCK_CID_HOST
                } else {
                    host.parse::<u32>()
                        .map_err(|_| err(format!("vsock CID {host:?} is not a number")))?
                };
                let port = match port {
                    None => u32::from(DEFAULT_PORT),
                    Some(p) => p
                        .parse::<u32>()
                        .ok()
                        .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| err(format!("vsock port {p:?} is not a number")))?,
                };
                Transport::Vsock { cid, port }
            }
        };
        Ok(u)
    }

    /// The scheme: `nbd`, `nbds+unix`, ...
    pub fn scheme(&self) -> &'static str {
        match (&self.transport, self.tls) {
            (Transport::Tcp { .. }, false) => "nbd",
            (Transport::Tcp { .. }, true) => "nbds",
            (Transport::Unix(_), false) => "nbd+unix",
            (Transport::Unix(_), true) => "nbds+unix",
            (Transport::Vsock { .. }, false) => "nbd+vsock",
            (Transport::Vsock { .. }, true) => "nbds+vsock",
            (Transport::Ssh(_), false) => "nbd+ssh",
            (Transport::Ssh(_), true) => "nbds+ssh",
        }
    }

    /// Options for connecting to this URI: `base` with the URI's export
    /// name.
    pub fn options(&self, base: &ConnectOptions) -> ConnectOptions {
        let mut o = base.clone();
        o.export_name = self.export_name.clone();
        o
    }

    /// What TLS this URI asks for: its `tls-*` parameters, the user
    /// name, and the host to check the certificate against.
    pub fn tls_options(&self) -> ClientTlsOptions {
        let hostname = self.tls_hostname.clone().or(match &self.transport {
            Transport::Tcp { host, .. } => Some(host.clone()),
            Transport::Ssh(t) => Some(t.host.clone()),
            _ => None,
        });
        ClientTlsOptions {
            certificates: self.tls_certificates.as_ref().map(PathBuf::from),
            verify_peer: self.tls_verify_peer,
            psk_file: self.tls_psk_file.as_ref().map(PathBuf::from),
            username: self.username.clone(),
            hostname,
        }
    }

    fn check_tls(&self) -> Result<()> {
        match self.tls_type.as_deref() {
            Some("anon") => Err(Error::Unsupported(
                "tls-type=anon: anonymous TLS is not supported".into(),
            )),
            Some("psk") if self.tls_psk_file.is_none() => Err(Error::InvalidArgument(
                "tls-type=psk needs tls-psk-file=FILE".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Connect and start negotiating (option mode) for this URI's export:
    /// `nbds` URIs require TLS, with the URI's TLS parameters.
    pub async fn negotiate(&self, opts: &ConnectOptions) -> Result<Negotiation> {
        self.check_tls()?;
        let mut opts = self.options(opts);
        if self.tls {
            opts.tls = TlsPolicy::Require(self.tls_options());
        }
        let mut n = Negotiation::open(&self.transport, &opts).await?;
        n.set_uri(self.clone());
        Ok(n)
    }

    /// Connect and open this URI's export.
    pub async fn connect(&self, opts: &ConnectOptions) -> Result<Connection> {
        self.negotiate(opts).await?.go().await
    }
}

fn scheme_kind(scheme: &str) -> Option<(bool, Kind)> {
    Some(match scheme.to_ascii_lowercase().as_str() {
        "nbd" => (false, Kind::Tcp),
        "nbds" => (true, Kind::Tcp),
        "nbd+unix" => (false, Kind::Unix),
        "nbds+unix" => (true, Kind::Unix),
        "nbd+vsock" => (false, Kind::Vsock),
        "nbds+vsock" => (true, Kind::Vsock),
        "nbd+ssh" => (false, Kind::Ssh),
        "nbds+ssh" => (true, Kind::Ssh),
        _ => return None,
    })
}

impl FromStr for Uri {
    type Err = UriError;
    fn from_str(s: &str) -> std::result::Result<Uri, UriError> {
        Uri::parse(s)
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme())?;
        let mut query: Vec<(String, String)> = Vec::new();
        // With ssh the userinfo is the ssh user, and the TLS user goes
        // in the query.
        let mut tls_user = None;
        match (&self.transport, &self.username) {
            (Transport::Ssh(t), u) => {
                if let Some(user) = &t.user {
                    write!(f, "{}@", escape_userinfo(user))?;
                }
                tls_user = u.as_ref();
            }
            (_, Some(u)) => write!(f, "{}@", escape_userinfo(u))?,
            (_, None) => {}
        }
        match &self.transport {
            Transport::Tcp { host, port } if host.parse::<Ipv6Addr>().is_ok() => {
                write!(f, "[{host}]:{port}")?
            }
            Transport::Tcp { host, port } => write!(f, "{}:{port}", escape_host(host))?,
            Transport::Vsock { cid, port } => write!(f, "{cid}:{port}")?,
            Transport::Unix(p) => {
                query.push(("socket".into(), escape_query(p.as_os_str().as_bytes())))
            }
            Transport::Ssh(t) => {
                if t.host.parse::<Ipv6Addr>().is_ok() {
                    write!(f, "[{}]:{}", t.host, t.port)?
                } else {
                    write!(f, "{}:{}", escape_host(&t.host), t.port)?
                }
                match &t.remote {
                    SshRemote::Unix(p) => {
                        query.push(("socket".into(), escape_query(p.as_os_str().as_bytes())))
                    }
                    SshRemote::Tcp(DEFAULT_PORT) => {}
                    SshRemote::Tcp(port) => query.push(("nbd-port".into(), port.to_string())),
                }
                if t.compress {
                    query.push(("compress".into(), "true".into()));
                }
            }
        }
        write!(f, "/{}", escape_path(self.export_name.as_bytes()))?;
        let strings = [
            ("tls-certificates", &self.tls_certificates),
            ("tls-psk-file", &self.tls_psk_file),
            ("tls-username", &tls_user.cloned()),
            ("tls-hostname", &self.tls_hostname),
            ("tls-type", &self.tls_type),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                query.push((k.into(), escape_query(v.as_bytes())));
            }
        }
        if let Some(v) = self.tls_verify_peer {
            query.push(("tls-verify-peer".into(), if v { "1" } else { "0" }.into()));
        }
        for (k, v) in &self.extra {
            // A key is decoded as a value is, and ends at the first '='.
            let key = escape_query(k.as_bytes()).replace('=', "%3D");
            query.push((key, escape_query(v.as_bytes())));
        }
        for (i, (k, v)) in query.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn good_uris() {
        let cases: &[(&str, Transport, &str, bool)] = &[
            (
                "nbd://example.com/disk",
                tcp("example.com", 10809),
                "disk",
                false,
            ),
            ("nbd://example.com", tcp("example.com", 10809), "", false),
            ("nbd://example.com/", tcp("example.com", 10809), "", false),
            (
                "nbd://example.com//disk",
                tcp("example.com", 10809),
                "/disk",
                false,
            ),
            (
                "nbd://example.com/hello%20world",
                tcp("example.com", 10809),
                "hello world",
                false,
            ),
            ("nbd://localhost:10999", tcp("localhost", 10999), "", false),
            ("nbd://localhost:/x", tcp("localhost", 10809), "x", false),
            ("nbd://127.0.0.1:1/a/b", tcp("127.0.0.1", 1), "a/b", false),
            ("nbd://[::1]:10809/", tcp("::1", 10809), "", false),
            ("nbd://[fe80::1]/x", tcp("fe80::1", 10809), "x", false),
            ("NBD://Host/", tcp("Host", 10809), "", false),
            ("nbd:///x", tcp("localhost", 10809), "x", false),
            (
                "nbds://example.com/x+y",
                tcp("example.com", 10809),
                "x+y",
                true,
            ),
            (
                "nbd+unix:///?socket=/tmp/s",
                Transport::Unix("/tmp/s".into()),
                "",
                false,
            ),
            (
                "nbd+unix://?socket=/tmp/s",
                Transport::Unix("/tmp/s".into()),
                "",
                false,
            ),
            (
                "nbd+unix:?socket=/tmp/s",
                Transport::Unix("/tmp/s".into()),
                "",
                false,
            ),
            (
                "nbd+unix:///disk?socket=sock",
                Transport::Unix("sock".into()),
                "disk",
                false,
            ),
            (
                "nbd+unix:///?socket=/tmp/sp%20ace/a%26b",
                Transport::Unix("/tmp/sp ace/a&b".into()),
                "",
                false,
            ),
            (
                "nbd+unix:///?socket=/tmp/sp ace/s",
                Transport::Unix("/tmp/sp ace/s".into()),
                "",
                false,
            ),
            (
                "nbd+unix:///?socket=%00/abstract",
                Transport::Unix("\0/abstract".into()),
                "",
                false,
            ),
            (
                "nbds+unix://alice@/?socket=/s",
                Transport::Unix("/s".into()),
                "",
                true,
            ),
            (
                "nbd+vsock:///",
                Transport::Vsock {
                    cid: 2,
                    port: 10809,
                },
                "",
                false,
            ),
            (
                "nbd+vsock://3:4000/e",
                Transport::Vsock { cid: 3, port: 4000 },
                "e",
                false,
            ),
            (
                "nbds+vsock://3/",
                Transport::Vsock {
                    cid: 3,
                    port: 10809,
                },
                "",
                true,
            ),
            ("nbd://h/%C3%A9t%C3%A9", tcp("h", 10809), "été", false),
        ];
        for (s, t, e, tls) in cases {
            let u = Uri::parse(s).unwrap_or_else(|err| panic!("{s}: {err}"));
            assert_eq!(&u.transport, t, "{s}");
            assert_eq!(u.export_name, *e, "{s}");
            assert_eq!(u.tls, *tls, "{s}");
            // Formatting and parsing again gives the same URI.
            let again = Uri::parse(&u.to_string()).unwrap();
            assert_eq!(again, u, "{s} -> {u}");
        }
    }

    #[test]
    fn query_parameters() {
        let u = Uri::parse(
            "nbds+unix://alice@/e?socket=/s&tls-certificates=/etc/pki&tls-psk-file=/k\
             &tls-hostname=h&tls-type=psk&tls-verify-peer=0&x-foo=a+b",
        )
        .unwrap();
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.tls_certificates.as_deref(), Some("/etc/pki"));
        assert_eq!(u.tls_psk_file.as_deref(), Some("/k"));
        assert_eq!(u.tls_hostname.as_deref(), Some("h"));
        assert_eq!(u.tls_type.as_deref(), Some("psk"));
        assert_eq!(u.tls_verify_peer, Some(false));
        assert_eq!(u.extra, vec![("x-foo".to_string(), "a+b".to_string())]);
        assert_eq!(Uri::parse(&u.to_string()).unwrap(), u);
        let u = Uri::parse("nbds://h/?tls-username=bob").unwrap();
        assert_eq!(u.username.as_deref(), Some("bob"));
    }

    #[test]
    fn bad_uris() {
        let cases: &[(&str, &str)] = &[
            ("http://example.com/", "unknown scheme \"http\""),
            ("example.com", "no scheme"),
            ("nbd+tcp://h/", "unknown scheme"),
            ("nbd://h:abc/", "port \"abc\""),
            ("nbd://h:0/", "port \"0\""),
            ("nbd://h:65536/", "port \"65536\""),
            ("nbd://h:+1/", "port \"+1\""),
            ("nbd+unix:///", "socket=PATH query parameter is required"),
            ("nbd+unix://host/?socket=/s", "no host or port"),
            ("nbd://h/?socket=/s", "socket= is only allowed"),
            ("nbd://h/?foo=bar", "unknown query parameter \"foo\""),
            ("nbd://h/?socket", "has no value"),
            ("nbd://h/?tls-type=foo", "tls-type=foo"),
            ("nbd://h/?tls-verify-peer=maybe", "tls-verify-peer"),
            ("nbd+unix:///?socket=/a&socket=/b", "given twice"),
            ("nbd://[::1/", "missing ']'"),
            ("nbd://[zz::1]/", "bad IPv6 address"),
            ("nbd://[::1]x/", "after the IPv6 address"),
            ("nbd://h/a%2", "percent-encoding in the export name"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://h/x#frag", "fragment"),
            ("nbd://a b/", "invalid character ' '"),
            ("nbd://u:pw@h/", "passwords"),
            ("nbd:x", "must start with '/'"),
            ("nbd+vsock://host/", "CID \"host\""),
            ("nbd+vsock://2:x/", "vsock port \"x\""),
        ];
        for (s, want) in cases {
            match Uri::parse(s) {
                Ok(u) => panic!("{s}: parsed as {u:?}"),
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{s}: error {e:?} does not mention {want:?}"
                ),
            }
        }
    }

    #[test]
    fn ssh_uris() {
        use std::ffi::OsString;
        let argv = |u: &Uri| match &u.transport {
            Transport::Ssh(t) => t
                .argv()
                .unwrap()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" "),
            t => panic!("not ssh: {t:?}"),
        };
        let cases = [
            (
                "nbd+ssh://bob@far:2222/disk?socket=/run/nbd.sock",
                "ssh -p 2222 -o User=bob -- far nc -U /run/nbd.sock",
                "disk",
                "nbd+ssh://bob@far:2222/disk?socket=/run/nbd.sock",
            ),
            (
                "nbd+ssh://far/?socket=-X",
                "ssh -p 22 -- far nc -U ./-X",
                "",
                "nbd+ssh://far:22/?socket=-X",
            ),
            (
                "nbd+ssh://far",
                "ssh -p 22 -- far nc localhost 10809",
                "",
                "nbd+ssh://far:22/",
            ),
            (
                "nbd+ssh://far/?nbd-port=10810&compress=true",
                "ssh -C -p 22 -- far nc localhost 10810",
                "",
                "nbd+ssh://far:22/?nbd-port=10810&compress=true",
            ),
            (
                "nbds+ssh://[::1]:23/e?socket=/a%20b/it's&tls-username=alice",
                "ssh -p 23 -- ::1 nc -U '/a b/it'\\''s'",
                "e",
                "nbds+ssh://[::1]:23/e?socket=/a%20b/it's&tls-username=alice",
            ),
        ];
        for (s, want, export, printed) in cases {
            let u = Uri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(argv(&u), want, "{s}");
            assert_eq!(u.export_name, export);
            assert_eq!(u.to_string(), printed, "{s}");
            assert_eq!(Uri::parse(printed).unwrap(), u, "{printed}");
            assert!(Uri::is_nbd_uri(s));
        }
        let u = Uri::parse("nbds+ssh://bob@far/?tls-psk-file=/k&tls-username=alice").unwrap();
        assert!(u.tls);
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.tls_options().hostname.as_deref(), Some("far"));
        let _ = OsString::new();
        for (s, want) in [
            ("nbd+ssh://-oProxyCommand=xeyes", "starts with '-'"),
            ("nbd+ssh://u@-x:22/", "starts with '-'"),
            ("nbd+ssh:///x", "ssh host is missing"),
            ("nbd+ssh://h/?socket=/s&nbd-port=1", "cannot both"),
            ("nbd+ssh://h/?nbd-port=0", "nbd-port=0"),
            ("nbd+ssh://h/?compress=maybe", "compress=maybe"),
            ("nbd://h/?nbd-port=10809", "only allowed with nbd+ssh"),
            (
                "nbd+unix:///?socket=/s&compress=true",
                "only allowed with nbd+ssh",
            ),
            ("nbd+ssh://h/?socket=%00abs", "abstract"),
            ("nbd+ssh://h:x/", "port \"x\""),
        ] {
            match Uri::parse(s) {
                Ok(u) => panic!("{s}: parsed as {u:?}"),
                Err(e) => assert!(e.to_string().contains(want), "{s}: {e}"),
            }
        }
        // A Transport made by hand is checked too, before ssh runs.
        let t = SshTarget {
            host: "-oProxyCommand=xeyes".into(),
            port: 22,
            user: None,
            compress: false,
            remote: SshRemote::Tcp(10809),
        };
        assert!(t.argv().is_err());
    }

    #[test]
    fn escaped_hosts_print_escaped() {
        // Found by the uri fuzzer: the host decoded from "12%2F%3F%23"
        // printed raw as "nbd://12/?#:10809/", which does not parse.
        for (s, host, printed) in [
            ("NBD://12%2F%3F%23", "12/?#", "nbd://12%2F%3F%23:10809/"),
            ("nbd://a%3Ab:7/", "a:b", "nbd://a%3Ab:7/"),
            ("nbd://x%25y%40z/", "x%y@z", "nbd://x%25y%40z:10809/"),
        ] {
            let u = Uri::parse(s).unwrap();
            assert!(
                matches!(&u.transport, Transport::Tcp { host: h, .. } if h == host),
                "{s}"
            );
            assert_eq!(u.to_string(), printed);
            assert_eq!(Uri::parse(printed).unwrap(), u);
        }
    }

    #[test]
    fn escaped_extra_keys_print_escaped() {
        // Found by the uri fuzzer: x-* keys printed raw ('#', '=').
        let u = Uri::parse("nbd+unix:///?socket=/s&x-a%23b%3Dc%0F=v%3D").unwrap();
        assert_eq!(u.extra, vec![("x-a#b=c\u{f}".into(), "v=".into())]);
        let printed = u.to_string();
        assert_eq!(printed, "nbd+unix:///?socket=/s&x-a%23b%3Dc%0F=v=");
        assert_eq!(Uri::parse(&printed).unwrap(), u);
    }

    #[test]
    fn formatting_like_libnbd() {
        // What libnbd's nbdinfo prints as uri: for these connections.
        assert_eq!(
            Uri::new(tcp("localhost", 10999), "").to_string(),
            "nbd://localhost:10999/"
        );
        assert_eq!(
            Uri::new(tcp("::1", 10999), "").to_string(),
            "nbd://[::1]:10999/"
        );
        assert_eq!(
            Uri::new(Transport::Unix("/tmp/nbdkitX/socket".into()), "").to_string(),
            "nbd+unix:///?socket=/tmp/nbdkitX/socket"
        );
        assert_eq!(
            Uri::new(Transport::Unix("/s".into()), "disk").to_string(),
            "nbd+unix:///disk?socket=/s"
        );
        assert_eq!(
            Uri::new(tcp("localhost", 10809), "a b/c").to_string(),
            "nbd://localhost:10809/a%20b/c"
        );
        // libxml2's path escaping, as libnbd 1.14 prints it.
        let name = "a:b;c@d&e=f+g$h,i-j_k.l!m~n*o'p(q)r?s#t%u[v]w\"x<y>zé{|}\\^`";
        assert_eq!(
            Uri::new(tcp("localhost", 10809), name).to_string(),
            "nbd://localhost:10809/a%3Ab;c@d&e=f+g$h,i-j_k.l!m~n*o'p(q)r%3Fs%23t%25u%5Bv%5Dw\
             %22x%3Cy%3Ez%C3%A9%7B%7C%7D%5C%5E%60"
        );
        assert_eq!(
            Uri::new(
                Transport::Vsock {
                    cid: 2,
                    port: 10809
                },
                ""
            )
            .to_string(),
            "nbd+vsock://2:10809/"
        );
        assert!(Uri::is_nbd_uri("nbd+unix:///?socket=x"));
        assert!(!Uri::is_nbd_uri("/dev/sda"));
        assert!(!Uri::is_nbd_uri("null:"));
    }
}
