//! # exitwhen: exit gracefully when an event happens
//!
//! Built-in events are a file being created or deleted, a pipe being
//! closed and a process exiting; a script can define any other. Once an
//! event has happened nbdkit refuses new clients, waits for the current
//! ones to disconnect, and exits. Events are checked when a client
//! connects or disconnects, and every `exit-when-poll` seconds while no
//! client is connected; an event that has already happened when nbdkit
//! starts makes it exit at once.
//!
//! ```text
//! nbdkit --filter=exitwhen memory 1G exit-when-file-created=/tmp/stop
//! nbdkit --filter=exitwhen memory 1G exit-when-process-exits=1234
//! ```
//!
//! ## Parameters
//!
//! Each may be given several times; nbdkit exits when any of
//! the events happens; without any the filter does nothing.
//!
//! - `exit-when-file-created=FILENAME`, `exit-when-file-deleted=FILENAME`:
//!   when the file comes into existence or goes away.
//! - `exit-when-pipe-closed=FD`: when the write end of the pipe whose read
//!   end nbdkit inherited as file descriptor FD is closed (nothing is read
//!   from the pipe).
//! - `exit-when-process-exits=PID`: when process PID exits (there is a
//!   small race if the PID is reused; the pipe is more reliable).
//! - `exit-when-script=SCRIPT`: run SCRIPT (with `/bin/sh -c`; use
//!   absolute paths, as nbdkit may change directory when it daemonizes).
//!   Exit status 0: no event; 88: the event happened; 1-87: an error is
//!   logged and there is no event; 89 and up are reserved (no event).
//! - `exit-when-poll=SECS`: how often to check while idle (default 60).
//!
//! Unlike `--exit-with-parent`, which makes nbdkit exit at once when its
//! parent dies, clients connected when the event happens may finish.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libnbd::server::ServerContext;
use libnbd::{
    ConfigError, ConfigResult, Error, Filter, FilterEntry, Handle, Next, OpenContext, Params,
    Result,
};

use crate::exitlast::ServerSlot;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "exitwhen",
    help: "\
exit-when-file-created=FILENAME  Exit when FILENAME is created.
exit-when-file-deleted=FILENAME  Exit when FILENAME is deleted.
exit-when-pipe-closed=FD         Exit when the pipe on FD is closed.
exit-when-process-exits=PID      Exit when process PID exits.
exit-when-script=SCRIPT          Exit when SCRIPT exits with code 88.
exit-when-poll=SECS              Seconds between checks when idle (default: 60).",
    create,
};

/// An event to watch for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    FileCreated(PathBuf),
    FileDeleted(PathBuf),
    PipeClosed(RawFd),
    ProcessExits(i32),
    Script(String),
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(build(p)?))
}

fn build(p: &mut Params) -> ConfigResult<ExitWhen> {
    let mut events = Vec::new();
    for f in p.take_all("exit-when-file-created") {
        events.push(Event::FileCreated(f.into()));
    }
    for f in p.take_all("exit-when-file-deleted") {
        events.push(Event::FileDeleted(f.into()));
    }
    for v in p.take_all("exit-when-pipe-closed") {
        let fd = v
            .trim()
            .parse::<RawFd>()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| {
                ConfigError::new(format!(
                    "exit-when-pipe-closed: '{v}' is not a file descriptor"
                ))
            })?;
        // Safety: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(ConfigError::new(format!(
                "exit-when-pipe-closed: file descriptor {fd} is not open"
            )));
        }
        events.push(Event::PipeClosed(fd));
    }
    for v in p.take_all("exit-when-process-exits") {
        let pid = v
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ConfigError::new(format!(
                    "exit-when-process-exits: '{v}' is not a process ID"
                ))
            })?;
        events.push(Event::ProcessExits(pid));
    }
    for s in p.take_all("exit-when-script") {
        events.push(Event::Script(s));
    }
    let poll = p.take_parsed::<f64>("exit-when-poll")?.unwrap_or(60.0);
    if !(poll.is_finite() && poll > 0.0) {
        return Err(ConfigError::new(format!(
            "exit-when-poll: must be a number of seconds > 0, not {poll}"
        )));
    }
    Ok(ExitWhen {
        shared: Arc::new(Shared {
            events,
            poll: Duration::from_secs_f64(poll),
            handles: AtomicUsize::new(0),
            exiting: AtomicBool::new(false),
            server: ServerSlot::default(),
        }),
    })
}

