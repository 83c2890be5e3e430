//! # tls-fallback: safe content for plaintext clients of `--tls=on`
//!
//! With `--tls=on` clients may choose TLS or not. This filter serves
//! the plugin only to clients that did: a plaintext connection gets,
//! whatever export name it asked for, a read-only export of 512 bytes
//! holding a message (by default "This NBD server requires TLS
//! authentication before it will serve useful data."), and the layers
//! below are never opened for it. That fails more gently than
//! `--tls=require`. Place it first, so no filter does work on behalf of
//! plaintext clients.
//!
//! ```text
//! nbdkit --tls=on --tls-certificates=/certs --filter=tls-fallback file disk.img
//! ```
//!
//! ## Parameters
//!
//! - `tlsreadme=MESSAGE`: the content of the plaintext export instead of
//!   the default message, padded with NUL bytes to a multiple of 512.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    Caps, ConfigResult, Error, Filter, FilterEntry, Flags, Handle, Next, OpenContext, Params,
    Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "tls-fallback",
    help: "tlsreadme=<MESSAGE>       Alternative contents for the plaintext dummy export.",
    create,
};

/// What plaintext clients read unless `tlsreadme` says otherwise.
const README: &str =
    "This NBD server requires TLS authentication before it will serve useful data.\n";

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let msg = p.take("tlsreadme").unwrap_or_else(|| README.to_string());
    let mut readme = msg.into_bytes();
    readme.resize(readme.len().div_ceil(512).max(1) * 512, 0);
    Ok(Arc::new(TlsFallback {
        readme: readme.into(),
    }))
}

struct TlsFallback {
    /// The plaintext export's content, padded.
    readme: Arc<[u8]>,
}

#[async_trait]
impl Filter for TlsFallback {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        if ctx.tls {
            return Ok(Box::new(Secure {
                next: next.open(ctx).await?,
            }));
        }
        libnbd::debug!(
            "tls-fallback: connection {}: plaintext, serving the readme",
            ctx.id
        );
        Ok(Box::new(Readme {
            data: self.readme.clone(),
        }))
    }
}

/// A TLS client's handle: the layers below, unchanged.
struct Secure {
    next: Box<dyn Handle>,
}

#[async_trait]
impl Handle for Secure {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
}

/// A plaintext client's handle: the readme, read-only, nothing below.
struct Readme {
    data: Arc<[u8]>,
}

#[async_trait]
impl Handle for Readme {
    fn size(&self) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
    fn caps(&self) -> Result<Caps> {
        // Several plaintext connections see the same bytes.
        Ok(Caps {
            multi_conn: true,
            ..Caps::READ_ONLY
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _: Flags) -> Result<()> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|s| s.saturating_add(buf.len()) <= self.data.len())
            .ok_or_else(|| Error::einval("tls-fallback: read past the end"))?;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    #[tokio::test]
    async fn tls_fallback_serves_plaintext_the_readme_and_tls_the_plugin() {
        let mem = Mem::with(vec![0x55; 4096]);
        let s = stack(vec![create(&mut params(&[])).unwrap()], &mem);
        let plain = s.open(&ctx(1)).await.unwrap();
        assert_eq!(plain.size().unwrap(), 512);
        assert!(!plain.caps().unwrap().write);
        let mut b = vec![0u8; 512];
        plain.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert!(b.starts_with(README.as_bytes()));
        assert!(b[README.len()..].iter().all(|&x| x == 0));
        assert!(plain.pread(&mut b, 1, Flags::NONE).await.is_err());

        let mut tls = ctx(2);
        tls.tls = true;
        let secure = s.open(&tls).await.unwrap();
        assert_eq!(secure.size().unwrap(), 4096);
        secure.pread(&mut b, 0, Flags::NONE).await.unwrap();
        assert!(b.iter().all(|&x| x == 0x55));

        let long = "x".repeat(600);
        let s = stack(
            vec![create(&mut params(&[&format!("tlsreadme={long}")])).unwrap()],
            &mem,
        );
        assert_eq!(s.open(&ctx(3)).await.unwrap().size().unwrap(), 1024);
    }
}
