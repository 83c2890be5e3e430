//! # curl: serve a disk image from an HTTP or HTTPS server
//!
//! Each read is an HTTP `Range` request; requests run in parallel over a
//! pool of keep-alive connections (nbdkit's plugin runs one at a time per
//! connection), so filters such as readahead and xz can keep several in
//! flight. Writes are HTTP `PUT` requests with a `Content-Range` header,
//! as libcurl sends them for uploads (most servers refuse them: use `-r`).
//! Built on reqwest with rustls: no OpenSSL. `http://` and `https://`
//! URLs, and `file://` ones as libcurl takes them (`file:///path`,
//! `file://localhost/path`, escapes decoded): the local file, read and
//! written in place (upstream 1.32's writes to a `file:` URL truncate the
//! file), a missing one failing the connection.
//!
//! ```text
//! nbdkit -r curl https://example.com/disk.img
//! nbdkit curl --filter=xz https://example.com/disk.raw.xz --run 'nbdinfo $uri'
//! nbdkit -r curl url=http://example.com/disk.img user=me password=+pw.txt
//! ```
//!
//! ## Parameters
//!
//! - `[url=]URL` (required): the image. The size comes from a `HEAD`
//!   request's `Content-Length`; when the server does not give it, or does
//!   not say `Accept-Ranges: bytes`, from a ranged `GET` of the first
//!   byte. A server that ignores ranges (answers 200 to a ranged `GET`) is
//!   refused when a client connects. Credentials in the URL
//!   (`http://user:pass@host/...`) are used as `user`/`password`.
//! - `connections=N` (default 4): the most requests in flight at once,
//!   over as many keep-alive connections.
//! - `header=HEADER` (repeatable): `Name: value` adds a header, `Name:`
//!   removes one the plugin would send (`User-Agent`, `Authorization`,
//!   `Cookie`; `Accept: */*` is always sent, as curl does by default),
//!   `Name;` sends an empty one. Sent in every request, also after a
//!   redirect to another host.
//! - `cookie=COOKIE`, `cookie=+FILE`, `cookie=-`, `cookie=-FD`: a `Cookie`
//!   header (`name=value; name2=value2`).
//! - `user=USER`, `password=PASSWORD`: HTTP basic authentication (sent to
//!   the URL's own host only). `password=-` asks on the terminal (stdin
//!   must be a tty), `password=+FILE` reads the file (trailing newlines
//!   dropped), `password=-FD` reads file descriptor FD (3 or more).
//! - `timeout=SECS` (default 0, no limit): the longest a request may take.
//! - `followlocation=false`: do not follow redirects (default true; at most
//!   50 are followed and a loop is reported as such).
//! - `sslverify=false`: do not verify the server's certificate or name.
//! - `cainfo=FILE`: trust only the CA certificates in this PEM file
//!   (`cainfo=` with no value: trust none of the system's);
//!   `capath=DIR`: also trust the PEM certificates in this directory.
//! - `http-version=none|1.0|1.1|2.0|2TLS|2-prior-knowledge` (as newer
//!   nbdkit's, which takes libcurl's names): `1.0` and `1.1` speak
//!   HTTP/1 only; `2-prior-knowledge` HTTP/2 from the first byte (to a
//!   cleartext server that speaks it); `none`, `2.0` and `2TLS` let TLS
//!   negotiate HTTP/2 (ALPN), else HTTP/1.1. `3` and `3ONLY` are refused
//!   (no HTTP/3 here).
//! - `ssl-version=tlsv1.2|tlsv1.3|...`: the lowest TLS version allowed
//!   (rustls speaks TLS 1.2 and 1.3 only; `sslv2`/`sslv3` are refused).
//!   `ssl-cipher-list=` and `tls13-ciphers=` are refused: rustls chooses
//!   among its own safe suites.
//! - `proxy=URL` (an empty value disables proxies, including the
//!   `http_proxy`... environment variables honoured otherwise),
//!   `proxy-user=USER`, `proxy-password=PASSWORD` (same forms as
//!   `password`). `http://`, `https://`, `socks5://` and `socks5h://`
//!   proxies.
//! - `user-agent=STRING`: a `User-Agent` header (none by default).
//! - `cookiefile=` (empty) enables cookies (those set by the server are
//!   sent back, also across redirects); `cookiefile=FILE` starts from the
//!   cookies in FILE (Netscape/curl cookie file format, or `Set-Cookie:`
//!   lines); `cookiejar=FILE` does the same and writes the cookies back to
//!   FILE when a connection closes and when the server exits.
//! - `header-script=SCRIPT`, `cookie-script=SCRIPT`: shell commands whose
//!   output gives the headers (one per line, as `header=`) or the cookie
//!   (one line, as `cookie=`); they run before the first request with
//!   `$iteration` (0, 1, ...) and `$url` set, and again before a request
//!   when more than `header-script-renew=SECS` / `cookie-script-renew=SECS`
//!   seconds have passed. They cannot be combined with `header=` /
//!   `cookie=`.
//! - `unix-socket-path=PATH`: connect to this Unix socket instead of the
//!   URL's host (the URL still gives the path and the `Host` header).
//! - `protocols=PROTO,...`: the URL schemes allowed, also for redirects
//!   (`http`, `https`; the other names curl knows are accepted and never
//!   match).
//! - `tcp-keepalive=true`, `tcp-nodelay=false`: socket options.
//!
//! ## Errors
//!
//! Never wrong data: a missing file (404), a refused request, a redirect
//! loop, a server that ignores ranges, a file whose size changed (its
//! `Content-Range` total differs), a body shorter or longer than the range,
//! a dropped connection or a timeout each fail the open or the read (EIO)
//! with a message saying which.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Flags, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result, ThreadModel,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;
use url::Url;

/// The registry entry of the curl plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "curl",
    help: HELP,
    magic: Some("url"),
    create,
};

