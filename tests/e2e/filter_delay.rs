//! The delay filter end to end: requests through our nbdkit with
//! `--filter=delay` take at least the configured delay (lower bounds
//! only: the machine may be slow, never fast), as seen by libnbd's Python
//! bindings.

use std::time::Instant;

use crate::common::{nbdpy, require_nbdsh, Server};

#[test]
fn delay_read_takes_at_least_rdelay() {
    if !require_nbdsh() {
        return;
    }
    let srv = Server::ours(&["--filter=delay", "memory", "1M", "rdelay=200ms"]);
    let out = nbdpy(
        &srv.uri(),
        "import time\nt = time.monotonic()\nh.pread(512, 0)\nprint(time.monotonic() - t)\n",
    );
    let secs: f64 = out.trim().parse().unwrap();
    assert!(secs >= 0.2, "read took {secs} s");
}

#[test]
fn delay_write_zero_trim_and_spellings() {
    if !require_nbdsh() {
        return;
    }
    // wdelay covers write, zero and trim; delay-zero given after it wins
    // for zero; delay-read is rdelay's other name.
    let srv = Server::ours(&[
        "--filter=delay",
        "memory",
        "1M",
        "wdelay=150ms",
        "delay-zero=300ms",
        "delay-read=100ms",
    ]);
    let out = nbdpy(
        &srv.uri(),
        r#"
import time
def timed(f):
    t = time.monotonic()
    f()
    return time.monotonic() - t
print(timed(lambda: h.pwrite(b'x' * 512, 0)),
      timed(lambda: h.trim(4096, 0)),
      timed(lambda: h.zero(4096, 0)),
      timed(lambda: h.pread(512, 0)))
"#,
    );
    let v: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(v[0] >= 0.15, "write {}", v[0]);
    assert!(v[1] >= 0.15, "trim {}", v[1]);
    assert!(v[2] >= 0.3, "zero {}", v[2]);
    assert!(v[3] >= 0.1, "read {}", v[3]);
}

#[test]
fn delay_open_and_fast_zero() {
    if !require_nbdsh() {
        return;
    }
    let srv = Server::ours(&[
        "--filter=delay",
        "memory",
        "1M",
        "delay-open=300ms",
        "delay-zero=5",
        "delay-fast-zero=false",
    ]);
    let t = Instant::now();
    // A fast zero is refused with ENOTSUP without the 5 s wait.
    let out = nbdpy(
        &srv.uri(),
        r#"
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("no error")
except nbd.Error as e:
    print(e.errno in ("ENOTSUP", errno.ENOTSUP))
"#,
    );
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.trim(), "True");
    assert!(secs >= 0.3, "connecting took {secs} s");
    assert!(secs < 5.0, "the fast zero waited ({secs} s)");
}
