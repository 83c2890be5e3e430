//! # iso: a CD-ROM (ISO 9660) image made from directories
//!
//! At startup the directories are made into an ISO image by `xorriso`
//! (as `mkisofs`), `genisoimage` or `mkisofs`, written to a temporary
//! file that is served read-only.
//!
//! ```text
//! nbdkit iso /path/to/directory params='-JrT'
//! nbdkit iso dir=a dir=b params='-JrT -V "My Disk Image"'
//! nbdkit iso /path/to/directory prog=genisoimage
//! ```
//!
//! ## Parameters
//!
//! - `[dir=]DIRECTORY` (required, repeatable): a directory whose files
//!   and subdirectories appear in the ISO's root; several are merged.
//! - `params='PARAMETERS ...'`: more parameters for the program, put on
//!   its command line through the shell as they are (so quote them for
//!   the shell), e.g. `-JrT` for Joliet, Rock Ridge and TRANS.TBL.
//! - `prog=PROGRAM`: the program (found on `$PATH`). The default is the
//!   first of `xorriso`, `genisoimage` and `mkisofs` installed.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's iso plugin:
//!
//! - Before the server starts serving, `/bin/sh` runs
//!   `PROG -quiet PARAMS DIR... >TMPFILE` (with `-as mkisofs` after the
//!   program when it is xorriso), each directory made absolute and
//!   shell-quoted, stdin from `/dev/null`. `TMPFILE` is an unlinked file
//!   `isoXXXXXX` in `$TMPDIR` (default `/var/tmp`). A failure stops the
//!   server ("PROG: command failed with exit code N").
//! - One difference: upstream 1.32, built for xorriso, puts `-as
//!   mkisofs` after any `prog=` (so `prog=genisoimage` fails); ours puts
//!   it only after a program named `xorriso`.
//! - Read-only; no flush, trim, zero or extents; multi-conn is safe;
//!   cache is emulated by reads; thread model parallel.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigError, ConfigResult, Handle, OpenContext, Params, Plugin, PluginEntry, Result};

use crate::ptable::{Disk, DiskFile, Layout, MadeOnce};
use crate::tempdisk::{on_path, quoted, real_dir, run_sh, TempImage};

/// The registry entry of the iso plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "iso",
    help: "dir=<DIRECTORY>     (required) The directory to serve.\n\
           params='<PARAMS>'              Extra parameters to pass.\n\
           prog=<ISOPROG>                 The program used to make ISOs.",
    magic: Some("dir"),
    create,
};

/// The configured iso plugin; the image is made in `get_ready`.
pub struct IsoPlugin {
    command: String,
    prog: String,
    disk: MadeOnce,
}

/// Build the iso plugin from `dir=`, `params=` and `prog=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let dirs = params.take_all("dir");
    let extra = params.take("params");
    let prog = params.take("prog");
    if dirs.is_empty() {
        return Err(ConfigError::new(
            "you must supply the dir=<DIRECTORY> parameter after the plugin name on the command line",
        ));
    }
    let prog = prog.unwrap_or_else(|| {
        ["xorriso", "genisoimage", "mkisofs"]
            .into_iter()
            .find(|p| on_path(p))
            .unwrap_or("xorriso")
            .to_string()
    });
    let base = std::path::Path::new(&prog)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut command = quoted(&prog);
    if base.contains("xorriso") {
        command.push_str(" -as mkisofs");
    }
    command.push_str(" -quiet");
    if let Some(p) = extra {
        command.push(' ');
        command.push_str(&p);
    }
    for d in &dirs {
        command.push(' ');
        command.push_str(&quoted(&real_dir(d)?.to_string_lossy()));
    }
    Ok(Arc::new(IsoPlugin {
        command,
        prog,
        disk: MadeOnce::default(),
    }))
}

impl IsoPlugin {
    fn make(&self) -> std::result::Result<Disk, String> {
        let img = TempImage::new("iso")?;
        run_sh(&self.command, Some(&img.file), &self.prog)?;
        let file = img.into_file()?;
        let size = file.metadata().map_err(|e| format!("fstat: {e}"))?.len();
        Ok(Disk::new(
            Layout::whole(size),
            vec![DiskFile {
                name: "iso".into(),
                file,
                writable: false,
            }],
            false,
        ))
    }
}

#[async_trait]
impl Plugin for IsoPlugin {
    fn get_ready(&self) -> ConfigResult<()> {
        self.disk.make(|| self.make())
    }
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        self.disk.open("iso: the image")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::Flags;

    #[tokio::test]
    async fn fake_program_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let prog = d.path().join("fakeiso");
        std::fs::write(&prog, "#!/bin/sh\nprintf '%s|' \"$@\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = d.path().to_str().unwrap();
        let prog_arg = format!("prog={}", prog.display());
        let mut p = Params::parse(&[dir, &prog_arg, "params=-JrT -V 'A B'"], Some("dir")).unwrap();
        let plugin = ENTRY.configure(&mut p).unwrap();
        plugin.get_ready().unwrap();
        let h = plugin.open(&OpenContext::default()).await.unwrap();
        let want = format!(
            "-quiet|-JrT|-V|A B|{}|",
            std::fs::canonicalize(dir).unwrap().display()
        );
        assert_eq!(h.size().unwrap(), want.len() as u64);
        let mut b = vec![0; want.len()];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert_eq!(String::from_utf8(b).unwrap(), want);
        assert!(!h.caps().unwrap().write && h.caps().unwrap().multi_conn);

        let mut p = Params::parse(&[dir, "prog=false"], Some("dir")).unwrap();
        let e = ENTRY.configure(&mut p).unwrap().get_ready().unwrap_err();
        assert_eq!(e.to_string(), "false: command failed with exit code 1");
        let mut p = Params::parse(&["/nonexistent"], Some("dir")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
        let mut p = Params::parse::<&str>(&[], Some("dir")).unwrap();
        assert!(ENTRY.configure(&mut p).is_err());
    }
}
