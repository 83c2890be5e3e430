//! # tar: serve one file inside an uncompressed tar file
//!
//! The layer below holds a tar archive; clients see the one file in it
//! named by `tar-entry`, read and written in place (writes change the
//! archive; the entry cannot be resized). Use `-r` to leave the archive
//! untouched. Compressed archives need the gzip or xz filter below this
//! one.
//!
//! ```text
//! nbdkit file disk.tar --filter=tar tar-entry=some/disk.img
//! nbdkit -r file rhel.ova --filter=tar tar-entry=rhel-disk1.vmdk
//! nbdkit file disk.tar.gz --filter=tar tar-entry=disk.img --filter=gzip
//! ```
//!
//! ## Parameters
//!
//! - `tar-entry=PATH`: the name of the file inside the archive, exactly
//!   as `tar tf` lists it (required, once). As with GNU tar, a directory
//!   name also matches the first member under it.
//! - `tar=PROGRAM`: accepted for compatibility and ignored: upstream runs
//!   GNU tar (`tar -t --block-number -v`) to find the entry; we read the
//!   headers through the layer below ourselves.
//! - `tar-limit=SIZE` (beyond upstream): read at most this many bytes of
//!   the archive while looking for the entry (default: all of it), so that
//!   a wrong name on a large remote archive fails fast.
//!
//! ## Behaviour
//!
//! The entry is looked up when the first connection to an export opens
//! (later connections reuse the answer): headers are read one by one from
//! the start of the archive, skipping each member's data, until a member
//! of that name, the end-of-archive block or the end of the file. The
//! formats GNU tar writes are understood: v7, ustar (with its name
//! prefix), GNU (`././@LongLink` long names, base-256 sizes) and pax
//! (`path` and `size` records). The first member of that name is served,
//! from just after its last header, for its size; reads, writes, zeroes,
//! trims, cache requests and extents are shifted there, as by the offset
//! filter. The export description is `embedded ENTRY from within tar
//! file: ...` when the layer below has one.
//!
//! A missing entry, a header with a bad checksum, a member running past
//! the end of the archive or a GNU sparse member fail the connection with
//! a message saying so. Upstream serves the wrong bytes for a member
//! with a GNU long name (GNU tar's block number is that of the long-name
//! header: the gnu format, `tar cf`'s default, with a name over 100
//! bytes) and crashes on a GNU sparse member; we serve the long-named
//! member's own bytes, and refuse sparse ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Error, Filter, FilterEntry, Handle, Next, OpenContext, Params,
    Result,
};

use crate::window::Window;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "tar",
    help: "\
tar-entry=<FILENAME> (required) The path inside the tar file to serve.
tar=<PROGRAM>        (ignored) GNU tar, which upstream runs to find the entry.
tar-limit=<SIZE>     (optional) Read at most SIZE bytes looking for the entry.",
    create,
};

const BLOCK: u64 = 512;
/// The largest GNU long name or pax header we read.
const MAX_META: u64 = 1 << 20;

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mut entries = p.take_all("tar-entry");
    if entries.len() > 1 {
        return Err(ConfigError::new(
            "only one tar-entry parameter can be given",
        ));
    }
    let entry = entries
        .pop()
        .ok_or_else(|| ConfigError::new("you must supply the tar-entry=<FILENAME> parameter"))?;
    if entry.is_empty() {
        return Err(ConfigError::new("tar-entry must not be empty"));
    }
    let _ = p.take_all("tar");
    let limit = p.take_size("tar-limit")?;
    Ok(Arc::new(TarFilter {
        entry,
        limit,
        found: Mutex::new(HashMap::new()),
    }))
}

struct TarFilter {
    entry: String,
    limit: Option<u64>,
    /// Where the entry is, per export: (offset, size).
    found: Mutex<HashMap<String, (u64, u64)>>,
}

