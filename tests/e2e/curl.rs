//! The curl plugin against nginx (real ranges and keep-alive) and against
//! a small in-process HTTP server that misbehaves on purpose: each fault
//! must give a clear error, never wrong data.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{nbdkit, nbdpy, random_file, require, require_nbdsh, run, Server, PYTHON};
use crate::nginx::{Nginx, NGINX};

/// A request as the fault server saw it (header names in lower case).
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The `Range: bytes=A-B` asked for.
    pub fn range(&self) -> Option<(u64, u64)> {
        let r = self.header("range")?.strip_prefix("bytes=")?;
        let (a, b) = r.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

/// What the fault server answers.
pub enum Resp {
    /// A complete response (no body is sent for HEAD).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Announce `len` bytes with these headers, send `partial`, then close.
    Drop {
        status: u16,
        headers: Vec<(String, String)>,
        len: usize,
        partial: Vec<u8>,
    },
}

/// A correct answer for `data`: HEAD with size and `Accept-Ranges`, GET
/// with a 206 for a range (the total reported as `total`).
pub fn serve(data: &[u8], req: &Req, total: u64) -> Resp {
    let base = vec![("Accept-Ranges".to_string(), "bytes".to_string())];
    match (req.method.as_str(), req.range()) {
        ("HEAD", _) => Resp::Full {
            status: 200,
            headers: [
                base,
                vec![("Content-Length".into(), data.len().to_string())],
            ]
            .concat(),
            body: Vec::new(),
        },
        ("GET", Some((a, b))) => {
            let b = b.min(data.len() as u64 - 1);
            Resp::Full {
                status: 206,
                headers: [
                    base,
                    vec![("Content-Range".into(), format!("bytes {a}-{b}/{total}"))],
                ]
                .concat(),
                body: data[a as usize..=b as usize].to_vec(),
            }
        }
        _ => Resp::Full {
            status: 200,
            headers: base,
            body: data.to_vec(),
        },
    }
}

type Handler = dyn Fn(&Req) -> Resp + Send + Sync;

/// The in-process HTTP/1.1 server (keep-alive, one thread per connection).
pub struct FaultServer {
    pub port: u16,
    pub log: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl FaultServer {
    pub fn start(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> FaultServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (log2, stop2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(s) = s else { continue };
                let (h, log) = (handler.clone(), log2.clone());
                std::thread::spawn(move || connection(s, &*h, &log));
            }
        });
        FaultServer { port, log, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn connection(s: TcpStream, h: &Handler, log: &Mutex<Vec<Req>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut it = line.split_whitespace();
        let (method, path) = (
            it.next().unwrap_or("").to_string(),
            it.next().unwrap_or("").to_string(),
        );
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                return;
            }
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let req = Req {
            method,
            path,
            headers,
        };
        if let Some(n) = req
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let mut body = vec![0u8; n];
            if r.read_exact(&mut body).is_err() {
                return;
            }
        }
        log.lock().unwrap().push(req.clone());
        let head = |status: u16, headers: &[(String, String)], len: usize| {
            let mut s = format!("HTTP/1.1 {status} Whatever\r\nContent-Length: {len}\r\n");
            for (k, v) in headers {
                if !k.eq_ignore_ascii_case("content-length") {
                    s.push_str(&format!("{k}: {v}\r\n"));
                }
            }
            s.push_str("\r\n");
            s
        };
        match h(&req) {
            Resp::Full {
                status,
                headers,
                body,
            } => {
                let len = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(body.len());
                let mut out = head(status, &headers, len).into_bytes();
                if req.method != "HEAD" {
                    out.extend_from_slice(&body);
                }
                if w.write_all(&out).is_err() {
                    return;
                }
            }
            Resp::Drop {
                status,
                headers,
                len,
                partial,
            } => {
                let _ = w.write_all(head(status, &headers, len).as_bytes());
                let _ = w.write_all(&partial);
                let _ = w.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

/// `nbdinfo --size` against our nbdkit with these arguments: (success,
/// stdout, stderr).
fn nbdinfo_size(args: &[&str]) -> (bool, String, String) {
    let mut a = vec!["-U", "-"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--run", "nbdinfo --size \"$uri\""]);
    let out = run(Command::new(nbdkit()).args(&a));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Read `len` bytes at `off` through our nbdkit: Ok(data) or Err(stderr
/// of the failing Python client).
fn read_via(args: &[&str], off: u64, len: u64) -> Result<Vec<u8>, String> {
    let srv = Server::ours(args);
    let out = run(Command::new(PYTHON).arg("-c").arg(format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nsys.stdout.buffer.write(h.pread({len}, {off}))\n"
    )).arg(srv.uri()));
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 253) as u8).collect()
}

#[test]
fn curl_nginx_size_and_random_reads() {
    if !require(&[NGINX, "nbdinfo"]) || !require_nbdsh() {
        return;
    }
    let ng = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    random_file(&raw, (3 << 20) + 4096, 42);
    ng.serve(&raw, "disk.img");
    let (ok, out, err) = nbdinfo_size(&["curl", &ng.url("disk.img")]);
    assert!(ok, "{err}");
    assert_eq!(out, ((3 << 20) + 4096).to_string());

    let srv = Server::ours(&["-r", "curl", &ng.url("disk.img"), "connections=4"]);
    let script = format!(
        r#"
import random
raw = open({raw:?}, "rb").read()
assert h.get_size() == len(raw)
rnd = random.Random(5)
for i in range(150):
    n = rnd.randint(1, 300000)
    off = rnd.randint(0, len(raw) - n)
    assert h.pread(n, off) == raw[off:off+n], (off, n)
# Many reads in flight at once.
bufs = []
for i in range(32):
    off = rnd.randint(0, len(raw) - 65536)
    b = nbd.Buffer(65536)
    bufs.append((off, b, h.aio_pread(b, off)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, b, c in bufs:
    assert b.to_bytearray() == raw[off:off+65536], off
print("ok")
"#,
        raw = raw.display().to_string()
    );
    assert_eq!(nbdpy(&srv.uri(), &script).trim(), "ok");
    // Reads really were ranges.
    assert!(ng.access_log().contains("\" 206 "));

    // http-version=: HTTP/1.x works with nginx (which speaks HTTP/1.1
    // in cleartext), prior-knowledge HTTP/2 does not, HTTP/3 is refused.
    for v in ["1.1", "1.0", "none", "2.0"] {
        let (ok, out, err) =
            nbdinfo_size(&["curl", &ng.url("disk.img"), &format!("http-version={v}")]);
        assert!(ok && out == ((3 << 20) + 4096).to_string(), "{v}: {err}");
    }
    let (ok, _, _) = nbdinfo_size(&[
        "curl",
        &ng.url("disk.img"),
        "http-version=2-prior-knowledge",
    ]);
    assert!(!ok);
    let o = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "curl",
        &ng.url("disk.img"),
        "http-version=3",
        "--run",
        "true",
    ]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("HTTP/3"),
        "{o:?}"
    );
}

#[test]
fn curl_nginx_redirects_auth_and_unix_socket() {
    if !require(&[NGINX, "nbdinfo"]) {
        return;
    }
    let ng = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    random_file(&raw, 1 << 20, 7);
    ng.serve(&raw, "disk.img");
    ng.serve(&raw, "private/disk.img");
    ng.set_password("bob", "s3cret");

    // A redirect is followed, unless followlocation=false.
    let (ok, out, err) = nbdinfo_size(&["curl", &ng.url("moved.img")]);
    assert!(ok, "{err}");
    assert_eq!(out, (1 << 20).to_string());
    let (ok, _, err) = nbdinfo_size(&["curl", &ng.url("moved.img"), "followlocation=false"]);
    assert!(!ok);
    assert!(err.contains("302"), "{err}");

    // A redirect loop, a missing file.
    let (ok, _, err) = nbdinfo_size(&["curl", &ng.url("loop.img")]);
    assert!(!ok);
    assert!(err.contains("redirect loop"), "{err}");
    let (ok, _, err) = nbdinfo_size(&["curl", &ng.url("missing.img")]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");

    // Basic authentication, the password from a file or in the URL.
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let pwarg = format!("password=+{}", pw.display());
    let url = ng.url("private/disk.img");
    let (ok, out, err) = nbdinfo_size(&["curl", &url, "user=bob", &pwarg]);
    assert!(ok, "{err}");
    assert_eq!(out, (1 << 20).to_string());
    let cred_url = url.replace("http://", "http://bob:s3cret@");
    assert!(nbdinfo_size(&["curl", &cred_url]).0);
    let (ok, _, err) = nbdinfo_size(&["curl", &url, "user=bob", "password=wrong"]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");

    // protocols= is checked at startup.
    let out = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "curl",
        &url,
        "protocols=https",
        "--run",
        "true",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("protocols"));
    let out =
        run(Command::new(nbdkit()).args(["-U", "-", "curl", "ftp://127.0.0.1/x", "--run", "true"]));
    assert!(!out.status.success());
}

#[test]
fn curl_unix_socket_path() {
    if !require(&["nbdinfo"]) {
        return;
    }
    // The fault server's correct mode, reached through a Unix socket.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let d = data(100_000);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let d = d.clone();
            std::thread::spawn(move || {
                // Reuse the TCP code path by bridging to a local server.
                let srv = FaultServer::start(move |r| serve(&d, r, 100_000));
                let mut t = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
                let mut s2 = s.try_clone().unwrap();
                let mut t2 = t.try_clone().unwrap();
                let a = std::thread::spawn(move || std::io::copy(&mut s2, &mut t2));
                let mut s = s;
                let _ = std::io::copy(&mut t, &mut s);
                let _ = a.join();
            });
        }
    });
    let sockarg = format!("unix-socket-path={}", sock.display());
    let (ok, out, err) = nbdinfo_size(&["curl", "http://localhost/disk.img", &sockarg]);
    assert!(ok, "{err}");
    assert_eq!(out, "100000");
}

