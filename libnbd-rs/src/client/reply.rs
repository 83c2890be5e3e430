//! Decoding and checking of transmission replies, with no I/O: chunk
//! headers, error and block status payloads, and the bookkeeping that
//! makes sure a read's chunks stay inside the request and never overlap.

use std::collections::BTreeMap;

use crate::protocol::{be16, be32, be64, reply, MAX_STRING};

use super::types::StatusExtent;

/// Largest payload of an error chunk we accept (message and offset).
pub(crate) const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8 + 64;
/// Largest block status chunk we accept: 4 + 8 * 2^20 per the spec's
/// advice, with headroom.
pub(crate) const MAX_STATUS_CHUNK: u32 = 4 + 8 * (2 << 20);
/// Largest `BLOCK_STATUS_EXT` chunk we accept: 8 + 16 * 2^20, with the
/// same headroom.
pub(crate) const MAX_STATUS_EXT_CHUNK: u32 = 8 + 16 * (2 << 20);

/// The fields of a structured reply chunk header after its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    /// Decode the 16 bytes that follow `NBD_STRUCTURED_REPLY_MAGIC`.
    pub fn decode(b: &[u8; 16]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(&b[0..2]),
            typ: be16(&b[2..4]),
            cookie: be64(&b[4..12]),
            length: be32(&b[12..16]),
        }
    }
    /// Is this the last chunk of its reply?
    pub fn done(&self) -> bool {
        self.flags & reply::FLAG_DONE != 0
    }
}

/// An error chunk, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkError {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Decode the payload of an error chunk (`NBD_REPLY_TYPE_ERROR`,
/// `NBD_REPLY_TYPE_ERROR_OFFSET`, or an unknown type with bit 15 set).
pub(crate) fn parse_error(typ: u16, p: &[u8]) -> Result<ChunkError, String> {
    if p.len() < 6 {
        return Err(format!("error chunk of {} bytes is too short", p.len()));
    }
    let mut errno = be32(&p[0..4]);
    let mlen = be16(&p[4..6]) as usize;
    let fixed = if typ == reply::TYPE_ERROR_OFFSET {
        14
    } else {
        6
    };
    if p.len() < fixed || mlen > p.len() - fixed {
        return Err(format!(
            "error chunk message length {mlen} does not fit in its {} byte payload",
            p.len()
        ));
    }
    if mlen > MAX_STRING {
        return Err(format!("error message of {mlen} bytes is too long"));
    }
    let message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
    let offset = if typ == reply::TYPE_ERROR_OFFSET {
        Some(be64(&p[6 + mlen..14 + mlen]))
    } else {
        None
    };
    if errno == 0 {
        // The spec says MUST be nonzero; a zero error must still fail
        // the request.
        errno = crate::protocol::errno::EIO;
    }
    Ok(ChunkError {
        errno,
        message,
        offset,
    })
}

/// Decode a block status payload into its context id and extents.
pub(crate) fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<StatusExtent>), String> {
    if p.len() < 12 || p.len() % 8 != 4 {
        return Err(format!(
            "block status chunk of {} bytes is malformed",
            p.len()
        ));
    }
    let id = be32(&p[0..4]);
    let mut extents = Vec::with_capacity((p.len() - 4) / 8);
    for d in p[4..].chunks_exact(8) {
        let length = be32(&d[0..4]);
        if length == 0 {
            return Err("block status extent of length 0".into());
        }
        extents.push(StatusExtent {
            length: u64::from(length),
            flags: be32(&d[4..8]),
        });
    }
    Ok((id, extents))
}

/// Decode a `BLOCK_STATUS_EXT` payload (extended headers): context id,
/// descriptor count, then 64-bit lengths and status.
pub(crate) fn parse_block_status_ext(p: &[u8]) -> Result<(u32, Vec<StatusExtent>), String> {
    if p.len() < 24 || p.len() % 16 != 8 {
        return Err(format!(
            "BLOCK_STATUS_EXT chunk of {} bytes is malformed",
            p.len()
        ));
    }
    let id = be32(&p[0..4]);
    let n = be32(&p[4..8]) as usize;
    if n != (p.len() - 8) / 16 {
        return Err(format!(
            "BLOCK_STATUS_EXT chunk says {n} descriptors but holds {}",
            (p.len() - 8) / 16
        ));
    }
    let mut extents = Vec::with_capacity(n);
    for d in p[8..].chunks_exact(16) {
        let length = be64(&d[0..8]);
        if length == 0 {
            return Err("block status extent of length 0".into());
        }
        // Every context we negotiate has 32-bit status (base: and qemu:
        // ones); the spec says the high half is then zero.
        let flags = u32::try_from(be64(&d[8..16])).map_err(|_| {
            format!(
                "block status flags {:#x} do not fit in 32 bits",
                be64(&d[8..16])
            )
        })?;
        extents.push(StatusExtent { length, flags });
    }
    Ok((id, extents))
}

