//! Our `nbdinfo` against libnbd's on the same servers (upstream nbdkit,
//! qemu-nbd, our nbdkit): the same text, the same `--json` (compared
//! parsed and byte for byte), the same `--map`, `--list`, `--size`, the
//! same exit status for every `--can`/`--is`; captive `[ cmd ]` servers
//! that leave nothing behind; every URI form; one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn ours() -> PathBuf {
    our_bin("nbdinfo")
}

/// Run upstream's and our nbdinfo with the same arguments.
fn both(args: &[&str]) -> (Output, Output) {
    let theirs = run(Command::new("nbdinfo").args(args).stdin(Stdio::null()));
    let mut mine = run(Command::new(ours()).args(args).stdin(Stdio::null()));
    mine.stdout = as_1_14(&mine.stdout);
    (theirs, mine)
}

/// Our report as libnbd 1.14 words it: ours negotiates extended headers
/// where the server has them and says so as libnbd 1.18 does (`using
/// extended packets`, `"extended": true` in JSON, checked in
/// extended_headers.rs); 1.14 has neither.
fn as_1_14(out: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(out);
    let mut t = String::with_capacity(s.len());
    for l in s.split_inclusive('\n') {
        if l == "\"extended\": true,\n" || l == "\"extended\": false,\n" {
            continue;
        }
        t.push_str(&l.replace(", using extended packets", ", using structured packets"));
    }
    t.into_bytes()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Same exit status and same stdout; JSON output also compared parsed,
/// for a readable difference.
fn assert_same(args: &[&str]) {
    let (theirs, mine) = both(args);
    assert_eq!(
        theirs.status.code(),
        mine.status.code(),
        "exit status of nbdinfo {args:?}\nupstream stderr: {}\nour stderr: {}",
        text(&theirs.stderr),
        text(&mine.stderr)
    );
    if args.contains(&"--json") && theirs.status.success() && !theirs.stdout.is_empty() {
        let a: serde_json::Value = serde_json::from_slice(&theirs.stdout)
            .unwrap_or_else(|e| panic!("upstream nbdinfo {args:?} is not JSON: {e}"));
        let b: serde_json::Value = serde_json::from_slice(&mine.stdout).unwrap_or_else(|e| {
            panic!(
                "our nbdinfo {args:?} is not JSON: {e}\n{}",
                text(&mine.stdout)
            )
        });
        assert_eq!(a, b, "parsed JSON of nbdinfo {args:?}");
    }
    assert_eq!(
        text(&theirs.stdout),
        text(&mine.stdout),
        "output of nbdinfo {args:?}"
    );
}

const FLAGS: &[&str] = &[
    "connect",
    "read",
    "write",
    "trim",
    "zero",
    "fast-zero",
    "df",
    "fua",
    "flush",
    "multi-conn",
    "cache",
    "structured-reply",
];
const IS: &[&str] = &["read-only", "rotational", "tls"];

/// Every mode of nbdinfo on `uri`: the report (text and JSON, with and
/// without content), size, map and totals of `contexts`, list, and
/// every flag test.
fn compare_all(uri: &str, contexts: &[&str]) {
    for extra in [
        &[][..],
        &["--json"],
        &["--no-content"],
        &["--json", "--no-content"],
        &["--size"],
        &["--size", "--json"],
        &["--list"],
        &["--list", "--json"],
        &["--list", "--json", "--content"],
    ] {
        let mut args = extra.to_vec();
        args.push(uri);
        assert_same(&args);
    }
    for ctx in contexts {
        let map = format!("--map={ctx}");
        for extra in [&[][..], &["--json"], &["--totals"], &["--totals", "--json"]] {
            let mut args = vec![map.as_str()];
            args.extend_from_slice(extra);
            args.push(uri);
            assert_same(&args);
        }
    }
    compare_flags(uri);
}

fn compare_flags(uri: &str) {
    for f in FLAGS {
        assert_same(&["--can", f, uri]);
    }
    for f in IS {
        assert_same(&["--is", f, uri]);
    }
}

fn require_tools() -> bool {
    require(&["nbdkit", "nbdinfo", "file"])
}

#[test]
fn nbdinfo_upstream_nbdkit_plugins() {
    if !require_tools() {
        return;
    }
    for args in [
        &["memory", "1G"][..],
        &["-r", "memory", "1M"],
        &["data", "1 2 3 @4096 0x55*100 @1048576 4 5 6", "size=2M"],
        &["sparse-random", "64M", "seed=42"],
        &["pattern", "10M"],
        &["null", "0"],
        &["null", "1"],
    ] {
        let s = Server::upstream(args);
        compare_all(&s.uri(), &["base:allocation"]);
    }
}

#[test]
fn nbdinfo_upstream_nbdkit_filters() {
    if !require_tools() {
        return;
    }
    for args in [
        &[
            "--filter=blocksize-policy",
            "memory",
            "1M",
            "blocksize-minimum=512",
            "blocksize-preferred=65536",
            "blocksize-maximum=1048576",
        ][..],
        &["--filter=noextents", "pattern", "3M"],
        &[
            "--filter=offset",
            "--filter=truncate",
            "pattern",
            "3M",
            "offset=4096",
            "round-up=65536",
        ],
        &[
            "--filter=exportname",
            "memory",
            "1M",
            "exportdesc=fixed:a \"quoted\"\tdescription",
        ],
        &["-r", "--filter=cow", "data", "0x11*1024", "size=64K"],
        &["--no-sr", "memory", "1M"],
        &["-o", "memory", "1M"],
        &["-e", "foo", "memory", "1M"],
    ] {
        let s = Server::upstream(args);
        compare_all(&s.uri(), &["base:allocation"]);
    }
}

/// A directory of files served as several exports, with names that
/// need escaping in URIs and JSON.
fn export_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [
        ("disk.img", 1u64 << 20),
        ("with space", 2 << 20),
        ("per%cent", 4096),
        ("caf\u{e9}", 6),
    ] {
        let f = std::fs::File::create(dir.path().join(name)).unwrap();
        f.set_len(size).unwrap();
    }
    std::fs::write(dir.path().join("text.txt"), "hello world\n").unwrap();
    dir
}