const HELP: &str = "\
cainfo=<CAINFO>            Path to Certificate Authority file.
capath=<CAPATH>            Path to directory with CA certificates.
connections=<N>            Most requests in flight (default 4).
cookie=<COOKIE>            Set HTTP/HTTPS cookies.
cookiefile=                Enable cookie processing.
cookiefile=<FILENAME>      Read cookies from file.
cookiejar=<FILENAME>       Read and write cookies to jar.
cookie-script=<SCRIPT>     Script to set HTTP/HTTPS cookies.
cookie-script-renew=<SECS> Time to renew HTTP/HTTPS cookies.
followlocation=false       Do not follow redirects.
header=<HEADER>            Set HTTP/HTTPS header.
header-script=<SCRIPT>     Script to set HTTP/HTTPS headers.
header-script-renew=<SECS> Time to renew HTTP/HTTPS headers.
password=<PASSWORD>        The password for the user account.
protocols=PROTO,PROTO,..   Limit protocols allowed.
proxy=<PROXY>              Set proxy URL.
proxy-password=<PASSWORD>  The proxy password.
proxy-user=<USER>          The proxy user.
timeout=<TIMEOUT>          Set the timeout for requests (seconds).
sslverify=false            Do not verify SSL certificate of remote host.
http-version=<VERSION>     Force a particular HTTP protocol.
ssl-version=<VERSION>      Specify preferred TLS/SSL version.
tcp-keepalive=true         Enable TCP keepalives.
tcp-nodelay=false          Disable Nagle’s algorithm.
unix-socket-path=<PATH>    Open Unix domain socket instead of TCP/IP.
url=<URL>       (required) The disk image URL to serve.
user=<USER>                The user to log in as.
user-agent=<USER-AGENT>    Send user-agent header for HTTP/HTTPS.";

/// The most redirects followed for one request.
const MAX_REDIRECTS: usize = 50;

/// Every protocol name curl knows (for `protocols=`).
const KNOWN_PROTOCOLS: &[&str] = &[
    "dict", "file", "ftp", "ftps", "gopher", "gophers", "http", "https", "imap", "imaps", "ldap",
    "ldaps", "mqtt", "pop3", "pop3s", "rtmp", "rtmpe", "rtmps", "rtmpt", "rtmpte", "rtmpts",
    "rtsp", "scp", "sftp", "smb", "smbs", "smtp", "smtps", "telnet", "tftp", "ws", "wss",
];

fn cerr(msg: impl Into<String>) -> ConfigError {
    ConfigError::new(msg)
}

// ---------------------------------------------------------------------
// Configuration helpers.

pub use libnbd::config::read_password;

/// A `header=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderLine {
    /// Send this header.
    Add(HeaderName, HeaderValue),
    /// Do not send this header.
    Remove(HeaderName),
}

/// Parse `Name: value`, `Name:` or `Name;` (curl's syntax).
pub fn parse_header(s: &str) -> Result<HeaderLine, String> {
    let bad = |why: &str| format!("header '{s}': {why}");
    let name = |n: &str| {
        HeaderName::from_bytes(n.trim().as_bytes()).map_err(|_| bad("invalid header name"))
    };
    if let Some((n, v)) = s.split_once(':') {
        let v = v.trim();
        if v.is_empty() {
            return Ok(HeaderLine::Remove(name(n)?));
        }
        let v = HeaderValue::from_str(v).map_err(|_| bad("invalid header value"))?;
        return Ok(HeaderLine::Add(name(n)?, v));
    }
    if let Some(n) = s.trim_end().strip_suffix(';') {
        return Ok(HeaderLine::Add(name(n)?, HeaderValue::from_static("")));
    }
    Err(bad("expected 'Name: value', 'Name:' or 'Name;'"))
}

/// Base64 (standard alphabet, padded), for basic authentication.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Parse `Content-Range: bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let (a, b) = range.trim().split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b, total))
}

