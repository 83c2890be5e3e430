//! The blocksize-policy filter end to end, against upstream's: the block
//! sizes nbdinfo sees for each parameter (over a plugin without
//! constraints and over the swab filter's), the requests the `error`
//! policy refuses (with the blocksize filter below, what `allow` lets
//! through still works); and (nbdkit 1.34's) `blocksize-write-disconnect`
//! dropping a client that writes too much while others go on.

use std::process::Command;

use crate::common::{nbdkit, nbdpy, require, require_nbdsh, run, same_as_upstream, Server};

fn sizes(args: &[&str]) -> Option<(Option<i32>, String)> {
    if !require(&["nbdkit", "nbdinfo"]) {
        return None;
    }
    let go = |prog: &std::path::Path| {
        let out = run(Command::new(prog)
            .args(["-U", "-", "--filter=blocksize-policy"])
            .args(args)
            .args(["--run", "nbdinfo \"$uri\" | grep block_size"]));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let ours = go(&nbdkit());
    assert_eq!(ours, go(std::path::Path::new("nbdkit")), "{args:?}");
    Some(ours)
}

#[test]
fn blocksize_policy_advertises_as_upstream() {
    for args in [
        &["memory", "1M"][..],
        &["memory", "1M", "blocksize-preferred=64K"],
        &["memory", "1M", "blocksize-minimum=4K"],
        &["memory", "1M", "blocksize-maximum=64K"],
        &[
            "memory",
            "1M",
            "blocksize-minimum=4K",
            "blocksize-maximum=8K",
        ],
        &["memory", "1M", "blocksize-maximum=100"],
        &["memory", "1M", "blocksize-minimum=3"],
        &["memory", "1M", "blocksize-preferred=64M"],
        &[
            "memory",
            "1M",
            "blocksize-minimum=4096",
            "blocksize-preferred=1024",
        ],
        &[
            "--filter=swab",
            "memory",
            "1M",
            "swab-bits=64",
            "blocksize-maximum=64K",
        ],
        &[
            "--filter=swab",
            "memory",
            "1M",
            "swab-bits=64",
            "blocksize-minimum=2",
        ],
    ] {
        let Some((code, out)) = sizes(args) else {
            return;
        };
        if args.contains(&"blocksize-preferred=64K") {
            assert_eq!(
                out,
                "\tblock_size_minimum: 1\n\tblock_size_preferred: 65536\n\tblock_size_maximum: 4294967295\n"
            );
        }
        if args.contains(&"blocksize-minimum=3") {
            assert_eq!(code, Some(1));
        }
    }
}

const BAD_CLIENT: &str = r#"
h.set_strict_mode(0)
def t(name, f):
    try:
        f(); print(name, "ok")
    except nbd.Error as e:
        print(name, "error", e.errnum)
t("read-small", lambda: h.pread(100, 0))
t("read-unaligned", lambda: h.pread(512, 100))
t("read", lambda: h.pread(512, 0))
t("read-large", lambda: h.pread(128 * 1024, 0))
t("read-odd", lambda: h.pread(768, 0))
t("write-small", lambda: h.pwrite(b"x" * 100, 0))
t("write-large", lambda: h.pwrite(b"x" * 128 * 1024, 0))
t("zero-large", lambda: h.zero(128 * 1024, 0))
t("zero-unaligned", lambda: h.zero(512, 1))
t("trim-small", lambda: h.trim(100, 0))
t("cache-small", lambda: h.cache(100, 0))
t("flush", lambda: h.flush())
t("tail", lambda: h.pread(64, h.get_size() - 64))
print(h.pread(512, 0)[:4])
"#;

#[test]
fn blocksize_policy_error_as_upstream() {
    let args = [
        "--filter=blocksize-policy",
        "memory",
        "1000000",
        "blocksize-error-policy=error",
        "blocksize-minimum=512",
        "blocksize-maximum=64K",
    ];
    let Some(out) = same_as_upstream(&args, BAD_CLIENT) else {
        return;
    };
    for refused in [
        "read-small",
        "read-unaligned",
        "read-large",
        "read-odd",
        "tail",
    ] {
        assert!(
            out.contains(&format!("{refused} error 22")),
            "{refused}: {out}"
        );
    }
    assert!(out.contains("zero-large ok"), "{out}");
    // allow, with the blocksize filter making bad requests fit the
    // plugin: all of them work.
    let args = [
        "--filter=blocksize-policy",
        "--filter=blocksize",
        "memory",
        "1000000",
        "blocksize-error-policy=allow",
        "blocksize-minimum=512",
        "minblock=512",
    ];
    let out = same_as_upstream(&args, BAD_CLIENT).unwrap();
    assert!(!out.contains("error"), "{out}");
}

#[test]
fn blocksize_policy_write_disconnect() {
    if !require_nbdsh() {
        return;
    }
    let s = Server::ours(&[
        "--filter=blocksize-policy",
        "memory",
        "64M",
        "blocksize-write-disconnect=1M",
    ]);
    let out = nbdpy(
        &s.uri(),
        r#"
h.pwrite(b"x" * (1 << 20), 0)
print("1M written")
try:
    h.pwrite(b"x" * ((1 << 20) + 1), 0)
except nbd.Error as e:
    print("error", errno.errorcode.get(e.errnum))
print("connected:", h.aio_is_ready())
h2 = nbd.NBD()
h2.connect_uri(sys.argv[1])
print(h2.pread(2, 0))
"#,
    );
    assert_eq!(
        out,
        "1M written\nerror ENOTCONN\nconnected: False\nbytearray(b'xx')\n"
    );
}
