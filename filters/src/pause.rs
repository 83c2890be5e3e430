//! # pause: hold NBD requests on command, and let them go again
//!
//! A control socket lets another program stop the server handling
//! requests for a while, to snapshot the storage underneath, say: once
//! paused, requests wait until resumed.
//!
//! ```text
//! nbdkit -U - --filter=pause --filter=rate file BIG_FILE.ISO rate=10M pause-control=sock \
//!        --run 'qemu-img convert -p $nbd /var/tmp/out'
//! echo p | nc -U sock      # the copy seems to hang
//! echo r | nc -U sock      # it goes on
//! ```
//!
//! ## Parameters
//!
//! - `pause-control=SOCKET` (required): the Unix domain socket the
//!   filter listens on for commands (an existing file there is replaced;
//!   the socket is removed when nbdkit exits).
//!
//! ## Control socket
//!
//! Send the character `p` to pause: requests received from then on wait.
//! The filter answers `P` once every request already running has
//! finished, so the layers below are idle (a plugin's own background
//! work aside). Send `r` to resume; the answer is `R`. Any other
//! character is ignored and answered with `X`; whitespace (the newline
//! of `echo p`) gets no answer. One control client is served at a time.
//!
//! ## Behaviour
//!
//! Pausing does not flush. Clients such as the kernel's NBD driver or a
//! virtual machine time out after a short pause on their own. Pausing
//! several servers at once cannot give a consistent snapshot of disks
//! they serve together (RAID in a guest): that needs the hypervisor.

use std::os::unix::net::UnixListener as StdListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "pause",
    help: "pause-control=SOCKET           Control socket.",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let Some(path) = p.take("pause-control").map(PathBuf::from) else {
        return Err(ConfigError::new("pause-control socket was not set"));
    };
    // Bound now, so a bad path fails at startup and the socket exists
    // by the time nbdkit is ready.
    let _ = std::fs::remove_file(&path);
    let listener = StdListener::bind(&path)
        .map_err(|e| ConfigError::new(format!("{}: {e}", path.display())))?;
    Ok(Arc::new(Pause {
        gate: Arc::new(Gate::default()),
        listener: Mutex::new(Some(listener)),
        path,
    }))
}

/// Whether requests may run, and how many are running.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    /// Woken when a request finishes or the gate opens.
    changed: Notify,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    running: usize,
}

/// A request let through; counted until it drops.
struct Running<'a>(&'a Gate);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
        self.0.changed.notify_waiters();
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait while paused, then count a running request.
    async fn enter(&self) -> Running<'_> {
        loop {
            // Registered before looking, so a resume in between is seen.
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut s = self.lock();
                if !s.paused {
                    s.running += 1;
                    return Running(self);
                }
            }
            woken.await;
        }
    }

    /// Hold new requests; return once those running have finished.
    async fn pause(&self) {
        self.lock().paused = true;
        loop {
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.lock().running == 0 {
                return;
            }
            woken.await;
        }
    }

    /// Let requests go.
    fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_waiters();
    }
}

/// Serve control clients, one at a time.
async fn control(listener: tokio::net::UnixListener, gate: Arc<Gate>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let mut buf = [0u8; 64];
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut answer = Vec::with_capacity(n);
            for &c in &buf[..n] {
                match c {
                    b'p' => {
                        gate.pause().await;
                        answer.push(b'P');
                    }
                    b'r' => {
                        gate.resume();
                        answer.push(b'R');
                    }
                    c if c.is_ascii_whitespace() => {}
                    _ => answer.push(b'X'),
                }
            }
            if sock.write_all(&answer).await.is_err() {
                break;
            }
        }
    }
}

struct Pause {
    gate: Arc<Gate>,
    /// Taken by `after_fork` to serve the control socket.
    listener: Mutex<Option<StdListener>>,
    path: PathBuf,
}

#[async_trait]
impl Filter for Pause {
    fn after_fork(&self, _: &Arc<libnbd::server::ServerContext>) -> Result<()> {
        let taken = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(l) = taken {
            l.set_nonblocking(true)
                .map_err(|e| Error::io("pause-control", e))?;
            let l =
                tokio::net::UnixListener::from_std(l).map_err(|e| Error::io("pause-control", e))?;
            tokio::spawn(control(l, self.gate.clone()));
        }
        Ok(())
    }

    fn unload(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(PauseHandle {
            next: next.open(ctx).await?,
            gate: self.gate.clone(),
        }))
    }
}

struct PauseHandle {
    next: Box<dyn Handle>,
    gate: Arc<Gate>,
}

#[async_trait]
impl Handle for PauseHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.pread(buf, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.pwrite(buf, offset, flags).await
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.flush(flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.trim(count, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.zero(count, offset, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.extents(count, offset, flags, ext).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let _r = self.gate.enter().await;
        self.next.cache(count, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pause_holds_requests_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl");
        std::fs::write(&sock, b"stale").unwrap();
        let f = create(&mut params(&[&format!("pause-control={}", sock.display())])).unwrap();
        f.after_fork(&libnbd::server::ServerContext::new(false))
            .unwrap();
        let mem = Mem::new(4096);
        let s = stack(vec![f.clone()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        let mut ctl = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut answer = [0u8; 8];
        ctl.write_all(b"p\n").await.unwrap();
        ctl.read_exact(&mut answer[..1]).await.unwrap();
        assert_eq!(&answer[..1], b"P");
        let held = tokio::time::timeout(Duration::from_millis(50), read(&*h, 0, 512)).await;
        assert!(held.is_err(), "a read waits while paused");
        ctl.write_all(b"zr").await.unwrap();
        ctl.read_exact(&mut answer[..2]).await.unwrap();
        assert_eq!(&answer[..2], b"XR");
        read(&*h, 0, 512).await;
        drop(ctl);
        f.unload();
        assert!(!sock.exists(), "the socket goes at exit");
        assert!(create(&mut params(&[])).is_err());
        assert!(create(&mut params(&["pause-control=/nonexistent/dir/s"])).is_err());
    }

    #[tokio::test]
    async fn pause_answers_once_running_requests_finish() {
        let gate = Arc::new(Gate::default());
        let r = gate.enter().await;
        let g = gate.clone();
        let pausing = tokio::spawn(async move { g.pause().await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!pausing.is_finished(), "a request is still running");
        drop(r);
        tokio::time::timeout(Duration::from_secs(5), pausing)
            .await
            .unwrap()
            .unwrap();
        gate.resume();
        drop(gate.enter().await);
    }
}
