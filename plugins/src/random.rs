//! # random: a non-sparse disk of random data
//!
//! Serves a disk whose every byte is pseudo-random, computed from the
//! seed and its offset alone, so any part of the disk can be read in any
//! order and the same seed gives the same disk on every run. For a
//! sparse random disk see the `sparse-random` plugin. The data is not
//! cryptographically random.
//!
//! ```text
//! nbdkit random 1G
//! nbdkit -U - random size=100M seed=42 --run 'nbdcopy "$uri" "$uri"'
//! ```
//!
//! ## Parameters
//!
//! - `[size=]SIZE`: the virtual size, up to 2^63-1 bytes (nbdkit's
//!   manual calls it required, but nbdkit 1.32 serves an empty disk
//!   without it, and so do we).
//! - `seed=SEED`: a 32-bit unsigned seed (decimal, `0x` hexadecimal or
//!   `0` octal, as C's `strtoul`); the same seed gives the same data. By
//!   default a random seed is chosen.
//!
//! ## Behaviour
//!
//! The byte at offset `o` is the low byte of the third output of
//! xoshiro256** seeded (through splitmix64) with `seed + o`, which is the
//! same data as nbdkit 1.32 serves for the same seed.
//!
//! Writable, to test copying tools with the same disk as source and
//! destination: a write succeeds only if it writes exactly what a read
//! returns, else it fails with `EIO`. Trim and zero are advertised but
//! always fail with `EIO` (the disk has no holes); fast zero, flush, FUA
//! and extents are not advertised (everything is data); cache is a
//! no-op; multi-conn is safe.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Error, Flags, Fua, Handle, OpenContext, Params, Plugin,
    PluginEntry, Result,
};

/// The registry entry of the random plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "random",
    help: "size=<SIZE>  (required) Size of the backing disk\n\
           seed=<SEED>             Random number generator seed",
    magic: Some("size"),
    create,
};

/// The byte of the disk at `pos`, where `pos` is the seed plus the offset.
fn byte_at(pos: u64) -> u8 {
    // splitmix64 fills the four words of the xoshiro256** state ...
    let mut sm = pos;
    let mut s = [0u64; 4];
    for w in &mut s {
        sm = sm.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = sm;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        *w = z ^ (z >> 31);
    }
    // ... whose third output gives the byte.
    let mut out = 0;
    for _ in 0..3 {
        out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
    }
    out as u8
}

/// Parse an unsigned 32-bit number as nbdkit does (`strtoul`, base 0).
fn parse_seed(v: &str) -> ConfigResult<u32> {
    let t = v.trim_start();
    if t.starts_with('-') {
        return Err(ConfigError::new("seed: negative numbers are not allowed"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return Err(ConfigError::new(
            "seed: empty string where we expected a number",
        ));
    }
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end < digits.len() {
        return Err(ConfigError::new(format!(
            "seed: could not parse number: \"{v}\": trailing garbage"
        )));
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            ConfigError::new(format!(
                "seed: could not parse number: \"{v}\": Numerical result out of range"
            ))
        })
}

/// The configured random plugin.
pub struct RandomPlugin {
    size: u64,
    seed: u32,
}

/// Build the plugin from `size=` (default 0) and `seed=`.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let size = params.take_size("size")?.unwrap_or(0);
    let seed = match params.take("seed") {
        Some(s) => parse_seed(&s)?,
        None => rand::random::<u32>(),
    };
    Ok(Arc::new(RandomPlugin { size, seed }))
}

#[async_trait]
impl Plugin for RandomPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(RandomHandle {
            size: self.size,
            seed: self.seed,
        }))
    }
}

/// A connection to the random plugin.
pub struct RandomHandle {
    size: u64,
    seed: u32,
}

impl RandomHandle {
    fn fill(&self, buf: &mut [u8], offset: u64) {
        let base = (self.seed as u64).wrapping_add(offset);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte_at(base.wrapping_add(i as u64));
        }
    }
}

#[async_trait]
impl Handle for RandomHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: true,
            trim: true,
            zero: true,
            multi_conn: true,
            fua: Fua::None,
            cache: Cache::Native,
            ..Caps::READ_ONLY
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.fill(buf, offset);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        let mut expected = vec![0u8; buf.len()];
        self.fill(&mut expected, offset);
        if expected != buf {
            return Err(Error::eio("data written does not match expected"));
        }
        Ok(())
    }
    async fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eio("attempt to trim or zero non-sparse random disk"))
    }
    async fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::eio("attempt to trim or zero non-sparse random disk"))
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::testing::open_plugin;

    #[tokio::test]
    async fn same_bytes_as_nbdkit() {
        // `nbdkit random 1M seed=1`, read at 0 and at 512 by nbdsh.
        let h = open_plugin(&ENTRY, &["1M", "seed=1"]).await;
        let mut b = [0u8; 16];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert_eq!(b[..8], [0x14, 0x05, 0x51, 0x7e, 0xae, 0x48, 0x96, 0x06]);
        h.pread(&mut b, 512, Flags::NONE).await.unwrap();
        assert_eq!(b[..4], [0x3d, 0xf9, 0x02, 0x99]);
        // The seed shifts the data: seed 8 at 0 is seed 1 at 7.
        let h8 = open_plugin(&ENTRY, &["1M", "seed=010"]).await;
        let mut c = [0u8; 4];
        h8.pread(&mut c, 0, Flags::NONE).await.unwrap();
        assert_eq!(c, [0x06, 0x17, 0x72, 0xad]);
    }

    #[tokio::test]
    async fn writes_must_match() {
        let h = open_plugin(&ENTRY, &["size=4096", "seed=7"]).await;
        let mut b = vec![0u8; 1000];
        h.pread(&mut b, 100, Flags::NONE).await.unwrap();
        h.pwrite(&b, 100, Flags::NONE).await.unwrap();
        b[999] ^= 1;
        assert_eq!(
            h.pwrite(&b, 100, Flags::NONE).await.unwrap_err().errno,
            libnbd::protocol::errno::EIO
        );
        assert!(h.zero(10, 0, Flags::NONE).await.is_err());
        assert!(h.trim(10, 0, Flags::NONE).await.is_err());
        let c = h.caps().unwrap();
        assert!(c.write && c.zero && c.trim && c.multi_conn && !c.fast_zero && !c.flush);
    }

    #[test]
    fn seeds() {
        assert_eq!(parse_seed("0x10").unwrap(), 16);
        assert_eq!(parse_seed(" +5").unwrap(), 5);
        assert_eq!(parse_seed("0").unwrap(), 0);
        assert_eq!(parse_seed("4294967295").unwrap(), u32::MAX);
        for bad in ["", "-1", "-0", "1x", "08", "4294967296"] {
            assert!(parse_seed(bad).is_err(), "{bad}");
        }
    }
}
