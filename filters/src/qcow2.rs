//! # qcow2: serve, write and create qcow2 images
//!
//! The layer below holds a qcow2 image (version 2 or 3, as `qemu-img
//! create -f qcow2` makes); clients see its virtual disk, readable and
//! writable, with the image's backing chain followed. With `create=true`
//! the filter first makes a fresh, empty version 3 image, so a copy into
//! qcow2 needs neither `qemu-img` nor `qemu-nbd`. `qcow2dec` is the same
//! filter read-only, under upstream's name.
//!
//! ```text
//! nbdkit --filter=qcow2 file disk.qcow2
//! nbdkit --filter=qcow2 file out.qcow2 create=true size=5G
//! nbdkit curl URL --filter=xz --run 'nbdcopy -p -- $uri [ nbdkit --filter=qcow2 file cloud.qcow2 create=true size=10G ]'
//! nbdkit --filter=qcow2 file overlay.qcow2 copy-on-read=true
//! ```
//!
//! ## Parameters
//!
//! - `create=true`: make a fresh, empty qcow2 version 3 image in the
//!   file of the file plugin (`file=`) before serving it, replacing what
//!   the file held. Needs `size=`.
//! - `size=SIZE`: the virtual size of the image `create=true` makes.
//! - `cluster-size=SIZE` (default 64K): its cluster size, a power of 2
//!   from 512 to 2M.
//! - `preallocation=off|metadata` (default `off`): with `metadata`, the
//!   created image has every L2 table and a (sparse) host cluster for
//!   every guest cluster, as `qemu-img create -o preallocation=metadata`.
//! - `backing=NAME`: the backing file of the created image (a file name,
//!   relative to the image's directory, or an NBD URI such as
//!   `nbd://host:port/export`, or qemu's `nbd:host:port` or
//!   `nbd:unix:/path` forms); when not creating, the backing file to use
//!   instead of the one the image names.
//! - `backing-format=raw|qcow2`: the format of `backing=` (default: the
//!   image's backing format header extension, else probed).
//! - `copy-on-read=true`: data read from the backing chain is also
//!   written, whole clusters at a time, into the image, so that the
//!   image fills up as it is read (qemu's `copy-on-read`).
//! - `force-share=true`: take no image locks, and ignore those of
//!   others (as `qemu-img -U`).
//!
//! ## Behaviour
//!
//! Reads handle unallocated clusters (from the backing file, or zeroes;
//! beyond a shorter backing file, zeroes), zero clusters, normal
//! clusters and compressed clusters (zlib and zstd), and extended L2
//! entries (subclusters). Images with an external data file, encryption,
//! or unknown incompatible features are refused with a message saying
//! which. Backing files are raw or qcow2 files, or NBD exports.
//!
//! Writes allocate clusters at the end of the file (copying in what the
//! rest of a cluster held: backing data, a compressed cluster's data),
//! allocate L2 tables and refcount blocks, and grow the refcount table
//! when the file outgrows it. Allocating writes of different requests
//! go on in parallel: only the allocation itself and the setting of the
//! L2 entries once the data is written are serialised; a cluster reads
//! as before until then, and another write into it waits. Metadata is
//! kept in memory and written back at each flush or FUA request (none
//! when nothing changed), and when a connection closes: first the
//! refcount blocks are written and made stable together with the data
//! (one sync), then (after a sync) the refcount table, then the L2 and
//! L1 tables, and only then are clusters the old tables pointed to
//! given back. As fresh clusters fill the end of the file (a copy into
//! the image), their writeback to the disk is started every 16 MiB
//! (`sync_file_range`, not waited for), so that a flush or the close
//! waits for the last few MiB only. The image on disk is
//! therefore consistent at every moment: after a crash `qemu-img check`
//! finds at most leaked clusters, and everything flushed is there. Zero
//! requests set zero clusters (version 3) or deallocate (version 2, no
//! backing file); trim deallocates. In images with internal snapshots
//! (`qemu-img snapshot -c`), clusters and L2 tables a snapshot shares
//! are copied before they are written (the snapshots read as before);
//! their clusters are never trimmed. An image with the dirty bit set
//! (qemu's `lazy_refcounts=on`, its writer killed: refcounts on disk may
//! be too low) is repaired before the first write, as qemu does when it
//! opens one: every refcount counted again from the metadata, the COPIED
//! flags set to match, then the bit cleared (served read-only, it is left
//! as it is). In images with extended L2 entries (subclusters), a write
//! into a cluster not allocated all through gives it a fresh cluster
//! holding the whole of it, every subcluster allocated; zeroing whole
//! clusters marks their subclusters zero. Persistent dirty bitmaps
//! (`qemu-img bitmap --add`, libvirt's checkpoints) are kept up to date:
//! each enabled bitmap records every write, zero and trim, is marked in
//! use while bits are gathered in memory, and is written back when the
//! last writing connection closes (a killed server leaves it marked in
//! use, as qemu would). Images with the corrupt bit set, or a bitmap
//! that cannot be kept up to date (an unknown type or extra data), are
//! served read-only (with a message saying why).
//! Over a plugin other than `file` the image is read and written in
//! place but cannot grow past that plugin's size, and is not locked.
//!
//! `extents` come from the L2 tables (zero and unallocated clusters are
//! holes, through the backing chain as qemu-nbd reports them), and the
//! `qemu:allocation-depth` meta context says which layer of the chain
//! holds each range (0: none, 1: this image, 2: its backing file...), as
//! qemu-nbd's does.
//!
//! When the layer below is the file plugin, the image file is locked as
//! qemu locks it (open file description locks on bytes 100+ and 200+):
//! a shared lock while the server runs, and, as qemu-nbd does, a
//! writer's lock from the start when the image is writable (not `-r`,
//! not `qcow2dec`, not `force-share=true`, the file writable, the
//! image's header allowing writes). A second writer, ours or qemu's, is
//! refused, even before our first client, and so is a writer while we
//! read.

