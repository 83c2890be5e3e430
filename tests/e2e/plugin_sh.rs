//! The sh plugin end to end: the man page's inline example from stdin, a
//! RAM-disk script under libnbd's nbdinfo/nbdsh/nbdcopy and qemu-img
//! (also under the cow and blocksize filters), capabilities that fall
//! back as upstream's when the script says "missing", errno names that
//! reach the client, a hung script that holds up only its own request,
//! the handle of `open` in later calls, `$tmpdir`, `magic_config_key` and
//! `--dump-plugin`. Where upstream's `nbdkit sh` can run the same script,
//! both run and their answers are compared.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::{nbdkit, nbdpy, random_file, require, require_nbdsh, run_ok, Server, PYTHON};

/// Write an executable script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Run `PROG -U - ARGS --run CMD` in `dir`, with `stdin` if given.
pub fn captive(prog: &Path, dir: &Path, args: &[&str], cmd: &str, stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut c = Command::new(prog);
    c.current_dir(dir)
        .args(["-U", "-"])
        .args(args)
        .args(["--run", cmd])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Its stdout, which must be a success.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Upstream's nbdkit (with its sh and eval plugins), if installed.
pub fn upstream() -> Option<PathBuf> {
    require(&["nbdkit"]).then(|| PathBuf::from("nbdkit"))
}

/// The `can_*`/`is_*` lines of `nbdinfo --json`, sorted.
pub fn cap_lines(json: &str) -> Vec<String> {
    let mut v: Vec<String> = json
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("\"can_") || l.starts_with("\"is_"))
        .map(|l| l.trim_end_matches(',').to_string())
        .collect();
    v.sort();
    v
}

const MB: usize = 1 << 20;

/// The inline example of nbdkit-sh-plugin(1), unchanged.
const INLINE: &str = r#"  case "$1" in
    get_size) echo 1M ;;
    pread) dd if=/dev/zero count=$3 iflag=count_bytes ;;
    *) exit 2 ;;
  esac
"#;

#[test]
fn sh_man_page_inline_script_from_stdin() {
    if !require(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = "nbdinfo --json $uri > info.json && nbdcopy $uri out.img";
    ok(captive(
        &nbdkit(),
        dir.path(),
        &["sh", "-"],
        cmd,
        Some(INLINE),
    ));
    let info = std::fs::read_to_string(dir.path().join("info.json")).unwrap();
    assert!(info.contains("\"export-size\": 1048576"), "{info}");
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    assert_eq!(
        std::fs::read(dir.path().join("out.img")).unwrap(),
        vec![0u8; MB]
    );
    if let Some(up) = upstream() {
        let dir2 = tempfile::tempdir().unwrap();
        ok(captive(&up, dir2.path(), &["sh", "-"], cmd, Some(INLINE)));
        let theirs = std::fs::read_to_string(dir2.path().join("info.json")).unwrap();
        assert_eq!(cap_lines(&info), cap_lines(&theirs));
    }
}

/// A RAM disk in `$tmpdir/disk` (size from `size=` or the magic word),
/// with a directory per connection as the man page suggests, logging
/// every call to `log`.
fn disk_script(dir: &Path, log: &Path) -> PathBuf {
    let body = r#"#!/bin/bash -
echo "$@" >> LOG
disk=$tmpdir/disk
case "$1" in
  magic_config_key) echo size ;;
  config)
    case "$2" in
      size) echo "$3" > $tmpdir/size ;;
      *) echo "EINVAL unknown parameter $2" >&2; exit 1 ;;
    esac ;;
  config_complete) truncate -s "$(cat $tmpdir/size 2>/dev/null || echo 1M)" $disk ;;
  thread_model) echo parallel ;;
  open) mktemp -d $tmpdir/handle-XXXXXX ;;
  close) rm -rf "$2" ;;
  get_size) stat -L -c %s $disk ;;
  can_write|can_flush|can_trim|can_zero|can_extents|can_multi_conn) exit 0 ;;
  can_fua) echo native ;;
  pread) dd if=$disk skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none ;;
  pwrite)
    dd of=$disk seek=$4 conv=notrunc oflag=seek_bytes status=none || exit 1
    case "$5" in *fua*) sync $disk ;; esac ;;
  flush) sync $disk ;;
  trim|zero) fallocate -p -o $4 -l $3 $disk ;;
  extents) echo "$4 $3" ;;
  *) exit 2 ;;
