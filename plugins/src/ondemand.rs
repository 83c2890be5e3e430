//! # ondemand: a persistent filesystem per export name, made on first use
//!
//! A client asking for an export name gets the file of that name in
//! `dir=EXPORTSDIR`; if there is none yet, it is made first (a sparse
//! file of `size=` bytes formatted by `mkfs`, or whatever `command=`
//! builds) and kept for later connections and later servers. A
//! filesystem is locked while a client uses it. The export list is the
//! directory's files.
//!
//! ```text
//! nbdkit ondemand dir=/var/tmp/exports 1G
//! nbdkit ondemand dir=/var/tmp/exports 1G type=xfs label=DATA wait=true
//! nbdkit ondemand dir=/var/tmp/exports 16M command=' truncate -s $size "$disk" '
//! ```
//!
//! ## Parameters
//!
//! - `dir=EXPORTSDIR` (required): the directory holding the filesystems.
//! - `[size=]SIZE` (required): the size of new filesystems. With
//!   `command=` it is only a suggestion: a disk is whatever size the
//!   command made.
//! - `type=FS` (default `ext4`): the filesystem type, `mkfs -t`.
//! - `label=LABEL` (default none): the filesystem label.
//! - `command=COMMAND`: a shell script fragment run instead of `mkfs`. It
//!   must create the file `$disk` itself (`truncate -s $size "$disk"`).
//! - `wait=true`: a client asking for a filesystem that another client
//!   has waits until it is released, instead of being refused.
//! - `VAR=VALUE` (any other key): passed to the command as the shell
//!   variable `$VAR` (as `type` and `label` are). `disk=` is refused.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's ondemand plugin:
//!
//! - The empty export name stands for `default`. A name longer than 255
//!   bytes or holding `.`, `/` or `:` is refused ("invalid exportname").
//! - A missing file is made by the command run (as tmpdisk runs it: see
//!   [`crate::tmpdisk`]) with `$disk` the file's absolute path, the
//!   exports directory locked meanwhile so that two clients do not make
//!   the same file. A failure ("command exited with code N") refuses
//!   the client and leaves whatever the command made.
//! - The file is opened (read-only for a read-only connection) and
//!   locked (`flock`) for the connection's life; a second client is
//!   refused with "NAME: filesystem is locked by another client", or
//!   waits with `wait=true`.
//! - `NBD_OPT_LIST` lists the directory's entries whose names are valid
//!   export names (sorted).
//! - Writable; flush and FUA use `fdatasync`; trim punches holes; zero
//!   is emulated by the server; no extents; not multi-conn; thread model
//!   parallel.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::{
    ConfigError, ConfigResult, Error, ExportEntry, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

use crate::tempdisk::{DiskCommand, FileDisk};

/// The registry entry of the ondemand plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "ondemand",
    help: "dir=<EXPORTSDIR> (required) Directory containing filesystems.\n\
           size=<SIZE>      (required) Virtual filesystem size.\n\
           label=<LABEL>               The filesystem label.\n\
           type=ext4|...               The filesystem type.\n\
           command=<COMMAND>           Alternate command instead of mkfs.\n\
           wait=true                   Wait for a locked filesystem.",
    magic: Some("size"),
    create,
};

/// The configured ondemand plugin.
pub struct OndemandPlugin {
    dir: PathBuf,
    wait: bool,
    command: DiskCommand,
}

/// Build the ondemand plugin from `dir=`, `wait=` and tmpdisk's
/// `size=`, `command=` and variables.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let dir = params.take("dir");
    let wait = params.take_bool("wait")?.unwrap_or(false);
    let command = DiskCommand::from_params(params)?;
    let (Some(dir), Some(command)) = (dir, command) else {
        return Err(ConfigError::new("dir and size parameters are required"));
    };
    let dir = crate::tempdisk::real_dir(&dir)?;
    Ok(Arc::new(OndemandPlugin { dir, wait, command }))
}

/// Is `name` a valid export name (and so a file name in the directory)?
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.contains(['.', '/', ':'])
}

