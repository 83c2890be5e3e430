//! Shared helpers for the end-to-end tests: paths to our binaries, peers
//! that must exist under CI, and servers that clean up after themselves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Our `nbdkit`.
pub fn nbdkit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nbdkit"))
}

/// Our binary of another tool (built in the same target directory).
#[allow(dead_code)]
pub fn our_bin(name: &str) -> PathBuf {
    nbdkit().with_file_name(name)
}

/// The word after `key` in a line of a log or a message (`count=0x...`,
/// `connection=3`, `at offset 4096 failed`).
pub fn word_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(key).nth(1)?.split(' ').next()
}

pub use libnbd::testing::{installed as on_path, require};

/// The Python with Debian's `nbd` module (the PATH one may not see it).
pub const PYTHON: &str = "/usr/bin/python3";

/// A Python `nbd` check: `python3-libnbd` must be installed.
pub fn require_nbdsh() -> bool {
    if !require(&[PYTHON, "nbdsh"]) {
        return false;
    }
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("python3-libnbd is missing");
        }
        eprintln!("SKIP: python3-libnbd is not installed");
    }
    ok
}

/// Run a command and return its output, panicking with context when it
/// cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    stdout_of_success(cmd, out)
}

/// The stdout of a command's output, which must say it succeeded (or
/// the test fails showing both streams).
pub fn stdout_of_success(cmd: &Command, out: Output) -> String {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server on a private Unix socket, killed on drop.
pub struct Server {
    child: Child,
    /// The socket path.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Start `prog` (ours or upstream nbdkit) in the foreground on a
    /// temporary Unix socket with these arguments.
    pub fn start_with(prog: &Path, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let child = Command::new(prog)
            .arg("-f")
            .arg("-U")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", prog.display()));
        let mut s = Server {
            child,
            socket,
            _dir: dir,
        };
        s.wait_ready();
        s
    }

    /// Start our nbdkit.
    pub fn ours(args: &[&str]) -> Server {
        Self::start_with(&nbdkit(), args)
    }

    /// Start upstream nbdkit.
    #[allow(dead_code)]
    pub fn upstream(args: &[&str]) -> Server {
        Self::start_with(Path::new("nbdkit"), args)
    }

    fn wait_ready(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("server exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not start listening");
    }

    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The NBD URI of a named export.
    #[allow(dead_code)]
    pub fn uri_export(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// The server's process id.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Is the server process still running?
    #[allow(dead_code)]
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Stop a server as a user would (SIGTERM), then kill it if it has not
/// gone within 5 s.
pub fn stop(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Run a Python script with the `nbd` module; `uri` is in `sys.argv[1]`
/// and `h` is a connected handle. Returns stdout.
pub fn nbdpy(uri: &str, script: &str) -> String {
    let prelude = "import nbd, sys, errno\nh = nbd.NBD()\nh.add_meta_context(\"base:allocation\")\nh.connect_uri(sys.argv[1])\n";
    run_ok(
        Command::new(PYTHON)
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .arg(uri),
    )
}

/// Run a Python `nbd` script (as [`nbdpy`]) against upstream nbdkit and
/// against ours, both started with `args`: both must print the same.
/// Returns what they printed, or `None` (a printed skip) when a peer is
/// missing.
#[allow(dead_code)]
pub fn same_as_upstream(args: &[&str], script: &str) -> Option<String> {
    if !require(&["nbdkit"]) || !require_nbdsh() {
        return None;
    }
    let theirs = nbdpy(&Server::upstream(args).uri(), script);
    let ours = nbdpy(&Server::ours(args).uri(), script);
    assert_eq!(
        ours, theirs,
        "ours (left) and upstream (right) differ for {args:?}"
    );
    Some(ours)
}

/// Write `len` bytes of deterministic pseudo-random data to a file.
#[allow(dead_code)]
pub fn random_file(path: &Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    std::fs::write(path, buf).unwrap();
}

/// `qemu-img ARGS`, which must succeed; its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-io -f qcow2 -c CMD... IMG`, which must succeed.
pub fn qemu_io_qcow2(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run_ok(c.arg(img));
}

/// `qemu-img create -f qcow2 [-o OPTS] IMG SIZE` (no `-o` when `opts`
/// is empty).
pub fn qcow2_create(img: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(img), size]);
    qemu_img(&args);
}

/// `qemu-img create -f qcow2 -b BACKING -F FORMAT IMG SIZE` (a relative
/// backing name is relative to the image's directory, as qemu takes it).
pub fn qcow2_overlay(img: &Path, backing: &str, backing_format: &str, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_format,
        p(img),
        size,
    ]);
}

/// A path as the `&str` a command line takes.
pub fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}
