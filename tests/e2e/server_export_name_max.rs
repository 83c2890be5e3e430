//! Export names of up to 4096 bytes (NBD_MAX_STRING), end to end: our
//! server under libnbd's nbdinfo, our nbdinfo against upstream nbdkit,
//! and one byte more refused by the client before it is sent.

use std::process::Command;

use crate::common::*;

fn size_of(server: &std::path::Path, client: &std::path::Path, export: &str) -> (bool, String) {
    let out = run(Command::new(server).args([
        "-U",
        "-",
        "memory",
        "1M",
        "--run",
        &format!(
            "{} --size \"nbd+unix:///{export}?socket=$unixsocket\"",
            client.display()
        ),
    ]));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn export_name_of_4096_bytes_is_accepted() {
    if !require(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let longest = "a".repeat(4096);
    let too_long = "a".repeat(4097);
    let upstream = std::path::PathBuf::from("nbdkit");
    let libnbd = std::path::PathBuf::from("nbdinfo");
    for (server, client) in [
        (nbdkit(), libnbd.clone()),
        (nbdkit(), our_bin("nbdinfo")),
        (upstream.clone(), our_bin("nbdinfo")),
    ] {
        assert_eq!(
            size_of(&server, &client, &longest),
            (true, "1048576\n".into()),
            "{server:?} {client:?}"
        );
        assert!(
            !size_of(&server, &client, &too_long).0,
            "{server:?} {client:?}"
        );
    }
    // The name reaches the layers whole (the log filter prints it).
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let s = Server::ours(&[
        "--filter=log",
        "memory",
        "1M",
        &format!("logfile={}", log.display()),
    ]);
    run_ok(Command::new("nbdinfo").args(["--size", &s.uri_export(&longest)]));
    drop(s);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("export={longest} ")), "{text}");
}
