//! Several connections to one export, used round-robin.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::try_join_all;

use super::error::{Error, Result};
use super::transmit::Connection;
use super::types::{BlockStatus, ExportInfo};

/// N connections to the same export; each request goes to the next
/// connection in turn. Only servers advertising `CAN_MULTI_CONN` get
/// more than one connection (their connections see a consistent view,
/// and a flush on one covers writes completed on all).
///
/// ```no_run
/// # async fn f() -> libnbd::client::Result<()> {
/// use libnbd::client::{Connection, ConnectOptions, MultiConn};
/// let opts = ConnectOptions::new();
/// let m = MultiConn::open(4, || Connection::connect_uri("nbd://localhost", &opts)).await?;
/// let data = m.pread_vec(4096, 0, 0).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MultiConn {
    conns: Vec<Arc<Connection>>,
    next: AtomicUsize,
}

impl MultiConn {
    /// Make one connection with `connect`; if the server advertises
    /// multi-conn and `n > 1`, make `n - 1` more (concurrently).
    pub async fn open<F, Fut>(n: usize, mut connect: F) -> Result<MultiConn>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Connection>>,
    {
        let first = connect().await?;
        let mut conns = vec![first];
        if n > 1 && conns[0].can_multi_conn() {
            let more: Vec<Fut> = (1..n).map(|_| connect()).collect();
            conns.extend(try_join_all(more).await?);
        }
        MultiConn::new(conns)
    }

    /// Use these connections (at least one, all to the same export).
    pub fn new(conns: Vec<Connection>) -> Result<MultiConn> {
        let Some(first) = conns.first() else {
            return Err(Error::InvalidArgument(
                "MultiConn needs a connection".into(),
            ));
        };
        let size = first.size();
        if conns.iter().any(|c| c.size() != size) {
            return Err(Error::InvalidArgument(
                "MultiConn: the connections have different export sizes".into(),
            ));
        }
        Ok(MultiConn {
            conns: conns.into_iter().map(Arc::new).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Always false (there is at least one connection).
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The connections.
    pub fn connections(&self) -> &[Arc<Connection>] {
        &self.conns
    }

    /// The first connection (for the export's properties).
    pub fn first(&self) -> &Arc<Connection> {
        &self.conns[0]
    }

    /// The connection the next request goes to.
    pub fn next(&self) -> &Arc<Connection> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        self.conns[0].info()
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.conns[0].size()
    }

    /// See [`Connection::pread`].
    pub async fn pread(&self, buf: &mut [u8], offset: u64, flags: u16) -> Result<()> {
        self.next().pread(buf, offset, flags).await
    }

    /// See [`Connection::pread_vec`].
    pub async fn pread_vec(&self, count: usize, offset: u64, flags: u16) -> Result<Vec<u8>> {
        self.next().pread_vec(count, offset, flags).await
    }

    /// See [`Connection::pread_owned`].
    pub async fn pread_owned(&self, buf: Vec<u8>, offset: u64, flags: u16) -> Result<Vec<u8>> {
        self.next().pread_owned(buf, offset, flags).await
    }

    /// See [`Connection::pwrite`].
    pub async fn pwrite(&self, data: &[u8], offset: u64, flags: u16) -> Result<()> {
        self.next().pwrite(data, offset, flags).await
    }

    /// See [`Connection::trim`].
    pub async fn trim(&self, count: u64, offset: u64, flags: u16) -> Result<()> {
        self.next().trim(count, offset, flags).await
    }

    /// See [`Connection::zero`].
    pub async fn zero(&self, count: u64, offset: u64, flags: u16) -> Result<()> {
        self.next().zero(count, offset, flags).await
    }

    /// See [`Connection::cache`].
    pub async fn cache(&self, count: u64, offset: u64, flags: u16) -> Result<()> {
        self.next().cache(count, offset, flags).await
    }

    /// See [`Connection::block_status`].
    pub async fn block_status(&self, count: u64, offset: u64, flags: u16) -> Result<BlockStatus> {
        self.next().block_status(count, offset, flags).await
    }

    /// See [`Connection::block_status_filtered`].
    pub async fn block_status_filtered(
        &self,
        count: u64,
        offset: u64,
        flags: u16,
        contexts: &[&str],
    ) -> Result<BlockStatus> {
        self.next()
            .block_status_filtered(count, offset, flags, contexts)
            .await
    }

    /// Flush every connection (call it once the writes it should cover
    /// have completed).
    pub async fn flush(&self) -> Result<()> {
        try_join_all(self.conns.iter().map(|c| c.flush()))
            .await
            .map(|_| ())
    }

    /// Disconnect every connection.
    pub async fn disconnect(&self) -> Result<()> {
        try_join_all(self.conns.iter().map(|c| c.disconnect()))
            .await
            .map(|_| ())
    }
}
