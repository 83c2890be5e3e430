//! # sparse-random: sparse disks of random data
//!
//! Serves a disk made of runs of random data separated by runs of empty
//! space, shaped like a real virtual machine disk. It is meant for
//! benchmarking and testing copying tools: the same instance can be both
//! source and destination, because writes check that the data written
//! is what a read returns.
//!
//! ```text
//! nbdkit sparse-random 1T
//! nbdkit -U - sparse-random size=1T seed=42 --run 'nbdcopy "$uri" "$uri"'
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE` (required): the virtual size, up to 2^63-1 bytes.
//! - `seed=SEED`: a 32-bit seed; the same seed gives the same disk on
//!   every run. By default a random seed is chosen.
//! - `percent=N`: the approximate percentage of the disk holding data,
//!   0 to 100 (fractions allowed). Default 10. `percent=0` gives an empty
//!   disk, `percent=100` a full one.
//! - `runlength=N`: the average length of a run of data, in bytes (size
//!   syntax accepted, e.g. `1M`). Default 16M.
//! - `random-content=true`: every byte of a data block is random. By
//!   default each 4096-byte data block repeats a single random non-zero
//!   byte, which is much faster to generate and check.
//!
//! ## How the disk is laid out
//!
//! The disk is made of 4096-byte blocks. It is cut into segments of many
//! blocks (about 16 average data+hole cycles each); inside a segment,
//! runs alternate between data and holes with exponentially distributed
//! lengths (mean `runlength` for data, `runlength * (100 - percent) /
//! percent` for holes), drawn from a generator seeded by the seed and the
//! segment number. Any part of the disk is thus computed on demand, in
//! constant memory, however large the disk. The content of a block is a
//! function of the seed and the block number. (The bytes differ from
//! nbdkit's, which uses another generator.)
//!
//! ## Behaviour
//!
//! Writable: a write succeeds only if it writes exactly what is already
//! there, else it fails with `EIO`; trim and zero succeed on holes and
//! fail with `EIO` if the range touches data (fast zero is not
//! advertised, as upstream). Flush and FUA are no-ops; extents report the
//! holes (as holes reading as zeroes) and the data; multi-conn is safe;
//! cache is a no-op.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Extents, Flags, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

/// The registry entry of the sparse-random plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "sparse-random",
    help: "size=<SIZE>  (required) Size of the backing disk\n\
           seed=<SEED>             Random number generator seed\n\
           percent=<PERCENT>       Percentage of data\n\
           runlength=<BYTES>       Expected average run length of data\n\
           random-content=true     Fully random content in each block",
    magic: Some("size"),
    create,
};

/// Size of a block: the unit of data and holes.
pub const BLOCK: u64 = 4096;

/// Stop an extents request after this many extents.
const MAX_EXTENTS: usize = 1024;
/// Stop an extents request after visiting this many segments.
const MAX_SEGMENTS: u64 = 4096;

/// The splitmix64 finaliser: a good 64-bit mixing function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A small deterministic generator (splitmix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// An exponentially distributed run length in blocks (at least 1).
    fn run(&mut self, mean: f64) -> u64 {
        let len = (-(1.0 - self.unit()).ln() * mean).ceil();
        if len.is_finite() && len >= 1.0 {
            len.min((1u64 << 62) as f64) as u64
        } else {
            1
        }
    }
}

/// The shape and content of the disk, computed on demand.
#[derive(Debug, Clone)]
struct Layout {
    size: u64,
    blocks: u64,
    seed: u64,
    /// Fraction of data, 0..=1.
    fraction: f64,
    /// Mean data run, in blocks.
    data_mean: f64,
    /// Mean hole run, in blocks.
    hole_mean: f64,
    /// Blocks per segment.
    segment: u64,
    random_content: bool,
}

impl Layout {
    fn new(size: u64, seed: u32, percent: f64, runlength: u64, random_content: bool) -> Self {
        let fraction = percent / 100.0;
        let data_mean = (runlength as f64 / BLOCK as f64).max(1.0);
        let hole_mean = if fraction > 0.0 {
            data_mean * (1.0 - fraction) / fraction
        } else {
            f64::INFINITY
        };
        let cycle = data_mean + hole_mean;
        let segment = if cycle.is_finite() {
            (cycle * 16.0).clamp(256.0, (1u64 << 40) as f64) as u64
        } else {
            1 << 40
        };
        Layout {
            size,
            blocks: size.div_ceil(BLOCK),
            seed: mix(seed as u64 ^ 0x5370_6172_7365_526e),
            fraction,
            data_mean,
            hole_mean,
            segment,
            random_content,
        }
    }

