//! Lanes: one thread per NBD connection, as libnbd's nbdcopy has.
//!
//! Every lane is a single-threaded runtime on its own thread, with its
//! own connection to each NBD endpoint (made on that thread, so the
//! socket is polled there) and its own share of the operations. A
//! request, its reply and the task waiting for it then stay on one
//! thread: no wakeup crosses to another CPU, the server's thread
//! answering a connection pairs with the one lane reading it, and a
//! reply is read as soon as it arrives (a shared pool of threads
//! serving every connection leaves some connections unread for a
//! while, and the server's threads block on full sockets).
//!
//! Lanes are spread over the CPUs the process may use, one CPU each
//! (when there are at least as many): left to the scheduler, two lanes
//! often share a CPU for a while, each waking near the server thread
//! it talks to.
//!
//! [`current`] tells an endpoint which lane is asking, so it picks
//! that lane's connection.

use std::cell::Cell;
use std::future::Future;
use std::io;

use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinHandle;

thread_local! {
    static LANE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The lane the calling thread belongs to (`None` outside lanes).
pub fn current() -> Option<usize> {
    LANE.with(Cell::get)
}

/// The running lanes; stopped when dropped.
pub struct Lanes {
    runtimes: Vec<Runtime>,
}

impl Lanes {
    /// Start `n` lanes.
    pub fn start(n: usize) -> io::Result<Lanes> {
        // Each lane on a CPU of its own, when there are enough.
        let mut cpus = allowed_cpus();
        if cpus.len() < n {
            cpus.clear();
        }
        let runtimes = (0..n)
            .map(|k| {
                let rt = Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(format!("nbdcopy-lane{k}"))
                    .on_thread_start(move || LANE.with(|l| l.set(Some(k))))
                    .enable_all()
                    .build()?;
                // Pin the worker (the first task runs there), not the
                // lane's blocking threads.
                if let Some(&cpu) = cpus.get(k) {
                    rt.spawn(async move { pin(cpu) });
                }
                Ok(rt)
            })
            .collect::<io::Result<_>>()?;
        Ok(Lanes { runtimes })
    }

    /// How many lanes there are.
    pub fn len(&self) -> usize {
        self.runtimes.len()
    }

    /// Run `f` on lane `k`.
    pub fn spawn<F>(&self, k: usize, f: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtimes[k].spawn(f)
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data, all zeroes is the empty set, and
    // sched_getaffinity writes at most the size it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Keep the calling thread on `cpu` (best effort).
fn pin(cpu: usize) {
    // SAFETY: as above; sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // Dropped from async code: nothing may block here. The copy is
        // over by then and the connections closed.
        for rt in self.runtimes.drain(..) {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_lane_runs_on_its_own_thread() {
        let lanes = Lanes::start(3).unwrap();
        assert_eq!(current(), None);
        let mut seen = std::collections::HashSet::new();
        for k in 0..lanes.len() {
            let (lane, thread) = lanes
                .spawn(k, async { (current(), std::thread::current().id()) })
                .await
                .unwrap();
            assert_eq!(lane, Some(k));
            seen.insert(thread);
        }
        assert_eq!(seen.len(), 3);
    }
}
