//! nbdfuse: NBD exports as local files, checked with ordinary tools
//! (dd, cmp, sgdisk, mkfs.ext4, fallocate, qemu-img, libnbd's nbdinfo)
//! against our nbdkit, upstream nbdkit and qemu-nbd. Every mount is
//! undone by a guard, also when a test fails.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// FUSE mounts need fusermount3 (fuse3) and /dev/fuse.
fn require_fuse() -> bool {
    if !require(&["fusermount3"]) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("/dev/fuse is missing");
        }
        eprintln!("SKIP: no /dev/fuse");
        return false;
    }
    true
}

fn nbdfuse() -> Command {
    Command::new(our_bin("nbdfuse"))
}

fn mounted(path: &Path) -> bool {
    let Ok(p) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).map(Path::new) == Some(p.as_path()))
}

/// A running nbdfuse; dropping it unmounts and waits for it.
struct Mount {
    child: Option<Child>,
    /// What was mounted on (the directory, or the file).
    on: PathBuf,
    /// The virtual file.
    file: PathBuf,
}

impl Mount {
    /// Run `nbdfuse -P PIDFILE args...` and wait for the pidfile.
    fn start(on: &Path, file: &Path, args: &[&std::ffi::OsStr]) -> Mount {
        let pidfile = on.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = nbdfuse()
            .arg("-P")
            .arg(&pidfile)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run nbdfuse");
        let mut m = Mount {
            child: Some(child),
            on: on.to_path_buf(),
            file: file.to_path_buf(),
        };
        let t = Instant::now();
        while !pidfile.exists() {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(|c| c.try_wait()) {
                panic!("nbdfuse exited early: {st}");
            }
            assert!(t.elapsed() < Duration::from_secs(30), "nbdfuse not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(mounted(&m.on), "pidfile written before the mount");
        m
    }

    /// Mount `dir`/nbd on the server `target` (a URI or `[ CMD ]`
    /// words), with these options first.
    fn dir(dir: &Path, opts: &[&str], target: &[&str]) -> Mount {
        let mut args: Vec<&std::ffi::OsStr> = opts.iter().map(|s| s.as_ref()).collect();
        args.push(dir.as_os_str());
        args.extend(target.iter().map(|s| std::ffi::OsStr::new(*s)));
        Mount::start(dir, &dir.join("nbd"), &args)
    }

    /// Unmount with fusermount3 and wait for nbdfuse: its exit status.
    fn unmount(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("mounted");
        let t = Instant::now();
        loop {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.on)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok || !mounted(&self.on) {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = Command::new("umount").arg("-l").arg(&self.on).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("nbdfuse did not exit after the unmount");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Not unmounted by the test (it failed): clean up quietly.
            let mut child = self.child.take().unwrap();
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.on)
                .stderr(Stdio::null())
                .status();
            if mounted(&self.on) {
                let _ = Command::new("umount").arg("-l").arg(&self.on).status();
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// dd `data` into the file at an odd offset in odd-sized blocks, read
/// it back with dd and compare with cmp.
fn dd_round_trip(m: &Mount, dir: &Path, offset: u64) {
    let src = dir.join("src.bin");
    random_file(&src, 3 * 1024 * 1024 + 777, offset);
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", m.file.display()))
            .args(["bs=100000", "oflag=seek_bytes", "conv=notrunc,fsync"])
            .arg(format!("seek={offset}"))
            .stderr(Stdio::null()),
    );
    let back = dir.join("back.bin");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", m.file.display()))
            .arg(format!("of={}", back.display()))
            .args(["bs=65537", "iflag=skip_bytes,count_bytes,direct"])
            .arg(format!("skip={offset}"))
            .arg(format!("count={}", 3 * 1024 * 1024 + 777))
            .stderr(Stdio::null()),
    );
    run_ok(Command::new("cmp").arg(&src).arg(&back));
}

#[test]
fn nbdfuse_dd_cmp_our_nbdkit() {
    if !require_fuse() {
        return;
    }
    let server = Server::ours(&["memory", "64M"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    assert_eq!(std::fs::metadata(&m.file).unwrap().len(), 64 << 20);
    let names: Vec<_> = std::fs::read_dir(&mp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["nbd"]);
    dd_round_trip(&m, dir.path(), 12345);
    // Reads across the end stop at the end.
    let f = std::fs::File::open(&m.file).unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut buf, (64 << 20) - 100).unwrap(), 100);
    drop(f);
    assert!(m.unmount().success());
    assert!(!mounted(&mp));
}

#[test]
fn nbdfuse_dd_cmp_upstream_nbdkit() {
    if !require_fuse() || !require(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    // A file name of our own, and upstream nbdkit as a captive server.
    let mut args: Vec<&std::ffi::OsStr> = vec![];
    let on = mp.join("ramdisk");
    args.push(on.as_os_str());
    for w in ["[", "nbdkit", "memory", "64M", "]"] {
        args.push(w.as_ref());
    }
    let mut m = Mount::start(&mp, &on, &args);
    dd_round_trip(&m, dir.path(), 4096 * 3 + 1);
    assert!(m.unmount().success());
}

#[test]
fn nbdfuse_dd_cmp_qemu_nbd() {
    if !require_fuse() || !require(&["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let img_s = img.to_str().unwrap();
    let mut m = Mount::dir(&mp, &[], &["[", "qemu-nbd", "-f", "raw", img_s, "]"]);
    dd_round_trip(&m, dir.path(), 999_999);
    assert!(m.unmount().success());
    // What was written is in the image, and qemu-nbd is gone (its lock
    // with it).
    let data = std::fs::read(&img).unwrap();
    let src = std::fs::read(dir.path().join("src.bin")).unwrap();
    assert!(data[999_999..999_999 + src.len()] == src[..]);
}

/// The pipeline of the issue: a qcow2 through a file mounted over
/// itself, partitioned and formatted, then checked after the unmount.
#[test]
fn nbdfuse_qcow2_pipeline_sgdisk_mkfs() {
    if !require_fuse() || !require(&["qemu-nbd", "qemu-img", "sgdisk", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("64M"),
    );
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, b"").unwrap();
    let q_s = q.to_str().unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec![raw.as_os_str()];
    for w in ["[", "qemu-nbd", "-f", "qcow2", q_s, "]"] {
        args.push(w.as_ref());
    }
    let mut m = Mount::start(&raw, &raw, &args);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 64 << 20);
    run_ok(Command::new("sgdisk").args(["-n", "1:2048:0"]).arg(&raw));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&raw));
    let copy = dir.path().join("copy.raw");
    std::fs::copy(&raw, &copy).unwrap();
    assert!(m.unmount().success());
    // The file is itself again (empty), and the qcow2 holds it all.
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 0);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&copy)
            .arg(&q),
    );
    let out = run_ok(Command::new("sgdisk").arg("-p").arg(&copy));
    assert!(out.contains("Number  Start"), "{out}");
}

