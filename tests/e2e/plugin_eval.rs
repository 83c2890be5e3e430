//! The eval plugin end to end: both examples of nbdkit-eval-plugin(1)
//! unchanged (a 64M disk of zeroes; a file served with `dd`, written by
//! qemu-io and nbdcopy), the `can_*` answers inferred from the methods
//! given, `missing=`, `unload=`, `$tmpdir` and configuration errors,
//! compared with upstream's `nbdkit eval` where it can run the same.

use std::path::Path;
use std::process::Command;

use crate::common::{nbdkit, random_file, require, require_nbdsh, run_ok, PYTHON};
use crate::plugin_sh::{calls_but_close, cap_lines, captive, ok, upstream};

const MB: usize = 1 << 20;

#[test]
fn eval_man_page_disk_of_zeroes() {
    if !require(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "eval",
        "get_size= echo 64M ",
        "pread= dd if=/dev/zero count=$3 iflag=count_bytes ",
    ];
    let cmd = "nbdinfo --json $uri && nbdcopy $uri - | cmp -s - /dev/zero -n 67108864";
    let info = ok(captive(&nbdkit(), dir.path(), &args, cmd, None));
    assert!(info.contains("\"export-size\": 67108864"), "{info}");
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    if let Some(up) = upstream() {
        let theirs = ok(captive(&up, dir.path(), &args, cmd, None));
        assert_eq!(cap_lines(&info), cap_lines(&theirs));
    }
}

/// The man page's file example, word for word.
const FILE_EXAMPLE: [&str; 6] = [
    "eval",
    "config=ln -sf \"$(realpath \"$3\")\" $tmpdir/file",
    "get_size=stat -Lc %s $tmpdir/file",
    "pread=dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes",
    "pwrite=dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes",
    "file=disk.img",
];

#[test]
fn eval_man_page_file_example_under_qemu_and_nbdcopy() {
    if !require(&["qemu-io", "qemu-img", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 2 * MB, 21);
    let src = dir.path().join("src.img");
    random_file(&src, MB, 22);
    // Writable because pwrite is given (can_write inferred); FUA and
    // flush are not, as there is no flush.
    let cmd = "nbdinfo --json $uri > info.json && \
               nbdcopy src.img \"$uri\" && \
               qemu-io -f raw -c 'write -P 0x5a 1049576 5000' \"$uri\" && \
               qemu-img compare -f raw -F raw disk.img \"$uri\"";
    ok(captive(&nbdkit(), dir.path(), &FILE_EXAMPLE, cmd, None));
    let info = std::fs::read_to_string(dir.path().join("info.json")).unwrap();
    assert!(info.contains("\"is_read_only\": false"), "{info}");
    assert!(info.contains("\"can_flush\": false"), "{info}");
    assert!(info.contains("\"can_zero\": true"), "{info}");
    // The writes went to the file itself.
    let got = std::fs::read(&disk).unwrap();
    assert_eq!(got.len(), 2 * MB);
    assert!(
        got[..MB] == std::fs::read(&src).unwrap()[..],
        "nbdcopy's data"
    );
    assert!(
        got[MB + 1000..MB + 6000].iter().all(|&b| b == 0x5a),
        "qemu-io's data"
    );
    if let Some(up) = upstream() {
        let dir2 = tempfile::tempdir().unwrap();
        random_file(&dir2.path().join("disk.img"), 2 * MB, 21);
        let cmd = "nbdinfo --json $uri > info.json";
        ok(captive(&up, dir2.path(), &FILE_EXAMPLE, cmd, None));
        let theirs = std::fs::read_to_string(dir2.path().join("info.json")).unwrap();
        assert_eq!(cap_lines(&info), cap_lines(&theirs));
    }
}

#[test]
fn eval_infers_capabilities_as_upstream() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let base = ["eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero"];
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &["\"is_read_only\": true"]),
        (
            &["pwrite=cat >/dev/null"],
            &["\"is_read_only\": false", "\"can_flush\": false"],
        ),
        (
            &["pwrite=cat >/dev/null", "flush=true"],
            &["\"can_flush\": true", "\"can_fua\": true"],
        ),
        (
            &[
                "pwrite=cat >/dev/null",
                "trim=true",
                "zero=true",
                "extents=echo 0 1M",
                "cache=true",
            ],
            &[
                "\"can_trim\": true",
                "\"can_fast_zero\": false",
                "\"can_cache\": true",
            ],
        ),
        (
            &["pwrite=cat >/dev/null", "can_write=exit 3"],
            &["\"is_read_only\": true"],
        ),
        (
            &["can_multi_conn=exit 0", "is_rotational=exit 0"],
            &["\"can_multi_conn\": true"],
        ),
    ];
    for (extra, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let cmd = "nbdinfo --json $uri";
        let ours = ok(captive(&nbdkit(), dir.path(), &args, cmd, None));
        for w in *want {
            assert!(ours.contains(w), "{extra:?}: {w} in {ours}");
        }
        if let Some(up) = upstream() {
            let theirs = ok(captive(&up, dir.path(), &args, cmd, None));
            assert_eq!(cap_lines(&ours), cap_lines(&theirs), "{extra:?}");
        }
    }
}

