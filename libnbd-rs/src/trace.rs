//! `nbdkit -v`'s lines for the calls into each layer, as upstream
//! prints them (`nbdkit: memory[1]: debug: offset: pread count=512
//! offset=0`): when tracing is on ([`set_layer_names`], which the server
//! binary calls under `-v`), [`crate::backend::Next::open`] puts a
//! [`Traced`] handle around every layer's handle, which prints each call
//! with its arguments and passes it on unchanged. Off, nothing is
//! wrapped and nothing is paid.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use async_trait::async_trait;

use crate::backend::{BlockSize, Caps, Extents, Flags, Handle, OpenContext, Result, SharedData};

/// The layers' names, outermost filter first and the plugin last, once
/// tracing is on.
static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();

/// `-D nbdkit.backend.controlpath=0` turns off the lines of the calls
/// that open and describe a connection.
static CONTROL: AtomicBool = AtomicBool::new(true);
/// `-D nbdkit.backend.datapath=0` turns off the lines of the data calls.
static DATA: AtomicBool = AtomicBool::new(true);

/// Print the control-path calls (open, size, capabilities, close)?
pub fn set_control_path(on: bool) {
    CONTROL.store(on, Ordering::Relaxed);
}

/// Print the data-path calls (pread, pwrite, zero, ...)?
pub fn set_data_path(on: bool) {
    DATA.store(on, Ordering::Relaxed);
}

/// Turn the per-call trace on, naming the stack's layers (filters from
/// the client side in, then the plugin).
pub fn set_layer_names(names: Vec<&'static str>) {
    let _ = NAMES.set(names);
}

/// The name of layer `level` (the plugin's when past the filters), if
/// tracing is on.
pub(crate) fn layer_name(level: usize) -> Option<&'static str> {
    let names = NAMES.get()?;
    names.get(level).or(names.last()).copied()
}

/// The plugin's name, which upstream puts in every connection's prefix.
fn plugin_name() -> &'static str {
    NAMES
        .get()
        .and_then(|n| n.last().copied())
        .unwrap_or("nbdkit")
}

fn flag(on: bool) -> u8 {
    u8::from(on)
}

/// A layer's handle that prints each call before passing it on.
pub struct Traced {
    layer: &'static str,
    id: u64,
    inner: Box<dyn Handle>,
}

impl Traced {
    /// Print that layer `layer` is opening for `ctx`.
    pub(crate) fn opening(layer: &'static str, ctx: &OpenContext) {
        if !CONTROL.load(Ordering::Relaxed) {
            return;
        }
        crate::elog!(
            "nbdkit: {}[{}]: debug: {layer}: open readonly={} exportname=\"{}\" tls={}",
            plugin_name(),
            ctx.id,
            flag(ctx.readonly),
            ctx.export_name,
            flag(ctx.tls)
        );
    }

    /// Wrap layer `layer`'s handle for connection `id`.
    pub(crate) fn new(layer: &'static str, id: u64, inner: Box<dyn Handle>) -> Traced {
        let t = Traced { layer, id, inner };
        let addr: *const dyn Handle = &*t.inner;
        t.log(format_args!("open returned handle {:p}", addr as *const ()));
        t
    }

    /// A control-path call.
    fn log(&self, call: std::fmt::Arguments<'_>) {
        if CONTROL.load(Ordering::Relaxed) {
            self.print(call);
        }
    }

    /// A data-path call.
    fn data(&self, call: std::fmt::Arguments<'_>) {
        if DATA.load(Ordering::Relaxed) {
            self.print(call);
        }
    }

    fn print(&self, call: std::fmt::Arguments<'_>) {
        crate::elog!(
            "nbdkit: {}[{}]: debug: {}: {call}",
            plugin_name(),
            self.id,
            self.layer
        );
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // Upstream counts close with the data path.
        self.data(format_args!("close"));
    }
}

#[async_trait]
impl Handle for Traced {
    fn next(&self) -> Option<&dyn Handle> {
        self.inner.next()
    }
    fn size(&self) -> Result<u64> {
        self.log(format_args!("get_size"));
        self.inner.size()
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.log(format_args!("block_size"));
        self.inner.block_size()
    }
    fn export_description(&self) -> Option<String> {
        self.log(format_args!("export_description"));
        self.inner.export_description()
    }
    fn caps(&self) -> Result<Caps> {
        // Upstream asks each question on its own; we ask once.
        for q in [
            "can_write",
            "can_zero",
            "can_fast_zero",
            "can_trim",
            "can_fua",
            "can_flush",
            "is_rotational",
            "can_multi_conn",
            "can_cache",
            "can_extents",
        ] {
            self.log(format_args!("{q}"));
        }
        self.inner.caps()
    }
    async fn pread_shared(
        &self,
        count: u32,
        offset: u64,
        flags: Flags,
    ) -> Result<Option<SharedData>> {
        self.inner.pread_shared(count, offset, flags).await
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.data(format_args!("pread count={} offset={offset}", buf.len()));
        self.inner.pread(buf, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.data(format_args!(
            "pwrite count={} offset={offset} fua={}",
            buf.len(),
            flag(flags.contains(Flags::FUA))
        ));
        self.inner.pwrite(buf, offset, flags).await
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        self.data(format_args!("flush"));
        self.inner.flush(flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.data(format_args!(
            "trim count={count} offset={offset} fua={}",
            flag(flags.contains(Flags::FUA))
        ));
        self.inner.trim(count, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.data(format_args!(
            "zero count={count} offset={offset} may_trim={} fua={} fast={}",
            flag(flags.contains(Flags::MAY_TRIM)),
            flag(flags.contains(Flags::FUA)),
            flag(flags.contains(Flags::FAST_ZERO))
        ));
        self.inner.zero(count, offset, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.data(format_args!(
            "extents count={count} offset={offset} req_one={}",
            flag(flags.contains(Flags::REQ_ONE))
        ));
        self.inner.extents(count, offset, flags, ext).await
    }
    async fn meta_extents(
        &self,
        context: &str,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.data(format_args!(
            "extents context={context} count={count} offset={offset} req_one={}",
            flag(flags.contains(Flags::REQ_ONE))
        ));
        self.inner
            .meta_extents(context, count, offset, flags, ext)
            .await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.data(format_args!("cache count={count} offset={offset}"));
        self.inner.cache(count, offset, flags).await
    }
}
