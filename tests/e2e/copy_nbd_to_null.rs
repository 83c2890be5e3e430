//! nbdcopy from every kind of source to `null:`, which throws the data
//! away: the copy must read everything and succeed.

use crate::copy_common::{check_route, peers, Kind, NBD_KINDS};

#[test]
fn copy_nbd_to_null() {
    if !peers() {
        return;
    }
    for s in NBD_KINDS {
        check_route(s, Kind::Null, &[]);
    }
}

#[test]
fn copy_file_and_pipe_to_null() {
    check_route(Kind::File, Kind::Null, &[]);
    check_route(Kind::Pipe, Kind::Null, &[]);
}

#[test]
fn copy_nbd_to_null_synchronous() {
    if !peers() {
        return;
    }
    check_route(Kind::Upstream, Kind::Null, &["--synchronous"]);
}