esac
"#;
    script(
        dir,
        "disk.sh",
        &body.replace("LOG", &log.display().to_string()),
    )
}

/// The calls a script logged, one per line, but `close` (upstream may
/// still be closing the last connection when it unloads).
pub fn calls_but_close(log: &str) -> Vec<String> {
    log.lines()
        .filter(|c| !c.starts_with("close"))
        .map(str::to_string)
        .collect()
}

fn log_calls(log: &Path, method: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').next() == Some(method))
        .map(str::to_string)
        .collect()
}

#[test]
fn sh_ram_disk_under_libnbd_and_qemu() {
    if !require(&["nbdcopy", "nbdinfo", "qemu-img", "qemu-io"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let disk = disk_script(dir.path(), &log);
    // `4M` is `size=4M` through the script's magic_config_key.
    let srv = Server::ours(&["sh", disk.to_str().unwrap(), "4M"]);
    let uri = srv.uri();
    let info = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(info.contains("\"export-size\": 4194304"), "{info}");
    let src = dir.path().join("src.img");
    random_file(&src, 4 * MB, 5);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 1000 3000", &uri]));
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x33 1000 3000", &uri]));
    nbdpy(
        &uri,
        "assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()\n\
         assert h.can_multi_conn() and not h.can_fast_zero()\n\
         h.pwrite(b'A' * 4096, 8192, nbd.CMD_FLAG_FUA)\n\
         h.zero(4096, 12288, nbd.CMD_FLAG_NO_HOLE)\n\
         h.trim(4096, 16384)\n\
         h.flush()\n\
         assert h.pread(4096, 8192) == b'A' * 4096\n\
         assert h.pread(8192, 12288) == bytes(8192)\n\
         e = []\n\
         h.block_status(65536, 0, lambda c, o, x, err: e.extend(x))\n\
         assert e == [65536, 0], e\n",
    );
    let out = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    let mut want = std::fs::read(&src).unwrap();
    want[1000..4000].fill(0x33);
    want[8192..12288].fill(b'A');
    want[12288..20480].fill(0);
    assert!(std::fs::read(&out).unwrap() == want, "data differs");
    // The flag words the methods were given.
    assert!(log_calls(&log, "pwrite")
        .iter()
        .any(|l| l.ends_with(" 4096 8192 fua")));
    assert!(log_calls(&log, "zero")
        .iter()
        .any(|l| l.ends_with(" 4096 12288 ")));
    assert!(log_calls(&log, "extents")
        .iter()
        .any(|l| l.ends_with(" 65536 0 ")));
    // Every connection got its own handle directory, and each was
    // closed with it.
    drop(srv);
    let opens = log_calls(&log, "get_size");
    let closes = log_calls(&log, "close");
    assert!(!opens.is_empty());
    assert_eq!(opens.len(), closes.len());
    assert!(closes.iter().all(|c| c.contains("/handle-")), "{closes:?}");
}

#[test]
fn sh_under_cow_and_blocksize_filters() {
    if !require(&["nbdcopy"]) || !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let disk = disk_script(dir.path(), &log);
    let d = disk.to_str().unwrap();
    // cow: writes stay in the overlay, the script never sees them.
    let srv = Server::ours(&["--filter=cow", "sh", d, "size=1M"]);
    nbdpy(
        &srv.uri(),
        "h.pwrite(b'z' * 1000, 5)\nassert h.pread(1010, 0) == bytes(5) + b'z' * 1000 + bytes(5)\n",
    );
    drop(srv);
    assert!(log_calls(&log, "pwrite").is_empty());
    assert!(!log_calls(&log, "pread").is_empty());
    // blocksize: an unaligned write reaches the script as whole blocks.
    std::fs::remove_file(&log).unwrap();
    let srv = Server::ours(&["--filter=blocksize", "sh", d, "size=1M", "minblock=4096"]);
    nbdpy(
        &srv.uri(),
        "h.pwrite(b'q' * 10, 4100)\nassert h.pread(20, 4095) == bytes(5) + b'q' * 10 + bytes(5)\n",
    );
    drop(srv);
    let writes = log_calls(&log, "pwrite");
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|w| w.contains(" 4096 4096 ")),
        "{writes:?}"
    );
}

