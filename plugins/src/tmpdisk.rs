//! # tmpdisk: a fresh temporary filesystem for each client
//!
//! Each time a client connects, a new disk is made for it alone: a
//! sparse file of `size=` bytes in `$TMPDIR` (or `/var/tmp`) on which
//! `mkfs` makes an empty filesystem, or whatever `command=` builds. The
//! disk is removed when the client disconnects.
//!
//! ```text
//! nbdkit tmpdisk 16G
//! nbdkit tmpdisk 1G type=vfat label=SCRATCH
//! nbdkit tmpdisk 16G command=' truncate -s $size "$disk" '
//! nbdkit tmpdisk size=0 base=$PWD/base.img command=' cp --sparse=always "$base" "$disk" '
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE` (required): the virtual size. With `command=` it is
//!   only a suggestion: the disk served is whatever size the command
//!   made.
//! - `type=FS` (default `ext4`): the filesystem type, `mkfs -t`.
//! - `label=LABEL` (default none): the filesystem label.
//! - `command=COMMAND`: a shell script fragment run instead of `mkfs`.
//!   It must create the file `$disk` itself (for example with
//!   `truncate -s $size "$disk"`).
//! - `VAR=VALUE` (any other key): passed to the command as the shell
//!   variable `$VAR` (as `type` and `label` are). `disk=` is refused,
//!   since `$disk` is the disk's path.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's tmpdisk plugin:
//!
//! - On open a private directory `tmpdiskXXXXXX` is made under
//!   `$TMPDIR` (default `/var/tmp`), and the command runs under `/bin/sh`
//!   with stdin and stdout redirected to `/dev/null`, after the lines
//!   `disk=PATH`, `size=BYTES` and one `VAR=VALUE` per other parameter
//!   (shell-quoted, in command-line order). The default command is
//!   upstream's: `truncate` then `mkfs -t "${type:-ext4}"` with `-F`
//!   (ext*), `-I` (fat, msdos), `-Q -F` (ntfs, label by `-n`) or `-f`
//!   (xfs), and `-L "$label"` when a label is set.
//! - A non-zero exit fails the connection ("command exited with code
//!   N"). Otherwise `$disk` is opened (read-only on a read-only
//!   connection), then unlinked with its directory, so it disappears
//!   when the connection closes (also when the command failed).
//! - Writable; flush and FUA use `fdatasync`; trim punches holes (a
//!   failure is ignored); zero is emulated by the server; no extents
//!   (all data); not advertised as multi-conn; thread model parallel.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Flags, Fua, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use crate::tempdisk::{shell_quote, tmpdir};

/// The registry entry of the tmpdisk plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "tmpdisk",
    help: "size=<SIZE>      (required) Virtual filesystem size.\n\
           label=<LABEL>               The filesystem label.\n\
           type=ext4|...               The filesystem type.\n\
           command=<COMMAND>           Alternate command instead of mkfs.",
    magic: Some("size"),
    create,
};

/// Upstream's default command (`default-command.sh`).
const DEFAULT_COMMAND: &str = r#"type="${type:-ext4}"
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

/// The configured tmpdisk plugin.
pub struct TmpdiskPlugin {
    size: u64,
    command: String,
    /// The shell variables, in command-line order.
    vars: Vec<(String, String)>,
}

/// Build the tmpdisk plugin from `size=`, `command=` and variables.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let mut size = None;
    let mut command = None;
    let mut vars = Vec::new();
    for (k, v) in params.items().to_vec() {
        match k.as_str() {
            "command" => command = Some(v),
            "size" => {
                size = Some(
                    libnbd::parse_size(&v).map_err(|e| ConfigError::new(format!("size: {e}")))?,
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
    *params = Params::new(Vec::new());
    let size = size.ok_or_else(|| ConfigError::new("size parameter is required"))?;
    if size > i64::MAX as u64 {
        return Err(ConfigError::new("size: too large"));
    }
    Ok(Arc::new(TmpdiskPlugin {
        size,
        command: command.unwrap_or_else(|| DEFAULT_COMMAND.to_string()),
        vars,
    }))
}

impl TmpdiskPlugin {
    /// The script run for `disk`.
    fn script(&self, disk: &Path) -> String {
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

    /// Make the private directory, run the command, open the disk.
    fn make(&self, readonly: bool) -> Result<TmpdiskHandle> {
        let template = tmpdir().join("tmpdiskXXXXXX");
        let dir: PathBuf = nix::unistd::mkdtemp(&template).map_err(|e| {
            Error::io(
                format!("{}", template.display()),
                std::io::Error::from_raw_os_error(e as i32),
            )
        })?;
        let disk = dir.join("disk");
        let r = self.run_and_open(&disk, readonly);
        // The handle keeps the descriptor: the names can go now.
        let _ = std::fs::remove_file(&disk);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    fn run_and_open(&self, disk: &Path, readonly: bool) -> Result<TmpdiskHandle> {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new("/bin/sh")
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
        Ok(TmpdiskHandle {
            file,
            size,
            writable: !readonly,
        })
    }
}

#[async_trait]
impl Plugin for TmpdiskPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let readonly = ctx.readonly;
        run_blocking(|| self.make(readonly)).map(|h| Box::new(h) as _)
    }
}

/// A connection's private disk (already unlinked).
pub struct TmpdiskHandle {
    file: File,
    size: u64,
    writable: bool,
}

impl TmpdiskHandle {
    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("fdatasync", e))
    }
}

#[async_trait]
impl Handle for TmpdiskHandle {
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

    fn plugin(args: &[&str]) -> ConfigResult<Arc<dyn Plugin>> {
        let mut p = Params::parse(args, Some("size"))?;
        ENTRY.configure(&mut p)
    }

    #[test]
    fn config_and_script() {
        assert!(plugin(&[])
            .err()
            .unwrap()
            .to_string()
            .contains("size parameter"));
        assert!(plugin(&["1M", "disk=x"]).is_err());
        let mut p = Params::parse(&["1M", "a=x y", "b=it's"], Some("size")).unwrap();
        let mut vars = Vec::new();
        for (k, v) in p.items() {
            vars.push((k.clone(), v.clone()));
        }
        assert!(ENTRY.configure(&mut p).is_ok());
        let t = TmpdiskPlugin {
            size: 1 << 20,
            command: "true".into(),
            vars,
        };
        let s = t.script(Path::new("/t/disk"));
        assert!(s.contains("disk=/t/disk\nsize=1048576\n"), "{s}");
        assert!(s.contains("a='x y'\nb='it'\\''s'\n"), "{s}");
    }

    #[tokio::test]
    async fn fresh_disk_per_open() {
        let p = plugin(&[
            "64K",
            r#"command=truncate -s $size "$disk"; printf hi > "$disk.x""#,
        ])
        .unwrap();
        let h = p.open(&OpenContext::default()).await.unwrap();
        assert_eq!(h.size().unwrap(), 65536);
        h.pwrite(b"abc", 0, Flags::FUA).await.unwrap();
        let h2 = p.open(&OpenContext::default()).await.unwrap();
        let mut b = [1u8; 3];
        h2.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert_eq!(b, [0; 3]);
        let bad = plugin(&["1M", "command=exit 3"]).unwrap();
        let e = bad.open(&OpenContext::default()).await.err().unwrap();
        assert!(e.msg.contains("exited with code 3"), "{}", e.msg);
    }
}
