//! The test kit of every filter's unit tests: an in-memory plugin that
//! logs the calls it gets (as typed [`Op`]s and as `"pwrite 0 512 fua"`
//! strings), with knobs to make it slow, strict or failing, and helpers
//! to stack filters over it and read through them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    BlockSize, Cache, Caps, Error, Extents, Filter, Flags, Fua, Handle, OpenContext, Params,
    Plugin, Result, Stack,
};

/// A request that reached the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Read(u64, u64),
    Write(u64, u64),
    Zero(u64, u64),
    Trim(u64, u64),
    Flush,
    Cache(u64, u64),
    Extents(u64, u64),
}

/// The plugin's request log.
#[derive(Default)]
pub(crate) struct Log(Mutex<Vec<Op>>);

impl Log {
    pub(crate) fn ops(&self) -> Vec<Op> {
        self.0.lock().unwrap().clone()
    }
    pub(crate) fn clear(&self) {
        self.0.lock().unwrap().clear()
    }
    fn push(&self, op: Op) {
        self.0.lock().unwrap().push(op)
    }
    /// Bytes read by the plugin so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.ops()
            .iter()
            .map(|o| if let Op::Read(_, n) = o { *n } else { 0 })
            .sum()
    }
}

/// The disk shared by every handle of a [`MemPlugin`], and its knobs.
pub(crate) struct Mem {
    /// The bytes.
    pub(crate) data: Mutex<Vec<u8>>,
    /// Calls received, as `"pwrite 0 512 fua"` and so on.
    pub(crate) calls: Mutex<Vec<String>>,
    /// The same calls, typed.
    pub(crate) log: Arc<Log>,
    /// Fail this many data calls (any kind) with EIO, then succeed.
    pub(crate) fail: AtomicUsize,
    /// Handles opened so far.
    pub(crate) opens: AtomicUsize,
    /// Handles open now.
    pub(crate) live: AtomicUsize,
    /// Read-only flags of every open, in order.
    pub(crate) opened_readonly: Mutex<Vec<bool>>,
    /// Sleep this long in each read.
    pub(crate) read_delay: Mutex<Duration>,
    /// Block size constraints to report.
    pub(crate) block_size: Mutex<Option<BlockSize>>,
    /// Refuse reads and writes not aligned to this (if non-zero).
    pub(crate) require_align: Mutex<u64>,
    /// Largest read or write accepted (if non-zero).
    pub(crate) max_io: Mutex<u64>,
    /// Cache answer.
    pub(crate) cache: Mutex<Cache>,
    /// FUA support.
    pub(crate) fua: Fua,
    /// Native zero support.
    pub(crate) zero: bool,
    /// Fast zero support.
    pub(crate) fast_zero: bool,
    /// Extents granularity: each all-zero block of this size is a hole.
    pub(crate) extent_block: u64,
}