    /// The data runs of segment `seg`, as sorted block ranges.
    fn segment_runs(&self, seg: u64) -> Vec<(u64, u64)> {
        let start = seg * self.segment;
        let end = start.saturating_add(self.segment).min(self.blocks);
        let mut rng = SplitMix(mix(self.seed ^ mix(seg.wrapping_add(GAMMA))));
        let mut data = rng.unit() < self.fraction;
        let mut runs = Vec::new();
        let mut pos = start;
        while pos < end {
            let mean = if data { self.data_mean } else { self.hole_mean };
            let stop = pos.saturating_add(rng.run(mean)).min(end);
            if data {
                runs.push((pos, stop));
            }
            pos = stop;
            data = !data;
        }
        runs
    }

    /// Call `f(start, end, is_data)` for consecutive byte ranges covering
    /// `[offset, end)` (clipped to the disk), until `f` returns false or
    /// `max_segments` segments have been visited.
    fn walk(
        &self,
        offset: u64,
        end: u64,
        max_segments: u64,
        mut f: impl FnMut(u64, u64, bool) -> Result<bool>,
    ) -> Result<()> {
        let end = end.min(self.size);
        if offset >= end {
            return Ok(());
        }
        if self.fraction <= 0.0 || self.fraction >= 1.0 {
            f(offset, end, self.fraction >= 1.0)?;
            return Ok(());
        }
        let seg_bytes = self.segment * BLOCK;
        let mut pos = offset;
        let mut visited = 0u64;
        while pos < end {
            let seg = pos / seg_bytes;
            let seg_end = (seg + 1).saturating_mul(seg_bytes).min(end);
            for (a, b) in self.segment_runs(seg) {
                let (a, b) = ((a * BLOCK).max(pos), (b * BLOCK).min(seg_end));
                if b <= pos {
                    continue;
                }
                if a >= seg_end {
                    break;
                }
                if a > pos && !f(pos, a, false)? {
                    return Ok(());
                }
                if !f(a, b, true)? {
                    return Ok(());
                }
                pos = b;
            }
            if pos < seg_end && !f(pos, seg_end, false)? {
                return Ok(());
            }
            pos = seg_end;
            visited += 1;
            if visited >= max_segments {
                break;
            }
        }
        Ok(())
    }

    /// The repeated byte of data block `b` (never zero).
    fn block_byte(&self, b: u64) -> u8 {
        1 + (mix(self.seed ^ b.wrapping_mul(GAMMA)) % 255) as u8
    }

    /// Fill `out` with the content of data block `b` from byte `at`.
    fn fill_block(&self, out: &mut [u8], b: u64, at: u64) {
        if !self.random_content {
            out.fill(self.block_byte(b));
            return;
        }
        // Word k of the block is mix(base + (k+1) * GAMMA): random access.
        let base = mix(self.seed.rotate_left(17) ^ b.wrapping_mul(0xd1b5_4a32_d192_ed03));
        let word = |k: u64| mix(base.wrapping_add((k + 1).wrapping_mul(GAMMA))).to_le_bytes();
        let head = ((8 - at % 8) % 8).min(out.len() as u64) as usize;
        let (first, rest) = out.split_at_mut(head);
        for (i, x) in first.iter_mut().enumerate() {
            let p = at + i as u64;
            *x = word(p / 8)[(p % 8) as usize];
        }
        let mut k = (at + head as u64) / 8;
        let mut chunks = rest.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&word(k));
            k += 1;
        }
        for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
            *x = word(k)[i];
        }
    }

    /// Fill `buf` with the data at `offset` (all of which is data).
    fn fill_data(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (b, at) = (pos / BLOCK, pos % BLOCK);
            let n = ((BLOCK - at) as usize).min(buf.len() - done);
            self.fill_block(&mut buf[done..done + n], b, at);
            done += n;
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        buf.fill(0);
        self.walk(offset, end, u64::MAX, |a, b, data| {
            if data {
                let (s, e) = ((a - offset) as usize, (b - offset) as usize);
                self.fill_data(&mut buf[s..e], a);
            }
            Ok(true)
        })
    }
}

/// The configured sparse-random plugin.
pub struct SparseRandomPlugin {
    layout: Arc<Layout>,
}

