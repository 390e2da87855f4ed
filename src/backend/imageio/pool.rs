//! A fixed set of HTTP/1.1 keep-alive connections that we own: each slot
//! holds at most one connection, made with hyper's low-level client, and
//! carries one request at a time. So the data server never sees more
//! connections than there are slots (the real daemon opens one NBD
//! connection per HTTP connection, and qemu-nbd may take only as many), and
//! a flush reaches exactly the connections that wrote.
//!
//! (A `reqwest::Client` per slot could not promise that: its pool may open
//! a second connection while the first is being returned to it, and keep
//! the first one idle until the server times it out.)

use super::TlsOptions;
use super::body::Parts;
use super::status::transport;
use crate::backend::{Error, ErrorKind, Result};
use crate::imageio::local::{LocalConnection, LocalServer, ResponseBody};
use crate::imageio::{BoxError, RequestBody};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsConnector;

/// Idle connections are dropped before imageio's default 60 s timeout
/// would close them under us.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to open a connection (TCP or unix, and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single request (a zero of a huge range can take a while).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// TCP keepalive, as reqwest set it: idle time before the first probe.
const KEEPALIVE_TIME: Duration = Duration::from_secs(15);
/// Time between TCP keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered TCP keepalive probes before the connection is dropped.
const KEEPALIVE_RETRIES: u32 = 3;

/// Where the connections of a pool go, and how.
pub struct Target {
    /// Host name or address, without brackets (connect, SNI).
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority.
    host_header: HeaderValue,
    /// The data server's unix socket, instead of TCP.
    unix: Option<PathBuf>,
    /// TLS for `https` URLs (never over the unix socket).
    tls: Option<TlsConnector>,
    /// The data server in this process that stands behind `unix`: requests
    /// go to it as values ([`crate::imageio::local`]).
    local: Option<LocalServer>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("unix", &self.unix)
            .field("tls", &self.tls.is_some())
            .field("in_process", &self.local.is_some())
            .finish()
    }
}

impl Target {
    /// The connections for `url` (`http` or `https`), over `unix` when
    /// given (which speaks plain HTTP).
    ///
    /// # Errors
    /// The URL is not an http(s) URL, or the TLS settings are unusable.
    pub fn new(url: &str, tls: &TlsOptions, unix: Option<&Path>) -> Result<Arc<Target>> {
        let shown = crate::telemetry::redact_ticket_url(url);
        let bad = || Error::new(ErrorKind::Invalid, format!("not an http(s) URL: {shown}"));
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad());
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        // Without any user info (never in ticket URLs, never sent).
        let shown_authority = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, a)| a);
        let host_header = HeaderValue::from_str(shown_authority).map_err(|_| bad())?;
        let tls = if https && unix.is_none() {
            Some(tls_connector(tls)?)
        } else {
            None
        };
        Ok(Arc::new(Target {
            host,
            port,
            host_header,
            unix: unix.map(Path::to_path_buf),
            tls,
            local: None,
        }))
    }

    /// The same target, reached in-process through `server` (the data
    /// server of this process whose local socket is `unix`).
    pub fn in_process(&self, server: LocalServer) -> Arc<Target> {
        Arc::new(Target {
            host: self.host.clone(),
            port: self.port,
            host_header: self.host_header.clone(),
            unix: self.unix.clone(),
            tls: None,
            local: Some(server),
        })
    }

    /// Whether requests go to a data server of this process.
    pub fn is_in_process(&self) -> bool {
        self.local.is_some()
    }

    /// A new connection, ready for its first request.
    async fn connect(&self) -> std::io::Result<Live> {
        let (sender, task) = match (&self.unix, &self.tls) {
            (Some(path), _) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| context("cannot connect", e))?;
                crate::net::socket::prepare_unix(&stream);
                handshake(stream).await?
            }
            (None, tls) => {
                let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| context("cannot connect", e))?;
                prepare_tcp(&stream);
                match tls {
                    None => handshake(stream).await?,
                    Some(connector) => {
                        let name = ServerName::try_from(self.host.clone()).map_err(|e| {
                            std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
                        })?;
                        let stream = connector
                            .connect(name, stream)
                            .await
                            .map_err(|e| context("TLS handshake", e))?;
                        handshake(stream).await?
                    }
                }
            }
        };
        Ok(Live {
            sender,
            task,
            last_used: Instant::now(),
        })
    }

    /// A request for `url` (its path and query are the request target).
    fn request(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Parts,
    ) -> Result<Request<Parts>> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "{}: cannot make a request: {e}",
                    crate::telemetry::redact_ticket_url(url)
                ),
            )
        };
        let uri: Uri = url.parse().map_err(|e| bad(&e))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .map_err(|e| bad(&e))?;
        *req.headers_mut() = headers;
        req.headers_mut().insert(HOST, self.host_header.clone());
        Ok(req)
    }
}

