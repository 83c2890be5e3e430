//! The extentlist filter end to end, against upstream's: nbdinfo --map
//! and qemu-img map show the list (gaps as holes, types as numbers or
//! words, lines in any order); a bad list is refused at startup; under
//! the offset filter the list is of the plugin's offsets.

use std::process::Command;

use crate::common::{nbdkit, require, run};

fn same(args: &[&str], cmd: &str) -> Option<String> {
    if !require(&["nbdkit", "nbdinfo"]) {
        return None;
    }
    let go = |prog: &std::path::Path| {
        let out = run(Command::new(prog)
            .args(["-U", "-", "-r"])
            .args(args)
            .args(["--run", cmd]));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let ours = go(&nbdkit());
    assert_eq!(ours, go(std::path::Path::new("nbdkit")), "{args:?}");
    assert_eq!(ours.0, Some(0));
    Some(ours.1)
}

#[test]
fn extentlist_map_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("extents");
    std::fs::write(
        &list,
        "2M 1M hole\n0 1M\n4M 512 zero\n5M 1k hole,zero\n6M 1k 3\n7M 1k 5\n  7341056   1k   zero,other \n",
    )
    .unwrap();
    let l = format!("extentlist={}", list.display());
    let Some(map) = same(
        &["--filter=extentlist", "memory", "8M", &l],
        "nbdinfo --map \"$uri\"",
    ) else {
        return;
    };
    let first = map.lines().next().unwrap();
    assert_eq!(
        first.split_whitespace().collect::<Vec<_>>(),
        ["0", "1048576", "0", "data"]
    );
    same(
        &["--filter=extentlist", "pattern", "8M", &l],
        "qemu-img map --output=json -f raw \"$uri\"",
    );
    // Through offset: the client's 0 is the plugin's 512K, in the data.
    let map = same(
        &[
            "--filter=offset",
            "--filter=extentlist",
            "memory",
            "8M",
            &l,
            "offset=512K",
        ],
        "nbdinfo --map \"$uri\"",
    )
    .unwrap();
    assert!(map.lines().next().unwrap().contains(" 524288 "), "{map}");
}

#[test]
fn extentlist_bad_lists_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for text in ["0 1M\n512K 1M\n", "0\n", "x 1M\n", "0 1M\n\n1M 1M\n"] {
        let list = dir.path().join("bad");
        std::fs::write(&list, text).unwrap();
        for prog in [nbdkit(), "nbdkit".into()] {
            if prog.as_os_str() == "nbdkit" && !require(&["nbdkit"]) {
                continue;
            }
            let out = run(Command::new(&prog).args([
                "-r",
                "--filter=extentlist",
                "memory",
                "8M",
                &format!("extentlist={}", list.display()),
                "--run",
                "true",
            ]));
            assert_eq!(out.status.code(), Some(1), "{prog:?} {text:?}");
        }
    }
    let out =
        run(Command::new(nbdkit()).args(["--filter=extentlist", "memory", "8M", "--run", "true"]));
    assert_eq!(out.status.code(), Some(1));
}
