//! The embedded imageio-compatible data server.
//!
//! It speaks the ovirt-imageio 2.5.1 data API (`/images/<ticket>` GET, PUT,
//! PATCH zero/flush, OPTIONS, extents, checksum; `/info/`) over TCP and,
//! optionally, a local unix socket, and the ticket control API
//! (`/tickets/<id>`) on a unix socket, over local image files
//! (`file:///…` ticket URLs) and NBD exports (`nbd:unix:/path.sock` and
//! `nbd:unix:/path.sock:exportname=NAME`, e.g. a `qemu-nbd` serving a
//! QCOW2 volume as guest data, through [`crate::nbd_client`]).
//!
//! # Layout
//! - this module: [`Config`], [`DataServer`] (listeners, per-connection
//!   hyper service, routing);
//! - `handlers`: the data API; `control`: the ticket control API;
//! - `ticket`: [`TicketStore`] and tickets (authorization, expiry, in-flight
//!   ops, transferred bytes), ticket URL parsing;
//! - `storage`: what a ticket's image lives in (a file or an NBD export),
//!   opened lazily per ticket, reopened when an NBD connection failed,
//!   closed when the ticket is deleted;
//! - `range`, `checksum`, `body`: header parsing, block checksums, bodies;
//! - `error`: [`ApiError`], the only mapping from a failure to HTTP.
//!
//! # Where we differ from ovirt-imageio 2.5.1 (on purpose)
//! - HEAD answers like GET without a body, and a `Range` whose last byte
//!   lies past the end is clamped to the end (imageio: 405 and 416), so
//!   generic HTTP clients such as nbdkit's curl plugin work. A range that
//!   starts at or past the end is 416 (imageio: 206 / 400).
//! - `extents?context=zero` reports real holes (`SEEK_DATA`/`SEEK_HOLE`);
//!   imageio's file backend reports one data extent. A dirty ticket on a
//!   file reports everything dirty (a file keeps no bitmap).
//! - Several writers per ticket are safe (positional I/O): OPTIONS
//!   advertises `max_writers` 8 (imageio: 1 for files).
//! - Stricter input: ticket ids are `[A-Za-z0-9._-]`, `file:` URLs and
//!   `nbd:unix:` socket paths must be absolute and normalized (imageio
//!   accepts any `nbd:` URL at PUT and fails with 500 on first use), `ops` only `read`/`write`, integers must not
//!   be booleans or floats, a PUT `Content-Range` must match
//!   `Content-Length`, request bodies of the JSON APIs are capped (413).
//! - `file://` and `nbd:unix:` URLs only (no `nbd:HOST:PORT`, `nbd://`,
//!   `http(s)://` backends); checksums with blake2b and blake2s only.
//! - An nbd ticket uses one pipelined NBD connection per ticket, shared by
//!   every HTTP connection (imageio: one NBD connection per HTTP
//!   connection, so HTTP connections past qemu-nbd's `--shared` hang).
//!   Like imageio, a `"dirty": true` nbd ticket's connection lists the
//!   export's dirty bitmap (`qemu-nbd -B NAME`) and `extents?context=dirty`
//!   merges it with `base:allocation`; without exactly one bitmap it is
//!   404. More than 2^20 extents: the rest is reported as one extent of
//!   data (`zero`) or of dirty data (`dirty`).
//! - An unaligned PUT never grows the file (imageio's O_DIRECT
//!   read-modify-write rounds it up to 4 KiB).
//!
//! # Embedding
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use nbdbridge::imageio::{Config, DataServer};
//! let server = DataServer::start(Config::new("127.0.0.1:0", "/tmp/ctl.sock")).await?;
//! println!("{}", server.url()); // http://127.0.0.1:PORT/images/
//! server.shutdown().await;
//! # Ok(()) }
//! ```

mod body;
mod buffers;
mod checksum;
mod control;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handlers;
mod idle;
pub mod local;
mod range;
mod storage;
mod ticket;

pub use body::Body;
pub use error::ApiError;
pub use ticket::{Access, BackendUrl, Ticket, TicketSpec, TicketStore};

