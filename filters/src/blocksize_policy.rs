//! # blocksize-policy: advertise block size constraints and enforce them
//!
//! Sets the minimum, preferred and maximum block size that clients are
//! told (`NBD_INFO_BLOCK_SIZE`), for plugins that advertise none or the
//! wrong ones, and chooses what happens to requests that do not obey
//! them: passed on (the default, as nbdkit does) or refused with EINVAL
//! before the layers below see them.
//!
//! ```text
//! nbdkit --filter=blocksize-policy memory 1G blocksize-preferred=32K
//! nbdkit --filter=blocksize-policy --filter=blocksize memory 1G \
//!        blocksize-error-policy=allow blocksize-minimum=64K minblock=64K
//! nbdkit --filter=blocksize-policy memory 1G blocksize-write-disconnect=32M
//! ```
//!
//! ## Parameters
//!
//! - `blocksize-minimum=N`, `blocksize-preferred=N`, `blocksize-maximum=N`:
//!   the constraints to advertise (sizes such as `4K`). One left out is
//!   the layer below's, or if it advertises none, 1, 4096 and 4G-1. The
//!   minimum is a power of 2 up to 64K, the preferred a power of 2 from
//!   512 to 32M, and minimum <= preferred <= maximum.
//! - `blocksize-error-policy=allow` (default): requests that break the
//!   constraints go to the layers below, which may fail them or cope;
//!   `blocksize-error-policy=error`: they fail with EINVAL here.
//! - `blocksize-write-disconnect=N`: a client that sends a write larger
//!   than `N` bytes is disconnected at once, without a reply, as qemu-nbd
//!   does beyond 32M (nbdkit >= 1.34). This is independent of the
//!   maximum and of the error policy.
//!
//! ## Behaviour
//!
//! With `error`, a request is refused when its length is below the
//! minimum or not a multiple of it, when its offset is not a multiple of
//! the minimum, or (reads and writes) when its length is above the
//! maximum; so is a short request for the unaligned tail of an export.
//! Flush requests are never checked. Without any constraint set and none
//! from the layer below, nothing is advertised. Placed before the
//! blocksize filter, this one says what clients should send and that one
//! makes what they do send fit the plugin.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    BlockSize, ConfigError, ConfigResult, Disconnect, Error, Extents, Filter, FilterEntry, Flags,
    Handle, Next, OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "blocksize-policy",
    help: "\
blocksize-error-policy=allow|error  What to do with requests that break the constraints.
blocksize-minimum=<N>               Minimum block size to advertise.
blocksize-preferred=<N>             Preferred block size to advertise.
blocksize-maximum=<N>               Maximum block size to advertise.
blocksize-write-disconnect=<N>      Disconnect a client writing more than N bytes.",
    create,
};

/// What the user set (0: not set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Config {
    error: bool,
    minimum: u32,
    preferred: u32,
    maximum: u32,
    disconnect: u32,
}

fn size32(p: &mut Params, key: &str) -> ConfigResult<u32> {
    match p.take(key) {
        None => Ok(0),
        Some(v) => libnbd::parse_size(&v)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ConfigError::new(format!("{key}: could not parse {v}"))),
    }
}

fn configure(p: &mut Params) -> ConfigResult<Config> {
    let error = match p.take("blocksize-error-policy").as_deref() {
        None | Some("allow") => false,
        Some("error") => true,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown blocksize-error-policy: {v}"
            )))
        }
    };
    let c = Config {
        error,
        minimum: size32(p, "blocksize-minimum")?,
        preferred: size32(p, "blocksize-preferred")?,
        maximum: size32(p, "blocksize-maximum")?,
        disconnect: size32(p, "blocksize-write-disconnect")?,
    };
    let fail = |m: &str| Err(ConfigError::new(m));
    if c.minimum != 0 {
        if !c.minimum.is_power_of_two() {
            return fail("blocksize-minimum must be a power of 2");
        }
        if c.minimum > 65536 {
            return fail("blocksize-minimum must be <= 64K");
        }
    }
    if c.preferred != 0 {
        if !c.preferred.is_power_of_two() {
            return fail("blocksize-preferred must be a power of 2");
        }
        if !(512..=32 << 20).contains(&c.preferred) {
            return fail("blocksize-preferred must be between 512 and 32M");
        }
    }
    if c.minimum != 0 && c.preferred != 0 && c.minimum > c.preferred {
        return fail("blocksize-minimum must be <= blocksize-preferred");
    }
    if c.preferred != 0 && c.maximum != 0 && c.preferred > c.maximum {
        return fail("blocksize-preferred must be <= blocksize-maximum");
    }
    Ok(c)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(Policy(configure(p)?)))
}

