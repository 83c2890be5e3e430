//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`, issue 25) end to end:
//! qemu 10's `qemu-io` and `qemu-img` against our server (64-bit zero
//! requests, block status extents over 4G, our log saying extended
//! headers were negotiated), libnbd 1.14's `nbdsh` falling back to
//! structured replies, `--no-eh`; our client library and tools against
//! `qemu-nbd` 10 (a 4 GiB zero and a 4 TiB trim in one request each,
//! counted in qemu-nbd's trace, an extent over 2^32 bytes, data checked
//! with `qemu-img compare`), and nbdcopy zeroing 8G in one request.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A server on a private Unix socket with its stderr in a file, killed
/// on drop.
struct Logged {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    /// Start `prog` with `args`, where `{sock}` stands for the socket.
    fn start(prog: &Path, args: &[&str]) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let log = dir.path().join("log");
        let sock = socket.to_str().unwrap();
        let args: Vec<String> = args.iter().map(|a| a.replace("{sock}", sock)).collect();
        let child = Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", prog.display()));
        let mut s = Logged {
            child,
            socket,
            log,
            _dir: dir,
        };
        let t = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&s.socket).is_ok() {
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{} exited early ({st}): {}", prog.display(), s.log());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Our nbdkit with `-v`.
    fn ours(args: &[&str]) -> Logged {
        let mut a = vec!["-f", "-v", "-U", "{sock}"];
        a.extend_from_slice(args);
        Self::start(&nbdkit(), &a)
    }

    /// qemu-nbd, persistent, tracing the requests it receives
    /// (`Got request: { magic = ..., .flags = ..., .type = 0x6, from = 0,
    /// len = 8589934592 }`).
    fn qemu_nbd(args: &[&str]) -> Logged {
        let mut a = vec!["-t", "-k", "{sock}", "--trace", "nbd_receive_request"];
        a.extend_from_slice(args);
        Self::start(Path::new("qemu-nbd"), &a)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log containing all of `words`.
    fn count(&self, words: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .count()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    // qemu-io reports failed commands on stdout and still exits 0.
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

#[test]
fn eh_qemu_io_zeroes_5g_in_one_request_to_our_server() {
    if !require(&["qemu-io", "qemu-img"]) {
        return;
    }
    let s = Logged::ours(&["memory", "8G"]);
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x55 0 1M",
            "write -P 0x66 6G 1M",
            // -n: no slow fallback, which qemu-io needs past 2G.
            "write -z -n 1M 5G",
            "read -P 0x55 0 1M",
            "read -P 0 1M 1M",
            "read -P 0 5120M 1M",
            "read -P 0x66 6G 1M",
        ],
    );
    assert!(
        s.count(&["extended headers negotiated"]) >= 1,
        "{}",
        s.log()
    );
    assert_eq!(s.count(&["NBD_CMD_WRITE_ZEROES"]), 1, "{}", s.log());
    assert_eq!(
        s.count(&["NBD_CMD_WRITE_ZEROES", "count=5368709120"]),
        1,
        "{}",
        s.log()
    );
    // qemu-img map: the zeroed range is one extent of more than 4G, sent
    // as BLOCK_STATUS_EXT (64-bit lengths).
    let map =
        run_ok(Command::new("qemu-img").args(["map", "-f", "raw", "--output=json", &s.uri()]));
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let big = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["length"].as_u64().unwrap() > 1 << 32)
        .unwrap_or_else(|| panic!("no extent over 4G: {map}"));
    assert_eq!(big["start"], 1 << 20, "{map}");
    assert_eq!(big["zero"], true, "{map}");
    assert!(
        s.count(&["NBD_CMD_BLOCK_STATUS", "count=8589934592"]) >= 1,
        "{}",
        s.log()
    );
}