#[async_trait]
impl Filter for TarFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h = next.open(ctx).await?;
        let size = h.size()?;
        let known = self
            .found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ctx.export_name)
            .copied();
        let (offset, len) = match known {
            Some(f) => f,
            None => {
                let limit = self.limit.unwrap_or(u64::MAX).min(size);
                let f = find_entry(&*h, size, limit, &self.entry)
                    .await
                    .inspect_err(|e| libnbd::elog!("nbdkit: tar[{}]: error: {}", ctx.id, e.msg))?;
                self.found
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(ctx.export_name.clone(), f);
                f
            }
        };
        let description = h
            .export_description()
            .map(|base| format!("embedded {} from within tar file: {base}", self.entry));
        Ok(Box::new(TarHandle {
            window: Window::new(h, offset, len),
            description,
        }))
    }
}

/// The entry's window, with its own export description.
struct TarHandle {
    window: Window,
    description: Option<String>,
}

#[async_trait]
impl Handle for TarHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&self.window)
    }
    fn export_description(&self) -> Option<String> {
        self.description.clone()
    }
}

/// A numeric header field: octal (NUL- or space-terminated) or GNU's
/// base-256 (high bit of the first byte set).
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s: &[u8] = {
        let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
        let rest = &field[start..];
        let end = rest
            .iter()
            .position(|&b| b == 0 || b == b' ')
            .unwrap_or(rest.len());
        &rest[..end]
    };
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for &b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

/// A NUL-terminated string field.
fn string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Does the header's checksum match (unsigned, or signed as some old
/// tars computed it)?
fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(want) = number(&h[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u64;
        signed += b as i8 as i64;
    }
    want == unsigned || want as i64 == signed
}

/// The pax records `path` and `size` of an extended header.
fn pax_records(data: &[u8], path: &mut Option<String>, size: &mut Option<u64>) -> Result<()> {
    let bad = || Error::eio("tar: malformed pax extended header");
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= rest.len())
            .ok_or_else(bad)?;
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").ok_or_else(bad)?;
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => *path = Some(String::from_utf8_lossy(value).into_owned()),
            b"size" => {
                *size = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(bad)?,
                )
            }
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(())
}

/// Does a member name match `tar-entry` as GNU tar matches the names it
/// is given: the name itself, or a directory above it.
fn matches(name: &str, entry: &str) -> bool {
    let name = name.trim_end_matches('/');
    let entry = entry.trim_end_matches('/');
    if entry.is_empty() {
        return name.is_empty();
    }
    name == entry
        || name
            .strip_prefix(entry)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|n| n / BLOCK * BLOCK)
}

/// Read a member's data (a long name, a pax header).
async fn read_meta(next: &dyn Handle, at: u64, len: u64, archive: u64) -> Result<Vec<u8>> {
    if len > MAX_META {
        return Err(Error::eio(format!(
            "tar: extended header at offset {} is too large ({len} bytes)",
            at - BLOCK
        )));
    }
    if at + len > archive {
        return Err(Error::eio("tar: unexpected end of the tar file"));
    }
    let mut buf = vec![0u8; len as usize];
    next.pread(&mut buf, at, libnbd::Flags::NONE).await?;
    Ok(buf)
}

