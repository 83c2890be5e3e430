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

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::{
    ConfigError, ConfigResult, Error, Handle, OpenContext, Params, Plugin, PluginEntry, Result,
};

use crate::tempdisk::{tmpdir, DiskCommand, FileDisk};

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

/// The configured tmpdisk plugin.
pub struct TmpdiskPlugin {
    command: DiskCommand,
}

/// Build the tmpdisk plugin from `size=`, `command=` and variables.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let command = DiskCommand::from_params(params)?
        .ok_or_else(|| ConfigError::new("size parameter is required"))?;
    Ok(Arc::new(TmpdiskPlugin { command }))
}

impl TmpdiskPlugin {
    /// Make the private directory, run the command, open the disk.
    fn make(&self, readonly: bool) -> Result<FileDisk> {
        let template = tmpdir().join("tmpdiskXXXXXX");
        let dir: PathBuf = nix::unistd::mkdtemp(&template).map_err(|e| {
            Error::io(
                format!("{}", template.display()),
                std::io::Error::from_raw_os_error(e as i32),
            )
        })?;
        let disk = dir.join("disk");
        let r = self
            .command
            .run(&disk)
            .and_then(|()| FileDisk::open(&disk, readonly));
        // The handle keeps the descriptor: the names can go now.
        let _ = std::fs::remove_file(&disk);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }
}

#[async_trait]
impl Plugin for TmpdiskPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let readonly = ctx.readonly;
        run_blocking(|| self.make(readonly)).map(|h| Box::new(h) as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::Flags;

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
        let t = DiskCommand {
            size: 1 << 20,
            command: "true".into(),
            vars,
        };
        let s = t.script(std::path::Path::new("/t/disk"));
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
