//! # partitioning: a partitioned virtual disk made of files
//!
//! Each file given becomes one partition of a virtual disk, in order,
//! behind a partition table made up in memory: an MBR (with an extended
//! partition and logical partitions beyond four) or a GPT. Clients may
//! read everything and write to the partitions, which writes the files;
//! the tables and the padding between partitions are read-only.
//!
//! ```text
//! nbdkit partitioning ext4fs.img
//! nbdkit partitioning boot.img mbr-id=0x82 swap.img mbr-id=default root.img
//! nbdkit partitioning partition-type=gpt alignment=4K a.img b.img
//! nbdkit --filter=partition partitioning file.raw partition=1
//! ```
//!
//! ## Parameters
//!
//! - `[file=]FILENAME` (required, repeatable): a file holding one
//!   partition's data. Empty files are refused.
//! - `partition-type=mbr|gpt`: the table. Without it: GPT for more than
//!   four files or files totalling more than MBR's limit (2 TiB less
//!   5M, as upstream), else MBR.
//! - `alignment=N` (default `1M`): the start of every following file is
//!   aligned to `N` bytes, a multiple of 512.
//! - `mbr-id=0xN|default`: the MBR type byte of every following file
//!   (hex with `0x`, octal with `0`, else decimal); `default` is 0x83.
//! - `type-guid=GUID|default`: the GPT type GUID of every following file;
//!   `default` is `0FC63DAF-8483-4772-8E79-3D69D8477DE4` (Linux data).
//!
//! ## Behaviour
//!
//! As upstream nbdkit 1.32's partitioning plugin:
//!
//! - The layout is upstream's (see [`crate::ptable`]): with the default
//!   alignment the first partition starts at sector 2048; each file's
//!   size is rounded up to whole 512-byte sectors (the tail reads as
//!   zeroes); the first partition is flagged bootable (MBR 0x80, GPT
//!   "legacy BIOS bootable"); GPT partitions are named after their file
//!   as given (when that is ASCII and at most 35 characters, else they
//!   are unnamed) and get random unique GUIDs, the disk GUID is zero, and
//!   the table has 128 entries (more in steps of 128 beyond that).
//! - Files are opened read-write (read-only if that is refused, and then
//!   writes to them fail). A write that would change a table, padding
//!   or a sector tail fails with EIO (rewriting the same bytes succeeds).
//! - Flush `fdatasync`s every file; FUA and zero are emulated by the
//!   server; no trim; no extents (all data); multi-conn is safe; cache is
//!   emulated by reads; thread model parallel.

use std::fs::File;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigError, ConfigResult, Handle, OpenContext, Params, Plugin, PluginEntry, Result};

use crate::ptable::{self, Disk, DiskFile, Kind, PartSpec};
use crate::tempdisk::io_msg;

/// The registry entry of the partitioning plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "partitioning",
    help: "file=<FILENAME>  (required) File(s) containing partitions\n\
           partition-type=mbr|gpt      Partition type",
    magic: Some("file"),
    create,
};

/// The configured partitioning plugin: the files and the layout.
pub struct PartitioningPlugin {
    disk: Disk,
}

/// The largest total of the files' sizes upstream puts under an MBR
/// (2^32 - 1 sectors less 5M of room for the tables and alignment).
const MBR_MAX: u64 = u32::MAX as u64 * 512 - 5 * (1 << 20);

/// Parse an `mbr-id=` value as nbdkit parses a `uint8_t`.
fn parse_mbr_id(v: &str) -> ConfigResult<u8> {
    if v == "default" {
        return Ok(ptable::MBR_LINUX);
    }
    let t = v.trim();
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    };
    match r {
        Ok(n) if n <= 0xff => Ok(n as u8),
        Ok(_) => Err(ConfigError::new(format!(
            "mbr-id: could not parse number: \"{v}\": Numerical result out of range"
        ))),
        Err(_) => Err(ConfigError::new(format!(
            "mbr-id: could not parse number: \"{v}\": Invalid argument"
        ))),
    }
}