struct Policy(Config);

/// The constraints in force: the user's over the layer below's over the
/// defaults; `None` if neither gave any.
fn compute(c: &Config, below: Option<BlockSize>) -> Result<Option<BlockSize>> {
    let set = c.minimum != 0 || c.preferred != 0 || c.maximum != 0;
    if !set && below.is_none() {
        return Ok(None);
    }
    let base = below.unwrap_or(BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: u32::MAX,
    });
    let pick = |mine: u32, theirs: u32| if mine != 0 { mine } else { theirs };
    let b = BlockSize {
        minimum: pick(c.minimum, base.minimum),
        preferred: pick(c.preferred, base.preferred),
        maximum: pick(c.maximum, base.maximum),
    };
    if b.minimum > b.preferred || b.preferred > b.maximum {
        return Err(Error::einval(format!(
            "computed block size values are invalid, minimum {} > preferred {} or preferred > maximum {}",
            b.minimum, b.preferred, b.maximum
        )));
    }
    Ok(Some(b))
}

#[async_trait]
impl Filter for Policy {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = next.open(ctx).await?;
        let block = compute(&self.0, next.block_size()?).inspect_err(|e| {
            libnbd::elog!("nbdkit: blocksize-policy[{}]: error: {}", ctx.id, e.msg);
        })?;
        Ok(Box::new(PolicyHandle {
            next,
            cfg: self.0,
            block,
            disconnect: ctx.disconnect.clone(),
        }))
    }
}

struct PolicyHandle {
    next: Box<dyn Handle>,
    cfg: Config,
    /// What is advertised (and, with `error`, enforced).
    block: Option<BlockSize>,
    /// This connection's switch, for `blocksize-write-disconnect`.
    disconnect: Disconnect,
}

impl PolicyHandle {
    /// With the `error` policy, refuse a request that breaks the
    /// constraints. `data`: a read or write (checked against the maximum).
    fn check(&self, op: &str, count: u64, offset: u64, data: bool) -> Result<()> {
        let (true, Some(b)) = (self.cfg.error, self.block) else {
            return Ok(());
        };
        let min = b.minimum as u64;
        let why = if count < min {
            format!("count {count} is smaller than minimum size {min}")
        } else if !offset.is_multiple_of(min) {
            format!("offset {offset} is not aligned to a multiple of minimum size {min}")
        } else if data && count > b.maximum as u64 {
            format!("count {count} is larger than maximum size {}", b.maximum)
        } else if !count.is_multiple_of(min) {
            format!("count {count} is not a multiple of minimum size {min}")
        } else {
            return Ok(());
        };
        Err(Error::einval(format!(
            "client {op} request rejected: {why}"
        )))
    }
}

