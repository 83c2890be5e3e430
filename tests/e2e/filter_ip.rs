//! The ip filter end to end: Unix socket and TCP clients (nbdinfo)
//! allowed or refused by the rules.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{nbdkit, require, run, Server};

/// Can nbdinfo open the export?
fn allowed(uri: &str) -> bool {
    run(Command::new("nbdinfo").arg("--size").arg(uri))
        .status
        .success()
}

/// Our nbdkit on a TCP port of 127.0.0.1, killed on drop.
struct TcpServer {
    child: Child,
    port: u16,
}

impl TcpServer {
    fn start(args: &[&str]) -> TcpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(nbdkit())
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut s = TcpServer { child, port };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not listen"
            );
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("server exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }
    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix(rules: &[&str]) -> bool {
    let mut args = vec!["--filter=ip", "memory", "1M"];
    args.extend_from_slice(rules);
    allowed(&Server::ours(&args).uri())
}

fn tcp(rules: &[&str]) -> bool {
    let mut args = vec!["--filter=ip", "memory", "1M"];
    args.extend_from_slice(rules);
    allowed(&TcpServer::start(&args).uri())
}

#[test]
fn ip_unix_socket_clients() {
    if !require(&["nbdinfo"]) {
        return;
    }
    assert!(unix(&[]));
    assert!(!unix(&["deny=all"]));
    assert!(unix(&["allow=anyunix", "deny=all"]));
    assert!(unix(&["allow=allunix", "deny=any"]));
    assert!(unix(&["deny=anyipv4,anyipv6"]));
    assert!(!unix(&["allow=127.0.0.1,::1", "deny=all"]));
    // The client's credentials (SO_PEERCRED), as upstream.
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    for (rules, want) in [
        (vec![format!("allow=uid:{uid}"), "deny=all".into()], true),
        (
            vec![format!("allow=uid:{}", uid + 1), "deny=all".into()],
            false,
        ),
        (vec![format!("deny=gid:{gid}")], false),
        (vec![format!("deny=gid:{}", gid + 1)], true),
        (
            // (Upstream 1.32 cannot parse "gid:N,uid:M" in one list.)
            vec![
                format!("allow=gid:{gid}"),
                format!("allow=uid:{}", uid + 1),
                "deny=anyunix".into(),
            ],
            true,
        ),
    ] {
        let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
        assert_eq!(unix(&rules), want, "{rules:?}");
        if require(&["nbdkit"]) {
            let mut args = vec!["--filter=ip", "memory", "1M"];
            args.extend_from_slice(&rules);
            let theirs = allowed(&Server::upstream(&args).uri());
            assert_eq!(theirs, want, "upstream, {rules:?}");
        }
    }
    // No security labels on this system: such a rule never matches.
    assert!(!unix(&[
        "allow=security:unconfined_u:unconfined_r:unconfined_t:s0",
        "deny=all"
    ]));
}

#[test]
fn ip_tcp_addresses() {
    if !require(&["nbdinfo"]) {
        return;
    }
    assert!(tcp(&["allow=127.0.0.1", "deny=all"]));
    assert!(tcp(&["allow=127.0.0.0/8", "deny=all"]));
    assert!(!tcp(&["deny=127.0.0.0/8"]));
    assert!(!tcp(&["allow=127.0.0.2,10.0.0.0/8", "deny=all"]));
    assert!(!tcp(&["allow=anyipv6", "deny=all"]));
    assert!(tcp(&["allow=anyipv4", "deny=all"]));
    assert!(tcp(&["deny=::1,anyunix"]));
    assert!(!tcp(&["allow=anyunix", "deny=all"]));
    // Credential rules never match TCP clients.
    assert!(tcp(&["deny=uid:0,pid:1"]));
}

#[test]
fn ip_bad_rules_fail_at_startup() {
    for bad in ["allow=foo", "deny=1.2.3.4/33", "allow=uid:me"] {
        let out = Command::new(nbdkit())
            .args(["--filter=ip", "null", "1M", bad, "--run", "true"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
    }
}
