//! # protect: write-protect ranges of the export
//!
//! Clients may read everything and write anywhere outside the protected
//! ranges; a write, zero or trim that would change a protected byte fails
//! with EPERM (one that leaves the bytes as they are succeeds). One use is
//! stopping a client from turning a raw disk into something that looks
//! like another format (a phony qcow2 header) by protecting its start.
//!
//! ```text
//! nbdkit --filter=protect file disk.img protect=0-0x1bd
//! nbdkit --filter=protect file disk.img protect=~1048576-6442450943
//! ```
//!
//! ## Parameters
//!
//! - `protect=START-END`: protect the bytes from `START` to `END`
//!   inclusive. Each is decimal, octal (`0NN`) or hexadecimal (`0xNN`);
//!   an omitted `START` is the start of the export, an omitted `END` its
//!   end (`protect=-` protects everything). May be given several times.
//! - `protect=~START-END`: protect everything except that range (quote
//!   the `~` from the shell).
//!
//! ## Behaviour
//!
//! A write into a protected range is checked by reading what is there
//! first; zero and trim requests are allowed there only where the data
//! already reads as zeroes. To make the whole export read-only use
//! `nbdkit -r` or the readonly filter; to serve only a part of it, the
//! offset or partition filter.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "protect",
    help: "protect=<START>-<END>      Protect range of bytes START-END (inclusive).",
    create,
};

/// One protected range of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    /// First byte protected.
    first: u64,
    /// Last byte protected (`u64::MAX`: to the end of the export).
    last: u64,
    /// The parameter it came from, for messages.
    text: String,
}

/// Parse a number as C's `strtoull` with base 0: `0x` hexadecimal, a
/// leading `0` octal, else decimal; nothing else may follow.
fn parse_number(s: &str) -> std::result::Result<u64, String> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(format!("range: could not parse number: \"{s}\""));
    }
    u64::from_str_radix(digits, radix).map_err(|_| format!("range: number \"{s}\" is too large"))
}

/// Parse one `protect=` value into the ranges it protects (two for a
/// complement, or none if the complement of everything).
fn parse_protect(value: &str) -> std::result::Result<Vec<Range>, String> {
    let (complement, body) = match value.strip_prefix('~') {
        Some(b) => (true, b),
        None => (false, value),
    };
    let Some((a, b)) = body.split_once('-') else {
        return Err(format!("cannot parse range, missing '-': {value}"));
    };
    let (a, b) = (a.trim(), b.trim());
    let first = if a.is_empty() { 0 } else { parse_number(a)? };
    let last = if b.is_empty() {
        u64::MAX
    } else {
        parse_number(b)?
    };
    if last < first {
        return Err(format!("invalid range, end < start: {value}"));
    }
    let text = value.to_string();
    if !complement {
        return Ok(vec![Range { first, last, text }]);
    }
    let mut out = Vec::new();
    if first > 0 {
        out.push(Range {
            first: 0,
            last: first - 1,
            text: text.clone(),
        });
    }
    if last < u64::MAX {
        out.push(Range {
            first: last + 1,
            last: u64::MAX,
            text,
        });
    }
    Ok(out)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mut ranges = Vec::new();
    for v in p.take_all("protect") {
        ranges.extend(parse_protect(&v).map_err(ConfigError::new)?);
    }
    ranges.sort_by_key(|r| r.first);
    Ok(Arc::new(Protect {
        ranges: Arc::new(ranges),
    }))
}

struct Protect {
    ranges: Arc<Vec<Range>>,
}

#[async_trait]
impl Filter for Protect {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ProtectHandle {
            next: next.open(ctx).await?,
            ranges: self.ranges.clone(),
        }))
    }
}

/// Bytes of a protected range read at a time to compare.
const CHUNK: u64 = 1 << 20;

struct ProtectHandle {
    next: Box<dyn Handle>,
    ranges: Arc<Vec<Range>>,
}

