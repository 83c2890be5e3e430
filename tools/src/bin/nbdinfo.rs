//! `nbdinfo`: information about NBD servers and exports (see `nbd_tools::nbdinfo`).

fn main() {
    std::process::exit(nbd_tools::nbdinfo::main(
        std::env::args_os().skip(1).collect(),
    ));
}