/// Open a partition's file, read-write if allowed, and take its size.
fn open_part(v: &str) -> ConfigResult<(File, bool, u64)> {
    let err = |e: std::io::Error| ConfigError::new(format!("{v}: {}", io_msg(&e)));
    let (file, writable) = match std::fs::OpenOptions::new().read(true).write(true).open(v) {
        Ok(f) => (f, true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EACCES | libc::EROFS | libc::EPERM)
            ) =>
        {
            (File::open(v).map_err(err)?, false)
        }
        Err(e) => return Err(err(e)),
    };
    let meta = file.metadata().map_err(err)?;
    let size = if meta.is_file() {
        meta.len()
    } else {
        // A block device: its size is where its end is.
        use std::io::Seek;
        (&file).seek(std::io::SeekFrom::End(0)).map_err(err)?
    };
    Ok((file, writable, size))
}

/// Build the plugin: the files in order with the settings in force where
/// each appears, then the layout.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let mut kind = None;
    let mut alignment = 1u64 << 20;
    let mut mbr_id = ptable::MBR_LINUX;
    let mut type_guid = ptable::parse_guid(ptable::GUID_LINUX).expect("valid GUID");
    let mut specs = Vec::new();
    let mut parts = Vec::new();
    for (k, v) in params.take_rest() {
        match k.as_str() {
            "file" => {
                let (file, writable, size) = open_part(&v)?;
                if size == 0 {
                    return Err(ConfigError::new(format!(
                        "{v}: zero length partitions are not allowed"
                    )));
                }
                specs.push(PartSpec {
                    size,
                    alignment,
                    mbr_id,
                    type_guid,
                    guid: rand::random(),
                    // As upstream: named only when the name fits in
                    // ASCII with its terminating zero.
                    name: if v.is_ascii() && v.len() < 36 {
                        v.clone()
                    } else {
                        String::new()
                    },
                    bootable: specs.is_empty(),
                });
                parts.push(DiskFile {
                    name: v,
                    file,
                    writable,
                });
            }
            "partition-type" => {
                kind = Some(match v.to_ascii_lowercase().as_str() {
                    "mbr" | "dos" => Kind::Mbr,
                    "gpt" => Kind::Gpt,
                    _ => {
                        return Err(ConfigError::new(format!("unknown partition-type: {v}")));
                    }
                })
            }
            "alignment" => {
                let a = libnbd::parse_size(&v)
                    .map_err(|_| ConfigError::new(format!("could not parse size string ({v})")))?;
                if a == 0 || a % ptable::SECTOR != 0 {
                    return Err(ConfigError::new(format!(
                        "partition alignment {a} should be a multiple of sector size {}",
                        ptable::SECTOR
                    )));
                }
                alignment = a;
            }
            "mbr-id" => mbr_id = parse_mbr_id(&v)?,
            "type-guid" => {
                type_guid = if v == "default" {
                    ptable::parse_guid(ptable::GUID_LINUX).expect("valid GUID")
                } else {
                    ptable::parse_guid(&v)
                        .ok_or_else(|| ConfigError::new(format!("could not validate GUID: {v}")))?
                }
            }
            _ => {
                return Err(ConfigError::new(format!(
                    "unknown parameter '{k}' (see 'nbdkit partitioning --help')"
                )))
            }
        }
    }
    if specs.is_empty() {
        return Err(ConfigError::new(
            "at least one file= parameter must be supplied",
        ));
    }
    let total: u64 = specs.iter().map(|p| p.size).sum();
    let kind = match kind {
        Some(Kind::Mbr) if total > MBR_MAX => {
            return Err(ConfigError::new(format!(
                "MBR partition table type supports a maximum virtual disk size of about 2 TB, \
                 but you requested {} partition(s) and a total size of {total} bytes (> {MBR_MAX}).  \
                 Try using: partition-type=gpt",
                specs.len()
            )))
        }
        Some(k) => k,
        None if specs.len() > 4 || total > MBR_MAX => Kind::Gpt,
        None => Kind::Mbr,
    };
    let layout = ptable::layout(&specs, kind).map_err(ConfigError::new)?;
    Ok(Arc::new(PartitioningPlugin {
        disk: Disk::new(layout, parts, true),
    }))
}

