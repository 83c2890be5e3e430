//! Disks on object stores: what the `S3` and `azure` plugins share.
//!
//! A store (anything `object_store` speaks) holds either one object,
//! served read-only with a ranged `GET` per read, or a read-write disk
//! stored as one object per chunk, named `KEY/%016x` (the chunk number in
//! hex) as upstream's S3 plugin names them. The plugins only build the
//! store from their own parameters and credentials; the layout, the
//! write-back cache, extents and flushing are here, written once.
//!
//! ## Parameters (taken by every such plugin)
//!
//! - `key=STRING` (required): the object, or the prefix of the chunks.
//! - `size=SIZE`, `object-size=SIZE`: together, a chunked read-write disk
//!   of `size` bytes in objects of `object-size` bytes (4K to 64M; `size`
//!   a multiple of it).
//! - `cache-max=SIZE` (default 256M, at least 2 objects): the most data
//!   the write-back cache holds.
//!
//! ## Behaviour
//!
//! - Single-object mode is read-only; its size is the object's. Every read
//!   is one ranged `GET`.
//! - Chunked mode keeps written chunks in a write-back cache shared by all
//!   connections (so multi-conn is safe): a write that covers a chunk
//!   replaces it without reading it, a partial write reads the chunk once
//!   (read-modify-write) and later writes to it cost nothing. `flush`
//!   uploads every dirty chunk, in parallel, before it returns, and a write
//!   with FUA uploads its chunks before it returns; a full cache uploads its
//!   least recently used chunks. Reads of chunks not in the cache fetch
//!   only the bytes asked for. A chunk without an object reads as zeroes;
//!   trimming or zeroing a whole chunk deletes its object.
//! - Extents come from listing the chunk objects: a chunk without an
//!   object is a hole that reads as zeroes.
//! - A chunk object whose size is not `object-size` fails the request
//!   (EIO) with a message naming it; so does a store that keeps failing
//!   after the store client's retries, and wrong credentials fail the first
//!   connection with the store's message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    BlockSize, Caps, ConfigError, ConfigResult, Error, Extents, Flags, Fua, Handle, OpenContext,
    Params, Plugin, Result,
};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use tokio::sync::OnceCell;

/// The smallest and largest object size of a chunked disk.
const MIN_OBJECT: u64 = 4096;
const MAX_OBJECT: u64 = 64 << 20;
/// Uploads at once when a flush drains the cache.
const UPLOADS: usize = 16;
/// Chunk lock stripes.
const STRIPES: usize = 256;

/// The disk that `key=`, `size=`, `object-size=` and `cache-max=` of
/// plugin `name` describe.
pub(crate) fn take_disk(p: &mut Params, name: &'static str) -> ConfigResult<Disk> {
    let key = p
        .take("key")
        .ok_or_else(|| ConfigError::new(format!("{name}: the key parameter is required")))?;
    let key = key.trim_end_matches('/').to_string();
    if key.is_empty() {
        return Err(ConfigError::new(format!("{name}: key must not be empty")));
    }
    let size = p.take_size("size")?;
    let object_size = p.take_size("object-size")?;
    let cache_max = p.take_size("cache-max")?.unwrap_or(256 << 20);
    match (size, object_size) {
        (None, None) => Ok(Disk::Single {
            path: ObjectPath::from(key.as_str()),
            size: OnceCell::new(),
        }),
        (Some(size), Some(obj)) => {
            if !(MIN_OBJECT..=MAX_OBJECT).contains(&obj) {
                return Err(ConfigError::new(format!(
                    "{name}: object-size must be between {MIN_OBJECT} and {MAX_OBJECT} bytes"
                )));
            }
            if size % obj != 0 {
                return Err(ConfigError::new(format!(
                    "{name}: size must be a multiple of object-size"
                )));
            }
            Ok(Disk::Chunked(Chunks {
                name,
                prefix: key,
                size,
                object_size: obj,
                cache_max: cache_max.max(2 * obj),
                cache: Mutex::new(Cache::default()),
                locks: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            }))
        }
        _ => Err(ConfigError::new(format!(
            "{name}: size and object-size must be given together"
        ))),
    }
}

/// The plugin `name` serving `disk` from `store` (in bucket or container
/// `bucket`, for messages).
pub(crate) fn plugin(
    name: &'static str,
    store: Arc<dyn ObjectStore>,
    bucket: String,
    disk: Disk,
) -> Arc<dyn Plugin> {
    Arc::new(ObjectPlugin {
        name,
        store,
        bucket,
        disk: Arc::new(disk),
        checked: OnceCell::new(),
    })
}

