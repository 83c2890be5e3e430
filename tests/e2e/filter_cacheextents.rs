//! The cacheextents filter end to end: a client walking the image one
//! extent at a time (qemu-img map, and a scripted walk) asks the layers
//! below only when it leaves the remembered answer or after a write; a
//! log filter below shows the same requests as under upstream's filter.

use std::path::Path;
use std::time::Duration;

use crate::common::{nbdpy, require, require_nbdsh, run_ok, Server};
use crate::filter_log::log_lines;

const WALK: &str = r#"
def bs(n, o, f=0):
    r = []
    h.block_status(n, o, lambda m, off, e, err: r.append(e), f)
    print("bs", hex(o), hex(n), f, r)
bs(0x100000, 0)
bs(0x1000, 0x2000, nbd.CMD_FLAG_REQ_ONE)
bs(0x1000, 0x30000, nbd.CMD_FLAG_REQ_ONE)
h.pwrite(b"x" * 512, 0x80000)
bs(0x1000, 0x4000, nbd.CMD_FLAG_REQ_ONE)
bs(0x1000, 0x90000, nbd.CMD_FLAG_REQ_ONE)
h.shutdown()
"#;

/// The requests (not replies) that reached the plugin, run `script` on
/// `prog`'s server.
fn below(prog: &Path, script: &str) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let s = Server::start_with(
        prog,
        &["--filter=cacheextents", "--filter=log", "memory", "1M", &l],
    );
    let out = nbdpy(
        &s.uri(),
        &format!("h.pwrite(b'1' * 65536, 0x10000)\n{script}"),
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let lines = log_lines(&log)
        .into_iter()
        .filter(|l| l.contains(" Extents id=") || l.contains(" Write id="))
        .collect();
    (out, lines)
}

#[test]
fn cacheextents_asks_below_as_upstream() {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return;
    }
    let (out, ours) = below(&crate::common::nbdkit(), WALK);
    let (theirs_out, theirs) = below(Path::new("nbdkit"), WALK);
    assert_eq!(out, theirs_out);
    assert_eq!(ours, theirs);
    // One request for the first walk, none inside it, one after the
    // write (without REQ_ONE) and one outside what that answered.
    let extents: Vec<_> = ours.iter().filter(|l| l.contains(" Extents id=")).collect();
    assert_eq!(extents.len(), 3, "{ours:#?}");
    assert!(extents.iter().all(|l| l.contains("req_one=0")), "{ours:#?}");
}

#[test]
fn cacheextents_qemu_img_map() {
    if !require(&["qemu-img"]) {
        return;
    }
    let args = [
        "-U",
        "-",
        "--filter=cacheextents",
        "data",
        "@1048576 1 @3145728 2",
        "size=4M",
        "--run",
        "qemu-img map --output=json -f raw \"$uri\"",
    ];
    let map = run_ok(std::process::Command::new(crate::common::nbdkit()).args(args));
    let plain = run_ok(
        std::process::Command::new(crate::common::nbdkit())
            .args(args.iter().filter(|a| **a != "--filter=cacheextents")),
    );
    assert_eq!(map, plain, "the map is the same with the filter");
    assert!(map.contains("\"data\": true"), "{map}");
}