use crate::net::accept::{AcceptOptions, Acceptor};
use crate::shutdown::Shutdown;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How long an idle connection is kept before it used a ticket (then the
/// ticket's `inactivity_timeout` applies).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Idle read memory kept between requests, in full read chunks.
const READ_POOL_IDLE: usize = 8;
/// Idle write memory kept between requests, in full write chunks.
const WRITE_POOL_IDLE: usize = 4;
/// Largest hyper read buffer: large body frames, fewer wake-ups. A
/// request head cannot fill it: [`idle::MAX_HEAD_READ`] bounds a head.
const MAX_BUF_SIZE: usize = 4 * 1024 * 1024;
/// Largest request head hyper accepts (431 past it). ovirt-imageio takes a
/// 4 KiB request line and Python's http.server 64 KiB per header line;
/// imageio clients send heads well under 1 KiB.
pub(crate) const MAX_HEAD_SIZE: usize = 64 * 1024;
/// Default time a client gets to send a whole request head once it began.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default most connections on each data listener (remote, local).
/// ovirt-imageio sets no cap (a thread per connection); its clients open
/// up to 8 connections per transfer.
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections on the control socket (the engine, one at a time).
const MAX_CONTROL_CONNECTIONS: usize = 64;

/// Settings of a [`DataServer`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Data API address, `HOST:PORT` (port 0 picks a free port).
    pub listen: String,
    /// Unix socket of the ticket control API.
    pub control_socket: PathBuf,
    /// Unix socket serving the data API locally (advertised by OPTIONS).
    pub local_socket: Option<PathBuf>,
    /// `inactivity_timeout` of tickets that do not set one (seconds).
    pub inactivity_timeout: u64,
    /// How long DELETE waits for a ticket's in-flight requests.
    pub remove_timeout: Duration,
    /// `max_readers` advertised by OPTIONS.
    pub max_readers: u32,
    /// `max_writers` advertised by OPTIONS (positional I/O: many are safe).
    pub max_writers: u32,
    /// Most connections served at once on each data listener; more wait
    /// in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request head once it began.
    pub header_timeout: Duration,
}

impl Config {
    /// Defaults like imageio's: 60 s inactivity and remove timeouts, 8
    /// readers and 8 writers, no local socket.
    pub fn new(listen: impl Into<String>, control_socket: impl Into<PathBuf>) -> Self {
        Config {
            listen: listen.into(),
            control_socket: control_socket.into(),
            local_socket: None,
            inactivity_timeout: 60,
            remove_timeout: Duration::from_secs(60),
            max_readers: 8,
            max_writers: 8,
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    tickets: Arc<TicketStore>,
    local_socket: Option<String>,
    max_readers: u32,
    max_writers: u32,
    header_timeout: Duration,
    next_conn: AtomicU64,
    /// GET chunk buffers.
    read_pool: Arc<buffers::BufferPool>,
    /// PUT chunk buffers.
    write_pool: Arc<buffers::BufferPool>,
}

/// One HTTP connection: the tickets it used (for `connections`) and its
/// activity (for the idle timeout).
#[derive(Debug)]
pub(crate) struct Conn {
    id: u64,
    tickets: Mutex<Vec<Arc<Ticket>>>,
    activity: Arc<idle::Activity>,
}

impl Conn {
    /// A new connection of `shared`'s server, idle.
    fn new(shared: &Shared) -> Arc<Conn> {
        Arc::new(Conn {
            id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
            tickets: Mutex::new(Vec::new()),
            activity: Arc::new(idle::Activity::new(IDLE_TIMEOUT, shared.header_timeout)),
        })
    }

    fn bind(&self, ticket: &Arc<Ticket>) {
        // Like imageio: once a connection uses a ticket, the ticket's
        // inactivity_timeout applies to it.
        self.activity
            .set_timeout(Duration::from_secs(ticket.spec().inactivity_timeout));
        let mut list = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|t| Arc::ptr_eq(t, ticket)) {
            ticket.add_connection(self.id);
            list.push(ticket.clone());
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let list = self.tickets.get_mut().unwrap_or_else(|p| p.into_inner());
        for t in list.drain(..) {
            t.remove_connection(self.id);
        }
    }
}

/// A failed request and whether to close the connection after answering.
#[derive(Debug)]
pub(crate) struct Failure {
    err: ApiError,
    close: bool,
}

impl Failure {
    /// A failure after which the connection closes (body left unread).
    fn closing(err: ApiError) -> Self {
        Failure { err, close: true }
    }
}

impl From<ApiError> for Failure {
    fn from(err: ApiError) -> Self {
        Failure { err, close: false }
    }
}

/// Query parameters, decoded as form data as imageio's `parse_qs` does
/// (first value wins).
#[derive(Debug, Default)]
pub(crate) struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            map.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
        Query(map)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// An error of a request body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request's body: from a socket (hyper's), or handed over in-process
/// ([`local`]).
pub type RequestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Read a whole small body, refusing more than `limit` bytes.
pub(crate) async fn read_body(mut body: RequestBody, limit: usize) -> Result<Bytes, Failure> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Failure::closing(ApiError::BadRequest(format!(
                "Cannot read request body: {e}"
            )))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Failure::closing(ApiError::PayloadTooLarge(format!(
                    "Request body is larger than {limit} bytes"
                ))));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    /// TCP: `/images/…` and `/info/`.
    Remote,
    /// Local unix socket: `/images/…`.
    Local,
    /// Control unix socket: `/tickets/…`.
    Control,
}

