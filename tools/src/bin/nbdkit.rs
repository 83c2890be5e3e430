//! `nbdkit`: the NBD server with plugins and filters (see `nbd_tools::nbdkit`).

fn main() {
    std::process::exit(nbd_tools::nbdkit::main(
        std::env::args_os().skip(1).collect(),
    ));
}