impl Mem {
    /// Memory of `size` zero bytes.
    pub(crate) fn new(size: usize) -> Arc<Mem> {
        Self::with(vec![0; size])
    }
    /// Memory with these contents, reporting extents in 512-byte blocks.
    pub(crate) fn with(data: Vec<u8>) -> Arc<Mem> {
        Self::build(data, 512)
    }
    /// A disk with the recognisable [`pattern`] in its first half and
    /// zeroes in the second, reporting extents in 4K blocks.
    pub(crate) fn patterned(size: usize) -> Arc<Mem> {
        let mut data = vec![0u8; size];
        pattern(&mut data[..size / 2], 0);
        Self::build(data, 4096)
    }
    fn build(data: Vec<u8>, extent_block: u64) -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(data),
            calls: Mutex::new(Vec::new()),
            log: Arc::new(Log::default()),
            fail: AtomicUsize::new(0),
            opens: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            opened_readonly: Mutex::new(Vec::new()),
            read_delay: Mutex::new(Duration::ZERO),
            block_size: Mutex::new(None),
            require_align: Mutex::new(0),
            max_io: Mutex::new(0),
            cache: Mutex::new(Cache::Native),
            fua: Fua::Native,
            zero: true,
            fast_zero: true,
            extent_block,
        })
    }
    /// The bytes now.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
    /// The calls so far (as strings), clearing the list.
    pub(crate) fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    /// Log a call, then fail it if a failure is due.
    fn record(&self, op: Op, flags: Flags) -> Result<()> {
        let call = match &op {
            Op::Read(o, n) => format!("pread {o} {n}"),
            Op::Write(o, n) => format!("pwrite {o} {n}{}", flag_words(flags)),
            Op::Zero(o, n) => format!("zero {o} {n}{}", flag_words(flags)),
            Op::Trim(o, n) => format!("trim {o} {n}{}", flag_words(flags)),
            Op::Flush => "flush".to_string(),
            Op::Cache(o, n) => format!("cache {o} {n}"),
            Op::Extents(o, n) => format!("extents {o} {n}{}", flag_words(flags)),
        };
        self.calls.lock().unwrap().push(call);
        self.log.push(op);
        let left = self.fail.load(Ordering::SeqCst);
        if left > 0 {
            self.fail.store(left - 1, Ordering::SeqCst);
            return Err(Error::eio("test plugin: injected failure"));
        }
        Ok(())
    }
}

/// Fill with the test pattern for offset `off`.
pub(crate) fn pattern(buf: &mut [u8], off: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = (x / 4096 * 7 + x / 13) as u8 | 1;
    }
}

fn flag_words(flags: Flags) -> String {
    let mut s = String::new();
    for (f, n) in [
        (Flags::FUA, " fua"),
        (Flags::MAY_TRIM, " may_trim"),
        (Flags::FAST_ZERO, " fast"),
        (Flags::REQ_ONE, " req_one"),
    ] {
        if flags.contains(f) {
            s.push_str(n);
        }
    }
    s
}

/// The plugin.
pub(crate) struct MemPlugin(pub(crate) Arc<Mem>);

struct MemHandle {
    mem: Arc<Mem>,
    readonly: bool,
}

impl Drop for MemHandle {
    fn drop(&mut self) {
        self.mem.live.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Plugin for MemPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        self.0.opens.fetch_add(1, Ordering::SeqCst);
        self.0.live.fetch_add(1, Ordering::SeqCst);
        self.0.opened_readonly.lock().unwrap().push(ctx.readonly);
        Ok(Box::new(MemHandle {
            mem: self.0.clone(),
            readonly: ctx.readonly,
        }))
    }
}

impl MemHandle {
    /// The bytes of a read or write, checked against the alignment and
    /// size knobs and the disk's size.
    fn io_range(&self, off: u64, len: u64) -> Result<std::ops::Range<usize>> {
        let a = *self.mem.require_align.lock().unwrap();
        if a > 0 && (!off.is_multiple_of(a) || !len.is_multiple_of(a)) {
            return Err(Error::einval(format!("unaligned request {off}+{len}")));
        }
        let m = *self.mem.max_io.lock().unwrap();
        if m > 0 && len > m {
            return Err(Error::einval(format!("request too large {len}")));
        }
        self.range(off, len)
    }
    /// The bytes of a request, checked against the disk's size.
    fn range(&self, off: u64, len: u64) -> Result<std::ops::Range<usize>> {
        let size = self.mem.data.lock().unwrap().len() as u64;
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(off as usize..end as usize),
            _ => Err(Error::einval(format!("beyond the end {off}+{len}"))),
        }
    }
    fn writable(&self) -> Result<()> {
        if self.readonly {
            return Err(Error::eperm("read-only"));
        }
        Ok(())
    }
}