impl ProtectHandle {
    /// Fail with EPERM if writing `new` (the bytes to be written, or
    /// `None` for zeroes) over `[offset, offset+count)` would change a
    /// protected byte.
    async fn check(&self, count: u64, offset: u64, new: Option<&[u8]>) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let last = offset.saturating_add(count - 1);
        for r in self.ranges.iter() {
            if r.last < offset || r.first > last {
                continue;
            }
            // A zero request can be large: compare a piece at a time.
            let (mut at, end) = (r.first.max(offset), r.last.min(last));
            let mut old = vec![0u8; (end - at + 1).min(CHUNK) as usize];
            loop {
                let n = (end - at + 1).min(CHUNK) as usize;
                self.next.pread(&mut old[..n], at, Flags::NONE).await?;
                let same = match new {
                    Some(buf) => {
                        let i = (at - offset) as usize;
                        old[..n] == buf[i..i + n]
                    }
                    None => libnbd::zeroes::is_zero(&old[..n]),
                };
                if !same {
                    return Err(Error::eperm(format!(
                        "protect filter prevented write to protected range {}",
                        r.text
                    )));
                }
                match at.checked_add(n as u64) {
                    Some(next) if next <= end => at = next,
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for ProtectHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check(buf.len() as u64, offset, Some(buf)).await?;
        self.next.pwrite(buf, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(count, offset, None).await?;
        self.next.zero(count, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Trimmed bytes may read as anything: allowed only where they are
        // zeroes already, as a zero would be.
        self.check(count, offset, None).await?;
        self.next.trim(count, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::protocol::errno;

    fn r(first: u64, last: u64, text: &str) -> Range {
        Range {
            first,
            last,
            text: text.into(),
        }
    }

    #[test]
    fn protect_parses_ranges() {
        assert_eq!(parse_protect("0-0x1ff"), Ok(vec![r(0, 511, "0-0x1ff")]));
        assert_eq!(parse_protect("010-020"), Ok(vec![r(8, 16, "010-020")]));
        assert_eq!(parse_protect("5-5"), Ok(vec![r(5, 5, "5-5")]));
        assert_eq!(parse_protect("-"), Ok(vec![r(0, u64::MAX, "-")]));
        assert_eq!(parse_protect("-0x10"), Ok(vec![r(0, 16, "-0x10")]));
        assert_eq!(
            parse_protect("0x2000-"),
            Ok(vec![r(0x2000, u64::MAX, "0x2000-")])
        );
        assert_eq!(
            parse_protect("~0x1000-0x1fff"),
            Ok(vec![
                r(0, 0xfff, "~0x1000-0x1fff"),
                r(0x2000, u64::MAX, "~0x1000-0x1fff")
            ])
        );
        assert_eq!(parse_protect("~0-99"), Ok(vec![r(100, u64::MAX, "~0-99")]));
        assert_eq!(parse_protect("~-"), Ok(vec![]));
        assert_eq!(
            parse_protect("18446744073709551615-18446744073709551615"),
            Ok(vec![r(
                u64::MAX,
                u64::MAX,
                "18446744073709551615-18446744073709551615"
            )])
        );
        for (bad, msg) in [
            ("x", "missing '-'"),
            ("0x10", "missing '-'"),
            ("~", "missing '-'"),
            ("10-5", "end < start"),
            ("1k-2k", "could not parse number: \"1k\""),
            ("08-9", "could not parse number"),
            ("0x-1", "could not parse number"),
            ("1-2-3", "could not parse number"),
            ("-18446744073709551616", "too large"),
        ] {
            let e = parse_protect(bad).unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    async fn open(words: &[&str]) -> (Box<dyn Handle>, Arc<Mem>) {
        let mut data = vec![0u8; 8192];
        data[0x1000..0x1004].copy_from_slice(&[1, 2, 3, 4]);
        let mem = Mem::with(data);
        let s = stack(vec![create(&mut params(words)).unwrap()], &mem);
        (s.open(&ctx(1)).await.unwrap(), mem)
    }

    #[tokio::test]
    async fn protect_refuses_only_changes() {
        let (h, mem) = open(&["protect=0x1000-0x10ff", "protect=~-0x1fff"]).await;
        // Unchanged bytes in a protected range may be written.
        h.pwrite(&[0, 1, 2, 3, 4], 0xfff, Flags::NONE)
            .await
            .unwrap();
        let e = h.pwrite(&[9], 0x1003, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, errno::EPERM);
        assert!(e.msg.contains("0x1000-0x10ff"), "{}", e.msg);
        // Outside every range, anything goes.
        h.pwrite(&[9; 16], 0x1200, Flags::NONE).await.unwrap();
        // Zero and trim only where the bytes are zeroes already.
        h.zero(0x100, 0x1010, Flags::NONE).await.unwrap();
        assert!(h.zero(4, 0x1000, Flags::NONE).await.is_err());
        assert!(h.trim(2, 0x1002, Flags::NONE).await.is_err());
        h.trim(8, 0x1ff8, Flags::NONE).await.unwrap();
        // The complement protects everything from 0x2000 on (none here).
        assert_eq!(
            mem.data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[0x1003],
            4
        );
        assert_eq!(
            mem.data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[0x1200],
            9
        );
    }

    #[tokio::test]
    async fn protect_complement_and_config_errors() {
        let (h, _) = open(&["protect=~0x100-0x1ff"]).await;
        h.pwrite(&[7; 256], 0x100, Flags::NONE).await.unwrap();
        let e = h.pwrite(&[7; 2], 0xff, Flags::NONE).await.unwrap_err();
        assert!(e.msg.contains("~0x100-0x1ff"), "{}", e.msg);
        assert!(h.pwrite(&[9], 0x1000, Flags::NONE).await.is_err());
        assert!(create(&mut params(&["protect=1k-2k"])).is_err());
        // No protect= at all protects nothing.
        let (h, _) = open(&[]).await;
        h.pwrite(&[5; 8], 0x1000, Flags::NONE).await.unwrap();
    }
}
