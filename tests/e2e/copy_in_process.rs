//! nbdcopy serving a captive `[ nbdkit ... ]` of ours inside its own
//! process (tools/src/nbdcopy/inprocess.rs): when it is used, and that
//! what the copy writes and reports is what the spawned server gives.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{nbdkit, p, random_file, require, run};
use crate::copy_common::nbdcopy;

/// An eval plugin export of `size` zero bytes whose `get_size` writes
/// the pid of the process hosting the plugin (its script's parent) to
/// `pidfile`.
fn revealing(pidfile: &Path, size: u64) -> Vec<String> {
    vec![
        "eval".into(),
        format!("get_size=echo $PPID > {}; echo {size}", p(pidfile)),
        "pread=head -c $3 /dev/zero".into(),
    ]
}

/// Run nbdcopy; returns its pid and output.
fn copy(cmd: &mut Command) -> (u32, Output) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "nbdcopy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn host_pid(pidfile: &Path) -> u32 {
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn copy_in_process_only_for_our_nbdkit_with_plain_options() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let out = dir.path().join("out.raw");
    let src = revealing(&pidfile, 65536);

    // Our nbdkit by path: served inside nbdcopy.
    let (pid, o) = copy(
        nbdcopy()
            .args(["--", "["])
            .arg(nbdkit())
            .args(&src)
            .arg("]")
            .arg(&out),
    );
    ok(&o);
    assert_eq!(host_pid(&pidfile), pid, "not served in-process");
    assert_eq!(std::fs::read(&out).unwrap(), vec![0u8; 65536]);

    // By name, found on $PATH next to nbdcopy: the same.
    let bin = nbdkit().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let (pid, o) = copy(
        nbdcopy()
            .env("PATH", &path)
            .args(["--", "[", "nbdkit"])
            .args(&src)
            .arg("]")
            .arg("null:"),
    );
    ok(&o);
    assert_eq!(host_pid(&pidfile), pid, "not served in-process via $PATH");

    // Options beyond the stack's own, or the opt-out: spawned.
    let (pid, o) = copy(
        nbdcopy()
            .args(["--", "["])
            .arg(nbdkit())
            .arg("-v")
            .args(&src)
            .arg("]")
            .arg("null:"),
    );
    ok(&o);
    assert_ne!(host_pid(&pidfile), pid, "-v must spawn the server");
    assert!(String::from_utf8_lossy(&o.stderr).contains("nbdkit: debug:"));
    let (pid, o) = copy(
        nbdcopy()
            .env("NBDCOPY_SPAWN_CAPTIVE", "1")
            .args(["--", "["])
            .arg(nbdkit())
            .args(&src)
            .arg("]")
            .arg("null:"),
    );
    ok(&o);
    assert_ne!(host_pid(&pidfile), pid, "$NBDCOPY_SPAWN_CAPTIVE ignored");
}

#[test]
fn copy_in_process_errors_as_the_spawned_server() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    random_file(&src, 1 << 20, 3);
    // The captive server's arguments, and what stderr must say.
    let cases: [(&[&str], &[&str]); 5] = [
        // A bad parameter: nbdkit's message, and nbdcopy fails.
        (&["memory", "size=bogus"], &["nbdkit: error:", "bogus"]),
        // The plugin refuses the connection.
        (
            &[
                "eval",
                "open=echo no entry today >&2; exit 1",
                "get_size=echo 1048576",
                "pwrite=exit 0",
            ],
            &["eval[1]: error:", "no entry today"],
        ),
        // A read-only destination (-r).
        (&["-r", "memory", "1M"], &["read-only"]),
        // A destination too small.
        (&["memory", "512K"], &["smaller"]),
        // A write the plugin fails: the copy fails, naming the offset.
        (
            &[
                "--filter=error",
                "memory",
                "1M",
                "error-pwrite-rate=1",
                "error-pwrite=ENOSPC",
            ],
            &["write at offset", "No space left on device"],
        ),
    ];
    for spawn in [false, true] {
        for (args, says) in cases {
            let mut c = nbdcopy();
            if spawn {
                c.env("NBDCOPY_SPAWN_CAPTIVE", "1");
            }
            let o = run(c.arg(&src).arg("[").arg(nbdkit()).args(args).arg("]"));
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "spawn={spawn} {args:?}: {err}");
            for s in says {
                assert!(err.contains(s), "spawn={spawn} {args:?}: {err}");
            }
        }
    }
}

