//! Progress reporting: `-p` draws a bar on stderr (bytes done, rate,
//! ETA) with indicatif when stderr is a terminal; `--progress=FD` writes
//! `N/100` lines to file descriptor FD for programs to read, as libnbd's
//! nbdcopy does (`0/100` first, `100/100` once the copy is complete).
//!
//! The copy only adds to an atomic counter; a timer task turns that
//! into output ten times a second, so reporting costs the copy nothing.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the output is refreshed.
const TICK: Duration = Duration::from_millis(100);

/// Bytes done out of a total, updated by the copy.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    total: Option<u64>,
}

impl Progress {
    /// A copy of `total` bytes (`None`: a stream of unknown length).
    pub fn new(total: Option<u64>) -> Progress {
        Progress {
            done: AtomicU64::new(0),
            total,
        }
    }

    /// `n` more bytes are done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Whole percent done (0 for an unknown total).
    pub fn percent(&self) -> u64 {
        match self.total {
            Some(0) => 100,
            Some(t) => (u128::from(self.done().min(t)) * 100 / u128::from(t)) as u64,
            None => 0,
        }
    }
}

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nowhere.
    Off,
    /// A bar on stderr (`-p`).
    Bar,
    /// `N/100` lines on a file descriptor (`--progress=FD`).
    Fd(RawFd),
}

/// The running reporter; [`finish`](Reporter::finish) it when the copy
/// ends.
pub struct Reporter {
    /// `Some(success)` ends the reporting task.
    stop: watch::Sender<Option<bool>>,
    task: Option<JoinHandle<()>>,
}

enum Sink {
    Bar(ProgressBar),
    /// Borrowed descriptor: the caller's, never closed here.
    Fd(ManuallyDrop<File>, Option<u64>),
}

impl Sink {
    fn update(&mut self, p: &Progress) {
        match self {
            Sink::Bar(b) => b.set_position(p.done()),
            Sink::Fd(f, last) => {
                let pc = p.percent();
                if *last != Some(pc) {
                    *last = Some(pc);
                    let _ = writeln!(f, "{pc}/100");
                }
            }
        }
    }

    fn end(mut self, p: &Progress, success: bool) {
        if success {
            if let Sink::Bar(b) = &self {
                if let Some(t) = p.total {
                    b.set_length(t.max(p.done()));
                }
            }
        }
        self.update(p);
        match self {
            Sink::Bar(b) if success => b.finish(),
            Sink::Bar(b) => b.abandon(),
            Sink::Fd(mut f, last) => {
                if success && last != Some(100) {
                    let _ = writeln!(f, "100/100");
                }
            }
        }
    }
}

fn bar(total: Option<u64>) -> ProgressBar {
    let target = ProgressDrawTarget::stderr_with_hz(10);
    match total {
        Some(t) => {
            let b = ProgressBar::with_draw_target(Some(t), target);
            b.set_style(
                ProgressStyle::with_template(
                    "{percent:>3}% [{wide_bar}] {binary_bytes}/{binary_total_bytes} \
                     {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("#>-"),
            );
            b
        }
        None => {
            let b = ProgressBar::with_draw_target(None, target);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
                )
                .expect("valid template"),
            );
            b
        }
    }
}

impl Reporter {
    /// Start reporting `progress` as `mode` says (inside a tokio
    /// runtime).
    pub fn start(mode: Mode, progress: Arc<Progress>) -> Reporter {
        let (stop, mut stopped) = watch::channel(None);
        let mut sink = match mode {
            Mode::Off => return Reporter { stop, task: None },
            Mode::Bar => Sink::Bar(bar(progress.total)),
            // SAFETY: writing to a descriptor the user named (a bad one
            // just makes the writes fail, as with libnbd); ManuallyDrop
            // leaves it open for its owner.
            Mode::Fd(fd) => Sink::Fd(ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }), None),
        };
        let task = tokio::spawn(async move {
            sink.update(&progress);
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = tick.tick() => sink.update(&progress),
                    _ = stopped.changed() => break,
                }
            }
            let success = stopped.borrow().unwrap_or(false);
            sink.end(&progress, success);
        });
        Reporter {
            stop,
            task: Some(task),
        }
    }

    /// Stop, drawing the final state (complete if `success`).
    pub async fn finish(mut self, success: bool) {
        self.stop.send_replace(Some(success));
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