/// Parse `Content-Range: bytes */TOTAL` (the answer to an unsatisfiable
/// range).
fn parse_unsatisfied_range(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes")?
        .trim_start()
        .strip_prefix("*/")?
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------
// Cookies.

/// One cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    /// Domain, lower case, without a leading dot.
    pub domain: String,
    /// Does it match subdomains too?
    pub subdomains: bool,
    /// Path prefix.
    pub path: String,
    /// HTTPS only?
    pub secure: bool,
    /// Expiry in seconds since the epoch, 0 for a session cookie.
    pub expires: u64,
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
    /// Marked HttpOnly.
    pub http_only: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Days from 1970-01-01 to a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parse a cookie date (`Wed, 21 Oct 2015 07:28:00 GMT` and the usual
/// variants) into seconds since the epoch.
pub fn parse_cookie_date(s: &str) -> Option<u64> {
    let (mut day, mut month, mut year, mut time) = (None, None, None, None);
    for tok in s.split([' ', ',', '-', '\t']) {
        if tok.is_empty() {
            continue;
        }
        if time.is_none() && tok.contains(':') {
            let p: Vec<u64> = tok.split(':').filter_map(|x| x.parse().ok()).collect();
            if p.len() == 3 {
                time = Some(p[0] * 3600 + p[1] * 60 + p[2]);
                continue;
            }
        }
        let lower = tok.to_ascii_lowercase();
        const MONTHS: [&str; 12] = [
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        if month.is_none() && lower.len() >= 3 {
            if let Some(m) = MONTHS.iter().position(|m| lower.starts_with(m)) {
                month = Some(m as u32 + 1);
                continue;
            }
        }
        if let Ok(n) = tok.parse::<i64>() {
            if day.is_none() && (1..=31).contains(&n) && tok.len() <= 2 {
                day = Some(n as u32);
            } else if year.is_none() {
                year = Some(match n {
                    0..=69 => 2000 + n,
                    70..=99 => 1900 + n,
                    _ => n,
                });
            }
        }
    }
    let days = days_from_civil(year?, month?, day?);
    let t = days * 86400 + time.unwrap_or(0) as i64;
    Some(t.max(1) as u64)
}

/// The cookies of the plugin (when `cookiefile=` or `cookiejar=` is set).
#[derive(Debug, Default)]
pub struct CookieJar {
    cookies: Vec<Cookie>,
}

impl CookieJar {
    /// Read a cookie file: Netscape format (as curl writes), or
    /// `Set-Cookie:` header lines. A missing file is an empty jar.
    pub fn load(path: &Path) -> std::io::Result<CookieJar> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(Self::parse(&text))
    }

    /// Parse the text of a cookie file.
    pub fn parse(text: &str) -> CookieJar {
        let mut jar = CookieJar::default();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(h) = line
                .strip_prefix("Set-Cookie:")
                .or_else(|| line.strip_prefix("set-cookie:"))
            {
                // A header line with no request behind it: it needs a
                // Domain attribute.
                if let Some(c) = parse_set_cookie(h, None) {
                    jar.put(c);
                }
                continue;
            }
            let (line, http_only) = match line.strip_prefix("#HttpOnly_") {
                Some(l) => (l, true),
                None => (line, false),
            };
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 7 {
                continue;
            }
            let domain = f[0].trim_start_matches('.').to_ascii_lowercase();
            jar.put(Cookie {
                subdomains: f[1].eq_ignore_ascii_case("TRUE") || f[0].starts_with('.'),
                domain,
                path: f[2].to_string(),
                secure: f[3].eq_ignore_ascii_case("TRUE"),
                expires: f[4].parse().unwrap_or(0),
                name: f[5].to_string(),
                value: f[6..].join("\t"),
                http_only,
            });
        }
        jar
    }

    fn put(&mut self, c: Cookie) {
        self.cookies
            .retain(|o| !(o.name == c.name && o.domain == c.domain && o.path == c.path));
        if c.expires == 0 || c.expires > now_secs() {
            self.cookies.push(c);
        }
    }

    /// Take the `Set-Cookie` headers of a response to `url`.
    pub fn store(&mut self, url: &Url, set_cookie: &str) {
        if let Some(c) = parse_set_cookie(set_cookie, Some(url)) {
            self.put(c);
        }
    }

    /// The `Cookie` header value for a request to `url`, if any cookie
    /// matches.
    pub fn header_for(&self, url: &Url) -> Option<String> {
        let host = url.host_str()?.to_ascii_lowercase();
        let path = url.path();
        let now = now_secs();
        let v: Vec<String> = self
            .cookies
            .iter()
            .filter(|c| {
                (host == c.domain || (c.subdomains && host.ends_with(&format!(".{}", c.domain))))
                    && path_matches(path, &c.path)
                    && (!c.secure || url.scheme() == "https")
                    && (c.expires == 0 || c.expires > now)
            })
            .map(|c| format!("{}={}", c.name, c.value))
            .collect();
        (!v.is_empty()).then(|| v.join("; "))
    }

    /// The jar in Netscape format.
    pub fn to_text(&self) -> String {
        let mut s = String::from(
            "# Netscape HTTP Cookie File\n# This file was generated by nbdkit's curl plugin.\n\n",
        );
        for c in &self.cookies {
            s.push_str(&format!(
                "{}{}{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                if c.http_only { "#HttpOnly_" } else { "" },
                if c.subdomains { "." } else { "" },
                c.domain,
                if c.subdomains { "TRUE" } else { "FALSE" },
                c.path,
                if c.secure { "TRUE" } else { "FALSE" },
                c.expires,
                c.name,
                c.value
            ));
        }
        s
    }
}

fn path_matches(req: &str, cookie: &str) -> bool {
    req == cookie
        || (req.starts_with(cookie)
            && (cookie.ends_with('/') || req[cookie.len()..].starts_with('/')))
}

/// Parse a `Set-Cookie` header received from `url` (or, with no URL, from
/// a cookie file, where `Domain` is required).
pub fn parse_set_cookie(h: &str, url: Option<&Url>) -> Option<Cookie> {
    let mut parts = h.split(';');
    let (name, value) = parts.next()?.trim().split_once('=')?;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let host = url
        .and_then(|u| u.host_str())
        .map(|h| h.to_ascii_lowercase());
    let mut c = Cookie {
        domain: host.clone().unwrap_or_default(),
        subdomains: false,
        path: String::new(),
        secure: false,
        expires: 0,
        name: name.to_string(),
        value: value.trim().to_string(),
        http_only: false,
    };
    let mut max_age = None;
    for attr in parts {
        let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "domain" if !v.is_empty() => {
                let d = v.trim_start_matches('.').to_ascii_lowercase();
                if let Some(h) = &host {
                    if *h != d && !h.ends_with(&format!(".{d}")) {
                        return None; // not for this host
                    }
                }
                c.domain = d;
                c.subdomains = true;
            }
            "path" if v.starts_with('/') => c.path = v.to_string(),
            "secure" => c.secure = true,
            "httponly" => c.http_only = true,
            "max-age" => max_age = v.parse::<i64>().ok(),
            "expires" => {
                if let Some(t) = parse_cookie_date(v) {
                    c.expires = t;
                }
            }
            _ => {}
        }
    }
    if let Some(m) = max_age {
        c.expires = if m <= 0 { 1 } else { now_secs() + m as u64 };
    }
    if c.domain.is_empty() {
        return None;
    }
    if c.path.is_empty() {
        // The default path: the request path up to its last '/'.
        let p = url.map_or("/", |u| u.path());
        c.path = match p.rfind('/') {
            Some(0) | None => "/".into(),
            Some(i) => p[..i].to_string(),
        };
    }
    Some(c)
}

// ---------------------------------------------------------------------
// Header and cookie scripts.

#[derive(Debug, Default)]
struct ScriptRun {
    last: Option<Instant>,
    iteration: u64,
}

impl ScriptRun {
    fn due(&self, renew: u64) -> bool {
        match self.last {
            None => true,
            Some(t) => renew > 0 && t.elapsed() >= Duration::from_secs(renew),
        }
    }
}

#[derive(Debug, Default)]
struct ScriptState {
    header: ScriptRun,
    headers: Vec<HeaderLine>,
    cookie: ScriptRun,
    cookie_value: Option<String>,
}