/// `e` with what we were doing, keeping its kind and cause.
fn context(what: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// TCP_NODELAY and our client keepalive; a failure is logged and
/// otherwise ignored.
fn prepare_tcp(stream: &tokio::net::TcpStream) {
    crate::net::socket::tune_tcp(
        stream,
        KEEPALIVE_TIME,
        KEEPALIVE_INTERVAL,
        KEEPALIVE_RETRIES,
    );
}

/// HTTP/1.1 over `io`; the connection runs in a task of its own.
async fn handshake<T>(io: T) -> std::io::Result<(SendRequest<Parts>, JoinHandle<()>)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %crate::telemetry::error_chain(&e), "imageio connection ended");
        }
    });
    Ok((sender, task))
}

/// An open connection.
#[derive(Debug)]
struct Live {
    sender: SendRequest<Parts>,
    /// Runs the connection; aborted (the socket closed) when dropped.
    task: JoinHandle<()>,
    /// When it was opened or last answered.
    last_used: Instant,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer's body: read from the connection, or handed over by the data
/// server of this process.
#[derive(Debug)]
pub enum RespBody {
    /// From a socket.
    Remote(Incoming),
    /// From [`crate::imageio::local`].
    Local(ResponseBody),
}

impl hyper::body::Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Remote(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            RespBody::Local(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Remote(b) => b.is_end_stream(),
            RespBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Remote(b) => b.size_hint(),
            RespBody::Local(b) => b.size_hint(),
        }
    }
}

/// One slot's connection: opened on first use, and again whenever the last
/// one closed, broke, or stayed idle too long. Never more than one at once.
#[derive(Debug)]
pub struct Connection {
    target: Arc<Target>,
    live: Option<Live>,
    /// The in-process connection, when the target is in this process.
    local: Option<LocalConnection>,
}

impl Connection {
    /// Not connected yet.
    pub fn new(target: Arc<Target>) -> Self {
        Connection {
            target,
            live: None,
            local: None,
        }
    }

    /// Send one request for `url` on this connection (opened first when
    /// needed); the answer's head, its body still to read. A request the
    /// connection closed under before sending any of it (an idle keep-alive
    /// connection the server dropped) is sent once more on a new
    /// connection.
    ///
    /// # Errors
    /// Connecting or the exchange failed (transport errors, see
    /// [`super::status::is_transport`]).
    pub async fn send(
        &mut self,
        what: &str,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Parts,
    ) -> Result<Response<RespBody>> {
        let mut req = self.target.request(method, url, headers, body)?;
        if let Some(server) = &self.target.local {
            let conn = self.local.get_or_insert_with(|| server.connect());
            let req: Request<RequestBody> = req.map(|b| b.map_err(|never| match never {}).boxed());
            return match conn.send(req).await {
                Ok(resp) => Ok(resp.map(RespBody::Local)),
                Err(e) => {
                    self.local = None;
                    Err(transport(what, url, &e))
                }
            };
        }
        let mut resent = false;
        loop {
            self.ready(what, url).await?;
            let Some(live) = self.live.as_mut() else {
                return Err(Error::new(ErrorKind::Io, format!("{what}: no connection")));
            };
            match live.sender.try_send_request(req).await {
                Ok(resp) => {
                    live.last_used = Instant::now();
                    return Ok(resp.map(RespBody::Remote));
                }
                Err(mut e) => {
                    let unsent = e.take_message();
                    let error = e.into_error();
                    self.close().await;
                    match unsent {
                        Some(again) if !resent => {
                            tracing::debug!(
                                error = %crate::telemetry::error_chain(&error),
                                "{what}: connection closed before the request was sent; reconnecting"
                            );
                            resent = true;
                            req = again;
                        }
                        _ => return Err(transport(what, url, &error)),
                    }
                }
            }
        }
    }

