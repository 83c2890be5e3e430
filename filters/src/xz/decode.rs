//! Decoding one xz block with liblzma: the block is wrapped in a
//! synthetic single-block stream (see [`super::index`]) and fed to
//! liblzma's stream decoder, either at once (whole blocks for the cache)
//! or piece by piece (the progressive decoder of the spill).

use liblzma::stream::{Action, Error as LzError, Status, Stream};

use super::index::{stream_header, synthetic_tail, Block, HEADER_SIZE};

/// What liblzma's error means for a reader.
pub fn describe(e: LzError) -> &'static str {
    match e {
        LzError::Data => "compressed data is corrupt",
        LzError::Format => "not in xz format",
        LzError::Options => "unsupported compression options (filter chain)",
        LzError::Mem => "out of memory",
        LzError::MemLimit => "memory limit reached",
        LzError::NoCheck | LzError::UnsupportedCheck => "unsupported integrity check",
        _ => "internal decoder error",
    }
}

/// A stream decoder with liblzma's `flags`.
fn new_decoder(flags: u32) -> Result<Stream, String> {
    Stream::new_stream_decoder(u64::MAX, flags)
        .map_err(|e| format!("cannot start decoder: {}", describe(e)))
}

/// A stream decoder for whole blocks, kept from one block to the next.
/// It takes concatenated streams, so each block's synthetic stream
/// follows the last one's, and liblzma keeps its dictionary when the
/// next block's is the same size: a fresh one is 8 MiB of pages to fault
/// in for every block (at `xz -6`), 4% of the server's CPU copying the
/// bench image to `null:`.
pub struct Decoder(Stream);

impl Decoder {
    pub fn new() -> Result<Decoder, String> {
        new_decoder(liblzma::stream::CONCATENATED).map(Decoder)
    }
}