fn socket_uri(export_escaped: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export_escaped}?socket={}", socket.display())
}

#[test]
fn nbdinfo_upstream_nbdkit_several_exports() {
    if !require_tools() {
        return;
    }
    let dir = export_dir();
    let s = Server::upstream(&["file", &format!("dir={}", dir.path().display())]);
    for extra in [
        &["--list"][..],
        &["--list", "--json"],
        &["--list", "--content"],
        &["--list", "--content", "--json"],
        // The default export does not exist: the same error.
        &["--json"],
        &[],
        &["--size"],
    ] {
        let mut args = extra.to_vec();
        let uri = s.uri();
        args.push(&uri);
        assert_same(&args);
    }
    for export in [
        "disk.img",
        "with%20space",
        "per%25cent",
        "caf%C3%A9",
        "text.txt",
    ] {
        compare_all(&socket_uri(export, &s.socket), &["base:allocation"]);
    }
    // Several exports with descriptions.
    let s = Server::upstream(&[
        "--filter=exportname",
        "memory",
        "1M",
        "exportname-list=explicit",
        "exportname=a",
        "exportname=b c",
        "exportdesc=fixed:shared description",
    ]);
    assert_same(&["--list", &s.uri()]);
    assert_same(&["--list", "--json", &s.uri()]);
    assert_same(&["--list", "--json", "--content", &s.uri()]);
    // No exports at all.
    let s = Server::upstream(&[
        "--filter=exportname",
        "memory",
        "1M",
        "exportname-list=explicit",
    ]);
    assert_same(&["--list", &s.uri()]);
    assert_same(&["--list", "--json", &s.uri()]);
}

