//! Zero detection: find the blocks of a buffer that are all zeroes, so
//! that they travel as holes (server read replies), zero requests
//! (`nbdcopy -S`) or unallocated pages (sparse stores) instead of data.
//!
//! Blocks are aligned to multiples of the block size in the device, not
//! in the buffer, so a hole always starts and ends on a block boundary.
//! Data blocks usually fail the test in their first bytes, so scanning
//! costs little except on real zeroes.

use std::ops::Range;

/// A run of whole blocks of the same kind within a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Byte range in the buffer.
    pub range: Range<usize>,
    /// All zeroes.
    pub zero: bool,
}

/// Are all the bytes zero?
pub fn is_zero(b: &[u8]) -> bool {
    // Most data is non-zero near the start: look there first.
    let head = b.len().min(16);
    if b[..head].iter().any(|&x| x != 0) {
        return false;
    }
    // Then OR 256 bytes at a time (the compiler vectorizes the inner
    // loop), stopping at the first chunk with data.
    let mut chunks = b[head..].chunks_exact(256);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Split `buf`, which holds the bytes at `offset`, into runs of zero
/// and non-zero blocks of `block` bytes (a power of 2). The first and
/// last blocks may be partial.
pub fn runs(buf: &[u8], offset: u64, block: u64) -> Vec<Run> {
    runs_around(buf, offset, block, &[])
}

/// As [`runs`], where the ranges `holes` (sorted, disjoint, within
/// `buf`) are known to be zeroes and are not looked at (a read whose
/// holes were left unfilled): a block is zero when the rest of it is.
pub fn runs_around(buf: &[u8], offset: u64, block: u64, holes: &[Range<usize>]) -> Vec<Run> {
    debug_assert!(block.is_power_of_two());
    let mut out: Vec<Run> = Vec::new();
    let mut holes = holes.iter().peekable();
    let mut at = 0usize;
    while at < buf.len() {
        let abs = offset + at as u64;
        let next = ((abs / block) + 1) * block;
        let end = (at as u64 + (next - abs)).min(buf.len() as u64) as usize;
        // The block's bytes outside the holes.
        let mut zero = true;
        let mut from = at;
        while zero && from < end {
            while holes.next_if(|h| h.end <= from).is_some() {}
            match holes.peek() {
                Some(h) if h.start <= from => from = h.end.min(end),
                Some(h) if h.start < end => {
                    zero = is_zero(&buf[from..h.start]);
                    from = h.end.min(end);
                }
                _ => {
                    zero = is_zero(&buf[from..end]);
                    from = end;
                }
            }
        }
        match out.last_mut() {
            Some(r) if r.zero == zero => r.range.end = end,
            _ => out.push(Run {
                range: at..end,
                zero,
            }),
        }
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_count_as_zeroes_unread() {
        // Garbage where the holes are: never looked at.
        let mut b = vec![0xffu8; 6 * 4096];
        let holes = [
            0..4096 + 100,
            2 * 4096..4 * 4096 + 10,
            5 * 4096 + 8..6 * 4096,
        ];
        for h in &holes {
            b[h.clone()].fill(0xee);
        }
        // Zero the rest of blocks 1 and 4 and the start of 5.
        b[4096 + 100..2 * 4096].fill(0);
        b[4 * 4096 + 10..5 * 4096 + 8].fill(0);
        let r = runs_around(&b, 0, 4096, &holes);
        assert_eq!(
            r,
            vec![Run {
                range: 0..6 * 4096,
                zero: true
            }]
        );
        // One data byte outside the holes makes its block data.
        b[4 * 4096 + 20] = 1;
        let r = runs_around(&b, 0, 4096, &holes);
        assert_eq!(
            r,
            vec![
                Run {
                    range: 0..4 * 4096,
                    zero: true
                },
                Run {
                    range: 4 * 4096..5 * 4096,
                    zero: false
                },
                Run {
                    range: 5 * 4096..6 * 4096,
                    zero: true
                },
            ]
        );
        // Without the holes, the garbage is data.
        assert!(runs(&b, 0, 4096).iter().all(|r| !r.zero));
    }

    #[test]
    fn zero_or_not() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4097]));
        for i in [0, 15, 16, 17, 300, 4095, 4096] {
            let mut b = vec![0u8; 4097];
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
        }
    }

    #[test]
    fn runs_aligned_to_the_endpoint() {
        let mut b = vec![0u8; 4 * 4096];
        b[4096 + 5] = 1;
        let r = runs(&b, 0, 4096);
        assert_eq!(
            r,
            vec![
                Run {
                    range: 0..4096,
                    zero: true
                },
                Run {
                    range: 4096..8192,
                    zero: false
                },
                Run {
                    range: 8192..16384,
                    zero: true
                },
            ]
        );
        // The buffer starts half way into a block: the first run is
        // partial and boundaries stay on multiples of 4096 in the file.
        let r = runs(&b[2048..], 2048, 4096);
        assert_eq!(
            r[0],
            Run {
                range: 0..2048,
                zero: true
            }
        );
        assert_eq!(
            r[1],
            Run {
                range: 2048..6144,
                zero: false
            }
        );
        assert_eq!(
            r[2],
            Run {
                range: 6144..14336,
                zero: true
            }
        );
        assert!(runs(&[], 0, 512).is_empty());
    }
}