/// Find `entry` in the archive of `size` bytes below, reading no further
/// than `limit`: its data's offset and its size.
async fn find_entry(next: &dyn Handle, size: u64, limit: u64, entry: &str) -> Result<(u64, u64)> {
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let not_found = |why: &str| {
        Error::eio(format!(
            "tar: {entry}: not found in the tar file{why}: check that the file really exists in the tarball (tar tf)"
        ))
    };
    loop {
        if pos.checked_add(BLOCK).is_none_or(|end| end > limit) {
            if limit < size {
                return Err(not_found(&format!(
                    " (tar-limit: only the first {limit} bytes were read)"
                )));
            }
            return Err(not_found(""));
        }
        let mut h = [0u8; 512];
        next.pread(&mut h, pos, libnbd::Flags::NONE).await?;
        if h.iter().all(|&b| b == 0) {
            return Err(not_found(""));
        }
        if !checksum_ok(&h) {
            return Err(Error::eio(if pos == 0 {
                "tar: this does not look like a tar archive (bad header checksum at offset 0)"
                    .to_string()
            } else {
                format!("tar: bad header checksum at offset {pos}")
            }));
        }
        let field_size = number(&h[124..136])
            .ok_or_else(|| Error::eio(format!("tar: bad size in the header at offset {pos}")))?;
        let data = pos + BLOCK;
        let kind = h[156];
        match kind {
            b'L' | b'K' | b'x' | b'g' => {
                if kind != b'K' {
                    let meta = read_meta(next, data, field_size, size).await?;
                    match kind {
                        b'L' => long_name = Some(string(&meta)),
                        b'x' => pax_records(&meta, &mut pax_path, &mut pax_size)?,
                        _ => {}
                    }
                }
                pos = round_up(field_size)
                    .and_then(|n| data.checked_add(n))
                    .ok_or_else(|| Error::eio("tar: bad header size"))?;
                continue;
            }
            _ => {}
        }
        let name = match (pax_path.take(), long_name.take()) {
            (Some(p), _) => p,
            (None, Some(l)) => l,
            (None, None) => {
                let name = string(&h[0..100]);
                let prefix = string(&h[345..500]);
                // POSIX ustar has a name prefix; GNU's "ustar  " keeps
                // other fields there.
                if &h[257..263] == b"ustar\0" && !prefix.is_empty() {
                    format!("{prefix}/{name}")
                } else {
                    name
                }
            }
        };
        let len = pax_size.take().unwrap_or(field_size);
        let end = data
            .checked_add(len)
            .ok_or_else(|| Error::eio("tar: bad header size"))?;
        if matches(&name, entry) {
            if kind == b'S' {
                return Err(Error::eio(format!(
                    "tar: {name} is a GNU sparse file, which this filter cannot serve"
                )));
            }
            if end > size {
                return Err(Error::eio(format!(
                    "tar: {name} runs past the end of the tar file (truncated archive?)"
                )));
            }
            return Ok((data, len));
        }
        pos = round_up(len)
            .and_then(|n| data.checked_add(n))
            .ok_or_else(|| Error::eio("tar: bad header size"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::Flags;

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        let mut p = params(words);
        let f = create(&mut p).unwrap();
        assert!(p.items().is_empty(), "left: {:?}", p.items());
        f
    }

    /// A header block: ustar (POSIX magic) or GNU (`gnu`).
    fn header(name: &str, size: u64, kind: u8, gnu: bool) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        let n = name.as_bytes();
        h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        if gnu {
            h[257..265].copy_from_slice(b"ustar  \0");
        } else {
            h[257..265].copy_from_slice(b"ustar\x0000");
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn member(out: &mut Vec<u8>, hdr: Vec<u8>, data: &[u8]) {
        out.extend(hdr);
        out.extend(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn pax(records: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in records {
            let body = format!(" {k}={v}\n");
            let mut len = body.len() + 1;
            while format!("{len}{body}").len() != len {
                len += 1;
            }
            out.extend(format!("{len}{body}").as_bytes());
        }
        out
    }

    /// An archive: a directory, a ustar member, a GNU long-named member,
    /// a pax member, then the end blocks. Returns it and the long name.
    fn archive() -> (Vec<u8>, String) {
        let long = format!("{}/{}.img", "d".repeat(120), "e".repeat(40));
        let mut a = Vec::new();
        member(&mut a, header("dir/", 0, b'5', true), &[]);
        member(
            &mut a,
            header("dir/a.bin", 1000, b'0', false),
            &[0xaa; 1000],
        );
        let mut name = long.as_bytes().to_vec();
        name.push(0);
        member(
            &mut a,
            header("././@LongLink", name.len() as u64, b'L', true),
            &name,
        );
        member(&mut a, header(&long[..100], 700, b'0', true), &[0xbb; 700]);
        let records = pax(&[("path", "pax/real name.img"), ("size", "600")]);
        member(
            &mut a,
            header("PaxHeaders/x", records.len() as u64, b'x', false),
            &records,
        );
        member(
            &mut a,
            header("pax/truncated", 0, b'0', false),
            &[0xcc; 600],
        );
        a.extend([0u8; 1024]);
        (a, long)
    }

    async fn open(words: &[&str], mem: &Arc<Mem>) -> Result<Box<dyn Handle>> {
        stack(vec![filter(words)], mem).open(&ctx(1)).await
    }

    #[tokio::test]
    async fn tar_finds_ustar_gnu_long_and_pax_members() {
        let (a, long) = archive();
        let mem = Mem::with(a);
        for (entry, len, byte) in [
            ("dir/a.bin", 1000, 0xaa),
            (long.as_str(), 700, 0xbb),
            ("pax/real name.img", 600, 0xcc),
        ] {
            let h = open(&[&format!("tar-entry={entry}")], &mem).await.unwrap();
            assert_eq!(h.size().unwrap(), len, "{entry}");
            assert_eq!(
                try_read(&*h, 0, len as usize).await.unwrap(),
                vec![byte; len as usize]
            );
            assert!(h.pread(&mut [0; 2], len - 1, Flags::NONE).await.is_err());
        }
        // A directory matches itself (size 0), as GNU tar lists it.
        let h = open(&["tar-entry=dir"], &mem).await.unwrap();
        assert_eq!(h.size().unwrap(), 0);
    }

    #[tokio::test]
    async fn tar_writes_in_place() {
        let (a, _) = archive();
        let mem = Mem::with(a);
        let h = open(&["tar-entry=dir/a.bin"], &mem).await.unwrap();
        h.pwrite(&[1, 2, 3], 997, Flags::NONE).await.unwrap();
        let data = mem.snapshot();
        // The member's data starts after the directory and its header.
        assert_eq!(&data[1024 + 997..1024 + 1000], &[1, 2, 3]);
        assert!(h.pwrite(&[1, 2, 3, 4], 997, Flags::NONE).await.is_err());
    }

    #[tokio::test]
    async fn tar_errors() {
        let (a, _) = archive();
        let mem = Mem::with(a.clone());
        let e = open(&["tar-entry=nope"], &mem).await.err().unwrap();
        assert!(e.msg.contains("not found"), "{}", e.msg);
        let e = open(&["tar-entry=pax/real name.img", "tar-limit=2048"], &mem)
            .await
            .err()
            .unwrap();
        assert!(e.msg.contains("tar-limit"), "{}", e.msg);
        // Not a tar file.
        let e = open(&["tar-entry=x"], &Mem::with(vec![7; 4096]))
            .await
            .err()
            .unwrap();
        assert!(e.msg.contains("does not look like a tar"), "{}", e.msg);
        // Truncated in the middle of the member.
        let e = open(&["tar-entry=dir/a.bin"], &Mem::with(a[..1536].to_vec()))
            .await
            .err()
            .unwrap();
        assert!(e.msg.contains("past the end"), "{}", e.msg);
        // Empty file: nothing found.
        let e = open(&["tar-entry=x"], &Mem::new(0)).await.err().unwrap();
        assert!(e.msg.contains("not found"), "{}", e.msg);
    }

    #[test]
    fn tar_parameters() {
        assert!(create(&mut params(&[])).is_err());
        assert!(create(&mut params(&["tar-entry=a", "tar-entry=b"])).is_err());
        assert!(create(&mut params(&["tar-entry=a", "tar-limit=x"])).is_err());
        filter(&["tar-entry=a", "tar=gtar", "tar-limit=1M"]);
    }

    #[test]
    fn tar_numbers_and_names() {
        assert_eq!(number(b"0000644\0"), Some(0o644));
        assert_eq!(number(b"  1750 \0"), Some(1000));
        assert_eq!(number(b"\0\0\0"), Some(0));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]), Some(512));
        assert_eq!(number(b"0009"), None);
        assert!(matches("a/b", "a"));
        assert!(matches("a/", "a"));
        assert!(matches("a", "a/"));
        assert!(!matches("ab", "a"));
        assert!(!matches("a", "a/b"));
    }
}