mod backing;
mod header;
mod image;
mod lock;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Fua,
    Handle, Next, OpenContext, Params, Result,
};

use image::{Image, Map};
use lock::ImageLock;

/// The meta context of allocation depths.
pub use libnbd::protocol::CONTEXT_ALLOCATION_DEPTH as ALLOCATION_DEPTH;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "qcow2",
    help: "\
create=true              Make a fresh qcow2 image first.
size=<SIZE>              Virtual size of the created image.
cluster-size=<SIZE>      Cluster size of the created image (default 64K).
preallocation=off|metadata  Preallocate metadata in the created image.
backing=<NAME>           Backing file (created image, or override).
backing-format=raw|qcow2 Format of the backing file.
copy-on-read=true        Copy data read from the backing chain into the image.
force-share=true         Take no image locks.",
    create,
};

/// Configuration shared with `qcow2dec`.
pub struct Config {
    /// Serve read-only (qcow2dec).
    pub readonly: bool,
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    build(p, Config { readonly: false })
}

fn cerr(e: impl std::fmt::Display) -> ConfigError {
    ConfigError::new(format!("qcow2: {e}"))
}

/// Build the filter (for `qcow2` and `qcow2dec`).
pub fn build(p: &mut Params, cfg: Config) -> ConfigResult<Arc<dyn Filter>> {
    let path = p
        .items()
        .iter()
        .find(|(k, _)| k == "file")
        .map(|(_, v)| PathBuf::from(v));
    let (mut create, mut size, mut csize, mut prealloc) = (false, None, 65536u64, false);
    let (mut backing, mut backing_fmt, mut cor, mut force_share) = (None, None, false, false);
    if !cfg.readonly {
        create = p.take_bool("create")?.unwrap_or(false);
        size = p.take_size("size")?;
        csize = p.take_size("cluster-size")?.unwrap_or(65536);
        prealloc = match p.take("preallocation").as_deref() {
            None | Some("off") => false,
            Some("metadata") => true,
            Some(o) => {
                return Err(cerr(format!(
                    "preallocation={o}: only off and metadata are supported"
                )))
            }
        };
        backing = p.take("backing");
        backing_fmt = p.take("backing-format");
        cor = p.take_bool("copy-on-read")?.unwrap_or(false);
        force_share = p.take_bool("force-share")?.unwrap_or(false);
    }
    if let Some(f) = backing_fmt.as_deref() {
        if f != "raw" && f != "qcow2" {
            return Err(cerr(format!("backing-format={f}: must be raw or qcow2")));
        }
    }
    if create {
        let Some(path) = &path else {
            return Err(cerr("create=true needs the file plugin (file=FILENAME)"));
        };
        let size = size.ok_or_else(|| cerr("create=true needs size=SIZE"))?;
        if !csize.is_power_of_two() || !(512..=(2 << 20)).contains(&csize) {
            return Err(cerr("cluster-size must be a power of 2 from 512 to 2M"));
        }
        let bits = csize.trailing_zeros();
        let b = backing
            .as_deref()
            .map(|n| (n, backing_fmt.as_deref().unwrap_or("raw")));
        let (bytes, total) =
            header::fresh_image(size, bits, b, prealloc).map_err(|e| cerr(e.msg))?;
        write_fresh(path, &bytes, total).map_err(|e| cerr(format!("{}: {e}", path.display())))?;
        // The image names its backing file itself now.
        backing = None;
        backing_fmt = None;
    } else if size.is_some() {
        return Err(cerr("size= is only for create=true"));
    }
    let header = match &path {
        Some(path) => Some(check_header(path).map_err(cerr)?),
        None => None,
    };
    let lock = match (&path, force_share) {
        (Some(path), false) => {
            let mut l =
                ImageLock::open(path).map_err(|e| cerr(format!("{}: {e}", path.display())))?;
            l.apply(lock::READER).map_err(cerr)?;
            Some(Mutex::new(l))
        }
        _ => None,
    };
    // The image file, for the early writeback of fresh clusters: opened
    // for writing where it can be, which says it is writable too.
    let (file, file_writable) = match &path {
        Some(p) => match std::fs::OpenOptions::new().read(true).write(true).open(p) {
            Ok(f) => (Some(f), true),
            Err(_) => (std::fs::File::open(p).ok(), false),
        },
        None => (None, false),
    };
    // A writable image is locked for writing from the start (as
    // qemu-nbd does), unless the server is read-only (`after_fork`).
    let lock_at_start = lock.is_some()
        && !cfg.readonly
        && file_writable
        && header
            .as_ref()
            .is_some_and(|h| h.incompatible & header::INCOMPAT_CORRUPT == 0);
    let dir = path
        .as_ref()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    Ok(Arc::new(Qcow2Filter {
        readonly: cfg.readonly,
        dir,
        backing,
        backing_fmt,
        cor,
        lock,
        lock_at_start,
        writeback: file.map(Arc::new),
        write_locked: Mutex::new(false),
        images: tokio::sync::Mutex::new(HashMap::new()),
    }))
}