async fn route(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    service: Service,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let req = req.map(|b| b.map_err(BoxError::from).boxed());
    Ok(answer(&shared, &conn, service, req).await.0)
}

/// The answer to one request, and whether the connection closes after it.
async fn answer(
    shared: &Shared,
    conn: &Arc<Conn>,
    service: Service,
    req: Request<RequestBody>,
) -> (Response<Body>, bool) {
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let _busy = conn.activity.busy();
    match dispatch(shared, conn, service, req, &path, &query).await {
        Ok(resp) => (resp, false),
        Err(f) => (f.err.into_response(f.close), f.close),
    }
}

async fn dispatch(
    shared: &Shared,
    conn: &Conn,
    service: Service,
    req: Request<RequestBody>,
    path: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let known = [
        Method::GET,
        Method::PUT,
        Method::PATCH,
        Method::POST,
        Method::DELETE,
        Method::OPTIONS,
        Method::HEAD,
    ];
    if !known.contains(req.method()) {
        return Err(Failure::closing(ApiError::MethodNotAllowed(format!(
            "Invalid method '{}'",
            req.method()
        ))));
    }
    let no_handler = || Failure::closing(ApiError::NotFound(format!("No handler for '{path}'")));
    match service {
        Service::Control => {
            let id = path.strip_prefix("/tickets/").ok_or_else(no_handler)?;
            control::tickets(shared, req, id).await
        }
        Service::Remote | Service::Local => {
            if service == Service::Remote && path == "/info/" {
                return match *req.method() {
                    Method::GET => Ok(handlers::info()),
                    ref m => Err(handlers::not_allowed(m, path)),
                };
            }
            let rest = path.strip_prefix("/images/").ok_or_else(no_handler)?;
            let (id, resource) = handlers::parse_image_path(rest).ok_or_else(no_handler)?;
            handlers::images(shared, conn, req, id, resource, query).await
        }
    }
}

/// A running data server: TCP data listener, optional local socket, control
/// socket. Dropping it without [`DataServer::shutdown`] leaves the tasks
/// running until the runtime ends.
#[derive(Debug)]
pub struct DataServer {
    url: String,
    addr: SocketAddr,
    control_socket: PathBuf,
    local_socket: Option<PathBuf>,
    tickets: Arc<TicketStore>,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    /// Its local socket's in-process stand-in, while it serves.
    _local: Option<local::Registration>,
}