/// `flock(2)`, retried on EINTR.
fn flock(fd: i32, op: i32) -> std::io::Result<()> {
    loop {
        // SAFETY: flock only reads its integer arguments.
        if unsafe { libc::flock(fd, op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl OndemandPlugin {
    fn open_export(&self, name: &str, readonly: bool) -> Result<FileDisk> {
        if !valid_name(name) {
            return Err(Error::einval(format!(
                "invalid exportname ‘{name}’ rejected"
            )));
        }
        let path = self.dir.join(name);
        self.make_if_missing(&path)?;
        let disk = FileDisk::open(&path, readonly)?;
        let fd = disk.file.as_raw_fd();
        let how = if self.wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        match flock(fd, how) {
            Ok(()) => Ok(disk),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(Error::eio(format!(
                "{name}: filesystem is locked by another client"
            ))),
            Err(e) => Err(Error::io("flock", e)),
        }
    }

    /// Run the command for `path` unless it exists, holding the exports
    /// directory's lock so that one client makes it.
    fn make_if_missing(&self, path: &Path) -> Result<()> {
        let dir = std::fs::File::open(&self.dir)
            .map_err(|e| Error::io(format!("open: {}", self.dir.display()), e))?;
        flock(dir.as_raw_fd(), libc::LOCK_EX).map_err(|e| Error::io("flock", e))?;
        if std::fs::symlink_metadata(path).is_ok() {
            return Ok(());
        }
        self.command.run(path)
        // The directory's lock goes with `dir`.
    }
}

#[async_trait]
impl Plugin for OndemandPlugin {
    fn default_export(&self) -> String {
        "default".into()
    }
    async fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("opendir: {}", self.dir.display()), e))?;
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| ExportEntry {
                name,
                description: None,
            })
            .collect())
    }
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let name = if ctx.export_name.is_empty() {
            "default"
        } else {
            ctx.export_name.as_str()
        };
        let readonly = ctx.readonly;
        run_blocking(|| self.open_export(name, readonly)).map(|h| Box::new(h) as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::Flags;

    fn plugin(dir: &Path, more: &[&str]) -> ConfigResult<Arc<dyn Plugin>> {
        let d = format!("dir={}", dir.display());
        let mut args = vec![d.as_str()];
        args.extend(more);
        let mut p = Params::parse(&args, Some("size"))?;
        ENTRY.configure(&mut p)
    }

    fn ctx(name: &str) -> OpenContext {
        OpenContext {
            export_name: name.into(),
            ..OpenContext::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn made_once_kept_and_locked() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let exports = d.path().join("ex");
        std::fs::create_dir(&exports).unwrap();
        let cmd = format!(
            "command=echo \"$disk $foo\" >> {}; truncate -s $size \"$disk\"",
            log.display()
        );
        let p = plugin(&exports, &["64K", &cmd, "foo=bar"]).unwrap();
        let h = p.open(&ctx("a")).await.unwrap();
        assert_eq!(h.size().unwrap(), 65536);
        h.pwrite(b"kept", 0, Flags::FUA).await.unwrap();
        // Locked while open.
        let e = p.open(&ctx("a")).await.err().unwrap();
        assert!(
            e.msg.contains("a: filesystem is locked by another client"),
            "{}",
            e.msg
        );
        drop(h);
        let h = p.open(&ctx("a")).await.unwrap();
        let mut b = [0u8; 4];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"kept");
        let _d = p.open(&ctx("")).await.unwrap();
        let logged = std::fs::read_to_string(&log).unwrap();
        let a = exports.join("a");
        let def = exports.join("default");
        assert_eq!(
            logged,
            format!("{} bar\n{} bar\n", a.display(), def.display())
        );
        let names: Vec<String> = p
            .list_exports(false)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a", "default"]);
        for bad in ["b.c", "x/y", "p:q"] {
            let e = p.open(&ctx(bad)).await.err().unwrap();
            assert!(e.msg.contains("invalid exportname"), "{}", e.msg);
        }
        let failing = plugin(&exports, &["64K", "command=exit 3"]).unwrap();
        let e = failing.open(&ctx("f")).await.err().unwrap();
        assert!(e.msg.contains("command exited with code 3"), "{}", e.msg);
    }

    #[test]
    fn bad_parameters() {
        let d = tempfile::tempdir().unwrap();
        let msg = |r: ConfigResult<Arc<dyn Plugin>>| r.err().unwrap().to_string();
        assert!(msg(plugin(d.path(), &[])).contains("dir and size"));
        assert!(msg(plugin(d.path(), &["1M", "disk=x"])).contains("'disk'"));
        assert!(msg(plugin(d.path(), &["1M", "wait=maybe"])).contains("wait"));
        assert!(msg(plugin(Path::new("/nonexistent"), &["1M"])).contains("realpath"));
    }
}