#[test]
fn curl_server_ignoring_ranges() {
    if !require(&["nbdinfo"]) || !require_nbdsh() {
        return;
    }
    let d = data(50_000);
    // Honest about it: no Accept-Ranges, 200 to a ranged GET.
    let d1 = d.clone();
    let srv = FaultServer::start(move |_| Resp::Full {
        status: 200,
        headers: vec![],
        body: d1.clone(),
    });
    let (ok, _, err) = nbdinfo_size(&["curl", &srv.url("x")]);
    assert!(!ok);
    assert!(err.contains("does not support range requests"), "{err}");
    // Claims ranges at HEAD, ignores them on reads.
    let d2 = d.clone();
    let liar = FaultServer::start(move |r| match r.method.as_str() {
        "HEAD" => serve(&d2, r, 50_000),
        _ => Resp::Full {
            status: 200,
            headers: vec![],
            body: d2.clone(),
        },
    });
    let e = read_via(&["-r", "curl", &liar.url("x")], 1000, 1000).unwrap_err();
    assert!(e.contains("Input/output error") || e.contains("EIO"), "{e}");
}

#[test]
fn curl_size_change_short_body_and_dropped_connection() {
    if !require_nbdsh() {
        return;
    }
    let d = Arc::new(data(200_000));
    // The Content-Range total differs from the size found at open.
    let d1 = d.clone();
    let grows = FaultServer::start(move |r| match r.method.as_str() {
        "HEAD" => serve(&d1, r, 200_000),
        _ => serve(&d1, r, 300_000),
    });
    assert!(read_via(&["-r", "curl", &grows.url("x")], 0, 4096).is_err());
    // The connection drops halfway through the body.
    let d2 = d.clone();
    let drops = FaultServer::start(move |r| match (r.method.as_str(), r.range()) {
        ("GET", Some((a, b))) if a > 0 => Resp::Drop {
            status: 206,
            headers: vec![("Content-Range".into(), format!("bytes {a}-{b}/200000"))],
            len: (b - a + 1) as usize,
            partial: d2[a as usize..(a + (b - a) / 2) as usize].to_vec(),
        },
        _ => serve(&d2, r, 200_000),
    });
    assert!(read_via(&["-r", "curl", &drops.url("x")], 10_000, 50_000).is_err());
    // A good read on the same kind of server still works.
    assert_eq!(
        read_via(&["-r", "curl", &drops.url("x")], 0, 50_000).unwrap(),
        d[..50_000]
    );
    // A 404 after open (the file went away after the first read).
    let gets = Arc::new(AtomicUsize::new(0));
    let (d3, g) = (d.clone(), gets.clone());
    let vanishing = FaultServer::start(move |r| {
        if r.method == "GET" && g.fetch_add(1, Ordering::SeqCst) >= 1 {
            Resp::Full {
                status: 404,
                headers: vec![],
                body: b"gone".to_vec(),
            }
        } else {
            serve(&d3, r, 200_000)
        }
    });
    let srv = Server::ours(&["-r", "curl", &vanishing.url("x")]);
    let out = nbdpy(
        &srv.uri(),
        "assert len(h.pread(100, 0)) == 100\ntry:\n    h.pread(100, 4096)\n    print('no error')\nexcept nbd.Error as e:\n    print('error', e.errno)\n",
    );
    assert!(out.contains("error EIO"), "{out}");
}

