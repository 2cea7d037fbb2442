//! A TCP proxy on a free port of 127.0.0.1 in front of one upstream port,
//! for faults on one link: [`Proxy::hold`] keeps what the upstream sends
//! (the link stays up, the other side hears nothing; what was held is
//! dropped if the upstream goes away meanwhile), [`Proxy::release`] lets
//! it through. Put between a replica and its master, it makes a replica
//! that lags behind while looking connected.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub struct Proxy {
    port: u16,
    held: Arc<AtomicBool>,
    released: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port and forwards every connection to `upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let held = Arc::new(AtomicBool::new(false));
        let released = Arc::new(Notify::new());
        let (h, r) = (held.clone(), released.clone());
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let (h, r) = (h.clone(), r.clone());
                tokio::spawn(async move {
                    if let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        link(down, up, h, r).await;
                    }
                });
            }
        });
        Proxy {
            port,
            held,
            released,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, what the upstream sends is kept, not forwarded.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Forwards what was kept, and everything after it.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways; the upstream's bytes wait while `held`.
async fn link(down: TcpStream, up: TcpStream, held: Arc<AtomicBool>, released: Arc<Notify>) {
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    let upward = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
        let _ = up_w.shutdown().await;
    });
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = up_r.read(&mut buf) => read,
            () = released.notified(), if !kept.is_empty() => Ok(usize::MAX),
        };
        match read {
            // The upstream went away: what was held is lost with it.
            Ok(0) | Err(_) => break,
            Ok(usize::MAX) => {}
            Ok(n) => kept.extend_from_slice(&buf[..n]),
        }
        if !held.load(Ordering::SeqCst) && !kept.is_empty() {
            if down_w.write_all(&kept).await.is_err() {
                break;
            }
            kept.clear();
        }
    }
    upward.abort();
    let _ = down_w.shutdown().await;
}
