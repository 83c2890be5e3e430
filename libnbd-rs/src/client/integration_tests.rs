//! The client against real servers nobody here wrote: upstream `nbdkit`
//! and `qemu-nbd`. A test whose server is not installed is skipped with
//! a message, unless `CI=true`, where it fails.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::captive::{CaptiveServer, Target};
use crate::protocol::{alloc, cmdflag, errno};

use super::*;

/// Is `bin` installed? Panics if not and `CI=true`.
fn have(bin: &str) -> bool {
    crate::testing::require(&[bin])
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn unix_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

fn wait_for(what: &str, child: &mut Child, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early: {st}");
        }
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nbdkit -U SOCK -f ARGS`.
fn nbdkit_unix(args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let mut child = Command::new("nbdkit")
        .arg("-U")
        .arg(&sock)
        .args(["-f", "--exit-with-parent"])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("nbdkit", &mut child, || UnixStream::connect(&sock).is_ok());
    Server {
        child,
        dir,
        sock,
        port: 0,
    }
}

/// A port nobody listens on (now).
fn free_port(ip: &str) -> Option<u16> {
    let l = TcpListener::bind((ip, 0)).ok()?;
    Some(l.local_addr().ok()?.port())
}

/// `nbdkit -i IP -p PORT -f ARGS`.
fn nbdkit_tcp(ip: &str, args: &[&str]) -> Server {
    let port = free_port(ip).unwrap();
    let mut child = Command::new("nbdkit")
        .args([
            "-i",
            ip,
            "-p",
            &port.to_string(),
            "-f",
            "--exit-with-parent",
        ])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    wait_for("nbdkit", &mut child, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    Server {
        child,
        dir: tempfile::tempdir().unwrap(),
        sock: PathBuf::new(),
        port,
    }
}

/// `qemu-nbd -k SOCK -t ARGS` (persistent: serves several clients in
/// turn).
fn qemu_nbd(args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let mut child = Command::new("qemu-nbd")
        .arg("-k")
        .arg(&sock)
        .args(["-t", "-e", "4"])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("qemu-nbd", &mut child, || {
        UnixStream::connect(&sock).is_ok()
    });
    Server {
        child,
        dir,
        sock,
        port: 0,
    }
}

fn qcow2(dir: &Path, size: &str) -> PathBuf {
    let f = dir.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&f)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success());
    f
}

/// What upstream `nbdinfo` prints as `uri:` for a URI.
fn nbdinfo_uri(uri: &str) -> Option<String> {
    if !have("nbdinfo") {
        return None;
    }
    let out = Command::new("nbdinfo")
        .arg("--no-content")
        .arg(uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("uri: "))
        .map(str::to_string)
}

/// The `base:allocation` flags at each 64K block of the first `len`
/// bytes.
async fn allocation_map(c: &Connection, len: u64) -> Vec<u32> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        let bs = c.block_status(len - off, off, 0).await.unwrap();
        let ex = bs.get("base:allocation").unwrap();
        for e in ex {
            let end = (off + e.length).min(len);
            while (out.len() as u64) * 65536 < end {
                out.push(e.flags);
            }
            off = end;
        }
    }
    out
}

#[tokio::test]
async fn nbdkit_unix_uri() {
    if !have("nbdkit") {
        return;
    }
    let s = nbdkit_unix(&["memory", "1M"]);
    let uri = s.unix_uri();
    let c = Connection::connect_uri(&uri, &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.protocol(), "newstyle-fixed");
    assert!(c.structured_replies());
    assert!(c.can_meta_context("base:allocation"));
    assert!(!c.is_read_only() && !c.is_rotational());
    assert!(c.can_flush() && c.can_fua() && c.can_trim() && c.can_zero());
    assert!(c.can_fast_zero() && c.can_df() && c.can_multi_conn() && c.can_cache());
    assert_eq!(c.uri().as_deref(), Some(uri.as_str()));
    if let Some(u) = nbdinfo_uri(&uri) {
        assert_eq!(c.uri(), Some(u), "libnbd's nbdinfo prints the same uri");
    }

    // Write, read back, and the allocation map follows.
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    c.pwrite(&data, 131072, cmdflag::FUA).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.pread_vec(65536, 131072, 0).await.unwrap(), data);
    assert_eq!(
        c.pread_vec(4096, 0, cmdflag::DF).await.unwrap(),
        vec![0; 4096]
    );
    let hz = alloc::HOLE | alloc::ZERO;
    let mut want = vec![hz; 16];
    want[2] = 0;
    assert_eq!(allocation_map(&c, 1 << 20).await, want);
    // REQ_ONE gives one extent, no longer than asked.
    let one = c.block_status(1 << 20, 0, cmdflag::REQ_ONE).await.unwrap();
    assert_eq!(
        one.get("base:allocation").unwrap(),
        &[StatusExtent {
            length: 131072,
            flags: hz
        }]
    );
    // Zero and trim punch the data out again.
    c.zero(32768, 131072, cmdflag::FAST_ZERO)
        .await
        .unwrap_or(());
    c.zero(32768, 131072, cmdflag::NO_HOLE).await.unwrap();
    c.trim(32768, 163840, 0).await.unwrap();
    assert_eq!(c.pread_vec(65536, 131072, 0).await.unwrap(), vec![0; 65536]);
    c.cache(1 << 20, 0, 0).await.unwrap();
    c.disconnect().await.unwrap();
    assert!(matches!(c.flush().await.unwrap_err(), Error::Closed));
}

#[tokio::test]
async fn nbdkit_tcp_ipv4_and_ipv6() {
    if !have("nbdkit") {
        return;
    }
    let mut addrs = vec![("127.0.0.1", "127.0.0.1".to_string())];
    if free_port("::1").is_some() {
        addrs.push(("::1", "[::1]".to_string()));
    } else {
        crate::elog!("skipping IPv6: cannot bind [::1]");
    }
    for (ip, host) in addrs {
        let s = nbdkit_tcp(ip, &["memory", "1M"]);
        let uri = format!("nbd://{host}:{}/", s.port);
        let c = Connection::connect_uri(&uri, &ConnectOptions::new())
            .await
            .unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert_eq!(c.uri().as_deref(), Some(uri.as_str()));
        if let Some(u) = nbdinfo_uri(&uri) {
            assert_eq!(c.uri(), Some(u));
        }
        c.pwrite(b"hello", 1000, 0).await.unwrap();
        assert_eq!(c.pread_vec(5, 1000, 0).await.unwrap(), b"hello");
        // Without a trailing slash or port, as people type them.
        let c2 =
            Connection::connect_uri(&format!("nbd://{host}:{}", s.port), &ConnectOptions::new())
                .await
                .unwrap();
        assert_eq!(c2.pread_vec(5, 1000, 0).await.unwrap(), b"hello");
    }
}

#[tokio::test]
async fn nbdkit_data_plugin_extents() {
    if !have("nbdkit") {
        return;
    }
    let s = nbdkit_unix(&["data", "1 2 3 @1048576 4"]);
    let c = Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(c.size(), 1048577);
    let bs = c.block_status(c.size(), 0, 0).await.unwrap();
    let ex = bs.get("base:allocation").unwrap();
    assert_eq!(ex[0].flags, 0, "the start is data");
    assert_eq!(
        ex[1].flags,
        alloc::HOLE | alloc::ZERO,
        "then a hole: {ex:?}"
    );
    assert_eq!(&c.pread_vec(4, 0, 0).await.unwrap(), &[1, 2, 3, 0]);
    assert_eq!(c.pread_vec(1, 1048576, 0).await.unwrap(), vec![4]);
}

#[tokio::test]
async fn nbdkit_list_exports_and_info() {
    if !have("nbdkit") {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("a"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(files.path().join("b b"), vec![2u8; 2 << 20]).unwrap();
    let dir = format!("dir={}", files.path().display());
    let s = nbdkit_unix(&["file", &dir]);
    let mut n = Negotiation::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(n.protocol(), "newstyle-fixed");
    let mut names: Vec<String> = n
        .list_exports()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["a", "b b"]);
    let contexts = n.list_meta_contexts("a", &[]).await.unwrap();
    assert!(
        contexts.contains(&"base:allocation".to_string()),
        "{contexts:?}"
    );
    let a = n.info("a").await.unwrap();
    let b = n.info("b b").await.unwrap();
    assert_eq!((a.size, b.size), (1 << 20, 2 << 20));
    assert!(b.can_meta_context("base:allocation"));
    assert_eq!(
        n.uri_for("b b").unwrap(),
        format!("nbd+unix:///b%20b?socket={}", s.sock.display())
    );
    let e = n.info("nope").await.unwrap_err();
    assert!(matches!(e, Error::OptionRefused { .. }), "{e:?}");
    n.set_export_name("b b");
    let c = n.go().await.unwrap();
    assert_eq!(c.size(), 2 << 20);
    assert_eq!(c.pread_vec(3, 5, 0).await.unwrap(), vec![2, 2, 2]);
    assert_eq!(
        c.uri().unwrap(),
        format!("nbd+unix:///b%20b?socket={}", s.sock.display())
    );
    // A URI naming an export.
    let uri = format!("nbd+unix:///a?socket={}", s.sock.display());
    let c = Connection::connect_uri(&uri, &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(c.size(), 1 << 20);
    // Abort is polite.
    let n = Negotiation::connect_uri(&uri, &ConnectOptions::new())
        .await
        .unwrap();
    n.abort().await.unwrap();
}

#[tokio::test]
async fn nbdkit_errors() {
    if !have("nbdkit") {
        return;
    }
    let s = nbdkit_unix(&["memory", "1M"]);
    let c = Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    let e = c.pread_vec(512, 1 << 20, 0).await.unwrap_err();
    assert!(matches!(e, Error::Server { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(errno::EINVAL), "{e}");
    crate::elog!("read past the end: {e}");
    // The connection survives a server error.
    c.pread_vec(512, 0, 0).await.unwrap();

    let ro = nbdkit_unix(&["-r", "memory", "1M"]);
    let c = Connection::connect_uri(&ro.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    assert!(c.is_read_only());
    let e = c.pwrite(&[1; 512], 0, 0).await.unwrap_err();
    assert_eq!(e.errno(), Some(errno::EPERM), "{e}");
    crate::elog!("write to read-only: {e}");

    let port = free_port("127.0.0.1").unwrap();
    let e = Connection::connect_uri(&format!("nbd://127.0.0.1:{port}/"), &ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("Connection refused"), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");

    // TLS required of a server without TLS: refused, not plaintext.
    let tls_uri = s.unix_uri().replacen("nbd+unix", "nbds+unix", 1);
    let e = Connection::connect_uri(&tls_uri, &ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Tls(_)), "{e:?}");
    assert!(e.to_string().contains("the server refused TLS"), "{e}");
    let e = Connection::connect_uri(
        &format!("nbd+unix:///?socket={}/nope", s.dir.path().display()),
        &ConnectOptions::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
}

#[tokio::test]
async fn nbdkit_oldstyle_and_no_structured_replies() {
    if !have("nbdkit") {
        return;
    }
    let s = nbdkit_unix(&["-o", "memory", "1M"]);
    let c = Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(c.protocol(), "oldstyle");
    assert_eq!(c.size(), 1 << 20);
    c.pwrite(&[5; 4096], 4096, 0).await.unwrap();
    assert_eq!(c.pread_vec(4096, 4096, 0).await.unwrap(), vec![5; 4096]);

    let s = nbdkit_unix(&["--no-sr", "memory", "1M"]);
    let c = Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(c.protocol(), "newstyle-fixed");
    assert!(!c.structured_replies());
    assert!(c.meta_contexts().is_empty());
    c.pwrite(&[6; 4096], 0, 0).await.unwrap();
    assert_eq!(
        c.pread_vec(8192, 0, 0).await.unwrap()[..4097],
        {
            let mut v = vec![6; 4096];
            v.push(0);
            v
        }[..]
    );
    assert!(matches!(
        c.block_status(512, 0, 0).await.unwrap_err(),
        Error::Unsupported(_)
    ));
    let e = c.pread_vec(512, 1 << 20, 0).await.unwrap_err();
    assert_eq!(e.errno(), Some(errno::EINVAL), "{e}");
}

#[tokio::test]
async fn nbdkit_block_size_policy() {
    if !have("nbdkit") {
        return;
    }
    let s = nbdkit_unix(&[
        "--filter=blocksize-policy",
        "memory",
        "4M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
    ]);
    let c = Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    assert_eq!(
        c.block_size(),
        Some(BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 20
        })
    );
    assert!(matches!(
        c.pread_vec(100, 0, 0).await.unwrap_err(),
        Error::InvalidArgument(_)
    ));
    // 3M in and out, split at the 1M maximum the server enforces.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i / 4096) as u8).collect();
    c.pwrite(&data, 512, 0).await.unwrap();
    assert_eq!(c.pread_vec(3 << 20, 512, 0).await.unwrap(), data);
    assert!(c.stats().requests >= 6);
}

#[tokio::test]
async fn nbdkit_large_reads_are_split() {
    if !have("nbdkit") {
        return;
    }
    // The pattern plugin: every 8 bytes hold their own offset.
    let s = nbdkit_unix(&["pattern", "100M"]);
    let c = Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
        .await
        .unwrap();
    let off = 8 << 20;
    let data = c.pread_vec(80 << 20, off, 0).await.unwrap();
    assert!(c.stats().requests >= 3);
    for i in (0..data.len()).step_by(1 << 16).chain([data.len() - 8]) {
        let v = u64::from_be_bytes(data[i..i + 8].try_into().unwrap());
        assert_eq!(v, off + i as u64);
    }
}

#[tokio::test]
async fn nbdkit_many_requests_in_flight() {
    if !have("nbdkit") {
        return;
    }
    let s = nbdkit_unix(&["memory", "16M"]);
    let c = Arc::new(
        Connection::connect_uri(&s.unix_uri(), &ConnectOptions::new())
            .await
            .unwrap(),
    );
    let n = 256u64;
    let writes = (0..n).map(|i| {
        let c = c.clone();
        async move { c.pwrite(&vec![i as u8; 4096], i * 65536, 0).await }
    });
    for r in join_all(writes).await {
        r.unwrap();
    }
    let reads = (0..n).map(|i| c.pread_vec(4096, i * 65536, 0));
    for (i, r) in join_all(reads).await.into_iter().enumerate() {
        assert_eq!(r.unwrap(), vec![i as u8; 4096]);
    }
    // From several tasks at once.
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..32u64 {
                    let off = (8 << 20) + (t * 32 + i) * 4096;
                    c.pwrite(&[t as u8 + 1; 4096], off, 0).await.unwrap();
                    assert_eq!(
                        c.pread_vec(4096, off, 0).await.unwrap(),
                        vec![t as u8 + 1; 4096]
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(c.in_flight(), 0);

    // Multi-conn: nbdkit memory advertises it.
    let uri = crate::uri::Uri::parse(&s.unix_uri()).unwrap();
    let m = Target::Uri(uri)
        .connect_multi(&ConnectOptions::new(), 4)
        .await
        .unwrap();
    assert_eq!(m.len(), 4);
    let reads = (0..64u64).map(|i| m.pread_vec(4096, (i % n) * 65536, 0));
    for (i, r) in join_all(reads).await.into_iter().enumerate() {
        assert_eq!(r.unwrap(), vec![(i as u64 % n) as u8; 4096]);
    }
    m.pwrite(&[0xee; 512], 0, 0).await.unwrap();
    m.flush().await.unwrap();
    for conn in m.connections() {
        assert_eq!(conn.pread_vec(512, 0, 0).await.unwrap(), vec![0xee; 512]);
    }
    m.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_nbd_qcow2_holes_and_contexts() {
    if !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = qcow2(dir.path(), "1M");
    let s = qemu_nbd(&["-A", "-f", "qcow2", disk.to_str().unwrap()]);
    let opts = ConnectOptions::new().meta_context("qemu:allocation-depth");
    let c = Connection::connect_uri(&s.unix_uri(), &opts).await.unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert!(c.block_size().is_some(), "qemu-nbd advertises block sizes");
    assert!(c.can_meta_context("qemu:allocation-depth"));
    c.pwrite(&[0x5a; 65536], 65536, 0).await.unwrap();
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();

    // A new connection: a sparse read comes back as data and hole
    // chunks.
    let c = Connection::connect_uri(&s.unix_uri(), &opts).await.unwrap();
    let data = c.pread_vec(1 << 20, 0, 0).await.unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0));
    assert!(data[65536..131072].iter().all(|&b| b == 0x5a));
    assert!(data[131072..].iter().all(|&b| b == 0));
    assert!(c.stats().hole_chunks > 0, "{:?}", c.stats());
    let bs = c.block_status(1 << 20, 0, 0).await.unwrap();
    assert_eq!(bs.contexts.len(), 2);
    let depth = bs.get("qemu:allocation-depth").unwrap();
    assert_eq!(depth[0].flags, 0, "unallocated at the start: {depth:?}");
    let map = allocation_map(&c, 1 << 20).await;
    assert_eq!(map[1], 0, "written block is data: {map:?}");
    assert_ne!(
        map[0] & alloc::ZERO,
        0,
        "first block reads as zero: {map:?}"
    );
    // DF: one chunk for the whole read.
    let before = c.stats().chunks;
    let d = c.pread_vec(1 << 20, 0, cmdflag::DF).await.unwrap();
    assert_eq!(d, data);
    assert_eq!(c.stats().chunks - before, 1);
}

#[tokio::test]
async fn captive_qemu_nbd_and_nbdkit() {
    if !have("qemu-nbd") || !have("qemu-img") || !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = qcow2(dir.path(), "2M");
    let args = ["[", "qemu-nbd", "-f", "qcow2", disk.to_str().unwrap(), "]"];
    let (t, used) = Target::from_args(&args).unwrap();
    assert_eq!(used, args.len());
    let c = t.connect(&ConnectOptions::new()).await.unwrap();
    assert_eq!(c.size(), 2 << 20);
    c.pwrite(&[1; 4096], 0, 0).await.unwrap();
    assert_eq!(c.pread_vec(4096, 0, 0).await.unwrap(), vec![1; 4096]);
    drop(c);

    // The server goes when its last connection does.
    let server = Arc::new(CaptiveServer::spawn(["nbdkit", "memory", "1M"]).unwrap());
    let pid = server.pid() as i32;
    let n = server.negotiate(&ConnectOptions::new()).await.unwrap();
    drop(server);
    // SAFETY: signal 0 checks the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0);
    drop(n);
    assert_ne!(
        unsafe { libc::kill(pid, 0) },
        0,
        "nbdkit {pid} was left behind"
    );
}
