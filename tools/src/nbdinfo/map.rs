//! `nbdinfo --map [--totals] [CONTEXT]`: the extents of one meta
//! context over the whole export, as a list or as totals per type.
//!
//! ```text
//! $ nbdinfo --map nbd://localhost
//!          0     1048576    0  data
//!    1048576     1048576    3  hole,zero
//! $ nbdinfo --map --totals nbd://localhost
//!    1048576  50.0%   0 data
//!    1048576  50.0%   3 hole,zero
//! ```
//!
//! The fields are offset, length, type and a description of the type
//! for the contexts we know (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`). Consecutive
//! extents of the same type are merged. `--json` gives the same as a
//! JSON array, formatted like libnbd's nbdinfo.
//!
//! With `--offset`/`--length` only that range is asked for, and the
//! extents are clipped to it (the first starts at the offset, the last
//! ends at the range's end); totals are then shares of the range.
//!
//! Several contexts (`--map --map=qemu:allocation-depth`) are mapped
//! one after the other on one connection, each with a block status
//! request for that context alone when the server can filter
//! (`NBD_FLAG_BLOCK_STATUS_PAYLOAD`, with extended headers). The text
//! output is each map preceded by a line naming its context:
//!
//! ```text
//! $ nbdinfo --map --map=qemu:allocation-depth -- [ qemu-nbd -A -f qcow2 top.qcow2 ]
//! context: base:allocation
//!          0       65536    0  data
//!      65536      983040    3  hole,zero
//! context: qemu:allocation-depth
//!          0       65536    1  local
//!      65536      983040    0  absent
//! ```
//!
//! and `--json` gives one object with an array per context, in the order
//! asked: `{ "base:allocation": [ ... ], "qemu:allocation-depth": [ ... ] }`
//! (with `--totals`, the arrays of totals). With one context the output
//! is the same as libnbd's.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::{bail, Result};
use libnbd::client::Connection;

use super::fmt::{fmt_g, json_string};

/// One run of the map: `length` bytes of type `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Offset of the run.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// The context's flags for it.
    pub kind: u32,
}

/// Ask the server for the extents of `context` from 0 to the end of the
/// export, merging neighbours of the same type.
pub async fn collect(conn: &Connection, context: &str) -> Result<Vec<Run>> {
    collect_range(conn, context, 0, conn.size()).await
}

/// The same from `start` to `end`, the extents clipped to that range.
/// Only `context` is asked for when the server can filter.
pub async fn collect_range(
    conn: &Connection,
    context: &str,
    start: u64,
    end: u64,
) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut offset = start;
    while offset < end {
        let status = conn
            .block_status_filtered(end - offset, offset, 0, &[context])
            .await?;
        let extents = match status.get(context) {
            Some(e) if !e.is_empty() => e,
            _ => bail!("--map: server did not return any extents"),
        };
        for e in extents {
            if offset >= end {
                break;
            }
            let length = e.length.min(end - offset);
            match runs.last_mut() {
                Some(last) if last.kind == e.flags => last.length += length,
                _ => runs.push(Run {
                    offset,
                    length,
                    kind: e.flags,
                }),
            }
            offset += length;
        }
    }
    Ok(runs)
}

/// What a type means in a context, when we know.
pub fn description(context: &str, kind: u32) -> Option<String> {
    if context == "base:allocation" {
        return match kind {
            0 => Some("data".into()),
            1 => Some("hole".into()),
            2 => Some("zero".into()),
            3 => Some("hole,zero".into()),
            _ => None,
        };
    }
    if context.starts_with("qemu:dirty-bitmap:") {
        return match kind {
            0 => Some("clean".into()),
            1 => Some("dirty".into()),
            _ => None,
        };
    }
    if context == libnbd::protocol::CONTEXT_ALLOCATION_DEPTH {
        return Some(match kind {
            0 => "absent".into(),
            1 => "local".into(),
            n => format!("backing depth {n}"),
        });
    }
    None
}

/// Print the maps (or totals) of several contexts: see the module doc.
/// `size` is the length of the range mapped.
pub fn write_maps(
    w: &mut dyn Write,
    json: bool,
    totals: bool,
    maps: &[(&str, Vec<Run>)],
    size: u64,
) -> io::Result<()> {
    let one = |w: &mut dyn Write, context: &str, runs: &[Run]| {
        if totals {
            write_totals(w, json, context, runs, size)
        } else {
            write_map(w, json, context, runs)
        }
    };
    if let [(context, runs)] = maps {
        return one(w, context, runs);
    }
    if json {
        writeln!(w, "{{")?;
    }
    for (i, (context, runs)) in maps.iter().enumerate() {
        if json {
            let mut v = Vec::new();
            one(&mut v, context, runs)?;
            let text = String::from_utf8_lossy(&v);
            write!(
                w,
                "{}: {}{}",
                json_string(context),
                text.trim_end(),
                if i + 1 < maps.len() { ",\n" } else { "\n" }
            )?;
        } else {
            writeln!(w, "context: {context}")?;
            one(w, context, runs)?;
        }
    }
    if json {
        writeln!(w, "}}")?;
    }
    Ok(())
}

