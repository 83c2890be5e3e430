//! Shared pieces of the `copy_*` tests of our nbdcopy: the endpoint
//! kinds (upstream nbdkit, our nbdkit, qemu-nbd raw and qcow2, files,
//! pipes, `null:`) set up over files, a source image with data, zero
//! blocks and a hole, and a way to read a destination back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{our_bin, random_file, require, run_ok, Server};

/// Size of the test images.
pub const SIZE: usize = 4 << 20;

/// Our nbdcopy.
pub fn nbdcopy() -> Command {
    Command::new(our_bin("nbdcopy"))
}

/// The peers every route test needs.
pub fn peers() -> bool {
    require(&["nbdkit", "qemu-nbd", "qemu-img"])
}

/// Write the source image: random data, an allocated run of zeroes
/// (for zero detection), more data, then a hole to the end. Returns
/// its bytes.
pub fn source_image(path: &Path) -> Vec<u8> {
    random_file(path, 3 << 20, 7);
    let mut data = std::fs::read(path).unwrap();
    data[(1 << 20)..(1 << 20) + (128 << 10)].fill(0);
    // Odd, unaligned data near the end of the data part.
    data[(3 << 20) - 100..].fill(0x5a);
    std::fs::write(path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(SIZE as u64).unwrap();
    data.resize(SIZE, 0);
    data
}

/// A qemu-nbd server on a private Unix socket, killed on drop.
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Serve `path` in `format` (`raw`, `qcow2`), to several clients.
    pub fn start(path: &Path, format: &str) -> QemuNbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sock");
        let child = Command::new("qemu-nbd")
            .arg("-k")
            .arg(&socket)
            .args(["-f", format, "-t", "-e", "8"])
            .arg(path)
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start qemu-nbd");
        let q = QemuNbd {
            child,
            socket,
            _dir: dir,
        };
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&q.socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    /// Its NBD URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SIGTERM lets qemu-nbd write out qcow2 metadata.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// The kinds of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Upstream nbdkit's file plugin, by URI.
    Upstream,
    /// Our nbdkit's file plugin, by URI.
    Ours,
    /// qemu-nbd on a raw file, by URI.
    QemuRaw,
    /// qemu-nbd on a qcow2 file, by URI.
    QemuQcow2,
    /// A local file.
    File,
    /// `-`: a pipe on stdin or stdout.
    Pipe,
    /// `null:` (destination only).
    Null,
}

/// The NBD server kinds.
pub const NBD_KINDS: [Kind; 4] = [Kind::Upstream, Kind::Ours, Kind::QemuRaw, Kind::QemuQcow2];

/// A running endpoint: its nbdcopy arguments and what backs it.
pub struct End {
    /// Words for nbdcopy's command line.
    pub args: Vec<String>,
    /// The kind.
    pub kind: Kind,
    /// The file behind it (raw, or qcow2 for `QemuQcow2`).
    pub path: Option<PathBuf>,
    nbdkit: Option<Server>,
    qemu: Option<QemuNbd>,
}

impl End {
    fn serve(kind: Kind, path: PathBuf) -> End {
        let (args, nbdkit, qemu) = match kind {
            Kind::Upstream | Kind::Ours => {
                let p = path.to_str().unwrap();
                let s = if kind == Kind::Upstream {
                    Server::upstream(&["file", p])
                } else {
                    Server::ours(&["file", p])
                };
                (vec![s.uri()], Some(s), None)
            }
            Kind::QemuRaw | Kind::QemuQcow2 => {
                let fmt = if kind == Kind::QemuRaw {
                    "raw"
                } else {
                    "qcow2"
                };
                let q = QemuNbd::start(&path, fmt);
                (vec![q.uri()], None, Some(q))
            }
            Kind::File => (vec![path.display().to_string()], None, None),
            Kind::Pipe => (vec!["-".into()], None, None),
            Kind::Null => (vec!["null:".into()], None, None),
        };
        End {
            args,
            kind,
            path: Some(path),
            nbdkit,
            qemu,
        }
    }

    /// A source of `kind` serving the raw image `raw` (converted to
    /// qcow2 in `dir` when needed).
    pub fn source(kind: Kind, dir: &Path, raw: &Path) -> End {
        let path = if kind == Kind::QemuQcow2 {
            let q = dir.join("src.qcow2");
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(raw)
                    .arg(&q),
            );
            q
        } else {
            raw.to_path_buf()
        };
        End::serve(kind, path)
    }

    /// A destination of `kind` and `size` bytes in `dir`, full of
    /// garbage so that zero ranges must really be zeroed.
    pub fn destination(kind: Kind, dir: &Path, size: usize) -> End {
        let raw = dir.join("dst.img");
        random_file(&raw, size, 99);
        let path = if kind == Kind::QemuQcow2 {
            let q = dir.join("dst.qcow2");
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&q),
            );
            q
        } else {
            raw
        };
        End::serve(kind, path)
    }

    /// Stop the server (so qcow2 metadata is written) and read what the
    /// destination holds, as raw bytes.
    pub fn contents(&mut self) -> Vec<u8> {
        self.nbdkit.take();
        self.qemu.take();
        let path = self.path.as_ref().expect("a file-backed endpoint");
        if self.kind == Kind::QemuQcow2 {
            let raw = path.with_extension("raw-out");
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(path)
                    .arg(&raw),
            );
            std::fs::read(raw).unwrap()
        } else {
            std::fs::read(path).unwrap()
        }
    }
}

/// Run our nbdcopy from `src` to `dst` with extra options, feeding
/// `input` to stdin through a pipe when given.
pub fn copy(src: &End, dst: &End, opts: &[&str], input: Option<&[u8]>) -> Output {
    let mut cmd = nbdcopy();
    cmd.args(opts).arg("--").args(&src.args).args(&dst.args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("cannot run nbdcopy");
    let feeder = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    out
}

/// Copy `data` through a source of kind `s` to a destination of kind
/// `d` and check the destination holds exactly `data` (or, for a
/// larger destination, `data` then whatever the copy left).
pub fn check_route(s: Kind, d: Kind, opts: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    let data = source_image(&raw);
    let src = End::source(s, dir.path(), &raw);
    let mut dst = End::destination(d, dir.path(), SIZE);
    let input = (s == Kind::Pipe).then_some(&data[..]);
    let out = copy(&src, &dst, opts, input);
    let route = format!("{s:?} -> {d:?} {opts:?}");
    assert!(
        out.status.success(),
        "{route}: nbdcopy failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got = match d {
        Kind::Null => return,
        Kind::Pipe => out.stdout,
        _ => dst.contents(),
    };
    assert_eq!(got.len(), data.len(), "{route}: destination size");
    if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("{route}: the destination differs from the source at byte {i}");
    }
}
