//! nbdcopy between NBD servers, every pair of upstream nbdkit, our
//! nbdkit, qemu-nbd raw and qemu-nbd qcow2.

use crate::copy_common::{check_route, peers, NBD_KINDS};

#[test]
fn copy_nbd_to_nbd() {
    if !peers() {
        return;
    }
    for s in NBD_KINDS {
        for d in NBD_KINDS {
            check_route(s, d, &[]);
        }
    }
}