#[test]
fn curl_headers_cookies_scripts_and_parallelism() {
    if !require_nbdsh() {
        return;
    }
    let d = Arc::new(data(300_000));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (d1, f1, p1) = (d.clone(), in_flight.clone(), peak.clone());
    let srv = FaultServer::start(move |r| {
        let now = f1.fetch_add(1, Ordering::SeqCst) + 1;
        p1.fetch_max(now, Ordering::SeqCst);
        if r.method == "GET" {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut resp = serve(&d1, r, 300_000);
        if r.method == "HEAD" {
            if let Resp::Full { headers, .. } = &mut resp {
                headers.push(("Set-Cookie".into(), "sid=xyz; Path=/".into()));
            }
        }
        f1.fetch_sub(1, Ordering::SeqCst);
        resp
    });
    let dir = tempfile::tempdir().unwrap();
    let jar = dir.path().join("jar.txt");
    let jararg = format!("cookiejar={}", jar.display());
    {
        let nbd = Server::ours(&[
            "-r",
            "curl",
            &srv.url("disk"),
            "header=X-Test: yes",
            "header=Accept:",
            "user-agent=tester/1",
            &jararg,
            "connections=8",
        ]);
        let script = r#"
bufs = [nbd.Buffer(4096) for i in range(16)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 10000)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("ok")
"#;
        assert_eq!(nbdpy(&nbd.uri(), script).trim(), "ok");
    }
    let reqs = srv.requests();
    let gets: Vec<&Req> = reqs.iter().filter(|r| r.method == "GET").collect();
    assert!(gets.len() >= 16);
    for g in &gets {
        assert_eq!(g.path, "/disk");
        assert_eq!(g.header("x-test"), Some("yes"));
        assert_eq!(g.header("user-agent"), Some("tester/1"));
        assert_eq!(g.header("cookie"), Some("sid=xyz"));
    }
    assert!(
        peak.load(Ordering::SeqCst) > 1,
        "requests were not run in parallel"
    );
    let saved = std::fs::read_to_string(&jar).unwrap();
    assert!(saved.contains("sid\txyz"), "{saved}");

    // Header and cookie scripts, renewed.
    let srv2 = {
        let d = d.clone();
        FaultServer::start(move |r| serve(&d, r, 300_000))
    };
    {
        let nbd = Server::ours(&[
            "-r",
            "curl",
            &srv2.url("disk"),
            "header-script=echo \"Authorization: Bearer tok-$iteration\"; echo \"X-Url: $url\"",
            "header-script-renew=1",
            "cookie-script=echo \"c=$iteration\"",
        ]);
        let script =
            "h.pread(10, 0)\nimport time\ntime.sleep(1.5)\nh.pread(10, 100)\nprint('ok')\n";
        assert_eq!(nbdpy(&nbd.uri(), script).trim(), "ok");
    }
    let reqs = srv2.requests();
    let auth: Vec<&str> = reqs
        .iter()
        .filter_map(|r| r.header("authorization"))
        .collect();
    assert_eq!(auth.first(), Some(&"Bearer tok-0"));
    assert_eq!(auth.last(), Some(&"Bearer tok-1"));
    assert!(reqs.iter().all(|r| r.header("cookie") == Some("c=0")));
    assert_eq!(reqs[0].header("x-url"), Some(srv2.url("disk").as_str()));
}

#[test]
fn curl_password_from_stdin_needs_a_tty() {
    let out = run(Command::new(nbdkit())
        .args([
            "-U",
            "-",
            "curl",
            "http://127.0.0.1:9/x",
            "user=a",
            "password=-",
            "--run",
            "true",
        ])
        .stdin(std::process::Stdio::null()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tty"));
    // With a terminal (script(1) gives one), the typed password is used.
    if !require(&["script"]) {
        return;
    }
    let d = data(1000);
    let srv = FaultServer::start(move |r| {
        if r.header("authorization") == Some("Basic YTpzZWNyZXQ=") {
            serve(&d, r, 1000)
        } else {
            Resp::Full {
                status: 401,
                headers: vec![],
                body: vec![],
            }
        }
    });
    let cmd = format!(
        "{} -U - curl {} user=a password=- --run 'nbdinfo --size \"$uri\"'",
        nbdkit().display(),
        srv.url("x")
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    child.stdin.take().unwrap().write_all(b"secret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("1000"), "{s}");
}

#[test]
fn curl_writes_are_put_requests() {
    if !require_nbdsh() {
        return;
    }
    let d = data(8192);
    let srv = FaultServer::start(move |r| match r.method.as_str() {
        "PUT" => Resp::Full {
            status: 405,
            headers: vec![],
            body: vec![],
        },
        _ => serve(&d, r, 8192),
    });
    let nbd = Server::ours(&["curl", &srv.url("disk")]);
    let out = nbdpy(
        &nbd.uri(),
        "try:\n    h.pwrite(b'x' * 512, 512)\n    print('no error')\nexcept nbd.Error as e:\n    print('error', e.errno)\n",
    );
    assert!(out.contains("error EIO"), "{out}");
    let puts: Vec<Req> = srv
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].header("content-range"), Some("bytes 512-1023/8192"));
}

#[test]
fn curl_file_urls_as_libcurl_takes_them() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk f.img");
    random_file(&img, 1 << 20, 9);
    let path = img.display().to_string().replace(' ', "%20");
    let script =
        "import hashlib\nprint(h.get_size(), hashlib.sha256(h.pread(1 << 20, 0)).hexdigest())\n";
    // file:///path and file://localhost/path, with escapes: the same
    // bytes as upstream's (libcurl's) reading.
    for url in [format!("file://{path}"), format!("file://localhost{path}")] {
        let args = ["-r", "curl", url.as_str()];
        if let Some(out) = crate::common::same_as_upstream(&args, script) {
            assert!(out.starts_with("1048576 "), "{out}");
        }
    }
    // Writes land in place (upstream's truncate the file).
    let url = format!("file://{path}");
    let s = Server::ours(&["curl", &url]);
    if require_nbdsh() {
        nbdpy(
            &s.uri(),
            "h.pwrite(b'hello', 4096)\nh.flush() if h.can_flush() else None\n",
        );
    }
    drop(s);
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert_eq!(&data[4096..4101], b"hello");
    // A missing file fails the connection, with the reason in the log.
    let missing = format!("file://{}/none.img", dir.path().display());
    let o = run(Command::new(nbdkit()).args([
        "-U",
        "-",
        "curl",
        &missing,
        "--run",
        "nbdinfo --size \"$uri\"",
    ]));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file"),
        "{o:?}"
    );
}
