//! The fua filter end to end: what libnbd sees advertised and, through a
//! log filter below, which writes carry FUA and which flushes happen.

use std::time::Duration;

use crate::common::{nbdpy, require_nbdsh, Server};
use crate::filter_log::log_lines;

const SCRIPT: &str = "\
if h.can_fua():
    h.pwrite(b'a' * 512, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b'b' * 512, 512)
h.flush()
h.shutdown()
";

/// The log lines below the fua filter (`Write ... fua=N`, `Flush`), and
/// whether the client saw FUA advertised.
fn below(mode: &str) -> (bool, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    let l = format!("logfile={}", log.display());
    let m = format!("fuamode={mode}");
    let s = Server::ours(&["--filter=fua", "--filter=log", "memory", "1M", &l, &m]);
    let out = nbdpy(&s.uri(), &format!("print(h.can_fua())\n{SCRIPT}"));
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let ops = log_lines(&log)
        .into_iter()
        .filter(|l| l.contains(" Write id=") || l.contains(" Flush id="))
        .map(|l| {
            l.split(' ')
                .filter(|f| !f.starts_with("connection=") && !f.starts_with("id="))
                .filter(|f| !f.starts_with("offset=") && !f.starts_with("count=") && *f != "...")
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    (out.trim() == "True", ops)
}

#[test]
fn fua_none_is_not_advertised() {
    if !require_nbdsh() {
        return;
    }
    assert_eq!(
        below("none"),
        (false, vec!["Write fua=0".into(), "Flush".into()])
    );
}

#[test]
fn fua_emulate_flushes() {
    if !require_nbdsh() {
        return;
    }
    let (adv, ops) = below("emulate");
    assert!(adv);
    assert_eq!(ops, ["Write fua=0", "Flush", "Write fua=0", "Flush"]);
}

#[test]
fn fua_native_and_pass_pass_it_down() {
    if !require_nbdsh() {
        return;
    }
    for mode in ["native", "pass"] {
        let (adv, ops) = below(mode);
        assert!(adv, "{mode}");
        assert_eq!(ops, ["Write fua=1", "Write fua=0", "Flush"], "{mode}");
    }
}

#[test]
fn fua_force_and_discard() {
    if !require_nbdsh() {
        return;
    }
    let (adv, ops) = below("force");
    assert!(adv);
    assert_eq!(ops, ["Write fua=1", "Write fua=1"]);
    let (adv, ops) = below("discard");
    assert!(adv);
    assert_eq!(ops, ["Write fua=0", "Write fua=0"]);
}
