//! Temporary disk images and the shell commands that fill them, shared
//! by the plugins that build a disk with an outside program (`tmpdisk`,
//! `ondemand`, `iso`, `linuxdisk`), and the checks of the directories
//! given to them.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::{Caps, ConfigError, ConfigResult, Error, Flags, Fua, Handle, Params, Result};
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

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

/// An I/O error's message without Rust's " (os error N)" tail, as C
/// programs print it.
pub fn io_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The absolute form of a directory given on the command line
/// ("realpath: DIR: No such file or directory" when it is missing).
pub fn real_dir(d: &str) -> ConfigResult<PathBuf> {
    std::fs::canonicalize(d).map_err(|e| ConfigError::new(format!("realpath: {d}: {}", io_msg(&e))))
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

/// Upstream's default command of tmpdisk and ondemand
/// (`default-command.sh`): `mkfs` of `$type` (default ext4) with `$label`.
pub const MKFS_COMMAND: &str = r#"type="${type:-ext4}"
labelopt='-L'
case "$type" in
    ext?)
        extra='-F' ;;
    *fat|msdos)
        extra='-I' ;;
    ntfs)
        extra='-Q -F'
        labelopt='-n' ;;
    xfs)
        extra='-f' ;;
esac
truncate -s $size "$disk"
if [ "x$label" = "x" ]; then
    mkfs -t "$type" $extra "$disk"
else
    mkfs -t "$type" $extra $labelopt "$label" "$disk"
fi
"#;

/// A command that makes a disk file: `command=` (or [`MKFS_COMMAND`]),
/// run with `$disk`, `$size` and the other parameters as variables.
#[derive(Debug, Clone)]
pub struct DiskCommand {
    /// The `size=` suggested to the command.
    pub size: u64,
    /// The script fragment.
    pub command: String,
    /// The shell variables, in command-line order.
    pub vars: Vec<(String, String)>,
}

impl DiskCommand {
    /// Take `size=`, `command=` and every other parameter (as a
    /// variable; `disk=` is refused) from `params`. `None` when there is
    /// no `size=`.
    pub fn from_params(params: &mut Params) -> ConfigResult<Option<DiskCommand>> {
        let mut size = None;
        let mut command = None;
        let mut vars = Vec::new();
        for (k, v) in params.take_rest() {
            match k.as_str() {
                "command" => command = Some(v),
                "size" => {
                    size = Some(
                        libnbd::parse_size(&v)
                            .map_err(|e| ConfigError::new(format!("size: {e}")))?,
                    )
                }
                "disk" => {
                    return Err(ConfigError::new(
                        "'disk' parameter cannot be set on the command line",
                    ))
                }
                _ => vars.push((k, v)),
            }
        }
        let Some(size) = size else {
            return Ok(None);
        };
        if size > i64::MAX as u64 {
            return Err(ConfigError::new("size: too large"));
        }
        Ok(Some(DiskCommand {
            size,
            command: command.unwrap_or_else(|| MKFS_COMMAND.to_string()),
            vars,
        }))
    }

    /// The script run for `disk`.
    pub fn script(&self, disk: &Path) -> String {
        let mut s = String::from("exec </dev/null >/dev/null\n");
        s.push_str("disk=");
        shell_quote(&disk.to_string_lossy(), &mut s);
        s.push('\n');
        s.push_str(&format!("size={}\n\n", self.size));
        for (k, v) in &self.vars {
            shell_quote(k, &mut s);
            s.push('=');
            shell_quote(v, &mut s);
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.command);
        s
    }

    /// Run the script for `disk` ("command exited with code N" when it
    /// fails).
    pub fn run(&self, disk: &Path) -> Result<()> {
        use std::os::unix::process::ExitStatusExt;
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(self.script(disk))
            .status()
            .map_err(|e| Error::io("failed to execute command", e))?;
        if let Some(code) = status.code() {
            if code != 0 {
                return Err(Error::eio(format!("command exited with code {code}")));
            }
        } else if let Some(sig) = status.signal() {
            return Err(Error::eio(format!("command killed by signal {sig}")));
        }
        Ok(())
    }
}

impl FileDisk {
    /// Open `disk` (read-only when `readonly`) and take its size.
    pub fn open(disk: &Path, readonly: bool) -> Result<FileDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(disk)
            .map_err(|e| Error::io(format!("open: {}", disk.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("fstat: {}", disk.display()), e))?;
        let size = if meta.file_type().is_block_device() {
            lseek(file.as_raw_fd(), 0, Whence::SeekEnd)
                .map_err(|e| Error::io("lseek", std::io::Error::from_raw_os_error(e as i32)))?
                as u64
        } else if meta.is_dir() {
            return Err(Error::io(
                format!("open: {}", disk.display()),
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        } else {
            meta.len()
        };
        Ok(FileDisk {
            file,
            size,
            writable: !readonly,
        })
    }
}

/// A disk file open for one connection (tmpdisk's unlinked disk,
/// ondemand's filesystem): writable unless read-only, flush and FUA by
/// `fdatasync`, trim by punching holes.
pub struct FileDisk {
    pub(crate) file: File,
    size: u64,
    writable: bool,
}

impl FileDisk {
    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("fdatasync", e))
    }
}

#[async_trait]
impl Handle for FileDisk {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: self.writable,
            flush: true,
            trim: true,
            fua: Fua::Native,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.file.read_exact_at(buf, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::eio("pread: unexpected end of file")
                } else {
                    Error::io("pread", e)
                }
            })
        })
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        run_blocking(|| {
            self.file
                .write_all_at(buf, offset)
                .map_err(|e| Error::io("pwrite", e))?;
            if flags.contains(Flags::FUA) {
                self.sync()?;
            }
            Ok(())
        })
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        run_blocking(|| self.sync())
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        run_blocking(|| {
            // As upstream: a failed hole punch is only worth a debug line.
            let _ = fallocate(
                self.file.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                count as i64,
            );
            if flags.contains(Flags::FUA) {
                self.sync()?;
            }
            Ok(())
        })
    }
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
