//! nbdcopy to and from a server with a 64K minimum block size (qemu-nbd
//! over qemu's blkdebug driver with align=65536, as qemu-nbd advertises
//! for images on 64K-sector storage): a source whose size is not a
//! multiple of the block size, and a sparse one with 4K islands of data,
//! copy in and back out intact. Upstream nbdcopy 1.14 fails these.

use std::path::Path;
use std::process::Command;

use crate::common::{random_file, require, run};
use crate::copy_common::nbdcopy;

/// `[ qemu-nbd ... ]` serving `raw` with a 64K minimum block size.
fn strict(raw: &Path) -> Vec<String> {
    [
        "[",
        "qemu-nbd",
        "--image-opts",
        &format!(
            "driver=blkdebug,align=65536,image.driver=file,image.filename={}",
            raw.display()
        ),
        "]",
    ]
    .map(String::from)
    .to_vec()
}

fn copy(mut prog: Command, from: &[String], to: &[String]) -> std::process::Output {
    run(prog.arg("--").args(from).args(to))
}

#[test]
fn copy_min_block_size_unaligned_and_sparse_sources() {
    if !require(&["qemu-nbd", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.raw");
    let src = dir.path().join("src.raw");
    let size = 3_000_000usize; // not a multiple of 64K
    random_file(&src, size, 3);
    random_file(&dst, 4 << 20, 4);
    let before = std::fs::read(&dst).unwrap();
    let src_arg = vec![src.display().to_string()];

    // Upstream's nbdcopy cannot: the last write is not whole blocks.
    let theirs = copy(Command::new("nbdcopy"), &src_arg, &strict(&dst));
    assert!(!theirs.status.success());
    std::fs::write(&dst, &before).unwrap();

    let ours = copy(nbdcopy(), &src_arg, &strict(&dst));
    assert!(ours.status.success(), "{ours:?}");
    let got = std::fs::read(&dst).unwrap();
    assert!(
        got[..size] == std::fs::read(&src).unwrap()[..],
        "data differs"
    );
    // The rest of the partial last block was kept.
    assert!(
        got[size..] == before[size..],
        "bytes past the source changed"
    );

    // A sparse source: 4K islands of data, holes between (zeroed by
    // write zeroes on whole blocks, partial blocks patched).
    let sparse = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(size as u64).unwrap();
    for (i, block) in [1u64, 5, 17, 100, 400, 700].iter().enumerate() {
        std::os::unix::fs::FileExt::write_all_at(&f, &[i as u8 + 1; 4096], block * 4096).unwrap();
    }
    drop(f);
    let ours = copy(nbdcopy(), &[sparse.display().to_string()], &strict(&dst));
    assert!(ours.status.success(), "{ours:?}");
    let got = std::fs::read(&dst).unwrap();
    assert!(
        got[..size] == std::fs::read(&sparse).unwrap()[..],
        "sparse copy differs"
    );
    assert!(got[size..] == before[size..]);

    // And back out, from the strict server to a file.
    let back = dir.path().join("back.raw");
    let ours = copy(nbdcopy(), &strict(&dst), &[back.display().to_string()]);
    assert!(ours.status.success(), "{ours:?}");
    assert!(std::fs::read(&back).unwrap() == got);
}
