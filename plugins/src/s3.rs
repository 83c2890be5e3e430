//! # S3: a disk in an Amazon S3 bucket or any S3-compatible object store
//!
//! Serves one object read-only, or a read-write disk stored as one
//! object per chunk, on AWS S3, Ceph's RADOS gateway, MinIO, Garage or
//! any other store that speaks the S3 protocol. Requests are signed,
//! retried with backoff on server errors and throttling, and run in
//! parallel (upstream's Python plugin runs one at a time). The plugin is
//! also found as `s3`.
//!
//! ```text
//! nbdkit S3 endpoint-url=https://ceph.example.com bucket=images key=disk.img
//! nbdkit S3 bucket=images key=disk size=50G object-size=8M
//! nbdkit S3 bucket=images key=disk size=50G object-size=8M profile=backup \
//!     --run 'nbdcopy disk.raw $uri'
//! ```
//!
//! ## Parameters
//!
//! - `bucket=BUCKET` (required): the bucket.
//! - `key=STRING` (required): the object (single-object mode), or the
//!   prefix of the chunk objects (chunked mode, when `size` is given).
//! - `size=SIZE`, `object-size=SIZE`: together, a read-write disk of
//!   `size` bytes stored as objects of `object-size` bytes named
//!   `KEY/%016x` (the chunk number in hex), as upstream names them, so
//!   either plugin opens the other's disks. `size` must be a multiple of
//!   `object-size`. A chunk that has no object reads as zeroes; trimming
//!   or zeroing a whole chunk deletes its object. Object sizes from 4K up
//!   to 64M are taken (upstream: requests of exactly the object size are
//!   the only fast ones; here any request is, see Behaviour).
//! - `endpoint-url=URL`: the store's address, for anything but AWS
//!   (`http://` or `https://`); requests then use path-style addressing.
//! - `access-key=ID`, `secret-key=SECRET`, `session-token=TOKEN`: the
//!   credentials (visible to other users in `ps`: prefer the environment
//!   or the credentials file).
//! - `profile=NAME`: the profile of `~/.aws/credentials` and
//!   `~/.aws/config` to use (default `$AWS_PROFILE`, else `default`).
//! - `region=REGION`: the region (default `$AWS_REGION`,
//!   `$AWS_DEFAULT_REGION`, the profile's `region`, else `us-east-1`).
//! - `cache-max=SIZE` (default 256M, at least 2 objects): the most data the
//!   write-back cache of a chunked disk holds.
//!
//! Credentials are taken from the parameters, else from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else
//! from the profile in `~/.aws/credentials` (`aws_access_key_id`,
//! `aws_secret_access_key`, `aws_session_token`; `$AWS_SHARED_CREDENTIALS_FILE`
//! and `$AWS_CONFIG_FILE` move the files). Without any, the plugin refuses
//! to start rather than wait for an instance metadata service.
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
//!   only the bytes asked for.
//! - Extents come from listing the chunk objects: a chunk without an
//!   object is a hole that reads as zeroes.
//! - A chunk object whose size is not `object-size` fails the request
//!   (EIO) with a message naming it; so does a store that keeps failing
//!   after the retries (up to 10, with exponential backoff, for at most 3
//!   minutes), and wrong credentials fail the first connection with the
//!   store's message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use libnbd::backend::HOLE_ZERO;
use libnbd::{
    BlockSize, Caps, ConfigError, ConfigResult, Error, Extents, Flags, Fua, Handle, OpenContext,
    Params, Plugin, PluginEntry, Result,
};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, RetryConfig};
use tokio::sync::OnceCell;

/// The registry entry of the S3 plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "S3",
    help: "\
bucket=BUCKET           The bucket (required).
key=STRING              The object, or the prefix of the chunk objects (required).
size=SIZE               The size of a chunked read-write disk (with object-size).
object-size=SIZE        The size of each chunk object (with size).
endpoint-url=URL        The S3-compatible store (default AWS).
access-key=ID           The access key id.
secret-key=SECRET       The secret access key.
session-token=TOKEN     The session token.
profile=NAME            The profile of ~/.aws/credentials and ~/.aws/config.
region=REGION           The region.
cache-max=SIZE          The largest write-back cache (default 256M).",
    magic: None,
    create,
};