/// Build the plugin from `size=`, `seed=`, `percent=`, `runlength=` and
/// `random-content=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let size = params.take_size("size")?;
    let seed = match params.take("seed") {
        Some(s) => s
            .trim()
            .parse::<u32>()
            .map_err(|e| ConfigError::new(format!("seed: could not parse number: \"{s}\": {e}")))?,
        None => rand::random::<u32>(),
    };
    let percent = match params.take("percent") {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(v) if (0.0..=100.0).contains(&v) => v,
            _ => {
                return Err(ConfigError::new(format!(
                    "cannot parse percent parameter: {p}"
                )))
            }
        },
        None => 10.0,
    };
    let runlength = params.take_size("runlength")?.unwrap_or(16 << 20);
    if runlength == 0 {
        return Err(ConfigError::new("runlength parameter must be > 0"));
    }
    let random_content = params.take_bool("random-content")?.unwrap_or(false);
    let size = size.ok_or_else(|| ConfigError::new("sparse-random: size parameter is required"))?;
    Ok(Arc::new(SparseRandomPlugin {
        layout: Arc::new(Layout::new(size, seed, percent, runlength, random_content)),
    }))
}

#[async_trait]
impl Plugin for SparseRandomPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(SparseRandomHandle {
            layout: self.layout.clone(),
        }))
    }
}

/// A connection to the sparse-random plugin.
pub struct SparseRandomHandle {
    layout: Arc<Layout>,
}

impl SparseRandomHandle {
    /// Fail unless `[offset, offset + count)` is all holes.
    fn check_hole(&self, count: u64, offset: u64) -> Result<()> {
        let mut ok = true;
        self.layout.walk(
            offset,
            offset.saturating_add(count),
            u64::MAX,
            |_, _, data| {
                ok &= !data;
                Ok(ok)
            },
        )?;
        if ok {
            Ok(())
        } else {
            Err(Error::eio("trying to trim or zero non-hole in disk"))
        }
    }
}

