//! `nbdcopy`: copy to and from an NBD server (see `nbd_tools::nbdcopy`).

/// Copy buffers on page boundaries: the kernel copies them much faster.
#[global_allocator]
static ALLOC: nbd_tools::nbdcopy::PageAligned = nbd_tools::nbdcopy::PageAligned;

fn main() {
    std::process::exit(nbd_tools::nbdcopy::main(
        std::env::args_os().skip(1).collect(),
    ));
}
