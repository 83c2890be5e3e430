//! The plugins of our nbdkit, each a reimplementation of the nbdkit 1.32
//! plugin of the same name:
//!
//! | name            | module                | what it serves                          |
//! |-----------------|-----------------------|-----------------------------------------|
//! | `memory`        | [`memory`]            | a RAM disk (sparse or flat)             |
//! | `file`          | [`file`](mod@file)    | a file or block device, or a directory  |
//! | `null`          | [`null`]              | a bit bucket reading as zeroes          |
//! | `zero`          | [`zero`]              | a zero-length disk                      |
//! | `full`          | [`full`]              | a disk whose writes fail with `ENOSPC`  |
//! | `pattern`       | [`pattern`]           | each word holds its own offset          |
//! | `data`          | [`data`]              | data written on the command line        |
//! | `sparse-random` | [`sparse_random`]     | sparse runs of random data              |
//! | `random`        | [`random`]            | random data, the same for a seed        |
//! | `info`          | [`info`]              | the export name, address or time        |
//! | `curl`          | [`curl`]              | an image on an HTTP(S) server           |
//! | `S3`            | [`s3`]                | an object, or chunk objects, in S3      |
//! | `azure`         | [`azure`]             | a blob, or chunk blobs, in Azure Blob   |
//! | `sh`            | [`sh`]                | a shell script (or any executable)      |
//! | `eval`          | [`eval`]              | shell snippets on the command line      |
//! | `split`         | [`split`]             | several files concatenated into one     |
//! | `nbd`           | [`nbd`]               | another NBD server, proxied             |
//! | `tmpdisk`       | [`tmpdisk`]           | a fresh temporary filesystem per client |
//! | `partitioning`  | [`partitioning`]      | a partitioned disk made of files        |
//! | `iso`           | [`iso`]               | an ISO 9660 image made from directories |
//! | `linuxdisk`     | [`linuxdisk`]         | an ext2/3/4 disk made from a directory  |
//! | `ondemand`      | [`ondemand`]          | a kept filesystem per export name       |
//! | `floppy`        | [`floppy`]            | a FAT32 disk made from a directory      |
//!
//! [`registry`] lists them for the server; [`sparse`] is the in-memory
//! store shared by `memory` and `data`, [`script`] the engine shared by
//! `sh` and `eval`, [`ptable`] the partition tables of `partitioning`,
//! `linuxdisk` and `floppy`, [`tempdisk`] the temporary images and
//! commands of the plugins that run mkfs or an ISO maker, [`objstore`]
//! the object-store disks of `S3` and `azure`. (`azure` is ours alone:
//! upstream has no Azure plugin.)
#![warn(missing_docs)]

pub mod azure;
pub mod curl;
pub mod data;
pub mod eval;
pub mod file;
pub mod floppy;
pub mod full;
pub mod info;
pub mod iso;
pub mod linuxdisk;
pub mod memory;
pub mod nbd;
pub mod null;
pub mod objstore;
pub mod ondemand;
pub mod partitioning;
pub mod pattern;
pub mod ptable;
pub mod random;
pub mod s3;
pub mod script;
pub mod sh;
pub mod slab;
pub mod sparse;
pub mod sparse_random;
pub mod split;
pub mod tempdisk;
pub mod tmpdisk;
pub mod zero;

use libnbd::PluginEntry;

/// Every plugin, by the name used on the nbdkit command line.
pub fn registry() -> Vec<PluginEntry> {
    vec![
        memory::ENTRY,
        file::ENTRY,
        null::ENTRY,
        zero::ENTRY,
        full::ENTRY,
        pattern::ENTRY,
        data::ENTRY,
        sparse_random::ENTRY,
        random::ENTRY,
        info::ENTRY,
        curl::ENTRY,
        s3::ENTRY,
        azure::ENTRY,
        sh::ENTRY,
        eval::ENTRY,
        split::ENTRY,
        tmpdisk::ENTRY,
        nbd::ENTRY,
        partitioning::ENTRY,
        iso::ENTRY,
        linuxdisk::ENTRY,
        ondemand::ENTRY,
        floppy::ENTRY,
    ]
}

/// The `--dump-plugin` lines of a plugin that come without configuring
/// it (upstream prints them for `nbdkit --dump-plugin NAME` alone).
pub fn dump_unconfigured(name: &str) -> Vec<(String, String)> {
    match name {
        "curl" => curl::dump_lines(),
        "nbd" => nbd::dump_lines(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::Params;

    #[test]
    fn registry_names_and_magic() {
        let r = registry();
        let find = |name: &str| {
            r.iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name} is not in the registry"))
        };
        for (name, magic) in [
            ("memory", Some("size")),
            ("file", Some("file")),
            ("null", Some("size")),
            ("zero", None),
            ("full", Some("size")),
            ("pattern", Some("size")),
            ("data", Some("data")),
            ("sparse-random", Some("size")),
            ("sh", Some("script")),
            ("eval", None),
            ("random", Some("size")),
            ("info", Some("mode")),
            ("nbd", Some("uri")),
            ("partitioning", Some("file")),
            ("iso", Some("dir")),
            ("linuxdisk", Some("dir")),
            ("tmpdisk", Some("size")),
            ("ondemand", Some("size")),
            ("floppy", Some("dir")),
            ("azure", None),
        ] {
            let e = find(name);
            assert_eq!(e.magic, magic, "{name}");
            // Unknown parameters are rejected (data takes any key as a
            // variable for `$VAR`, and sh and eval pass them to their
            // scripts, so they are exempt).
            if !matches!(name, "data" | "sh" | "eval") {
                let mut p = Params::new(vec![("no-such-key".into(), "1".into())]);
                assert!(e.configure(&mut p).is_err(), "{name}");
            }
        }
        let mut names: Vec<_> = r.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), r.len(), "duplicate plugin names");
    }

    #[test]
    fn every_plugin_has_its_manual() {
        let mut wrong = Vec::new();
        for e in registry() {
            let path = format!(
                "{}/src/{}.rs",
                env!("CARGO_MANIFEST_DIR"),
                e.name.to_lowercase().replace('-', "_")
            );
            let source = std::fs::read_to_string(&path).unwrap();
            wrong.extend(libnbd::config::check_manual(e.name, &source, e.help).err());
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