/// The smallest and largest object size of a chunked disk.
const MIN_OBJECT: u64 = 4096;
const MAX_OBJECT: u64 = 64 << 20;
/// Uploads at once when a flush drains the cache.
const UPLOADS: usize = 16;
/// Chunk lock stripes.
const STRIPES: usize = 256;

/// Build the plugin from its parameters.
pub fn create(p: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let bucket = p
        .take("bucket")
        .ok_or_else(|| ConfigError::new("S3: the bucket parameter is required"))?;
    let key = p
        .take("key")
        .ok_or_else(|| ConfigError::new("S3: the key parameter is required"))?;
    let key = key.trim_end_matches('/').to_string();
    if key.is_empty() {
        return Err(ConfigError::new("S3: key must not be empty"));
    }
    let size = p.take_size("size")?;
    let object_size = p.take_size("object-size")?;
    let chunks = match (size, object_size) {
        (None, None) => None,
        (Some(size), Some(obj)) => {
            if !(MIN_OBJECT..=MAX_OBJECT).contains(&obj) {
                return Err(ConfigError::new(format!(
                    "S3: object-size must be between {MIN_OBJECT} and {MAX_OBJECT} bytes"
                )));
            }
            if size % obj != 0 {
                return Err(ConfigError::new(
                    "S3: size must be a multiple of object-size",
                ));
            }
            Some((size, obj))
        }
        _ => {
            return Err(ConfigError::new(
                "S3: size and object-size must be given together",
            ))
        }
    };
    let cache_max = p.take_size("cache-max")?.unwrap_or(256 << 20);
    let creds = Credentials {
        access_key: p.take("access-key"),
        secret_key: p.take("secret-key"),
        session_token: p.take("session-token"),
        profile: p.take("profile"),
        region: p.take("region"),
        endpoint: p.take("endpoint-url"),
    };
    let store = creds.build(&bucket)?;
    let disk = match chunks {
        None => Disk::Single {
            path: ObjectPath::from(key.as_str()),
            size: OnceCell::new(),
        },
        Some((size, obj)) => Disk::Chunked(Chunks {
            prefix: key,
            size,
            object_size: obj,
            cache_max: cache_max.max(2 * obj),
            cache: Mutex::new(Cache::default()),
            locks: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }),
    };
    Ok(Arc::new(S3Plugin {
        store: Arc::new(store),
        bucket,
        disk: Arc::new(disk),
        checked: OnceCell::new(),
    }))
}

/// Where the credentials, region and endpoint come from.
struct Credentials {
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
    profile: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
}

