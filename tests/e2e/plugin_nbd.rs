//! The nbd plugin: a proxy in front of our nbdkit, upstream nbdkit and
//! qemu-nbd (captive, by `command=`), checked against upstream's nbd
//! plugin over the same server: data, zero, trim, extents, flush and the
//! advertised flags passed through; the server's errno back to the
//! client; `dynamic-export` with export listing; `shared=` with
//! `retry=`; TLS (PSK) to the server; filters on top; bad parameters.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::tls_common::*;

/// What a client sees through the proxy: flags, writes, zeroes, trims
/// and the map (idempotent, so upstream and ours can run it in turn
/// against the same server).
const PROBE: &str = r#"
print(h.get_size(), h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(),
      h.can_zero(), h.can_fast_zero(), h.can_multi_conn(), h.can_cache(),
      h.can_meta_context("base:allocation"))
h.pwrite(b"\x5a" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b"tail", h.get_size() - 4)
h.flush()
print(bytes(h.pread(8, (1 << 20) + 65532)), bytes(h.pread(4, h.get_size() - 4)))
h.zero(4096, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.trim(8192, (1 << 20) + 8192)
print(bytes(h.pread(8, (1 << 20) + 4092)))
m = []
h.block_status(h.get_size(), 0, lambda ctx, off, ents, err: m.append(list(ents)))
print(m)
r = []
h.block_status(h.get_size(), 0, lambda ctx, off, ents, err: r.append(list(ents)), nbd.CMD_FLAG_REQ_ONE)
print(r)
"#;

#[test]
fn plugin_nbd_proxies_our_server_as_upstream() {
    let backend = Server::ours(&["memory", "4M"]);
    let socket = format!("socket={}", backend.socket.display());
    let Some(out) = same_as_upstream(&["nbd", &socket], PROBE) else {
        return;
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "4194304 False True True True True True True True True",
        "{out}"
    );
    assert_eq!(lines[1], r"b'ZZZZ\x00\x00\x00\x00' b'tail'", "{out}");
    assert_eq!(lines[2], r"b'\x00\x00\x00\x00ZZZZ'", "{out}");
    // The map came through: data where written (in the memory plugin's
    // 32K pages), holes elsewhere; with REQ_ONE a single extent.
    assert_eq!(lines[3], "[[1048576, 3, 65536, 0, 3047424, 3, 32768, 0]]");
    assert_eq!(lines[4], "[[1048576, 3]]");

    // The same by URI (the magic parameter) and shared, as upstream.
    let uri = backend.uri();
    let Some(shared) = same_as_upstream(&["nbd", &uri, "shared=true"], PROBE) else {
        return;
    };
    assert_eq!(shared, out);
}

#[test]
fn plugin_nbd_in_front_of_upstream_read_only() {
    if !require(&["nbdkit"]) {
        return;
    }
    let backend = Server::upstream(&["-r", "pattern", "1M"]);
    let proxy = Server::ours(&["nbd", &format!("socket={}", backend.socket.display())]);
    let script = "print(h.is_read_only(), h.can_trim(), list(h.pread(8, 8)))\n\
                  try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n";
    if !require_nbdsh() {
        return;
    }
    let out = nbdpy(&proxy.uri(), script);
    assert_eq!(out, "True False [0, 0, 0, 0, 0, 0, 0, 8]\nEPERM\n");
}

#[test]
fn plugin_nbd_command_qemu_nbd_qcow2_with_partition_filter() {
    if !require(&["qemu-img", "qemu-nbd", "nbdcopy", "sfdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("8M"),
    );
    let data = dir.path().join("data");
    random_file(&data, 2 << 20, 11);
    let command = [
        "nbd".to_string(),
        "command=qemu-nbd".into(),
        "arg=-f".into(),
        "arg=qcow2".into(),
        format!("arg={}", qcow2.display()),
    ];
    // Copy the data in through the proxy (qemu-nbd is captive) ...
    let mut args = vec!["-U", "-"];
    args.extend(command.iter().map(String::as_str));
    args.extend(["--run", "nbdcopy \"$DATA\" \"$uri\""]);
    run_ok(Command::new(nbdkit()).args(&args).env("DATA", &data));
    // ... and qemu-nbd is gone, with the qcow2 holding it.
    let raw = dir.path().join("raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&qcow2)
            .arg(&raw),
    );
    let got = std::fs::read(&raw).unwrap();
    assert_eq!(&got[..2 << 20], &std::fs::read(&data).unwrap()[..]);
    assert!(got[2 << 20..].iter().all(|&b| b == 0));

    // A partition table written through the proxy, then one partition
    // served by the partition filter over the proxy, as the man page's
    // replacement for `qemu-nbd -P 1`.
    // (sfdisk writes the table into a file, which nbdcopy copies in.)
    let table = dir.path().join("table");
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    run_ok(
        Command::new("sfdisk").arg("-q").arg(&img).stdin(
            std::fs::File::open({
                std::fs::write(&table, "start=2048, size=4096\n").unwrap();
                &table
            })
            .unwrap(),
        ),
    );
    let mut args = vec!["-U", "-"];
    args.extend(command.iter().map(String::as_str));
    args.extend(["--run", "nbdcopy \"$IMG\" \"$uri\""]);
    run_ok(Command::new(nbdkit()).args(&args).env("IMG", &img));
    let mut args = vec!["-U", "-", "--filter=partition"];
    args.extend(command.iter().map(String::as_str));
    args.extend(["partition=1", "--run", "nbdinfo --size \"$uri\""]);
    let out = run_ok(Command::new(nbdkit()).args(&args));
    assert_eq!(out.trim(), (4096 * 512).to_string());
}

#[test]
fn plugin_nbd_passes_the_servers_errno() {
    if !require_nbdsh() {
        return;
    }
    let backend = Server::ours(&["full", "1M"]);
    let proxy = Server::ours(&["nbd", &format!("socket={}", backend.socket.display())]);
    let out = nbdpy(
        &proxy.uri(),
        "try:\n    h.pwrite(b'x' * 512, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n",
    );
    assert_eq!(out, "ENOSPC\n");
}

#[test]
fn plugin_nbd_dynamic_export_lists_and_opens_the_servers_exports() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small"), vec![1u8; 1024]).unwrap();
    std::fs::write(dir.path().join("big"), vec![2u8; 4096]).unwrap();
    let backend = Server::ours(&["file", &format!("dir={}", dir.path().display())]);
    let socket = format!("socket={}", backend.socket.display());
    let proxy = Server::ours(&["nbd", &socket, "dynamic-export=true"]);
    let list = run_ok(Command::new("nbdinfo").args(["--list", "--json", &proxy.uri()]));
    assert!(
        list.contains("\"small\"") && list.contains("\"big\""),
        "{list}"
    );
    let size = run_ok(Command::new("nbdinfo").args(["--size", &proxy.uri_export("big")]));
    assert_eq!(size.trim(), "4096");
    // Without dynamic-export every client gets export= whatever it asks.
    let fixed = Server::ours(&["nbd", &socket, "export=small"]);
    let size = run_ok(Command::new("nbdinfo").args(["--size", &fixed.uri_export("big")]));
    assert_eq!(size.trim(), "1024");
}

#[test]
fn plugin_nbd_shared_retries_until_the_server_is_up() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("late.sock");
    let mut proxy = Command::new(nbdkit())
        .args(["-U", "-", "nbd", "shared=true", "retry=10"])
        .arg(format!("socket={}", sock.display()))
        .args(["--run", "nbdinfo --size \"$uri\""])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut backend = Command::new(nbdkit())
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["memory", "3M"])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let st = loop {
        if let Some(st) = proxy.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "proxy hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(proxy.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(st.success() && out.trim() == "3145728", "{st} {out}");
    let _ = backend.kill();
    let _ = backend.wait();

    // Without retry a missing server fails at once, with the reason.
    let o = run(Command::new(nbdkit())
        .args(["-U", "-", "nbd", "shared=true"])
        .arg(format!("socket={}", dir.path().join("none").display()))
        .args(["--run", "true"]));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file"),
        "{o:?}"
    );
}

