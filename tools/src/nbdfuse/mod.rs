//! `nbdfuse`: an NBD export as a local file, compatible with libnbd
//! 1.14's.
//!
//! ```text
//! nbdfuse dir nbd://example.com &             # dir/nbd
//! nbdfuse dir/ramdisk [ nbdkit memory 1G ] &  # dir/ramdisk
//! touch disk.raw; nbdfuse disk.raw [ qemu-nbd -f qcow2 disk.qcow2 ] &
//! fusermount3 -u disk.raw
//! ```
//!
//! The server is a URI, `[ CMD ARGS ... ]` (socket activation, also
//! `--socket-activation CMD ARGS`), `--command CMD ARGS` (the server on
//! its stdin/stdout, `nbdkit -s`), `--fd N`, `--tcp HOST PORT`,
//! `--unix SOCKET` or `--vsock CID PORT`. The file is MOUNTPOINT/nbd
//! when MOUNTPOINT is a directory, MOUNTPOINT/FILENAME when its parent
//! is, or MOUNTPOINT itself when it is a regular file (the file is
//! mounted over).
//!
//! Options, as libnbd's: `-C N` (multi-conn: up to N connections where
//! the server allows it, default 4; unlike libnbd's, also to a
//! `[ CMD ]` server; `--command` and `--fd` have one), `-o FUSE-OPTION` (see
//! `--fuse-help`), `-P PIDFILE` (written once the mount is ready),
//! `-r` (read-only; also when the server is), `-s` (one FUSE thread and
//! one worker), `-v`/`-d` (trace requests on stderr). nbdfuse stays in
//! the foreground, as upstream's (`-f` is accepted and changes nothing).
//!
//! The FUSE side is the `fuser` crate's pure Rust mount (`mount(2)` as
//! root, else `fusermount3`; no libfuse). Each request is answered from
//! a tokio task (`fs.rs`), so many are in flight at once.
//!
//! `fusermount3 -u` (or `SIGINT`, `SIGTERM`, `SIGHUP`: nbdfuse then
//! unmounts itself) ends the FUSE session; nbdfuse then flushes the
//! server, disconnects and stops a captive server.

mod fs;

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Arg, ArgAction};
use fuser::{Config, MountOption, SessionACL};
use libnbd::captive::{self, Target};
use libnbd::client::{ConnectOptions, Connection, MultiConn, Stream, Transport};
use libnbd::uri::Uri;

use crate::cli::{self, Action, CommandLine, Tool};
use fs::{NbdFs, Settings};

const TOOL: Tool = Tool {
    name: "nbdfuse",
    usage: USAGE,
    version: || cli::libnbd_version("nbdfuse"),
    long_options: &[
        "--fuse-help",
        "--help",
        "--connections",
        "--pidfile",
        "--pid-file",
        "--readonly",
        "--read-only",
        "--verbose",
        "--version",
    ],
    short_options: &["-C", "-d", "-o", "-P", "-r", "-s", "-v", "-V"],
};

const USAGE: &str = "
Mount NBD server as a virtual file:

    nbdfuse [-C N|--connections N] [-d] [-o FUSE-OPTION] [-P PIDFILE]
            [-r] [-s] [-v]
            MOUNTPOINT[/FILENAME] URI

Other modes:

    nbdfuse MOUNTPOINT[/FILENAME] [ CMD [ARGS ...] ]
    nbdfuse MOUNTPOINT[/FILENAME] --command CMD [ARGS ...]
    nbdfuse MOUNTPOINT[/FILENAME] --fd N
    nbdfuse MOUNTPOINT[/FILENAME] --tcp HOST PORT
    nbdfuse MOUNTPOINT[/FILENAME] --unix SOCKET
    nbdfuse MOUNTPOINT[/FILENAME] --vsock CID PORT

To unmount:

    fusermount3 -u MOUNTPOINT

Other options:

    nbdfuse --help
    nbdfuse --fuse-help
    nbdfuse -V|--version

Please read the nbdfuse(1) manual page for full usage.

";

