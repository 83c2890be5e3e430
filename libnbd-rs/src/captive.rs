//! Captive servers: run `[ cmd args ... ]` with systemd socket
//! activation and connect to it, as libnbd's
//! `nbd_connect_systemd_socket_activation` does.
//!
//! A listening Unix socket is made in a private temporary directory and
//! passed to the command as fd 3, with `LISTEN_FDS=1` and
//! `LISTEN_PID=<the child's pid>` in its environment. `nbdkit`,
//! `qemu-nbd` and our own `nbdkit` all understand this. The arguments
//! are passed verbatim (`qemu-nbd -f qcow2 disk.qcow2`).
//!
//! The server lives as long as its [`CaptiveServer`] handle: connections
//! made with [`CaptiveServer::connect`] hold a reference, and the last
//! one to go sends the server `SIGTERM` and waits for it. The child also
//! gets `SIGTERM` if the tool dies (Linux `PR_SET_PDEATHSIG`, set up
//! from a thread that lives as long as the process), so a crashed or
//! killed tool does not leave it behind.
//!
//! # Signals
//!
//! A tool killed by a signal runs no destructors. A tool that runs
//! captive servers should, early in `main` inside its tokio runtime,
//! call [`kill_on_signals`]: on `SIGINT`, `SIGTERM` or `SIGHUP` it stops
//! every captive server still running and exits with status 128 + the
//! signal number. A tool that handles signals itself should call
//! [`kill_all`] before exiting. (When Ctrl-C is typed in a terminal the
//! server gets the `SIGINT` too, being in the same process group.)
//!
//! # ssh tunnels
//!
//! `nbd+ssh://` connections ([`crate::client::SshTarget`]) run `ssh`
//! the same way: forked from the same long-lived thread with
//! `PR_SET_PDEATHSIG`, counted among the children [`kill_all`] stops.
//! Its stdin and stdout are one end of a socket pair, the connection
//! the other. When the connection goes, our end is shut down (ssh sees
//! EOF and exits once the server has closed its side); ssh still
//! running a second later gets `SIGTERM`.
//!
//! # Tool arguments
//!
//! [`Target::from_args`] takes "a URI or `[ cmd args ... ]`" from a
//! command line, and [`Target::connect`] connects to either.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{
    ConnectOptions, Connection, Error, MultiConn, Negotiation, Result, SshTarget, Stream, Transport,
};
use crate::uri::Uri;

/// The fd a socket-activated server gets its socket on.
pub const LISTEN_FD: RawFd = 3;
/// How long a server has to exit after `SIGTERM` before it gets
/// `SIGKILL`.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Pids of captive servers still running, for [`kill_all`].
static CHILDREN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn children() -> std::sync::MutexGuard<'static, Option<HashSet<i32>>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server started with socket activation. Dropping it stops the
/// server (`SIGTERM`, then `SIGKILL` after [`KILL_TIMEOUT`]) and
/// removes its socket directory.
#[derive(Debug)]
pub struct CaptiveServer {
    child: Mutex<Option<Child>>,
    pid: u32,
    program: String,
    socket: PathBuf,
    dir: Option<tempfile::TempDir>,
}

/// Everything the child needs after `fork`, allocated beforehand so
/// that nothing is allocated between `fork` and `exec`.
struct ExecPlan {
    program: CString,
    /// NUL-terminated argument array (pointers into `args`).
    argv: Vec<*const libc::c_char>,
    _args: Vec<CString>,
    /// NUL-terminated environment (pointers into `env` and `pid_var`).
    envp: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL.
    pid_var: Box<[u8; 32]>,
    listen_fd: RawFd,
    parent: libc::pid_t,
}

// SAFETY: the raw pointers point into buffers owned by the plan itself;
// the plan is only used by the child process after fork.
unsafe impl Send for ExecPlan {}
unsafe impl Sync for ExecPlan {}

const PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    fn new(argv: &[OsString], listen_fd: RawFd) -> io::Result<ExecPlan> {
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte")
            })
        };
        let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<io::Result<_>>()?;
        let program = args[0].clone();
        let mut argvp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argvp.push(std::ptr::null());

        let mut env = Vec::new();
        for (k, v) in std::env::vars_os() {
            if matches!(
                k.as_bytes(),
                b"LISTEN_PID" | b"LISTEN_FDS" | b"LISTEN_FDNAMES"
            ) {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            if let Ok(c) = CString::new(kv) {
                env.push(c);
            }
        }
        env.push(CString::new("LISTEN_FDS=1").expect("no NUL"));
        let mut pid_var = Box::new([0u8; 32]);
        pid_var[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(pid_var.as_ptr().cast());
        envp.push(std::ptr::null());
        Ok(ExecPlan {
            program,
            argv: argvp,
            _args: args,
            envp,
            _env: env,
            pid_var,
            listen_fd,
            // SAFETY: getpid cannot fail.
            parent: unsafe { libc::getpid() },
        })
    }

    /// Runs in the child between fork and exec: only async-signal-safe
    /// calls, no allocation. Returns only on failure.
    fn exec(&mut self) -> io::Result<()> {
        // SAFETY: plain syscalls on fds and buffers we own.
        unsafe {
            // Die with the parent, unless it already died.
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
            if libc::getppid() != self.parent {
                return Err(io::Error::other("parent exited"));
            }
            // The socket on fd 3, inherited across exec.
            if self.listen_fd == LISTEN_FD {
                let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
                if flags < 0 || libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(self.listen_fd, LISTEN_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // LISTEN_PID is our own pid, known only now.
            let mut digits = [0u8; 20];
            let mut n = libc::getpid() as u64;
            let mut len = 0;
            loop {
                digits[len] = b'0' + (n % 10) as u8;
                len += 1;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            let p = PID_PREFIX.len();
            for i in 0..len {
                self.pid_var[p + i] = digits[len - 1 - i];
            }
            self.pid_var[p + len] = 0;
            libc::execvpe(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
            Err(io::Error::last_os_error())
        }
    }
}

impl CaptiveServer {
    /// Start `argv` (`["qemu-nbd", "-f", "qcow2", "disk.qcow2"]`) with a
    /// listening socket as fd 3. The server may still be starting when
    /// this returns; connecting waits for it (the socket is already
    /// listening).
    pub fn spawn<I, S>(argv: I) -> Result<CaptiveServer>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let argv: Vec<OsString> = argv.into_iter().map(|a| a.as_ref().to_owned()).collect();
        if argv.is_empty() {
            return Err(Error::InvalidArgument(
                "captive server: empty command".into(),
            ));
        }
        let program = argv[0].to_string_lossy().into_owned();
        let dir = tempfile::Builder::new()
            .prefix("libnbd-rs")
            .tempdir()
            .map_err(|e| Error::io("captive server: create temporary directory", e))?;
        let socket = dir.path().join("sock");
        // std's listener is close-on-exec; the child gets a dup on fd 3.
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|e| Error::io(format!("captive server: bind {}", socket.display()), e))?;
        let mut plan = ExecPlan::new(&argv, listener.as_raw_fd())
            .map_err(|e| Error::io(format!("captive server: {program}"), e))?;
        let mut cmd = Command::new(&argv[0]);
        // stdin, stdout and stderr are inherited, as with libnbd
        // (`nbdkit sh -` reads its script from stdin).
        cmd.args(&argv[1..]);
        // SAFETY: the closure only makes async-signal-safe calls on
        // memory prepared before fork (see ExecPlan::exec).
        unsafe {
            cmd.pre_exec(move || plan.exec());
        }
        let child = on_spawner_thread(move || cmd.spawn())
            .map_err(|e| Error::io(format!("captive server: run {program}"), e))?;
        // Our copy of the socket must go, so connecting fails (rather
        // than hangs) if the server dies.
        drop(listener);
        let pid = child.id();
        children()
            .get_or_insert_with(HashSet::new)
            .insert(pid as i32);
        Ok(CaptiveServer {
            child: Mutex::new(Some(child)),
            pid,
            program,
            socket,
            dir: Some(dir),
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The transport to reach the server.
    pub fn transport(&self) -> Transport {
        Transport::Unix(self.socket.clone())
    }

    /// Has the server exited? (Its status if so.)
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        match self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    async fn annotate(&self, e: Error) -> Error {
        // If the server died, say so: that is the real error.
        tokio::time::sleep(Duration::from_millis(20)).await;
        match self.try_wait() {
            Ok(Some(status)) => Error::io(
                format!("captive server {} exited ({status})", self.program),
                io::Error::other(e.to_string()),
            ),
            _ => e,
        }
    }

    /// Connect to the server and negotiate (option mode). The
    /// negotiation, and the connection it leads to, keep the server
    /// alive.
    pub async fn negotiate(self: &Arc<Self>, opts: &ConnectOptions) -> Result<Negotiation> {
        let r = async {
            let s = Stream::connect(&self.transport()).await?;
            Negotiation::start(s, opts).await
        }
        .await;
        let mut n = match r {
            Ok(n) => n,
            Err(e) => return Err(self.annotate(e).await),
        };
        n.keep_alive(self.clone());
        Ok(n)
    }

    /// Connect to the server and open the export named in `opts`. The
    /// connection keeps the server alive.
    pub async fn connect(self: &Arc<Self>, opts: &ConnectOptions) -> Result<Connection> {
        let mut n = self.negotiate(opts).await?;
        match n.go().await {
            Ok(c) => Ok(c),
            Err(e) => Err(self.annotate(e).await),
        }
    }

    /// Stop the server: `SIGTERM`, wait up to [`KILL_TIMEOUT`], then
    /// `SIGKILL`. Returns its exit status (`None` if it had already been
    /// reaped, by [`kill_all`] for instance).
    pub fn kill(&self) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = guard.take()?;
        let status = stop(&mut child);
        if let Some(set) = children().as_mut() {
            set.remove(&(self.pid as i32));
        }
        status
    }
}

/// The `ssh` process of an `nbd+ssh` connection (see the module doc).
#[derive(Debug)]
pub struct SshTunnel {
    child: Mutex<Option<Child>>,
    pid: u32,
    host: String,
    /// A duplicate of our end of the socket pair, shut down on drop.
    ours: Option<std::os::fd::OwnedFd>,
}

/// How long ssh has to exit by itself once the connection is closed.
const SSH_EXIT_TIMEOUT: Duration = Duration::from_secs(1);

impl SshTunnel {
    /// Run ssh for `target`; returns our end of its stdin/stdout.
    pub(crate) fn spawn(target: &SshTarget) -> Result<(std::os::fd::OwnedFd, Arc<SshTunnel>)> {
        use std::os::fd::OwnedFd;
        use std::process::Stdio;
        let argv = target.argv()?;
        let ctx = |what: &str| format!("nbd+ssh: {what}");
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| Error::io(ctx("socketpair"), e))?;
        let theirs = OwnedFd::from(theirs);
        let theirs2 = theirs.try_clone().map_err(|e| Error::io(ctx("dup"), e))?;
        let ours = OwnedFd::from(ours);
        let dup = ours.try_clone().ok();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::from(theirs2));
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        // SAFETY: only async-signal-safe calls, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() != parent {
                    return Err(io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let child =
            on_spawner_thread(move || cmd.spawn()).map_err(|e| Error::io(ctx("run ssh"), e))?;
        // `cmd` (and with it the child's ends) is gone: ssh exiting
        // gives us EOF.
        let pid = child.id();
        children()
            .get_or_insert_with(HashSet::new)
            .insert(pid as i32);
        let t = SshTunnel {
            child: Mutex::new(Some(child)),
            pid,
            host: target.host.clone(),
            ours: dup,
        };
        Ok((ours, Arc::new(t)))
    }

    /// The ssh process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&self) -> Option<ExitStatus> {
        let mut g = self.child.lock().unwrap_or_else(|e| e.into_inner());
        g.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// `e` ended a connection over this tunnel: if ssh exited (bad
    /// host, authentication, no nc there...), say so, as that is the
    /// real error and its messages are on stderr above ours.
    pub(crate) async fn annotate(&self, e: Error) -> Error {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            if let Some(status) = self.try_wait() {
                let how = match status.code() {
                    Some(c) => format!("exit status {c}"),
                    None => status.to_string(),
                };
                return Error::io(
                    format!("nbd+ssh: ssh to {} failed ({how})", self.host),
                    io::Error::other(e.to_string()),
                );
            }
            if Instant::now() >= deadline {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SshTunnel {
    fn drop(&mut self) {
        if let Some(fd) = self.ours.take() {
            crate::client::shutdown_socket(&fd);
        }
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = guard.take() else {
            return;
        };
        let deadline = Instant::now() + SSH_EXIT_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
        stop(&mut child);
        if let Some(set) = children().as_mut() {
            set.remove(&(self.pid as i32));
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Run `f` on a thread that lives as long as the process.
///
/// Children are forked there because `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child exits, and tokio's threads come and go
/// (a blocking-pool thread exits when idle, a test's thread when the
/// test ends).
fn on_spawner_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    let (rtx, rrx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = rtx.send(f());
    });
    {
        let mut guard = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("nbd-captive".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .expect("cannot start the captive server thread");
            tx
        });
        tx.send(job).expect("the captive server thread has gone");
    }
    rrx.recv().expect("the captive server thread has gone")
}

/// SIGTERM, wait, SIGKILL.
fn stop(child: &mut Child) -> Option<ExitStatus> {
    match child.try_wait() {
        Ok(Some(s)) => return Some(s),
        Ok(None) => {}
        Err(_) => return None,
    }
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return None,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for CaptiveServer {
    fn drop(&mut self) {
        self.kill();
        // TempDir removes the socket and the directory.
        self.dir.take();
    }
}

/// Stop every captive server still running (`SIGTERM`, and reap them).
/// For tools that handle signals themselves; see [`kill_on_signals`].
pub fn kill_all() {
    let pids: Vec<i32> = children().take().unwrap_or_default().into_iter().collect();
    kill_pids(pids);
}

/// `SIGTERM` these children, wait for them (`SIGKILL` after
/// [`KILL_TIMEOUT`]) and reap them.
fn kill_pids(pids: Vec<i32>) {
    for &pid in &pids {
        // SAFETY: signalling our own children.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    for pid in pids {
        loop {
            let mut st = 0;
            // SAFETY: non-blocking wait for our own child.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
            if r != 0 {
                break; // reaped, or not ours any more
            }
            if Instant::now() >= deadline {
                // SAFETY: as above.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut st, 0);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Work to do on a signal before exiting, besides stopping captive
/// processes (a tool's servers run in its own process: their clean
/// close, as a spawned server's on `SIGTERM`).
static ON_SIGNAL: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Run `f` when [`kill_on_signals`]'s handler fires, before the exit
/// (on a thread that may block).
pub fn on_signal(f: fn()) {
    ON_SIGNAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(f);
}

/// Install handlers for `SIGINT`, `SIGTERM` and `SIGHUP` that stop every
/// captive server (and run what [`on_signal`] registered) and exit with
/// status 128 + the signal number. Call once, from within a tokio
/// runtime, before starting servers.
pub fn kill_on_signals() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let sig = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
        };
        kill_all();
        let hooks = ON_SIGNAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for f in hooks {
            crate::backend::run_blocking(f);
        }
        std::process::exit(128 + sig);
    });
    Ok(())
}

/// What a tool's NBD argument names: a URI, or a command to run as a
/// captive server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `nbd://...`, `nbd+unix://...`, ...
    Uri(Uri),
    /// `[ cmd args ... ]`, without the brackets.
    Command(Vec<OsString>),
}

impl Target {
    /// Take one target from the front of `args`: `[`, a command and its
    /// arguments, `]` (the first `]` ends it); or a URI. Returns the
    /// target and how many arguments it used.
    pub fn from_args<S: AsRef<OsStr>>(args: &[S]) -> Result<(Target, usize)> {
        let first = args
            .first()
            .ok_or_else(|| Error::InvalidArgument("expected an NBD URI or [ command ]".into()))?
            .as_ref();
        if first == "[" {
            let end = args
                .iter()
                .position(|a| a.as_ref() == "]")
                .ok_or_else(|| Error::InvalidArgument("'[' without a matching ']'".into()))?;
            if end == 1 {
                return Err(Error::InvalidArgument("empty command in [ ]".into()));
            }
            let cmd = args[1..end].iter().map(|a| a.as_ref().to_owned()).collect();
            return Ok((Target::Command(cmd), end + 1));
        }
        let s = first.to_str().ok_or_else(|| {
            Error::InvalidArgument(format!("{first:?} is not an NBD URI or [ command ]"))
        })?;
        if !Uri::is_nbd_uri(s) {
            return Err(Error::InvalidArgument(format!(
                "{s:?} is not an NBD URI or [ command ]"
            )));
        }
        Ok((Target::Uri(Uri::parse(s)?), 1))
    }

    /// Connect and open the export: the URI's, or for a command the one
    /// named in `opts`. A command's server stops when the connection is
    /// dropped.
    pub async fn connect(&self, opts: &ConnectOptions) -> Result<Connection> {
        match self {
            Target::Uri(u) => u.connect(opts).await,
            Target::Command(argv) => Arc::new(CaptiveServer::spawn(argv)?).connect(opts).await,
        }
    }

    /// Connect and stop in negotiation (option mode), for listing
    /// exports and the like.
    pub async fn negotiate(&self, opts: &ConnectOptions) -> Result<Negotiation> {
        match self {
            Target::Uri(u) => u.negotiate(opts).await,
            Target::Command(argv) => Arc::new(CaptiveServer::spawn(argv)?).negotiate(opts).await,
        }
    }

    /// Up to `n` connections (more than one only if the server
    /// advertises multi-conn). A command is run once, and all the
    /// connections go to it.
    pub async fn connect_multi(&self, opts: &ConnectOptions, n: usize) -> Result<MultiConn> {
        match self {
            Target::Uri(u) => MultiConn::open(n, || u.connect(opts)).await,
            Target::Command(argv) => {
                let server = Arc::new(CaptiveServer::spawn(argv)?);
                MultiConn::open(n, || server.connect(opts)).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(bin: &str) -> bool {
        crate::testing::require(&[bin])
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks the pid exists.
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }

    #[test]
    fn target_from_args() {
        let a = ["[", "qemu-nbd", "-f", "qcow2", "x", "]", "rest"];
        let (t, n) = Target::from_args(&a).unwrap();
        assert_eq!(n, 6);
        assert_eq!(
            t,
            Target::Command(
                ["qemu-nbd", "-f", "qcow2", "x"]
                    .iter()
                    .map(OsString::from)
                    .collect()
            )
        );
        let (t, n) = Target::from_args(&["nbd://h/x", "y"]).unwrap();
        assert_eq!(n, 1);
        assert!(matches!(t, Target::Uri(u) if u.export_name == "x"));
        assert!(Target::from_args(&["[", "]"]).is_err());
        assert!(Target::from_args(&["[", "nbdkit"]).is_err());
        assert!(Target::from_args(&["disk.img"]).is_err());
        assert!(Target::from_args::<&str>(&[]).is_err());
        let e = Target::from_args(&["nbd://h:x/"]).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn environment_and_fd() {
        if !have("sh") {
            return;
        }
        // The child sees LISTEN_PID equal to its own pid, LISTEN_FDS=1,
        // and a listening Unix socket on fd 3.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$LISTEN_PID $$ $LISTEN_FDS\" > {o}; \
             case \"$(readlink /proc/$$/fd/3)\" in socket:*) echo fd3 >> {o};; esac",
            o = out.display()
        );
        let s = CaptiveServer::spawn(["sh", "-c", &script]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(
            first[0], first[1],
            "LISTEN_PID must be the child's pid: {text}"
        );
        assert_eq!(first[0], s.pid().to_string());
        assert_eq!(first[2], "1");
        assert_eq!(lines.next(), Some("fd3"));
    }

    #[test]
    fn missing_program() {
        let e = CaptiveServer::spawn(["/nonexistent/nbd-server-xyz"]).unwrap_err();
        assert!(
            e.to_string().contains("run /nonexistent/nbd-server-xyz"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn nbdkit_captive_leaves_nothing_behind() {
        if !have("nbdkit") {
            return;
        }
        let server = Arc::new(CaptiveServer::spawn(["nbdkit", "memory", "1M"]).unwrap());
        let pid = server.pid();
        let dir = server.socket_path().parent().unwrap().to_owned();
        let c = server.connect(&ConnectOptions::new()).await.unwrap();
        drop(server);
        assert_eq!(c.size(), 1 << 20);
        assert!(c.uri().is_none(), "libnbd gives no URI for captive servers");
        assert!(alive(pid));
        c.pwrite(&[7u8; 512], 0, 0).await.unwrap();
        assert_eq!(c.pread_vec(512, 0, 0).await.unwrap(), vec![7u8; 512]);
        drop(c);
        assert!(!alive(pid), "nbdkit {pid} is still running");
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }

    #[tokio::test]
    async fn target_command_and_dead_server() {
        if !have("nbdkit") {
            return;
        }
        let (t, _) = Target::from_args(&["[", "nbdkit", "null", "2M", "]"]).unwrap();
        let c = t.connect(&ConnectOptions::new()).await.unwrap();
        assert_eq!(c.size(), 2 << 20);
        c.disconnect().await.unwrap();
        drop(c);
        let m = t.connect_multi(&ConnectOptions::new(), 3).await.unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.pread_vec(4096, 0, 0).await.unwrap(), vec![0; 4096]);
        // A server that fails at once gives an error, not a hang.
        let (t, _) = Target::from_args(&["[", "nbdkit", "no-such-plugin-xyz", "]"]).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(30), t.connect(&ConnectOptions::new()))
            .await
            .expect("connect must not hang")
            .unwrap_err();
        crate::elog!("dead server: {e}");
    }

    #[test]
    fn kill_pids_stops_children() {
        if !have("sleep") {
            return;
        }
        let s = CaptiveServer::spawn(["sleep", "60"]).unwrap();
        let pid = s.pid() as i32;
        assert!(alive(s.pid()));
        // What kill_all does, for this child only (other tests' children
        // run in this process too).
        assert!(children().as_mut().unwrap().remove(&pid));
        kill_pids(vec![pid]);
        assert!(!alive(s.pid()));
        // The handle copes with a child reaped behind its back.
        drop(s);
    }
}