#[test]
fn plugin_nbd_tls_psk_to_the_server() {
    if !require_gnutls_tools() || !require(&["nbdinfo"]) {
        return;
    }
    let c = creds();
    let backend = Server::ours(&[
        "--tls=require",
        &format!("--tls-psk={}", c.psk.display()),
        "memory",
        "2M",
    ]);
    let socket = format!("socket={}", backend.socket.display());
    let psk = format!("tls-psk={}", c.psk.display());
    // Plaintext to the proxy, TLS from it to the server.
    let proxy = Server::ours(&["nbd", &socket, "tls=require", &psk, "tls-username=alice"]);
    let size = run_ok(Command::new("nbdinfo").args(["--size", &proxy.uri()]));
    assert_eq!(size.trim(), "2097152");
    // The same by an nbds+unix URI.
    let uri = nbds_unix(&backend, Some("alice"), &psk_param(&c.psk));
    let proxy = Server::ours(&["nbd", &uri]);
    let size = run_ok(Command::new("nbdinfo").args(["--size", &proxy.uri()]));
    assert_eq!(size.trim(), "2097152");
    // Without TLS the server refuses the proxy, and the client hears so.
    let plain = Server::ours(&["nbd", &socket]);
    assert!(!run(Command::new("nbdinfo").args(["--size", &plain.uri()]))
        .status
        .success());
}