const FUSE_HELP: &str = "\
FUSE options (-o OPT[,OPT...]):
    -o allow_other         allow access by all users
    -o allow_root          allow access by root
    -o auto_unmount        auto unmount on process termination
    -o default_permissions let the kernel check permissions
    -o kernel_cache        cache files in kernel
    -o direct_io           bypass the page cache
    -o ro / -o rw          read-only / read-write mount
    -o [no]dev, [no]suid, [no]exec, [no]atime, sync, async, dirsync
    -o fsname=NAME         the source shown in /proc/mounts
    -o subtype=NAME        the file system subtype
    -o umask=M             set file permissions (octal)
    -o uid=N               set file owner
    -o gid=N               set file group
    -o max_threads=N       FUSE threads (default: 2; -s: 1)
    -o clone_fd            use separate fuse device fd for each thread
    -o writeback_cache     let the kernel gather writes (errors show at
                           fsync or close)
    -o max_readahead=N     kernel read-ahead in bytes (default: 1M)
    -o debug               the same as -v
  accepted and ignored: attr_timeout=T, entry_timeout=T,
    negative_timeout=T, ac_attr_timeout=T, [no]auto_cache,
    no_rofd_flush, noforget, remember=T, max_idle_threads=N
";

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// A URI, `[ CMD ]`, `--socket-activation`, `--tcp`, `--unix` or
    /// `--vsock`.
    Target(Target),
    /// `--command CMD ARGS`: the server on its stdin and stdout.
    Command(Vec<OsString>),
    /// `--fd N`: a connected socket.
    Fd(i32),
}

/// FUSE options from `-o`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FuseOptions {
    mount: Vec<MountOption>,
    acl: SessionACL,
    kernel_cache: bool,
    direct_io: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    umask: u16,
    threads: Option<usize>,
    clone_fd: bool,
    readonly: bool,
    debug: bool,
    writeback_cache: bool,
    /// Read-ahead in bytes.
    readahead: Option<u32>,
}

/// The kernel's read-ahead on the mount (its default is 128K; the
/// largest FUSE read is 1M): sequential reads come in large requests,
/// several at once.
const READAHEAD: u32 = 1 << 20;

/// A parsed command line.
#[derive(Debug)]
struct Job {
    mountpoint: PathBuf,
    mode: Mode,
    connections: usize,
    fuse: FuseOptions,
    pidfile: Option<PathBuf>,
    readonly: bool,
    single: bool,
    verbose: bool,
}

/// Run nbdfuse with these arguments (without argv\[0\]); returns the
/// exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let job = match cli::finish(&TOOL, parse(args)) {
        Ok(job) => job,
        Err(status) => return status,
    };
    match run(*job) {
        Ok(()) => 0,
        Err(e) => {
            cli::fail("nbdfuse", &e);
            1
        }
    }
}

fn command() -> clap::Command {
    let flag = |name: &'static str| Arg::new(name).long(name).action(ArgAction::SetTrue);
    clap::Command::new("nbdfuse")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .infer_long_args(true)
        .args_override_self(true)
        .arg(flag("help"))
        .arg(flag("fuse-help"))
        .arg(flag("version").short('V'))
        .arg(
            Arg::new("connections")
                .short('C')
                .long("connections")
                .value_name("N")
                .action(ArgAction::Set),
        )
        .arg(Arg::new("d").short('d').action(ArgAction::SetTrue))
        .arg(Arg::new("f").short('f').action(ArgAction::SetTrue))
        .arg(
            Arg::new("o")
                .short('o')
                .value_name("FUSE-OPTION")
                .action(ArgAction::Append),
        )
        .arg(
            Arg::new("pidfile")
                .short('P')
                .long("pidfile")
                .alias("pid-file")
                .value_name("PIDFILE")
                .value_parser(clap::value_parser!(OsString))
                .action(ArgAction::Set),
        )
        .arg(flag("readonly").short('r').alias("read-only"))
        .arg(Arg::new("s").short('s').action(ArgAction::SetTrue))
        .arg(flag("verbose").short('v'))
        .arg(
            Arg::new("args")
                .num_args(0..)
                .trailing_var_arg(true)
                .allow_hyphen_values(true)
                .action(ArgAction::Append)
                .value_parser(clap::value_parser!(OsString)),
        )
}

fn parse(args: Vec<OsString>) -> Action<Job> {
    match parse_job(args) {
        Ok(job) => Action::Run(Box::new(job)),
        Err(action) => action,
    }
}

