//! The noparallel filter end to end, against upstream's: the multi-conn
//! flag per mode; with `serialize=connections` a second libnbd client
//! stays in its handshake until the first has gone; and (a log and a
//! delay filter below) a connection's requests sent at once reach the
//! plugin one after the other.

use std::path::Path;
use std::time::Duration;

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, same_as_upstream, Server};
use crate::filter_log::log_lines;

const SECOND_CLIENT: &str = r#"
import time
print("multi", h.can_multi_conn())
b = nbd.NBD()
b.aio_connect_uri(sys.argv[1])
for i in range(10):
    b.poll(50)
print("second connected:", b.aio_is_ready(), "connecting:", b.aio_is_connecting())
h.shutdown()
for i in range(100):
    if b.aio_is_ready(): break
    b.poll(50)
print("after the first closes:", b.aio_is_ready())
"#;

#[test]
fn noparallel_connections_wait_as_upstream() {
    for (mode, waits) in [
        ("requests", false),
        ("all-requests", false),
        ("connections", true),
    ] {
        let m = format!("serialize={mode}");
        let Some(out) =
            same_as_upstream(&["--filter=noparallel", "memory", "1M", &m], SECOND_CLIENT)
        else {
            return;
        };
        let (multi, second) = if waits {
            ("False", "False")
        } else {
            ("True", "True")
        };
        assert!(out.contains(&format!("multi {multi}\n")), "{mode}: {out}");
        assert!(
            out.contains(&format!("second connected: {second} ")),
            "{mode}: {out}"
        );
        assert!(out.contains("after the first closes: True"), "{out}");
    }
}

/// Send four reads at once on one connection; the log lines below.
fn four_reads(prog: &Path, mode: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let m = format!("serialize={mode}");
    let s = Server::start_with(
        prog,
        &[
            "--filter=noparallel",
            "--filter=log",
            "--filter=delay",
            "memory",
            "1M",
            &l,
            &m,
            "delay-read=100ms",
        ],
    );
    nbdpy(
        &s.uri(),
        "cs = [h.aio_pread(nbd.Buffer(512), i * 512) for i in range(4)]\n\
         done = set()\n\
         while len(done) < 4:\n\
         \x20   h.poll(-1)\n\
         \x20   done |= {c for c in cs if c not in done and h.aio_command_completed(c)}\n\
         h.shutdown()\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    log_lines(&log)
        .into_iter()
        .filter(|l| l.contains("Read id="))
        .collect()
}

/// Is every request's reply logged before the next request starts?
fn one_at_a_time(lines: &[String]) -> bool {
    lines.len() == 8
        && lines
            .chunks(2)
            .all(|p| p[0].contains(" Read id=") && p[1].contains("...Read id="))
}

#[test]
fn noparallel_one_request_at_a_time() {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return;
    }
    for prog in [nbdkit(), "nbdkit".into()] {
        let lines = four_reads(&prog, "requests");
        assert!(one_at_a_time(&lines), "{prog:?}: {lines:#?}");
    }
}
