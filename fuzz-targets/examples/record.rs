//! Record what a real server sends to the client targets' scripts, as
//! seeds (fuzz/make-seeds.sh runs it against upstream nbdkit):
//!
//! ```text
//! record negotiate CTL HOST:PORT OUT   # byte CTL, then all the server sent
//! record replies HOST:PORT OUT         # the server's replies after GO
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libnbd::client::{ConnectOptions, Connection, Stream};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// A reader that keeps a copy of what it reads while `on`.
struct Recorder<R> {
    inner: R,
    on: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<u8>>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Recorder<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.on.load(Ordering::SeqCst) {
            let new = buf.filled()[before..].to_vec();
            self.log.lock().unwrap().extend_from_slice(&new);
        }
        r
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, ctl, addr, out) = match args.as_slice() {
        [m, c, a, o] if m == "negotiate" => (m.clone(), c.parse::<u8>().unwrap(), a, o),
        [m, a, o] if m == "replies" => (m.clone(), 0, a, o),
        _ => panic!("usage: record negotiate CTL HOST:PORT OUT | record replies HOST:PORT OUT"),
    };
    let tcp = TcpStream::connect(addr.as_str()).await.unwrap();
    let (r, w) = tcp.into_split();
    let on = Arc::new(AtomicBool::new(mode == "negotiate"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = Recorder {
        inner: r,
        on: on.clone(),
        log: log.clone(),
    };
    let s = Stream::from_halves(rec, w);
    let mut seed = Vec::new();
    if mode == "negotiate" {
        seed.push(ctl);
        fuzz_targets::negotiate_script(s, ctl).await;
    } else {
        let c = Connection::handshake(s, &ConnectOptions::new().extended_headers(false))
            .await
            .unwrap();
        eprintln!("meta contexts: {:?}", c.meta_contexts());
        on.store(true, Ordering::SeqCst);
        fuzz_targets::replies_script(&c).await;
        c.disconnect().await.unwrap();
    }
    seed.extend_from_slice(&log.lock().unwrap());
    std::fs::write(out, &seed).unwrap();
    eprintln!("{out}: {} bytes", seed.len());
}