impl DataServer {
    /// Bind every listener and start serving.
    ///
    /// # Errors
    /// An address cannot be parsed or bound, or a socket path is taken by
    /// something that is not a socket.
    pub async fn start(config: Config) -> io::Result<DataServer> {
        let tcp = TcpListener::bind(&config.listen).await?;
        let addr = tcp.local_addr()?;
        let control = bind_unix(&config.control_socket)?;
        set_mode(&config.control_socket, 0o660)?;
        let local = match &config.local_socket {
            Some(p) => Some(bind_unix(p)?),
            None => None,
        };
        let tickets = Arc::new(TicketStore::new(
            config.inactivity_timeout,
            config.remove_timeout,
        ));
        let shared = Arc::new(Shared {
            tickets: tickets.clone(),
            local_socket: config
                .local_socket
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            max_readers: config.max_readers,
            max_writers: config.max_writers,
            header_timeout: config.header_timeout,
            next_conn: AtomicU64::new(0),
            read_pool: buffers::BufferPool::new(handlers::READ_CHUNK, READ_POOL_IDLE),
            write_pool: buffers::BufferPool::new(handlers::WRITE_CHUNK, WRITE_POOL_IDLE),
        });
        let shutdown = Shutdown::new();
        let data_cap = config.max_connections.max(1);
        let mut tasks = vec![
            tokio::spawn(accept(
                tcp,
                Service::Remote,
                data_cap,
                shared.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(accept(
                control,
                Service::Control,
                MAX_CONTROL_CONNECTIONS,
                shared.clone(),
                shutdown.clone(),
            )),
        ];
        if let Some(local) = local {
            tasks.push(tokio::spawn(accept(
                local,
                Service::Local,
                data_cap,
                shared.clone(),
                shutdown.clone(),
            )));
        }
        let host = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let url = format!("http://{host}:{}/images/", addr.port());
        tracing::info!(%url, control = %config.control_socket.display(), "imageio data server listening");
        let local = config
            .local_socket
            .as_ref()
            .map(|p| local::register(p, shared.clone(), shutdown.clone()));
        Ok(DataServer {
            _local: local,
            url,
            addr,
            control_socket: config.control_socket,
            local_socket: config.local_socket,
            tickets,
            shutdown,
            tasks,
        })
    }

    /// The data base URL, `http://HOST:PORT/images/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The control socket path.
    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// The tickets, for an in-process engine that skips the control socket.
    pub fn tickets(&self) -> &Arc<TicketStore> {
        &self.tickets
    }

    /// Stop accepting, give open connections a short grace to finish, and
    /// remove the socket files.
    pub async fn shutdown(self) {
        self.shutdown.trigger();
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.control_socket);
        if let Some(p) = &self.local_socket {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!("imageio data server stopped");
    }
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            // A stale socket of an earlier run.
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    UnixListener::bind(path)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Serve one listener until the shutdown: a connection cap (more wait in
/// the backlog), TCP keepalive, backoff on accept errors
/// ([`crate::net::accept`]).
async fn accept<A>(
    listener: A,
    service: Service,
    max_connections: usize,
    shared: Arc<Shared>,
    shutdown: Shutdown,
) where
    A: Acceptor,
    A::Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let options = AcceptOptions {
        name: match service {
            Service::Remote => "imageio remote",
            Service::Local => "imageio local",
            Service::Control => "imageio control",
        },
        max_connections,
        // Each connection winds down within SHUTDOWN_GRACE by itself.
        stop_grace: SHUTDOWN_GRACE * 2,
    };
    let stop = shutdown.clone();
    crate::net::accept::serve(listener, options, shutdown, move |stream, info| {
        let span = tracing::debug_span!("conn", service = ?service, peer = %info.peer);
        serve(stream, service, shared.clone(), stop.clone()).instrument(span)
    })
    .await;
}

async fn serve<S>(stream: S, service: Service, shared: Arc<Shared>, shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Conn::new(&shared);
    let activity = conn.activity.clone();
    let conn_id = conn.id;
    let svc = {
        let shared = shared.clone();
        service_fn(move |req| route(shared.clone(), conn.clone(), service, req))
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The idle watch below replaces hyper's header timeout, which
        // would also cut keep-alive connections waiting for a request.
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_SIZE)
        .max_buf_size(MAX_BUF_SIZE)
        .keep_alive(true);
    let io = TokioIo::new(idle::ActivityIo::new(stream, activity.clone()));
    let connection = builder.serve_connection(io, svc);
    tokio::pin!(connection);
    tokio::select! {
        res = connection.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(conn = conn_id, error = %e, "connection ended with an error");
            }
        }
        why = activity.idle_expired() => match why {
            idle::Expired::Idle => tracing::debug!(conn = conn_id, "closing idle connection"),
            idle::Expired::HeadDeadline => tracing::info!(
                conn = conn_id,
                timeout = ?shared.header_timeout,
                "closing a connection that did not send its request head in time"
            ),
        },
        _ = shutdown.wait() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_first_wins() {
        let q = Query::parse(Some("flush=n&flush=y&close&&context=di%72ty"));
        assert_eq!(q.get("flush"), Some("n"));
        assert_eq!(q.get("close"), Some(""));
        assert_eq!(q.get("context"), Some("dirty"));
        assert_eq!(q.get("x"), None);
    }
}
