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
//!
//! [`registry`] lists them for the server; [`sparse`] is the in-memory
//! store shared by `memory` and `data`.
#![warn(missing_docs)]

pub mod curl;
pub mod data;
pub mod file;
pub mod full;
pub mod memory;
pub mod null;
pub mod pattern;
pub mod slab;
pub mod sparse;
pub mod sparse_random;
pub mod zero;

use libnbd::PluginEntry;

/// Every plugin, by the name used on the nbdkit command line.
pub fn registry() -> Vec<PluginEntry> {
    vec![
        memory::entry(),
        file::entry(),
        null::entry(),
        zero::entry(),
        full::entry(),
        pattern::entry(),
        data::entry(),
        sparse_random::entry(),
        curl::entry(),
    ]
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
        ] {
            let e = find(name);
            assert_eq!(e.magic, magic, "{name}");
            // Unknown parameters are rejected (data takes any key as a
            // variable for `$VAR`, so it is exempt).
            if name != "data" {
                let mut p = Params::new(vec![("no-such-key".into(), "1".into())]);
                assert!((e.create)(&mut p).is_err(), "{name}");
            }
        }
        let mut names: Vec<_> = r.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), r.len(), "duplicate plugin names");
    }
}
