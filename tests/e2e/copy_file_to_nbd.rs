//! nbdcopy from a local file to every kind of NBD server (upstream
//! nbdkit, ours, qemu-nbd raw and qcow2), checking the bytes the server
//! stored, with the default pipeline and with other settings.

use crate::copy_common::{check_route, peers, Kind, NBD_KINDS};

#[test]
fn copy_file_to_nbd() {
    if !peers() {
        return;
    }
    for d in NBD_KINDS {
        check_route(Kind::File, d, &[]);
    }
}

#[test]
fn copy_file_to_nbd_settings() {
    if !peers() {
        return;
    }
    for opts in [
        &["--synchronous"][..],
        &["-C", "1", "-R", "1"],
        &["--request-size=4096", "--queue-size=65536"],
        &["--request-size=32M", "-T", "1"],
        &["-S", "0"],
        &["--allocated"],
        &["--no-extents", "--flush"],
    ] {
        check_route(Kind::File, Kind::Upstream, opts);
    }
}