fn parse_job(args: Vec<OsString>) -> Result<Job, Action<Job>> {
    let line = CommandLine::split(args).map_err(|_| Action::Usage(String::new()))?;
    let m = cli::matches(command(), &line.args)?;
    if m.get_flag("help") {
        return Err(Action::Help);
    }
    if m.get_flag("fuse-help") {
        return Err(Action::Text(format!("{USAGE}{FUSE_HELP}")));
    }
    if m.get_flag("version") {
        return Err(Action::Version);
    }
    let connections = match m.get_one::<String>("connections") {
        None => 4,
        Some(s) => match s.trim().parse::<u32>() {
            Ok(n) if n >= 1 => n as usize,
            _ => {
                return Err(Action::Error(anyhow!(
                    "--connections parameter must be an unsigned integer >= 1"
                )))
            }
        },
    };
    let mut fuse = FuseOptions::default();
    for o in m.get_many::<String>("o").into_iter().flatten() {
        fuse_options(&mut fuse, o).map_err(Action::Error)?;
    }
    let words: Vec<OsString> = m
        .get_many::<OsString>("args")
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let Some((mountpoint, rest)) = words.split_first() else {
        return Err(Action::Usage(String::new()));
    };
    let mode = mode(&line, rest)?;
    Ok(Job {
        mountpoint: PathBuf::from(mountpoint),
        mode,
        connections,
        readonly: m.get_flag("readonly") || fuse.readonly,
        verbose: m.get_flag("verbose") || m.get_flag("d") || fuse.debug,
        fuse,
        pidfile: m.get_one::<OsString>("pidfile").map(PathBuf::from),
        single: m.get_flag("s"),
    })
}

/// What the words after MOUNTPOINT name.
fn mode(line: &CommandLine, rest: &[OsString]) -> Result<Mode, Action<Job>> {
    let usage = || Action::Usage(String::new());
    let (first, args) = rest.split_first().ok_or_else(usage)?;
    let str_arg = |i: usize| -> Result<String, Action<Job>> {
        args.get(i)
            .and_then(|a| a.to_str())
            .map(str::to_string)
            .ok_or_else(usage)
    };
    let exactly = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(usage())
        }
    };
    let target = |t: Transport| Mode::Target(Target::Uri(Uri::new(t, "")));
    match first.to_str() {
        Some("--command") | Some("--socket-activation") => {
            // `--command [ nbdkit -s ... ]` would be odd but is the same.
            let argv: Vec<OsString> = args
                .iter()
                .flat_map(|a| match line.command(a) {
                    Some(cmd) => cmd.to_vec(),
                    None => vec![a.clone()],
                })
                .collect();
            if argv.is_empty() {
                return Err(usage());
            }
            Ok(if first == "--command" {
                Mode::Command(argv)
            } else {
                Mode::Target(Target::Command(argv))
            })
        }
        Some("--fd") => {
            exactly(1)?;
            let s = str_arg(0)?;
            match s.parse::<i32>() {
                Ok(n) if n >= 0 => Ok(Mode::Fd(n)),
                _ => Err(Action::Error(anyhow!(
                    "could not parse --fd parameter: {s}"
                ))),
            }
        }
        Some("--tcp") => {
            exactly(2)?;
            let host = str_arg(0)?;
            let p = str_arg(1)?;
            let port = libnbd::uri::Uri::parse(&format!("nbd://x:{p}/"))
                .ok()
                .and_then(|u| match u.transport {
                    Transport::Tcp { port, .. } => Some(port),
                    _ => None,
                })
                .ok_or_else(|| Action::Error(anyhow!("could not parse port: {p}")))?;
            Ok(target(Transport::Tcp { host, port }))
        }
        Some("--unix") => {
            exactly(1)?;
            Ok(target(Transport::Unix(PathBuf::from(&args[0]))))
        }
        Some("--vsock") => {
            exactly(2)?;
            let (c, p) = (str_arg(0)?, str_arg(1)?);
            let cid = c
                .parse::<u32>()
                .map_err(|_| Action::Error(anyhow!("could not parse vsock cid: {c}")))?;
            let port = p
                .parse::<u32>()
                .map_err(|_| Action::Error(anyhow!("could not parse vsock port: {p}")))?;
            Ok(target(Transport::Vsock { cid, port }))
        }
        _ => {
            exactly(0)?;
            let t = line
                .target(first)
                .map_err(|e| Action::Error(anyhow!(cli::error_message(&e))))?;
            Ok(Mode::Target(t))
        }
    }
}