/// Answers each method as `$CAPS` says (`method=code[:stdout]` words),
/// else a read-only disk of zeroes with writes accepted.
const CAPS_SCRIPT: &str = r#"#!/bin/bash
for kv in CAPS; do
  k="${kv%%=*}"; v="${kv#*=}"
  if [ "$k" = "$1" ]; then
    code="${v%%:*}"
    [ "$v" != "$code" ] && echo "${v#*:}"
    exit "$code"
  fi
done
case "$1" in
  get_size) echo 1M ;;
  pread) head -c $3 /dev/zero ;;
  pwrite) cat >/dev/null ;;
  *) exit 2 ;;
esac
"#;

#[test]
fn sh_missing_capabilities_fall_back_as_upstream() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let Some(up) = upstream() else { return };
    // (answers, what ours must advertise beyond the comparison)
    let cases: &[(&str, &[&str])] = &[
        ("", &["\"is_read_only\": true", "\"can_zero\": false"]),
        // can_zero missing: zero emulated by writes, and fast zero fails fast.
        (
            "can_write=0",
            &[
                "\"can_zero\": true",
                "\"can_fast_zero\": true",
                "\"can_fua\": false",
            ],
        ),
        // can_fua missing with flush: emulated.
        ("can_write=0 can_flush=0", &["\"can_fua\": true"]),
        ("can_write=0 can_zero=0", &["\"can_fast_zero\": false"]),
        ("can_write=0 can_zero=3", &["\"can_zero\": true"]),
        // No zero and no fast zero: zero by writes, no fast zero offered.
        (
            "can_write=0 can_zero=3 can_fast_zero=3",
            &["\"can_zero\": true", "\"can_fast_zero\": false"],
        ),
        ("can_write=0 can_fua=0:native", &["\"can_fua\": true"]),
        ("can_write=0 can_fua=0:emulate", &["\"can_fua\": true"]),
        (
            "can_write=0 can_trim=0 can_fast_zero=3",
            &["\"can_trim\": true"],
        ),
        (
            "can_cache=0:emulate can_multi_conn=0 is_rotational=0",
            &["\"can_cache\": true"],
        ),
        ("can_cache=0:none can_extents=0", &["\"can_cache\": false"]),
        (
            "can_trim=0 can_flush=3",
            &["\"can_trim\": false", "\"can_flush\": false"],
        ),
    ];
    for (caps, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let s = script(dir.path(), "caps.sh", &CAPS_SCRIPT.replace("CAPS", caps));
        let args = ["sh", s.to_str().unwrap()];
        let cmd = "nbdinfo --json $uri";
        let ours = ok(captive(&nbdkit(), dir.path(), &args, cmd, None));
        let theirs = ok(captive(&up, dir.path(), &args, cmd, None));
        assert_eq!(cap_lines(&ours), cap_lines(&theirs), "{caps}");
        for w in *want {
            assert!(ours.contains(w), "{caps}: {w} in {ours}");
        }
    }
}

#[test]
fn sh_missing_data_methods_fall_back_as_upstream() {
    if !require_nbdsh() {
        return;
    }
    let Some(up) = upstream() else { return };
    let dir = tempfile::tempdir().unwrap();
    let caps = "can_write=0 can_flush=0 can_trim=0 can_zero=0 can_fast_zero=0 can_extents=0 \
                can_cache=0:native can_fua=0:native";
    let s = script(dir.path(), "caps.sh", &CAPS_SCRIPT.replace("CAPS", caps));
    // Each request's outcome: flush, trim and cache missing succeed, a
    // missing zero falls back to pwrite (and a fast one fails at once),
    // missing extents is an error.
    let py = r#"import nbd, sys
h = nbd.NBD()
h.add_meta_context('base:allocation')
h.connect_uri(sys.argv[1])
ops = [('pwrite', lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)),
       ('flush', h.flush),
       ('zero', lambda: h.zero(512, 0)),
       ('fast', lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)),
       ('trim', lambda: h.trim(512, 0)),
       ('cache', lambda: h.cache(512, 0)),
       ('extents', lambda: h.block_status(4096, 0, lambda *a: 0))]
