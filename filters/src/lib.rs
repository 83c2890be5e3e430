//! The filters of our nbdkit, one module per filter (named as in
//! `--filter=NAME`), found by name in [`registry`].
#![warn(missing_docs)]

use libnbd::FilterEntry;

mod blocks;
pub mod blocksize;
pub mod blocksize_policy;
pub mod cache;
pub mod cacheextents;
pub mod checkwrite;
pub mod cow;
pub mod ddrescue;
pub mod delay;
pub mod error;
pub mod exitlast;
pub mod exitwhen;
pub mod exportname;
pub mod extentlist;
pub mod fua;
pub mod gzip;
pub mod ip;
pub mod limit;
pub mod log;
pub mod luks;
pub mod multi_conn;
pub mod nocache;
pub mod noextents;
pub mod nofilter;
pub mod noparallel;
pub mod nozero;
pub mod offset;
pub mod partition;
pub mod pause;
pub mod protect;
pub mod qcow2;
pub mod qcow2dec;
pub mod rate;
pub mod readahead;
pub mod readonly;
pub mod retry;
pub mod retry_request;
pub mod scan;
pub mod stats;
pub mod swab;
pub mod tar;
#[cfg(test)]
mod testkit;
pub mod tls_fallback;
pub mod truncate;
mod window;
pub mod xz;

/// Every filter, by its `--filter=NAME`.
pub fn registry() -> Vec<FilterEntry> {
    vec![
        rate::ENTRY,
        readahead::ENTRY,
        cow::ENTRY,
        cache::ENTRY,
        delay::ENTRY,
        stats::ENTRY,
        blocksize::ENTRY,
        offset::ENTRY,
        partition::ENTRY,
        truncate::ENTRY,
        log::ENTRY,
        error::ENTRY,
        retry::ENTRY,
        ip::ENTRY,
        limit::ENTRY,
        nozero::ENTRY,
        noextents::ENTRY,
        fua::ENTRY,
        exitlast::ENTRY,
        exitwhen::ENTRY,
        xz::ENTRY,
        noparallel::ENTRY,
        readonly::ENTRY,
        protect::ENTRY,
        cacheextents::ENTRY,
        exportname::ENTRY,
        checkwrite::ENTRY,
        swab::ENTRY,
        nocache::ENTRY,
        nofilter::ENTRY,
        ddrescue::ENTRY,
        extentlist::ENTRY,
        retry_request::ENTRY,
        blocksize_policy::ENTRY,
        multi_conn::ENTRY,
        scan::ENTRY,
        pause::ENTRY,
        tls_fallback::ENTRY,
        tar::ENTRY,
        gzip::ENTRY,
        luks::ENTRY,
        qcow2::ENTRY,
        qcow2dec::ENTRY,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_has_its_manual() {
        let mut wrong = Vec::new();
        for e in registry() {
            let path = format!(
                "{}/src/{}.rs",
                env!("CARGO_MANIFEST_DIR"),
                e.name.replace('-', "_")
            );
            let source = std::fs::read_to_string(&path).unwrap();
            wrong.extend(libnbd::config::check_manual(e.name, &source, e.help).err());
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
