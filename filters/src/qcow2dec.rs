//! # qcow2dec: serve the content of a qcow2 image, read-only
//!
//! Upstream's name (nbdkit 1.36) for the [`qcow2`](crate::qcow2) filter
//! read-only: the layer below holds a qcow2 image, clients see its
//! virtual disk. Unlike upstream's, extents are reported (from the L2
//! tables), and backing files and extended L2 entries are followed.
//!
//! ```text
//! nbdkit -r --filter=qcow2dec file image.qcow2
//! ```
//!
//! ## Parameters
//!
//! None (as upstream).

use std::sync::Arc;

use libnbd::{ConfigResult, Filter, FilterEntry, Params};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "qcow2dec",
    help: "",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    crate::qcow2::build(p, crate::qcow2::Config { readonly: true })
}