for name, f in ops:
    try:
        f()
        print(name, 'ok')
    except nbd.Error as e:
        print(name, e.errno)
"#;
    std::fs::write(dir.path().join("ops.py"), py).unwrap();
    let args = ["sh", s.to_str().unwrap()];
    let cmd = format!("{PYTHON} ops.py $uri");
    let ours = ok(captive(&nbdkit(), dir.path(), &args, &cmd, None));
    assert_eq!(
        ours,
        "pwrite ok\nflush ok\nzero ok\nfast ENOTSUP\ntrim ok\ncache ok\nextents EIO\n"
    );
    assert_eq!(ours, ok(captive(&up, dir.path(), &args, &cmd, None)));
}

#[test]
fn sh_errno_names_reach_the_client() {
    if !require_nbdsh() {
        return;
    }
    let up = upstream();
    let dir = tempfile::tempdir().unwrap();
    let s = script(
        dir.path(),
        "err.sh",
        "#!/bin/sh\ncase \"$1\" in\n  get_size) echo 1M ;;\n  thread_model) echo parallel ;;\n  \
         pread) printf '%b' \"$(cat ./msg)\" >&2; exit 1 ;;\n  *) exit 2 ;;\nesac\n",
    );
    std::fs::write(
        dir.path().join("rd.py"),
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         try:\n  h.pread(512, 0); print('ok')\nexcept nbd.Error as e:\n  print(e.errno)\n",
    )
    .unwrap();
    let args = ["sh", s.to_str().unwrap()];
    let cmd = format!("{PYTHON} rd.py $uri");
    for (msg, want) in [
        ("EPERM", "EPERM"),
        ("ENOSPC Out of space", "ENOSPC"),
        ("eio lower case", "EIO"),
        ("EINVAL\\tafter a tab", "EINVAL"),
        ("ENOMEM", "ENOMEM"),
        ("ESHUTDOWN going", "ESHUTDOWN"),
        ("EROFS read-only", "EPERM"),
        ("EDQUOT quota", "ENOSPC"),
        ("EFBIG too big", "ENOSPC"),
        // Not a fast zero: EINVAL on the wire, as nbdkit sends it.
        ("ENOTSUP no", "EINVAL"),
        ("EACCES unknown name", "EIO"),
        ("ENOSPCX run-on", "EIO"),
        ("  ENOSPC leading blanks", "EIO"),
        ("", "EIO"),
    ] {
        std::fs::write(dir.path().join("msg"), msg).unwrap();
        let out = captive(&nbdkit(), dir.path(), &args, &cmd, None);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(ok(out).trim(), want, "{msg:?}");
        // The message goes to the server's log, after the script's path.
        if let Some(rest) = msg.split_once(' ').map(|(_, r)| r) {
            assert!(stderr.contains(rest), "{msg:?}: {stderr}");
        }
        if let Some(up) = &up {
            let theirs = ok(captive(up, dir.path(), &args, &cmd, None));
            assert_eq!(theirs.trim(), want, "upstream: {msg:?}");
        }
    }
}

/// A script whose read at offset 0 waits until the file `release`
/// exists; other reads answer at once.
fn hanging_script(dir: &Path, model: &str) -> PathBuf {
    let body = r#"#!/bin/sh
case "$1" in
  thread_model) echo MODEL ;;
  get_size) echo 1M ;;
  pread)
    if [ "$4" = 0 ]; then
      touch DIR/started
      i=0
      while [ ! -e DIR/release ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
    fi
    head -c $3 /dev/zero ;;
  *) exit 2 ;;
esac
"#;
    let body = body
        .replace("MODEL", model)
        .replace("DIR", &dir.display().to_string());
    script(dir, "hang.sh", &body)
}

/// With the read at 0 hung: does a read on another connection, then one
/// on the same connection, complete before it is released? Prints
/// `other same`, each `done` or `waits`.
const HANG_PY: &str = r#"import nbd, sys, time, pathlib
u, release = sys.argv[1], pathlib.Path(sys.argv[2])
h1 = nbd.NBD(); h1.connect_uri(u)
h2 = nbd.NBD(); h2.connect_uri(u)
hung = h1.aio_pread(nbd.Buffer(512), 0)
started = release.with_name("started")
while not started.exists():
    h1.poll(10)
