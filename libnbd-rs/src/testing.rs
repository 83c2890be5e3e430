//! What the test suites of every crate share: whether an interop peer
//! (qemu-img, nbdsh, upstream nbdkit, ...) is installed. A missing peer
//! fails the test under `CI=true`, so CI proves its install steps, and is
//! a printed skip elsewhere.

use std::path::Path;

/// Is `prog` an executable file on `PATH` (or, if it starts with `/`,
/// does that path exist)?
pub fn installed(prog: &str) -> bool {
    if prog.starts_with('/') {
        return Path::new(prog).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// True if every peer is installed. A missing one panics when `CI=true`
/// and prints a skip otherwise.
pub fn require(peers: &[&str]) -> bool {
    for p in peers {
        if !installed(p) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("peer '{p}' is missing (CI=true: .ci/run must install it)");
            }
            crate::elog!("SKIP: peer '{p}' is not installed");
            return false;
        }
    }
    true
}

/// A plugin configured from command-line words (`entry`'s magic key as
/// nbdkit takes it) and opened as a plain client would: what a plugin's
/// unit tests start from.
pub async fn open_plugin<S: AsRef<str>>(
    entry: &crate::PluginEntry,
    args: &[S],
) -> Box<dyn crate::Handle> {
    let mut p = crate::Params::parse(args, entry.magic).unwrap();
    entry
        .configure(&mut p)
        .unwrap()
        .open(&crate::OpenContext::default())
        .await
        .unwrap()
}
