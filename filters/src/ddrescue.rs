//! # ddrescue: fail reads of the blocks a GNU ddrescue mapfile calls bad
//!
//! Serves an image recovered with GNU ddrescue(1) so that reading any
//! part that ddrescue did not rescue fails with EIO, instead of returning
//! the zeroes that stand in for it in the image. Run fsck or a file
//! recovery tool over it to see what the bad blocks hit.
//!
//! ```text
//! nbdkit --filter=ddrescue file disk.img ddrescue-mapfile=disk.map
//! ```
//!
//! ## Parameters
//!
//! - `ddrescue-mapfile=FILE` (required): the mapfile ddrescue wrote.
//!
//! ## Mapfile format
//!
//! As GNU ddrescue writes it: lines starting with `#` are comments; the
//! first other line is the status line (`current_pos current_status
//! [current_pass]`) and is skipped; each line after it is a block, `pos
//! size status`, with `pos` and `size` in decimal, octal (`0NN`) or hex
//! (`0xNN`) and `status` one of `?` (non-tried), `*` (non-trimmed), `/`
//! (non-scraped), `-` (bad sector) or `+` (finished). Only `+` blocks
//! are readable; a line that does not parse is an error.
//!
//! ## Behaviour
//!
//! The export is read-only. A read succeeds if every byte of it lies in
//! some `+` block (upstream also fails a read that spans two adjacent
//! `+` blocks; ddrescue itself never writes those); bytes the mapfile
//! does not mention are unreadable too.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "ddrescue",
    help: "ddrescue-mapfile=...     Specify ddrescue mapfile to use",
    create,
};

/// A number as C's `strtoull` with base 0 reads it.
fn parse_number(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// Parse a mapfile into the readable (`+`) ranges `(start, end)`, sorted
/// and merged.
fn parse_mapfile(text: &str) -> Result<Vec<(u64, u64)>, String> {
    let mut good = Vec::new();
    let mut seen_status = false;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !seen_status {
            seen_status = true;
            continue;
        }
        let bad = || format!("line {}: cannot parse mapfile block '{line}'", n + 1);
        let f: Vec<&str> = t.split_whitespace().collect();
        let [pos, size, status] = f[..] else {
            return Err(bad());
        };
        let (Some(pos), Some(size)) = (parse_number(pos), parse_number(size)) else {
            return Err(bad());
        };
        match status {
            "+" => {
                let end = pos.checked_add(size).ok_or_else(bad)?;
                good.push((pos, end));
            }
            "?" | "*" | "/" | "-" => {}
            _ => return Err(bad()),
        }
    }
    good.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in good {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ if s < e => merged.push((s, e)),
            _ => {}
        }
    }
    Ok(merged)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let Some(file) = p.take("ddrescue-mapfile") else {
        return Err(ConfigError::new(
            "you must supply the ddrescue-mapfile parameter",
        ));
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| ConfigError::new(format!("{file}: ddrescue: {e}")))?;
    let good = parse_mapfile(&text).map_err(|e| ConfigError::new(format!("{file}: {e}")))?;
    Ok(Arc::new(DdRescue {
        good: Arc::new(good),
    }))
}

struct DdRescue {
    good: Arc<Vec<(u64, u64)>>,
}

#[async_trait]
impl Filter for DdRescue {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let below = OpenContext {
            readonly: true,
            ..ctx.clone()
        };
        Ok(Box::new(DdRescueHandle {
            next: next.open(&below).await?,
            good: self.good.clone(),
        }))
    }
}

struct DdRescueHandle {
    next: Box<dyn Handle>,
    good: Arc<Vec<(u64, u64)>>,
}

#[async_trait]
impl Handle for DdRescueHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: false,
            trim: false,
            zero: false,
            fast_zero: false,
            cache: Cache::None,
            ..self.next.caps()?
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let end = offset + buf.len() as u64;
        // The merged readable range holding offset must hold it all.
        let i = self.good.partition_point(|r| r.1 <= offset);
        match self.good.get(i) {
            Some(&(s, e)) if s <= offset && end <= e => self.next.pread(buf, offset, flags).await,
            _ => Err(Error::eio(format!(
                "ddrescue: read of {} bytes at offset {offset} touches blocks not rescued",
                buf.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::protocol::errno;

    const MAP: &str = "\
# Mapfile. Created by GNU ddrescue version 1.25
# current_pos  current_status  current_pass
0x00100000     +               1
#      pos        size  status
0x00000000  0x00001000  +
0x00001000  0x00000200  -
0x00001200  0x00000e00  +
0x00002000  0x00001000  ?
0x00003000  0x00001000  *
0x00004000  0x00001000  /
0x00005000  0x000FB000  +
";

    #[test]
    fn ddrescue_parses_mapfiles() {
        assert_eq!(
            parse_mapfile(MAP),
            Ok(vec![(0, 0x1000), (0x1200, 0x2000), (0x5000, 0x100000)])
        );
        // The first line is the status line; decimal and octal; adjacent
        // and overlapping + blocks merge.
        assert_eq!(
            parse_mapfile("0x0 +\n0 4096 +\n4096 010 +\n  0x800  0x1000  +  \n"),
            Ok(vec![(0, 0x1800)])
        );
        assert_eq!(parse_mapfile("0x0 0x1000 +\n"), Ok(vec![]));
        assert_eq!(parse_mapfile(""), Ok(vec![]));
        for bad in [
            "0x0 +\nfoo\n",
            "0x0 +\n0x0 1k +\n",
            "0x0 +\n0x0 0x1000 x\n",
            "0x0 +\n0x0 0x1000 + extra\n",
            "0x0 +\n0x0 0x1000\n",
            "0x0 +\n0xffffffffffffffff 2 +\n",
            "0x0 +\n09 1 +\n",
        ] {
            let e = parse_mapfile(bad).unwrap_err();
            assert!(e.contains("line 2"), "{bad:?}: {e}");
        }
    }

    #[tokio::test]
    async fn ddrescue_fails_reads_of_bad_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("map");
        std::fs::write(&file, MAP).unwrap();
        let word = format!("ddrescue-mapfile={}", file.display());
        let mem = Mem::new(2 << 20);
        let s = stack(vec![create(&mut params(&[&word])).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert!(!h.caps().unwrap().write);
        assert_eq!(
            *mem.opened_readonly
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![true]
        );
        for (offset, len, ok) in [
            (0, 4096, true),
            (0x1000, 512, false),
            (0x1200, 512, true),
            (0, 8192, false),
            (0x2000, 512, false),
            (0x3000, 512, false),
            (0x4000, 512, false),
            (0x5000, 512, true),
            (0x1ff, 2, true),
            (0x11ff, 2, false),
            (0xffe00, 512, true),
            (0xffe00, 1024, false),
            (0x100000, 512, false),
        ] {
            let r = try_read(&*h, offset, len).await;
            assert_eq!(r.is_ok(), ok, "{offset:#x}+{len}");
            if let Err(e) = r {
                assert_eq!(e.errno, errno::EIO);
            }
        }
        assert!(create(&mut params(&[])).is_err());
        assert!(create(&mut params(&["ddrescue-mapfile=/nonexistent"])).is_err());
    }
}
