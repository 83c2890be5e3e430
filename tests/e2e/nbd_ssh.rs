//! `nbd+ssh://` and `nbds+ssh://` URIs: our tools reach our nbdkit
//! through a private sshd (run here as the current user on a free port of
//! 127.0.0.1, with generated keys), by way of a wrapper `ssh` first in
//! `PATH` that adds a private ssh_config and logs its arguments, so the
//! tests can check the command line the client built.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::tls_common::{creds, free_port, require_gnutls_tools};

const SSHD: &str = "/usr/sbin/sshd";

fn require_ssh() -> bool {
    require(&[SSHD, "/usr/bin/ssh", "ssh-keygen", "nc"])
}

/// A private sshd, stopped on drop.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    user: String,
}

fn keygen(path: &Path) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
    );
}

impl Sshd {
    fn start() -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("id"));
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n\
                 PidFile {d}/sshd.pid\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 LogLevel ERROR\n",
                d = d.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("ssh_config"),
            format!(
                "Host *\n  IdentityFile {d}/id\n  IdentitiesOnly yes\n  \
                 StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  \
                 LogLevel ERROR\n  ConnectTimeout 10\n",
                d = d.display()
            ),
        )
        .unwrap();
        let bin = d.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let wrapper = bin.join("ssh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$*\" >> {d}/ssh.log\n\
                 exec /usr/bin/ssh -F {d}/ssh_config \"$@\"\n",
                d = d.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        // sshd run as root wants its privilege separation directory.
        if nix::unistd::Uid::effective().is_root() {
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            // Its log (the readiness probe below makes it complain).
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("run sshd");
        let user = String::from_utf8(run(Command::new("id").arg("-un")).stdout)
            .unwrap()
            .trim()
            .to_string();
        let mut s = Sshd {
            child,
            port,
            dir,
            user,
        };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                let log = std::fs::read_to_string(s.dir.path().join("sshd.log"));
                panic!("sshd exited: {st}: {}", log.unwrap_or_default());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "sshd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// PATH with the wrapper first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// What the wrapper logged (one line per ssh run).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ssh.log")).unwrap_or_default()
    }

    /// One of our tools, with the wrapper ssh.
    fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(our_bin(name));
        c.env("PATH", self.path());
        c
    }

    /// `nbd+ssh://USER@127.0.0.1:PORT/` + `rest`.
    fn uri(&self, scheme: &str, rest: &str) -> String {
        format!("{scheme}://{}@127.0.0.1:{}/{rest}", self.user, self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Run `cmd`, killing it if it takes longer than `secs`.
fn run_timeout(cmd: &mut Command, secs: u64) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{cmd:?} hung for more than {secs} s");
        }
    }
}

fn ok_output(cmd: &mut Command) -> String {
    let out = run_timeout(cmd, 60);
    stdout_of_success(cmd, out)
}

#[test]
fn nbdinfo_over_ssh_to_a_unix_socket() {
    if !require_ssh() {
        return;
    }
    let sshd = Sshd::start();
    let server = Server::ours(&["pattern", "1M"]);
    let sock = server.socket.display().to_string();
    let uri = sshd.uri("nbd+ssh", &format!("?socket={sock}"));
    let out = ok_output(sshd.tool("nbdinfo").arg(&uri));
    assert!(out.contains("export-size: 1048576"), "{out}");
    // The uri: line prints the ssh URI back (the port made explicit).
    assert!(out.contains(&format!("uri: {uri}")), "{out}");
    let log = sshd.log();
    assert!(
        log.contains(&format!(
            "-p {} -o User={} -- 127.0.0.1 nc -U {sock}",
            sshd.port, sshd.user
        )),
        "ssh argv: {log}"
    );
    assert!(!log.contains("-C"), "{log}");
    // --uri round-trips it too, and nbddump reads the data.
    let printed = ok_output(sshd.tool("nbdinfo").arg("--uri").arg(&uri));
    assert_eq!(printed.trim(), uri);
    let dump = ok_output(sshd.tool("nbddump").args(["--length=16"]).arg(&uri));
    let direct = ok_output(
        Command::new(our_bin("nbddump"))
            .args(["--length=16"])
            .arg(server.uri()),
    );
    assert_eq!(dump, direct);
}