async fn run_script(what: &str, script: &str, iteration: u64, url: &str) -> Result<String> {
    let out = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .env("iteration", iteration.to_string())
        .env("url", url)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::eio(format!("curl: {what}: cannot run /bin/sh: {e}")))?;
    if !out.status.success() {
        return Err(Error::eio(format!(
            "curl: {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------
// The plugin.

#[derive(Debug)]
struct Config {
    url: Url,
    user: Option<String>,
    password: Option<String>,
    headers: Vec<HeaderLine>,
    cookie: Option<String>,
    header_script: Option<String>,
    header_renew: u64,
    cookie_script: Option<String>,
    cookie_renew: u64,
    followlocation: bool,
    protocols: Option<Vec<String>>,
    cookiejar: Option<PathBuf>,
    user_agent: Option<String>,
}

/// What every connection shares: the configuration, the HTTP client with
/// its pool of connections, cookies and script output.
struct Inner {
    cfg: Config,
    client: reqwest::Client,
    slots: Semaphore,
    jar: Option<Mutex<CookieJar>>,
    scripts: tokio::sync::Mutex<ScriptState>,
}

/// The configured curl plugin.
pub struct CurlPlugin {
    inner: Arc<Inner>,
}

fn take_secret(p: &mut Params, key: &str) -> ConfigResult<Option<String>> {
    p.take(key).map(|v| read_password(key, &v)).transpose()
}

fn allowed(protocols: &Option<Vec<String>>, scheme: &str) -> bool {
    protocols
        .as_ref()
        .is_none_or(|l| l.iter().any(|p| p == scheme))
}

/// Build the curl plugin from its parameters.
pub fn create(p: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let url_s = p
        .take("url")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| cerr("curl: you must supply the url=<URL> parameter"))?;
    let mut url = Url::parse(&url_s).map_err(|e| cerr(format!("curl: url '{url_s}': {e}")))?;
    if !matches!(url.scheme(), "http" | "https" | "file") {
        return Err(cerr(format!(
            "curl: url '{url_s}': protocol '{}' is not supported (http, https and file are)",
            url.scheme()
        )));
    }
    let protocols = match p.take("protocols") {
        None => None,
        Some(list) => {
            let l: Vec<String> = list
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect();
            if let Some(bad) = l.iter().find(|x| !KNOWN_PROTOCOLS.contains(&x.as_str())) {
                return Err(cerr(format!("curl: protocols: unknown protocol '{bad}'")));
            }
            if !l.iter().any(|x| x == url.scheme()) {
                return Err(cerr(format!(
                    "curl: the url's protocol '{}' is not in protocols={list}",
                    url.scheme()
                )));
            }
            Some(l)
        }
    };
    // Credentials in the URL, unless user=/password= override them.
    let url_user = (!url.username().is_empty()).then(|| pct_decode(url.username()));
    let url_password = url.password().map(pct_decode);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let user = p.take("user").or(url_user);
    let password = take_secret(p, "password")?.or(url_password);

    let headers = p
        .take_all("header")
        .iter()
        .map(|h| parse_header(h).map_err(|e| cerr(format!("curl: {e}"))))
        .collect::<ConfigResult<Vec<_>>>()?;
    let cookie = take_secret(p, "cookie")?;
    let header_script = p.take("header-script");
    let cookie_script = p.take("cookie-script");
    let header_renew = p.take_parsed::<u64>("header-script-renew")?.unwrap_or(0);
    let cookie_renew = p.take_parsed::<u64>("cookie-script-renew")?.unwrap_or(0);
    if header_script.is_some() && !headers.is_empty() {
        return Err(cerr(
            "curl: header and header-script cannot be used together",
        ));
    }
    if cookie_script.is_some() && cookie.is_some() {
        return Err(cerr(
            "curl: cookie and cookie-script cannot be used together",
        ));
    }
    let followlocation = p.take_bool("followlocation")?.unwrap_or(true);
    let sslverify = p.take_bool("sslverify")?.unwrap_or(true);
    let timeout = p.take_parsed::<u64>("timeout")?.unwrap_or(0);
    let connections = p.take_parsed::<usize>("connections")?.unwrap_or(4);
    if connections == 0 || connections > 1024 {
        return Err(cerr("curl: connections must be between 1 and 1024"));
    }
    let cainfo = p.take("cainfo");
    let capath = p.take("capath");
    let ssl_version = p.take("ssl-version");
    let http_version = p.take("http-version");
    for k in ["ssl-cipher-list", "tls13-ciphers"] {
        if p.take(k).is_some() {
            return Err(cerr(format!(
                "curl: {k} is not supported: this plugin uses rustls, which offers only its own safe cipher suites"
            )));
        }
    }
    let tcp_keepalive = p.take_bool("tcp-keepalive")?.unwrap_or(false);
    let tcp_nodelay = p.take_bool("tcp-nodelay")?.unwrap_or(true);
    let proxy = p.take("proxy");
    let proxy_user = p.take("proxy-user");
    let proxy_password = take_secret(p, "proxy-password")?;
    let user_agent = p.take("user-agent");
    let cookiefile = p.take("cookiefile");
    let cookiejar = p.take("cookiejar").map(PathBuf::from);
    let unix_socket = p.take("unix-socket-path");

    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(tcp_nodelay)
        .referer(false);
    if timeout > 0 {
        b = b.timeout(Duration::from_secs(timeout));
    }
    if tcp_keepalive {
        b = b.tcp_keepalive(Duration::from_secs(60));
    }
    if !sslverify {
        b = b
            .danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    }
    if let Some(ca) = &cainfo {
        b = b.tls_built_in_root_certs(false);
        if !ca.is_empty() {
            let pem = std::fs::read(ca).map_err(|e| cerr(format!("curl: cainfo: {ca}: {e}")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| cerr(format!("curl: cainfo: {ca}: {e}")))?;
            if certs.is_empty() {
                return Err(cerr(format!(
                    "curl: cainfo: {ca}: no PEM certificate found"
                )));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
    }
    if let Some(dir) = &capath {
        let rd = std::fs::read_dir(dir).map_err(|e| cerr(format!("curl: capath: {dir}: {e}")))?;
        for e in rd.flatten() {
            if let Ok(pem) = std::fs::read(e.path()) {
                for c in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
                    b = b.add_root_certificate(c);
                }
            }
        }
    }
    if let Some(v) = &http_version {
        match v.to_ascii_lowercase().as_str() {
            "none" | "2.0" | "2tls" => {}
            "1.0" | "1.1" => b = b.http1_only(),
            "2-prior-knowledge" => b = b.http2_prior_knowledge(),
            "3" | "3only" => {
                return Err(cerr(format!(
                    "curl: http-version={v}: HTTP/3 is not supported"
                )))
            }
            _ => {
                return Err(cerr(format!(
                    "curl: http-version={v}: unknown version (none, 1.0, 1.1, 2.0, 2TLS, \
                     2-prior-knowledge)"
                )))
            }
        }
    }
    if let Some(v) = &ssl_version {
        use reqwest::tls::Version;
        let min = match v.to_ascii_lowercase().as_str() {
            "default" | "" => None,
            "tlsv1" | "tlsv1.0" => Some(Version::TLS_1_0),
            "tlsv1.1" => Some(Version::TLS_1_1),
            "tlsv1.2" => Some(Version::TLS_1_2),
            "tlsv1.3" => Some(Version::TLS_1_3),
            "sslv2" | "sslv3" => {
                return Err(cerr(format!(
                    "curl: ssl-version={v}: SSL 2 and 3 are not supported"
                )))
            }
            _ => return Err(cerr(format!("curl: ssl-version={v}: unknown version"))),
        };
        if let Some(m) = min {
            b = b.min_tls_version(m);
        }
    }
    match proxy.as_deref() {
        None => {}
        Some("") => b = b.no_proxy(),
        Some(px) => {
            let px_url = if px.contains("://") {
                px.to_string()
            } else {
                format!("http://{px}")
            };
            let mut pr = reqwest::Proxy::all(&px_url)
                .map_err(|e| cerr(format!("curl: proxy '{px}': {e}")))?;
            if let Some(u) = &proxy_user {
                pr = pr.basic_auth(u, proxy_password.as_deref().unwrap_or(""));
            }
            b = b.proxy(pr);
        }
    }
    if let Some(path) = &unix_socket {
        b = b.unix_socket(PathBuf::from(path));
    }
    let client = b.build().map_err(|e| {
        cerr(format!(
            "curl: cannot set up the HTTP client: {}",
            describe(&e)
        ))
    })?;

    let cookies = cookiefile.is_some() || cookiejar.is_some();
    let jar = if cookies {
        let mut jar = CookieJar::default();
        for f in [
            cookiefile
                .as_deref()
                .filter(|f| !f.is_empty())
                .map(Path::new),
            cookiejar.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            let j = CookieJar::load(f)
                .map_err(|e| cerr(format!("curl: cookie file {}: {e}", f.display())))?;
            for c in j.cookies {
                jar.put(c);
            }
        }
        Some(Mutex::new(jar))
    } else {
        None
    };

    if url.scheme() == "file" {
        // As libcurl: file:///path or file://localhost/path, escapes
        // decoded; the HTTP parameters have nothing to act on.
        let path = url
            .to_file_path()
            .map_err(|()| cerr(format!("curl: url '{url_s}': not a local file URL")))?;
        return Ok(Arc::new(CurlFile { path }));
    }
    Ok(Arc::new(CurlPlugin {
        inner: Arc::new(Inner {
            cfg: Config {
                url,
                user,
                password,
                headers,
                cookie,
                header_script,
                header_renew,
                cookie_script,
                cookie_renew,
                followlocation,
                protocols,
                cookiejar,
                user_agent,
            },
            client,
            slots: Semaphore::new(connections),
            jar,
            scripts: tokio::sync::Mutex::new(ScriptState::default()),
        }),
    }))
}

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A reqwest error with its causes, e.g. "error sending request: ...:
/// connection refused".
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        let m = x.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = x.source();
    }
    s
}

impl Inner {
    fn eio(&self, msg: impl std::fmt::Display) -> Error {
        Error::eio(format!("curl: {}: {msg}", self.cfg.url))
    }

    /// Run the header and cookie scripts if they are due; return their
    /// current output.
    async fn script_output(&self) -> Result<(Vec<HeaderLine>, Option<String>)> {
        let cfg = &self.cfg;
        if cfg.header_script.is_none() && cfg.cookie_script.is_none() {
            return Ok((Vec::new(), None));
        }
        let mut st = self.scripts.lock().await;
        if let Some(s) = &cfg.header_script {
            if st.header.due(cfg.header_renew) {
                let out =
                    run_script("header-script", s, st.header.iteration, cfg.url.as_str()).await?;
                st.headers = out
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| {
                        parse_header(l).map_err(|e| Error::eio(format!("curl: header-script: {e}")))
                    })
                    .collect::<Result<_>>()?;
                st.header.last = Some(Instant::now());
                st.header.iteration += 1;
            }
        }
        if let Some(s) = &cfg.cookie_script {
            if st.cookie.due(cfg.cookie_renew) {
                let out =
                    run_script("cookie-script", s, st.cookie.iteration, cfg.url.as_str()).await?;
                st.cookie_value = out
                    .lines()
                    .next()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty());
                st.cookie.last = Some(Instant::now());
                st.cookie.iteration += 1;
            }
        }
        Ok((st.headers.clone(), st.cookie_value.clone()))
    }

    /// The headers of one request to `url`.
    fn headers_for(
        &self,
        url: &Url,
        script: &(Vec<HeaderLine>, Option<String>),
    ) -> Result<HeaderMap> {
        let cfg = &self.cfg;
        let mut h = HeaderMap::new();
        let val = |s: &str, what: &str| {
            HeaderValue::from_str(s)
                .map_err(|_| self.eio(format!("invalid characters in the {what}")))
        };
        if let Some(ua) = &cfg.user_agent {
            h.insert(reqwest::header::USER_AGENT, val(ua, "user-agent")?);
        }
        let same_origin = url.origin() == cfg.url.origin();
        if let (Some(u), true) = (&cfg.user, same_origin) {
            let cred = format!("{u}:{}", cfg.password.as_deref().unwrap_or(""));
            h.insert(
                reqwest::header::AUTHORIZATION,
                val(&format!("Basic {}", base64(cred.as_bytes())), "credentials")?,
            );
        }
        let mut cookies: Vec<String> = Vec::new();
        if let Some(c) = cfg.cookie.as_ref().or(script.1.as_ref()) {
            cookies.push(c.clone());
        }
        if let Some(jar) = &self.jar {
            if let Some(c) = jar
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .header_for(url)
            {
                cookies.push(c);
            }
        }
        if !cookies.is_empty() {
            h.insert(reqwest::header::COOKIE, val(&cookies.join("; "), "cookie")?);
        }
        let mut added = HashSet::new();
        for line in cfg.headers.iter().chain(&script.0) {
            match line {
                HeaderLine::Add(n, v) => {
                    // A custom header replaces the plugin's own.
                    if added.insert(n.clone()) {
                        h.insert(n.clone(), v.clone());
                    } else {
                        h.append(n.clone(), v.clone());
                    }
                }
                HeaderLine::Remove(n) => {
                    h.remove(n);
                }
            }
        }
        Ok(h)
    }

    /// Send one request, following redirects. The caller holds a slot.
    async fn request(
        &self,
        method: Method,
        range: Option<(u64, u64)>,
        body: Option<(&[u8], String)>,
    ) -> Result<(reqwest::Response, Url)> {
        let script = self.script_output().await?;
        let mut url = self.cfg.url.clone();
        let mut method = method;
        let mut seen: HashSet<(String, Option<String>)> = HashSet::new();
        for _ in 0..=MAX_REDIRECTS {
            if !allowed(&self.cfg.protocols, url.scheme()) {
                return Err(self.eio(format!(
                    "redirected to {url}, whose protocol is not in protocols="
                )));
            }
            if !matches!(url.scheme(), "http" | "https") {
                return Err(self.eio(format!(
                    "redirected to {url}: only http and https are supported"
                )));
            }
            let mut headers = self.headers_for(&url, &script)?;
            if let Some((a, b)) = range {
                headers.insert(
                    reqwest::header::RANGE,
                    HeaderValue::from_str(&format!("bytes={a}-{b}")).unwrap(),
                );
            }
            let cookie_sent = headers
                .get(reqwest::header::COOKIE)
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let mut rb = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers);
            if let (Some((data, content_range)), true) = (&body, method == Method::PUT) {
                rb = rb
                    .header(reqwest::header::CONTENT_RANGE, content_range.as_str())
                    .body(data.to_vec());
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| Error::eio(format!("curl: {url}: {}", describe(&e))))?;
            if let Some(jar) = &self.jar {
                let mut jar = jar
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
                    if let Ok(s) = v.to_str() {
                        jar.store(&url, s);
                    }
                }
            }
            let st = resp.status();
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let redirect = matches!(st.as_u16(), 301 | 302 | 303 | 307 | 308);
            match location {
                Some(loc) if redirect && self.cfg.followlocation => {
                    let next = url
                        .join(&loc)
                        .map_err(|e| self.eio(format!("bad redirect location '{loc}': {e}")))?;
                    if !seen.insert((url.to_string(), cookie_sent)) {
                        return Err(
                            self.eio(format!("redirect loop: {url} redirects back to itself"))
                        );
                    }
                    if st == StatusCode::SEE_OTHER && method != Method::HEAD {
                        method = Method::GET;
                    }
                    url = next;
                }
                _ => return Ok((resp, url)),
            }
        }
        Err(self.eio(format!(
            "too many redirects (more than {MAX_REDIRECTS}): redirect loop?"
        )))
    }

    fn status_error(&self, what: &str, st: StatusCode, url: &Url) -> Error {
        let redirect = if st.is_redirection() && !self.cfg.followlocation {
            " (followlocation=false)"
        } else {
            ""
        };
        Error::eio(format!(
            "curl: {url}: {what}: the server answered HTTP {st}{redirect}"
        ))
    }

    /// Find the size of the resource and check it can be read by ranges.
    async fn probe(&self) -> Result<u64> {
        let _slot = self.slots.acquire().await.map_err(|e| self.eio(e))?;
        let (resp, url) = self.request(Method::HEAD, None, None).await?;
        let st = resp.status();
        let mut size = None;
        if st.is_success() {
            let h = resp.headers();
            let len = h
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let ranges = h
                .get(reqwest::header::ACCEPT_RANGES)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.to_ascii_lowercase());
            if ranges.as_deref() == Some("none") {
                return Err(Error::eio(format!(
                    "curl: {url}: the server does not support range requests (Accept-Ranges: none)"
                )));
            }
            if let (Some(n), Some(r)) = (len, &ranges) {
                if r.contains("bytes") {
                    return Ok(n);
                }
            }
            size = len;
        } else if st.is_client_error() && !matches!(st.as_u16(), 405 | 416)
            || (st.is_redirection() && !self.cfg.followlocation)
        {
            return Err(self.status_error("HEAD", st, &url));
        }
        drop(resp);
        // Ask for the first byte: a 206 proves ranges work and tells the
        // size.
        let (mut resp, url) = self.request(Method::GET, Some((0, 0)), None).await?;
        let st = resp.status();
        let cr = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        match st {
            StatusCode::PARTIAL_CONTENT => {
                let total = match cr.as_deref().and_then(parse_content_range) {
                    Some((0, 0, t)) => t.or(size),
                    _ => {
                        return Err(Error::eio(format!(
                            "curl: {url}: the server answered a Range request with a bad Content-Range ({})",
                            cr.as_deref().unwrap_or("none")
                        )))
                    }
                };
                while let Ok(Some(_)) = resp.chunk().await {}
                total.ok_or_else(|| {
                    Error::eio(format!("curl: {url}: the server does not tell the size of the file"))
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                match cr.as_deref().and_then(parse_unsatisfied_range) {
                    Some(0) => Ok(0),
                    _ => Err(self.status_error("GET of the first byte", st, &url)),
                }
            }
            s if s.is_success() => Err(Error::eio(format!(
                "curl: {url}: the server does not support range requests (it answered {s} instead of 206 Partial Content to a Range request)"
            ))),
            s => Err(self.status_error("GET", s, &url)),
        }
    }

    fn save_cookies(&self) {
        if let (Some(path), Some(jar)) = (&self.cfg.cookiejar, &self.jar) {
            let text = jar
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .to_text();
            if let Err(e) = std::fs::write(path, text) {
                libnbd::elog!("nbdkit: curl: cookiejar {}: {e}", path.display());
            }
        }
    }
}