#[test]
fn eh_qemu_img_convert_and_compare_with_our_server() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    random_file(&img, 8 << 20, 25);
    let s = Logged::ours(&["memory", "8M"]);
    let img = img.to_str().unwrap();
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        img,
        &s.uri(),
    ]));
    let out =
        run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", img, &s.uri()]));
    assert!(out.contains("Images are identical"), "{out}");
    assert!(
        s.count(&["extended headers negotiated"]) >= 2,
        "{}",
        s.log()
    );
}

#[test]
fn eh_nbdsh_1_14_falls_back_to_structured_replies() {
    if !require_nbdsh() {
        return;
    }
    let s = Logged::ours(&["memory", "1M"]);
    let out = nbdpy(
        &s.uri(),
        "print(h.get_structured_replies_negotiated())\n\
         h.pwrite(b'x' * 4096, 8192)\n\
         print(h.pread(4096, 8192) == b'x' * 4096)\n\
         e = []\n\
         h.block_status(1 << 20, 0, lambda m, o, ents, err: e.extend(ents))\n\
         print(sum(e[0::2]))\n",
    );
    assert_eq!(out, "True\nTrue\n1048576\n");
    // libnbd 1.14 does not know the option: structured replies it is.
    assert_eq!(s.count(&["NBD_OPT_EXTENDED_HEADERS"]), 0, "{}", s.log());
    assert_eq!(s.count(&["extended headers negotiated"]), 0, "{}", s.log());
    assert_eq!(s.count(&["NBD_OPT_STRUCTURED_REPLY"]), 1, "{}", s.log());
}

#[test]
fn eh_no_eh_turns_them_off() {
    let on = Logged::ours(&["memory", "1M"]);
    let off = Logged::ours(&["--no-eh", "memory", "1M"]);
    let info = |uri: &str, args: &[&str]| {
        let mut c = Command::new(our_bin("nbdinfo"));
        c.args(args).arg(uri);
        run(&mut c)
    };
    let text = |o: std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let t = text(info(&on.uri(), &[]));
    assert!(
        t.starts_with("protocol: newstyle-fixed without TLS, using extended packets\n"),
        "{t}"
    );
    let t = text(info(&off.uri(), &[]));
    assert!(
        t.starts_with("protocol: newstyle-fixed without TLS, using structured packets\n"),
        "{t}"
    );
    for (s, want) in [(&on, true), (&off, false)] {
        let j: serde_json::Value =
            serde_json::from_str(&text(info(&s.uri(), &["--json"]))).unwrap();
        assert_eq!(j["extended"], want);
        assert_eq!(j["structured"], true);
        let code = info(&s.uri(), &["--can", "extended-headers"]).status.code();
        assert_eq!(code, Some(if want { 0 } else { 2 }));
    }
    assert_eq!(off.count(&["extended headers negotiated"]), 0);
    assert!(off.count(&["NBD_OPT_EXTENDED_HEADERS"]) >= 1);
    if require(&["qemu-io"]) {
        // qemu falls back to structured replies (its writes still work).
        qemu_io(&off.uri(), &["write -P 7 0 64k", "read -P 7 0 64k"]);
        assert_eq!(off.count(&["extended headers negotiated"]), 0);
    }
}

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Write `len` bytes of `byte` at `offset` of a file.
fn fill(path: &Path, offset: u64, len: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len as usize], offset).unwrap();
}