/// Refuse at start-up what the image's header says we cannot serve.
fn check_header(path: &std::path::Path) -> std::result::Result<header::Header, String> {
    use std::io::Read;
    let mut b = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(2 << 20).read_to_end(&mut b))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    header::Header::parse(&b).map_err(|e| {
        format!(
            "{}: {}",
            path.display(),
            e.msg.trim_start_matches("qcow2: ")
        )
    })
}

fn write_fresh(path: &std::path::Path, bytes: &[u8], total: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_len(total)?;
    f.sync_all()
}

struct Qcow2Filter {
    readonly: bool,
    dir: Option<PathBuf>,
    backing: Option<String>,
    backing_fmt: Option<String>,
    cor: bool,
    lock: Option<Mutex<ImageLock>>,
    /// Take the writer's lock at start unless the server is read-only.
    lock_at_start: bool,
    /// The image file (`file=` of the plugin below), for the early
    /// writeback of fresh clusters.
    writeback: Option<Arc<std::fs::File>>,
    write_locked: Mutex<bool>,
    /// The open image of each export.
    images: tokio::sync::Mutex<HashMap<String, Arc<Image>>>,
}

impl Qcow2Filter {
    fn take_write_lock(&self) -> Result<()> {
        let Some(l) = &self.lock else { return Ok(()) };
        let mut done = self.write_locked.lock().unwrap_or_else(|e| e.into_inner());
        if !*done {
            l.lock()
                .unwrap_or_else(|e| e.into_inner())
                .apply(lock::WRITER)
                .map_err(|m| Error::new(libnbd::protocol::errno::EPERM, format!("qcow2: {m}")))?;
            *done = true;
        }
        Ok(())
    }
}

#[async_trait]
impl Filter for Qcow2Filter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let mut c = ctx.clone();
        if self.readonly {
            c.readonly = true;
        }
        let h = next.open(&c).await?;
        let img = {
            let mut images = self.images.lock().await;
            match images.get(&ctx.export_name) {
                Some(i) => i.clone(),
                None => {
                    let mut i = Image::open(
                        &*h,
                        self.dir.as_deref(),
                        self.backing.as_deref(),
                        self.backing_fmt.as_deref(),
                        0,
                    )
                    .await
                    .inspect_err(|e| libnbd::elog!("nbdkit: {}", e.msg))?;
                    if i.needs_repair() && !c.readonly && h.caps()?.write {
                        self.take_write_lock()?;
                        if let Err(e) = i.repair(&*h).await {
                            libnbd::elog!("nbdkit: {}", e.msg);
                        }
                    }
                    if let Some(f) = &self.writeback {
                        i.set_writeback(f.clone());
                    }
                    let i = Arc::new(i);
                    images.insert(ctx.export_name.clone(), i.clone());
                    i
                }
            }
        };
        let below = h.caps()?;
        let mut writable = !c.readonly && below.write;
        if writable {
            if let Some(why) = img.write_refusal() {
                libnbd::elog!("nbdkit: qcow2: serving read-only: {why}");
                writable = false;
            }
        }
        if writable {
            self.take_write_lock()?;
            img.writers
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(Box::new(Qcow2Handle {
            next: h,
            img,
            writable,
            cor: self.cor && writable,
            below,
        }))
    }

    fn after_fork(&self, server: &Arc<libnbd::server::ServerContext>) -> Result<()> {
        if self.lock_at_start && !server.readonly() {
            self.take_write_lock()?;
        }
        Ok(())
    }

    fn passes_meta_contexts(&self) -> bool {
        false
    }

    fn own_meta_contexts(&self) -> &'static [&'static str] {
        &[ALLOCATION_DEPTH]
    }
}