/// Apply one `-o` argument (`OPT[,OPT...]`).
fn fuse_options(f: &mut FuseOptions, list: &str) -> Result<()> {
    let num = |k: &str, v: &str, radix: u32| {
        u32::from_str_radix(v, radix).map_err(|_| anyhow!("fuse: invalid value for -o {k}={v}"))
    };
    for o in list.split(',').filter(|o| !o.is_empty()) {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        match (k, v) {
            ("allow_other", None) => f.acl = SessionACL::All,
            ("allow_root", None) => f.acl = SessionACL::RootAndOwner,
            ("auto_unmount", None) => f.mount.push(MountOption::AutoUnmount),
            ("default_permissions", None) => f.mount.push(MountOption::DefaultPermissions),
            ("kernel_cache", None) => f.kernel_cache = true,
            ("direct_io", None) => f.direct_io = true,
            ("ro", None) => {
                f.readonly = true;
                f.mount.push(MountOption::RO);
            }
            ("rw", None) => f.mount.push(MountOption::RW),
            ("dev", None) => f.mount.push(MountOption::Dev),
            ("nodev", None) => f.mount.push(MountOption::NoDev),
            ("suid", None) => f.mount.push(MountOption::Suid),
            ("nosuid", None) => f.mount.push(MountOption::NoSuid),
            ("exec", None) => f.mount.push(MountOption::Exec),
            ("noexec", None) => f.mount.push(MountOption::NoExec),
            ("atime", None) => f.mount.push(MountOption::Atime),
            ("noatime", None) => f.mount.push(MountOption::NoAtime),
            ("sync", None) => f.mount.push(MountOption::Sync),
            ("async", None) => f.mount.push(MountOption::Async),
            ("dirsync", None) => f.mount.push(MountOption::DirSync),
            ("fsname", Some(v)) => f.mount.push(MountOption::FSName(v.into())),
            ("subtype", Some(v)) => f.mount.push(MountOption::Subtype(v.into())),
            ("umask", Some(v)) => f.umask = (num(k, v, 8)? & 0o777) as u16,
            ("uid", Some(v)) => f.uid = Some(num(k, v, 10)?),
            ("gid", Some(v)) => f.gid = Some(num(k, v, 10)?),
            ("max_threads", Some(v)) => f.threads = Some(num(k, v, 10)?.clamp(1, 64) as usize),
            ("clone_fd", None) => f.clone_fd = true,
            ("writeback_cache", None) => f.writeback_cache = true,
            ("no_writeback_cache", None) => f.writeback_cache = false,
            ("max_readahead", Some(v)) => f.readahead = Some(num(k, v, 10)?),
            ("debug", None) => f.debug = true,
            ("auto_cache" | "noauto_cache" | "no_rofd_flush" | "noforget", None) => {}
            (
                "attr_timeout" | "entry_timeout" | "negative_timeout" | "ac_attr_timeout"
                | "remember" | "max_idle_threads",
                Some(_),
            ) => {}
            _ => bail!("fuse: unknown option(s): `-o {o}'"),
        }
    }
    Ok(())
}

/// The directory to mount on and the file's name in it (`None`: mount
/// over the regular file itself), as upstream decides it.
fn mount_target(mp: &Path) -> Result<(PathBuf, Option<OsString>)> {
    let bad = || {
        anyhow!(
            "{}: mountpoint must be \"directory\" or \"directory/filename\"",
            mp.display()
        )
    };
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => return Ok((mp.to_path_buf(), Some("nbd".into()))),
        Ok(m) if m.is_file() => return Ok((mp.to_path_buf(), None)),
        Ok(_) => return Err(bad()),
        Err(_) => {}
    }
    let name = mp.file_name().ok_or_else(bad)?;
    let parent = match mp.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(bad()),
    };
    if !parent.is_dir() {
        return Err(bad());
    }
    Ok((parent.to_path_buf(), Some(name.to_owned())))
}

/// A server run with `--command`, on a socket as its stdin and stdout;
/// stopped (SIGTERM, then SIGKILL) when the last connection goes.
struct CommandServer {
    child: Mutex<Option<Child>>,
}

impl Drop for CommandServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = std::time::Instant::now() + captive::KILL_TIMEOUT;
            while std::time::Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

fn spawn_command(argv: &[OsString]) -> Result<(OwnedFd, CommandServer)> {
    use std::os::unix::net::UnixStream;
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let theirs2 = theirs.try_clone().context("socketpair")?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(OwnedFd::from(theirs))
        .stdout(OwnedFd::from(theirs2));
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("run {}", argv[0].to_string_lossy()))?;
    Ok((
        OwnedFd::from(ours),
        CommandServer {
            child: Mutex::new(Some(child)),
        },
    ))
}

