//! The ondemand plugin against upstream's, each over its own exports
//! directory: ext4 filesystems made with a label on first use, kept over
//! reconnections and restarts, locked while in use (refused, or waited
//! for with `wait=true`), invalid names refused, the export list,
//! `command=` with variables, and the offset filter on top.

use std::path::Path;
use std::process::Command;

use crate::common::*;

const SCRIPT: &str = r#"
def conn(name, ro=False):
    g = nbd.NBD()
    g.set_export_name(name)
    if ro:
        g.set_handshake_flags(0)
    g.connect_unix(sys.argv[1].split("socket=")[1])
    return g
def tryconn(name):
    try:
        conn(name); return "ok"
    except nbd.Error as e:
        return "refused"
a = conn("fs1")
sb = bytes(a.pread(1024, 1024))
print(a.get_size(), a.is_read_only(), a.can_flush(), a.can_fua(), a.can_trim(),
      a.can_zero(), a.can_multi_conn(), a.can_cache(), sb[56:58], sb[120:128])
a.pwrite(b"kept", 0, nbd.CMD_FLAG_FUA)
print("second client:", tryconn("fs1"))
a.shutdown()
b = conn("fs1")
print("after reconnect:", bytes(b.pread(4, 0)))
b.shutdown()
for n in ["b.c", "x/y", "p:q", "x" * 256]:
    print(n[:5], tryconn(n))
print("empty name:", tryconn(""))
"#;

fn both(args: &[&str]) -> Option<(String, tempfile::TempDir, tempfile::TempDir)> {
    if !require(&["nbdkit", "nbdinfo", "mkfs.ext4"]) || !require_nbdsh() {
        return None;
    }
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with = |d: &Path| {
        let mut v = vec!["ondemand".to_string(), format!("dir={}", d.display())];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let (aa, ab) = (with(da.path()), with(db.path()));
    let aa: Vec<&str> = aa.iter().map(|s| s.as_str()).collect();
    let ab: Vec<&str> = ab.iter().map(|s| s.as_str()).collect();
    let theirs = nbdpy(&Server::upstream(&aa).uri(), SCRIPT);
    let ours = nbdpy(&Server::ours(&ab).uri(), SCRIPT);
    assert_eq!(ours, theirs, "ours (left) and upstream (right) differ");
    Some((ours, da, db))
}

fn list(s: &Server) -> Vec<String> {
    let out = run_ok(Command::new("nbdinfo").arg("--list").arg(s.uri()));
    out.lines()
        .filter_map(|l| l.strip_prefix("export=\""))
        .map(|l| l.trim_end_matches("\":").to_string())
        .collect()
}

#[test]
fn plugin_ondemand_as_upstream() {
    let Some((out, da, db)) = both(&["8M", "label=SCRATCH"]) else {
        return;
    };
    assert!(
        out.starts_with(
            "8388608 False True True True True False False b'S\\xef' b'SCRATCH\\x00'\n"
        ),
        "{out}"
    );
    assert!(out.contains("second client: refused\n"), "{out}");
    assert!(out.contains("after reconnect: b'kept'\n"), "{out}");
    assert!(
        out.contains("b.c refused\nx/y refused\np:q refused\nxxxxx refused\n"),
        "{out}"
    );
    // The prelude's `h` holds the default export: locked.
    assert!(out.contains("empty name: refused\n"), "{out}");
    for d in [da.path(), db.path()] {
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["default", "fs1"]);
        assert_eq!(std::fs::metadata(d.join("fs1")).unwrap().len(), 8 << 20);
    }
    // A new server over the same directory: the filesystems are still
    // there, in the list, with their data.
    let d = format!("dir={}", db.path().display());
    let s = Server::ours(&["ondemand", &d, "8M"]);
    assert_eq!(list(&s), ["default", "fs1"]);
    let out = nbdpy(&s.uri_export("fs1"), "print(bytes(h.pread(4, 0)))\n");
    assert_eq!(out, "b'kept'\n");
    let _ = da;
}

#[test]
fn plugin_ondemand_wait_and_command() {
    if !require_nbdsh() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = format!("dir={}", d.path().display());
    let s = Server::ours(&[
        "ondemand",
        &dir,
        "size=4096",
        "wait=true",
        r#"command=truncate -s $((size * 2)) "$disk"; printf '%s' "$greeting" | dd of="$disk" conv=notrunc 2>/dev/null"#,
        "greeting=hi there",
    ]);
    let script = r#"
import threading, time
print(h.get_size(), bytes(h.pread(8, 0)))
got = []
def second():
    g = nbd.NBD()
    g.set_export_name("")
    g.connect_uri(sys.argv[1])
    got.append(g.get_size())
t = threading.Thread(target=second)
t.start()
time.sleep(1)
print("waiting:", t.is_alive())
h.shutdown()
t.join(10)
print("then:", got)
"#;
    let out = nbdpy(&s.uri(), script);
    assert_eq!(out, "8192 b'hi there'\nwaiting: True\nthen: [8192]\n");
}

#[test]
fn plugin_ondemand_under_the_offset_filter() {
    if !require(&["mkfs.ext4"]) || !require_nbdsh() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = format!("dir={}", d.path().display());
    let s = Server::ours(&["--filter=offset", "ondemand", &dir, "4M", "offset=1024"]);
    let out = nbdpy(
        &s.uri_export("disk1"),
        "print(h.get_size(), bytes(h.pread(2, 56)))\n",
    );
    assert_eq!(out, "4193280 b'S\\xef'\n");
    for (args, msg) in [
        (vec![dir.as_str()], "dir and size parameters are required"),
        (vec!["dir=/nonexistent/x", "1M"], "realpath"),
        (vec![dir.as_str(), "1M", "disk=x"], "'disk' parameter"),
    ] {
        let out = run(Command::new(nbdkit())
            .arg("ondemand")
            .args(&args)
            .args(["--run", "true"]));
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
