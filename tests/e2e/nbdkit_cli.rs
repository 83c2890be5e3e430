//! The `nbdkit` command line: version, help, plugin help and dump, and
//! clear errors with exit status 1 for bad input.

use std::process::Command;

use crate::common::*;

fn fails_with(args: &[&str], needle: &str) {
    let out = run(Command::new(nbdkit()).args(args));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_version_and_help() {
    let out = run_ok(Command::new(nbdkit()).arg("--version"));
    assert!(out.starts_with("nbdkit 1.32"), "{out}");
    let out = run_ok(Command::new(nbdkit()).arg("--help"));
    assert!(out.contains("PLUGIN [[KEY=]VALUE"), "{out}");
    let out = run_ok(Command::new(nbdkit()).args(["memory", "--help"]));
    assert!(out.contains("plugin: memory"), "{out}");
    assert!(out.contains("size="), "{out}");
    let out = run_ok(Command::new(nbdkit()).args(["memory", "--dump-plugin"]));
    assert!(out.contains("name=memory"), "{out}");
    assert!(out.contains("magic_config_key=size"), "{out}");
    let out = run_ok(Command::new(nbdkit()).arg("--dump-config"));
    assert!(out.contains("version=1.32"), "{out}");
}

#[test]
fn cli_errors() {
    fails_with(&["nosuch"], "nosuch");
    fails_with(&["memory"], "size");
    fails_with(&["memory", "1G", "foo=bar"], "unknown parameter 'foo'");
    fails_with(&["memory", "1Q"], "size");
    fails_with(&["memory", "8E"], "size");
    fails_with(&["--filter=nosuch", "memory", "1G"], "nosuch");
    fails_with(
        &["file", "/nonexistent/disk.img", "--run", "true", "-U", "-"],
        "nonexistent",
    );
    let out = run(Command::new(nbdkit()).arg("--bogus-option"));
    assert_eq!(out.status.code(), Some(1));
    let out = run(&mut Command::new(nbdkit()));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn cli_size_suffixes() {
    if !require(&["nbdinfo"]) {
        return;
    }
    for (arg, want) in [
        ("512", 512u64),
        ("1M", 1 << 20),
        ("4T", 4 << 40),
        ("1E", 1 << 60),
        ("size=2G", 2 << 30),
    ] {
        let s = Server::ours(&["memory", arg]);
        let out = run_ok(Command::new("nbdinfo").args(["--size", &s.uri()]));
        assert_eq!(out.trim(), want.to_string(), "{arg}");
    }
}

#[test]
fn cli_tcp_port_and_address() {
    if !require(&["nbdinfo"]) {
        return;
    }
    // Pick a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let out = run_ok(Command::new(nbdkit()).args([
        "-i",
        "127.0.0.1",
        "-p",
        &port,
        "memory",
        "1M",
        "--run",
        "nbdinfo --size \"$uri\"; echo \"$port\"",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, vec!["1048576", port.as_str()]);
}
