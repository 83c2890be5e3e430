//! # nozero: turn off or change efficient zeroing
//!
//! It disables or alters `NBD_CMD_WRITE_ZEROES` between the client and
//! the plugin, to compare a naive client with a sparse-aware one or to
//! test fallbacks in clients and servers.
//!
//! ```text
//! nbdkit --filter=nozero file disk.img
//! nbdkit --filter=nozero file disk.img zeromode=emulate
//! nbdkit --filter=nozero file disk.img zeromode=plugin fastzeromode=none
//! ```
//!
//! ## Parameters
//!
//! - `zeromode=none` (default): zero support is not advertised; clients
//!   must write zeroes like any other data.
//! - `zeromode=emulate`: zero support is advertised but every zero request
//!   is done by writing zeroes to the layer below, whatever it supports.
//! - `zeromode=notrim`: zero requests go to the layer below without the
//!   may-trim flag (the client's `NO_HOLE` is forced on).
//! - `zeromode=plugin`: zero requests go to the layer below unchanged
//!   (useful with `fastzeromode`).
//! - `fastzeromode=default` (default): with `emulate`, fast zeroes are
//!   advertised and always fail at once with ENOTSUP; with `notrim` or
//!   `plugin`, fast zero support is what the layer below says.
//! - `fastzeromode=none`: fast zero support is not advertised.
//! - `fastzeromode=slow`: fast zeroes are advertised but always fail at
//!   once with ENOTSUP.
//! - `fastzeromode=ignore` (unsafe): fast zeroes are advertised and done
//!   as ordinary zeroes, which may be slow, against the NBD spec.
//!
//! nbdkit refuses `notrim` and `plugin` when the plugin has no zero
//! callback; here the server always offers zero to filters (emulating it
//! with writes when the plugin cannot), so those modes are always
//! accepted. With `emulate`, nbdkit's server writes the zeroes above the
//! filters; this filter writes them itself, so a log filter above it sees
//! `Zero` requests and one below sees `Write`s.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "nozero",
    help: "\
zeromode=<MODE>      One of 'none' (default), 'emulate', 'notrim', 'plugin'.
fastzeromode=<MODE>  One of 'default', 'none', 'slow', 'ignore'.",
    create,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    None,
    Emulate,
    NoTrim,
    Plugin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FastMode {
    Default,
    None,
    Slow,
    Ignore,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let zero = match p.take("zeromode").as_deref() {
        None | Some("none") => ZeroMode::None,
        Some("emulate") => ZeroMode::Emulate,
        Some("notrim") => ZeroMode::NoTrim,
        Some("plugin") => ZeroMode::Plugin,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown zeromode '{v}' (none, emulate, notrim or plugin)"
            )))
        }
    };
    let fast = match p.take("fastzeromode").as_deref() {
        None | Some("default") => FastMode::Default,
        Some("none") => FastMode::None,
        Some("slow") => FastMode::Slow,
        Some("ignore") => FastMode::Ignore,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown fastzeromode '{v}' (default, none, slow or ignore)"
            )))
        }
    };
    Ok(Arc::new(NoZero { zero, fast }))
}

#[derive(Clone, Copy)]
struct NoZero {
    zero: ZeroMode,
    fast: FastMode,
}

#[async_trait]
impl Filter for NoZero {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NoZeroHandle {
            next: next.open(ctx).await?,
            mode: *self,
        }))
    }
}

struct NoZeroHandle {
    next: Box<dyn Handle>,
    mode: NoZero,
}

/// Zeroes written at a time when emulating.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

