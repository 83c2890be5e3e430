//! Persistent dirty bitmaps (`qemu-img bitmap --add`, libvirt's
//! checkpoints) kept up to date by our writes, as qemu keeps them.
//!
//! Every enabled bitmap (the `auto` flag, type 1, consistent) records
//! each write, zero and trim: the bits of the granules the request
//! touches are set. Before the first such request the bitmaps are
//! marked `in_use` on disk (so that a crash leaves them marked
//! inconsistent, never silently wrong); the bits are gathered in memory,
//! and when the last writing connection closes they are written back:
//! the bitmap data clusters (fresh ones allocated for parts of a bitmap
//! that had none), then the refcounts and the rest of the metadata, then
//! the bitmap tables, and only then is `in_use` cleared. Disabled
//! bitmaps, and bitmaps found inconsistent, are left as they are.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use libnbd::{Flags, Handle, Result};

use super::{bad, from_be_bytes, to_be_bytes, Image, OFFSET_MASK};

const IN_USE: u32 = 1;
const AUTO: u32 = 2;
const EXTRA_COMPATIBLE: u32 = 4;

/// One enabled bitmap.
pub(super) struct Bitmap {
    name: String,
    /// The offset of its directory entry in the file.
    entry_off: u64,
    flags: u32,
    table_off: u64,
    table: Vec<u64>,
    table_dirty: bool,
    gran_bits: u32,
    /// Bitmap data clusters changed in memory (by table index).
    data: BTreeMap<usize, Vec<u8>>,
}

/// The enabled bitmaps of an image.
#[derive(Default)]
pub(super) struct Bitmaps {
    pub(super) list: Vec<Bitmap>,
    /// `in_use` is set on disk: bits not yet written back.
    in_use: bool,
}

impl Image {
    /// Read the bitmap directory (an image whose header says its
    /// bitmaps are consistent), and the tables of the enabled bitmaps.
    /// Errors: a bitmap our writes could not keep up to date.
    pub(super) async fn load_bitmaps(&self, io: &dyn Handle) -> Result<Bitmaps> {
        let mut out = Bitmaps::default();
        let (off, size, n) = self.h.bitmap_dir;
        if !self.h.bitmaps_ext || self.h.autoclear & 1 == 0 || n == 0 {
            return Ok(out);
        }
        if size > 64 << 20 {
            return Err(bad(format!("bitmap directory of {size} bytes")));
        }
        let mut dir = vec![0u8; size as usize];
        self.read_host(io, &mut dir, off).await?;
        let mut at = 0usize;
        for _ in 0..n {
            if at + 24 > dir.len() {
                return Err(bad("bitmap directory truncated"));
            }
            let e = &dir[at..];
            let be32 = |o: usize| u32::from_be_bytes(e[o..o + 4].try_into().unwrap());
            let table_off = u64::from_be_bytes(e[0..8].try_into().unwrap());
            let table_size = be32(8) as u64;
            let flags = be32(12);
            let (kind, gran_bits) = (e[16], e[17] as u32);
            let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = be32(20) as usize;
            let name_at = 24 + extra;
            if at + name_at + name_len > dir.len() {
                return Err(bad("bitmap directory truncated"));
            }
            let name = String::from_utf8_lossy(&e[name_at..name_at + name_len]).into_owned();
            let entry_off = off + at as u64;
            at += (name_at + name_len).next_multiple_of(8);
            if flags & AUTO == 0 || flags & IN_USE != 0 {
                // Disabled, or already inconsistent: left alone.
                continue;
            }
            if kind != 1 {
                return Err(bad(format!("bitmap {name}: unknown type {kind}")));
            }
            if extra != 0 && flags & EXTRA_COMPATIBLE == 0 {
                return Err(bad(format!("bitmap {name}: unknown extra data")));
            }
            if !(9..=31).contains(&gran_bits) {
                return Err(bad(format!("bitmap {name}: granularity 2^{gran_bits}")));
            }
            let bits = self.h.size.div_ceil(1 << gran_bits);
            let need = bits.div_ceil(8).div_ceil(self.cs);
            if table_size < need || table_size > 1 << 24 {
                return Err(bad(format!(
                    "bitmap {name}: table of {table_size} entries (need {need})"
                )));
            }
            let mut t = vec![0u8; (table_size * 8) as usize];
            self.read_host(io, &mut t, table_off).await?;
            out.list.push(Bitmap {
                name,
                entry_off,
                flags,
                table_off,
                table: from_be_bytes(&t),
                table_dirty: false,
                gran_bits,
                data: BTreeMap::new(),
            });
        }
        Ok(out)
    }

