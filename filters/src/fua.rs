//! # fua: change how Forced Unit Access and flush are handled
//!
//! FUA asks that a write be on stable storage before it is acknowledged.
//! This filter can turn FUA and flush off for speed (unsafe), emulate FUA
//! with a flush, force it on every write, or compare the two approaches.
//! Note that FUA on one connection is only guaranteed to be visible to
//! others when the server advertises multi-conn.
//!
//! ```text
//! nbdkit --filter=fua file disk.img                   # clients must flush
//! nbdkit --filter=fua file disk.img fuamode=discard   # unsafe, fast
//! nbdkit --filter=fua file disk.img fuamode=force     # write-through
//! ```
//!
//! ## Parameters
//!
//! `fuamode=MODE`:
//!
//! - `none` (default): FUA is not advertised; clients can still flush if
//!   the plugin can.
//! - `emulate`: FUA is advertised and done by flushing after the write,
//!   whatever the plugin supports. Connections fail if the plugin cannot
//!   flush.
//! - `native`: FUA is advertised as native and passed down, so that
//!   filters above optimise for it. Connections fail if the plugin has no
//!   FUA support at all.
//! - `force`: every write, trim and zero is sent down with FUA
//!   (write-through) and client flushes do nothing. Connections fail if
//!   the plugin has no FUA support.
//! - `pass`: FUA and flush pass through unchanged (the filter does
//!   nothing).
//! - `discard` (unsafe): FUA and flush requests are accepted and dropped.
//!   Data will be lost in a crash; use it only for data you can recreate.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigError, ConfigResult, Error, Filter, FilterEntry, Flags, Fua, Handle, Next,
    OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "fua",
    help: "\
fuamode=<MODE>       One of 'none' (default), 'emulate', 'native',
                       'force', 'pass', 'discard'.",
    create,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Emulate,
    Native,
    Force,
    Pass,
    Discard,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mode = match p.take("fuamode").as_deref() {
        None | Some("none") => Mode::None,
        Some("emulate") => Mode::Emulate,
        Some("native") => Mode::Native,
        Some("force") => Mode::Force,
        Some("pass") => Mode::Pass,
        Some("discard") => Mode::Discard,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unknown fuamode '{v}' (none, emulate, native, force, pass or discard)"
            )))
        }
    };
    Ok(Arc::new(FuaFilter { mode }))
}

struct FuaFilter {
    mode: Mode,
}

#[async_trait]
impl Filter for FuaFilter {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let h = next.open(ctx).await?;
        let below = h.caps()?;
        let writable = !ctx.readonly && below.write;
        match self.mode {
            Mode::Emulate if writable && !below.flush => {
                return Err(Error::einval(
                    "fua: fuamode=emulate needs a plugin that supports flush",
                ))
            }
            Mode::Native | Mode::Force if writable && below.fua == Fua::None => {
                return Err(Error::einval(format!(
                    "fua: fuamode={} needs a plugin with FUA support",
                    if self.mode == Mode::Native {
                        "native"
                    } else {
                        "force"
                    }
                )))
            }
            _ => {}
        }
        Ok(Box::new(FuaHandle {
            next: h,
            mode: self.mode,
        }))
    }
}

struct FuaHandle {
    next: Box<dyn Handle>,
    mode: Mode,
}

impl FuaHandle {
    /// The flags to pass down, and whether to flush afterwards.
    fn adjust(&self, flags: Flags) -> (Flags, bool) {
        let fua = flags.contains(Flags::FUA);
        match self.mode {
            Mode::Pass | Mode::Native => (flags, false),
            Mode::Force => (flags | Flags::FUA, false),
            Mode::Discard => (flags.without(Flags::FUA), false),
            // FUA is not advertised in `none`; should a filter above send
            // it anyway, honour it the safe way.
            Mode::Emulate | Mode::None => (flags.without(Flags::FUA), fua),
        }
    }
}

#[async_trait]
impl Handle for FuaHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn caps(&self) -> Result<Caps> {
        let next = self.next.caps()?;
        let fua = match self.mode {
            Mode::None => Fua::None,
            Mode::Emulate => Fua::Emulate,
            Mode::Native | Mode::Force | Mode::Discard => Fua::Native,
            Mode::Pass => next.fua,
        };
        let flush = self.mode == Mode::Discard || next.flush;
        Ok(Caps { fua, flush, ..next })
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        match self.mode {
            Mode::Force | Mode::Discard => Ok(()),
            _ => self.next.flush(flags).await,
        }
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let (f, flush) = self.adjust(flags);
        self.next.pwrite(buf, offset, f).await?;
        if flush {
            self.next.flush(Flags::NONE).await?;
        }
        Ok(())
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let (f, flush) = self.adjust(flags);
        self.next.trim(count, offset, f).await?;
        if flush {
            self.next.flush(Flags::NONE).await?;
        }
        Ok(())
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let (f, flush) = self.adjust(flags);
        self.next.zero(count, offset, f).await?;
        if flush {
            self.next.flush(Flags::NONE).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    async fn open(mode: &str) -> (Box<dyn Handle>, Arc<Mem>) {
        let mem = Mem::new(4096);
        let s = stack(
            vec![create(&mut params(&[&format!("fuamode={mode}")])).unwrap()],
            &mem,
        );
        (s.open(&ctx(1)).await.unwrap(), mem)
    }

    async fn calls(mode: &str) -> (Fua, bool, Vec<String>) {
        let (h, mem) = open(mode).await;
        h.pwrite(&[1; 512], 0, Flags::FUA).await.unwrap();
        h.pwrite(&[1; 512], 0, Flags::NONE).await.unwrap();
        h.zero(512, 0, Flags::FUA).await.unwrap();
        h.trim(512, 0, Flags::FUA).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        (
            h.caps().unwrap().fua,
            h.caps().unwrap().flush,
            mem.take_calls(),
        )
    }

    #[tokio::test]
    async fn fua_modes() {
        let (fua, flush, c) = calls("emulate").await;
        assert_eq!((fua, flush), (Fua::Emulate, true));
        assert_eq!(
            c,
            [
                "pwrite 0 512",
                "flush",
                "pwrite 0 512",
                "zero 0 512",
                "flush",
                "trim 0 512",
                "flush",
                "flush"
            ]
        );
        let (fua, _, c) = calls("native").await;
        assert_eq!(fua, Fua::Native);
        assert_eq!(
            c,
            [
                "pwrite 0 512 fua",
                "pwrite 0 512",
                "zero 0 512 fua",
                "trim 0 512 fua",
                "flush"
            ]
        );
        let (fua, _, c) = calls("force").await;
        assert_eq!(fua, Fua::Native);
        assert_eq!(
            c,
            [
                "pwrite 0 512 fua",
                "pwrite 0 512 fua",
                "zero 0 512 fua",
                "trim 0 512 fua"
            ]
        );
        let (fua, flush, c) = calls("discard").await;
        assert_eq!((fua, flush), (Fua::Native, true));
        assert_eq!(
            c,
            ["pwrite 0 512", "pwrite 0 512", "zero 0 512", "trim 0 512"]
        );
        let (fua, _, c) = calls("pass").await;
        assert_eq!(fua, Fua::Native);
        assert_eq!(
            c,
            [
                "pwrite 0 512 fua",
                "pwrite 0 512",
                "zero 0 512 fua",
                "trim 0 512 fua",
                "flush"
            ]
        );
        let (h, _) = open("none").await;
        assert_eq!(h.caps().unwrap().fua, Fua::None);
        assert!(h.caps().unwrap().flush);
        assert!(create(&mut params(&["fuamode=fast"])).is_err());
    }
}