    /// Make sure a live connection is ready for a request: the kept one
    /// while it is open and was not idle too long, else a new one.
    async fn ready(&mut self, what: &str, url: &str) -> Result<()> {
        if let Some(live) = self.live.as_mut() {
            let fresh = !live.sender.is_closed() && live.last_used.elapsed() < IDLE_TIMEOUT;
            if fresh && live.sender.ready().await.is_ok() {
                return Ok(());
            }
            self.close().await;
        }
        let live = match tokio::time::timeout(CONNECT_TIMEOUT, self.target.connect()).await {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => return Err(transport(what, url, &e)),
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("cannot connect within {} s", CONNECT_TIMEOUT.as_secs()),
                );
                return Err(transport(what, url, &e));
            }
        };
        let live = self.live.insert(live);
        live.sender
            .ready()
            .await
            .map_err(|e| transport(what, url, &e))
    }

    /// Close the connection, if any, and wait until its socket is closed,
    /// so the server never sees it next to its successor.
    pub async fn close(&mut self) {
        self.local = None;
        if let Some(mut live) = self.live.take() {
            live.task.abort();
            // Cancelled (or already ended): the connection is dropped.
            let _ = (&mut live.task).await;
        }
    }
}

/// Run one whole exchange (the request and the answer's body) within the
/// request timeout.
///
/// # Errors
/// `op` failed, or took too long (a transport error).
pub async fn timed<T>(what: &str, url: &str, op: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            let e = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no complete answer within {} s", REQUEST_TIMEOUT.as_secs()),
            );
            Err(transport(what, url, &e))
        })
}

#[derive(Debug)]
struct Slot {
    /// `None` while a request or a flush has it (or if a flush was
    /// cancelled with it: a new one is made then).
    conn: Mutex<Option<Connection>>,
    dirty: AtomicBool,
}

/// The connection pool.
#[derive(Debug)]
pub struct Pool {
    target: Arc<Target>,
    slots: Vec<Slot>,
    free: Mutex<Vec<usize>>,
    permits: Semaphore,
}

/// One connection, held for one request.
#[derive(Debug)]
pub struct PoolConn<'a> {
    pool: &'a Pool,
    index: usize,
    conn: Connection,
    _permit: SemaphorePermit<'a>,
}

impl PoolConn<'_> {
    /// This connection changed data: the next flush must reach it.
    pub fn set_dirty(&self) {
        if let Some(slot) = self.pool.slots.get(self.index) {
            slot.dirty.store(true, Ordering::SeqCst);
        }
    }
}

impl std::ops::Deref for PoolConn<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for PoolConn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Drop for PoolConn<'_> {
    fn drop(&mut self) {
        let conn = std::mem::replace(&mut self.conn, Connection::new(self.pool.target.clone()));
        self.pool.put(self.index, conn);
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(self.index);
        }
    }
}

impl Pool {
    /// `n` connections (at least one) to `target`, opened when first used;
    /// `first` (an open connection to the same target) becomes the first.
    pub fn new(n: usize, target: Arc<Target>, mut first: Option<Connection>) -> Self {
        let n = n.max(1);
        let slots = (0..n)
            .map(|_| Slot {
                conn: Mutex::new(Some(
                    first
                        .take()
                        .unwrap_or_else(|| Connection::new(target.clone())),
                )),
                dirty: AtomicBool::new(false),
            })
            .collect();
        Pool {
            target,
            slots,
            free: Mutex::new((0..n).rev().collect()),
            permits: Semaphore::new(n),
        }
    }

    /// Where the connections go.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Wait for a free connection.
    ///
    /// # Errors
    /// The pool was closed.
    pub async fn get(&self) -> Result<PoolConn<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "connection pool closed"))?;
        let index = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or_else(|| Error::new(ErrorKind::Io, "connection pool out of step"))?;
        Ok(PoolConn {
            pool: self,
            index,
            conn: self.take(index),
            _permit: permit,
        })
    }

    /// Slot `index`'s connection (a new, unconnected one if it has none).
    fn take(&self, index: usize) -> Connection {
        self.slots
            .get(index)
            .and_then(|s| s.conn.lock().ok().and_then(|mut c| c.take()))
            .unwrap_or_else(|| Connection::new(self.target.clone()))
    }

    /// Give slot `index` its connection back.
    fn put(&self, index: usize, conn: Connection) {
        if let Some(slot) = self.slots.get(index) {
            if let Ok(mut c) = slot.conn.lock() {
                *c = Some(conn);
            }
        }
    }

    /// Wait until no request is in flight, then run `flush` on every
    /// connection that wrote since its last flush (on one connection if none
    /// did), all at once; `flush` hands each connection back with its
    /// result.
    ///
    /// # Errors
    /// Any flush failed (those connections stay dirty).
    pub async fn flush_dirty<F, Fut>(&self, flush: F) -> Result<()>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = (Connection, Result<()>)> + Send + 'static,
    {
        let _all = self
            .permits
            .acquire_many(self.slots.len() as u32)
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "connection pool closed"))?;
        let mut targets: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].dirty.load(Ordering::SeqCst))
            .collect();
        if targets.is_empty() {
            targets.push(0);
        }
        let mut tasks = JoinSet::new();
        for &i in &targets {
            let fut = flush(self.take(i));
            tasks.spawn(async move { (i, fut.await) });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, (conn, result))) => {
                    self.put(i, conn);
                    match result {
                        Ok(()) => self.slots[i].dirty.store(false, Ordering::SeqCst),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                Err(e) => {
                    first_error
                        .get_or_insert(Error::new(ErrorKind::Io, format!("flush task: {e}")));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// TLS for `https` data servers, as reqwest verified them: `insecure`
/// accepts any certificate for any name; a CA file is the only trust;
/// otherwise the platform's roots.
fn tls_connector(tls: &TlsOptions) -> Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = tls.ca_file.as_deref().map(ca_roots).transpose()?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("TLS: {e}")))?;
    let builder = if tls.insecure {
        let schemes = provider
            .signature_verification_algorithms
            .supported_schemes();
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { schemes }))
    } else if let Some(roots) = roots {
        builder.with_root_certificates(roots)
    } else {
        let verifier = rustls_platform_verifier::Verifier::new(provider)
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("TLS: system roots: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
    };
    let mut config = builder.with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The certificates of a PEM bundle, as the only roots.
fn ca_roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let pem = std::fs::read(ca)
        .map_err(|e| Error::io(format!("cannot read CA file {}", ca.display()), e))?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::new(ErrorKind::Invalid, format!("CA file {}: {e}", ca.display()))
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    Ok(roots)
}