/// Print the runs, one per line or as a JSON array.
pub fn write_map(w: &mut dyn Write, json: bool, context: &str, runs: &[Run]) -> io::Result<()> {
    if json {
        writeln!(w, "[")?;
    }
    for (i, r) in runs.iter().enumerate() {
        let desc = description(context, r.kind);
        if json {
            write!(
                w,
                "{{ \"offset\": {}, \"length\": {}, \"type\": {}",
                r.offset, r.length, r.kind
            )?;
            if let Some(d) = &desc {
                write!(w, ", \"description\": {}", json_string(d))?;
            }
            write!(w, "}}")?;
            if i + 1 < runs.len() {
                writeln!(w, ",")?;
            }
        } else {
            write!(w, "{:10}  {:10}  {:3}", r.offset, r.length, r.kind)?;
            if let Some(d) = &desc {
                write!(w, "  {d}")?;
            }
            writeln!(w)?;
        }
    }
    if json {
        write!(w, "\n]\n")?;
    }
    Ok(())
}

/// Print the total size of each type, in increasing order of type, with
/// its share of the export size.
pub fn write_totals(
    w: &mut dyn Write,
    json: bool,
    context: &str,
    runs: &[Run],
    size: u64,
) -> io::Result<()> {
    let mut totals: BTreeMap<u32, u64> = BTreeMap::new();
    for r in runs {
        *totals.entry(r.kind).or_default() += r.length;
    }
    if json {
        write!(w, "[")?;
    }
    for (i, (&kind, &total)) in totals.iter().enumerate() {
        let percent = 100.0 * total as f64 / size as f64;
        let desc = description(context, kind);
        if json {
            write!(
                w,
                "{}{{ \"size\": {total}, \"percent\": {}, \"type\": {kind}",
                if i == 0 { "\n" } else { ",\n" },
                fmt_g(percent)
            )?;
            if let Some(d) = &desc {
                write!(w, ", \"description\": {}", json_string(d))?;
            }
            write!(w, " }}")?;
        } else {
            write!(w, "{total:10} {percent:5.1}% {kind:3}")?;
            if let Some(d) = &desc {
                write!(w, " {d}")?;
            }
            writeln!(w)?;
        }
    }
    if json {
        if !totals.is_empty() {
            writeln!(w)?;
        }
        writeln!(w, "]")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs() -> Vec<Run> {
        vec![
            Run {
                offset: 0,
                length: 8192,
                kind: 0,
            },
            Run {
                offset: 8192,
                length: 8192,
                kind: 1,
            },
            Run {
                offset: 16384,
                length: 1032192,
                kind: 0,
            },
        ]
    }

    fn text(f: impl Fn(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut v = Vec::new();
        f(&mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn map_formats() {
        let r = runs();
        assert_eq!(
            text(|w| write_map(w, false, "base:allocation", &r)),
            "         0        8192    0  data\n      8192        8192    1  hole\n     16384     1032192    0  data\n"
        );
        assert_eq!(
            text(|w| write_map(w, true, "base:allocation", &r[..2])),
            "[\n{ \"offset\": 0, \"length\": 8192, \"type\": 0, \"description\": \"data\"},\n\
             { \"offset\": 8192, \"length\": 8192, \"type\": 1, \"description\": \"hole\"}\n]\n"
        );
        assert_eq!(text(|w| write_map(w, true, "x", &[])), "[\n\n]\n");
        assert_eq!(
            text(|w| write_map(w, true, "x:y", &r[..1])),
            "[\n{ \"offset\": 0, \"length\": 8192, \"type\": 0}\n]\n"
        );
    }

    #[test]
    fn totals_formats() {
        let r = runs();
        assert_eq!(
            text(|w| write_totals(w, false, "base:allocation", &r, 1 << 20)),
            "   1040384  99.2%   0 data\n      8192   0.8%   1 hole\n"
        );
        assert_eq!(
            text(|w| write_totals(w, true, "qemu:dirty-bitmap:b", &r, 1 << 20)),
            "[\n{ \"size\": 1040384, \"percent\": 99.2188, \"type\": 0, \"description\": \"clean\" },\n\
             { \"size\": 8192, \"percent\": 0.78125, \"type\": 1, \"description\": \"dirty\" }\n]\n"
        );
        assert_eq!(text(|w| write_totals(w, true, "x", &[], 0)), "[]\n");
        assert_eq!(text(|w| write_totals(w, false, "x", &[], 0)), "");
    }

    #[test]
    fn several_maps() {
        let r = runs();
        let maps = [
            ("base:allocation", r[..1].to_vec()),
            ("x:y", r[1..2].to_vec()),
        ];
        assert_eq!(
            text(|w| write_maps(w, false, false, &maps, 1 << 20)),
            "context: base:allocation\n         0        8192    0  data\n\
             context: x:y\n      8192        8192    1\n"
        );
        assert_eq!(
            text(|w| write_maps(w, true, false, &maps, 1 << 20)),
            "{\n\"base:allocation\": [\n{ \"offset\": 0, \"length\": 8192, \"type\": 0, \
             \"description\": \"data\"}\n],\n\"x:y\": [\n{ \"offset\": 8192, \"length\": 8192, \
             \"type\": 1}\n]\n}\n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&text(|w| write_maps(w, true, true, &maps, 16384))).unwrap();
        assert_eq!(v["x:y"][0]["percent"], 50);
        // One context: exactly the single map.
        assert_eq!(
            text(|w| write_maps(w, true, false, &maps[..1], 1 << 20)),
            text(|w| write_map(w, true, "base:allocation", &r[..1]))
        );
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            description("base:allocation", 3).as_deref(),
            Some("hole,zero")
        );
        assert_eq!(description("base:allocation", 4), None);
        assert_eq!(
            description("qemu:allocation-depth", 2).as_deref(),
            Some("backing depth 2")
        );
        assert_eq!(
            description("qemu:dirty-bitmap:b", 1).as_deref(),
            Some("dirty")
        );
        assert_eq!(description("other", 0), None);
    }
}