impl Credentials {
    /// The store, with credentials from the parameters, the environment or
    /// the AWS files, in that order.
    fn build(self, bucket: &str) -> ConfigResult<AmazonS3> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let profile = self
            .profile
            .clone()
            .or_else(|| env("AWS_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from);
        let creds_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
        let config_file = env("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
        let from_creds = creds_file
            .map(|f| ini_section(&f, &profile))
            .transpose()?
            .flatten()
            .unwrap_or_default();
        // ~/.aws/config names a profile's section "profile NAME", but the
        // default one "default".
        let config_section = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        let from_config = config_file
            .map(|f| ini_section(&f, &config_section))
            .transpose()?
            .flatten()
            .unwrap_or_default();

        let (access, secret, token) = match (self.access_key, self.secret_key) {
            (Some(a), Some(s)) => (a, s, self.session_token),
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::new(
                    "S3: access-key and secret-key must be given together",
                ))
            }
            (None, None) => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(a), Some(s)) => (a, s, env("AWS_SESSION_TOKEN")),
                _ => match (
                    from_creds.get("aws_access_key_id"),
                    from_creds.get("aws_secret_access_key"),
                ) {
                    (Some(a), Some(s)) => (
                        a.clone(),
                        s.clone(),
                        from_creds.get("aws_session_token").cloned(),
                    ),
                    _ => {
                        return Err(ConfigError::new(format!(
                            "S3: no credentials: give access-key= and secret-key=, set \
                             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add them to \
                             profile '{profile}' of ~/.aws/credentials"
                        )))
                    }
                },
            },
        };
        let region = self
            .region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| from_config.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = self
            .endpoint
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| from_config.get("endpoint_url").cloned());

        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_access_key_id(access)
            .with_secret_access_key(secret)
            .with_retry(RetryConfig::default());
        if let Some(t) = token {
            b = b.with_token(t);
        }
        if let Some(e) = endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::new(format!(
                    "S3: endpoint-url must start with http:// or https://, not '{e}'"
                )));
            }
            b = b
                .with_allow_http(e.starts_with("http://"))
                .with_endpoint(e)
                .with_virtual_hosted_style_request(false);
        }
        b.build()
            .map_err(|e| ConfigError::new(format!("S3: cannot configure the store: {e}")))
    }
}

/// The `key = value` lines of section `[name]` of an AWS INI file, or
/// `None` if the file does not exist.
fn ini_section(
    file: &std::path::Path,
    name: &str,
) -> ConfigResult<Option<HashMap<String, String>>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError::new(format!(
                "S3: cannot read {}: {e}",
                file.display()
            )))
        }
    };
    Ok(Some(parse_ini_section(&text, name)))
}

/// The `key = value` lines of section `[name]` of INI text.
fn parse_ini_section(text: &str, name: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    out
}

/// The configured plugin.
struct S3Plugin {
    store: Arc<AmazonS3>,
    bucket: String,
    disk: Arc<Disk>,
    /// The store answered once (credentials, bucket): checked at the first
    /// open, so a mistake fails the first client with the store's message.
    checked: OnceCell<()>,
}

/// What the plugin serves.
enum Disk {
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
impl Plugin for S3Plugin {
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
                    return Err(store_error(&format!("bucket '{}'", self.bucket), e));
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
                            .map_err(|e| store_error(&format!("object '{path}'"), e))
                    })
                    .await?
            }
            Disk::Chunked(c) => c.size,
        };
        Ok(Box::new(S3Handle {
            store: self.store.clone(),
            disk: self.disk.clone(),
            size,
            readonly: ctx.readonly || matches!(&*self.disk, Disk::Single { .. }),
        }))
    }
}

/// An object-store error as an NBD error.
fn store_error(what: &str, e: object_store::Error) -> Error {
    use libnbd::protocol::errno;
    let code = match &e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => errno::EPERM,
        _ => errno::EIO,
    };
    Error::new(code, format!("S3: {what}: {e}"))
}

/// A connection.
struct S3Handle {
    store: Arc<AmazonS3>,
    disk: Arc<Disk>,
    size: u64,
    readonly: bool,
}

#[async_trait]
impl Handle for S3Handle {
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
                    .map_err(|e| store_error(&format!("reading '{path}'"), e))?;
                if data.len() != buf.len() {
                    return Err(Error::eio(format!(
                        "S3: reading '{path}' at {offset}: {} bytes instead of {}",
                        data.len(),
                        buf.len()
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

impl Drop for S3Handle {
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
            let rt = tokio::runtime::Handle::try_current()
                .map_err(|_| Error::eio("S3: no runtime to upload the last writes"))?;
            match rt.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| rt.block_on(c.flush(&*self.store)))
                }
                _ => Err(Error::eio(
                    "S3: cannot upload the last writes from this runtime",
                )),
            }
        };
        if let Err(e) = flush() {
            libnbd::elog!(
                "nbdkit: S3: error: writes not flushed before the connection closed were lost: {}",
                e.msg
            );
        }
    }
}