/// qemu-nbd on a private socket, killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    fn start(args: &[&str]) -> QemuNbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let child = Command::new("qemu-nbd")
            .arg("--socket")
            .arg(&socket)
            .arg("--persistent")
            .arg("--shared=8")
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd {
            child,
            socket,
            _dir: dir,
        }
    }
    fn uri(&self, export: &str) -> String {
        socket_uri(export, &self.socket)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image with data, a zeroed area, and a dirty bitmap `bm0`
/// that records a write made after it was added.
fn qcow2_with_bitmap(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    let p = img.to_str().unwrap();
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, "64M"]));
    run_ok(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0 0 1M",
        "-c",
        "write -z 4M 1M",
        p,
    ]));
    run_ok(Command::new("qemu-img").args(["bitmap", "--add", p, "bm0"]));
    run_ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0 8M 512k", p]));
    img
}

#[test]
fn nbdinfo_qemu_nbd_raw_and_qcow2() {
    if !require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo", "file"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    random_file(&raw, 3 << 20, 1);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let q = QemuNbd::start(&["-f", "raw", raw.to_str().unwrap()]);
    compare_all(&q.uri(""), &["base:allocation", "qemu:allocation-depth"]);
    drop(q);

    let img = qcow2_with_bitmap(dir.path());
    let q = QemuNbd::start(&[
        "-f",
        "qcow2",
        "-r",
        "-A",
        "-x",
        "my disk",
        "-D",
        "a qcow2 image",
        img.to_str().unwrap(),
    ]);
    compare_all(
        &q.uri("my%20disk"),
        &["base:allocation", "qemu:allocation-depth"],
    );
    // The default export does not exist there.
    assert_same(&["--json", &q.uri("")]);
}

#[test]
fn nbdinfo_qemu_nbd_dirty_bitmap_and_backing_chain() {
    if !require(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo", "file"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2_with_bitmap(dir.path());
    let q = QemuNbd::start(&["-f", "qcow2", "-B", "bm0", img.to_str().unwrap()]);
    compare_all(&q.uri(""), &["base:allocation", "qemu:dirty-bitmap:bm0"]);
    // Asking for a context the server does not have fails the same way.
    assert_same(&["--map=qemu:dirty-bitmap:nosuch", &q.uri("")]);
    drop(q);

    // A backing chain: allocation depths 1, 2 and 3.
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, m, t) = (
        base.to_str().unwrap(),
        mid.to_str().unwrap(),
        top.to_str().unwrap(),
    );
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", b, "4M"]));
    run_ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0 0 1M", b]));
    run_ok(
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", m]),
    );
    run_ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0 1M 1M", m]));
    run_ok(
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", m, "-F", "qcow2", t]),
    );
    run_ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0 2M 512k", t]));
    let q = QemuNbd::start(&["-f", "qcow2", "-r", "-A", t]);
    compare_all(&q.uri(""), &["qemu:allocation-depth"]);
}

/// Make a disk image with a command (`mkfs.ext4 -F -q IMG`, ...).
fn image(dir: &Path, name: &str, size: u64, cmd: &[&str]) -> PathBuf {
    let img = dir.join(name);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    if !cmd.is_empty() {
        let mut c = Command::new(cmd[0]);
        for a in &cmd[1..] {
            if *a == "IMG" {
                c.arg(&img);
            } else {
                c.arg(a);
            }
        }
        run_ok(&mut c);
    }
    img
}

fn sfdisk(img: &Path, script: &str) {
    use std::io::Write;
    let mut c = Command::new("sfdisk")
        .arg("-q")
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk failed");
}

