//! nbdcopy with `-` as a real pipe on either side: streamed in order,
//! of unknown length when it is the source.

use std::process::Command;

use crate::common::run_ok;
use crate::copy_common::{check_route, nbdcopy, peers, source_image, Kind, NBD_KINDS, SIZE};

#[test]
fn copy_pipe_to_everything() {
    if !peers() {
        return;
    }
    for d in NBD_KINDS
        .into_iter()
        .chain([Kind::File, Kind::Pipe, Kind::Null])
    {
        check_route(Kind::Pipe, d, &[]);
    }
    check_route(Kind::Pipe, Kind::File, &["--synchronous"]);
}

#[test]
fn copy_everything_to_pipe() {
    if !peers() {
        return;
    }
    for s in NBD_KINDS.into_iter().chain([Kind::File]) {
        check_route(s, Kind::Pipe, &[]);
    }
    check_route(Kind::Upstream, Kind::Pipe, &["--synchronous"]);
}

/// A stream that is not a multiple of the request size, into a file
/// that was larger: the file ends where the stream did.
#[test]
fn copy_pipe_short_tail_to_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut data = source_image(&src);
    data.truncate(SIZE - 12345);
    std::fs::write(&src, &data).unwrap();
    let out = dir.path().join("out.img");
    std::fs::write(&out, vec![1u8; SIZE * 2]).unwrap();
    let script = format!(
        "cat {} | {} - {}",
        src.display(),
        nbdcopy().get_program().to_str().unwrap(),
        out.display()
    );
    run_ok(Command::new("sh").arg("-c").arg(script));
    assert_eq!(std::fs::read(&out).unwrap(), data);
}
