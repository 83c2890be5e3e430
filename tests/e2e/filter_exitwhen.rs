//! The exitwhen filter end to end: each kind of event makes the server
//! exit, idle or after its clients leave, and refuse new clients once the
//! event has happened.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, run, Server};
use crate::filter_exitlast::exits_within;

#[test]
fn exitwhen_file_created_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let e = format!("exit-when-file-created={}", stop.display());
    let mut s = Server::ours(&["--filter=exitwhen", "memory", "1M", &e, "exit-when-poll=1"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(s.alive());
    std::fs::write(&stop, "").unwrap();
    assert!(
        exits_within(&mut s, 5),
        "did not exit after the file was created"
    );
}

#[test]
fn exitwhen_waits_for_clients_and_refuses_new_ones() {
    if !require_nbdsh() || !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let e = format!("exit-when-file-created={}", stop.display());
    let mut s = Server::ours(&["--filter=exitwhen", "memory", "1M", &e, "exit-when-poll=1"]);
    nbdpy(
        &s.uri(),
        &format!(
            "import time\n\
             open({:?}, 'w').close()\n\
             time.sleep(1.5)\n\
             c = nbd.NBD()\n\
             try:\n  c.connect_uri(sys.argv[1])\n  raise SystemExit('a new client was accepted')\n\
             except nbd.Error:\n  pass\n\
             h.pwrite(b'x' * 512, 0)\n\
             assert h.pread(512, 0) == b'x' * 512\n\
             h.shutdown()\n",
            stop.to_str().unwrap()
        ),
    );
    assert!(
        exits_within(&mut s, 5),
        "did not exit after the last client"
    );
}

#[test]
fn exitwhen_process_exits() {
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let e = format!("exit-when-process-exits={}", sleeper.id());
    let mut s = Server::ours(&["--filter=exitwhen", "memory", "1M", &e, "exit-when-poll=1"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(s.alive());
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert!(
        exits_within(&mut s, 5),
        "did not exit after the process exited"
    );
}

#[test]
fn exitwhen_script() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let e = format!(
        "exit-when-script=test -e {} && exit 88; exit 0",
        flag.display()
    );
    let mut s = Server::ours(&["--filter=exitwhen", "memory", "1M", &e, "exit-when-poll=1"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(s.alive());
    std::fs::write(&flag, "").unwrap();
    assert!(
        exits_within(&mut s, 5),
        "did not exit after the script said 88"
    );
}

/// Our nbdkit on a private socket with `stdin` as given; waits until it
/// listens (or exits).
fn spawn(args: &[&str], stdin: Stdio) -> (std::process::Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let child = Command::new(nbdkit())
        .arg("-f")
        .arg("-U")
        .arg(&sock)
        .args(args)
        .stdin(stdin)
        .spawn()
        .unwrap();
    (child, dir)
}

fn wait_exit(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn exitwhen_pipe_closed() {
    let (mut child, dir) = spawn(
        &[
            "--filter=exitwhen",
            "memory",
            "1M",
            "exit-when-pipe-closed=0",
            "exit-when-poll=1",
        ],
        Stdio::piped(),
    );
    let sock = dir.path().join("sock");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with the pipe open"
    );
    drop(child.stdin.take());
    let st = wait_exit(&mut child, 5).expect("did not exit after the pipe closed");
    assert!(st.success(), "{st}");
}

#[test]
fn exitwhen_event_before_start_exits_at_once() {
    let (mut child, _dir) = spawn(
        &[
            "--filter=exitwhen",
            "memory",
            "1M",
            "exit-when-file-deleted=/nonexistent/file",
        ],
        Stdio::null(),
    );
    let st = wait_exit(&mut child, 10).expect("did not exit");
    assert!(st.success(), "{st}");
}

#[test]
fn exitwhen_without_events_does_nothing() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let mut s = Server::ours(&["--filter=exitwhen", "memory", "1M"]);
    assert!(run(Command::new("nbdinfo").arg("--size").arg(s.uri()))
        .status
        .success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.alive());
}