#[async_trait]
impl Plugin for PartitioningPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(self.disk.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::testing::open_plugin;
    use libnbd::Flags;

    fn files(dir: &std::path::Path, sizes: &[usize]) -> Vec<String> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let p = dir.join(format!("p{}", i + 1));
                std::fs::write(&p, vec![i as u8 + 1; s]).unwrap();
                p.to_string_lossy().into_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn mbr_reads_and_writes() {
        let d = tempfile::tempdir().unwrap();
        let f = files(d.path(), &[1000, 2000]);
        let h = open_plugin(&ENTRY, &[f[0].as_str(), "mbr-id=0x82", f[1].as_str()]).await;
        let size = h.size().unwrap();
        assert_eq!(size, (4096 + 4) * 512);
        let mut disk = vec![0u8; size as usize];
        h.pread(&mut disk, 0, Flags::NONE).await.unwrap();
        let p = ptable::parse_mbr(&disk).unwrap();
        assert_eq!((p[0].start, p[0].len, p[0].id), (2048, 2, 0x83));
        assert_eq!((p[1].start, p[1].len, p[1].id), (4096, 4, 0x82));
        assert_eq!(disk[2048 * 512], 1);
        assert_eq!(disk[4096 * 512 + 1999], 2);
        assert_eq!(disk[4096 * 512 + 2000], 0);
        // Data goes to the file; the table only takes its own bytes.
        h.pwrite(b"xyz", 4096 * 512 + 10, Flags::NONE)
            .await
            .unwrap();
        assert_eq!(&std::fs::read(&f[1]).unwrap()[10..13], b"xyz");
        h.pwrite(&disk[..512], 0, Flags::NONE).await.unwrap();
        let e = h.pwrite(&[9; 512], 0, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, libnbd::protocol::errno::EIO);
        assert!(h
            .pwrite(&[1; 4], 2048 * 512 + 998, Flags::NONE)
            .await
            .is_err());
        h.flush(Flags::NONE).await.unwrap();
    }

    #[tokio::test]
    async fn default_table_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let f = files(d.path(), &[512, 512, 512, 512, 512]);
        let args: Vec<&str> = f.iter().map(|s| s.as_str()).collect();
        let h = open_plugin(&ENTRY, &args).await;
        let mut disk = vec![0u8; h.size().unwrap() as usize];
        h.pread(&mut disk, 0, Flags::NONE).await.unwrap();
        let p = ptable::parse_gpt(&disk).unwrap();
        assert_eq!(p.len(), 5);
        assert_eq!(p[4].name, f[4]);
        let h = open_plugin(
            &ENTRY,
            &[&f[0], "partition-type=mbr", &f[1], &f[2], &f[3], &f[4]],
        )
        .await;
        let mut disk = vec![0u8; h.size().unwrap() as usize];
        h.pread(&mut disk, 0, Flags::NONE).await.unwrap();
        assert_eq!(ptable::parse_mbr(&disk).unwrap().len(), 5);

        let bad = |args: &[&str]| {
            let mut p = Params::parse(args, Some("file")).unwrap();
            ENTRY.configure(&mut p).err().unwrap().to_string()
        };
        assert!(bad(&[]).contains("at least one file"));
        assert!(bad(&[&f[0], "alignment=3000"]).contains("multiple of sector size"));
        assert!(bad(&["alignment=foo", &f[0]]).contains("could not parse size"));
        assert!(bad(&["mbr-id=0x182", &f[0]]).contains("out of range"));
        assert!(bad(&["type-guid=xyz", &f[0]]).contains("GUID"));
        assert!(bad(&[&f[0], "partition-type=foo"]).contains("partition-type"));
        assert!(bad(&["/nonexistent/x"]).contains("No such file"));
        let empty = d.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(bad(&[empty.to_str().unwrap()]).contains("zero length"));
        assert_eq!(parse_mbr_id("83").unwrap(), 83);
        assert_eq!(parse_mbr_id("0x0c").unwrap(), 12);
        assert_eq!(parse_mbr_id("010").unwrap(), 8);
        assert_eq!(parse_mbr_id("default").unwrap(), 0x83);
        assert_eq!(MBR_MAX, 2_199_018_012_160, "upstream's limit");
        // Beyond it: GPT by default, an error with partition-type=mbr.
        let huge = d.path().join("huge");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(MBR_MAX + 512)
            .unwrap();
        let huge = huge.to_str().unwrap();
        assert!(bad(&[huge, "partition-type=mbr"]).contains("maximum virtual disk size"));
        let h = open_plugin(&ENTRY, &[huge]).await;
        let mut b = [0u8; 8];
        h.pread(&mut b, 512, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"EFI PART");
    }
}