impl S3Handle {
    fn chunked(&self) -> Result<&Chunks> {
        match &*self.disk {
            Disk::Chunked(c) if !self.readonly => Ok(c),
            _ => Err(Error::eperm("S3: the disk is read-only")),
        }
    }
}

/// A chunked disk: its layout, the write-back cache and the chunk locks.
struct Chunks {
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
                "S3: request {offset}+{len} beyond the end ({})",
                self.size
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
                "S3: object '{path}' is shorter than object-size ({} bytes at {at} instead of {len})",
                b.len()
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(Bytes::from(vec![0u8; len as usize])),
            Err(e) => Err(store_error(&format!("reading '{path}'"), e)),
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
                    .map_err(|e| store_error(&format!("reading '{path}'"), e))?;
                if b.len() as u64 != self.object_size {
                    return Err(Error::eio(format!(
                        "S3: object '{path}' has {} bytes, not object-size ({})",
                        b.len(),
                        self.object_size
                    )));
                }
                let data = Arc::new(b.to_vec());
                self.cache().insert(n, data.clone(), false);
                Ok(Some(data))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(&format!("reading '{path}'"), e)),
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
                        Err(e) => return Err(store_error(&format!("deleting '{path}'"), e)),
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
                        return Err(Error::enotsup(
                            "S3: zeroing part of a stored chunk is not fast",
                        ));
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
            .map_err(|e| store_error(&format!("writing '{path}'"), e))?;
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
            let meta = meta.map_err(|e| store_error(&format!("listing '{prefix}'"), e))?;
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
    fn parameters() {
        let bad = |w: &[&str]| {
            let mut p = Params::parse(w, None).unwrap();
            ENTRY.configure(&mut p).err().map(|e| e.0)
        };
        let creds = [
            "access-key=a",
            "secret-key=b",
            "endpoint-url=http://127.0.0.1:1",
        ];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = creds.to_vec();
            v.extend_from_slice(extra);
            bad(&v)
        };
        assert!(with(&["key=k"]).unwrap().contains("bucket"));
        assert!(with(&["bucket=b"]).unwrap().contains("key"));
        assert!(with(&["bucket=b", "key=k", "size=1M"])
            .unwrap()
            .contains("together"));
        assert!(with(&["bucket=b", "key=k", "size=1M", "object-size=300k"])
            .unwrap()
            .contains("multiple"));
        assert!(
            with(&["bucket=b", "key=k", "size=128M", "object-size=128M"])
                .unwrap()
                .contains("between")
        );
        assert!(bad(&["bucket=b", "key=k", "access-key=a"])
            .unwrap()
            .contains("together"));
        assert!(with(&["bucket=b", "key=k", "endpoint-url=ftp://x"]).is_some());
        assert!(with(&["bucket=b", "key=k", "size=1M", "object-size=64k"]).is_none());
        assert!(with(&["bucket=b", "key=k"]).is_none());
    }

    #[test]
    fn ini_sections() {
        let text = "\
# comment
[default]
aws_access_key_id = A1
aws_secret_access_key=S1

[profile other]
region = eu-west-1
[other]
aws_access_key_id = A2
";
        let d = parse_ini_section(text, "default");
        assert_eq!(d.get("aws_access_key_id").map(String::as_str), Some("A1"));
        assert_eq!(
            d.get("aws_secret_access_key").map(String::as_str),
            Some("S1")
        );
        assert_eq!(d.len(), 2);
        let p = parse_ini_section(text, "profile other");
        assert_eq!(p.get("region").map(String::as_str), Some("eu-west-1"));
        let o = parse_ini_section(text, "other");
        assert_eq!(o.get("aws_access_key_id").map(String::as_str), Some("A2"));
        assert!(parse_ini_section(text, "none").is_empty());
    }

    #[test]
    fn pieces_split_at_chunks() {
        let c = Chunks {
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