/// The configured plugin.
struct ObjectPlugin {
    /// The plugin's name, for messages (`S3`, `azure`).
    name: &'static str,
    store: Arc<dyn ObjectStore>,
    /// The bucket or container, for messages.
    bucket: String,
    disk: Arc<Disk>,
    /// The store answered once (credentials, bucket): checked at the first
    /// open, so a mistake fails the first client with the store's message.
    checked: OnceCell<()>,
}

/// What the plugin serves.
pub(crate) enum Disk {
    /// One object, read-only.
    Single {
        path: ObjectPath,
        /// Its size, asked at the first open.
        size: OnceCell<u64>,
    },
    /// A read-write disk of chunk objects.
    Chunked(Chunks),
}

#[async_trait]
impl Plugin for ObjectPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        self.checked
            .get_or_try_init(|| async {
                let prefix = match &*self.disk {
                    Disk::Single { path, .. } => path.clone(),
                    Disk::Chunked(c) => ObjectPath::from(c.prefix.as_str()),
                };
                // A list of a page of objects checks the credentials and
                // the bucket for both modes.
                let mut page = self.store.list(Some(&prefix));
                if let Some(Err(e)) = page.next().await {
                    return Err(store_error(
                        self.name,
                        &format!("bucket '{}'", self.bucket),
                        e,
                    ));
                }
                Ok(())
            })
            .await?;
        let size = match &*self.disk {
            Disk::Single { path, size } => {
                *size
                    .get_or_try_init(|| async {
                        self.store
                            .head(path)
                            .await
                            .map(|m| m.size)
                            .map_err(|e| store_error(self.name, &format!("object '{path}'"), e))
                    })
                    .await?
            }
            Disk::Chunked(c) => c.size,
        };
        Ok(Box::new(ObjectHandle {
            name: self.name,
            store: self.store.clone(),
            disk: self.disk.clone(),
            size,
            readonly: ctx.readonly || matches!(&*self.disk, Disk::Single { .. }),
        }))
    }
}

/// An object-store error as an NBD error.
fn store_error(name: &str, what: &str, e: object_store::Error) -> Error {
    use libnbd::protocol::errno;
    let code = match &e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => errno::EPERM,
        _ => errno::EIO,
    };
    Error::new(code, format!("{name}: {what}: {e}"))
}

/// A connection.
struct ObjectHandle {
    name: &'static str,
    store: Arc<dyn ObjectStore>,
    disk: Arc<Disk>,
    size: u64,
    readonly: bool,
}

#[async_trait]
impl Handle for ObjectHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let preferred = match &*self.disk {
            Disk::Single { .. } => 512 << 10,
            Disk::Chunked(c) => c.object_size.min(32 << 20) as u32,
        };
        Ok(Some(BlockSize {
            minimum: 1,
            preferred,
            maximum: u32::MAX,
        }))
    }
    fn caps(&self) -> Result<Caps> {
        Ok(match &*self.disk {
            // Read-only: every connection sees the same object.
            Disk::Single { .. } => Caps {
                multi_conn: true,
                ..Caps::READ_ONLY
            },
            // One cache for every connection, which flush drains.
            Disk::Chunked(_) => Caps {
                write: !self.readonly,
                cache: libnbd::Cache::None,
                fua: Fua::Native,
                ..Caps::FULL
            },
        })
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        match &*self.disk {
            Disk::Single { path, .. } => {
                if buf.is_empty() {
                    return Ok(());
                }
                let end = offset + buf.len() as u64;
                let data = self
                    .store
                    .get_range(path, offset..end)
                    .await
                    .map_err(|e| store_error(self.name, &format!("reading '{path}'"), e))?;
                if data.len() != buf.len() {
                    return Err(Error::eio(format!(
                        "{name}: reading '{path}' at {offset}: {} bytes instead of {}",
                        data.len(),
                        buf.len(),
                        name = self.name
                    )));
                }
                buf.copy_from_slice(&data);
                Ok(())
            }
            Disk::Chunked(c) => c.read(&*self.store, buf, offset).await,
        }
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let c = self.chunked()?;
        c.write(&*self.store, offset, Some(buf), buf.len() as u64, flags)
            .await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let c = self.chunked()?;
        c.write(&*self.store, offset, None, count, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        // Trim is advisory: whole chunks lose their objects (and read as
        // zeroes), the unaligned ends are left as they are.
        let c = self.chunked()?;
        c.check(offset, count)?;
        let obj = c.object_size;
        let (start, end) = (offset.div_ceil(obj) * obj, (offset + count) / obj * obj);
        if start >= end {
            return Ok(());
        }
        c.write(
            &*self.store,
            start,
            None,
            end - start,
            flags.without(Flags::FAST_ZERO),
        )
        .await
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        match &*self.disk {
            Disk::Single { .. } => Ok(()),
            Disk::Chunked(c) => c.flush(&*self.store).await,
        }
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        match &*self.disk {
            Disk::Single { .. } => ext.add(offset, count, 0),
            Disk::Chunked(c) => c.extents(&*self.store, count, offset, ext).await,
        }
    }
}