/// Connect as `mode` says: up to `n` connections where the server allows
/// multi-conn (one for `--command` and `--fd`).
async fn connect(mode: &Mode, n: usize) -> Result<MultiConn> {
    let opts = ConnectOptions::new();
    let conn = match mode {
        Mode::Target(t) => return Ok(t.connect_multi(&opts, n).await?),
        Mode::Fd(fd) => {
            // SAFETY: the user handed us this fd to own.
            let fd = unsafe { OwnedFd::from_raw_fd(*fd) };
            Connection::handshake(Stream::from_fd(fd)?, &opts).await?
        }
        Mode::Command(argv) => {
            let (fd, server) = spawn_command(argv)?;
            let mut c = Connection::handshake(Stream::from_fd(fd)?, &opts).await?;
            c.keep_alive(Arc::new(server));
            c
        }
    };
    Ok(MultiConn::new(vec![conn])?)
}

/// Write the pid to `path` (whole: a temporary file renamed into place).
fn write_pidfile(path: &Path) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("{}", path.display()))
}

/// Let the kernel read ahead `kb` KiB on this mount: the setting of the
/// backing device info the kernel made for it (128K by default), found
/// in `/proc/self/mountinfo` (a `stat` of the mount point would wait
/// for the session, which is not serving yet).
fn raise_readahead(mountpoint: &Path, kb: u32) {
    let Ok(mp) = mountpoint.canonicalize() else {
        return;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // The last mount on that path is ours.
    let dev = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && Path::new(f[4]) == mp).then(|| f[2].to_string())
        })
        .next_back();
    if let Some(dev) = dev {
        let _ = std::fs::write(
            format!("/sys/class/bdi/{dev}/read_ahead_kb"),
            kb.to_string(),
        );
    }
}