#[async_trait]
impl Plugin for CurlPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        // As nbdkit_error does: the reason goes to the server's log (the
        // client only learns that the export could not be opened).
        let size = self.inner.probe().await.inspect_err(|e| {
            libnbd::elog!("nbdkit: curl[{}]: error: {}", ctx.id, e.msg);
        })?;
        Ok(Box::new(CurlHandle {
            inner: self.inner.clone(),
            size,
            readonly: ctx.readonly,
        }))
    }
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }
    fn dump(&self) -> Vec<(String, String)> {
        dump_lines()
    }
    fn unload(&self) {
        self.inner.save_cookies();
    }
}

/// `file:` URLs, which libcurl reads (and writes) as local files: the
/// file is opened per connection (read-write unless the connection is
/// read-only or the file is not writable), a missing file fails the
/// connection, as upstream. Unlike upstream 1.32, whose writes to a
/// `file:` URL truncate the file to the data written, writes land in
/// place.
pub struct CurlFile {
    path: std::path::PathBuf,
}

#[async_trait]
impl Plugin for CurlFile {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(&self.path)
        };
        let (file, readonly) = match open(!ctx.readonly) {
            Ok(f) => (f, ctx.readonly),
            Err(_) if !ctx.readonly => (open(false).map_err(|e| self.error(ctx, e))?, true),
            Err(e) => return Err(self.error(ctx, e)),
        };
        let size = file.metadata().map_err(|e| self.error(ctx, e))?.len();
        Ok(Box::new(CurlFileHandle {
            file,
            size,
            readonly,
        }))
    }
    fn dump(&self) -> Vec<(String, String)> {
        dump_lines()
    }
}