struct Shared {
    events: Vec<Event>,
    poll: Duration,
    /// Exports open now.
    handles: AtomicUsize,
    /// An event has happened.
    exiting: AtomicBool,
    /// The server to stop.
    server: ServerSlot,
}

fn happened(e: &Event) -> bool {
    match e {
        Event::FileCreated(p) => p.exists(),
        Event::FileDeleted(p) => !p.exists(),
        Event::PipeClosed(fd) => {
            let mut pfd = libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // Safety: one pollfd, no waiting.
            let r = unsafe { libc::poll(&mut pfd, 1, 0) };
            r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
        }
        Event::ProcessExits(pid) => {
            matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None),
                Err(nix::errno::Errno::ESRCH)
            )
        }
        Event::Script(s) => {
            let status = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(s)
                .stdin(std::process::Stdio::null())
                .status();
            match status.map(|st| st.code()) {
                Ok(Some(0)) => false,
                Ok(Some(88)) => true,
                Ok(Some(c @ 1..=87)) => {
                    libnbd::elog!(
                        "nbdkit: exitwhen: exit-when-script: script exited with code {c}"
                    );
                    false
                }
                Ok(Some(c)) => {
                    libnbd::elog!(
                        "nbdkit: exitwhen: exit-when-script: script exited with reserved code {c}"
                    );
                    false
                }
                Ok(None) => {
                    libnbd::elog!(
                        "nbdkit: exitwhen: exit-when-script: script was killed by a signal"
                    );
                    false
                }
                Err(e) => {
                    libnbd::elog!("nbdkit: exitwhen: exit-when-script: {e}");
                    false
                }
            }
        }
    }
}

impl Shared {
    /// Has any event happened (now or before)? Blocking (scripts).
    fn check(&self) -> bool {
        if self.exiting.load(Ordering::SeqCst) {
            return true;
        }
        if let Some(e) = self.events.iter().find(|e| happened(e)) {
            libnbd::debug!("exitwhen: event {e:?} happened");
            self.exiting.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Exit now if an event has happened and nobody is connected; says
    /// whether it did.
    fn exit_if_idle(&self) -> bool {
        if self.handles.load(Ordering::SeqCst) == 0 && self.check() {
            libnbd::debug!("exitwhen: exiting");
            self.server.shutdown();
            return true;
        }
        false
    }
}

struct ExitWhen {
    shared: Arc<Shared>,
}

#[async_trait]
impl Filter for ExitWhen {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let s = self.shared.clone();
        if !s.events.is_empty() {
            let triggered = tokio::task::spawn_blocking(move || s.check())
                .await
                .unwrap_or(true);
            if triggered {
                let e = Error::new(
                    libnbd::protocol::errno::ESHUTDOWN,
                    "exitwhen: nbdkit is exiting: rejecting new connection",
                );
                libnbd::elog!("nbdkit: {}", e.msg);
                return Err(e);
            }
        }
        let next = next.open(ctx).await?;
        self.shared.handles.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(ExitWhenHandle {
            next,
            shared: self.shared.clone(),
        }))
    }

    fn after_fork(&self, server: &Arc<ServerContext>) -> Result<()> {
        self.shared.server.set(server);
        let s = self.shared.clone();
        if s.events.is_empty() {
            return Ok(());
        }
        if s.check() {
            libnbd::debug!("exitwhen: an event happened before nbdkit started: exiting");
            s.server.shutdown();
            return Ok(());
        }
        std::thread::Builder::new()
            .name("exitwhen".into())
            .spawn(move || loop {
                std::thread::sleep(s.poll);
                if s.exit_if_idle() {
                    return;
                }
            })
            .map_err(|e| Error::eio(format!("exitwhen: cannot start the polling thread: {e}")))?;
        Ok(())
    }
}

