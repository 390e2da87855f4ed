//! Accept loop: unix socket or TCP, a connection limit, backoff on accept
//! errors, one task per connection, and an orderly stop.

use super::Server;
use crate::backend::Backend;
use crate::net::accept::{self, AcceptOptions, Acceptor};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};

/// Default of the most connections served at once (`serve
/// --max-connections`); more wait in the kernel's backlog.
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
/// connections to finish. Past the server's connection cap
/// (`serve --max-connections`, qemu-nbd's `-e/--shared`), new clients wait
/// in the listen backlog, as with qemu-nbd.
pub async fn accept_loop<B: Backend>(server: Arc<Server<B>>, listener: Listener) {
    let options = AcceptOptions {
        name: "nbd",
        max_connections: server.max_connections(),
        stop_grace: STOP_DEADLINE,
    };
    let shutdown = server.shutdown().clone();
    accept::serve(listener, options, shutdown, move |conn, info| {
        let server = Arc::clone(&server);
        async move {
            match conn {
                Accepted::Unix(stream) => {
                    let (r, w) = stream.into_split();
                    server.handle(info.id, info.peer, r, w).await;
                }
                Accepted::Tcp(stream) => {
                    let (r, w) = stream.into_split();
                    server.handle(info.id, info.peer, r, w).await;
                }
            }
        }
    })
    .await;
}

/// A connection accepted by a [`Listener`].
#[derive(Debug)]
pub enum Accepted {
    /// From the unix socket.
    Unix(tokio::net::UnixStream),
    /// From TCP (keepalive and `TCP_NODELAY` set).
    Tcp(tokio::net::TcpStream),
}

impl Acceptor for Listener {
    type Conn = Accepted;

    async fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            Listener::Unix(l, _) => {
                let (s, peer) = Acceptor::accept(l).await?;
                Ok((Accepted::Unix(s), peer))
            }
            Listener::Tcp(l) => {
                let (s, peer) = Acceptor::accept(l).await?;
                Ok((Accepted::Tcp(s), peer))
            }
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