#[test]
fn plugin_nbd_dump_plugin_without_parameters() {
    // Scripts probe for URI and TLS support this way.
    let out = run_ok(Command::new(nbdkit()).args(["--dump-plugin", "nbd"]));
    for line in [
        "magic_config_key=uri",
        "libnbd_tls=1",
        "libnbd_uri=1",
        "libnbd_vsock=1",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}: {out}");
    }
}

#[test]
fn plugin_nbd_bad_parameters() {
    for (args, msg) in [
        (vec!["nbd"], "exactly one of"),
        (vec!["nbd", "socket=/x", "hostname=y"], "cannot mix"),
        (
            vec!["nbd", "socket=/x", "dynamic-export=true", "shared=true"],
            "shared",
        ),
        (vec!["nbd", "socket=/x", "tls=maybe"], "tls"),
        (vec!["nbd", "socket-fd=999"], "Bad file descriptor"),
        (vec!["nbd", "socket=/x", "frobnicate=1"], "frobnicate"),
    ] {
        let o = run(Command::new(nbdkit())
            .args(["-U", "-"])
            .args(&args)
            .args(["--run", "true"]));
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

/// A qcow2 over a qcow2 backing file, with an enabled dirty bitmap `b0`
/// that saw one write: something in each of qemu's meta contexts.
fn qcow2_with_bitmap(dir: &std::path::Path) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let qemu_img = |args: &[&str]| run_ok(Command::new("qemu-img").args(args));
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    let qemu_io = |file: &std::path::Path, cmd: &str| {
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(file),
        )
    };
    qemu_io(&base, "write -P 1 0 1M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_img(&["bitmap", "--add", "--enable", top.to_str().unwrap(), "b0"]);
    qemu_io(&top, "write -P 2 2M 64k");
    top
}

#[test]
fn plugin_nbd_passes_qemu_meta_contexts() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = qcow2_with_bitmap(dir.path());
    let top = top.to_str().unwrap();
    let qemu_nbd = ["qemu-nbd", "-f", "qcow2", "-A", "-B", "b0", top];
    let map = |ctx: &str| format!("--map={ctx}");
    // What qemu-nbd says itself.
    let direct = |ctx: &str| {
        let mut c = Command::new("nbdinfo");
        c.args([&map(ctx), "--", "["]).args(qemu_nbd).arg("]");
        run_ok(&mut c)
    };
    // The same through our proxy, qemu-nbd captive (shared connection).
    let mut command = vec!["nbd".to_string()];
    command.push(format!("command={}", qemu_nbd[0]));
    command.extend(qemu_nbd[1..].iter().map(|a| format!("arg={a}")));
    let proxied = |filters: &[&str], ctx: &str| {
        let mut c = Command::new(nbdkit());
        c.args(["-U", "-"]).args(filters).args(&command);
        c.args(["--run", &format!("nbdinfo {} \"$uri\"", map(ctx))]);
        run(&mut c)
    };
    for ctx in [
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "base:allocation",
    ] {
        let want = direct(ctx);
        let got = proxied(&[], ctx);
        assert!(got.status.success(), "{ctx}: {got:?}");
        assert_eq!(String::from_utf8_lossy(&got.stdout), want, "{ctx}");
        // Through a filter that keeps offsets and data, too.
        let got = proxied(&["--filter=readonly"], ctx);
        assert_eq!(
            String::from_utf8_lossy(&got.stdout),
            want,
            "{ctx} under readonly"
        );
    }
    let bitmap = direct("qemu:dirty-bitmap:b0");
    assert!(
        bitmap.contains("2097152       65536    1  dirty"),
        "{bitmap}"
    );
    let depth = direct("qemu:allocation-depth");
    assert!(
        depth.contains("backing depth 2") && depth.contains("local"),
        "{depth}"
    );

    // A filter that moves offsets hides them (they would lie).
    let got = proxied(&["--filter=offset", "offset=512"], "qemu:dirty-bitmap:b0");
    assert!(!got.status.success(), "{got:?}");

    // Listed by nbdinfo; and per-client connections (socket=) pass
    // them too, all three in one block status request.
    let sock = dir.path().join("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args(["-t", "-e", "4", "-k"])
        .arg(&sock)
        .args(&qemu_nbd[1..])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let proxy = Server::ours(&["nbd", &format!("socket={}", sock.display())]);
    let info = run_ok(Command::new("nbdinfo").arg(proxy.uri()));
    assert!(
        info.contains("\t\tbase:allocation\n\t\tqemu:allocation-depth\n\t\tqemu:dirty-bitmap:b0\n"),
        "{info}"
    );
    if require_nbdsh() {
        let out = nbdpy(
            &proxy.uri(),
            "h2 = nbd.NBD()\nh2.add_meta_context('qemu:dirty-bitmap:b0')\n\
             h2.add_meta_context('qemu:allocation-depth')\nh2.add_meta_context('base:allocation')\n\
             h2.connect_uri(sys.argv[1])\nm = {}\n\
             h2.block_status(4 << 20, 0, lambda c, o, e, err: m.__setitem__(c, list(e)))\n\
             print(sorted(m.items()))\n",
        );
        assert_eq!(
            out,
            "[('base:allocation', [1048576, 0, 1048576, 3, 65536, 0, 2031616, 3]), \
             ('qemu:allocation-depth', [1048576, 2, 1048576, 0, 65536, 1, 2031616, 0]), \
             ('qemu:dirty-bitmap:b0', [2097152, 0, 65536, 1, 2031616, 0])]\n"
        );
    }
    drop(proxy);
    let _ = q.kill();
    let _ = q.wait();
}

/// Block status through the proxy asks the server for the one context
/// the proxy's client wants (filtered, where extended headers allow),
/// not for every context the proxy negotiated to pass through.
#[test]
fn plugin_nbd_asks_the_server_for_one_context() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("one.qcow2");
    crate::common::qcow2_create(&img, "", "1M");
    let img = img.to_str().unwrap();
    let prog = format!("command={}", nbdkit().display());
    let map = |eh: &[&str]| {
        let mut c = Command::new(nbdkit());
        c.args(["-U", "-", "nbd", &prog, "arg=-v"]);
        c.args(eh.iter().map(|a| format!("arg={a}")));
        c.args(["arg=--filter=qcow2", "arg=file", &format!("arg={img}")]);
        c.args([
            "--run",
            &format!("{} --map \"$uri\"", our_bin("nbdinfo").display()),
        ]);
        run(&mut c)
    };
    let o = map(&[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "         0     1048576    3  hole,zero\n"
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("NBD_CMD_BLOCK_STATUS flags=0x20"), "{log}");
    assert!(!log.contains("NBD_CMD_BLOCK_STATUS flags=0x0"), "{log}");
    // Without extended headers there is no filtering: plain requests.
    let o = map(&["--no-eh"]);
    assert!(o.status.success(), "{o:?}");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("NBD_CMD_BLOCK_STATUS flags=0x0"), "{log}");
}
