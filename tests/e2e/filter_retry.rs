//! The retry filter end to end: an error filter below it fails reads
//! while a trigger file exists; the retry filter reopens the layers below
//! (seen as new `Connect` lines of a log filter under it) until the
//! trigger goes away, or gives up.

use std::time::Duration;

use crate::common::{nbdpy, require_nbdsh, Server};
use crate::filter_log::log_lines;

/// A server: retry over log over error over memory, reads failing while
/// `trigger` exists.
fn server(
    dir: &std::path::Path,
    retry: &[&str],
) -> (Server, std::path::PathBuf, std::path::PathBuf) {
    let trigger = dir.join("inject");
    let log = dir.join("log.txt");
    let (t, l) = (
        format!("error-file={}", trigger.display()),
        format!("logfile={}", log.display()),
    );
    let mut args = vec![
        "--filter=retry",
        "--filter=log",
        "--filter=error",
        "memory",
        "1M",
        "error-pread-rate=1",
        t.as_str(),
        l.as_str(),
    ];
    args.extend_from_slice(retry);
    (Server::ours(&args), trigger, log)
}

fn connects(log: &std::path::Path) -> usize {
    log_lines(log)
        .iter()
        .filter(|l| l.contains(" Connect "))
        .count()
}

#[test]
fn retry_recovers_after_temporary_failure() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (s, trigger, log) = server(dir.path(), &["retries=5", "retry-delay=0.2"]);
    std::fs::write(&trigger, "").unwrap();
    nbdpy(
        &s.uri(),
        &format!(
            "import os, threading\n\
             h.pwrite(b'q' * 512, 0)\n\
             threading.Timer(0.45, lambda: os.unlink({:?})).start()\n\
             assert h.pread(512, 0) == b'q' * 512\n\
             h.shutdown()\n",
            trigger.to_str().unwrap()
        ),
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    // 0.2 + 0.4 (+ 0.8): two or three reopens before the trigger went.
    let n = connects(&log);
    assert!(
        (3..=4).contains(&n),
        "{n} connects:\n{}",
        log_lines(&log).join("\n")
    );
    let lines = log_lines(&log);
    assert!(lines
        .iter()
        .any(|l| l.ends_with("...Read id=1 return=-1 error=EIO")));
    assert!(lines.iter().any(|l| l.ends_with("...Read id=1 return=0")));
}

#[test]
fn retry_gives_up_after_retries() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (s, trigger, log) = server(
        dir.path(),
        &["retries=2", "retry-delay=0.1", "retry-exponential=no"],
    );
    std::fs::write(&trigger, "").unwrap();
    nbdpy(
        &s.uri(),
        "try:\n  h.pread(512, 0)\n  raise SystemExit('the read worked')\n\
         except nbd.Error as e:\n  assert e.errnum == errno.EIO, e\n\
         h.shutdown()\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    assert_eq!(connects(&log), 3, "{}", log_lines(&log).join("\n"));
}

#[test]
fn retry_readonly_after_failure() {
    if !require_nbdsh() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (s, trigger, log) = server(dir.path(), &["retry-readonly=yes", "retry-delay=0.1"]);
    std::fs::write(&trigger, "").unwrap();
    nbdpy(
        &s.uri(),
        &format!(
            "import os, threading\n\
             h.pwrite(b'a' * 512, 0)\n\
             threading.Timer(0.05, lambda: os.unlink({:?})).start()\n\
             assert h.pread(512, 0) == b'a' * 512\n\
             try:\n  h.pwrite(b'b' * 512, 0)\n  raise SystemExit('the write worked')\n\
             except nbd.Error as e:\n  assert e.errnum == errno.EPERM, e\n\
             h.shutdown()\n",
            trigger.to_str().unwrap()
        ),
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let lines = log_lines(&log);
    let c: Vec<&String> = lines.iter().filter(|l| l.contains(" Connect ")).collect();
    assert_eq!(c.len(), 2, "{}", lines.join("\n"));
    assert!(
        c[0].contains(" write=1 ") && c[1].contains(" write=0 "),
        "{c:?}"
    );
}