#[async_trait]
impl Handle for PolicyHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.block)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.check("pread", buf.len() as u64, offset, true)?;
        self.next.pread(buf, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let limit = self.cfg.disconnect;
        if limit != 0 && buf.len() as u64 > limit as u64 {
            let msg = format!(
                "blocksize-policy: disconnecting client due to oversize write request ({} > {limit})",
                buf.len()
            );
            libnbd::elog!("nbdkit: {msg}");
            self.disconnect.request();
            return Err(Error::eio(msg));
        }
        self.check("pwrite", buf.len() as u64, offset, true)?;
        self.next.pwrite(buf, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("zero", count, offset, false)?;
        self.next.zero(count, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("trim", count, offset, false)?;
        self.next.trim(count, offset, flags).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("cache", count, offset, false)?;
        self.next.cache(count, offset, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.check("extents", count, offset, false)?;
        self.next.extents(count, offset, flags, ext).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use libnbd::protocol::errno;

    fn bs(minimum: u32, preferred: u32, maximum: u32) -> Option<BlockSize> {
        Some(BlockSize {
            minimum,
            preferred,
            maximum,
        })
    }

    fn cfg(words: &[&str]) -> ConfigResult<Config> {
        configure(&mut params(words))
    }

    #[test]
    fn blocksize_policy_computes_constraints() {
        let c = cfg(&[]).unwrap();
        assert_eq!(compute(&c, None).unwrap(), None);
        assert_eq!(compute(&c, bs(2, 512, 1024)).unwrap(), bs(2, 512, 1024));
        let c = cfg(&["blocksize-preferred=64K"]).unwrap();
        assert_eq!(compute(&c, None).unwrap(), bs(1, 65536, u32::MAX));
        let c = cfg(&["blocksize-minimum=4K"]).unwrap();
        assert_eq!(compute(&c, None).unwrap(), bs(4096, 4096, u32::MAX));
        let c = cfg(&["blocksize-maximum=64K"]).unwrap();
        assert_eq!(
            compute(&c, bs(8, 512, u32::MAX)).unwrap(),
            bs(8, 512, 65536)
        );
        for bad in [&["blocksize-minimum=8K"][..], &["blocksize-maximum=2048"]] {
            let e = compute(&cfg(bad).unwrap(), None).unwrap_err();
            assert!(
                e.msg.contains("computed block size values are invalid"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn blocksize_policy_config_errors() {
        for (bad, msg) in [
            ("blocksize-minimum=3", "power of 2"),
            ("blocksize-minimum=128K", "<= 64K"),
            ("blocksize-preferred=3000", "power of 2"),
            ("blocksize-preferred=64M", "between 512 and 32M"),
            ("blocksize-preferred=256", "between 512 and 32M"),
            ("blocksize-maximum=8G", "could not parse 8G"),
            ("blocksize-write-disconnect=-1", "could not parse"),
            (
                "blocksize-error-policy=foo",
                "unknown blocksize-error-policy",
            ),
        ] {
            let e = cfg(&[bad]).unwrap_err();
            assert!(e.0.contains(msg), "{bad}: {}", e.0);
        }
        let e = cfg(&["blocksize-minimum=4096", "blocksize-preferred=1024"]).unwrap_err();
        assert!(e.0.contains("minimum must be <= blocksize-preferred"));
        let e = cfg(&["blocksize-maximum=1024", "blocksize-preferred=4096"]).unwrap_err();
        assert!(e.0.contains("preferred must be <= blocksize-maximum"));
        assert_eq!(
            cfg(&["blocksize-maximum=4294967295"]).unwrap().maximum,
            u32::MAX
        );
    }

    #[tokio::test]
    async fn blocksize_policy_error_refuses_before_the_plugin() {
        let mem = Mem::new(1 << 20);
        let words = [
            "blocksize-error-policy=error",
            "blocksize-minimum=512",
            "blocksize-maximum=64K",
        ];
        let s = stack(vec![create(&mut params(&words)).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        assert_eq!(h.block_size().unwrap(), bs(512, 4096, 65536));
        for (what, r) in [
            ("smaller", try_read(&*h, 0, 100).await),
            ("aligned", try_read(&*h, 100, 512).await),
            ("larger", try_read(&*h, 0, 128 << 10).await),
            ("multiple", try_read(&*h, 0, 768).await),
        ] {
            let e = r.unwrap_err();
            assert_eq!(e.errno, errno::EINVAL);
            assert!(e.msg.contains(what), "{what}: {}", e.msg);
        }
        assert!(h.zero(512, 1, Flags::NONE).await.is_err());
        assert!(try_extents(&*h, 0, 100).await.is_err());
        assert!(mem.take_calls().is_empty(), "the plugin saw nothing");
        read(&*h, 0, 512).await;
        // Only reads and writes have a maximum.
        h.zero(128 << 10, 0, Flags::NONE).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        // allow (the default) passes everything on.
        let s = stack(vec![create(&mut params(&words[1..])).unwrap()], &mem);
        let h = s.open(&ctx(2)).await.unwrap();
        read(&*h, 1, 100).await;
    }

    #[tokio::test]
    async fn blocksize_policy_write_disconnect() {
        let mem = Mem::new(1 << 20);
        let s = stack(
            vec![create(&mut params(&["blocksize-write-disconnect=4K"])).unwrap()],
            &mem,
        );
        let c = ctx(1);
        let h = s.open(&c).await.unwrap();
        h.pwrite(&[1; 4096], 0, Flags::NONE).await.unwrap();
        assert!(!c.disconnect.is_requested());
        assert!(h.pwrite(&[1; 4097], 0, Flags::NONE).await.is_err());
        assert!(c.disconnect.is_requested());
        assert_eq!(mem.take_calls(), vec!["pwrite 0 4096"]);
    }
}