impl Drop for ObjectHandle {
    /// A client that disconnects without a flush (libnbd's nbdcopy does
    /// not flush unless asked) still has its writes stored: the last
    /// dirty chunks are uploaded as the connection closes. Errors can only
    /// be logged here.
    fn drop(&mut self) {
        let Disk::Chunked(c) = &*self.disk else {
            return;
        };
        if self.readonly || !c.cache().chunks.values().any(|v| v.dirty) {
            return;
        }
        let flush = || -> Result<()> {
            let rt = tokio::runtime::Handle::try_current().map_err(|_| {
                Error::eio(format!(
                    "{}: no runtime to upload the last writes",
                    self.name
                ))
            })?;
            match rt.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| rt.block_on(c.flush(&*self.store)))
                }
                _ => Err(Error::eio(format!(
                    "{}: cannot upload the last writes from this runtime",
                    self.name
                ))),
            }
        };
        if let Err(e) = flush() {
            libnbd::elog!(
                "nbdkit: {}: error: writes not flushed before the connection closed were lost: {}",
                self.name,
                e.msg
            );
        }
    }
}

impl ObjectHandle {
    fn chunked(&self) -> Result<&Chunks> {
        match &*self.disk {
            Disk::Chunked(c) if !self.readonly => Ok(c),
            _ => Err(Error::eperm(format!(
                "{}: the disk is read-only",
                self.name
            ))),
        }
    }
}

/// A chunked disk: its layout, the write-back cache and the chunk locks.
pub(crate) struct Chunks {
    name: &'static str,
    prefix: String,
    size: u64,
    object_size: u64,
    cache_max: u64,
    cache: Mutex<Cache>,
    /// Striped by chunk number: held while a chunk is changed, loaded or
    /// uploaded, so an upload never races a change of the same chunk.
    locks: Vec<tokio::sync::Mutex<()>>,
}

/// The chunks held in memory, with the least recently used found by its
/// tick.
#[derive(Default)]
struct Cache {
    chunks: HashMap<u64, Cached>,
    bytes: u64,
    tick: u64,
}

struct Cached {
    data: Arc<Vec<u8>>,
    /// Newer than the store's object.
    dirty: bool,
    /// When last used.
    tick: u64,
}

impl Cache {
    fn touch(&mut self, n: u64) -> Option<&mut Cached> {
        self.tick += 1;
        let tick = self.tick;
        let c = self.chunks.get_mut(&n)?;
        c.tick = tick;
        Some(c)
    }
    fn insert(&mut self, n: u64, data: Arc<Vec<u8>>, dirty: bool) {
        self.tick += 1;
        self.bytes += data.len() as u64;
        if let Some(old) = self.chunks.insert(
            n,
            Cached {
                data,
                dirty,
                tick: self.tick,
            },
        ) {
            self.bytes -= old.data.len() as u64;
        }
    }
    fn remove(&mut self, n: u64) {
        if let Some(old) = self.chunks.remove(&n) {
            self.bytes -= old.data.len() as u64;
        }
    }
}