#[async_trait]
impl Handle for MemHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.mem.data.lock().unwrap().len() as u64)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(*self.mem.block_size.lock().unwrap())
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: !self.readonly,
            zero: self.mem.zero,
            fast_zero: self.mem.fast_zero,
            fua: self.mem.fua,
            cache: *self.mem.cache.lock().unwrap(),
            ..Caps::FULL
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let len = buf.len() as u64;
        self.mem.record(Op::Read(offset, len), flags)?;
        let r = self.io_range(offset, len)?;
        let d = *self.mem.read_delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        buf.copy_from_slice(&self.mem.data.lock().unwrap()[r]);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.writable()?;
        self.mem
            .record(Op::Write(offset, buf.len() as u64), flags)?;
        let r = self.io_range(offset, buf.len() as u64)?;
        self.mem.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        self.mem.record(Op::Flush, flags)
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.writable()?;
        self.mem.record(Op::Trim(offset, count), flags)?;
        let r = self.range(offset, count)?;
        self.mem.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.writable()?;
        self.mem.record(Op::Zero(offset, count), flags)?;
        let r = self.range(offset, count)?;
        self.mem.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.mem.record(Op::Extents(offset, count), flags)?;
        self.range(offset, count)?;
        // All-zero blocks are holes, anything else data.
        let bs = self.mem.extent_block;
        let d = self.mem.data.lock().unwrap();
        let mut b = offset / bs * bs;
        while b < offset + count && b < d.len() as u64 {
            let e = (b + bs).min(d.len() as u64);
            let zero = d[b as usize..e as usize].iter().all(|x| *x == 0);
            ext.add(b, e - b, if zero { HOLE_ZERO } else { 0 })?;
            b = e;
        }
        Ok(())
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.mem.record(Op::Cache(offset, count), flags)
    }
}

/// Parameters from `key=value` words.
pub(crate) fn params(words: &[&str]) -> Params {
    Params::parse(words, None).unwrap()
}

/// A stack of these filters (outermost first) over the memory.
pub(crate) fn stack(filters: Vec<Arc<dyn Filter>>, mem: &Arc<Mem>) -> Stack {
    Stack {
        filters,
        plugin: Arc::new(MemPlugin(mem.clone())),
    }
}

/// A stack of filters (outermost first) over a fresh [`Mem::patterned`]
/// disk, with its log.
pub(crate) fn stack_of(filters: Vec<Arc<dyn Filter>>, size: usize) -> (Stack, Arc<Log>, Arc<Mem>) {
    let mem = Mem::patterned(size);
    (stack(filters, &mem), mem.log.clone(), mem)
}

/// One filter over a fresh [`Mem::patterned`] disk.
pub(crate) fn mem_stack(f: Arc<dyn Filter>, size: usize) -> (Stack, Arc<Log>, Arc<Mem>) {
    stack_of(vec![f], size)
}

/// A context for connection `id`.
pub(crate) fn ctx(id: u64) -> OpenContext {
    OpenContext {
        id,
        ..OpenContext::default()
    }
}

/// Read `len` bytes at `offset` through a handle (filled with 0xaa
/// first, so a read that writes nothing shows).
pub(crate) async fn try_read(h: &dyn Handle, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0xaa; len];
    h.pread(&mut b, offset, Flags::NONE).await?;
    Ok(b)
}

/// Read a range through a handle that must succeed.
pub(crate) async fn read(h: &dyn Handle, off: u64, len: usize) -> Vec<u8> {
    try_read(h, off, len).await.unwrap()
}

/// The extents of `[offset, offset+count)` through a handle, as
/// (offset, length, flags).
pub(crate) async fn try_extents(
    h: &dyn Handle,
    offset: u64,
    count: u64,
) -> Result<Vec<(u64, u64, u32)>> {
    let mut e = Extents::new(offset, offset + count);
    h.extents(count, offset, Flags::NONE, &mut e).await?;
    Ok(e.list()
        .iter()
        .map(|x| (x.offset, x.length, x.flags))
        .collect())
}

/// The extents of a range that must succeed.
pub(crate) async fn extents(h: &dyn Handle, off: u64, len: u64) -> Vec<(u64, u64, u32)> {
    try_extents(h, off, len).await.unwrap()
}