fn run(job: Job) -> Result<()> {
    let (mountpoint, file_name) = mount_target(&job.mountpoint)?;
    let mut b = if job.single {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1);
        b
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = b
        .thread_name("nbdfuse")
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the runtime: {e}"))?;
    let nbd = Arc::new(rt.block_on(connect(&job.mode, job.connections))?);
    let readonly = job.readonly || nbd.info().is_read_only();
    if job.verbose {
        libnbd::elog!(
            "nbdfuse: {} bytes, {} connection(s), read-only={readonly}",
            nbd.size(),
            nbd.len()
        );
    }
    let settings = Settings {
        file_name,
        readonly,
        // SAFETY: getuid and getgid cannot fail.
        uid: job.fuse.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
        gid: job.fuse.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
        umask: job.fuse.umask,
        kernel_cache: job.fuse.kernel_cache,
        direct_io: job.fuse.direct_io,
        writeback_cache: job.fuse.writeback_cache,
        verbose: job.verbose,
    };
    let mut config = Config::default();
    config.mount_options = job.fuse.mount.clone();
    if readonly && !config.mount_options.contains(&MountOption::RO) {
        config.mount_options.retain(|o| *o != MountOption::RW);
        config.mount_options.push(MountOption::RO);
    }
    config.acl = job.fuse.acl;
    config.n_threads = Some(if job.single {
        1
    } else {
        job.fuse.threads.unwrap_or(2)
    });
    config.clone_fd = job.fuse.clone_fd || !job.single;
    let fs = NbdFs::new(nbd.clone(), rt.handle().clone(), settings);
    let writes = fs.writes();
    let mut session = fuser::Session::new(fs, &mountpoint, &config)
        .map_err(|e| anyhow!("fuse: mount {}: {e}", mountpoint.display()))?;
    raise_readahead(&mountpoint, job.fuse.readahead.unwrap_or(READAHEAD) / 1024);
    // Mounted and past the kernel's INIT: ready.
    if let Some(p) = &job.pidfile {
        write_pidfile(p)?;
    }
    // A signal unmounts: the session ends and the clean-up below runs.
    let unmounter = Arc::new(Mutex::new(session.unmount_callable()));
    let mp = mountpoint.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        let r = unmounter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unmount();
        if r.is_err() {
            // Busy: detach it, the kernel ends the session when the
            // last user goes.
            if let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid C string.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    });
    let served = session.run();
    // Unmounted: flush what was written, close, stop a captive server.
    let end = rt.block_on(async {
        let flush = async {
            let _ = writes.drain().await;
            if !readonly && nbd.info().can_flush() {
                fs::flush_once(&nbd)
                    .await
                    .map_err(|e| anyhow!("flush: {e}"))?;
            }
            nbd.disconnect()
                .await
                .map_err(|e| anyhow!("disconnect: {e}"))
        };
        tokio::time::timeout(Duration::from_secs(30), flush)
            .await
            .unwrap_or_else(|_| Err(anyhow!("flush: timed out")))
    });
    drop(nbd);
    captive::kill_all();
    rt.shutdown_timeout(Duration::from_secs(1));
    served.map_err(|e| anyhow!("fuse: {e}"))?;
    end?;
    if writes.any_failed() {
        bail!("some writes failed (see above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn job(s: &str) -> Job {
        match parse(words(s)) {
            Action::Run(j) => *j,
            _ => panic!("{s}: not a job"),
        }
    }

    fn is_usage(s: &str) -> bool {
        matches!(parse(words(s)), Action::Usage(_))
    }

    #[test]
    fn modes() {
        let j = job("mp nbd://localhost/x");
        assert_eq!(j.mountpoint, PathBuf::from("mp"));
        assert!(matches!(j.mode, Mode::Target(Target::Uri(ref u)) if u.export_name == "x"));
        assert_eq!(j.connections, 4);
        let j = job("-r -C 2 -P p mp [ nbdkit memory 1G ]");
        assert!(j.readonly);
        assert_eq!(j.connections, 2);
        assert_eq!(j.pidfile, Some(PathBuf::from("p")));
        assert!(matches!(j.mode, Mode::Target(Target::Command(ref v)) if v.len() == 3));
        let j = job("mp --command nbdkit -s memory 1G");
        assert_eq!(j.mode, Mode::Command(words("nbdkit -s memory 1G")));
        let j = job("mp --socket-activation nbdkit memory 1G");
        assert_eq!(
            j.mode,
            Mode::Target(Target::Command(words("nbdkit memory 1G")))
        );
        assert_eq!(job("mp --fd 5").mode, Mode::Fd(5));
        let j = job("mp --tcp localhost 10809");
        let Mode::Target(Target::Uri(u)) = j.mode else {
            panic!()
        };
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "localhost".into(),
                port: 10809
            }
        );
        let j = job("mp --unix /tmp/s");
        let Mode::Target(Target::Uri(u)) = j.mode else {
            panic!()
        };
        assert_eq!(u.transport, Transport::Unix("/tmp/s".into()));
        let j = job("-s -v mp --vsock 2 10809");
        assert!(j.single && j.verbose);
        assert!(is_usage("mp"));
        assert!(is_usage(""));
        assert!(is_usage("mp --tcp localhost"));
        assert!(is_usage("mp nbd://a nbd://b"));
        assert!(is_usage("-x mp nbd://a"));
        assert!(matches!(parse(words("-C 0 mp nbd://a")), Action::Error(_)));
        assert!(matches!(parse(words("mp --fd x")), Action::Error(_)));
        assert!(matches!(parse(words("mp disk.img")), Action::Error(_)));
        assert!(matches!(parse(words("--version")), Action::Version));
        assert!(matches!(parse(words("--help")), Action::Help));
    }

    #[test]
    fn fuse_option_lists() {
        let j = job("-o allow_other,kernel_cache -o uid=5,umask=022 -o ro mp nbd://a");
        assert_eq!(j.fuse.acl, SessionACL::All);
        assert!(j.fuse.kernel_cache && j.readonly);
        assert_eq!(j.fuse.uid, Some(5));
        assert_eq!(j.fuse.umask, 0o22);
        assert!(j.fuse.mount.contains(&MountOption::RO));
        let mut f = FuseOptions::default();
        assert!(fuse_options(&mut f, "nosuch").is_err());
        assert!(fuse_options(&mut f, "uid=x").is_err());
    }

    #[test]
    fn mount_targets() {
        let d = tempfile::tempdir().unwrap();
        let (m, n) = mount_target(d.path()).unwrap();
        assert_eq!((m.as_path(), n), (d.path(), Some("nbd".into())));
        let f = d.path().join("disk.raw");
        let (m, n) = mount_target(&f).unwrap();
        assert_eq!((m.as_path(), n), (d.path(), Some("disk.raw".into())));
        std::fs::write(&f, b"").unwrap();
        let (m, n) = mount_target(&f).unwrap();
        assert_eq!((m, n), (f.clone(), None));
        assert!(mount_target(Path::new("/nonexistent/x/y")).is_err());
    }
}
