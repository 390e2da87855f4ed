//! The data server's local socket, without the socket: when `serve` and the
//! data server run in one process (the embedded default), a backend whose
//! ticket advertises this server's local socket hands its requests to the
//! server's handlers as values instead of writing them to the socket and
//! reading them back. The data then crosses no socket at all: a GET's
//! chunks, read from the image, become the NBD reply as they are, and a
//! PUT's pieces are written to the image from the NBD request's buffers.
//!
//! Everything else is as over the local socket: the same routes
//! (`/images/…` only), ticket checks and answers, and one server-side
//! connection per client connection, so a ticket counts its users the same
//! way and forgets them when the client connection goes (or after an
//! answer that closes it). A stopped server refuses further requests as a
//! closed socket would.
//!
//! A data server registers its local socket's path while it runs;
//! [`find`] looks a path up.

use super::body::Body;
use super::{Conn, RequestBody, Service, Shared, answer};
use crate::shutdown::Shutdown;
use hyper::body::Body as _;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, Response};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// The body of an in-process answer.
pub type ResponseBody = Body;

/// The running data servers of this process, by local socket path.
static SERVERS: Mutex<Vec<(PathBuf, Weak<Inner>)>> = Mutex::new(Vec::new());

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    stop: Shutdown,
}

/// A data server of this process, reached without its local socket.
#[derive(Debug, Clone)]
pub struct LocalServer {
    inner: Arc<Inner>,
}

/// Keeps a data server findable by its local socket path; dropped when
/// the server ends.
#[derive(Debug)]
pub(super) struct Registration {
    path: PathBuf,
    _inner: Arc<Inner>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
        servers.retain(|(path, weak)| path != &self.path && weak.strong_count() > 0);
    }
}

/// Make the server of `shared` findable by `path` while the registration
/// lives.
pub(super) fn register(path: &Path, shared: Arc<Shared>, stop: Shutdown) -> Registration {
    let inner = Arc::new(Inner { shared, stop });
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    servers.retain(|(p, weak)| p != path && weak.strong_count() > 0);
    servers.push((path.to_path_buf(), Arc::downgrade(&inner)));
    Registration {
        path: path.to_path_buf(),
        _inner: inner,
    }
}

/// The running data server of this process whose local socket is `path`.
pub fn find(path: &Path) -> Option<LocalServer> {
    let servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    servers
        .iter()
        .find(|(p, _)| p == path)
        .and_then(|(_, weak)| weak.upgrade())
        .filter(|inner| !inner.stop.is_triggered())
        .map(|inner| LocalServer { inner })
}

impl LocalServer {
    /// A new client connection (as a new connection to the local socket).
    pub fn connect(&self) -> LocalConnection {
        LocalConnection {
            server: self.clone(),
            conn: Conn::new(&self.inner.shared),
        }
    }
}

/// One client connection to a [`LocalServer`]: requests one at a time.
#[derive(Debug)]
pub struct LocalConnection {
    server: LocalServer,
    conn: Arc<Conn>,
}