#[test]
fn nbdfuse_readonly_refuses_writes() {
    if !require_fuse() {
        return;
    }
    let server = Server::ours(&["memory", "1M"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(&mp, &["-r"], &[&server.uri()]);
    let meta = std::fs::metadata(&m.file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "{e}"
    );
    // Reading works.
    assert_eq!(std::fs::read(&m.file).unwrap(), vec![0u8; 1 << 20]);
    assert!(m.unmount().success());
}

#[test]
fn nbdfuse_punch_hole_is_a_hole_on_the_server() {
    if !require_fuse() || !require(&["nbdinfo", "fallocate"]) {
        return;
    }
    let server = Server::ours(&["memory", "8M"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    f.write_all_at(&vec![0x55u8; 4 << 20], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    run_ok(
        Command::new("fallocate")
            .args(["--punch-hole", "-o", "1M", "-l", "1M"])
            .arg(&m.file),
    );
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(server.uri()));
    // "1048576  1048576  3  hole,zero"
    assert!(
        map.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 3 && w[0] == "1048576" && w[1] == "1048576" && w[2] == "3"
        }),
        "no hole at 1M:\n{map}"
    );
    // It reads back as zeroes; SEEK_HOLE and SEEK_DATA see it.
    let f = std::fs::File::open(&m.file).unwrap();
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    let data = unsafe { libc::lseek(f.as_raw_fd(), 1 << 20, libc::SEEK_DATA) };
    assert_eq!((hole, data), (1 << 20, 2 << 20));
    drop(f);
    // ZERO_RANGE reads back as zeroes too.
    run_ok(
        Command::new("fallocate")
            .args(["--zero-range", "-o", "3M", "-l", "4096"])
            .arg(&m.file),
    );
    let f = std::fs::File::open(&m.file).unwrap();
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(f);
    assert!(m.unmount().success());
}

#[test]
fn nbdfuse_dead_server_gives_eio() {
    if !require_fuse() {
        return;
    }
    // A slow server, so that the read is still going when it dies.
    let server = Server::ours(&["--filter=delay", "memory", "1G", "rdelay=20ms"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    let file = m.file.clone();
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(&file).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            match f.read_at(&mut buf, at) {
                Ok(0) => return (None, Instant::now()),
                Ok(n) => at += n as u64,
                Err(e) => return (Some(e), Instant::now()),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    drop(server);
    let (err, when) = reader.join().unwrap();
    let err = err.expect("the read went on to the end of a dead server");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        when.duration_since(killed) < Duration::from_secs(10),
        "EIO only after {:?}",
        when.duration_since(killed)
    );
    // nbdfuse is still there to be unmounted (its final flush fails).
    m.unmount();
}

#[test]
fn nbdfuse_pidfile_only_once_mounted() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let pidfile = dir.path().join("pid");
    // A captive server that takes a second to start.
    let script = format!("sleep 1; exec {} memory 1M", nbdkit().display());
    let child = nbdfuse()
        .arg("-P")
        .arg(&pidfile)
        .arg(&mp)
        .args(["[", "sh", "-c", &script, "]"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut m = Mount {
        child: Some(child),
        on: mp.clone(),
        file: mp.join("nbd"),
    };
    let t = Instant::now();
    while !pidfile.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no pidfile");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "pidfile too early"
    );
    assert!(mounted(&mp), "pidfile before the mount");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        pid.to_string()
    );
    assert_eq!(std::fs::metadata(&m.file).unwrap().len(), 1 << 20);
    assert!(m.unmount().success());
}

#[test]
fn nbdfuse_sigterm_unmounts() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let nbdkit_s = nbdkit();
    let mut m = Mount::dir(
        &mp,
        &[],
        &[
            "--command",
            nbdkit_s.to_str().unwrap(),
            "-s",
            "memory",
            "1M",
        ],
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap();
    f.write_all_at(b"hello", 0).unwrap();
    drop(f);
    let pid = m.child.as_ref().unwrap().id();
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let child = m.child.as_mut().unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}");
    assert!(!mounted(&mp));
}

#[test]
fn nbdfuse_options_as_upstream() {
    if !require(&["nbdfuse"]) {
        return;
    }
    let out = |prog: &Path, args: &[&str]| {
        let o = run(Command::new(prog).args(args).stdin(Stdio::null()));
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    for args in [
        &["--version"][..],
        &["-V"],
        &["--help"],
        &["--long-options"],
        &["--short-options"],
    ] {
        assert_eq!(
            out(&our_bin("nbdfuse"), args),
            out(Path::new("nbdfuse"), args),
            "nbdfuse {args:?}"
        );
    }
    // Usage errors: exit 1 with a message, no hang, no panic.
    for args in [
        &[][..],
        &["mp"],
        &["-C", "0", "mp", "nbd://localhost"],
        &["/nonexistent/x/y", "nbd://localhost"],
        &["mp", "--tcp", "localhost"],
        &["mp", "--fd", "x"],
    ] {
        let o = run(nbdfuse().args(args).stdin(Stdio::null()));
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}

/// Writes are answered before the server has them (write-behind); a
/// failed one shows at fsync, and at once for O_DSYNC files. What was
/// written reads back at once, also past the page cache.
#[test]
fn nbdfuse_write_behind_errors_and_ordering() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let server = Server::ours(&["memory", "4M"]);
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    // Many overlapping writes, then a read past the page cache.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    for i in 0..64u8 {
        f.write_all_at(&vec![i; 65536], u64::from(i) * 4096)
            .unwrap();
    }
    let mut d = std::fs::OpenOptions::new();
    use std::os::unix::fs::OpenOptionsExt;
    d.read(true).custom_flags(libc::O_DIRECT);
    let direct = d.open(&m.file).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    // O_DIRECT wants an aligned buffer: read through an aligned window.
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: a fresh allocation of that layout, freed below.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    let aligned = unsafe { std::slice::from_raw_parts_mut(p, 1 << 20) };
    direct.read_exact_at(aligned, 0).unwrap();
    buf.copy_from_slice(aligned);
    unsafe { std::alloc::dealloc(p, layout) };
    for i in 0..64usize {
        // Each 4K block holds the last write that covered it.
        assert_eq!(buf[i * 4096], i as u8, "block {i}");
    }
    assert_eq!(buf[(63 + 16) * 4096 - 1], 63);
    f.sync_all().unwrap();
    drop((f, direct));
    assert!(m.unmount().success());

    // Against a server whose writes fail: write() succeeds, fsync says.
    let server = Server::ours(&[
        "--filter=error",
        "memory",
        "4M",
        "error-pwrite-rate=100%",
        "error=ENOSPC",
    ]);
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    let e = f.sync_all().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    drop(f);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).custom_flags(libc::O_DSYNC);
    let f = o.open(&m.file).unwrap();
    let e = f.write_at(&[1u8; 4096], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    drop(f);
    // nbdfuse says the writes failed when it ends.
    assert!(!m.unmount().success());
}

/// The other ways to name the server: `--unix`, `--fd`,
/// `--socket-activation`, and multi-conn on a URI.
#[test]
fn nbdfuse_modes_unix_fd_socket_activation() {
    if !require_fuse() {
        return;
    }
    let server = Server::ours(&["memory", "2M"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let sock = server.socket.to_str().unwrap().to_string();
    let mut m = Mount::dir(&mp, &["-s"], &["--unix", &sock]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap()
        .write_all_at(b"unix", 0)
        .unwrap();
    assert!(m.unmount().success());

    // --fd 0: the connected socket as nbdfuse's stdin.
    let s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    let pidfile = dir.path().join("fd.pid");
    let child = nbdfuse()
        .arg("-P")
        .arg(&pidfile)
        .arg(&mp)
        .args(["--fd", "0"])
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(s)))
        .spawn()
        .unwrap();
    let mut m = Mount {
        child: Some(child),
        on: mp.clone(),
        file: mp.join("nbd"),
    };
    let t = Instant::now();
    while !pidfile.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "--fd: no pidfile");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(&std::fs::read(&m.file).unwrap()[..4], b"unix");
    assert!(m.unmount().success());

    // --socket-activation, with a file name of our own.
    let nbdkit_s = nbdkit();
    let on = mp.join("disk");
    let args: Vec<&std::ffi::OsStr> = vec![
        "-v".as_ref(),
        on.as_os_str(),
        "--socket-activation".as_ref(),
        nbdkit_s.as_os_str(),
        "memory".as_ref(),
        "3M".as_ref(),
    ];
    let mut m = Mount::start(&mp, &on, &args);
    assert_eq!(std::fs::metadata(&on).unwrap().len(), 3 << 20);
    assert!(m.unmount().success());

    // A URI to a multi-conn server: four connections.
    let out = dir.path().join("v.log");
    let log = std::fs::File::create(&out).unwrap();
    let pidfile = dir.path().join("v.pid");
    let child = nbdfuse()
        .arg("-v")
        .arg("-P")
        .arg(&pidfile)
        .arg(&mp)
        .arg(server.uri())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut m = Mount {
        child: Some(child),
        on: mp.clone(),
        file: mp.join("nbd"),
    };
    let t = Instant::now();
    while !pidfile.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no pidfile");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(m.unmount().success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("4 connection(s)"), "{text}");
}

/// fsync is an NBD flush (one: multi-conn makes it cover every
/// connection), after the write it covers.
#[test]
fn nbdfuse_fsync_is_nbd_flush() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logfile = format!("logfile={}", log.display());
    let server = Server::ours(&["--filter=log", "memory", "1M", &logfile]);
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap();
    f.write_all_at(&[7u8; 4096], 8192).unwrap();
    f.sync_all().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let write = text.find("Write id=").expect("no write");
    let flush = text.find(" Flush id=").expect("no flush");
    assert!(write < flush, "{text}");
    assert_eq!(text.matches(" Flush id=").count(), 1, "{text}");
    drop(f);
    assert!(m.unmount().success());
}

/// Any size and alignment on a server that takes only whole 512-byte
/// blocks and at most 64K a request (and fails anything else).
#[test]
fn nbdfuse_any_alignment_on_a_strict_server() {
    if !require_fuse() {
        return;
    }
    let server = Server::ours(&[
        "--filter=blocksize-policy",
        "memory",
        "16M",
        "blocksize-minimum=512",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    dd_round_trip(&m, dir.path(), 1001);
    // Small unaligned writes, each on its own, then read back.
    let mut o = std::fs::OpenOptions::new();
    use std::os::unix::fs::OpenOptionsExt;
    o.read(true).write(true).custom_flags(libc::O_DSYNC);
    let f = o.open(&m.file).unwrap();
    f.write_all_at(b"hello", 7).unwrap();
    f.write_all_at(b"world", 510).unwrap();
    run_ok(
        Command::new("fallocate")
            .args(["--zero-range", "-o", "1001", "-l", "3000"])
            .arg(&m.file),
    );
    drop(f);
    assert!(m.unmount().success());
    let mut m = Mount::dir(&mp, &[], &[&server.uri()]);
    let data = std::fs::read(&m.file).unwrap();
    assert_eq!(&data[7..12], b"hello");
    assert_eq!(&data[510..515], b"world");
    assert!(data[1001..4001].iter().all(|&b| b == 0));
    let src = std::fs::read(dir.path().join("src.bin")).unwrap();
    assert_eq!(data[4001..1001 + src.len()], src[3000..]);
    assert!(m.unmount().success());
}

/// Requests are not served one at a time: 16 readers of a server that
/// takes 200ms a read finish in far less than 16 × 200ms.
#[test]
fn nbdfuse_many_requests_in_flight() {
    if !require_fuse() {
        return;
    }
    let server = Server::ours(&["--filter=delay", "memory", "16M", "rdelay=200ms"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    // One connection: the parallelism is nbdfuse's, not multi-conn's.
    let mut m = Mount::dir(&mp, &["-C", "1"], &[&server.uri()]);
    // O_DIRECT, so that the page cache neither shares nor repeats reads.
    let t = Instant::now();
    let readers: Vec<_> = (0..16u64)
        .map(|i| {
            Command::new("dd")
                .arg(format!("if={}", m.file.display()))
                .args(["iflag=direct", "bs=4096", "count=1", "of=/dev/null"])
                .arg(format!("skip={}", i * 256))
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut r in readers {
        assert!(r.wait().unwrap().success());
    }
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1600), "16 reads took {took:?}");
    assert!(m.unmount().success());
}

/// `-o writeback_cache` (the kernel gathers writes) and `-o kernel_cache`:
/// what is written is on the server after close, also after a remount.
#[test]
fn nbdfuse_writeback_cache_lands() {
    if !require_fuse() {
        return;
    }
    let server = Server::ours(&["memory", "32M"]);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::dir(
        &mp,
        &["-o", "writeback_cache,kernel_cache"],
        &[&server.uri()],
    );
    dd_round_trip(&m, dir.path(), 777);
    assert!(m.unmount().success());
    let mut m = Mount::dir(&mp, &["-r"], &[&server.uri()]);
    let data = std::fs::read(&m.file).unwrap();
    let src = std::fs::read(dir.path().join("src.bin")).unwrap();
    assert!(data[777..777 + src.len()] == src[..]);
    assert!(m.unmount().success());
}