#[async_trait]
impl Handle for NoZeroHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        let next = self.next.caps()?;
        let zero = match self.mode.zero {
            ZeroMode::None => false,
            ZeroMode::Emulate => next.write,
            ZeroMode::NoTrim | ZeroMode::Plugin => next.zero,
        };
        let fast_zero = match (self.mode.zero, self.mode.fast) {
            (ZeroMode::None, _) | (_, FastMode::None) => false,
            (_, FastMode::Slow | FastMode::Ignore) | (ZeroMode::Emulate, FastMode::Default) => true,
            (_, FastMode::Default) => next.fast_zero,
        };
        Ok(Caps {
            zero,
            fast_zero,
            ..next
        })
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let mut flags = flags;
        if flags.contains(Flags::FAST_ZERO) {
            match (self.mode.zero, self.mode.fast) {
                (_, FastMode::Ignore) => flags = flags.without(Flags::FAST_ZERO),
                (ZeroMode::NoTrim | ZeroMode::Plugin, FastMode::Default) => {}
                _ => return Err(Error::enotsup("nozero: fast zero is not supported")),
            }
        }
        match self.mode.zero {
            ZeroMode::Plugin => self.next.zero(count, offset, flags).await,
            ZeroMode::NoTrim => {
                self.next
                    .zero(count, offset, flags.without(Flags::MAY_TRIM))
                    .await
            }
            ZeroMode::None | ZeroMode::Emulate => {
                let flags = if flags.contains(Flags::FUA) {
                    Flags::FUA
                } else {
                    Flags::NONE
                };
                let mut done = 0u64;
                while done < count {
                    let n = (count - done).min(ZEROES.len() as u64) as usize;
                    self.next.pwrite(&ZEROES[..n], offset + done, flags).await?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offset::testing::*;

    async fn open(words: &[&str]) -> (Box<dyn Handle>, Arc<Mem>) {
        let mem = Mem::with(vec![1; 4096]);
        let s = stack(vec![create(&mut params(words)).unwrap()], &mem);
        (s.open(&ctx(1)).await.unwrap(), mem)
    }

    #[tokio::test]
    async fn nozero_modes_advertise() {
        for (words, zero, fast) in [
            (&[][..], false, false),
            (&["zeromode=emulate"][..], true, true),
            (&["zeromode=emulate", "fastzeromode=none"][..], true, false),
            (&["zeromode=plugin"][..], true, true),
            (&["zeromode=notrim", "fastzeromode=none"][..], true, false),
            (&["zeromode=plugin", "fastzeromode=slow"][..], true, true),
            (&["fastzeromode=ignore"][..], false, false),
        ] {
            let (h, _) = open(words).await;
            assert_eq!(h.caps().unwrap().zero, zero, "{words:?}");
            assert_eq!(h.caps().unwrap().fast_zero, fast, "{words:?}");
        }
        assert!(create(&mut params(&["zeromode=x"])).is_err());
        assert!(create(&mut params(&["fastzeromode=fast"])).is_err());
    }

    #[tokio::test]
    async fn nozero_emulate_writes_zeroes() {
        let (h, mem) = open(&["zeromode=emulate"]).await;
        h.zero(1024, 512, Flags::MAY_TRIM | Flags::FUA)
            .await
            .unwrap();
        assert_eq!(mem.take_calls(), vec!["pwrite 512 1024 fua"]);
        assert_eq!(read(&*h, 0, 2048).await.unwrap()[512..1536], [0; 1024]);
        let e = h.zero(512, 0, Flags::FAST_ZERO).await.unwrap_err();
        assert_eq!(e.errno, libnbd::protocol::errno::ENOTSUP);
    }

    #[tokio::test]
    async fn nozero_notrim_plugin_and_fast_modes() {
        let (h, mem) = open(&["zeromode=notrim"]).await;
        h.zero(512, 0, Flags::MAY_TRIM | Flags::FAST_ZERO)
            .await
            .unwrap();
        assert_eq!(mem.take_calls(), vec!["zero 0 512 fast"]);
        let (h, mem) = open(&["zeromode=plugin"]).await;
        h.zero(512, 0, Flags::MAY_TRIM).await.unwrap();
        assert_eq!(mem.take_calls(), vec!["zero 0 512 may_trim"]);
        let (h, mem) = open(&["zeromode=plugin", "fastzeromode=slow"]).await;
        assert!(h.zero(512, 0, Flags::FAST_ZERO).await.is_err());
        assert!(mem.take_calls().is_empty());
        let (h, mem) = open(&["zeromode=plugin", "fastzeromode=ignore"]).await;
        h.zero(512, 0, Flags::FAST_ZERO).await.unwrap();
        assert_eq!(mem.take_calls(), vec!["zero 0 512"]);
    }
}