impl CurlFile {
    fn error(&self, ctx: &OpenContext, e: std::io::Error) -> Error {
        let e = Error::io(format!("curl: file://{}", self.path.display()), e);
        libnbd::elog!("nbdkit: curl[{}]: error: {}", ctx.id, e.msg);
        e
    }
}

/// A connection to a `file:` URL.
struct CurlFileHandle {
    file: std::fs::File,
    size: u64,
    readonly: bool,
}

#[async_trait]
impl Handle for CurlFileHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: !self.readonly,
            multi_conn: self.readonly,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        use std::os::unix::fs::FileExt;
        libnbd::run_blocking(|| self.file.read_exact_at(buf, offset))
            .map_err(|e| Error::io(format!("curl: pread at {offset}"), e))
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if self.readonly {
            return Err(Error::eperm("curl: the export is read-only"));
        }
        libnbd::run_blocking(|| self.file.write_all_at(buf, offset))
            .map_err(|e| Error::io(format!("curl: pwrite at {offset}"), e))
    }
}

/// The `--dump-plugin` lines, which need no configuration.
pub fn dump_lines() -> Vec<(String, String)> {
    vec![
        ("curl_version".into(), "reqwest/0.12 rustls (ring)".into()),
        ("curl_protocol_http".into(), "yes".into()),
        ("curl_protocol_https".into(), "yes".into()),
        ("curl_protocol_file".into(), "yes".into()),
    ]
}

