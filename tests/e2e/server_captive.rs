//! Captive use of our server: launched by libnbd with socket activation,
//! `--run` with its exit status, `-s` on stdin/stdout, and the default
//! background mode with a pidfile.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn read_pid(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn captive_socket_activation_by_nbdinfo() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg("--")
            .arg("[")
            .arg(nbdkit())
            .arg("-P")
            .arg(&pidfile)
            .args(["memory", "1G", "]"]),
    );
    assert_eq!(out.trim(), "1073741824");
    // libnbd killed the server when it was done; nothing is left behind.
    let pid = read_pid(&pidfile);
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid_alive(pid), "captive server {pid} still running");
}

#[test]
fn captive_run_exit_status_and_uri() {
    let out = run(Command::new(nbdkit()).args(["-U", "-", "memory", "1M", "--run", "exit 3"]));
    assert_eq!(out.status.code(), Some(3));
    let out = run_ok(Command::new(nbdkit()).args([
        "-U",
        "-",
        "-e",
        "foo",
        "memory",
        "1M",
        "--run",
        "echo \"$uri|$exportname|$unixsocket|$port\"",
    ]));
    let parts: Vec<&str> = out.trim().split('|').collect();
    assert!(parts[0].starts_with("nbd+unix:///foo?socket="), "{out}");
    assert_eq!(parts[1], "foo");
    assert!(parts[2].ends_with("/socket"), "{out}");
    assert_eq!(parts[3], "");
    // The private socket directory is gone afterwards.
    assert!(!std::path::Path::new(parts[2]).exists());
    if require(&["nbdinfo"]) {
        let out = run_ok(Command::new(nbdkit()).args([
            "-U",
            "-",
            "memory",
            "1M",
            "--run",
            "nbdinfo --size \"$uri\"",
        ]));
        assert_eq!(out.trim(), "1048576");
    }
    let out = run(Command::new(nbdkit()).args(["-U", "-", "null", "--run", "kill -9 $$"]));
    assert_eq!(out.status.code(), Some(137));
}

#[test]
fn captive_single_under_nbdsh() {
    if !require_nbdsh() {
        return;
    }
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_command(["{}", "-s", "memory", "1M"])
h.pwrite(b"hello", 1000)
assert h.pread(5, 1000) == b"hello"
assert h.get_size() == 1048576
print("ok")
"#,
        nbdkit().display()
    );
    let out = run_ok(Command::new(PYTHON).arg("-c").arg(script));
    assert_eq!(out.trim(), "ok");
}

#[test]
fn captive_background_with_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let pidfile = dir.path().join("pid");
    let t = Instant::now();
    let st = Command::new(nbdkit())
        .arg("-U")
        .arg(&sock)
        .arg("-P")
        .arg(&pidfile)
        .args(["memory", "1M"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(t.elapsed() < Duration::from_secs(10));
    // The parent returned with the server listening and the pidfile written.
    let pid = read_pid(&pidfile);
    assert!(pid_alive(pid));
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid_alive(pid));
}