/// `--insecure`: any certificate, for any name (reqwest's
/// `danger_accept_invalid_certs` and `_hostnames`).
#[derive(Debug)]
struct AcceptAnyCertificate {
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// A reqwest client (the engine API's): keep-alive HTTP/1.1, the same TLS
/// settings as the data connections.
///
/// # Errors
/// The CA file cannot be read or parsed.
pub fn build_client(tls: &TlsOptions, unix: Option<&Path>) -> Result<reqwest::Client> {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only if another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut b = reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(IDLE_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = unix {
        b = b.unix_socket(Arc::<Path>::from(path));
    }
    if tls.insecure {
        b = b
            .tls_danger_accept_invalid_certs(true)
            .tls_danger_accept_invalid_hostnames(true);
    }
    if let Some(ca) = &tls.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| Error::io(format!("cannot read CA file {}", ca.display()), e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::new(ErrorKind::Invalid, format!("CA file {}: {e}", ca.display()))
        })?;
        b = b.tls_certs_only(certs);
    }
    b.build()
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_urls() {
        let o = TlsOptions::default();
        let t = Target::new("http://127.0.0.1:54322/images/x", &o, None).expect("http");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 54322));
        assert_eq!(t.host_header, "127.0.0.1:54322");
        assert!(t.tls.is_none());
        let t = Target::new("http://[::1]/images/x", &o, None).expect("ipv6");
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(t.host_header, "[::1]");
        // (--insecure: no system roots needed.)
        let insecure = TlsOptions {
            insecure: true,
            ca_file: None,
        };
        let t = Target::new("https://host.example/images/x", &insecure, None).expect("https");
        assert_eq!(t.port, 443);
        assert!(t.tls.is_some());
        let sock = Path::new("/run/imageio.sock");
        let t = Target::new("http://localhost/images/x", &o, Some(sock)).expect("unix");
        assert_eq!(t.unix.as_deref(), Some(sock));
        assert!(t.tls.is_none());
        let e = Target::new("ftp://h/images/0123456789abcdef0123", &o, None).expect_err("ftp");
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(!e.to_string().contains("0123456789abcdef0123"), "{e}");
    }

    #[test]
    fn requests_carry_host_and_path() {
        let t = Target::new("http://h.example:8/images/x", &TlsOptions::default(), None)
            .expect("target");
        let req = t
            .request(
                Method::GET,
                "http://h.example:8/images/x/extents?context=zero",
                HeaderMap::new(),
                Parts::empty(),
            )
            .expect("request");
        assert_eq!(req.uri(), "/images/x/extents?context=zero");
        assert_eq!(req.headers()[HOST], "h.example:8");
    }

    #[test]
    fn a_bad_ca_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, b"not a certificate\n").expect("write");
        let tls = TlsOptions {
            insecure: false,
            ca_file: Some(ca),
        };
        let e = Target::new("https://h/images/x", &tls, None).expect_err("no certificate");
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let tls = TlsOptions {
            insecure: false,
            ca_file: Some(dir.path().join("missing.pem")),
        };
        assert!(Target::new("https://h/images/x", &tls, None).is_err());
    }
}
