//! The limit filter end to end: with libnbd's Python bindings holding
//! connections open, clients beyond the limit are refused.

use crate::common::{nbdpy, require_nbdsh, Server};

const SCRIPT: &str = r#"
import time
def connect():
    c = nbd.NBD()
    c.connect_uri(sys.argv[1])
    return c
def refused():
    try:
        connect()
        return False
    except nbd.Error:
        return True
others = [connect() for i in range(LIMIT - 1)]
assert refused()
h.shutdown()
time.sleep(0.3)
c = connect()
c.pread(512, 0)
assert refused()
for o in others:
    o.shutdown()
c.shutdown()
"#;

#[test]
fn limit_default_is_one_client() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["--filter=limit", "memory", "1M"]);
    nbdpy(&s.uri(), &SCRIPT.replace("LIMIT", "1"));
}

#[test]
fn limit_three_clients() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["--filter=limit", "memory", "1M", "limit=3"]);
    nbdpy(&s.uri(), &SCRIPT.replace("LIMIT", "3"));
}

#[test]
fn limit_zero_is_unlimited() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&["--filter=limit", "memory", "1M", "limit=0"]);
    nbdpy(
        &s.uri(),
        "cs = []\n\
         for i in range(20):\n  c = nbd.NBD()\n  c.connect_uri(sys.argv[1])\n  cs.append(c)\n\
         for c in cs:\n  c.pread(512, 0)\n  c.shutdown()\n",
    );
}