struct ExitWhenHandle {
    next: Box<dyn Handle>,
    shared: Arc<Shared>,
}

impl Drop for ExitWhenHandle {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::SeqCst) == 1 && !self.shared.events.is_empty()
        {
            // Checking may run a script: not on the server's threads.
            let s = self.shared.clone();
            let _ = std::thread::Builder::new()
                .name("exitwhen-check".into())
                .spawn(move || {
                    s.exit_if_idle();
                });
        }
    }
}

#[async_trait]
impl Handle for ExitWhenHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn events(words: &[&str]) -> ConfigResult<Vec<Event>> {
        let mut p = params(words);
        let f = build(&mut p)?;
        assert!(p.items().is_empty(), "{:?}", p.items());
        Ok(f.shared.events.clone())
    }

    #[test]
    fn exitwhen_parameters() {
        assert_eq!(
            events(&[
                "exit-when-file-created=/a",
                "exit-when-file-deleted=/b",
                "exit-when-process-exits=1",
                "exit-when-script=exit 0",
                "exit-when-poll=0.5",
                "exit-when-pipe-closed=2",
            ])
            .unwrap(),
            vec![
                Event::FileCreated("/a".into()),
                Event::FileDeleted("/b".into()),
                Event::PipeClosed(2),
                Event::ProcessExits(1),
                Event::Script("exit 0".into()),
            ]
        );
        for bad in [
            "exit-when-pipe-closed=x",
            "exit-when-pipe-closed=999999",
            "exit-when-process-exits=0",
            "exit-when-poll=0",
            "exit-when-poll=x",
        ] {
            assert!(events(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn exitwhen_events() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        assert!(!happened(&Event::FileCreated(f.clone())));
        assert!(happened(&Event::FileDeleted(f.clone())));
        let script = Event::Script(format!("test -e {} && exit 88; exit 0", f.display()));
        assert!(!happened(&script));
        assert!(!happened(&Event::Script("exit 3".into())));
        std::fs::write(&f, "").unwrap();
        assert!(happened(&Event::FileCreated(f.clone())));
        assert!(!happened(&Event::FileDeleted(f.clone())));
        assert!(happened(&script));

        let (r, w) = nix::unistd::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let pipe = Event::PipeClosed(r.as_raw_fd());
        assert!(!happened(&pipe));
        nix::unistd::write(&w, b"x").unwrap();
        assert!(!happened(&pipe));
        drop(w);
        assert!(happened(&pipe));

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let proc = Event::ProcessExits(child.id() as i32);
        assert!(!happened(&proc));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(happened(&proc));
    }

    #[tokio::test]
    async fn exitwhen_waits_for_clients_then_exits() {
        let dir = tempfile::tempdir().unwrap();
        let stop = dir.path().join("stop");
        let server = ServerContext::new(false);
        let mut p = params(&[
            &format!("exit-when-file-created={}", stop.display()),
            "exit-when-poll=0.02",
        ]);
        let f = Arc::new(build(&mut p).unwrap());
        let s = stack(vec![f.clone()], &Mem::new(512));
        f.after_fork(&server).unwrap();
        let a = s.open(&ctx(1)).await.unwrap();
        std::fs::write(&stop, "").unwrap();
        let e = s.open(&ctx(2)).await.err().unwrap();
        assert!(e.msg.contains("rejecting new connection"), "{}", e.msg);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!server.is_shutting_down());
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The disconnect and (maybe) the idle poll both see it.
        assert!(server.is_shutting_down());
    }

    #[test]
    fn exitwhen_event_before_start_exits_at_once() {
        let server = ServerContext::new(false);
        let mut p = params(&["exit-when-file-deleted=/nonexistent/file"]);
        let f = build(&mut p).unwrap();
        f.after_fork(&server).unwrap();
        assert!(server.is_shutting_down());
        // Without events nothing happens at all.
        let server = ServerContext::new(false);
        let f = build(&mut params(&[])).unwrap();
        f.after_fork(&server).unwrap();
        assert!(!server.is_shutting_down());
    }
}
