//! Accept loop: unix socket or TCP, a connection limit, backoff on accept
//! errors, one task per connection, and an orderly stop.

use super::Server;
use crate::backend::Backend;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Most connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a stop waits for connections to finish their requests.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket; the path is removed when the server stops.
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Bind a unix socket at `path` (a stale socket file is replaced).
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn unix(path: PathBuf) -> std::io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Listener::Unix(UnixListener::bind(&path)?, path))
    }

    /// Bind a TCP address (`HOST:PORT`, port 0 picks one).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn tcp(addr: &str) -> std::io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// The NBD URI for `export` on this listener.
    pub fn uri(&self, export: &str) -> String {
        let name = percent_encode(export);
        match self {
            Listener::Unix(_, path) => {
                format!("nbd+unix:///{name}?socket={}", path.display())
            }
            Listener::Tcp(l) => match l.local_addr() {
                Ok(std::net::SocketAddr::V6(a)) => {
                    format!("nbd://[{}]:{}/{name}", a.ip(), a.port())
                }
                Ok(a) => format!("nbd://{a}/{name}"),
                Err(_) => format!("nbd://localhost/{name}"),
            },
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Accept until the server's shutdown fires, then wait (bounded) for the
/// connections to finish.
pub async fn accept_loop<B: Backend>(server: Arc<Server<B>>, listener: Listener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut backoff = Duration::from_millis(10);
    loop {
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let shutdown = server.shutdown().clone();
        let accepted = tokio::select! {
            _ = shutdown.wait() => break,
            r = accept(&listener) => r,
        };
        let conn = match accepted {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        next_id += 1;
        let server = Arc::clone(&server);
        let id = next_id;
        tasks.spawn(async move {
            match conn {
                Accepted::Unix(stream) => {
                    let (r, w) = stream.into_split();
                    server.handle(id, "unix".to_string(), r, w).await;
                }
                Accepted::Tcp(stream, peer) => {
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    server.handle(id, peer, r, w).await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let stop = tokio::time::timeout(STOP_DEADLINE, async {
        while tasks.join_next().await.is_some() {}
    });
    if stop.await.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "connections did not finish in time; closing them"
        );
        tasks.abort_all();
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, String),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Unix(l, _) => Ok(Accepted::Unix(l.accept().await?.0)),
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok(Accepted::Tcp(s, peer.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn export_names_are_escaped() {
        assert_eq!(percent_encode("disk-1.img"), "disk-1.img");
        assert_eq!(percent_encode("a b/c?"), "a%20b%2Fc%3F");
    }
}