#[test]
fn nbdinfo_content_detection() {
    if !require(&[
        "nbdkit",
        "nbdinfo",
        "file",
        "qemu-img",
        "sfdisk",
        "mkfs.ext2",
        "mkfs.ext3",
        "mkfs.ext4",
        "mkfs.xfs",
        "mkswap",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut images = vec![
        image(d, "empty.img", 0, &[]),
        image(d, "zero.img", 1 << 20, &[]),
        image(d, "ext2.img", 64 << 20, &["mkfs.ext2", "-q", "-F", "IMG"]),
        image(d, "ext3.img", 64 << 20, &["mkfs.ext3", "-q", "-F", "IMG"]),
        image(
            d,
            "ext4.img",
            64 << 20,
            &["mkfs.ext4", "-q", "-F", "-L", "myvol", "IMG"],
        ),
        image(d, "xfs.img", 300 << 20, &["mkfs.xfs", "-q", "-f", "IMG"]),
        image(
            d,
            "swap.img",
            16 << 20,
            &["mkswap", "-q", "-L", "sw", "IMG"],
        ),
    ];
    let mbr = image(d, "mbr.img", 64 << 20, &[]);
    sfdisk(&mbr, "label: dos\n2048,20480,83\n,10240,c\n,,5\n");
    let mbr1 = image(d, "mbr1.img", 64 << 20, &[]);
    sfdisk(&mbr1, "label: dos\n,,83,*\n");
    let ext = image(d, "ext.img", 64 << 20, &[]);
    sfdisk(&ext, "label: dos\n2048,4096,83\n,,f\n");
    let gpt = image(d, "gpt.img", 64 << 20, &[]);
    sfdisk(&gpt, "label: gpt\n,10M\n,\n");
    images.extend([mbr, mbr1, ext, gpt]);
    for (name, extra) in [("v3.qcow2", &[][..]), ("v2.qcow2", &["-o", "compat=0.10"])] {
        let p = d.join(name);
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2"])
            .args(extra)
            .arg(&p)
            .arg("1G");
        run_ok(&mut c);
        images.push(p);
    }
    let backed = d.join("backed.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(d.join("v3.qcow2"))
            .arg(&backed),
    );
    images.push(backed);
    if require(&["genisoimage"]) {
        let src = d.join("isodir");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "hi\n").unwrap();
        let iso = d.join("cd.iso");
        run_ok(
            Command::new("genisoimage")
                .args(["-quiet", "-V", "MYCD", "-o"])
                .arg(&iso)
                .arg(&src),
        );
        images.push(iso);
    }
    for (name, body) in [
        ("ascii.txt", &b"hello world\n"[..]),
        ("noeol.txt", b"hello"),
        ("crlf.txt", b"a\r\nb\r\n"),
        ("utf8.txt", "h\u{e9}llo\n".as_bytes()),
        ("latin1.txt", b"\xe9t\xe9\n"),
    ] {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        images.push(p);
    }
    let compare = |s: &Server, what: &str| {
        let (theirs, mine) = both(&["--json", &s.uri()]);
        let a: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&mine.stdout).unwrap();
        assert_eq!(
            a["exports"][0]["content"], b["exports"][0]["content"],
            "content of {what}"
        );
        assert_eq!(a, b, "nbdinfo --json of {what}");
    };
    // The first 8K of bigger exports: text followed by zeros, a boot
    // signature alone, patterns.
    for args in [
        &["data", "raw=hello\n", "size=1M"][..],
        &["data", "raw=hello!\n", "size=1M"],
        &["data", "raw=a\r\nb\r\n", "size=64K"],
        &["data", "@510 0x55 0xAA", "size=1M"],
        &["pattern", "1M"],
        &["sparse-random", "1M", "seed=1"],
    ] {
        compare(&Server::upstream(args), &format!("{args:?}"));
    }
    for img in &images {
        let s = Server::upstream(&["-r", "file", img.to_str().unwrap()]);
        compare(&s, &img.display().to_string());
    }
}

