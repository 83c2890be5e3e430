//! # extentlist: serve extents from a list in a file
//!
//! Block status requests are answered from a static list of extents read
//! from a file at startup, instead of asking the layers below. It is for
//! plugins that cannot tell which parts of a disk are allocated (ssh,
//! curl) when the information can be had another way (`xfs_bmap` on the
//! remote side, say).
//!
//! ```text
//! nbdkit -r --filter=extentlist curl https://example.com/disk.img extentlist=disk.extents
//! ```
//!
//! ## Parameters
//!
//! - `extentlist=FILENAME` (required): the file with the extent list.
//!
//! ## File format
//!
//! One extent per line: `offset length [type]`, separated by spaces.
//! `offset` and `length` take nbdkit's size syntax (`1M`, `2048s`). The
//! optional `type` is a number (the `base:allocation` flags: 1 hole, 2
//! zero) or a comma-separated list of the words `hole` and `zero`;
//! missing, it is 0 (allocated data). For a 10M disk whose first
//! megabyte only is allocated:
//!
//! ```text
//! 0  1M
//! 1M 9M  hole,zero
//! ```
//!
//! The lines may come in any order but the extents must not overlap;
//! gaps between them (and the rest of the disk after the last) are holes
//! reading as zeroes, so the second line above may be left out. As
//! upstream, blank and comment lines are errors.
//!
//! ## Behaviour
//!
//! The list is never updated: a write into a "hole" is not reported as
//! data afterwards, so this filter is safe only on a read-only export
//! (`nbdkit -r`).

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::protocol::alloc;
use libnbd::{
    parse_size, Caps, ConfigError, ConfigResult, Extent, Extents, Filter, FilterEntry, Flags,
    Handle, Next, OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "extentlist",
    help: "extentlist=<FILENAME>    Read the extent list from FILENAME (required).",
    create,
};

/// The `type` field of a line: a decimal number (only its leading
/// digits count, as C's `%d`), or comma-separated words of which `hole`
/// and `zero` mean something.
fn parse_type(field: &str) -> u32 {
    if field.starts_with(|c: char| c.is_ascii_digit()) {
        let digits: String = field.chars().take_while(|c| c.is_ascii_digit()).collect();
        // The flags that mean something in base:allocation.
        return digits.parse::<u64>().map_or(0, |n| n as u32) & HOLE_ZERO;
    }
    field.split(',').fold(0, |t, w| match w {
        "hole" => t | alloc::HOLE,
        "zero" => t | alloc::ZERO,
        _ => t,
    })
}

/// Parse an extent list (`name` is for messages): sorted, checked not to
/// overlap, empty extents dropped.
fn parse_list(name: &str, text: &str) -> Result<Vec<Extent>, String> {
    let mut list = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(offset), Some(length)) = (fields.next(), fields.next()) else {
            return Err(format!("{name}: cannot parse {line}"));
        };
        let offset = parse_size(offset)?;
        let length = parse_size(length)?;
        let flags = fields.next().map_or(0, parse_type);
        if offset.checked_add(length).is_none() {
            return Err(format!("{name}: extent too large: {line}"));
        }
        if length > 0 {
            list.push(Extent {
                offset,
                length,
                flags,
            });
        }
    }
    list.sort_by_key(|e| e.offset);
    if list
        .windows(2)
        .any(|w| w[0].offset + w[0].length > w[1].offset)
    {
        return Err("extents in the extent list are overlapping".into());
    }
    Ok(list)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let Some(file) = p.take("extentlist") else {
        return Err(ConfigError::new(
            "you must supply the extentlist parameter on the command line",
        ));
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| ConfigError::new(format!("open: {file}: {e}")))?;
    let list = parse_list(&file, &text).map_err(ConfigError::new)?;
    Ok(Arc::new(ExtentList {
        list: Arc::new(list),
    }))
}

struct ExtentList {
    list: Arc<Vec<Extent>>,
}