struct Qcow2Handle {
    next: Box<dyn Handle>,
    img: Arc<Image>,
    writable: bool,
    cor: bool,
    below: Caps,
}

impl Qcow2Handle {
    fn check_write(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::eperm("qcow2: the image is read-only"));
        }
        Ok(())
    }

    async fn after_write(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) {
            self.img.flush(&*self.next).await?;
        }
        Ok(())
    }

    /// Copy-on-read: write the backing chain's data under
    /// `[off, off+len)` into the image, whole clusters.
    async fn copy_up(&self, off: u64, len: u64) -> Result<()> {
        let cs = self.img.h.cluster_size();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let (m, n) = self.img.map(&*self.next, pos, end - pos).await?;
            if m == Map::Unalloc {
                let s = pos & !(cs - 1);
                let e = ((pos + n).div_ceil(cs) * cs).min(self.img.size());
                let mut b = vec![0u8; (e - s) as usize];
                self.img.read(&*self.next, &mut b, s).await?;
                // Another request may have written meanwhile, or be
                // writing: only clusters still unallocated take it.
                self.img.copy_up_write(&*self.next, &b, s).await?;
            }
            pos += n;
        }
        Ok(())
    }
}

impl Drop for Qcow2Handle {
    fn drop(&mut self) {
        if !self.writable {
            return;
        }
        // The last writer out writes the persistent bitmaps back.
        let last = self
            .img
            .writers
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1;
        let bitmaps = last && self.img.bitmaps_pending();
        if !self.img.is_dirty() && !bitmaps {
            return;
        }
        use tokio::runtime::{Handle as Runtime, RuntimeFlavor};
        match Runtime::try_current() {
            Ok(rt) if rt.runtime_flavor() == RuntimeFlavor::MultiThread => {
                let r = tokio::task::block_in_place(|| {
                    rt.block_on(async {
                        self.img.flush(&*self.next).await?;
                        if bitmaps {
                            self.img.sync_bitmaps(&*self.next).await?;
                        }
                        Ok::<(), Error>(())
                    })
                });
                if let Err(e) = r {
                    libnbd::elog!("nbdkit: qcow2: writing metadata back: {}", e.msg);
                }
            }
            _ => libnbd::elog!("nbdkit: qcow2: metadata not written back (no runtime)"),
        }
    }
}

#[async_trait]
impl Handle for Qcow2Handle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.img.size())
    }
    fn block_size(&self) -> Result<Option<libnbd::BlockSize>> {
        Ok(None)
    }
    fn caps(&self) -> Result<Caps> {
        let w = self.writable;
        Ok(Caps {
            write: w,
            flush: w,
            rotational: self.below.rotational,
            trim: w,
            zero: w,
            fast_zero: false,
            extents: true,
            fua: if w { Fua::Native } else { Fua::None },
            multi_conn: true,
            cache: Cache::None,
        })
    }
    async fn pread_shared(
        &self,
        _count: u32,
        _offset: u64,
        _flags: Flags,
    ) -> Result<Option<libnbd::backend::SharedData>> {
        Ok(None)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        if self.cor && self.img.backing.is_some() {
            self.copy_up(offset, buf.len() as u64).await?;
        }
        self.img.read(&*self.next, buf, offset).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check_write()?;
        self.img.write(&*self.next, buf, offset).await?;
        self.after_write(flags).await
    }
    async fn flush(&self, _flags: Flags) -> Result<()> {
        if self.writable {
            self.img.flush(&*self.next).await?;
        }
        Ok(())
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check_write()?;
        self.img.zero(&*self.next, count, offset, true).await?;
        self.after_write(flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check_write()?;
        if flags.contains(Flags::FAST_ZERO) {
            return Err(Error::enotsup("qcow2: fast zero not supported"));
        }
        self.img.zero(&*self.next, count, offset, false).await?;
        self.after_write(flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.img
            .extents(
                &*self.next,
                count,
                offset,
                flags.contains(Flags::REQ_ONE),
                ext,
            )
            .await
    }
    async fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    async fn meta_extents(
        &self,
        context: &str,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        if context == ALLOCATION_DEPTH {
            return self.img.depth(&*self.next, count, offset, 1, ext).await;
        }
        self.next
            .meta_extents(context, count, offset, flags, ext)
            .await
    }
}

#[cfg(test)]
mod tests;