/// A connection: the shared state and the size found when it opened.
pub struct CurlHandle {
    inner: Arc<Inner>,
    size: u64,
    readonly: bool,
}

impl Drop for CurlHandle {
    fn drop(&mut self) {
        self.inner.save_cookies();
    }
}

#[async_trait]
impl Handle for CurlHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: !self.readonly,
            // Nothing is cached here: every connection sees the server.
            multi_conn: self.readonly,
            ..Caps::READ_ONLY
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let len = buf.len() as u64;
        let last = offset + len - 1;
        let _slot = inner.slots.acquire().await.map_err(|e| inner.eio(e))?;
        let (mut resp, url) = inner
            .request(Method::GET, Some((offset, last)), None)
            .await?;
        let st = resp.status();
        let where_ = format!("reading {len} bytes at offset {offset}");
        match st {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match parse_content_range(cr) {
                    Some((_, _, Some(total))) if total != self.size => {
                        return Err(Error::eio(format!(
                            "curl: {url}: {where_}: the remote file changed size (was {}, now {total} bytes)",
                            self.size
                        )))
                    }
                    Some((a, b, _)) if a == offset && b == last => {}
                    _ => {
                        return Err(Error::eio(format!(
                            "curl: {url}: {where_}: the server sent a different range (Content-Range: {cr})"
                        )))
                    }
                }
            }
            s if s.is_success() => {
                // The whole file is fine if that is what was asked.
                if !(s == StatusCode::OK && offset == 0 && len == self.size) {
                    return Err(Error::eio(format!(
                        "curl: {url}: {where_}: the server ignored the Range request (answered {s} instead of 206 Partial Content)"
                    )));
                }
            }
            s => return Err(inner.status_error(&where_, s, &url)),
        }
        if let Some(n) = resp.content_length() {
            if n != len {
                return Err(Error::eio(format!(
                    "curl: {url}: {where_}: the server announced {n} bytes"
                )));
            }
        }
        let mut got = 0usize;
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if got + c.len() > buf.len() {
                        return Err(Error::eio(format!(
                            "curl: {url}: {where_}: the server sent more data than asked for"
                        )));
                    }
                    buf[got..got + c.len()].copy_from_slice(&c);
                    got += c.len();
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::eio(format!(
                        "curl: {url}: {where_}: connection failed after {got} bytes: {}",
                        describe(&e)
                    )))
                }
            }
        }
        if got != buf.len() {
            return Err(Error::eio(format!(
                "curl: {url}: {where_}: short read: got {got} of {len} bytes (the connection was closed early)"
            )));
        }
        Ok(())
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        if self.readonly {
            return Err(Error::eperm("curl: the export is read-only"));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let last = offset + buf.len() as u64 - 1;
        let _slot = inner.slots.acquire().await.map_err(|e| inner.eio(e))?;
        let cr = format!("bytes {offset}-{last}/{}", self.size);
        let (resp, url) = inner.request(Method::PUT, None, Some((buf, cr))).await?;
        if !resp.status().is_success() {
            return Err(inner.status_error(
                &format!("writing {} bytes at offset {offset}", buf.len()),
                resp.status(),
                &url,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(words: &[&str]) -> Params {
        Params::parse(words, Some("url")).unwrap()
    }

    #[test]
    fn headers() {
        let n = |s: &str| HeaderName::from_bytes(s.as_bytes()).unwrap();
        assert_eq!(
            parse_header("X-My-Name: John Doe").unwrap(),
            HeaderLine::Add(n("x-my-name"), HeaderValue::from_static("John Doe"))
        );
        assert_eq!(
            parse_header("User-Agent:").unwrap(),
            HeaderLine::Remove(n("user-agent"))
        );
        assert_eq!(
            parse_header("X-Empty;").unwrap(),
            HeaderLine::Add(n("x-empty"), HeaderValue::from_static(""))
        );
        assert!(parse_header("nonsense").is_err());
        assert!(parse_header("Bad Name: x").is_err());
    }

    #[test]
    fn base64_and_ranges() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"bob:sec"), "Ym9iOnNlYw==");
        assert_eq!(
            parse_content_range("bytes 0-0/512"),
            Some((0, 0, Some(512)))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        assert_eq!(parse_content_range("bytes 19-10/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_unsatisfied_range("bytes */0"), Some(0));
    }

    #[test]
    fn passwords() {
        assert_eq!(read_password("password", "plain").unwrap(), "plain");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "sec\n\n").unwrap();
        let v = format!("+{}", f.display());
        assert_eq!(read_password("password", &v).unwrap(), "sec");
        assert!(read_password("password", "+/no/such/file").is_err());
        assert!(read_password("password", "-1").is_err());
        assert!(read_password("password", "-x").is_err());
        // -FD: a pipe's read end.
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, b"piped\n").unwrap();
        drop(w);
        use std::os::fd::IntoRawFd;
        let fd = r.into_raw_fd();
        assert_eq!(
            read_password("password", &format!("-{fd}")).unwrap(),
            "piped"
        );
    }

    #[test]
    fn cookie_jar() {
        let text = "# Netscape HTTP Cookie File\n\
                    .example.com\tTRUE\t/\tFALSE\t0\tsid\tabc\n\
                    #HttpOnly_host.test\tFALSE\t/img\tTRUE\t4102444800\tk\tv\n\
                    old.test\tFALSE\t/\tFALSE\t1\tgone\tx\n\
                    Set-Cookie: h=1; Domain=example.com; Path=/\n";
        let mut jar = CookieJar::parse(text);
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            jar.header_for(&u("http://www.example.com/a")).as_deref(),
            Some("sid=abc; h=1")
        );
        assert_eq!(jar.header_for(&u("http://host.test/img/x")), None); // secure
        assert_eq!(
            jar.header_for(&u("https://host.test/img/x")).as_deref(),
            Some("k=v")
        );
        assert_eq!(jar.header_for(&u("https://host.test/imgs")), None);
        assert_eq!(jar.header_for(&u("http://old.test/")), None);
        jar.store(&u("http://a.test/dir/file"), "s=1; Path=/; Max-Age=100");
        jar.store(&u("http://a.test/dir/file"), "t=2");
        jar.store(&u("http://a.test/"), "evil=1; Domain=other.test");
        assert_eq!(
            jar.header_for(&u("http://a.test/dir/x")).as_deref(),
            Some("s=1; t=2")
        );
        assert_eq!(jar.header_for(&u("http://a.test/")).as_deref(), Some("s=1"));
        jar.store(&u("http://a.test/"), "s=; Max-Age=0");
        assert_eq!(jar.header_for(&u("http://a.test/")), None);
        let again = CookieJar::parse(&jar.to_text());
        assert_eq!(again.cookies, jar.cookies);
    }

    #[test]
    fn cookie_dates() {
        assert_eq!(
            parse_cookie_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1445412480)
        );
        assert_eq!(
            parse_cookie_date("Wednesday, 21-Oct-15 07:28:00 GMT"),
            Some(1445412480)
        );
        assert_eq!(parse_cookie_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(1));
        assert_eq!(parse_cookie_date("garbage"), None);
    }

    #[test]
    fn config_errors() {
        for bad in [
            &[][..],
            &["url="],
            &["ftp://example.com/x"],
            &["not a url"],
            &["http://h/x", "protocols=https"],
            &["http://h/x", "protocols=http,bogus"],
            &["http://h/x", "connections=0"],
            &["http://h/x", "header=nonsense"],
            &["http://h/x", "header=A: b", "header-script=echo"],
            &["http://h/x", "cookie=a=b", "cookie-script=echo"],
            &["http://h/x", "ssl-version=sslv3"],
            &["http://h/x", "ssl-cipher-list=X"],
            &["http://h/x", "cainfo=/no/such/file"],
            &["http://h/x", "no-such-key=1"],
            &["http://h/x", "timeout=soon"],
        ] {
            assert!(ENTRY.configure(&mut params(bad)).is_err(), "{bad:?}");
        }
        let ok = ENTRY.configure(&mut params(&[
            "http://u:p%40ss@h:8080/x.img",
            "protocols=http,https",
            "header=X-A: 1",
            "header=User-Agent:",
            "cookie=a=b",
            "timeout=5",
            "followlocation=false",
            "sslverify=false",
            "ssl-version=tlsv1.2",
            "tcp-keepalive=true",
            "tcp-nodelay=false",
            "user-agent=me",
            "proxy=",
            "cookiefile=",
            "connections=8",
        ]));
        assert!(ok.is_ok());
        assert_eq!(pct_decode("p%40ss"), "p@ss");
    }

    #[test]
    fn registry_entry() {
        let e = ENTRY;
        assert_eq!(e.name, "curl");
        assert_eq!(e.magic, Some("url"));
        assert!(e.help.contains("url=<URL>"));
    }
}
