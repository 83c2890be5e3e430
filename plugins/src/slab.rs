//! Page memory for the sparse store: fixed-size slots carved out of
//! 2 MiB slabs that the kernel may back with transparent huge pages.
//!
//! Filling a RAM disk is dominated by the kernel's work on fresh anonymous
//! memory: with 4 KiB pages, a 2 GiB write takes half a million page
//! faults. Slabs of [`SLAB_SIZE`] bytes, aligned to it and marked
//! `MADV_HUGEPAGE`, are faulted in a huge page at a time where the system
//! allows it (`/sys/kernel/mm/transparent_hugepage/enabled` set to
//! `madvise` or `always`), and cost the same as before where it does not.
//!
//! Every free slot reads as zero: slots come from fresh mappings, and a
//! slot given back is emptied with `MADV_DONTNEED`, which also returns its
//! memory to the system (so trimming a RAM disk shrinks the process, as
//! with upstream's allocator). Slabs are kept for reuse, never unmapped.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Size and alignment of a slab: one x86-64 / aarch64 (4K granule)
/// transparent huge page.
pub const SLAB_SIZE: usize = 2 << 20;

/// The slot size, the sparse store's page size.
pub const SLOT_SIZE: usize = crate::sparse::PAGE_SIZE;

/// Free slots (addresses), all reading as zero.
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// One zeroed-on-allocation slot of [`SLOT_SIZE`] bytes, given back to
/// the pool when dropped.
pub struct SlabPage {
    ptr: NonNull<u8>,
}

// SAFETY: a SlabPage owns its slot exclusively (like a Box<[u8]>): the
// pool hands each address to one SlabPage at a time.
unsafe impl Send for SlabPage {}
// SAFETY: shared access only reads through &[u8].
unsafe impl Sync for SlabPage {}

fn free_list() -> std::sync::MutexGuard<'static, Vec<usize>> {
    FREE.lock().unwrap_or_else(|e| e.into_inner())
}

impl SlabPage {
    /// A slot of zeroes, or `None` if the system has no memory for a new
    /// slab.
    pub fn zeroed() -> Option<SlabPage> {
        // (The pop's guard must be gone before the None arm locks again.)
        let popped = free_list().pop();
        let addr = match popped {
            Some(a) => a,
            None => {
                let base = new_slab()?;
                let mut free = free_list();
                free.extend((1..SLAB_SIZE / SLOT_SIZE).map(|i| base + i * SLOT_SIZE));
                base
            }
        };
        Some(SlabPage {
            ptr: NonNull::new(addr as *mut u8)?,
        })
    }
}

/// Map a new slab aligned to [`SLAB_SIZE`] and ask for huge pages.
fn new_slab() -> Option<usize> {
    let len = 2 * SLAB_SIZE;
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(SLAB_SIZE);
    let head = aligned - start;
    let tail = len - head - SLAB_SIZE;
    // SAFETY: the head and tail are parts of the mapping just made that
    // lie outside the aligned slab, unused by anyone.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + SLAB_SIZE) as *mut libc::c_void, tail);
        }
        // Advice only: without THP the slab works with small pages.
        libc::madvise(aligned as *mut libc::c_void, SLAB_SIZE, libc::MADV_HUGEPAGE);
    }
    Some(aligned)
}

impl Deref for SlabPage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the slot is SLOT_SIZE mapped bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), SLOT_SIZE) }
    }
}

impl DerefMut for SlabPage {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for deref, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), SLOT_SIZE) }
    }
}

impl Drop for SlabPage {
    fn drop(&mut self) {
        // SAFETY: the slot is ours and nobody uses it any more; after
        // MADV_DONTNEED a private anonymous range reads as zero and its
        // memory goes back to the system.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), SLOT_SIZE, libc::MADV_DONTNEED) };
        if r != 0 {
            // Cannot happen for a range we mapped; if it did, zero by hand
            // so the free-slot invariant holds.
            self.fill(0);
        }
        free_list().push(self.ptr.as_ptr() as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_zeroed_reused_and_distinct() {
        let mut pages: Vec<SlabPage> = (0..200).map(|_| SlabPage::zeroed().unwrap()).collect();
        for (i, p) in pages.iter_mut().enumerate() {
            assert!(p.iter().all(|&b| b == 0));
            p.fill(i as u8 + 1);
        }
        // No two pages overlap.
        for (i, p) in pages.iter().enumerate() {
            assert!(p.iter().all(|&b| b == i as u8 + 1));
        }
        let addr = pages[7].as_ptr() as usize;
        assert_eq!(addr % SLOT_SIZE, 0);
        pages.truncate(7);
        // Given-back slots read as zero when handed out again.
        for _ in 0..300 {
            let p = SlabPage::zeroed().unwrap();
            assert!(p.iter().all(|&b| b == 0));
            pages.push(p);
        }
    }
}
