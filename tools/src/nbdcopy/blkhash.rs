//! `--blkhash`: the block-based hash of what is copied, as libnbd
//! 1.24's nbdcopy computes it, which is the blkhash project's
//! construction (github.com/nirs/blkhash, its reference `blkhash.py`):
//!
//! ```text
//! H( H(block 1) || H(block 2) || ... || H(block N) || le64(length) )
//! ```
//!
//! The data is cut into blocks of the block size (default 64 KiB); the
//! last block may be shorter and is hashed as it is (not padded). Each
//! block is hashed with the digest H (default sha256), the block digests
//! are fed in order to an outer H, and the total length in bytes as a
//! little-endian 64-bit integer ends it. An empty disk is `H(le64(0))`.
//!
//! Zero blocks are never read: ranges the source reports as zero
//! (extents) arrive here as lengths, and each whole zero block adds the
//! precomputed digest of a zero block (a block of data that turns out to
//! be all zeroes uses it too). The copy finishes operations out of
//! order; pieces ahead of the hashed prefix wait (data copied) until the
//! gap before them is filled.
//!
//! `--blkhash=DIGEST` picks H (`md5`, `sha1`, `sha224`, `sha256`,
//! `sha384`, `sha512`, `sha512-224`, `sha512-256`);
//! `--blkhash=DIGEST/SIZE` also the block size (`sha512/512k`, any size
//! from 1 byte). The digest is printed in hex on a line of its own on
//! stdout, or written so to `--blkhash-file=FILE`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use digest::DynDigest;

/// The default block size (blkhash's and libnbd's).
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// Largest block size accepted (a block is held in memory).
const MAX_BLOCK_SIZE: u64 = 1 << 30;

/// A digest algorithm by its (OpenSSL) name.
pub fn new_digest(name: &str) -> Option<Box<dyn DynDigest + Send>> {
    Some(match name.to_ascii_lowercase().as_str() {
        "md5" => Box::new(md5::Md5::default()),
        "sha1" => Box::new(sha1::Sha1::default()),
        "sha224" | "sha2-224" => Box::new(sha2::Sha224::default()),
        "sha256" | "sha2-256" => Box::new(sha2::Sha256::default()),
        "sha384" | "sha2-384" => Box::new(sha2::Sha384::default()),
        "sha512" | "sha2-512" => Box::new(sha2::Sha512::default()),
        "sha512-224" | "sha2-512/224" => Box::new(sha2::Sha512_224::default()),
        "sha512-256" | "sha2-512/256" => Box::new(sha2::Sha512_256::default()),
        _ => return None,
    })
}

/// What `--blkhash[=DIGEST[/SIZE]]` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The digest's name.
    pub digest: String,
    /// The block size in bytes.
    pub block_size: u64,
}

impl Spec {
    /// Parse the value of `--blkhash` (empty: the defaults).
    pub fn parse(s: &str) -> Result<Spec, String> {
        let (name, size) = match s.split_once('/') {
            Some((n, z)) => (n, Some(z)),
            None => (s, None),
        };
        let digest = match name {
            "" => "sha256".to_string(),
            n if new_digest(n).is_some() => n.to_ascii_lowercase(),
            n => return Err(format!("--blkhash: unknown digest: {n}")),
        };
        let block_size = match size {
            None => BLOCK_SIZE,
            Some(z) => match libnbd::parse_size(z) {
                Ok(n) if (1..=MAX_BLOCK_SIZE).contains(&n) => n,
                _ => return Err(format!("--blkhash: could not parse block size: {z}")),
            },
        };
        Ok(Spec { digest, block_size })
    }
}

enum Piece {
    Data(Vec<u8>),
    Zero(u64),
}

struct State {
    outer: Box<dyn DynDigest + Send>,
    inner: Box<dyn DynDigest + Send>,
    /// The digest of a whole zero block.
    zero_hash: Vec<u8>,
    block_size: u64,
    /// Bytes hashed so far (in order, from 0).
    next: u64,
    /// The unfinished block at `next`.
    partial: Vec<u8>,
    /// Pieces beyond `next`, by offset.
    pending: BTreeMap<u64, Piece>,
}