    async fn set_flags(&self, io: &dyn Handle, b: &Bitmaps, in_use: bool) -> Result<()> {
        for bm in &b.list {
            let f = if in_use { bm.flags | IN_USE } else { bm.flags };
            io.pwrite(&f.to_be_bytes(), bm.entry_off + 12, Flags::NONE)
                .await?;
        }
        io.flush(Flags::NONE).await
    }

    /// Record a change of guest bytes `[off, off+len)` in the enabled
    /// bitmaps (before it is made).
    pub(super) async fn mark(&self, io: &dyn Handle, off: u64, len: u64) -> Result<()> {
        if !self.has_bitmaps || len == 0 {
            return Ok(());
        }
        let mut g = self.bitmaps.lock().await;
        let b = &mut *g;
        if !b.in_use {
            self.set_flags(io, b, true).await?;
            b.in_use = true;
            self.bitmaps_in_use.store(true, Ordering::Release);
        }
        let cs = self.cs;
        let end = (off + len).min(self.h.size);
        if off >= end {
            return Ok(());
        }
        let bits_per = cs * 8;
        for bm in &mut b.list {
            let (g0, g1) = (off >> bm.gran_bits, (end - 1) >> bm.gran_bits);
            for ti in (g0 / bits_per)..=(g1 / bits_per) {
                let i = ti as usize;
                let te = bm.table[i];
                let d = match bm.data.entry(i) {
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        if te & OFFSET_MASK == 0 && te & 1 != 0 {
                            continue; // All ones already.
                        }
                        let mut d = vec![0u8; cs as usize];
                        if te & OFFSET_MASK != 0 {
                            self.read_host(io, &mut d, te & OFFSET_MASK).await?;
                        }
                        v.insert(d)
                    }
                };
                let base = ti * bits_per;
                let (s, e) = (g0.max(base) - base, g1.min(base + bits_per - 1) - base + 1);
                set_bits(d, s as usize, e as usize);
            }
        }
        Ok(())
    }

    /// Write the gathered bits back and clear `in_use` (when the last
    /// writing connection closes). See the module doc for the order.
    pub async fn sync_bitmaps(&self, io: &dyn Handle) -> Result<()> {
        let mut g = self.bitmaps.lock().await;
        let b = &mut *g;
        if !b.in_use {
            return Ok(());
        }
        self.load_refcounts(io).await?;
        let cs = self.cs;
        for bm in &mut b.list {
            for (&i, d) in &bm.data {
                let mut host = bm.table[i] & OFFSET_MASK;
                if host == 0 {
                    let _a = self.alloc.lock().await;
                    let mut st = self.lock();
                    host = self.alloc_clusters(&mut st, 1)?;
                    drop(st);
                    bm.table[i] = host;
                    bm.table_dirty = true;
                }
                io.pwrite(d, host, Flags::NONE).await?;
                self.wrote(host + cs);
            }
            bm.data.clear();
        }
        // The data and the refcounts of fresh clusters stable before any
        // table points to them.
        self.flush(io).await?;
        for bm in &mut b.list {
            if bm.table_dirty {
                io.pwrite(&to_be_bytes(&bm.table), bm.table_off, Flags::NONE)
                    .await?;
                bm.table_dirty = false;
            }
        }
        io.flush(Flags::NONE).await?;
        self.set_flags(io, b, false).await?;
        b.in_use = false;
        self.bitmaps_in_use.store(false, Ordering::Release);
        let names: Vec<&str> = b.list.iter().map(|m| m.name.as_str()).collect();
        libnbd::debug!("qcow2: bitmaps written back: {}", names.join(", "));
        Ok(())
    }
}

/// Set bits `[s, e)` of `d` (bit 0 of byte 0 first).
fn set_bits(d: &mut [u8], s: usize, e: usize) {
    let mut i = s;
    while i < e && !i.is_multiple_of(8) {
        d[i / 8] |= 1 << (i % 8);
        i += 1;
    }
    while i + 8 <= e {
        d[i / 8] = 0xff;
        i += 8;
    }
    while i < e {
        d[i / 8] |= 1 << (i % 8);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn bits_set_lsb_first() {
        let mut d = [0u8; 4];
        set_bits(&mut d, 3, 19);
        assert_eq!(d, [0xf8, 0xff, 0x07, 0]);
        let mut d = [0u8; 2];
        set_bits(&mut d, 9, 10);
        assert_eq!(d, [0, 2]);
    }
}
