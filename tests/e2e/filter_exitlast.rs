//! The exitlast filter end to end: the server stays up until its first
//! client has come and gone, then exits.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{nbdpy, require, require_nbdsh, run_ok, Server};

/// Wait up to `secs` for the server to exit.
pub(crate) fn exits_within(s: &mut Server, secs: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if !s.alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn exitlast_exits_after_nbdinfo() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let mut s = Server::ours(&["--filter=exitlast", "memory", "1M"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.alive(), "exited before the first client");
    // nbdinfo opens the export twice (NBD_OPT_INFO, then NBD_OPT_GO).
    let out = run_ok(Command::new("nbdinfo").arg(s.uri()));
    assert!(out.contains("export-size: 1048576"), "{out}");
    assert!(
        exits_within(&mut s, 5),
        "still running after the last client"
    );
}

#[test]
fn exitlast_waits_for_every_client() {
    if !require_nbdsh() {
        return;
    }
    let mut s = Server::ours(&["--filter=exitlast", "memory", "1M"]);
    nbdpy(
        &s.uri(),
        "import time\n\
         c = nbd.NBD()\n\
         c.connect_uri(sys.argv[1])\n\
         h.shutdown()\n\
         time.sleep(0.5)\n\
         c.pwrite(b'x' * 512, 0)\n\
         assert c.pread(512, 0) == b'x' * 512\n\
         c.shutdown()\n",
    );
    assert!(
        exits_within(&mut s, 5),
        "still running after the last client"
    );
}
