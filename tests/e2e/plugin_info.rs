//! The info plugin end to end under libnbd's nbdsh and nbdinfo, side by
//! side with upstream nbdkit: each mode's disk and capabilities, a bad
//! base64 export name refused, the client's TCP address, and the cow and
//! offset filters on top.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;

/// Size, bytes and capabilities of the export.
const SURVEY: &str = r#"
size = h.get_size()
print("size", size, bytes(h.pread(size, 0)) if size else b"")
print("ro", h.is_read_only(), "zero", h.can_zero(), "trim", h.can_trim(),
      "flush", h.can_flush(), "fua", h.can_fua(), "multi_conn", h.can_multi_conn(),
      "cache", h.can_cache())
extents = []
if size:
    h.block_status(size, 0, lambda m, o, e, err: extents.extend(e))
print("extents", extents)
"#;

/// Run `script` against the export `export` of ours and of upstream,
/// both started with `args`; both must print the same, returned.
fn both(args: &[&str], export: &str, script: &str) -> String {
    let ours = nbdpy(&Server::ours(args).uri_export(export), script);
    let theirs = nbdpy(&Server::upstream(args).uri_export(export), script);
    assert_eq!(
        ours, theirs,
        "ours (left) and upstream (right) differ for {args:?} {export:?}"
    );
    ours
}

fn peers() -> bool {
    require(&["nbdkit", "nbdinfo"]) && require_nbdsh()
}

#[test]
fn plugin_info_export_names() {
    if !peers() {
        return;
    }
    let out = both(&["info"], "hello", SURVEY);
    assert!(out.starts_with("size 5 b'hello'\n"), "{out}");
    assert!(
        out.contains("ro True") && out.contains("multi_conn True"),
        "{out}"
    );
    let out = both(&["info", "mode=exportname"], "", SURVEY);
    assert!(out.starts_with("size 0 b''\n"), "{out}");
    let out = both(&["info", "base64exportname"], "aGVsbG8gd29ybGQ=", SURVEY);
    assert!(out.starts_with("size 11 b'hello world'\n"), "{out}");
    // Binary data through base64 ("AAEC/w==" has a '/', kept in the name).
    let out = both(&["info", "mode=base64exportname"], "AAEC/w==", SURVEY);
    assert!(out.starts_with("size 4 b'\\x00\\x01\\x02\\xff'\n"), "{out}");
    // Not base64: the open fails under both.
    for bad in ["aGVsbG8", "QR=="] {
        for s in [
            Server::ours(&["info", "base64exportname"]),
            Server::upstream(&["info", "base64exportname"]),
        ] {
            let st = run(Command::new("nbdinfo").arg(s.uri_export(bad)));
            assert!(!st.status.success(), "{bad:?} opened");
        }
    }
    // --dump-plugin says both optional modes are there, as upstream's.
    let dump = run_ok(Command::new(nbdkit()).args(["info", "--dump-plugin"]));
    assert!(
        dump.contains("\ninfo_address=yes\n") && dump.contains("\ninfo_base64=yes"),
        "{dump}"
    );
    // An unknown mode is refused.
    let st = run(Command::new(nbdkit()).args(["-U", "-", "info", "mode=nope", "--run", "true"]));
    assert!(!st.status.success());
}

#[test]
fn plugin_info_address() {
    if !peers() {
        return;
    }
    // Over a Unix socket the disk is "unix".
    let out = both(&["info", "address"], "", SURVEY);
    assert!(out.starts_with("size 4 b'unix'\n"), "{out}");
    assert!(out.contains("multi_conn False"), "{out}");
    // Over TCP it is the client's address and port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child: Child = Command::new(nbdkit())
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "info",
            "address",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run(Command::new(PYTHON).args([
        "-c",
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         print(h.pread(h.get_size(), 0).decode())",
        &format!("nbd://127.0.0.1:{port}/"),
    ]));
    let _ = child.kill();
    let _ = child.wait();
    let addr = String::from_utf8_lossy(&out.stdout);
    let client: std::net::SocketAddr = addr
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an address: {addr:?}"));
    assert_eq!(client.ip().to_string(), "127.0.0.1");
    assert_ne!(client.port(), port);
}

#[test]
fn plugin_info_times() {
    if !peers() {
        return;
    }
    let script = r#"
import struct, time
a = h.pread(12, 0)
time.sleep(0.2)
b = h.pread(12, 0)
tail = h.pread(4, 8)
for x in (a, b):
    s, us = struct.unpack(">QI", x)
    print(s, us)
print(h.get_size(), h.can_multi_conn(), len(tail))
"#;
    let read = |mode: &str| -> Vec<f64> {
        let out = nbdpy(&Server::ours(&["info", mode]).uri(), script);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[2], "12 False 4", "{mode}: {out}");
        lines[..2]
            .iter()
            .map(|l| {
                let (s, us) = l.split_once(' ').unwrap();
                let us: f64 = us.parse().unwrap();
                assert!(us < 1e6, "{mode}: {l}");
                s.parse::<f64>().unwrap() + us / 1e6
            })
            .collect()
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t = read("time");
    assert!((t[0] - now).abs() < 30.0, "time {t:?}, now {now}");
    for (mode, max) in [("time", f64::MAX), ("uptime", 30.0), ("conntime", 30.0)] {
        let t = if mode == "time" {
            t.clone()
        } else {
            read(mode)
        };
        assert!(t[0] < max, "{mode} {t:?}");
        assert!(t[1] - t[0] >= 0.19 && t[1] - t[0] < 10.0, "{mode} {t:?}");
    }
    // The same shape and capabilities as upstream's.
    for mode in ["time", "uptime", "conntime"] {
        let caps = "print(h.get_size(), h.is_read_only(), h.can_multi_conn(), h.can_cache())";
        let out = same_as_upstream(&["info", mode], caps).unwrap();
        assert_eq!(out, "12 True False True\n");
    }
}

#[test]
fn plugin_info_under_filters() {
    if !peers() {
        return;
    }
    // cow makes the reflection writable, as the manual suggests.
    let script = "h.pwrite(b'J', 0)\nprint(h.is_read_only(), bytes(h.pread(h.get_size(), 0)))";
    let out = both(&["--filter=cow", "info"], "hello", script);
    assert_eq!(out, "False b'Jello'\n");
    // Without it a write is refused.
    let script = "try:\n    h.pwrite(b'J', 0)\nexcept nbd.Error as e:\n    print('refused')";
    assert_eq!(both(&["info"], "hello", script), "refused\n");
    // offset picks a window of the export name.
    let args = ["--filter=offset", "info", "offset=6", "range=5"];
    let out = both(
        &args,
        "hello%20world",
        "print(bytes(h.pread(h.get_size(), 0)))",
    );
    assert_eq!(out, "b'world'\n");
}
