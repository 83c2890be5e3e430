//! # linuxdisk: a partitioned disk with an ext2/3/4 filesystem of a directory
//!
//! At startup `mke2fs -d` makes an ext2, ext3 or ext4 filesystem holding
//! a copy of the directory's files in a temporary file; the disk served
//! (read-only) is that filesystem as the single partition of a GPT disk.
//!
//! ```text
//! nbdkit linuxdisk /path/to/directory label=ROOTFS
//! nbdkit --filter=cow linuxdisk /path/to/directory size=+1G
//! nbdkit --filter=partition linuxdisk /path/to/directory partition=1
//! ```
//!
//! ## Parameters
//!
//! - `[dir=]DIRECTORY` (required): the files and subdirectories to put
//!   in the filesystem's root.
//! - `label=LABEL`: the filesystem label.
//! - `size=SIZE` or `size=+SIZE`: the filesystem's size; with `+`, at
//!   least that much free space beyond the files. Without it the size is
//!   estimated to just hold the files. Too small a `size=` makes
//!   `mke2fs` fail, and the server with it.
//! - `type=ext2|ext3|ext4` (default `ext2`): the filesystem type.
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's linuxdisk plugin:
//!
//! - The estimate is `du -c -k -s DIR` (in KiB) plus 20%, rounded up to
//!   512 bytes, at least 1M, plus 32M for the journal of ext3 and ext4;
//!   `size=+SIZE` adds `SIZE` to it.
//! - Before the server starts serving, a sparse file `linuxdiskXXXXXX`
//!   of that size in `$TMPDIR` (default `/var/tmp`) is made and
//!   `mke2fs -q -F -t TYPE [-L LABEL] -d DIR FILE` run on it; a failure
//!   stops the server ("mke2fs: command failed with exit code N"). The
//!   file is unlinked once open.
//! - The disk is a GPT (see [`crate::ptable`]) with the filesystem as
//!   partition 1 at sector 2048, flagged legacy BIOS bootable, unnamed,
//!   with a random unique GUID. One difference: upstream 1.32 writes the
//!   text of the Linux filesystem type GUID where the GUID belongs (so
//!   tools show the type `36434630-4433-4641-2D38-3438332D3437`); ours
//!   writes the GUID, `0FC63DAF-8483-4772-8E79-3D69D8477DE4`.
//! - Read-only (writes fail with EPERM); no flush, trim, zero or
//!   extents; multi-conn is safe; cache is emulated; thread model
//!   parallel.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigError, ConfigResult, Handle, OpenContext, Params, Plugin, PluginEntry, Result};

use crate::ptable::{self, Disk, DiskFile, Kind, MadeOnce, PartSpec};
use crate::tempdisk::{on_path, quoted, run_sh, sh_output, TempImage};

/// The registry entry of the linuxdisk plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "linuxdisk",
    help: "dir=<DIRECTORY>  (required) The directory to serve.\n\
           label=<LABEL>               The filesystem label.\n\
           type=ext2|ext3|ext4         The filesystem type.\n\
           size=[+]<SIZE>              The virtual filesystem size.",
    magic: Some("dir"),
    create,
};

/// How the filesystem's size is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    /// Estimated from the files.
    Estimate,
    /// The estimate plus this much free space.
    Plus(u64),
    /// Exactly this.
    Exact(u64),
}

/// The configured linuxdisk plugin; the disk is made in `get_ready`.
pub struct LinuxdiskPlugin {
    dir: String,
    label: Option<String>,
    fstype: String,
    size: Size,
    disk: MadeOnce,
}

/// Build the linuxdisk plugin from `dir=`, `label=`, `size=`, `type=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let dir = params.take("dir");
    let label = params.take("label");
    let fstype = params.take("type").unwrap_or_else(|| "ext2".into());
    let size = match params.take("size") {
        None => Size::Estimate,
        Some(v) => {
            let (plus, s) = match v.strip_prefix('+') {
                Some(s) => (true, s),
                None => (false, v.as_str()),
            };
            let n = libnbd::parse_size(s)
                .map_err(|_| ConfigError::new(format!("could not parse size string ({s})")))?;
            if plus {
                Size::Plus(n)
            } else {
                Size::Exact(n)
            }
        }
    };
    if !matches!(fstype.as_str(), "ext2" | "ext3" | "ext4") {
        return Err(ConfigError::new(
            "type=<TYPE> must be an filesystem type supported by e2fsprogs",
        ));
    }
    let dir = dir.ok_or_else(|| {
        ConfigError::new(
            "you must supply the dir=<DIRECTORY> parameter after the plugin name on the command line",
        )
    })?;
    // Made absolute now, in case the server changes directory later.
    let dir = match std::env::current_dir() {
        Ok(cwd) if !dir.starts_with('/') => cwd.join(&dir).to_string_lossy().into_owned(),
        _ => dir,
    };
    Ok(Arc::new(LinuxdiskPlugin {
        dir,
        label,
        fstype,
        size,
        disk: MadeOnce::default(),
    }))
}

