//! `nbdfuse`: an NBD export as a local file (see `nbd_tools::nbdfuse`).

fn main() {
    std::process::exit(nbd_tools::nbdfuse::main(
        std::env::args_os().skip(1).collect(),
    ));
}