fn sparse(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

#[test]
fn eh_our_client_zeroes_4g_and_trims_4t_in_one_request_each_on_qemu_nbd() {
    if !require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let want = dir.path().join("want.img");
    let size = 5 * TIB;
    sparse(&disk, size);
    sparse(&want, size);
    let q = Logged::qemu_nbd(&["-f", "raw", "--discard=unmap", disk.to_str().unwrap()]);
    let uri = q.uri();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use libnbd::client::{ConnectOptions, Connection};
        let c = Connection::connect_uri(&uri, &ConnectOptions::new())
            .await
            .unwrap();
        assert!(c.extended_headers(), "qemu-nbd 10 has extended headers");
        // Data around a 4 GiB zero and in a 4 TiB trim.
        c.pwrite(&vec![0xaa; 8 << 20], 0, 0).await.unwrap();
        c.pwrite(&vec![0xbb; 8 << 20], 4 * GIB + 8 * MIB, 0)
            .await
            .unwrap();
        c.pwrite(&vec![0xcc; 1 << 20], TIB, 0).await.unwrap();
        c.pwrite(&vec![0xdd; 1 << 20], 4 * TIB + 16 * GIB, 0)
            .await
            .unwrap();
        let before = c.stats().requests;
        c.zero(4 * GIB, 4 * MIB, 0).await.unwrap();
        assert_eq!(c.stats().requests, before + 1, "the zero was split");
        c.trim(4 * TIB, 8 * GIB, 0).await.unwrap();
        assert_eq!(c.stats().requests, before + 2, "the trim was split");
        // One block status over the whole disk: the 5T has extents of
        // more than 2^32 bytes, in one BLOCK_STATUS_EXT reply.
        let bs = c.block_status(size, 0, 0).await.unwrap();
        let ext = bs.get("base:allocation").unwrap();
        assert!(
            ext.iter().any(|e| e.length > 1 << 32),
            "no extent over 4G: {ext:?}"
        );
        let total: u64 = ext.iter().map(|e| e.length).sum();
        assert!(total > 4 * TIB, "{ext:?}");
        c.disconnect().await.unwrap();
    });
    let trace = q.log();
    let zeroes = q.count(&[".type = 0x6,"]);
    let trims = q.count(&[".type = 0x4,"]);
    assert_eq!((zeroes, trims), (1, 1), "{trace}");
    assert_eq!(
        q.count(&[".type = 0x6,", "len = 4294967296 }"]),
        1,
        "{trace}"
    );
    assert_eq!(
        q.count(&[".type = 0x4,", "len = 4398046511104 }"]),
        1,
        "{trace}"
    );
    assert!(
        q.count(&["magic = 0x21e41c71"]) > 0,
        "not extended: {trace}"
    );
    // The same data written into a plain file: identical (the trimmed
    // 1T was punched out by --discard=unmap and reads as zeroes).
    fill(&want, 0, 4 * MIB, 0xaa);
    fill(&want, 4 * GIB + 8 * MIB, 8 * MIB, 0xbb);
    fill(&want, 4 * TIB + 16 * GIB, MIB, 0xdd);
    let out = run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        want.to_str().unwrap(),
        &uri,
    ]));
    assert!(out.contains("Images are identical"), "{out}");
    // nbdinfo: extended packets, and a map line longer than 2^32.
    let info = run_ok(Command::new(our_bin("nbdinfo")).arg(&uri));
    assert!(info.contains("using extended packets"), "{info}");
    let map = run_ok(Command::new(our_bin("nbdinfo")).args(["--map", &uri]));
    let long = map.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 1 << 32)
    });
    assert!(long, "{map}");
    drop(q);
    let _ = std::fs::remove_file(&disk);
}

#[test]
fn eh_nbdcopy_zeroes_8g_in_one_request_on_qemu_nbd() {
    if !require(&["qemu-nbd"]) {
        return;
    }
    // The source reads as zeroes; the destination (qemu's null driver,
    // which says nothing of its contents reads as zeroes) is zeroed: in
    // one request with extended headers.
    let src = Logged::ours(&["memory", "8G"]);
    let dst = Logged::qemu_nbd(&["--image-opts", "driver=null-co,size=8G"]);
    run_ok(Command::new(our_bin("nbdcopy")).args([&src.uri(), &dst.uri()]));
    let trace = dst.log();
    // A fast zero first (which qemu's null driver refuses), then the
    // plain one: each of the whole 8G.
    let zeroes = dst.count(&[".type = 0x6,"]);
    assert!((1..=2).contains(&zeroes), "{trace}");
    assert_eq!(
        dst.count(&[".type = 0x6,", "len = 8589934592 }"]),
        zeroes,
        "{trace}"
    );
    assert_eq!(dst.count(&[".type = 0x1,"]), 0, "{trace}");
}