/// The filesystem size upstream picks for `du_kib` KiB of files.
fn estimate(du_kib: u64, fstype: &str) -> u64 {
    let bytes = du_kib * 1024;
    let mut size = (bytes + bytes / 5).div_ceil(512) * 512;
    size = size.max(1 << 20);
    if fstype != "ext2" {
        size += 32 << 20;
    }
    size
}

impl LinuxdiskPlugin {
    fn du(&self) -> std::result::Result<u64, String> {
        let out = sh_output(&format!("du -c -k -s {}", quoted(&self.dir)), "du")?;
        out.lines()
            .last()
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("du: could not parse its output: {out:?}"))
    }

    fn make(&self) -> std::result::Result<Disk, String> {
        let size = match self.size {
            Size::Exact(n) => n,
            Size::Estimate => estimate(self.du()?, &self.fstype),
            Size::Plus(n) => estimate(self.du()?, &self.fstype)
                .checked_add(n)
                .ok_or("size: too large")?,
        };
        let img = TempImage::new("linuxdisk")?;
        img.file
            .set_len(size)
            .map_err(|e| format!("ftruncate: {e}"))?;
        let mke2fs = if on_path("mke2fs") {
            "mke2fs"
        } else {
            "/sbin/mke2fs"
        };
        let mut cmd = format!("{mke2fs} -q -F -t {}", self.fstype);
        if let Some(l) = &self.label {
            cmd.push_str(&format!(" -L {}", quoted(l)));
        }
        cmd.push_str(&format!(
            " -d {} {}",
            quoted(&self.dir),
            quoted(&img.path().to_string_lossy())
        ));
        run_sh(&cmd, None, "mke2fs")?;
        let file = img.into_file()?;
        let fs_size = file.metadata().map_err(|e| format!("fstat: {e}"))?.len();
        let part = PartSpec {
            bootable: true,
            ..PartSpec::new(fs_size)
        };
        let layout = ptable::layout(&[part], Kind::Gpt)?;
        Ok(Disk::new(
            layout,
            vec![DiskFile {
                name: "filesystem".into(),
                file,
                writable: false,
            }],
            false,
        ))
    }
}

#[async_trait]
impl Plugin for LinuxdiskPlugin {
    fn get_ready(&self) -> ConfigResult<()> {
        self.disk.make(|| self.make())
    }
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        self.disk.open("linuxdisk: the disk")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::Flags;

    #[test]
    fn estimates_as_upstream() {
        // Upstream's figures for these du outputs.
        assert_eq!(estimate(312, "ext2"), 1 << 20);
        assert_eq!(estimate(1028, "ext2"), 1_263_616);
        assert_eq!(estimate(20484, "ext2"), 25_170_944);
        assert_eq!(estimate(312, "ext4"), 34_603_008);
        assert_eq!(estimate(20484, "ext3"), 58_725_376);
    }

    #[test]
    fn bad_parameters() {
        let bad = |args: &[&str]| {
            let mut p = Params::parse(args, Some("dir")).unwrap();
            ENTRY.configure(&mut p).err().unwrap().to_string()
        };
        assert!(bad(&["/tmp", "type=xfs"]).contains("e2fsprogs"));
        assert!(bad(&["/tmp", "size=foo"]).contains("could not parse size"));
        assert!(bad(&["/tmp", "size=+foo"]).contains("could not parse size"));
        assert!(bad(&[]).contains("dir=<DIRECTORY>"));
    }

    #[tokio::test]
    async fn builds_a_gpt_disk() {
        if !on_path("mke2fs") && !std::path::Path::new("/sbin/mke2fs").exists() {
            libnbd::elog!("SKIP: no mke2fs");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"hi").unwrap();
        let mut p = Params::parse(&[d.path().to_str().unwrap(), "label=L"], Some("dir")).unwrap();
        let plugin = ENTRY.configure(&mut p).unwrap();
        plugin.get_ready().unwrap();
        let h = plugin.open(&OpenContext::default()).await.unwrap();
        let mut disk = vec![0u8; h.size().unwrap() as usize];
        h.pread(&mut disk, 0, Flags::NONE).await.unwrap();
        let parts = ptable::parse_gpt(&disk).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].start, parts[0].len), (2048, 2048));
        // The ext2 superblock's magic and label.
        let sb = 2048 * 512 + 1024;
        assert_eq!(disk[sb + 56..sb + 58], [0x53, 0xef]);
        assert_eq!(&disk[sb + 120..sb + 122], b"L\0");
        assert!(h.pwrite(b"x", 0, Flags::NONE).await.is_err());
    }
}