def done_soon(h, c):
    t = time.time()
    while time.time() - t < 1.0:
        h.poll(100)
        if h.aio_command_completed(c):
            return "done"
    return "waits"
other = done_soon(h2, h2.aio_pread(nbd.Buffer(512), 4096))
same = done_soon(h1, h1.aio_pread(nbd.Buffer(512), 8192))
assert not h1.aio_command_completed(hung)
release.touch()
while not h1.aio_command_completed(hung):
    h1.poll(-1)
print(other, same)
"#;

#[test]
fn sh_hung_script_holds_up_only_its_request() {
    if !require_nbdsh() {
        return;
    }
    for (model, want) in [
        ("parallel", "done done"),
        ("serialize_requests", "done waits"),
        // The default: one script at a time, over all connections.
        ("serialize_all_requests", "waits waits"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hang.py"), HANG_PY).unwrap();
        let s = hanging_script(dir.path(), model);
        let cmd = format!("{PYTHON} hang.py $uri {}/release", dir.path().display());
        let out = ok(captive(
            &nbdkit(),
            dir.path(),
            &["sh", s.to_str().unwrap()],
            &cmd,
            None,
        ));
        assert_eq!(out.trim(), want, "{model}");
    }
}

#[test]
fn sh_handle_tmpdir_and_call_order_as_upstream() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let run = |prog: &Path| {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let body = r#"#!/bin/sh
echo "$@" >> LOG
case "$1" in
  load) echo "$tmpdir" > TMP; touch "$tmpdir/state" ;;
  open) echo "h-$3" ;;
  default_export) echo dflt ;;
  get_size) [ -e "$tmpdir/state" ] && echo 64K ;;
  pread) head -c $3 /dev/zero ;;
  export_description) echo "disk of $2" ;;
  *) exit 2 ;;
esac
"#;
        let body = body
            .replace("LOG", &log.display().to_string())
            .replace("TMP", &dir.path().join("tmpdir").display().to_string());
        let s = script(dir.path(), "s.sh", &body);
        // $tmpdir exists while the server runs.
        let cmd = "test -f \"$(cat tmpdir)/state\" && nbdinfo --json $uri";
        let info = ok(captive(
            prog,
            dir.path(),
            &["sh", s.to_str().unwrap()],
            cmd,
            None,
        ));
        let tmpdir = std::fs::read_to_string(dir.path().join("tmpdir")).unwrap();
        // ... and is gone after it exits.
        assert!(!Path::new(tmpdir.trim()).exists(), "{tmpdir} left behind");
        let log = std::fs::read_to_string(&log).unwrap();
        (info, log)
    };
    let (info, log) = run(&nbdkit());
    assert!(info.contains("\"export-name\": \"dflt\""), "{info}");
    assert!(
        info.contains("\"description\": \"disk of h-dflt\""),
        "{info}"
    );
    assert!(log.contains("\nopen false dflt false\n"), "{log}");
    assert!(log.contains("\npread h-dflt "), "{log}");
    assert!(log.contains("\nclose h-dflt\n"), "{log}");
    assert!(log.ends_with("\nunload\n"), "{log}");
    if let Some(up) = upstream() {
        let (theirs, their_log) = run(&up);
        assert_eq!(cap_lines(&info), cap_lines(&theirs));
        // The same calls in the same order (upstream may still be
        // closing the last connection when it unloads: leave close out).
        assert_eq!(calls_but_close(&log), calls_but_close(&their_log));
    }
}