impl LocalConnection {
    /// The answer to `req` (a request for `/images/…`), its body still to
    /// read.
    ///
    /// # Errors
    /// The server stopped (`ConnectionRefused`, as its socket would), or
    /// the body's length is not the `Content-Length` the request claims
    /// (hyper's framing would never let such a body through).
    pub async fn send(&mut self, req: Request<RequestBody>) -> io::Result<Response<Body>> {
        let inner = &self.server.inner;
        if inner.stop.is_triggered() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the data server stopped",
            ));
        }
        if let Some(claimed) = req.headers().get(CONTENT_LENGTH) {
            let claimed = claimed.to_str().ok().and_then(|v| v.parse::<u64>().ok());
            if claimed.is_none() || claimed != req.body().size_hint().exact() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the request body's length is not its Content-Length",
                ));
            }
        }
        let (resp, close) = answer(&inner.shared, &self.conn, Service::Local, req).await;
        if close {
            // As the socket would close: the tickets this connection used
            // forget it; the next request comes on a new one.
            self.conn = Conn::new(&inner.shared);
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::imageio::{ImageioBackend, ImageioConfig};
    use crate::backend::{Backend, ErrorKind};
    use crate::imageio::ticket::TicketSpec;
    use crate::imageio::{Config, DataServer};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::StatusCode;
    use hyper::header::{CONTENT_RANGE, RANGE};

    const SIZE: u64 = 1 << 20;

    async fn server(dir: &Path) -> (DataServer, PathBuf) {
        let img = dir.join("img.raw");
        std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
        let local = dir.join("local.sock");
        let mut config = Config::new("127.0.0.1:0", dir.join("ctl.sock"));
        config.local_socket = Some(local.clone());
        let server = DataServer::start(config).await.unwrap();
        let spec = TicketSpec::parse(
            &serde_json::json!({
                "uuid": "local-ticket", "size": SIZE, "ops": ["read", "write"],
                "timeout": 60, "url": format!("file://{}", img.display()),
            }),
            60,
        )
        .unwrap();
        server.tickets().add(spec);
        (server, local)
    }

    fn request(method: &str, headers: &[(&str, String)], body: &[u8]) -> Request<RequestBody> {
        let mut req = Request::builder()
            .method(method)
            .uri("/images/local-ticket");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.body(
            Full::new(Bytes::copy_from_slice(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
    }

    fn connections(server: &DataServer) -> u64 {
        server.tickets().get("local-ticket").unwrap().info()["connections"]
            .as_u64()
            .unwrap()
    }

    /// Requests as values: a PUT and a GET answered as over the socket, the
    /// ticket counting the connection until it goes, a body that is not
    /// its Content-Length refused, and nothing served once the server
    /// stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_reach_the_handlers_without_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (server, local) = server(dir.path()).await;
        assert!(find(&dir.path().join("other.sock")).is_none());
        let found = find(&local).expect("registered");
        let mut conn = found.connect();

        let data = b"in-process bytes";
        let put = request(
            "PUT",
            &[
                ("content-length", data.len().to_string()),
                (
                    CONTENT_RANGE.as_str(),
                    format!("bytes 4096-{}/*", 4096 + data.len() - 1),
                ),
            ],
            data,
        );
        let resp = conn.send(put).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(connections(&server), 1);

        let get = request("GET", &[(RANGE.as_str(), "bytes=4096-4111".into())], b"");
        let resp = conn.send(get).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], data);

        let lying = request("PUT", &[("content-length", "3".into())], data);
        let e = conn.send(lying).await.expect_err("length checked");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);

        // An unknown ticket: 403, as over the socket, and the connection
        // closes: the ticket forgets it, the next request comes on a new one.
        assert_eq!(connections(&server), 1);
        let mut req = request("GET", &[], b"");
        *req.uri_mut() = "/images/no-such-ticket".parse().unwrap();
        assert_eq!(
            conn.send(req).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(connections(&server), 0);
        let get = request("GET", &[(RANGE.as_str(), "bytes=0-0".into())], b"");
        assert_eq!(
            conn.send(get).await.unwrap().status(),
            StatusCode::PARTIAL_CONTENT
        );
        assert_eq!(connections(&server), 1);

        drop(conn);
        assert_eq!(connections(&server), 0, "the ticket forgot the connection");

        let mut held = found.connect();
        server.shutdown().await;
        assert!(find(&local).is_none(), "a stopped server is not found");
        let e = held
            .send(request("GET", &[(RANGE.as_str(), "bytes=0-0".into())], b""))
            .await
            .expect_err("stopped");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// The imageio backend takes the in-process way to a data server of
    /// this process (whose OPTIONS names its local socket), moves data both
    /// ways, and reports the server's stop as a failed request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backend_uses_a_data_server_of_this_process_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = server(dir.path()).await;
        let url = format!("{}local-ticket", server.url());
        let connect = |use_unix_socket| {
            ImageioBackend::connect(ImageioConfig {
                url: url.clone(),
                size: Some(SIZE),
                use_unix_socket,
                ..ImageioConfig::default()
            })
        };
        let over_tcp = connect(false).await.unwrap();
        assert!(!over_tcp.is_in_process());
        let backend = connect(true).await.unwrap();
        assert!(backend.is_in_process());

        let data = Bytes::from(vec![7u8; 300_000]);
        backend.write(65_536, data.clone(), true).await.unwrap();
        backend.flush().await.unwrap();
        assert_eq!(backend.read(65_536, data.len()).await.unwrap(), data);
        // Both ways reach the same image.
        assert_eq!(over_tcp.read(65_536, data.len()).await.unwrap(), data);

        server.shutdown().await;
        let e = backend.read(0, 4096).await.expect_err("stopped");
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    }
}
