//! Image locking compatible with qemu's (`block/file-posix.c`): an open
//! file description lock (F_OFD_SETLK, shared) on byte 100+N for each
//! permission N held, and on byte 200+N for each permission N that
//! others may not take; a permission is refused while someone else
//! holds the byte that denies it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// qemu's permission bits (BLK_PERM_*).
pub const PERM_READ: u32 = 1 << 0;
pub const PERM_WRITE: u32 = 1 << 1;
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
pub const PERM_RESIZE: u32 = 1 << 3;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// What a reader holds and shares (as `qemu-img info`, `qemu-nbd -r`).
pub const READER: (u32, u32) = (PERM_READ, PERM_READ | PERM_WRITE_UNCHANGED);
/// What a writer holds and shares (as `qemu-io`, `qemu-nbd`).
pub const WRITER: (u32, u32) = (
    PERM_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE,
    PERM_READ | PERM_WRITE_UNCHANGED,
);

/// The lock file description and the bytes it holds.
pub struct ImageLock {
    file: File,
    /// Bytes locked now (offsets).
    held: Vec<i64>,
}

fn flock(kind: i32, off: i64) -> libc::flock {
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = kind as i16;
    f.l_whence = libc::SEEK_SET as i16;
    f.l_start = off;
    f.l_len = 1;
    f
}

impl ImageLock {
    /// Open `path` for locking (nothing locked yet).
    pub fn open(path: &Path) -> std::io::Result<ImageLock> {
        Ok(ImageLock {
            file: File::open(path)?,
            held: Vec::new(),
        })
    }

    /// Does another file description hold byte `off`?
    fn taken(&self, off: i64) -> std::io::Result<bool> {
        let mut f = flock(libc::F_WRLCK, off);
        // SAFETY: F_OFD_GETLK fills `f`.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut f) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f.l_type != libc::F_UNLCK as i16)
    }

    fn set(&self, kind: i32, off: i64) -> std::io::Result<()> {
        let f = flock(kind, off);
        // SAFETY: F_OFD_SETLK reads `f`.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &f) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Hold permissions `perm` and share only `shared`, as qemu does;
    /// the error names the lock another process holds.
    pub fn apply(&mut self, (perm, shared): (u32, u32)) -> Result<(), String> {
        let io = |e: std::io::Error| format!("image locking failed: {e}");
        for (i, name) in NAMES.iter().enumerate() {
            let bit = 1u32 << i;
            if perm & bit != 0 && self.taken(SHARED_BASE + i as i64).map_err(io)? {
                return Err(format!(
                    "Failed to get \"{name}\" lock: is another process using the image?"
                ));
            }
            if shared & bit == 0 && self.taken(PERM_BASE + i as i64).map_err(io)? {
                return Err(format!(
                    "Failed to get shared \"{name}\" lock: is another process using the image?"
                ));
            }
        }
        let mut want = Vec::new();
        for i in 0..NAMES.len() as i64 {
            let bit = 1u32 << i;
            if perm & bit != 0 {
                want.push(PERM_BASE + i);
            }
            if shared & bit == 0 {
                want.push(SHARED_BASE + i);
            }
        }
        for &off in &want {
            self.set(libc::F_RDLCK, off).map_err(|e| {
                format!("Failed to lock byte {off}: is another process using the image? ({e})")
            })?;
        }
        for &off in &self.held {
            if !want.contains(&off) {
                let _ = self.set(libc::F_UNLCK, off);
            }
        }
        self.held = want;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_excludes_writer_and_reader_excludes_writer() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut a = ImageLock::open(f.path()).unwrap();
        let mut b = ImageLock::open(f.path()).unwrap();
        a.apply(WRITER).unwrap();
        let e = b.apply(WRITER).unwrap_err();
        assert!(e.contains("write"), "{e}");
        // Readers do not share write either.
        assert!(b.apply(READER).is_err());
        a.apply(READER).unwrap();
        b.apply(READER).unwrap();
        assert!(a.apply(WRITER).is_err());
        drop(b);
        a.apply(WRITER).unwrap();
    }
}