/// Check extents against the request: with `REQ_ONE` exactly one
/// extent no longer than the request; without it, all but the last
/// must end before the end of the request.
pub(crate) fn check_extents(
    extents: &[StatusExtent],
    req_one: bool,
    count: u64,
) -> Result<(), String> {
    if req_one {
        if extents.len() != 1 {
            return Err(format!(
                "{} extents in reply to a REQ_ONE block status",
                extents.len()
            ));
        }
        if extents[0].length > count {
            return Err(format!(
                "extent of {} bytes is longer than the {count} byte REQ_ONE request",
                extents[0].length
            ));
        }
        return Ok(());
    }
    let mut sum: u64 = 0;
    for e in &extents[..extents.len() - 1] {
        sum = sum.saturating_add(e.length);
        if sum >= count {
            return Err(format!(
                "block status extents continue past the end of the {count} byte request"
            ));
        }
    }
    Ok(())
}

/// The parts of a read that chunks have filled, to check chunks stay in
/// the request and never overlap.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    /// start -> end, relative to the request, non-overlapping.
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Record the chunk at absolute `offset`, `len` bytes, of a request
    /// at `req_offset` for `req_count` bytes. Returns the chunk's
    /// position relative to the request.
    pub fn add(
        &mut self,
        req_offset: u64,
        req_count: u64,
        offset: u64,
        len: u64,
    ) -> Result<usize, String> {
        let end = offset.checked_add(len);
        let req_end = req_offset.saturating_add(req_count);
        if len == 0 || offset < req_offset || !matches!(end, Some(e) if e <= req_end) {
            return Err(format!(
                "chunk at offset {offset} length {len} is outside the request \
                 (offset {req_offset} count {req_count})"
            ));
        }
        let start = offset - req_offset;
        let end = start + len;
        if let Some((_, &prev_end)) = self.ranges.range(..end).next_back() {
            if prev_end > start {
                return Err(format!(
                    "chunk at offset {offset} length {len} overlaps an earlier chunk"
                ));
            }
        }
        self.ranges.insert(start, end);
        self.total += len;
        Ok(start as usize)
    }

    /// Bytes covered so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Is the range `[offset, offset + len)` (absolute) inside the request?
    pub fn in_request(req_offset: u64, req_count: u64, offset: u64) -> bool {
        offset >= req_offset && offset - req_offset < req_count.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{errno, structured_reply, STRUCTURED_REPLY_MAGIC};

    #[test]
    fn chunk_header() {
        let b = structured_reply(0x1234, reply::FLAG_DONE, reply::TYPE_OFFSET_HOLE, 12);
        assert_eq!(be32(&b[0..4]), STRUCTURED_REPLY_MAGIC);
        let h = ChunkHeader::decode(b[4..20].try_into().unwrap());
        assert_eq!(
            h,
            ChunkHeader {
                flags: 1,
                typ: reply::TYPE_OFFSET_HOLE,
                cookie: 0x1234,
                length: 12
            }
        );
        assert!(h.done());
    }

    fn err_payload(e: u32, msg: &str, off: Option<u64>) -> Vec<u8> {
        let mut p = e.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        if let Some(o) = off {
            p.extend_from_slice(&o.to_be_bytes());
        }
        p
    }

    #[test]
    fn error_chunks() {
        let e = parse_error(
            reply::TYPE_ERROR,
            &err_payload(errno::EPERM, "read-only", None),
        )
        .unwrap();
        assert_eq!(
            (e.errno, e.message.as_str(), e.offset),
            (1, "read-only", None)
        );
        let e = parse_error(
            reply::TYPE_ERROR_OFFSET,
            &err_payload(5, "bad sector", Some(4096)),
        )
        .unwrap();
        assert_eq!((e.errno, e.offset), (5, Some(4096)));
        // An unknown error type: message, and trailing fields we ignore.
        let mut p = err_payload(22, "x", None);
        p.extend_from_slice(&[1, 2, 3]);
        let e = parse_error(reply::TYPE_ERROR | 0x40, &p).unwrap();
        assert_eq!((e.errno, e.message.as_str()), (22, "x"));
        // Zero errno still fails the request.
        assert_eq!(
            parse_error(reply::TYPE_ERROR, &err_payload(0, "", None))
                .unwrap()
                .errno,
            errno::EIO
        );
        // Malformed.
        assert!(parse_error(reply::TYPE_ERROR, &[0, 0, 0, 5, 0]).is_err());
        let mut p = err_payload(5, "abc", None);
        p[5] = 10; // message longer than the payload
        assert!(parse_error(reply::TYPE_ERROR, &p).is_err());
        // ERROR_OFFSET without its offset.
        assert!(parse_error(reply::TYPE_ERROR_OFFSET, &err_payload(5, "abc", None)).is_err());
    }

    #[test]
    fn block_status_payloads() {
        let mut p = 7u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (8192, 3)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let (id, ex) = parse_block_status(&p).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            ex,
            vec![
                StatusExtent {
                    length: 4096,
                    flags: 0
                },
                StatusExtent {
                    length: 8192,
                    flags: 3
                }
            ]
        );
        assert!(check_extents(&ex, false, 8192).is_ok());
        assert!(check_extents(&ex, false, 4096).is_err());
        assert!(check_extents(&ex, true, 1 << 20).is_err());
        assert!(check_extents(&ex[..1], true, 4096).is_ok());
        assert!(check_extents(&ex[1..], true, 4096).is_err());
        assert!(parse_block_status(&p[..8]).is_err());
        assert!(parse_block_status(&p[..13]).is_err());
        let mut z = p.clone();
        z[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_block_status(&z).is_err());
    }

    fn ext_payload(id: u32, n: u32, d: &[(u64, u64)]) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        for (l, f) in d {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        p
    }

    #[test]
    fn block_status_ext_payloads() {
        let big = 5u64 << 32;
        let (id, ex) = parse_block_status_ext(&ext_payload(3, 2, &[(big, 3), (4096, 0)])).unwrap();
        assert_eq!(id, 3);
        assert_eq!(
            ex,
            vec![
                StatusExtent {
                    length: big,
                    flags: 3
                },
                StatusExtent {
                    length: 4096,
                    flags: 0
                }
            ]
        );
        assert!(check_extents(&ex, false, big + 1).is_ok());
        assert!(check_extents(&ex, false, big).is_err());
        assert!(check_extents(&ex[..1], true, big).is_ok());
        assert!(check_extents(&ex[..1], true, big - 1).is_err());
        // A count that is not the number of descriptors, none, a zero
        // length, status past 32 bits, a torn descriptor.
        assert!(parse_block_status_ext(&ext_payload(3, 3, &[(big, 3), (4096, 0)])).is_err());
        assert!(parse_block_status_ext(&ext_payload(3, 0, &[])).is_err());
        assert!(parse_block_status_ext(&ext_payload(3, 1, &[(0, 0)])).is_err());
        assert!(parse_block_status_ext(&ext_payload(3, 1, &[(512, 1 << 32)])).is_err());
        let p = ext_payload(3, 1, &[(512, 0)]);
        assert!(parse_block_status_ext(&p[..20]).is_err());
        // Lengths that add up past 2^64 are past any request.
        let wrap = [
            StatusExtent {
                length: u64::MAX,
                flags: 0,
            },
            StatusExtent {
                length: 2,
                flags: 0,
            },
            StatusExtent {
                length: 2,
                flags: 0,
            },
        ];
        assert!(check_extents(&wrap, false, 4096).is_err());
    }

    #[test]
    fn coverage() {
        let mut c = Coverage::default();
        assert_eq!(c.add(1000, 100, 1050, 50), Ok(50));
        assert_eq!(c.add(1000, 100, 1000, 10), Ok(0));
        assert!(c.add(1000, 100, 1005, 10).is_err()); // overlaps [0,10)
        assert!(c.add(1000, 100, 1040, 20).is_err()); // overlaps [50,100)
        assert!(c.add(1000, 100, 990, 10).is_err()); // before
        assert!(c.add(1000, 100, 1090, 20).is_err()); // past the end
        assert!(c.add(1000, 100, u64::MAX, 2).is_err()); // wraps
        assert!(c.add(1000, 100, 1020, 0).is_err()); // empty
        assert_eq!(c.add(1000, 100, 1010, 40), Ok(10));
        assert_eq!(c.total(), 100);
        assert!(Coverage::in_request(1000, 100, 1099));
        assert!(!Coverage::in_request(1000, 100, 1100));
    }
}