/// Ask for transparent huge pages for the spare capacity of `v` (its
/// 2 MiB-aligned part): a fresh 16 MiB block buffer is then faulted in
/// eight pages instead of 4096, and reads of it walk fewer TLB entries.
/// Advice only: where THP is off, nothing changes.
pub fn huge_pages(v: &mut Vec<u8>) {
    const HUGE: usize = 2 << 20;
    let spare = v.spare_capacity_mut();
    let start = spare.as_mut_ptr() as usize;
    let (from, to) = (
        start.next_multiple_of(HUGE),
        (start + spare.len()) & !(HUGE - 1),
    );
    if to > from {
        // SAFETY: advice on whole pages inside memory `v` owns; it does
        // not change their contents.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
}

/// Decode a whole block into `out` (emptied first; a buffer of an
/// earlier block saves faulting in fresh pages) with the decoder in
/// `dec` (a new one if `None`; left there for the next block unless
/// this one fails). `input` must hold the block's compressed bytes
/// (`b.total()` of them) at `input[HEADER_SIZE..]`; the first 12 bytes
/// are overwritten with a stream header. Returns exactly `b.usize`
/// bytes, the block's integrity check verified.
pub fn decode_block(
    b: &Block,
    input: &mut Vec<u8>,
    mut out: Vec<u8>,
    dec: &mut Option<Decoder>,
) -> Result<Vec<u8>, String> {
    input[..HEADER_SIZE as usize].copy_from_slice(&stream_header(b.flags));
    input.extend_from_slice(&synthetic_tail(b));
    let Decoder(mut s) = match dec.take() {
        Some(d) => d,
        None => Decoder::new()?,
    };
    out.clear();
    out.reserve_exact(b.usize as usize);
    huge_pages(&mut out);
    let mut pos = 0usize;
    loop {
        let (in0, out0) = (s.total_in(), s.total_out());
        let st = s
            .process_vec(&input[pos..], &mut out, Action::Run)
            .map_err(|e| describe(e).to_string())?;
        pos += (s.total_in() - in0) as usize;
        // All of the synthetic stream taken: liblzma checks the block's
        // check, the index and the footer as it takes their last bytes,
        // and then waits for the next stream.
        if st == Status::StreamEnd || pos == input.len() {
            break;
        }
        if s.total_in() == in0 && s.total_out() == out0 {
            return Err(if out.len() as u64 >= b.usize {
                "the block holds more data than the index says".into()
            } else {
                "the block ends early (truncated or corrupt)".into()
            });
        }
    }
    if out.len() as u64 != b.usize || pos != input.len() {
        return Err("block size does not match the index".into());
    }
    *dec = Some(Decoder(s));
    Ok(out)
}

/// The compressed input of a progressive decoder: the synthetic stream
/// header, then the block's bytes from the file, then the synthetic tail.
pub struct Input {
    /// The block.
    pub block: Block,
    tail: Vec<u8>,
    /// Bytes of the virtual input handed out so far.
    pub pos: u64,
}

/// A piece of virtual input to fetch next.
pub enum Piece {
    /// Literal bytes (header or tail).
    Bytes(Vec<u8>),
    /// Read `len` bytes at `offset` of the compressed file.
    Read { offset: u64, len: u64 },
    /// Nothing left.
    End,
}

impl Input {
    /// The input of block `b`.
    pub fn new(block: Block) -> Self {
        Input {
            tail: synthetic_tail(&block),
            block,
            pos: 0,
        }
    }
    fn len(&self) -> u64 {
        HEADER_SIZE + self.block.total() + self.tail.len() as u64
    }
    /// The next piece, of at most `max` bytes from the file.
    pub fn next_piece(&mut self, max: u64) -> Piece {
        let data_end = HEADER_SIZE + self.block.total();
        if self.pos < HEADER_SIZE {
            self.pos = HEADER_SIZE;
            Piece::Bytes(stream_header(self.block.flags).to_vec())
        } else if self.pos < data_end {
            let len = (data_end - self.pos).min(max);
            let offset = self.block.coffset + (self.pos - HEADER_SIZE);
            self.pos += len;
            Piece::Read { offset, len }
        } else if self.pos < self.len() {
            self.pos = self.len();
            Piece::Bytes(self.tail.clone())
        } else {
            Piece::End
        }
    }
}

/// A progressive decoder of one block: feed it input, take output.
pub struct Progressive {
    stream: Stream,
    /// Uncompressed bytes produced so far.
    pub out_pos: u64,
    /// The stream end was reached (the block's check verified).
    pub ended: bool,
    /// Input not yet consumed.
    pub inbuf: Vec<u8>,
    /// How much of `inbuf` was consumed.
    pub in_used: usize,
    /// The virtual input.
    pub input: Input,
}

impl Progressive {
    /// A decoder at the start of block `b`.
    pub fn new(b: Block) -> Result<Self, String> {
        Ok(Progressive {
            stream: new_decoder(0)?,
            out_pos: 0,
            ended: false,
            inbuf: Vec::new(),
            in_used: 0,
            input: Input::new(b),
        })
    }
    /// Does it need more input before it can go on?
    pub fn needs_input(&self) -> bool {
        self.in_used >= self.inbuf.len() && !self.ended
    }
    /// Decode into `out` (whose length is how much is wanted, 0 only once
    /// the whole block was produced) from the buffered input. Returns how
    /// many bytes were written: fewer than `out.len()` when the buffered
    /// input ran out or the block ended.
    pub fn decode(&mut self, out: &mut [u8]) -> Result<usize, String> {
        let mut filled = 0;
        while !self.ended {
            let (in0, out0) = (self.stream.total_in(), self.stream.total_out());
            let st = self
                .stream
                .process(&self.inbuf[self.in_used..], &mut out[filled..], Action::Run)
                .map_err(|e| describe(e).to_string())?;
            let used = (self.stream.total_in() - in0) as usize;
            let made = (self.stream.total_out() - out0) as usize;
            self.in_used += used;
            filled += made;
            self.out_pos += made as u64;
            if self.out_pos > self.input.block.usize {
                return Err("the block holds more data than the index says".into());
            }
            if st == Status::StreamEnd {
                self.ended = true;
                if self.out_pos != self.input.block.usize {
                    return Err("block size does not match the index".into());
                }
                break;
            }
            let input_left = self.in_used < self.inbuf.len();
            if filled == out.len() && !out.is_empty() {
                break;
            }
            if !input_left {
                if self.input.exhausted() {
                    return Err("the block ends early (truncated or corrupt)".into());
                }
                break;
            }
            if used == 0 && made == 0 {
                return Err(if self.out_pos == self.input.block.usize {
                    "the block holds more data than the index says".into()
                } else {
                    "the decoder made no progress (corrupt data)".into()
                });
            }
        }
        Ok(filled)
    }
}

impl Input {
    /// Was all of the input handed out?
    pub fn exhausted(&self) -> bool {
        self.pos >= self.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use liblzma::stream::Check;

    /// Compress `data` as one xz stream with one block (as plain `xz`).
    pub fn xz_one(data: &[u8], check: Check) -> Vec<u8> {
        let mut s = Stream::new_easy_encoder(1, check).unwrap();
        let mut out = Vec::with_capacity(data.len() + 4096);
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(1 << 20);
            }
            let in0 = s.total_in();
            let st = s
                .process_vec(&data[pos..], &mut out, Action::Finish)
                .unwrap();
            pos += (s.total_in() - in0) as usize;
            if st == Status::StreamEnd {
                return out;
            }
        }
    }

    /// The decoder is the bundled xz 5.8 (see `.cargo/config.toml`), not
    /// a system liblzma: 5.4's decoder takes 35% more CPU per block.
    #[test]
    fn bundled_liblzma() {
        // SAFETY: returns a constant.
        let v = unsafe { liblzma_sys::lzma_version_number() };
        assert!(v >= 50080000, "liblzma {v} is older than 5.8");
    }

    #[test]
    fn whole_block_and_progressive() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let xz = xz_one(&data, Check::Crc64);
        // One block right after the 12-byte header; find it via the index.
        let (flags, ilen) = super::super::index::parse_footer(&xz[xz.len() - 12..]).unwrap();
        let istart = xz.len() - 12 - ilen as usize;
        let recs = super::super::index::parse_index(&xz[istart..xz.len() - 12]).unwrap();
        assert_eq!(recs.len(), 1);
        let b = Block {
            uoffset: 0,
            usize: recs[0].1,
            coffset: 12,
            unpadded: recs[0].0,
            flags,
        };
        let mut input = vec![0u8; 12];
        input.extend_from_slice(&xz[12..12 + b.total() as usize]);
        assert_eq!(
            decode_block(&b, &mut input.clone(), Vec::new(), &mut None).unwrap(),
            data
        );

        // Corrupt the block's check: the whole-block decoder refuses it.
        let mut bad = input.clone();
        let at = 12 + b.unpadded as usize - 1;
        bad[at] ^= 1;
        assert!(decode_block(&b, &mut bad, Vec::new(), &mut None).is_err());
        // Wrong size in the index.
        let mut wrong = b;
        wrong.usize += 1;
        assert!(decode_block(&wrong, &mut input.clone(), Vec::new(), &mut None).is_err());

        // One decoder for block after block: kept after each good one,
        // dropped after a failure, and right again after that.
        let mut dec = None;
        for _ in 0..3 {
            let out = decode_block(&b, &mut input.clone(), Vec::new(), &mut dec).unwrap();
            assert!(out == data);
            assert!(dec.is_some());
        }
        assert!(decode_block(&b, &mut bad.clone(), Vec::new(), &mut dec).is_err());
        assert!(dec.is_none());
        let mut dec = Some(Decoder::new().unwrap());
        assert!(decode_block(&wrong, &mut input.clone(), Vec::new(), &mut dec).is_err());
        assert!(dec.is_none());
        let out = decode_block(&b, &mut input.clone(), Vec::new(), &mut dec).unwrap();
        assert!(out == data && dec.is_some());

        // Progressive, with input in small pieces and output in chunks.
        let mut p = Progressive::new(b).unwrap();
        let mut got = Vec::new();
        let mut out = vec![0u8; 10_000];
        while !p.ended {
            if p.needs_input() {
                match p.input.next_piece(777) {
                    Piece::Bytes(v) => p.inbuf = v,
                    Piece::Read { offset, len } => {
                        p.inbuf = xz[offset as usize..(offset + len) as usize].to_vec()
                    }
                    Piece::End => panic!("ran out of input"),
                }
                p.in_used = 0;
            }
            let n = p.decode(&mut out).unwrap();
            got.extend_from_slice(&out[..n]);
        }
        assert_eq!(got, data);
    }
}