impl Chunks {
    fn path(&self, n: u64) -> ObjectPath {
        ObjectPath::from(format!("{}/{n:016x}", self.prefix))
    }
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
    async fn lock(&self, n: u64) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks[(n % STRIPES as u64) as usize].lock().await
    }
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::einval(format!(
                "{name}: request {offset}+{len} beyond the end ({})",
                self.size,
                name = self.name
            ))),
        }
    }
    /// The pieces of `[offset, offset+len)`: (chunk, offset in it, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let obj = self.object_size;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            (pos < end).then(|| {
                let n = pos / obj;
                let at = pos % obj;
                let l = (obj - at).min(end - pos);
                pos += l;
                (n, at, l)
            })
        })
    }

    /// Bytes `[at, at+len)` of chunk `n` from the store (zeroes if it has
    /// no object).
    async fn fetch(&self, store: &dyn ObjectStore, n: u64, at: u64, len: u64) -> Result<Bytes> {
        let path = self.path(n);
        match store.get_range(&path, at..at + len).await {
            Ok(b) if b.len() as u64 == len => Ok(b),
            Ok(b) => Err(Error::eio(format!(
                "{name}: object '{path}' is shorter than object-size ({} bytes at {at} instead of {len})",
                b.len(), name = self.name))),
            Err(object_store::Error::NotFound { .. }) => Ok(Bytes::from(vec![0u8; len as usize])),
            Err(e) => Err(store_error(self.name, &format!("reading '{path}'"), e)),
        }
    }

    /// The whole chunk `n`, from the cache or the store; callers hold its
    /// lock. `None` if it is not cached and has no object.
    async fn load(&self, store: &dyn ObjectStore, n: u64) -> Result<Option<Arc<Vec<u8>>>> {
        if let Some(c) = self.cache().touch(n) {
            return Ok(Some(c.data.clone()));
        }
        let path = self.path(n);
        match store.get(&path).await {
            Ok(r) => {
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| store_error(self.name, &format!("reading '{path}'"), e))?;
                if b.len() as u64 != self.object_size {
                    return Err(Error::eio(format!(
                        "{name}: object '{path}' has {} bytes, not object-size ({})",
                        b.len(),
                        self.object_size,
                        name = self.name
                    )));
                }
                let data = Arc::new(b.to_vec());
                self.cache().insert(n, data.clone(), false);
                Ok(Some(data))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(self.name, &format!("reading '{path}'"), e)),
        }
    }

    async fn read(&self, store: &dyn ObjectStore, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        // Chunks not in the cache are fetched in parallel.
        let mut fetches = Vec::new();
        let mut done = 0usize;
        for (n, at, len) in self.pieces(offset, buf.len() as u64) {
            let part = done..done + len as usize;
            done += len as usize;
            let cached = self.cache().touch(n).map(|c| c.data.clone());
            match cached {
                Some(data) => buf[part].copy_from_slice(&data[at as usize..(at + len) as usize]),
                None => fetches.push((part, n, at, len)),
            }
        }
        let fetched: Vec<_> = futures::stream::iter(fetches)
            .map(|(part, n, at, len)| async move {
                self.fetch(store, n, at, len).await.map(|b| (part, b))
            })
            .buffered(UPLOADS)
            .try_collect()
            .await?;
        for (part, b) in fetched {
            buf[part].copy_from_slice(&b);
        }
        Ok(())
    }

    /// Write `data` (or zeroes, when `None`) over `[offset, offset+len)`.
    async fn write(
        &self,
        store: &dyn ObjectStore,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        flags: Flags,
    ) -> Result<()> {
        self.check(offset, len)?;
        let obj = self.object_size;
        let mut done = 0usize;
        for (n, at, l) in self.pieces(offset, len) {
            let part = done..done + l as usize;
            done += l as usize;
            let _g = self.lock(n).await;
            let whole = at == 0 && l == obj;
            match data {
                Some(d) if whole => {
                    self.cache().insert(n, Arc::new(d[part].to_vec()), true);
                }
                None if whole => {
                    // A whole chunk of zeroes is no object at all.
                    self.cache().remove(n);
                    let path = self.path(n);
                    match store.delete(&path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            return Err(store_error(self.name, &format!("deleting '{path}'"), e))
                        }
                    }
                    continue;
                }
                _ => {
                    let current = self.load(store, n).await?;
                    if data.is_none() && current.is_none() {
                        // Zeroes over a chunk that has none: nothing to do.
                        continue;
                    }
                    if data.is_none() && flags.contains(Flags::FAST_ZERO) {
                        return Err(Error::enotsup(format!(
                            "{}: zeroing part of a stored chunk is not fast",
                            self.name
                        )));
                    }
                    let mut chunk = current.unwrap_or_else(|| Arc::new(vec![0u8; obj as usize]));
                    let bytes = &mut Arc::make_mut(&mut chunk)[at as usize..(at + l) as usize];
                    match data {
                        Some(d) => bytes.copy_from_slice(&d[part]),
                        None => bytes.fill(0),
                    }
                    self.cache().insert(n, chunk, true);
                }
            }
            if flags.contains(Flags::FUA) {
                self.upload(store, n).await?;
            }
        }
        self.shrink(store).await
    }

    /// Upload chunk `n` if it is dirty; callers hold its lock.
    async fn upload(&self, store: &dyn ObjectStore, n: u64) -> Result<()> {
        let data = match self.cache().chunks.get(&n) {
            Some(c) if c.dirty => c.data.clone(),
            _ => return Ok(()),
        };
        let path = self.path(n);
        let payload = PutPayload::from(Bytes::from_owner(ArcBytes(data.clone())));
        store
            .put(&path, payload)
            .await
            .map_err(|e| store_error(self.name, &format!("writing '{path}'"), e))?;
        if let Some(c) = self.cache().chunks.get_mut(&n) {
            // Still the data uploaded (the lock was held throughout).
            if Arc::ptr_eq(&c.data, &data) {
                c.dirty = false;
            }
        }
        Ok(())
    }

    /// Make the cache fit `cache_max` again: drop the least recently used
    /// chunks, uploading the dirty ones first.
    async fn shrink(&self, store: &dyn ObjectStore) -> Result<()> {
        loop {
            let victim = {
                let c = self.cache();
                if c.bytes <= self.cache_max {
                    return Ok(());
                }
                c.chunks.iter().min_by_key(|(_, v)| v.tick).map(|(n, _)| *n)
            };
            let Some(n) = victim else {
                return Ok(());
            };
            let _g = self.lock(n).await;
            self.upload(store, n).await?;
            let mut c = self.cache();
            if c.chunks.get(&n).is_some_and(|v| !v.dirty) {
                c.remove(n);
            }
        }
    }

    /// Upload every dirty chunk.
    async fn flush(&self, store: &dyn ObjectStore) -> Result<()> {
        let dirty: Vec<u64> = {
            let c = self.cache();
            let mut d: Vec<u64> = c
                .chunks
                .iter()
                .filter(|(_, v)| v.dirty)
                .map(|(n, _)| *n)
                .collect();
            d.sort_unstable();
            d
        };
        futures::stream::iter(dirty)
            .map(|n| async move {
                let _g = self.lock(n).await;
                self.upload(store, n).await
            })
            .buffer_unordered(UPLOADS)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Which chunks of `[offset, offset+count)` hold data: those with an
    /// object, and dirty ones in the cache.
    async fn extents(
        &self,
        store: &dyn ObjectStore,
        count: u64,
        offset: u64,
        ext: &mut Extents,
    ) -> Result<()> {
        self.check(offset, count)?;
        if count == 0 {
            return Ok(());
        }
        let obj = self.object_size;
        let (first, last) = (offset / obj, (offset + count).div_ceil(obj));
        let mut present: Vec<u64> = self
            .cache()
            .chunks
            .iter()
            .filter(|(n, v)| v.dirty && (first..last).contains(*n))
            .map(|(n, _)| *n)
            .collect();
        // Objects sort by their hex names: list from just before `first`.
        let prefix = ObjectPath::from(self.prefix.as_str());
        let listing = if first == 0 {
            store.list(Some(&prefix))
        } else {
            store.list_with_offset(Some(&prefix), &self.path(first - 1))
        };
        let mut listing = listing;
        while let Some(meta) = listing.next().await {
            let meta =
                meta.map_err(|e| store_error(self.name, &format!("listing '{prefix}'"), e))?;
            let Some(n) = meta
                .location
                .filename()
                .and_then(|f| u64::from_str_radix(f, 16).ok())
            else {
                continue;
            };
            if n >= last {
                break;
            }
            if n >= first {
                present.push(n);
            }
        }
        present.sort_unstable();
        present.dedup();
        let mut pos = offset;
        let end = offset + count;
        for n in present {
            let (s, e) = ((n * obj).max(offset), ((n + 1) * obj).min(end));
            if s > pos {
                ext.add(pos, s - pos, HOLE_ZERO)?;
            }
            ext.add(s, e - s, 0)?;
            pos = e;
        }
        if pos < end {
            ext.add(pos, end - pos, HOLE_ZERO)?;
        }
        Ok(())
    }
}

/// A shared chunk as the bytes of an upload, without copying it.
struct ArcBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunks() {
        let c = Chunks {
            name: "test",
            prefix: "d".into(),
            size: 4 << 20,
            object_size: 1 << 20,
            cache_max: 2 << 20,
            cache: Mutex::new(Cache::default()),
            locks: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        };
        let p: Vec<_> = c.pieces((1 << 20) - 10, (1 << 20) + 20).collect();
        assert_eq!(
            p,
            vec![(0, (1 << 20) - 10, 10), (1, 0, 1 << 20), (2, 0, 10)]
        );
        assert_eq!(c.path(255).as_ref(), "d/00000000000000ff");
        assert!(c.check(4 << 20, 1).is_err());
    }
}
