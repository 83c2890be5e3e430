//! Temporary disk images and the shell commands that fill them, shared
//! by the plugins that build a disk with an outside program (`tmpdisk`,
//! `ondemand`, `iso`, `linuxdisk`, `floppy`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where temporary images go: `$TMPDIR`, else `/var/tmp` (as upstream:
/// images can be large, and `/tmp` is often a small tmpfs).
pub fn tmpdir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// Quote `s` for the shell as nbdkit's `shell_quote` does: as-is when
/// made of safe characters only, else in single quotes.
pub fn shell_quote(s: &str, out: &mut String) {
    const SAFE: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_=,:/";
    if !s.is_empty() && s.chars().all(|c| SAFE.contains(c)) {
        out.push_str(s);
        return;
    }
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
}

/// `s` quoted for the shell.
pub fn quoted(s: &str) -> String {
    let mut out = String::new();
    shell_quote(s, &mut out);
    out
}

/// A new empty file `PREFIXXXXXXX` in [`tmpdir`], open read-write. The
/// caller unlinks it (see [`TempImage`]).
pub fn temp_file(prefix: &str) -> Result<(File, PathBuf), String> {
    let template = tmpdir().join(format!("{prefix}XXXXXX"));
    let (fd, path) = nix::unistd::mkstemp(&template)
        .map_err(|e| format!("mkstemp: {}: {e}", template.display()))?;
    // SAFETY: mkstemp returned a new descriptor that nothing else owns.
    let file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    Ok((file, path))
}

/// A temporary file removed when dropped (or earlier by [`unlink`]).
///
/// [`unlink`]: TempImage::unlink
pub struct TempImage {
    /// The open file.
    pub file: File,
    path: Option<PathBuf>,
}

impl TempImage {
    /// A new temporary file (see [`temp_file`]).
    pub fn new(prefix: &str) -> Result<TempImage, String> {
        let (file, path) = temp_file(prefix)?;
        Ok(TempImage {
            file,
            path: Some(path),
        })
    }
    /// Its path, while it has one.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }
    /// Remove the name; the open file stays usable.
    pub fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
    /// The file, its name removed.
    pub fn into_file(mut self) -> Result<File, String> {
        self.unlink();
        self.file.try_clone().map_err(|e| format!("dup: {e}"))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Run `script` under `/bin/sh` with stdin from `/dev/null` and stdout
/// to `stdout` (else inherited); `what` names it in the error, as
/// upstream's "PROG: command failed with exit code N".
pub fn run_sh(script: &str, stdout: Option<&File>, what: &str) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).stdin(Stdio::null());
    if let Some(f) = stdout {
        cmd.stdout(f.try_clone().map_err(|e| format!("dup: {e}"))?);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot run /bin/sh: {e}"))?;
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(n), _) => Err(format!("{what}: command failed with exit code {n}")),
        (_, Some(s)) => Err(format!("{what}: command was killed by signal {s}")),
        _ => Err(format!("{what}: command failed")),
    }
}

/// Run `script` under `/bin/sh` as [`run_sh`] does, returning what it
/// printed on stdout.
pub fn sh_output(script: &str, what: &str) -> Result<String, String> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{what}: cannot run /bin/sh: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Some(n) => Err(format!("{what}: command failed with exit code {n}")),
        None => Err(format!("{what}: command was killed by a signal")),
    }
}

/// Is `prog` an executable on `$PATH` (or a path to one)?
pub fn on_path(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if prog.contains('/') {
        return exec(Path::new(prog));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| exec(&d.join(prog))))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_and_run() {
        assert_eq!(quoted("a/b.c"), "a/b.c");
        assert_eq!(quoted("it's"), "'it'\\''s'");
        assert_eq!(quoted(""), "''");
        let mut t = TempImage::new("tempdisktest").unwrap();
        let path = t.path().to_path_buf();
        run_sh("printf hello", Some(&t.file), "printf").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        t.unlink();
        assert!(!path.exists());
        let e = run_sh("exit 3", None, "prog").unwrap_err();
        assert_eq!(e, "prog: command failed with exit code 3");
        assert!(on_path("sh") && !on_path("no-such-program-here"));
    }
}