impl State {
    fn block_done(&mut self) {
        let h = if self.partial.iter().all(|&b| b == 0)
            && self.partial.len() as u64 == self.block_size
        {
            self.zero_hash.clone()
        } else {
            self.inner.update(&self.partial);
            self.inner.finalize_reset().to_vec()
        };
        self.outer.update(&h);
        self.partial.clear();
    }

    fn feed_data(&mut self, mut data: &[u8]) {
        self.next += data.len() as u64;
        let bs = self.block_size as usize;
        if !self.partial.is_empty() {
            let take = (bs - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == bs {
                self.block_done();
            }
        }
        while data.len() >= bs {
            let block = &data[..bs];
            if block.iter().all(|&b| b == 0) {
                self.outer.update(&self.zero_hash);
            } else {
                self.inner.update(block);
                let h = self.inner.finalize_reset();
                self.outer.update(&h);
            }
            data = &data[bs..];
        }
        self.partial.extend_from_slice(data);
    }

    fn feed_zero(&mut self, mut len: u64) {
        self.next += len;
        let bs = self.block_size;
        if !self.partial.is_empty() {
            let take = (bs - self.partial.len() as u64).min(len);
            self.partial.resize(self.partial.len() + take as usize, 0);
            len -= take;
            if self.partial.len() as u64 == bs {
                self.block_done();
            } else {
                // All of it went into the unfinished block.
                return;
            }
        }
        for _ in 0..len / bs {
            self.outer.update(&self.zero_hash);
        }
        self.partial.resize((len % bs) as usize, 0);
    }

    fn add(&mut self, offset: u64, piece: Piece) {
        if offset != self.next {
            self.pending.insert(offset, piece);
            return;
        }
        self.feed(piece);
        self.drain();
    }

    /// Feed the pending pieces that now follow on.
    fn drain(&mut self) {
        while let Some(e) = self.pending.first_entry() {
            if *e.key() != self.next {
                break;
            }
            let p = e.remove();
            self.feed(p);
        }
    }

    fn feed(&mut self, piece: Piece) {
        match piece {
            Piece::Data(d) => self.feed_data(&d),
            Piece::Zero(n) => self.feed_zero(n),
        }
    }
}

/// The block hash of a copy, fed pieces in any order.
pub struct BlockHasher {
    state: Mutex<State>,
}

impl BlockHasher {
    /// A hasher for this spec.
    pub fn new(spec: &Spec) -> BlockHasher {
        let mut inner = new_digest(&spec.digest).expect("digest checked by Spec::parse");
        let outer = new_digest(&spec.digest).expect("digest checked by Spec::parse");
        // A zero block's digest, hashed in slices (no block-sized buffer).
        let zeroes = vec![0u8; (spec.block_size as usize).min(1 << 20)];
        let mut left = spec.block_size as usize;
        while left > 0 {
            let n = left.min(zeroes.len());
            inner.update(&zeroes[..n]);
            left -= n;
        }
        let zero_hash = inner.finalize_reset().to_vec();
        BlockHasher {
            state: Mutex::new(State {
                outer,
                inner,
                zero_hash,
                block_size: spec.block_size,
                next: 0,
                partial: Vec::new(),
                pending: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `data` is what is at `offset`.
    pub fn data(&self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut s = self.lock();
        if offset == s.next {
            s.feed_data(data);
            s.drain();
        } else {
            s.add(offset, Piece::Data(data.to_vec()));
        }
    }

    /// `[offset, offset + length)` reads as zeroes.
    pub fn zero(&self, offset: u64, length: u64) {
        if length > 0 {
            self.lock().add(offset, Piece::Zero(length));
        }
    }

    /// The digest of all `length` bytes, or an error if a part was
    /// never given.
    pub fn finish(&self, length: u64) -> Result<Vec<u8>, String> {
        let mut s = self.lock();
        if s.next != length || !s.pending.is_empty() {
            return Err(format!(
                "--blkhash: internal error: {} of {length} bytes hashed",
                s.next
            ));
        }
        if !s.partial.is_empty() {
            let last = std::mem::take(&mut s.partial);
            s.inner.update(&last);
            let h = s.inner.finalize_reset();
            s.outer.update(&h);
        }
        s.outer.update(&length.to_le_bytes());
        Ok(s.outer.finalize_reset().to_vec())
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(spec: &str, data: &[u8]) -> String {
        let h = BlockHasher::new(&Spec::parse(spec).unwrap());
        h.data(0, data);
        hex(&h.finish(data.len() as u64).unwrap())
    }

    // The vectors libnbd 1.24's tests check nbdcopy --blkhash against
    // (cross-checked there with blkhash's test/blkhash.py).
    #[test]
    fn known_vectors() {
        assert_eq!(
            hash("sha256", b""),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
        assert_eq!(hash("", b""), hash("sha256/64k", b""));
        assert_eq!(hash("md5", b"hello"), "f741ac9ce55f5325906bb14e9c05d467");
        assert_eq!(
            hash("sha256", b"hello"),
            "337355feb53a5309d5aba92796223c2c84ffab930e706c01fef573a2722545e6"
        );
        assert_eq!(
            hash("sha512", b"hello"),
            "eca04a593cf12ec4132993da709048e25a2f1be3526e132fb521ec9d41f023ec\
             4018b3fd07b014a33e36bb5fa145b36991f431e62f9e1a93bebea6c9565682c1"
        );
        assert_eq!(hash("md5/4", b"hello"), "8262896de34125dec173722c920e8bd0");
        let pattern = b"12345678".repeat(512 * 256);
        assert_eq!(hash("md5", &pattern), "84fc21ac2f49ac283ff399378d834d1a");
        assert_eq!(
            hash("sha256", &pattern),
            "cbb388edd25e567b85f504c7b345497f9fb4f6bbf4e39768809184b9f9e678f8"
        );
        assert_eq!(
            hash("sha512/512k", &pattern),
            "379f7eb1628058c7abbc4c96941ac972074815ea9ef4aca95eefb2b4f9c29f64\
             023fff8d966e9fddf08d07bdba548e75298917f10268fdf9ba636c2321a2214e"
        );
    }

    // "hello" @1048576 "goodbye": the zeroes given as a zero range, and
    // pieces out of order, give the same digest.
    #[test]
    fn sparse_out_of_order() {
        let expect = "61b8f3a8cea76e16eeff7ce27f1b7711c1f1e437f5038cec17773772a4bded28";
        let mut dense = vec![0u8; 1048576 + 7];
        dense[..5].copy_from_slice(b"hello");
        dense[1048576..].copy_from_slice(b"goodbye");
        assert_eq!(hash("sha256", &dense), expect);
        let h = BlockHasher::new(&Spec::parse("sha256").unwrap());
        h.data(1048576, b"goodbye");
        h.zero(70000, 1048576 - 70000);
        h.zero(5, 69995);
        h.data(0, b"hello");
        assert_eq!(hex(&h.finish(1048583).unwrap()), expect);
    }

    // Zero pieces smaller than a block and not aligned to it.
    #[test]
    fn small_unaligned_pieces() {
        let mut dense = vec![0u8; 10_000];
        dense[3000..3100].fill(1);
        dense[9990..].fill(2);
        let expect = hash("md5/1000", &dense);
        let h = BlockHasher::new(&Spec::parse("md5/1000").unwrap());
        h.zero(0, 2500);
        h.zero(2500, 300);
        h.zero(2800, 200);
        h.data(3000, &dense[3000..3100]);
        h.zero(3100, 10);
        h.zero(3110, 6880);
        h.data(9990, &dense[9990..]);
        assert_eq!(hex(&h.finish(10_000).unwrap()), expect);
    }

    #[test]
    fn bad_specs() {
        assert!(Spec::parse("nosuch").is_err());
        assert!(Spec::parse("sha256/0").is_err());
        assert!(Spec::parse("sha256/x").is_err());
        assert_eq!(Spec::parse("SHA1/1M").unwrap().block_size, 1 << 20);
    }

    #[test]
    fn missing_piece_is_an_error() {
        let h = BlockHasher::new(&Spec::parse("").unwrap());
        h.data(10, b"x");
        assert!(h.finish(11).is_err());
    }
}
