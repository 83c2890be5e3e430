//! Every file of `fuzz/corpus/TARGET/` (the seeds) and
//! `fuzz/regressions/TARGET/` (inputs that once crashed or hung a target)
//! through its target, without a fuzzer: none may panic (in any task:
//! a panic hook counts them) or hang.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir/TARGET/`, by target.
fn inputs(dir: &str) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(targets) = std::fs::read_dir(fuzz_dir().join(dir)) else {
        return out;
    };
    for t in targets {
        let t = t.unwrap().path();
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        for f in std::fs::read_dir(&t).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                out.push((name.clone(), f));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn corpus_and_regressions() {
    let panics = Arc::new(AtomicUsize::new(0));
    let count = panics.clone();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        count.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
    let seeds = inputs("corpus");
    let regressions = inputs("regressions");
    // Every target has seeds.
    for (name, _) in fuzz_targets::TARGETS {
        assert!(
            seeds.iter().any(|(t, _)| t == name),
            "fuzz/corpus/{name}/ has no seed"
        );
    }
    let mut failed = Vec::new();
    for (target, file) in seeds.iter().chain(&regressions) {
        let f = fuzz_targets::TARGETS
            .iter()
            .find(|(n, _)| n == target)
            .unwrap_or_else(|| panic!("{}: no target {target}", file.display()))
            .1;
        let data = std::fs::read(file).unwrap();
        let before = panics.load(Ordering::SeqCst);
        let r = std::panic::catch_unwind(|| f(&data));
        if r.is_err() || panics.load(Ordering::SeqCst) != before {
            failed.push(file.display().to_string());
        }
    }
    let _ = std::panic::take_hook();
    assert!(failed.is_empty(), "inputs that panic: {failed:#?}");
    eprintln!(
        "{} seeds and {} regressions replayed",
        seeds.len(),
        regressions.len()
    );
}
