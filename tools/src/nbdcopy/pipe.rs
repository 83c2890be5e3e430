//! Streams: `-` for stdin or stdout when it is a pipe, socket or
//! terminal, and named pipes or character devices
//! (`nbdcopy nbd://server - | file -`,
//! `cat disk | nbdcopy - nbd://server`).
//!
//! A stream has no size (a source ends where reading returns nothing)
//! and is read or written strictly in order, one operation at a time;
//! the copy strategies see [`Endpoint::is_stream`] and keep the other
//! side pipelined. Zero ranges become literal zeroes on the output.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::endpoint::{Data, Endpoint, ZEROES};

/// A stream read or written in order.
#[derive(Debug)]
pub struct PipeEndpoint {
    name: String,
    /// The stream and the offset of its next byte (to catch a caller
    /// that skips or repeats bytes).
    inner: Arc<Mutex<(File, u64)>>,
}

/// A duplicate of fd 0 or 1, so closing the endpoint leaves the process'
/// own stdin and stdout alone.
pub fn dup_std(fd: BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// Stdin (`for_write` false) or stdout as a `File`.
pub fn std_file(for_write: bool) -> io::Result<File> {
    if for_write {
        dup_std(io::stdout().as_fd())
    } else {
        dup_std(io::stdin().as_fd())
    }
}

impl PipeEndpoint {
    /// A stream over an open file.
    pub fn new(name: String, file: File) -> PipeEndpoint {
        PipeEndpoint {
            name,
            inner: Arc::new(Mutex::new((file, 0))),
        }
    }

    /// Run `f` on the stream on a blocking thread, checking that the
    /// operation starts where the last one ended.
    async fn blocking<T, F>(&self, offset: u64, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut File, &mut u64) -> io::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
            let (file, pos) = &mut *g;
            if *pos != offset {
                return Err(io::Error::other(format!(
                    "stream accessed out of order (at {pos}, asked for {offset})"
                )));
            }
            f(file, pos)
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[async_trait]
impl Endpoint for PipeEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "pipe_ops"
    }

    fn size(&self) -> Option<u64> {
        None
    }

    fn is_stream(&self) -> bool {
        true
    }

    fn wants_sparse(&self) -> bool {
        // Zeroes are written out as bytes anyway.
        false
    }

    async fn read(&self, mut buf: Vec<u8>, offset: u64) -> io::Result<Vec<u8>> {
        self.blocking(offset, move |f, pos| {
            let mut got = 0;
            while got < buf.len() {
                match f.read(&mut buf[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(got);
            *pos += got as u64;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, data: Data, offset: u64) -> io::Result<()> {
        self.blocking(offset, move |f, pos| {
            f.write_all(&data)?;
            *pos += data.len() as u64;
            Ok(())
        })
        .await
    }

    async fn zero(&self, offset: u64, length: u64, _allocate: bool) -> io::Result<bool> {
        self.blocking(offset, move |f, pos| {
            let mut left = length;
            while left > 0 {
                let n = left.min(ZEROES.len() as u64) as usize;
                f.write_all(&ZEROES[..n])?;
                left -= n as u64;
            }
            *pos += length;
            Ok(true)
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.lock().unwrap_or_else(|e| e.into_inner()).0.flush()
        })
        .await
        .map_err(io::Error::other)?
    }
}