/// Is the process alive (and not a zombie)?
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn read_pidfile(p: &Path) -> i32 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("pidfile {}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Processes whose command line mentions `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn nbdinfo_captive_servers_leave_nothing_behind() {
    if !require(&["nbdkit", "nbdinfo", "qemu-nbd", "qemu-img", "file"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("nbdkit.pid");
    let pf = pidfile.to_str().unwrap();
    for mode in [
        &[][..],
        &["--json"],
        &["--size"],
        &["--map"],
        &["--list"],
        &["--can", "trim"],
    ] {
        let mut args: Vec<&str> = mode.to_vec();
        args.extend(["--", "[", "nbdkit", "-P", pf, "memory", "1G", "]"]);
        assert_same(&args);
        // Our run was the last: its server must be gone.
        let pid = read_pidfile(&pidfile);
        assert!(!alive(pid), "nbdkit {pid} left behind by nbdinfo {args:?}");
    }
    // Our own nbdkit as the captive server.
    let nbdkit = crate::common::nbdkit();
    let out = run_ok(
        Command::new(ours())
            .args(["--json", "--", "["])
            .arg(&nbdkit)
            .args(["-P", pf, "memory", "1M", "]"]),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 1048576);
    assert!(!alive(read_pidfile(&pidfile)));

    let img = dir.path().join("captive-marker.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64M"),
    );
    let i = img.to_str().unwrap();
    for mode in [&[][..], &["--json"], &["--map"], &["--size"]] {
        let mut args: Vec<&str> = mode.to_vec();
        args.extend(["--", "[", "qemu-nbd", "-f", "qcow2", i, "]"]);
        assert_same(&args);
        let left = processes_with("captive-marker.qcow2");
        assert!(left.is_empty(), "qemu-nbd left behind: {left:?}");
    }
    // Without "--" too: the bracketed command is not parsed as options.
    let out =
        run_ok(Command::new(ours()).args(["--size", "[", "qemu-nbd", "-r", "-f", "qcow2", i, "]"]));
    assert_eq!(out.trim(), "67108864");
    assert!(processes_with("captive-marker.qcow2").is_empty());
}

/// Is the IPv6 loopback usable here?
fn have_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

fn free_port(addr: &str) -> u16 {
    std::net::TcpListener::bind((addr, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Upstream nbdkit on TCP.
struct TcpServer(Child);

impl TcpServer {
    fn start(addr: &str, port: u16, args: &[&str]) -> TcpServer {
        let child = Command::new("nbdkit")
            .args(["-f", "-i", addr, "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect((addr, port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nbdkit did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TcpServer(child)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbdinfo_every_uri_form_connects() {
    if !require_tools() {
        return;
    }
    let dir = export_dir();
    let dirarg = format!("dir={}", dir.path().display());
    let mut uris: Vec<String> = Vec::new();
    let port = free_port("127.0.0.1");
    let _tcp = TcpServer::start("127.0.0.1", port, &["file", &dirarg]);
    for export in ["disk.img", "with%20space", "per%25cent", "caf%C3%A9"] {
        uris.push(format!("nbd://127.0.0.1:{port}/{export}"));
    }
    uris.push(format!("nbd://localhost:{port}/with%20space"));
    uris.push(format!("nbd://127.0.0.1:{port}"));
    let _tcp6 = if have_ipv6() {
        let port6 = free_port("::1");
        let s = TcpServer::start("::1", port6, &["file", &dirarg]);
        uris.push(format!("nbd://[::1]:{port6}/with%20space"));
        uris.push(format!("nbd://[::1]:{port6}/per%25cent"));
        Some(s)
    } else {
        None
    };
    let unix = Server::upstream(&["file", &dirarg]);
    uris.push(socket_uri("with%20space", &unix.socket));
    uris.push(socket_uri("caf%C3%A9", &unix.socket));
    uris.push(socket_uri("per%25cent", &unix.socket));
    for uri in &uris {
        assert_same(&["--json", uri]);
        assert_same(&["--size", uri]);
        assert_same(&[uri]);
    }
    // The default port, when it is free.
    if std::net::TcpListener::bind("127.0.0.1:10809").is_ok() {
        let _p = TcpServer::start("127.0.0.1", 10809, &["memory", "1M"]);
        assert_same(&["--json", "nbd://127.0.0.1"]);
        assert_same(&["--json", "nbd://127.0.0.1/"]);
    }
}

/// One line on stderr starting with "nbdinfo: ", exit status 1.
fn assert_fails_cleanly(tool: &Path, args: &[&str]) {
    let out = run(Command::new(tool).args(args).stdin(Stdio::null()));
    let err = text(&out.stderr);
    let name = tool.file_name().unwrap().to_string_lossy();
    assert_eq!(out.status.code(), Some(1), "{name} {args:?}: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{name} {args:?}: one line expected: {err}"
    );
    assert!(
        err.starts_with(&format!("{name}: ")),
        "{name} {args:?}: {err}"
    );
    assert!(out.stdout.is_empty(), "{name} {args:?}: no output expected");
}

#[test]
fn nbdinfo_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let nosock = dir.path().join("nosuchsocket");
    let closed = free_port("127.0.0.1");
    let nosock_uri = format!("nbd+unix:///?socket={}", nosock.display());
    let refused = format!("nbd://127.0.0.1:{closed}/");
    let bad = [
        "nbd://[::1",
        "nbd://localhost:99999/",
        "nbd://host:port/",
        "foo://bar",
        "/tmp/file",
        "nbd+unix:///",
        "nbd+unix:///x?socket=/s&bogus=1",
        "nbd://h/%zz",
        "nbd+vsock://notacid/",
        nosock_uri.as_str(),
        refused.as_str(),
    ];
    for tool in [ours(), our_bin("nbddump")] {
        for uri in bad {
            assert_fails_cleanly(&tool, &[uri]);
        }
        // Usage errors (no NBD, two, an unknown option, an unmatched
        // `[`) print the usage after the message, as libnbd's tools:
        // tools_options::tools_usage_errors_as_upstream.
        assert_fails_cleanly(&tool, &["--", "[", "/nonexistent/server", "]"]);
        assert_fails_cleanly(&tool, &["--", "[", "false", "]"]);
    }
    let me = ours();
    for mode in [
        &["--size"][..],
        &["--map"],
        &["--list"],
        &["--can", "connect"],
        &["--json"],
    ] {
        let mut args = mode.to_vec();
        args.push(&refused);
        assert_fails_cleanly(&me, &args);
    }
    assert_fails_cleanly(&me, &["--can", "frobnicate", &refused]);
    assert_fails_cleanly(&me, &["--size", "--map", &refused]);
    assert_fails_cleanly(&me, &["--totals", &refused]);
    // Our messages say what is wrong.
    let out = run(Command::new(&me).arg("nbd://localhost:99999/"));
    assert!(text(&out.stderr).contains("port"), "{}", text(&out.stderr));
    let out = run(Command::new(&me).arg(&refused));
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn nbdinfo_version_and_help() {
    let out = run_ok(Command::new(ours()).arg("--version"));
    assert!(out.starts_with("nbdinfo 1.14"), "{out}");
    let out = run_ok(Command::new(ours()).arg("-V"));
    assert!(out.contains("libnbd"), "{out}");
    let out = run_ok(Command::new(ours()).arg("--help"));
    for opt in [
        "--json",
        "--size",
        "--map",
        "--list",
        "--can",
        "--is",
        "--totals",
        "--content",
    ] {
        assert!(out.contains(opt), "--help lacks {opt}");
    }
}

#[test]
fn nbdinfo_against_our_nbdkit() {
    if !require(&["nbdinfo", "file"]) {
        return;
    }
    let dir = export_dir();
    for args in [
        &["memory", "1G"][..],
        &["-r", "pattern", "10M"],
        &["data", "1 2 3 @4096 0x55*100 @1048576 4 5 6", "size=2M"],
        &["--filter=noextents", "memory", "1M"],
        &["-e", "foo", "memory", "1M"],
        &["null", "0"],
    ] {
        let s = Server::ours(args);
        compare_all(&s.uri(), &["base:allocation"]);
    }
    let s = Server::ours(&["file", &format!("dir={}", dir.path().display())]);
    assert_same(&["--list", &s.uri()]);
    assert_same(&["--list", "--json", "--content", &s.uri()]);
    compare_all(&socket_uri("with%20space", &s.socket), &["base:allocation"]);
}

#[test]
fn nbdinfo_colours() {
    if !require_tools() {
        return;
    }
    let s = Server::upstream(&[
        "-r",
        "--filter=blocksize-policy",
        "memory",
        "1M",
        "blocksize-minimum=512",
    ]);
    assert_same(&["--color", &s.uri()]);
    assert_same(&["--colour", "--list", &s.uri()]);
    assert_same(&["--color", "--no-color", &s.uri()]);
    assert_same(&["--color", "--json", &s.uri()]);
    assert_same(&["--color", "--map", "--totals", &s.uri()]);
}
