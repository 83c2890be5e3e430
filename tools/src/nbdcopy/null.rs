//! `null:`: a destination that throws everything away, for measuring
//! how fast a source can be read (`nbdcopy nbd://server null:`).
//!
//! Like libnbd's, it has the largest size a disk can have, so any
//! source fits, and it is not valid as a source (there `null:` is a file
//! name).

use std::io;

use async_trait::async_trait;

use super::endpoint::{Data, Endpoint};

/// The `null:` sink.
#[derive(Debug, Default)]
pub struct NullEndpoint;

/// Is this argument the null destination?
pub fn is_null(arg: &str) -> bool {
    arg == "null:"
}

#[async_trait]
impl Endpoint for NullEndpoint {
    fn name(&self) -> &str {
        "null:"
    }

    fn kind(&self) -> &'static str {
        "null_ops"
    }

    fn size(&self) -> Option<u64> {
        Some(i64::MAX as u64)
    }

    fn wants_sparse(&self) -> bool {
        // Writing data costs as little as writing nothing.
        false
    }

    fn is_zero(&self) -> bool {
        true
    }

    async fn read(&self, _buf: Vec<u8>, _offset: u64) -> io::Result<Vec<u8>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "null: cannot be read",
        ))
    }

    async fn write(&self, _data: Data, _offset: u64) -> io::Result<()> {
        Ok(())
    }

    async fn zero(&self, _offset: u64, _length: u64, _allocate: bool) -> io::Result<bool> {
        Ok(true)
    }
}
