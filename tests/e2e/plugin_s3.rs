//! The S3 plugin against a real S3 server on loopback (`s3s-fs`, a Rust
//! S3 server over a directory, so the chunk objects can be checked from
//! the store's side as files), read and written with libnbd's tools and
//! qemu-img, and against upstream's Python S3 plugin on the same store.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const BUCKET: &str = "disks";
const ACCESS: &str = "AKTEST";
const SECRET: &str = "SECRETTEST";

/// An s3s-fs server over a temporary directory, killed on drop.
struct Store {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("server exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port}");
}

impl Store {
    fn start() -> Option<Store> {
        if !require(&["s3s-fs"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
        let port = free_port();
        let mut child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS, "--secret-key", SECRET])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start s3s-fs");
        wait_for_port(port, &mut child);
        Some(Store { child, port, dir })
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// Where an object is kept.
    fn object(&self, key: &str) -> PathBuf {
        self.dir.path().join(BUCKET).join(key)
    }
    /// The chunk objects under `key/` as (chunk number, size), in order.
    fn chunks(&self, key: &str) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = match std::fs::read_dir(self.object(key)) {
            Ok(d) => d
                .map(|e| e.unwrap())
                .filter_map(|e| {
                    let n = u64::from_str_radix(e.file_name().to_str()?, 16).ok()?;
                    Some((n, e.metadata().unwrap().len()))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort_unstable();
        v
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The plugin's arguments for a key on a store at `endpoint`.
fn s3_args(endpoint: &str, key: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "S3".to_string(),
        format!("endpoint-url={endpoint}"),
        format!("access-key={ACCESS}"),
        format!("secret-key={SECRET}"),
        format!("bucket={BUCKET}"),
        format!("key={key}"),
    ]
    .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn serve(endpoint: &str, key: &str, extra: &[&str]) -> Server {
    let args = s3_args(endpoint, key, extra);
    Server::ours(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn s3_chunked_layout() {
    let Some(store) = Store::start() else { return };
    if !require_nbdsh() {
        return;
    }
    let srv = serve(&store.endpoint(), "vm/disk", &["size=8M", "object-size=1M"]);
    let out = nbdpy(
        &srv.uri(),
        r#"
M = 1 << 20
h.pwrite(b"\x11" * M, 0)                    # chunk 0, whole
h.pwrite(b"\x22" * 100, 3 * M + 10)         # chunk 3, partial
h.pwrite(b"\x33" * (M + 20), 5 * M - 10)    # chunks 4 (end), 5 (whole), 6 (start)
assert h.pread(100, 3 * M + 10) == b"\x22" * 100
assert h.pread(20, 3 * M) == b"\x00" * 10 + b"\x22" * 10
h.flush()
print("written")
"#,
    );
    assert!(out.contains("written"));
    let m = 1u64 << 20;
    assert_eq!(
        store.chunks("vm/disk"),
        vec![(0, m), (3, m), (4, m), (5, m), (6, m)],
        "one object per written chunk, each of object-size"
    );
    let c3 = std::fs::read(store.object("vm/disk/0000000000000003")).unwrap();
    assert!(c3[..10].iter().all(|b| *b == 0) && c3[10..110].iter().all(|b| *b == 0x22));
    assert!(c3[110..].iter().all(|b| *b == 0));

    // Trims and zeroes of whole chunks delete their objects; a partial
    // zero rewrites the chunk; a partial trim leaves it.
    let out = nbdpy(
        &srv.uri(),
        r#"
M = 1 << 20
h.trim(M, 0)
h.zero(2 * M, 4 * M)            # chunks 4 and 5
h.zero(50, 3 * M + 20)          # part of chunk 3
h.trim(100, 6 * M)              # part of chunk 6: advisory, kept
h.flush()
assert h.pread(M, 0) == b"\x00" * M
assert h.pread(100, 3 * M + 10) == b"\x22" * 10 + b"\x00" * 50 + b"\x22" * 40
print("changed")
"#,
    );
    assert!(out.contains("changed"));
    assert_eq!(store.chunks("vm/disk"), vec![(3, m), (6, m)]);
    let c3 = std::fs::read(store.object("vm/disk/0000000000000003")).unwrap();
    assert!(c3[20..70].iter().all(|b| *b == 0) && c3[70..110].iter().all(|b| *b == 0x22));

    // A chunk without an object is a hole.
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(srv.uri()));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        vec![
            vec!["0", &(3 * m).to_string(), "3", "hole,zero"],
            vec![&(3 * m).to_string(), &m.to_string(), "0", "data"],
            vec![&(4 * m).to_string(), &(2 * m).to_string(), "3", "hole,zero"],
            vec![&(6 * m).to_string(), &m.to_string(), "0", "data"],
            vec![&(7 * m).to_string(), &m.to_string(), "3", "hole,zero"],
        ],
        "{map}"
    );
}

#[test]
fn s3_writes_reach_the_store_without_a_flush() {
    // libnbd's nbdcopy does not flush unless asked: what it wrote must be
    // stored when it disconnects.
    let Some(store) = Store::start() else { return };
    if !require(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 3 << 20, 7);
    let args = s3_args(&store.endpoint(), "d", &["size=4M", "object-size=1M"]);
    let out = run(Command::new(nbdkit())
        .args(["-U", "-"])
        .args(&args)
        .args(["--run", &format!("nbdcopy {} $uri", src.display())]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = 1u64 << 20;
    assert_eq!(store.chunks("d"), vec![(0, m), (1, m), (2, m)]);
    let data = std::fs::read(&src).unwrap();
    for n in 0..3usize {
        let obj = std::fs::read(store.object(&format!("d/{n:016x}"))).unwrap();
        assert!(obj == data[n << 20..(n + 1) << 20], "chunk {n}");
    }
}

#[test]
fn s3_single_object_is_read_only() {
    let Some(store) = Store::start() else { return };
    if !require(&["nbdcopy", "nbdinfo"]) || !require_nbdsh() {
        return;
    }
    // An odd-sized object, "uploaded" by putting it in the store's tree.
    random_file(&store.object("image.raw"), 3_000_001, 3);
    let srv = serve(&store.endpoint(), "image.raw", &[]);
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(srv.uri()));
    assert_eq!(size.trim(), "3000001");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(store.object("image.raw")).unwrap());
    let r = nbdpy(
        &srv.uri(),
        r#"
assert h.is_read_only()
try:
    h.pwrite(b"x", 0)
    print("wrote")
except nbd.Error as e:
    print("refused", e.errno in ("EPERM", errno.EPERM))
"#,
    );
    assert_eq!(r.trim(), "refused True");
}

#[test]
fn s3_wrong_credentials_are_a_clear_error() {
    let Some(store) = Store::start() else { return };
    let mut args = s3_args(&store.endpoint(), "d", &["size=1M", "object-size=64k"]);
    args[3] = "secret-key=not-the-secret".into();
    let info = our_bin("nbdinfo");
    let out = run(Command::new(nbdkit())
        .args(["-U", "-"])
        .args(&args)
        .args(["--run", &format!("{} $uri", info.display())]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
    // Missing credentials are refused before anything is started.
    let out = run(Command::new(nbdkit())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env("HOME", "/nonexistent")
        .args(["-U", "-", "S3", "bucket=x", "key=y", "--run", "true"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credentials"));
}

/// A proxy in front of the store that answers `503 Slow Down` to the
/// first `fail` requests and to every `every`-th one after.
const FLAKY_PROXY: &str = r#"
import http.client, http.server, socketserver, sys, threading
target, port, fail, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
count = 0
lock = threading.Lock()
class P(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def handle_one(self):
        global count
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        with lock:
            count += 1
            c = count
        if c <= fail or c % every == 0:
            msg = b"<Error><Code>SlowDown</Code></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(target)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = handle_one
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", port), P).serve_forever()
"#;

#[test]
fn s3_retries_a_store_that_is_slow_down() {
    let Some(store) = Store::start() else { return };
    if !require(&["nbdcopy", PYTHON]) {
        return;
    }
    let port = free_port();
    let mut proxy = Command::new(PYTHON)
        .args(["-c", FLAKY_PROXY])
        .arg(format!("127.0.0.1:{}", store.port))
        .args([&port.to_string(), "5", "4"])
        .spawn()
        .unwrap();
    wait_for_port(port, &mut proxy);
    let endpoint = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 2 << 20, 11);
    let srv = serve(&endpoint, "flaky", &["size=2M", "object-size=256k"]);
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").arg(&src).arg(srv.uri()));
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg(&back));
    drop(srv);
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    assert_eq!(store.chunks("flaky").len(), 8);
}

/// Upstream's Python plugin (boto3) on the same store: each opens the
/// other's disks.
#[test]
fn s3_disks_interoperate_with_upstream() {
    let Some(store) = Store::start() else { return };
    if !require(&[
        "nbdkit",
        "nbdcopy",
        "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 1 << 20, 5);
    // Upstream's object size is limited to 64K (its minimum block size).
    let chunked = ["size=2M", "object-size=64k"];
    let copy = |prog: &Path, key: &str, from_to: (&str, &str)| {
        let args = s3_args(&store.endpoint(), key, &chunked);
        let cmd = format!("nbdcopy {} {}", from_to.0, from_to.1);
        let out = run(Command::new(prog)
            .args(["-U", "-"])
            .args(&args)
            .args(["--run", &cmd]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let upstream = Path::new("nbdkit");
    let s = src.display().to_string();
    let a = dir.path().join("a.img").display().to_string();
    let b = dir.path().join("b.img").display().to_string();
    copy(&nbdkit(), "ours", (&s, "$uri"));
    copy(upstream, "ours", ("$uri", &a));
    copy(upstream, "theirs", (&s, "$uri"));
    copy(&nbdkit(), "theirs", ("$uri", &b));
    let want = std::fs::read(&src).unwrap();
    for f in [&a, &b] {
        let got = std::fs::read(f).unwrap();
        assert!(
            got[..1 << 20] == want[..] && got[1 << 20..].iter().all(|x| *x == 0),
            "{f}"
        );
    }
    assert_eq!(store.chunks("ours"), store.chunks("theirs"));
}

#[test]
fn s3_copy_in_and_out_compares_equal() {
    let Some(store) = Store::start() else { return };
    if !require(&["qemu-img"]) {
        return;
    }
    // Our nbdcopy into a captive nbdkit, several connections at once, then
    // out again; qemu-img compares.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 24 << 20, 13);
    let back = dir.path().join("back.img");
    let args = s3_args(&store.endpoint(), "big", &["size=32M", "object-size=4M"]);
    let mut captive = vec!["[".to_string(), nbdkit().display().to_string()];
    captive.extend(args);
    captive.push("]".into());
    let nbdcopy = our_bin("nbdcopy");
    run_ok(Command::new(&nbdcopy).arg("--").arg(&src).args(&captive));
    run_ok(Command::new(&nbdcopy).arg("--").args(&captive).arg(&back));
    let mut padded = std::fs::read(&src).unwrap();
    padded.resize(32 << 20, 0);
    std::fs::write(&src, padded).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&back),
    );
    assert_eq!(store.chunks("big").len(), 6);
}
