//! The tls-fallback filter under `--tls=on`: a plaintext client reads the
//! 512-byte readme whatever export it names; a TLS client gets the plugin.

use std::process::Command;

use crate::common::*;
use crate::tls_common::*;

#[test]
fn tls_fallback_plaintext_reads_the_readme() {
    if !require_gnutls_tools() || !require(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let c = creds();
    let psk = format!("--tls-psk={}", c.psk.display());
    let run_filter = |extra: &[&str]| {
        let mut args = vec!["--tls=on", &psk, "--filter=tls-fallback", "pattern", "1M"];
        args.extend_from_slice(extra);
        Server::ours(&args)
    };
    let s = run_filter(&[]);
    // Plaintext, by libnbd's tools: 512 bytes of message, read-only,
    // whatever the export name.
    for uri in [s.uri(), s.uri_export("secret")] {
        let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
        assert_eq!(out.trim(), "512", "{uri}");
    }
    let st = run(Command::new("nbdinfo").args(["--is", "read-only", &s.uri()]));
    assert!(st.status.success());
    let out = run(Command::new("nbdcopy").args([&s.uri(), "-"])).stdout;
    let msg = b"This NBD server requires TLS authentication before it will serve useful data.\n";
    assert!(out.starts_with(msg), "{:?}", String::from_utf8_lossy(&out));
    assert_eq!(out.len(), 512);
    assert!(out[msg.len()..].iter().all(|&b| b == 0));
    // TLS: the plugin, for libnbd's tools and ours.
    let uri = nbds_unix(&s, Some("alice"), &psk_param(&c.psk));
    for nbdinfo in ["nbdinfo".into(), our_bin("nbdinfo")] {
        let out = run_ok(Command::new(nbdinfo).args(["--size", &uri]));
        assert_eq!(out.trim(), "1048576");
    }
    let data = run(Command::new("nbdcopy").args([&uri, "-"])).stdout;
    assert_eq!(data.len(), 1 << 20);
    assert_eq!(&data[8..16], &8u64.to_be_bytes(), "pattern plugin data");

    let s = run_filter(&["tlsreadme=go away"]);
    let out = run(Command::new("nbdcopy").args([&s.uri(), "-"])).stdout;
    assert!(out.starts_with(b"go away\0"));
    assert_eq!(out.len(), 512);
}