#[test]
fn eval_missing_unload_and_tmpdir() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // `missing` answers every method not given, with the same arguments.
    let missing = format!("missing=echo \"$@\" >> {d}/missing.log; exit 2");
    let unload = format!("unload=ls $tmpdir > {d}/tmpdir.ls; echo $tmpdir > {d}/tmpdir");
    let errs = "pwrite=echo ENOSPC no room at $4 >&2; exit 1";
    let args = [
        "eval",
        "get_size=echo 1M",
        "pread=head -c $3 /dev/zero",
        errs,
        &missing,
        &unload,
    ];
    let py = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
              try:\n  h.pwrite(b'x', 4096); print('ok')\nexcept nbd.Error as e:\n  print(e.errno)\n";
    std::fs::write(dir.path().join("w.py"), py).unwrap();
    let cmd = format!("{PYTHON} w.py $uri");
    let out = captive(&nbdkit(), dir.path(), &args, &cmd, None);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out).trim(), "ENOSPC");
    assert!(stderr.contains("/pwrite: no room at 4096"), "{stderr}");
    let log = std::fs::read_to_string(dir.path().join("missing.log")).unwrap();
    for m in [
        "config_complete",
        "open false  false",
        "can_zero ",
        "close ",
    ] {
        assert!(log.lines().any(|l| l.starts_with(m)), "{m} not in {log}");
    }
    // can_write is implied by pwrite, as upstream: missing is not asked.
    assert!(!log.contains("can_write"), "{log}");
    // The method scripts live in $tmpdir, which unload still sees and
    // which is gone after the server exits.
    let ls = std::fs::read_to_string(dir.path().join("tmpdir.ls")).unwrap();
    for f in ["get_size", "missing", "pread", "pwrite", "unload"] {
        assert!(ls.lines().any(|l| l == f), "{f} not in {ls}");
    }
    let tmpdir = std::fs::read_to_string(dir.path().join("tmpdir")).unwrap();
    assert!(!Path::new(tmpdir.trim()).exists());
    if let Some(up) = upstream() {
        std::fs::remove_file(dir.path().join("missing.log")).unwrap();
        let theirs = ok(captive(&up, dir.path(), &args, &cmd, None));
        // Upstream 1.32 says EIO now and then on a loaded machine (1 run
        // in 6 here, while ours said ENOSPC every time): its read of the
        // script's stderr races the script's exit.
        assert!(
            theirs.trim() == "ENOSPC" || theirs.trim() == "EIO",
            "{theirs}"
        );
        let their_log = std::fs::read_to_string(dir.path().join("missing.log")).unwrap();
        assert_eq!(calls_but_close(&log), calls_but_close(&their_log));
    }
}

#[test]
fn eval_configuration_errors_as_upstream() {
    let run = |prog: &Path, args: &[&str]| {
        let out = Command::new(prog)
            .args(["-U", "-"])
            .args(args)
            .args(["--run", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    let cases: [(&[&str], &str); 4] = [
        (
            &["eval", "get_size=echo 1M", "foo=bar"],
            "callback 'foo' is unknown, and there is no 'config' callback to handle it",
        ),
        (
            &["eval", "get_size=echo 1", "get_size=echo 2"],
            "method get_size defined more than once on the command line",
        ),
        // config sees only keys given after it, in order.
        (
            &["eval", "foo=bar", "config=exit 0"],
            "callback 'foo' is unknown",
        ),
        (
            &[
                "eval",
                "config=echo EINVAL no $2 here >&2; exit 1",
                "foo=bar",
            ],
            "/config: no foo here",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = run(&nbdkit(), args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        if let Some(up) = upstream() {
            let (code, err) = run(&up, args);
            assert_eq!(code, Some(1), "upstream {args:?}");
            assert!(err.contains(want), "upstream {args:?}: {err}");
        }
    }
    // A config script that takes the key: fine, and it gets key and value.
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let config = format!("config=echo \"$2=$3\" >> {}", seen.display());
    run_ok(Command::new(nbdkit()).args([
        "-U",
        "-",
        "eval",
        &config,
        "a=1",
        "load=x y",
        "get_size=echo 1M",
        "pread=exit 1",
        "--run",
        "true",
    ]));
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "a=1\nload=x y\n");
}