#[test]
fn nbdcopy_over_ssh_to_tcp_with_compression() {
    if !require_ssh() {
        return;
    }
    let sshd = Sshd::start();
    let nbd_port = free_port();
    let mut nbdkit = Command::new(nbdkit())
        .args(["-f", "-i", "127.0.0.1", "-p", &nbd_port.to_string()])
        .args(["memory", "2M"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", nbd_port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nbdkit did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    random_file(&data, 2 << 20, 25);
    let uri = sshd.uri("nbd+ssh", &format!("?nbd-port={nbd_port}&compress=true"));
    // Up through the tunnel, and back down.
    ok_output(sshd.tool("nbdcopy").arg(&data).arg(&uri));
    let back = dir.path().join("back");
    ok_output(sshd.tool("nbdcopy").arg(&uri).arg(&back));
    assert!(std::fs::read(&data).unwrap() == std::fs::read(&back).unwrap());
    // And the data is really on that server.
    let direct = dir.path().join("direct");
    run_ok(
        Command::new(our_bin("nbdcopy"))
            .arg(format!("nbd://127.0.0.1:{nbd_port}/"))
            .arg(&direct),
    );
    assert!(std::fs::read(&data).unwrap() == std::fs::read(&direct).unwrap());
    let log = sshd.log();
    assert!(
        log.contains(&format!(
            "-C -p {} -o User={} -- 127.0.0.1 nc localhost {nbd_port}",
            sshd.port, sshd.user
        )),
        "ssh argv: {log}"
    );
    stop(&mut nbdkit);
}

#[test]
fn nbds_ssh_runs_tls_through_the_tunnel() {
    if !require_ssh() || !require_gnutls_tools() {
        return;
    }
    let sshd = Sshd::start();
    let c = creds();
    let psk = format!("--tls-psk={}", c.psk.display());
    let server = Server::ours(&["--tls=require", &psk, "pattern", "1M"]);
    let q = format!(
        "?socket={}&tls-psk-file={}&tls-username=alice",
        server.socket.display(),
        c.psk.display()
    );
    let out = ok_output(sshd.tool("nbdinfo").arg(sshd.uri("nbds+ssh", &q)));
    assert!(out.contains("export-size: 1048576"), "{out}");
    assert!(out.contains("with TLS"), "{out}");
    // The uri: line keeps the TLS parameters.
    assert!(
        out.contains(&format!("uri: {}", sshd.uri("nbds+ssh", &q))),
        "{out}"
    );
    // Without TLS the server refuses the export.
    let plain = sshd.uri("nbd+ssh", &format!("?socket={}", server.socket.display()));
    let out = run_timeout(sshd.tool("nbdinfo").arg(&plain), 60);
    assert!(!out.status.success());
    // And with the wrong key the handshake fails.
    let q = format!(
        "?socket={}&tls-psk-file={}&tls-username=alice",
        server.socket.display(),
        c.wrong_psk.display()
    );
    let out = run_timeout(sshd.tool("nbdinfo").arg(sshd.uri("nbds+ssh", &q)), 60);
    assert!(!out.status.success());
}

#[test]
fn the_nbd_plugin_takes_an_ssh_uri() {
    if !require_ssh() {
        return;
    }
    let sshd = Sshd::start();
    let backend = Server::ours(&["pattern", "1M"]);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("front");
    let uri = sshd.uri("nbd+ssh", &format!("?socket={}", backend.socket.display()));
    let mut front = Command::new(nbdkit())
        .env("PATH", sshd.path())
        .args(["-f", "-U"])
        .arg(&sock)
        .arg("nbd")
        .arg(format!("uri={uri}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nbdkit did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let front_uri = format!("nbd+unix:///?socket={}", sock.display());
    let a = ok_output(
        Command::new(our_bin("nbddump"))
            .args(["--offset=4096", "--length=32"])
            .arg(&front_uri),
    );
    let b = ok_output(
        Command::new(our_bin("nbddump"))
            .args(["--offset=4096", "--length=32"])
            .arg(backend.uri()),
    );
    assert_eq!(a, b);
    assert!(sshd.log().contains("nc -U"), "{}", sshd.log());
    stop(&mut front);
}

#[test]
fn a_host_starting_with_a_dash_is_refused_before_ssh_runs() {
    if !require_ssh() {
        return;
    }
    let sshd = Sshd::start();
    for uri in [
        "nbd+ssh://-oProxyCommand=xeyes",
        "nbd+ssh://-oProxyCommand=xeyes/?socket=/s",
        "nbds+ssh://u@-x:22/",
    ] {
        let out = run_timeout(sshd.tool("nbdinfo").arg(uri), 30);
        assert_eq!(out.status.code(), Some(1), "{uri}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("starts with '-'"), "{uri}: {err}");
    }
    assert_eq!(sshd.log(), "", "ssh must not have run");
}

#[test]
fn an_unreachable_sshd_is_an_error_not_a_hang() {
    if !require_ssh() {
        return;
    }
    let sshd = Sshd::start();
    let dead = free_port();
    let uri = format!("nbd+ssh://127.0.0.1:{dead}/?socket=/nonexistent");
    for tool in ["nbdinfo", "nbdcopy"] {
        let mut cmd = sshd.tool(tool);
        cmd.arg(&uri);
        if tool == "nbdcopy" {
            cmd.arg("null:");
        }
        let out = run_timeout(&mut cmd, 60);
        assert_eq!(out.status.code(), Some(1), "{tool}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ssh to 127.0.0.1 failed"), "{tool}: {err}");
    }
    // sshd is up, but nothing listens on the far side's socket.
    let uri = sshd.uri("nbd+ssh", "?socket=/nonexistent/sock");
    let out = run_timeout(sshd.tool("nbdinfo").arg(&uri), 60);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ssh to 127.0.0.1 failed"), "{err}");
}

#[test]
fn nbdfuse_mounts_an_ssh_uri() {
    if !require_ssh() || !require(&["fusermount3"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "no /dev/fuse");
        eprintln!("SKIP: no /dev/fuse");
        return;
    }
    let sshd = Sshd::start();
    let server = Server::ours(&["pattern", "1M"]);
    let uri = sshd.uri("nbd+ssh", &format!("?socket={}", server.socket.display()));
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("pid");
    let mut child = sshd
        .tool("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&mnt)
        .arg(&uri)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !pidfile.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("nbdfuse exited early: {st}");
        }
        assert!(t.elapsed() < Duration::from_secs(30), "nbdfuse not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let read = std::fs::read(mnt.join("nbd"));
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let t = Instant::now();
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = read.expect("read the mounted file");
    let direct = dir.path().join("direct");
    run_ok(
        Command::new(our_bin("nbdcopy"))
            .arg(server.uri())
            .arg(&direct),
    );
    assert_eq!(data.len(), 1 << 20);
    assert!(
        data == std::fs::read(&direct).unwrap(),
        "wrong data through nbdfuse"
    );
    assert!(sshd.log().contains("nc -U"), "{}", sshd.log());
}