#[async_trait]
impl Handle for SparseRandomHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.layout.size)
    }
    fn caps(&self) -> Result<Caps> {
        // Flush does nothing, so FUA needs nothing either.
        Ok(Caps {
            fast_zero: false,
            ..Caps::FULL
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.layout.read(buf, offset)
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut expected = Vec::new();
        let mut same = true;
        self.layout.walk(offset, end, u64::MAX, |a, b, data| {
            let got = &buf[(a - offset) as usize..(b - offset) as usize];
            same &= if data {
                expected.resize(got.len(), 0);
                self.layout.fill_data(&mut expected, a);
                expected == got
            } else {
                crate::sparse::is_zero(got)
            };
            Ok(same)
        })?;
        if same {
            Ok(())
        } else {
            Err(Error::eio("data written does not match expected"))
        }
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.check_hole(count, offset)
    }
    async fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.check_hole(count, offset)
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let req_one = flags.contains(Flags::REQ_ONE);
        self.layout.walk(
            offset,
            offset.saturating_add(count),
            MAX_SEGMENTS,
            |a, b, data| {
                ext.add(a, b - a, if data { 0 } else { HOLE_ZERO })?;
                let n = ext.list().len();
                Ok(!(req_one && n > 1) && n < MAX_EXTENTS)
            },
        )
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::protocol::errno;
    use libnbd::testing::open_plugin;
    use libnbd::Cache;

    /// All extents of `[0, size)`, fetched as a client would.
    async fn all_extents(h: &dyn Handle) -> Vec<(u64, u64, u32)> {
        let size = h.size().unwrap();
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut pos = 0;
        while pos < size {
            let mut e = Extents::new(pos, size);
            h.extents(size - pos, pos, Flags::NONE, &mut e)
                .await
                .unwrap();
            assert!(!e.list().is_empty());
            for x in e.list() {
                match out.last_mut() {
                    Some(l) if l.2 == x.flags => l.1 += x.length,
                    _ => out.push((x.offset, x.length, x.flags)),
                }
            }
            pos = e.next_offset();
        }
        out
    }

    #[tokio::test]
    async fn capabilities() {
        let h = open_plugin(&ENTRY, &["1G", "seed=1"]).await;
        assert_eq!(h.size().unwrap(), 1 << 30);
        assert!(h.caps().unwrap().write && h.caps().unwrap().flush && h.caps().unwrap().trim);
        assert!(h.caps().unwrap().zero && !h.caps().unwrap().fast_zero);
        assert!(h.caps().unwrap().extents && h.caps().unwrap().multi_conn);
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
    }

    #[tokio::test]
    async fn shape_and_content() {
        let h = open_plugin(&ENTRY, &["4G", "seed=2", "runlength=1M"]).await;
        let map = all_extents(&*h).await;
        let data: u64 = map.iter().filter(|e| e.2 == 0).map(|e| e.1).sum();
        let pct = data as f64 * 100.0 / (4u64 << 30) as f64;
        assert!((6.0..14.0).contains(&pct), "data is {pct}%");
        assert!(map.len() > 100, "{} extents", map.len());
        for &(off, len, flags) in map.iter().take(50) {
            assert_eq!(off % BLOCK, 0);
            assert_eq!(len % BLOCK, 0);
            let mut b = vec![0xEEu8; 8192.min(len as usize)];
            h.pread(&mut b, off, Flags::NONE).await.unwrap();
            if flags == 0 {
                // One non-zero byte per block.
                assert!(b[..4096].iter().all(|&x| x == b[0] && x != 0));
            } else {
                assert!(b.iter().all(|&x| x == 0));
            }
        }
        // Same seed, same disk; another seed, another disk.
        let again = open_plugin(&ENTRY, &["4G", "seed=2", "runlength=1M"]).await;
        assert_eq!(all_extents(&*again).await, map);
        let other = open_plugin(&ENTRY, &["4G", "seed=3", "runlength=1M"]).await;
        assert_ne!(all_extents(&*other).await, map);
    }

    #[tokio::test]
    async fn percent_limits() {
        let h = open_plugin(&ENTRY, &["1G", "percent=0"]).await;
        assert_eq!(all_extents(&*h).await, vec![(0, 1 << 30, HOLE_ZERO)]);
        let h = open_plugin(&ENTRY, &["1G", "percent=100"]).await;
        assert_eq!(all_extents(&*h).await, vec![(0, 1 << 30, 0)]);
        let mut b = [0u8; 16];
        h.pread(&mut b, 4090, Flags::NONE).await.unwrap();
        assert!(b.iter().all(|&x| x != 0));
    }

    #[tokio::test]
    async fn random_content_and_writes() {
        let h = open_plugin(
            &ENTRY,
            &["1G", "seed=7", "random-content=true", "percent=50"],
        )
        .await;
        let map = all_extents(&*h).await;
        let (d, dlen, _) = *map.iter().find(|e| e.2 == 0).unwrap();
        let (z, _, _) = *map.iter().find(|e| e.2 != 0).unwrap();
        let mut b = vec![0u8; 8192.min(dlen as usize)];
        h.pread(&mut b, d, Flags::NONE).await.unwrap();
        let distinct = b[..4096]
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert!(distinct > 200);
        // Unaligned reads agree with aligned ones.
        let mut part = vec![0u8; 100];
        h.pread(&mut part, d + 13, Flags::NONE).await.unwrap();
        assert_eq!(part, b[13..113]);
        // Writing what is there succeeds; anything else is EIO.
        h.pwrite(&b, d, Flags::FUA).await.unwrap();
        b[5] ^= 1;
        assert_eq!(
            h.pwrite(&b, d, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        h.pwrite(&[0u8; 4096], z, Flags::NONE).await.unwrap();
        assert_eq!(
            h.pwrite(&[1u8], z, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        // Trim and zero only work on holes.
        h.zero(4096, z, Flags::NONE).await.unwrap();
        h.trim(4096, z, Flags::NONE).await.unwrap();
        assert_eq!(
            h.zero(4096, d, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        assert_eq!(
            h.trim(1, d, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        h.flush(Flags::NONE).await.unwrap();
    }

    #[tokio::test]
    async fn odd_and_huge_sizes() {
        let h = open_plugin(&ENTRY, &["10000", "percent=100"]).await;
        assert_eq!(all_extents(&*h).await, vec![(0, 10000, 0)]);
        let mut b = [0u8; 10];
        h.pread(&mut b, 9990, Flags::NONE).await.unwrap();
        assert!(b.iter().all(|&x| x != 0));
        let size = i64::MAX as u64;
        let h = open_plugin(&ENTRY, &[&size.to_string(), "seed=9"]).await;
        let mut e = Extents::new(size - (1 << 30), size);
        h.extents(1 << 30, size - (1 << 30), Flags::NONE, &mut e)
            .await
            .unwrap();
        assert_eq!(e.next_offset(), size);
        let mut b = vec![0u8; 1 << 20];
        h.pread(&mut b, size - (1 << 20), Flags::NONE)
            .await
            .unwrap();
    }

    #[test]
    fn config_errors() {
        let err = |args: &[&str]| {
            let mut p = Params::parse(args, Some("size")).unwrap();
            ENTRY.configure(&mut p).err().expect("should fail").0
        };
        assert!(err(&[]).contains("required"));
        assert!(err(&["1G", "percent=101"]).contains("percent"));
        assert!(err(&["1G", "percent=x"]).contains("percent"));
        assert!(err(&["1G", "seed=-1"]).contains("seed"));
        assert!(err(&["1G", "seed=99999999999"]).contains("seed"));
        assert!(err(&["1G", "runlength=0"]).contains("runlength"));
        assert!(err(&["1G", "random-content=maybe"]).contains("random-content"));
        assert!(err(&["1G", "bogus=1"]).contains("bogus"));
    }
}
