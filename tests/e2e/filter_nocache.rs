//! The nocache filter end to end: what libnbd is told about cache, and
//! (with a log filter below) what a cache request becomes, as under
//! upstream's filter.

use std::path::Path;
use std::time::Duration;

use crate::common::{nbdpy, require, require_nbdsh, Server};
use crate::filter_log::log_lines;

fn cache_below(prog: &Path, mode: &str) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = format!("logfile={}", log.display());
    let m = format!("cachemode={mode}");
    let s = Server::start_with(
        prog,
        &["--filter=nocache", "--filter=log", "memory", "1M", &l, &m],
    );
    let out = nbdpy(
        &s.uri(),
        "print(h.can_cache())\nif h.can_cache(): h.cache(8192, 4096)\nh.shutdown()\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let lines = log_lines(&log)
        .into_iter()
        .filter(|l| l.contains(" Cache id=") || l.contains(" Read id="))
        .collect();
    (out, lines)
}

#[test]
fn nocache_modes_as_upstream() {
    if !require_nbdsh() || !require(&["nbdkit"]) {
        return;
    }
    for (mode, advertised, below) in [
        ("none", "False", None),
        (
            "emulate",
            "True",
            Some(" Read id=1 offset=0x1000 count=0x2000 "),
        ),
        ("nop", "True", None),
    ] {
        let ours = cache_below(&crate::common::nbdkit(), mode);
        assert_eq!(ours, cache_below(Path::new("nbdkit"), mode), "{mode}");
        assert_eq!(ours.0.trim(), advertised, "{mode}");
        match below {
            Some(want) => assert!(ours.1.len() == 1 && ours.1[0].contains(want), "{ours:?}"),
            None => assert!(ours.1.is_empty(), "{mode}: {ours:?}"),
        }
    }
}
