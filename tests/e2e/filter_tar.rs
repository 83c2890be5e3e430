//! The tar filter end to end, on archives GNU tar made (gnu, pax and
//! ustar formats, long names): the entry's bytes checked with nbdcopy and
//! against upstream's tar filter, writes checked with `tar xO`, and the
//! filter over xz on a `.tar.xz`.

use std::path::Path;
use std::process::Command;

use crate::common::{nbdkit, nbdpy, random_file, require, require_nbdsh, run, run_ok, Server};
use crate::filter_offset::copy_out;

/// The archive's members: a 100000-byte file, a 70000-byte file under a
/// 120-character directory name, made in `dir`. Returns their names.
fn members(dir: &Path) -> (String, String) {
    let long_dir = format!("t/{}", "d".repeat(120));
    std::fs::create_dir_all(dir.join(&long_dir)).unwrap();
    let small = "t/small.bin".to_string();
    let long = format!("{long_dir}/{}.img", "e".repeat(50));
    random_file(&dir.join(&small), 100_000, 1);
    random_file(&dir.join(&long), 70_000, 2);
    (small, long)
}

fn make_tar(dir: &Path, format: &str, out: &str, names: &[&str]) {
    run_ok(
        Command::new("tar")
            .current_dir(dir)
            .arg(format!("--format={format}"))
            .arg("-cf")
            .arg(out)
            .args(names),
    );
}

#[test]
fn tar_serves_entries_of_gnu_pax_and_ustar_archives() {
    if !require(&["tar", "nbdcopy"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (small, long) = members(dir);
    make_tar(dir, "gnu", "gnu.tar", &["t"]);
    make_tar(dir, "pax", "pax.tar", &["t"]);
    make_tar(dir, "ustar", "ustar.tar", &[&small]);
    let upstream = require(&["nbdkit"]);
    for (archive, entry) in [
        ("gnu.tar", &small),
        ("gnu.tar", &long),
        ("pax.tar", &small),
        ("pax.tar", &long),
        ("ustar.tar", &small),
    ] {
        let file = dir.join(archive);
        let e = format!("tar-entry={entry}");
        let args = ["-r", "file", file.to_str().unwrap(), "--filter=tar", &e];
        let ours = copy_out(&Server::ours(&args).uri(), dir);
        assert_eq!(
            ours,
            std::fs::read(dir.join(entry)).unwrap(),
            "{archive} {entry}"
        );
        // Upstream's block number for a GNU long name is that of the
        // long-name header: it serves the wrong bytes there.
        if upstream && !(archive == "gnu.tar" && entry == &long) {
            let theirs = copy_out(&Server::upstream(&args).uri(), dir);
            assert_eq!(ours, theirs, "{archive} {entry}: ours and upstream differ");
        }
    }
}

#[test]
fn tar_writes_go_into_the_entry() {
    if !require(&["tar"]) || !require_nbdsh() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (small, _) = members(dir);
    make_tar(dir, "gnu", "a.tar", &["t"]);
    let file = dir.join("a.tar");
    let before = std::fs::metadata(&file).unwrap().len();
    let e = format!("tar-entry={small}");
    let s = Server::ours(&["file", file.to_str().unwrap(), "--filter=tar", &e]);
    let out = nbdpy(
        &s.uri(),
        r#"
print(h.get_size(), h.is_read_only())
h.pwrite(b"hello tar", 99991)
try:
    h.pwrite(b"xx", 99999)
except nbd.Error as e:
    print("past the end", e.errnum)
h.flush()
"#,
    );
    assert_eq!(out, "100000 False\npast the end 28\n", "{out}");
    drop(s);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), before);
    let extracted = run(Command::new("tar").arg("-xOf").arg(&file).arg(&small));
    assert!(extracted.status.success());
    let mut want = std::fs::read(dir.join(&small)).unwrap();
    want[99991..].copy_from_slice(b"hello tar");
    assert_eq!(extracted.stdout, want);
    // Upstream reads the written archive the same.
    if require(&["nbdkit"]) {
        let args = ["-r", "file", file.to_str().unwrap(), "--filter=tar", &e];
        assert_eq!(copy_out(&Server::upstream(&args).uri(), dir), want);
    }
}

#[test]
fn tar_over_xz_serves_a_compressed_archive() {
    if !require(&["tar", "xz", "nbdcopy"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (small, _) = members(dir);
    make_tar(dir, "pax", "a.tar", &["t"]);
    run_ok(Command::new("xz").arg("-k").arg(dir.join("a.tar")));
    let file = dir.join("a.tar.xz");
    let e = format!("tar-entry={small}");
    let args = [
        "file",
        file.to_str().unwrap(),
        "--filter=tar",
        &e,
        "--filter=xz",
    ];
    let ours = copy_out(&Server::ours(&args).uri(), dir);
    assert_eq!(ours, std::fs::read(dir.join(&small)).unwrap());
    if require(&["nbdkit"]) {
        assert_eq!(copy_out(&Server::upstream(&args).uri(), dir), ours);
    }
}

#[test]
fn tar_missing_entry_and_parameter_are_errors() {
    if !require(&["tar", "nbdinfo"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    members(dir);
    make_tar(dir, "gnu", "a.tar", &["t"]);
    let file = dir.join("a.tar");
    let f = file.to_str().unwrap();
    // No tar-entry: a configuration error.
    let out =
        run(Command::new(nbdkit()).args(["-U", "-", "file", f, "--filter=tar", "--run", "true"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tar-entry"));
    // A name not in the archive: the connection fails, saying why.
    let s = Server::ours(&["file", f, "--filter=tar", "tar-entry=t/nope"]);
    let out = run(Command::new("nbdinfo").arg(s.uri()));
    assert!(!out.status.success());
    drop(s);
    // A file that is no tar archive.
    let s = Server::ours(&[
        "file",
        dir.join("t/small.bin").to_str().unwrap(),
        "--filter=tar",
        "tar-entry=x",
    ]);
    let out = run(Command::new("nbdinfo").arg(s.uri()));
    assert!(!out.status.success());
}
