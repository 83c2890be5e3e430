//! Repair of an image whose dirty bit is set: qemu with
//! `lazy_refcounts=on` sets it and defers refcount updates, so after a
//! crash the refcounts on disk may be too low. Before the first write the
//! refcounts are counted again from every structure that references
//! clusters (as `qemu-img check -r all` does): the header cluster, the
//! active and every snapshot's L1 table, the L2 tables they point to
//! (once per L1 reference) and the clusters those point to (once per L2
//! entry), compressed clusters' host clusters, the snapshot table, the
//! refcount table and its blocks. Every refcount that differs is set to
//! the count, the COPIED flags of the active tables are set to match
//! (COPIED exactly where the count is 1), the metadata is written back in
//! the usual order, and only then is the dirty bit cleared. A crash
//! during the repair leaves the bit set, and the next open repairs again.

use std::collections::HashMap;

use libnbd::{Flags, Handle, Result};

use super::super::header::INCOMPAT_DIRTY;
use super::{bad, from_be_bytes, rc_get, Image, COMPRESSED, COPIED, OFFSET_MASK};

/// Cluster references counted so far (cluster index -> count).
struct Counts<'a> {
    img: &'a Image,
    file_len: u64,
    n: HashMap<u64, u64>,
}

impl Counts<'_> {
    /// One more reference to each cluster `[off, off+len)` touches.
    fn add(&mut self, what: &str, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.file_len.next_multiple_of(self.img.cs))
            .ok_or_else(|| {
                bad(format!(
                    "{what} at {off:#x} lies beyond the end of the file"
                ))
            })?;
        for c in (off >> self.img.cb)..=((end - 1) >> self.img.cb) {
            *self.n.entry(c).or_default() += 1;
        }
        Ok(())
    }

    /// The host range of compressed cluster descriptor `desc`.
    fn compressed_range(&self, desc: u64) -> (u64, u64) {
        let cb = self.img.cb;
        let x = 62 - (cb - 8);
        let host = desc & ((1u64 << x) - 1);
        let nsec = ((desc >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
        (host, nsec * 512 - (host & 511))
    }

    /// Count an L1 table (`entries` of it) and everything below it.
    async fn walk_l1(&mut self, io: &dyn Handle, l1: &[u64]) -> Result<()> {
        let step = if self.img.ext { 2 } else { 1 };
        for &l1e in l1 {
            let l2off = l1e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            self.add("an L2 table", l2off, self.img.cs)?;
            let t = self.img.load_l2(io, l2off).await?;
            for e in t.iter().step_by(step) {
                if e & COMPRESSED != 0 {
                    let (h, len) = self.compressed_range(e & !(COPIED | COMPRESSED));
                    self.add("a compressed cluster", h, len)?;
                } else if e & OFFSET_MASK != 0 {
                    self.add("a data cluster", e & OFFSET_MASK, self.img.cs)?;
                }
            }
        }
        Ok(())
    }
}

impl Image {
    /// Does the image need [`Image::repair`] before it is written?
    pub fn needs_repair(&self) -> bool {
        self.h.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Why the dirty image cannot be repaired here, if it cannot.
    fn repair_refusal(&self) -> Option<&'static str> {
        if self.h.bitmaps_ext {
            return Some("it has persistent bitmaps");
        }
        None
    }

    /// Count the references again and set the refcounts (and COPIED
    /// flags) to them, then clear the dirty bit. See the module doc.
    pub async fn repair(&mut self, io: &dyn Handle) -> Result<()> {
        if let Some(why) = self.repair_refusal() {
            return Err(bad(format!(
                "the image is marked dirty and cannot be repaired here because {why} \
                 (run qemu-img check -r all)"
            )));
        }
        let cs = self.cs;
        let file_len = io.size()?;
        let mut c = Counts {
            img: self,
            file_len,
            n: HashMap::new(),
        };
        c.add("the header", 0, cs)?;
        let l1 = self.lock().l1.clone();
        c.add("the L1 table", self.h.l1_table_offset, l1.len() as u64 * 8)?;
        c.walk_l1(io, &l1).await?;
        c.add(
            "the refcount table",
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters as u64 * cs,
        )?;
        let mut tb = vec![0u8; (self.h.refcount_table_clusters as u64 * cs) as usize];
        self.read_host(io, &mut tb, self.h.refcount_table_offset)
            .await?;
        for e in from_be_bytes(&tb) {
            if e & OFFSET_MASK != 0 {
                c.add("a refcount block", e & OFFSET_MASK, cs)?;
            }
        }
        // The snapshot table: entries of 40 bytes, their extra data, id
        // and name, each entry padded to 8 bytes.
        let mut at = self.h.snapshots_offset;
        for i in 0..self.h.nb_snapshots {
            let mut e = [0u8; 40];
            self.read_host(io, &mut e, at).await?;
            let be32 = |o: usize| u32::from_be_bytes(e[o..o + 4].try_into().unwrap());
            let l1_off = u64::from_be_bytes(e[0..8].try_into().unwrap());
            let l1_size = be32(8) as u64;
            let id_len = u16::from_be_bytes([e[12], e[13]]) as u64;
            let name_len = u16::from_be_bytes([e[14], e[15]]) as u64;
            let extra = be32(36) as u64;
            if l1_size > (32 << 20) / 8 {
                return Err(bad(format!("snapshot {i}: L1 table of {l1_size} entries")));
            }
            c.add("a snapshot's L1 table", l1_off, l1_size * 8)?;
            let mut b = vec![0u8; (l1_size * 8) as usize];
            self.read_host(io, &mut b, l1_off).await?;
            c.walk_l1(io, &from_be_bytes(&b)).await?;
            at += (40 + extra + id_len + name_len).next_multiple_of(8);
        }
        if self.h.nb_snapshots > 0 {
            c.add(
                "the snapshot table",
                self.h.snapshots_offset,
                at - self.h.snapshots_offset,
            )?;
        }
        let counts = c.n;
        let count = |host: u64| counts.get(&(host >> self.cb)).copied().unwrap_or(0);

        // Set the refcounts, then the COPIED flags of the active tables.
        self.load_refcounts(io).await?;
        let mut fixed = 0u64;
        {
            let mut st = self.lock();
            let per = self.per_block();
            let order = self.h.refcount_order;
            let clusters = file_len.div_ceil(cs);
            for idx in 0..clusters {
                let t = (idx / per) as usize;
                let rc = st.rc.as_ref().unwrap();
                let stored = match rc.table.get(t).map(|e| e & OFFSET_MASK) {
                    Some(b) if b != 0 => rc
                        .blocks
                        .get(&b)
                        .map_or(0, |blk| rc_get(blk, (idx % per) as usize, order)),
                    _ => 0,
                };
                let want = counts.get(&idx).copied().unwrap_or(0);
                if stored != want {
                    self.rc_add(&mut st, idx << self.cb, want as i64 - stored as i64)?;
                    fixed += 1;
                }
            }
        }
        let mut flags = 0u64;
        for (i, &l1e) in l1.iter().enumerate() {
            let l2off = l1e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            let want = if count(l2off) == 1 { COPIED } else { 0 };
            if l1e & COPIED != want {
                let mut st = self.lock();
                st.l1[i] = (l1e & !COPIED) | want;
                st.l1_dirty = true;
                flags += 1;
            }
            let mut t = self.load_l2(io, l2off).await?;
            let mut changed = false;
            for e in t.iter_mut().step_by(if self.ext { 2 } else { 1 }) {
                let host = *e & OFFSET_MASK;
                let want = if *e & COMPRESSED == 0 && host != 0 && count(host) == 1 {
                    COPIED
                } else {
                    0
                };
                if *e & COPIED != want {
                    *e = (*e & !COPIED) | want;
                    changed = true;
                    flags += 1;
                }
            }
            if changed {
                let mut st = self.lock();
                st.l2.insert(l2off, t);
                st.l2_dirty.insert(l2off);
            }
        }
        self.flush(io).await?;
        let incompat = self.h.incompatible & !INCOMPAT_DIRTY;
        io.pwrite(&incompat.to_be_bytes(), 72, Flags::NONE).await?;
        io.flush(Flags::NONE).await?;
        self.h.incompatible = incompat;
        libnbd::elog!(
            "nbdkit: qcow2: the image was marked dirty (not closed cleanly): refcounts \
             counted again, {fixed} refcounts and {flags} COPIED flags corrected"
        );
        Ok(())
    }
}