#[async_trait]
impl Filter for ExtentList {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ExtentListHandle {
            next: next.open(ctx).await?,
            list: self.list.clone(),
        }))
    }
}

struct ExtentListHandle {
    next: Box<dyn Handle>,
    list: Arc<Vec<Extent>>,
}

/// Report `[offset, offset+count)` from a sorted, disjoint list, gaps as
/// holes.
fn report(list: &[Extent], count: u64, offset: u64, ext: &mut Extents) -> Result<()> {
    let end = offset + count;
    // The first extent that ends after offset.
    let first = list.partition_point(|e| e.offset + e.length <= offset);
    let mut at = offset;
    for e in &list[first..] {
        if at >= end {
            return Ok(());
        }
        if e.offset > at {
            ext.add(at, e.offset - at, HOLE_ZERO)?;
        }
        ext.add(
            e.offset.max(at),
            e.offset + e.length - e.offset.max(at),
            e.flags,
        )?;
        at = e.offset + e.length;
    }
    if at < end {
        ext.add(at, end - at, HOLE_ZERO)?;
    }
    Ok(())
}

#[async_trait]
impl Handle for ExtentListHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            extents: true,
            ..self.next.caps()?
        })
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        report(&self.list, count, offset, ext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn e(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn extentlist_parses_files() {
        let text = "2M 1M hole\n0 1M\n  4M   512 zero \n5M 1k hole,zero\n6M 1k 3\n\
                    7M 1k 5\n8M 1k 0x3\n9M 1k zero,bogus\n10M 1k ,hole,\n11M 0\n12M 1k 1 extra\n";
        assert_eq!(
            parse_list("f", text),
            Ok(vec![
                e(0, 1 << 20, 0),
                e(2 << 20, 1 << 20, 1),
                e(4 << 20, 512, 2),
                e(5 << 20, 1024, 3),
                e(6 << 20, 1024, 3),
                e(7 << 20, 1024, 1),
                e(8 << 20, 1024, 0),
                e(9 << 20, 1024, 2),
                e(10 << 20, 1024, 1),
                e(12 << 20, 1024, 1),
            ])
        );
        assert_eq!(parse_list("f", ""), Ok(vec![]));
        for (bad, msg) in [
            ("0 1M\n512K 1M\n", "overlapping"),
            ("0\n", "f: cannot parse 0"),
            ("0 1M\n\n1M 1M\n", "cannot parse"),
            ("# comment\n", "could not parse size"),
            ("x 1M\n", "could not parse size"),
            ("0x100 0x100\n", "could not parse size"),
            ("8E 8E\n", "exceeds maximum"),
        ] {
            let err = parse_list("f", bad).unwrap_err();
            assert!(err.contains(msg), "{bad:?}: {err}");
        }
    }

    #[tokio::test]
    async fn extentlist_reports_the_list_with_holes_between() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("list");
        std::fs::write(&file, "1024 512\n3072 512 zero\n").unwrap();
        let word = format!("extentlist={}", file.display());
        let mem = Mem::with(vec![1; 8192]);
        let s = stack(vec![create(&mut params(&[&word])).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert!(h.caps().unwrap().extents);
        assert_eq!(
            extents(&*h, 0, 8192).await,
            vec![
                (0, 1024, HOLE_ZERO),
                (1024, 512, 0),
                (1536, 1536, HOLE_ZERO),
                (3072, 512, 2),
                (3584, 4608, HOLE_ZERO)
            ]
        );
        assert_eq!(
            extents(&*h, 1200, 2000).await,
            vec![(1200, 336, 0), (1536, 1536, HOLE_ZERO), (3072, 128, 2)]
        );
        assert_eq!(extents(&*h, 4000, 10).await, vec![(4000, 10, 3)]);
        assert!(
            mem.take_calls().is_empty(),
            "the layers below are not asked"
        );
        assert!(create(&mut params(&[])).is_err());
        assert!(create(&mut params(&["extentlist=/nonexistent/x"])).is_err());
    }
}
