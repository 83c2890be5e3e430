//! `nbddump`: hexdump of an NBD export (see `nbd_tools::nbddump`).

fn main() {
    std::process::exit(nbd_tools::nbddump::main(
        std::env::args_os().skip(1).collect(),
    ));
}
