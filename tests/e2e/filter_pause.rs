//! The pause filter end to end, against upstream's: the control socket's
//! answers, a read held while paused and let go on resume, one control
//! client at a time, the socket removed at exit; under the rate filter a
//! pause waits for the slow request in flight.

use std::path::Path;

use crate::common::{nbdkit, require, require_nbdsh, run_ok, PYTHON};

const CONTROL: &str = r#"
import socket, nbd, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[2])
h = nbd.NBD(); h.connect_uri(sys.argv[1])
s.send(b"p"); print(s.recv(10))
c = h.aio_pread(nbd.Buffer(512), 0)
for i in range(5): h.poll(100)
print("done while paused:", h.aio_command_completed(c))
s.send(b"r"); print(s.recv(10))
while not h.aio_command_completed(c): h.poll(-1)
print("done after resume")
s.send(b"pp"); time.sleep(0.2); print(s.recv(10))
s.send(b"rz\n"); time.sleep(0.2); print(s.recv(10))
s2 = socket.socket(socket.AF_UNIX); s2.connect(sys.argv[2]); s2.send(b"p"); s2.settimeout(1)
try: print("second:", s2.recv(10))
except Exception as e: print("second waits")
s.close(); time.sleep(0.2)
print("second after the first closes:", s2.recv(10))
s2.send(b"r"); print(s2.recv(10))
"#;

fn control(prog: &Path, filters: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl");
    std::fs::write(&sock, b"a stale file").unwrap();
    let script = dir.path().join("control.py");
    std::fs::write(&script, CONTROL).unwrap();
    let out = run_ok(
        std::process::Command::new(prog)
            .args(["-U", "-"])
            .args(filters)
            .args([
                "memory",
                "1M",
                &format!("pause-control={}", sock.display()),
                "--run",
                &format!("{PYTHON} {} \"$uri\" {}", script.display(), sock.display()),
            ]),
    );
    assert!(!sock.exists(), "the control socket is removed at exit");
    out
}

#[test]
fn pause_control_as_upstream() {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return;
    }
    let ours = control(&nbdkit(), &["--filter=pause"]);
    assert_eq!(ours, control(Path::new("nbdkit"), &["--filter=pause"]));
    assert_eq!(
        ours,
        "b'P'\ndone while paused: False\nb'R'\ndone after resume\nb'PP'\nb'RX'\n\
         second waits\nsecond after the first closes: b'P'\nb'R'\n"
    );
}

#[test]
fn pause_over_rate_waits_for_the_request_in_flight() {
    if !require_nbdsh() {
        return;
    }
    // A 64K read at 128K/s takes half a second: a pause lets it finish
    // (and answers once it has) but holds the next one.
    let script = r#"
import socket, nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
c = h.aio_pread(nbd.Buffer(65536), 0)
h.poll(10)
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[2])
s.send(b"p"); print(s.recv(10))
for i in range(50):
    if h.aio_command_completed(c): break
    h.poll(100)
else:
    print("the read in flight was held")
d = h.aio_pread(nbd.Buffer(512), 0)
for i in range(3): h.poll(100)
print("next read done while paused:", h.aio_command_completed(d))
s.send(b"r"); print(s.recv(10))
while not h.aio_command_completed(d): h.poll(-1)
"#;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl");
    let py = dir.path().join("s.py");
    std::fs::write(&py, script).unwrap();
    let out = run_ok(std::process::Command::new(nbdkit()).args([
        "-U",
        "-",
        "--filter=pause",
        "--filter=rate",
        "memory",
        "1M",
        "rate=128K",
        &format!("pause-control={}", sock.display()),
        "--run",
        &format!("{PYTHON} {} \"$uri\" {}", py.display(), sock.display()),
    ]));
    assert_eq!(out, "b'P'\nnext read done while paused: False\nb'R'\n");
}
