//! nbdcopy from every kind of NBD server to a local file: the file ends
//! up the source's size with its bytes, garbage that was there before
//! zeroed where the source has holes or zeroes.

use crate::copy_common::{check_route, peers, Kind, NBD_KINDS};

#[test]
fn copy_nbd_to_file() {
    if !peers() {
        return;
    }
    for s in NBD_KINDS {
        check_route(s, Kind::File, &[]);
    }
}

#[test]
fn copy_nbd_to_file_settings() {
    if !peers() {
        return;
    }
    for opts in [
        &["--synchronous"][..],
        &["--no-extents"],
        &["-S", "0"],
        &["-S", "65536", "--request-size=65536"],
        &["--allocated", "-C", "1"],
    ] {
        check_route(Kind::Upstream, Kind::File, opts);
        check_route(Kind::QemuQcow2, Kind::File, opts);
    }
}

#[test]
fn copy_file_to_file() {
    check_route(Kind::File, Kind::File, &[]);
    check_route(Kind::File, Kind::File, &["--synchronous", "-S", "0"]);
}
