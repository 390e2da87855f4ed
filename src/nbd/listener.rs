//! Listeners (unix socket or TCP) and the NBD accept loop on
//! [`crate::net::accept`]: a connection limit, backoff on accept errors,
//! TCP keepalive, one task per connection, and an orderly stop.

use super::Server;
use super::tls::TlsMode;
use crate::backend::Backend;
use crate::net::accept::{self, AcceptOptions, Acceptor};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode, utf8_percent_encode};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
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
    /// A unix socket (mode 0600); the path is removed when the server stops.
    Unix(UnixListener, SocketPath),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// The path of a listening unix socket, removed when dropped together
/// with the private directory made for it, if any.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    private_dir: Option<PathBuf>,
}

impl std::ops::Deref for SocketPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = &self.private_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Export names in a URI path: everything but RFC 3986 unreserved
/// characters is percent-encoded (a `/` too: it belongs to the name).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// Query values (the socket path): as above, but `/` stays readable.
const QUERY_VALUE: &AsciiSet = &PATH_SEGMENT.remove(b'/');

impl Listener {
    /// Bind a unix socket at `path` with mode 0600 (a stale socket file is
    /// replaced; any other file is left alone and the bind fails). The
    /// socket is made in a private directory beside `path` and linked into
    /// place, so it is never reachable with a wider mode.
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
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let staging = private_dir(&parent, ".nbdbridge-")?;
        let staged = staging.join("s");
        let bound = bind_private(&staged).and_then(|l| {
            // A hard link fails when `path` exists: nothing is replaced.
            std::fs::hard_link(&staged, &path)?;
            Ok(l)
        });
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        Ok(Listener::Unix(
            bound?,
            SocketPath {
                path,
                private_dir: None,
            },
        ))
    }

    /// Bind a unix socket (mode 0600) in a fresh private directory (0700)
    /// under the temp dir; both are removed when the listener is dropped.
    ///
    /// # Errors
    /// The directory or the socket cannot be made.
    pub fn unix_private() -> std::io::Result<Self> {
        let dir = private_dir(&std::env::temp_dir(), "nbdbridge-")?;
        let path = dir.join("nbd.sock");
        let socket = SocketPath {
            path,
            private_dir: Some(dir),
        };
        let listener = bind_private(&socket)?;
        Ok(Listener::Unix(listener, socket))
    }

    /// Bind a TCP address (`HOST:PORT`, port 0 picks one).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn tcp(addr: &str) -> std::io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Whether clients can reach this listener from other hosts (a TCP
    /// address that is not loopback).
    pub fn is_remote(&self) -> bool {
        match self {
            Listener::Unix(..) => false,
            Listener::Tcp(l) => l.local_addr().is_ok_and(|a| !a.ip().is_loopback()),
        }
    }

    /// The NBD URI for `export` on this listener, per the NBD URI spec:
    /// `nbds` schemes when the server offers TLS, the export name and the
    /// socket path percent-encoded.
    pub fn uri(&self, export: &str, tls: TlsMode) -> String {
        let name = utf8_percent_encode(export, PATH_SEGMENT);
        let s = if tls == TlsMode::Off { "" } else { "s" };
        match self {
            Listener::Unix(_, path) => {
                let socket = percent_encode(path.as_os_str().as_bytes(), QUERY_VALUE);
                format!("nbd{s}+unix:///{name}?socket={socket}")
            }
            Listener::Tcp(l) => match l.local_addr() {
                Ok(SocketAddr::V6(a)) => format!("nbd{s}://[{}]:{}/{name}", a.ip(), a.port()),
                Ok(a) => format!("nbd{s}://{a}/{name}"),
                Err(_) => format!("nbd{s}://localhost/{name}"),
            },
        }
    }
}

/// Make a new directory `PREFIX<random>` in `parent` with mode 0700; it
/// must not exist yet (mkdtemp's contract).
fn private_dir(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut last = None;
    for _ in 0..8 {
        let random = uuid::Uuid::new_v4().simple().to_string();
        let dir = parent.join(format!("{prefix}{}", random.get(..12).unwrap_or(&random)));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask may have narrowed it; never widened.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
}

/// Bind `path` (in a directory only we can enter) and set it to 0600.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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
                Accepted::Unix(stream) => server.handle(info.id, info.peer, stream).await,
                Accepted::Tcp(stream) => server.handle(info.id, info.peer, stream).await,
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
    use super::*;

    /// Decode a URI with the `url` crate (an independent RFC 3986 parser):
    /// scheme, export name, socket path.
    fn decode(uri: &str) -> (String, String, Option<Vec<u8>>) {
        let url = url::Url::parse(uri).unwrap();
        let name = percent_encoding::percent_decode_str(url.path().trim_start_matches('/'))
            .decode_utf8()
            .unwrap()
            .into_owned();
        let socket = url.query().map(|q| {
            let v = q.strip_prefix("socket=").unwrap();
            assert!(!v.contains(['&', '#', '?', ' ']), "{v}");
            percent_encoding::percent_decode_str(v).collect()
        });
        assert!(url.fragment().is_none());
        (url.scheme().to_string(), name, socket)
    }

    #[tokio::test]
    async fn unix_uris_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a b#c?d%e&f+g=h");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("s.sock");
        let l = Listener::unix(path.clone()).unwrap();
        for (tls, scheme) in [(TlsMode::Off, "nbd+unix"), (TlsMode::Require, "nbds+unix")] {
            for export in ["", "disk", "a b/c?d#e%f+g&h=i", "ünï"] {
                let uri = l.uri(export, tls);
                let (s, name, socket) = decode(&uri);
                assert_eq!(s, scheme);
                assert_eq!(name, export, "{uri}");
                assert_eq!(
                    socket.as_deref(),
                    Some(path.as_os_str().as_bytes()),
                    "{uri}"
                );
            }
        }
    }

    #[tokio::test]
    async fn tcp_uris() {
        let l = Listener::tcp("127.0.0.1:0").await.unwrap();
        let port = match &l {
            Listener::Tcp(t) => t.local_addr().unwrap().port(),
            Listener::Unix(..) => unreachable!(),
        };
        assert_eq!(
            l.uri("a b", TlsMode::On),
            format!("nbds://127.0.0.1:{port}/a%20b")
        );
        assert_eq!(l.uri("", TlsMode::Off), format!("nbd://127.0.0.1:{port}/"));
        assert!(!l.is_remote());
        let (_, name, _) = decode(&l.uri("x/y", TlsMode::Off));
        assert_eq!(name, "x/y");
    }

    #[test]
    fn socket_modes() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let private = Listener::unix_private().unwrap();
        let (sock, dir) = match &private {
            Listener::Unix(_, p) => (p.to_path_buf(), p.private_dir.clone().unwrap()),
            Listener::Tcp(_) => unreachable!(),
        };
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&sock), 0o600);
        drop(private);
        assert!(
            !sock.exists() && !dir.exists(),
            "left behind: {}",
            dir.display()
        );

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("given.sock");
        let given = Listener::unix(path.clone()).unwrap();
        assert_eq!(mode(&path), 0o600);
        // Only the socket is left in its directory (no staging dir).
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        drop(given);
        assert!(!path.exists());

        // A regular file in the way is kept and the bind fails.
        std::fs::write(&path, b"keep").unwrap();
        assert!(Listener::unix(path.clone()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