#[test]
fn sh_config_magic_key_and_dump_plugin_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let body = format!(
        "#!/bin/sh\necho \"$@\" >> {}\ncase \"$1\" in\n  magic_config_key) echo file ;;\n  \
         config) ;;\n  thread_model) echo serialize_requests ;;\n  \
         dump_plugin) echo 'foo=bar'; echo 'a raw line' ;;\n  *) exit 2 ;;\nesac\n",
        log.display()
    );
    let s = script(dir.path(), "s.sh", &body);
    let s = s.to_str().unwrap();
    let dump = |prog: &Path| {
        let _ = std::fs::remove_file(&log);
        let out = run_ok(Command::new(prog).args(["sh", s, "a=b", "c", "d", "--dump-plugin"]));
        (out, std::fs::read_to_string(&log).unwrap())
    };
    let (out, calls) = dump(&nbdkit());
    assert_eq!(
        calls,
        "load\nmagic_config_key\nconfig a b\nconfig file c\nconfig file d\nthread_model\ndump_plugin\nunload\n"
    );
    assert!(out.contains("\nthread_model=serialize_requests\n"), "{out}");
    assert!(
        out.ends_with("\nmax_known_status=3\nfoo=bar\na raw line\n"),
        "{out}"
    );
    if let Some(up) = upstream() {
        let (theirs, their_calls) = dump(&up);
        assert_eq!(calls, their_calls);
        assert!(theirs.ends_with("\nmax_known_status=3\nfoo=bar\na raw line\n"));
    }
    // Without a magic key a bare word is an error; so is a parameter the
    // script's config does not take, and a missing config method.
    let no_magic = script(
        dir.path(),
        "n.sh",
        "#!/bin/sh\ncase \"$1\" in config) [ \"$2\" = ok ] || { echo EINVAL bad key \"$2\" >&2; exit 1; } ;; *) exit 2 ;; esac\n",
    );
    let n = no_magic.to_str().unwrap();
    let no_config = script(dir.path(), "m.sh", "#!/bin/sh\nexit 2\n");
    let m = no_config.to_str().unwrap();
    for (args, want) in [
        (
            vec!["sh", n, "ok=1", "word"],
            "expecting key=value on the command line but got: word",
        ),
        (vec!["sh", n, "x=1"], "bad key x"),
        (
            vec!["sh", m, "x=1"],
            "this plugin does not need command line configuration",
        ),
        (
            vec!["sh", "x=1", n],
            "the first parameter must be script=/path/to/script",
        ),
        (vec!["sh"], "missing script parameter"),
    ] {
        let out = Command::new(nbdkit())
            .args(&args)
            .args(["-U", "-", "--run", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn sh_list_exports_as_upstream() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for f in ["a.img", "b.img"] {
        std::fs::write(dir.path().join(f), b"").unwrap();
    }
    // The man page's NAMES+DESCRIPTIONS example, over a fixed directory.
    let s = script(
        dir.path(),
        "list.sh",
        &format!(
            "#!/bin/sh\ncd {}\ncase \"$1\" in\n  list_exports) echo NAMES+DESCRIPTIONS; ls *.img; ls *.img | sed 's/^/file /' ;;\n  \
             get_size) echo 1M ;;\n  pread) head -c $3 /dev/zero ;;\n  *) exit 2 ;;\nesac\n",
            dir.path().display()
        ),
    );
    let args = ["sh", s.to_str().unwrap()];
    let cmd = "nbdinfo --list --json $uri";
    let ours = ok(captive(&nbdkit(), dir.path(), &args, cmd, None));
    let names = |json: &str| -> Vec<String> {
        json.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("\"export-name\"") || l.starts_with("\"description\""))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        names(&ours),
        [
            "\"export-name\": \"a.img\",",
            "\"description\": \"file a.img\",",
            "\"export-name\": \"b.img\",",
            "\"description\": \"file b.img\","
        ]
    );
    if let Some(up) = upstream() {
        assert_eq!(
            names(&ours),
            names(&ok(captive(&up, dir.path(), &args, cmd, None)))
        );
    }
}

#[test]
fn sh_serialize_connections_one_at_a_time() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = hanging_script(dir.path(), "serialize_connections");
    // A second connection's handshake waits for the first to close.
    let py = r#"import nbd, sys, time, threading
u = sys.argv[1]
h1 = nbd.NBD(); h1.connect_uri(u)
done = []
def second():
    h2 = nbd.NBD(); h2.connect_uri(u); h2.pread(512, 4096); done.append(1)
t = threading.Thread(target=second); t.start()
t.join(1.0)
before = bool(done)
h1.shutdown()
t.join(30)
print(before, bool(done))
"#;
    std::fs::write(dir.path().join("sc.py"), py).unwrap();
    let cmd = format!("{PYTHON} sc.py $uri");
    let out = ok(captive(
        &nbdkit(),
        dir.path(),
        &["sh", s.to_str().unwrap()],
        &cmd,
        None,
    ));
    assert_eq!(out.trim(), "False True");
}