/// A destination that refuses unaligned requests (4K minimum block
/// size, blocksize-policy's `error`): the odd tail and the unaligned
/// zero run are written by read-modify-write, and the bytes around
/// them stay as they were.
#[test]
fn copy_in_process_aligns_to_the_minimum_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let len = (1 << 20) + 5000;
    random_file(&src, len, 11);
    let mut data = std::fs::read(&src).unwrap();
    data[300_001..700_003].fill(0);
    std::fs::write(&src, &data).unwrap();
    let out = dir.path().join("out.raw");
    for spawn in [false, true] {
        std::fs::write(&out, vec![0xeeu8; 2 << 20]).unwrap();
        let mut c = nbdcopy();
        if spawn {
            c.env("NBDCOPY_SPAWN_CAPTIVE", "1");
        }
        let o = run(c
            .arg(&src)
            .arg("[")
            .arg(nbdkit())
            .arg("--filter=blocksize-policy")
            .arg("file")
            .arg(&out)
            .args([
                "blocksize-minimum=4096",
                "blocksize-preferred=65536",
                "blocksize-error-policy=error",
                "]",
            ]));
        ok(&o);
        let got = std::fs::read(&out).unwrap();
        assert!(got[..len] == data[..], "spawn={spawn}: data differs");
        assert!(
            got[len..].iter().all(|&b| b == 0xee),
            "spawn={spawn}: bytes past the source changed"
        );
    }
}

/// The headline's destination, in-process: a fresh qcow2 made by the
/// filter, checked by qemu-img; the source's extents are used in
/// process too (an in-process source).
#[test]
fn copy_in_process_into_a_new_qcow2() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    random_file(&src, 3 << 20, 5);
    let mut data = std::fs::read(&src).unwrap();
    data[(1 << 20)..(2 << 20)].fill(0);
    data.resize(8 << 20, 0);
    std::fs::write(&src, &data).unwrap();
    let q = dir.path().join("out.qcow2");
    let o = run(nbdcopy()
        .args(["--", "["])
        .arg(nbdkit())
        .arg("file")
        .arg(&src)
        .args(["]", "["])
        .arg(nbdkit())
        .arg("--filter=qcow2")
        .arg("file")
        .arg(&q)
        .args(["create=true", "size=8M", "]"]));
    ok(&o);
    let c =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2", p(&src), p(&q)]));
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    let c = run(Command::new("qemu-img").args(["check", p(&q)]));
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    // Zeroes were not written as data: 2 MiB of data clusters at most.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", p(&q)]));
    let text = String::from_utf8_lossy(&map.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let data_bytes: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data_bytes <= 2 << 20, "{data_bytes} bytes of data clusters");
}

/// `SIGINT` in the middle of a copy into an in-process qcow2: nbdcopy
/// exits with 130 once the image is closed as a spawned server closes
/// on the `SIGTERM` nbdcopy sends it: the image's persistent bitmap,
/// marked in use while the copy writes, is written back (no longer in
/// use), `qemu-img check` finds no leaks, and the stats filter (which
/// writes its totals at unload) has run.
#[test]
fn copy_in_process_closes_cleanly_on_sigint() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("out.qcow2");
    let stats = dir.path().join("stats");
    crate::common::qcow2_create(&q, "", "256M");
    crate::common::qemu_img(&["bitmap", "--add", p(&q), "b0"]);
    let child = nbdcopy()
        .args(["--", "["])
        .arg(nbdkit())
        .args(["--filter=delay", "pattern", "256M", "rdelay=40ms", "]", "["])
        .arg(nbdkit())
        .args(["--filter=stats", "--filter=qcow2", "file"])
        .arg(&q)
        .arg(format!("statsfile={}", p(&stats)))
        .arg("]")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let the copy get going: clusters allocated past the fresh image.
    let t = std::time::Instant::now();
    let fresh = std::fs::metadata(&q).map_or(0, |m| m.len());
    while std::fs::metadata(&q).map_or(0, |m| m.len()) <= fresh.max(1 << 20) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the copy did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let totals = std::fs::read_to_string(&stats).unwrap_or_default();
    assert!(
        totals.contains("write:"),
        "the layers were not unloaded: {totals:?}"
    );
    let info = crate::common::qemu_img(&["info", "--output=json", p(&q)]);
    assert!(
        info.contains("\"b0\"") && !info.contains("in-use"),
        "the bitmap was not written back: {info}"
    );
    let c = run(Command::new("qemu-img").args(["check", p(&q)]));
    assert!(
        c.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&c.stdout),
        String::from_utf8_lossy(&c.stderr)
    );
}

/// Extents are used in-process when the spawned server would offer
/// `base:allocation`, and not under `--no-mc` or `--no-sr` (nbdcopy -v
/// says which).
#[test]
fn copy_in_process_extents_as_the_server_offers_them() {
    for spawn in [false, true] {
        for (opt, want) in [
            (None, "extents=true"),
            (Some("--no-mc"), "extents=false"),
            (Some("--no-sr"), "extents=false"),
        ] {
            let mut c = nbdcopy();
            if spawn {
                c.env("NBDCOPY_SPAWN_CAPTIVE", "1");
            }
            c.args(["-v", "--", "["]).arg(nbdkit());
            if let Some(o) = opt {
                c.arg(o);
            }
            let o = run(c.args(["memory", "1M", "]", "null:"]));
            ok(&o);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains(want), "spawn={spawn} {opt:?}: {err}");
        }
    }
}
