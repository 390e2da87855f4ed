//! The imageio backend: every NBD command becomes ranged HTTP against an
//! ovirt-imageio ticket URL (ours or the real daemon).
//!
//! - READ → `GET` with `Range`; holes known from the extents are answered
//!   without a request.
//! - WRITE → `PUT ?flush=n` with `Content-Range` (FUA: `flush=y`).
//! - WRITE_ZEROES → `PATCH {"op":"zero"}`; TRIM too on sparse tickets.
//! - FLUSH → `PATCH {"op":"flush"}` on every connection that wrote.
//! - BLOCK_STATUS → `GET extents?context=zero`, fetched once and kept
//!   coherent with our own writes; `context=dirty` for dirty bitmaps.
//!
//! Connections: a pool of HTTP/1.1 keep-alive connections sized from the
//! server's `max_readers` / `max_writers`, over the data server's unix
//! socket when it is on this host; each slot owns at most one connection
//! ([`pool`]), so the server never sees more. This module is the only code
//! that reads HTTP statuses and transport errors ([`status`]).

mod body;
pub mod coalesce;
pub mod extent_map;
mod pool;
pub mod readahead;
pub mod status;
pub mod wire;
mod writer;

use self::body::Parts;
use self::coalesce::Limits;
use self::extent_map::ExtentMap;
pub use self::pool::build_client;
use self::pool::{Connection, Pool, RespBody, Target, timed};
use self::readahead::{Plan, ReadAhead};
use self::status::{ErrorContext, check, transport};
use self::wire::{Options, Patch, parse_extents};
use self::writer::Writer;
use super::{Backend, Capabilities, Error, ErrorKind, Extent, ExtentContext, Result, ZeroFlags};
use crate::bufpool::PoolBuf;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderValue, RANGE};
use hyper::{Method, StatusCode};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most HTTP connections opened to one ticket.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest extents answer accepted (bytes of JSON).
const MAX_EXTENTS_BODY: usize = 256 * 1024 * 1024;
/// Largest OPTIONS answer accepted (bytes of JSON).
const MAX_OPTIONS_BODY: usize = 1024 * 1024;
/// Zeroes written per PUT when the server cannot zero by itself.
const ZERO_CHUNK: usize = 4 * 1024 * 1024;
/// Attempts for an idempotent request whose connection failed.
const ATTEMPTS: u32 = 3;
/// Largest coalesced PUT.
pub const MAX_BATCH: usize = 8 * 1024 * 1024;
/// Writes at least this large go out alone, without gathering.
const DIRECT_WRITE: usize = MAX_BATCH / 2;
/// Bytes of writes held waiting for a PUT slot at most.
const MAX_HELD: usize = 64 * 1024 * 1024;
/// Body chunks one GET keeps apart at most; past that the body is copied
/// together (a data server sending tiny chunks costs a copy, never a long
/// list of small buffers).
const MAX_PARTS: usize = 256;

/// The body of a GET of `len` bytes as it arrives: its chunks kept as they
/// are (no copy) up to `max_parts` of them, then copied together.
struct BodyParts {
    len: usize,
    max_parts: usize,
    parts: Vec<Bytes>,
    joined: Option<PoolBuf>,
    filled: usize,
}

impl BodyParts {
    fn new(len: usize, max_parts: usize) -> Self {
        BodyParts {
            len,
            max_parts,
            parts: Vec::new(),
            joined: None,
            filled: 0,
        }
    }

    /// Take the next chunk.
    ///
    /// # Errors
    /// The body runs past `len`.
    fn push(&mut self, chunk: Bytes) -> Result<()> {
        let end = self
            .filled
            .checked_add(chunk.len())
            .filter(|&end| end <= self.len)
            .ok_or_else(|| Error::new(ErrorKind::Io, "GET sent more than the range"))?;
        if chunk.is_empty() {
            return Ok(());
        }
        if self.joined.is_none() && self.parts.len() >= self.max_parts {
            let mut buf = PoolBuf::new(self.len);
            copy_into(buf.as_mut_slice(), 0, &self.parts);
            self.parts.clear();
            self.joined = Some(buf);
        }
        match &mut self.joined {
            Some(buf) => copy_into(buf.as_mut_slice(), self.filled, &[chunk]),
            None => self.parts.push(chunk),
        }
        self.filled = end;
        Ok(())
    }

    /// The body, in order.
    ///
    /// # Errors
    /// It was shorter than `len`.
    fn finish(self) -> Result<Vec<Bytes>> {
        if self.filled != self.len {
            return Err(Error::new(
                ErrorKind::Io,
                format!("GET sent {} of {} bytes", self.filled, self.len),
            ));
        }
        Ok(match self.joined {
            Some(buf) => vec![buf.freeze()],
            None => self.parts,
        })
    }
}

/// Copy `parts`, one after the other, into `dst` from `at`; what would not
/// fit is left out (callers checked the lengths).
fn copy_into(dst: &mut [u8], mut at: usize, parts: &[Bytes]) {
    for p in parts {
        let end = at.saturating_add(p.len());
        if let Some(to) = dst.get_mut(at..end) {
            to.copy_from_slice(p);
        }
        at = end;
    }
}

/// How to reach the data server.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Skip certificate verification (`--insecure`).
    pub insecure: bool,
    /// Trust only these PEM CA certificates (`--ca-file`).
    pub ca_file: Option<PathBuf>,
}

/// What the caller knows about the ticket.
#[derive(Debug, Clone, Default)]
pub struct ImageioConfig {
    /// The ticket URL: `https://host:54322/images/<ticket>`.
    pub url: String,
    /// The image size, when known (a transfer's disk); else from extents.
    pub size: Option<u64>,
    /// Refuse writes (download transfers).
    pub read_only: bool,
    /// Whether zeroing deallocates (the ticket's `sparse`), when known.
    pub sparse: Option<bool>,
    /// Serve `extents?context=dirty` as `qemu:dirty-bitmap:<name>`.
    pub dirty_bitmap: Option<String>,
    /// TLS settings for `https` URLs.
    pub tls: TlsOptions,
    /// Use the data server's unix socket when it is on this host.
    pub use_unix_socket: bool,
    /// Cap on connections (default [`MAX_CONNECTIONS`]).
    pub max_connections: Option<usize>,
}

/// The HTTP side shared by the backend and its writer task.
#[derive(Debug)]
pub struct Http {
    url: String,
    pool: Pool,
    ended: AtomicBool,
}

/// What we keep about the image besides the data, kept coherent with our
/// own writes.
#[derive(Debug, Default)]
struct Caches {
    map: Option<Mutex<ExtentMap>>,
    /// Block read-ahead for sequential readers.
    readahead: Option<ReadAhead>,
}

impl Caches {
    /// `len` bytes at `offset` changed on the server (before the change is
    /// acknowledged).
    fn changed(&self, offset: u64, len: u64, hole: bool, zero: bool) {
        if let Some(map) = &self.map {
            if let Ok(mut m) = map.lock() {
                m.set(offset, len, hole, zero);
            }
        }
        if let Some(ra) = &self.readahead {
            ra.invalidate(offset, len);
        }
    }
}

/// An image transfer's data, over HTTP.
#[derive(Debug)]
pub struct ImageioBackend {
    http: Arc<Http>,
    options: Options,
    size: u64,
    read_only: bool,
    sparse: Option<bool>,
    dirty_bitmap: Option<String>,
    caches: Arc<Caches>,
    dirty: tokio::sync::OnceCell<ExtentMap>,
    /// Gathers sequential writes into large PUTs (writable tickets).
    writer: Option<Writer>,
}

impl ImageioBackend {
    /// Whether requests go to a data server of this process without a
    /// socket ([`crate::imageio::local`]).
    pub fn is_in_process(&self) -> bool {
        self.http.pool.target().is_in_process()
    }

    /// Ask the server what it offers (OPTIONS), learn the size and the
    /// extents, and open the connection pool.
    ///
    /// # Errors
    /// The server cannot be reached, refuses the ticket, or the size
    /// cannot be known.
    pub async fn connect(config: ImageioConfig) -> Result<Self> {
        let url = config.url.trim_end_matches('/').to_string();
        let target = Target::new(&url, &config.tls, None)?;
        let mut probe = Connection::new(target.clone());
        let ctx = ErrorContext::default();
        let body = timed("OPTIONS", &url, async {
            let resp = probe
                .send(
                    "OPTIONS",
                    Method::OPTIONS,
                    &url,
                    HeaderMap::new(),
                    Parts::empty(),
                )
                .await?;
            let resp = check(resp, "OPTIONS", &ctx).await?;
            read_all(
                resp.into_body(),
                MAX_OPTIONS_BODY,
                "OPTIONS answer is too large",
                "OPTIONS",
                &url,
            )
            .await
        })
        .await?;
        let options: Options = serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                ErrorKind::Invalid,
                format!("OPTIONS {url}: not an imageio answer: {e}"),
            )
        })?;
        let unix = if config.use_unix_socket {
            local_socket(&url, options.unix_socket.as_deref())
        } else {
            None
        };
        let (data_url, unix) = match unix {
            Some(path) => (rebase_to_unix(&url), Some(path)),
            None => (url.clone(), None),
        };
        let advised = if config.read_only {
            options.max_readers
        } else {
            options.max_writers
        };
        let n = (advised.unwrap_or(1).max(1) as usize)
            .min(config.max_connections.unwrap_or(MAX_CONNECTIONS).max(1));
        let pool = match &unix {
            // The probe's connection goes to the same place: the pool's
            // first one.
            None => Pool::new(n, target, Some(probe)),
            Some(path) => {
                // Closed before any data connection opens: the real daemon
                // holds an NBD connection for it.
                probe.close().await;
                let mut target = Target::new(&data_url, &config.tls, Some(path.as_path()))?;
                // Our own data server, in this process: no socket at all.
                if let Some(server) = crate::imageio::local::find(path) {
                    target = target.in_process(server);
                }
                Pool::new(n, target, None)
            }
        };
        tracing::info!(
            connections = n,
            unix_socket = unix.as_ref().map(|p| p.display().to_string()),
            in_process = pool.target().is_in_process(),
            features = ?options.features,
            "imageio backend ready"
        );
        let http = Arc::new(Http {
            url: data_url,
            pool,
            ended: AtomicBool::new(false),
        });
        let extents = if options.has("extents") {
            Some(http.fetch_extents("zero").await?)
        } else {
            None
        };
        let size = match (config.size, &extents) {
            (Some(s), _) => s,
            // `parse_extents` refused ends past u64::MAX.
            (None, Some(list)) => list
                .iter()
                .map(|e| e.offset.saturating_add(e.len))
                .max()
                .unwrap_or(0),
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    "the data server reports no extents, so the image size is unknown; give it",
                ));
            }
        };
        let caches = Arc::new(Caches {
            map: extents.map(|list| Mutex::new(ExtentMap::new(list, size))),
            readahead: Some(ReadAhead::new(size)),
        });
        let writer = (!config.read_only).then(|| {
            let after = caches.clone();
            Writer::spawn(
                http.clone(),
                Limits {
                    max_batch: MAX_BATCH,
                    max_inflight: n,
                    max_held: MAX_HELD,
                },
                Arc::new(move |offset, len| after.changed(offset, len, false, false)),
            )
        });
        Ok(ImageioBackend {
            http,
            options,
            size,
            read_only: config.read_only,
            sparse: config.sparse,
            dirty_bitmap: config.dirty_bitmap,
            caches,
            dirty: tokio::sync::OnceCell::new(),
            writer,
        })
    }

    /// Mark the transfer as ended: from now on a refused request means the
    /// server is going away (ESHUTDOWN), not a permission problem.
    pub fn set_ended(&self) {
        self.http.ended.store(true, Ordering::SeqCst);
    }

    /// Send one flush on every connection that wrote since the last flush,
    /// e.g. to keep idle connections alive.
    ///
    /// # Errors
    /// A flush failed.
    pub async fn flush_all(&self) -> Result<()> {
        Backend::flush(self).await
    }

    /// Touch the ticket so neither it nor the transfer times out while the
    /// NBD clients are idle: a one-byte read, which every ticket allows and
    /// which resets the data server's idle clock.
    ///
    /// # Errors
    /// The request failed.
    pub async fn keepalive(&self) -> Result<()> {
        if self.size == 0 {
            return Ok(());
        }
        retry(|| self.http.read_once(0, 1)).await.map(|_| ())
    }

    fn mark(&self, offset: u64, len: u64, hole: bool, zero: bool) {
        self.caches.changed(offset, len, hole, zero);
    }

    async fn write_zeroes_by_put(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let zeroes = Bytes::from(vec![0u8; ZERO_CHUNK.min(len as usize)]);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            let last = done + n as u64 == len;
            let chunk = [zeroes.slice(..n)];
            retry(|| self.http.put_once(offset + done, &chunk, fua && last)).await?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Http {
    fn ctx(&self) -> ErrorContext {
        ErrorContext {
            ended: self.ended.load(Ordering::SeqCst),
        }
    }

    async fn fetch_extents(&self, context: &str) -> Result<Vec<Extent>> {
        let what = "GET extents";
        let url = format!("{}/extents?context={context}", self.url);
        let mut conn = self.pool.get().await?;
        let body = timed(what, &url, async {
            let resp = conn
                .send(what, Method::GET, &url, HeaderMap::new(), Parts::empty())
                .await?;
            let resp = check(resp, what, &self.ctx()).await?;
            read_all(
                resp.into_body(),
                MAX_EXTENTS_BODY,
                "extents answer is too large",
                what,
                &url,
            )
            .await
        })
        .await?;
        drop(conn);
        let list = parse_extents(&body).map_err(|m| Error::new(ErrorKind::Io, m))?;
        Ok(list
            .iter()
            .map(|e| {
                if context == "dirty" {
                    e.dirty()
                } else {
                    e.allocation()
                }
            })
            .collect())
    }

    /// One GET of `len` bytes at `offset`: the body's chunks as they came
    /// (no copy), or copied together once there are more than
    /// [`MAX_PARTS`] of them.
    async fn read_once(&self, offset: u64, len: usize) -> Result<Vec<Bytes>> {
        let what = "GET";
        let url = &self.url;
        let mut conn = self.pool.get().await?;
        let mut headers = HeaderMap::new();
        headers.insert(
            RANGE,
            header_value(&format!("bytes={}-{}", offset, offset + len as u64 - 1))?,
        );
        timed(what, url, async {
            let resp = conn
                .send(what, Method::GET, url, headers, Parts::empty())
                .await?;
            let resp = check(resp, what, &self.ctx()).await?;
            if resp.status() != StatusCode::PARTIAL_CONTENT {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("GET answered {} to a range request", resp.status()),
                ));
            }
            let mut body = resp.into_body();
            let mut parts = BodyParts::new(len, MAX_PARTS);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| transport(what, url, &*e))?;
                if let Ok(chunk) = frame.into_data() {
                    parts.push(chunk)?;
                }
            }
            parts.finish()
        })
        .await
    }

    /// One PUT of `parts`, contiguous from `offset`, sent without copying.
    async fn put_once(&self, offset: u64, parts: &[Bytes], flush: bool) -> Result<()> {
        let what = "PUT";
        let body = Parts::new(parts);
        let len = body.content_length();
        let mut conn = self.pool.get().await?;
        let url = format!("{}?flush={}", self.url, if flush { "y" } else { "n" });
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_RANGE,
            header_value(&format!("bytes {}-{}/*", offset, offset + len.max(1) - 1))?,
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        timed(what, &url, async {
            let resp = conn.send(what, Method::PUT, &url, headers, body).await?;
            check(resp, what, &self.ctx()).await
        })
        .await?;
        conn.set_dirty();
        Ok(())
    }

    async fn patch_once(&self, patch: &Patch) -> Result<()> {
        let what = "PATCH";
        let body = serde_json::to_vec(patch)
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("PATCH body: {e}")))?;
        let mut conn = self.pool.get().await?;
        let url = &self.url;
        timed(what, url, async {
            let resp = conn
                .send(what, Method::PATCH, url, json_headers(), Parts::from(body))
                .await?;
            check(resp, what, &self.ctx()).await
        })
        .await?;
        conn.set_dirty();
        Ok(())
    }
}

/// Headers of a JSON request body.
fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

/// A header value we made (ASCII by construction).
fn header_value(text: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(text)
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("header {text:?}: {e}")))
}

/// A whole answer body, at most `limit` bytes (else an error saying
/// `too_large`).
async fn read_all(
    mut body: RespBody,
    limit: usize,
    too_large: &str,
    what: &str,
    url: &str,
) -> Result<Vec<u8>> {
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| transport(what, url, &*e))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if all.len() + chunk.len() > limit {
            return Err(Error::new(ErrorKind::Io, too_large));
        }
        all.extend_from_slice(&chunk);
    }
    Ok(all)
}

/// Run an idempotent request up to [`ATTEMPTS`] times while it fails with
/// a transport error (a dropped keep-alive connection, a reset).
async fn retry<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e)
                if e.kind() == ErrorKind::Io && status::is_transport(&e) && attempt < ATTEMPTS =>
            {
                tracing::debug!(error = %e, attempt, "retrying");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl Backend for ImageioBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let zero = self.options.has("zero");
        Capabilities {
            read_only: self.read_only,
            flush: self.options.has("flush"),
            fua: true,
            trim: zero && self.sparse == Some(true),
            zero,
            fast_zero: zero,
            cache: false,
            multi_conn: true,
            extents: self.caches.map.is_some(),
            dirty_bitmap: self.dirty_bitmap.clone(),
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 * 1024 * 1024,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let mut parts = self.read_parts(offset, len).await?;
        if parts.len() == 1 {
            return Ok(parts.pop().unwrap_or_default());
        }
        let mut buf = PoolBuf::new(len);
        copy_into(buf.as_mut_slice(), 0, &parts);
        Ok(buf.freeze())
    }

    async fn read_parts(&self, offset: u64, len: usize) -> Result<Vec<Bytes>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let plan = match &self.caches.readahead {
            Some(ra) => ra.plan(offset, len),
            None => Plan::Direct,
        };
        if let Plan::Block {
            slot,
            start,
            len: block_len,
        } = plan
        {
            let block = slot
                .get_or_try_init(|| retry(|| self.http.read_once(start, block_len)))
                .await;
            match block {
                Ok(block) => {
                    if let Some(part) = readahead::slice(block, start, offset, len) {
                        return Ok(part);
                    }
                }
                Err(e) => {
                    if let Some(ra) = &self.caches.readahead {
                        ra.forget(start, &slot);
                    }
                    tracing::debug!(error = %e, "read-ahead failed; reading directly");
                }
            }
        }
        retry(|| self.http.read_once(offset, len)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        match &self.writer {
            Some(writer) if data.len() < DIRECT_WRITE => writer.write(offset, data, fua).await,
            _ => {
                let parts = [data];
                retry(|| self.http.put_once(offset, &parts, fua)).await?;
                self.mark(offset, len, false, false);
                Ok(())
            }
        }
    }

    async fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let can_zero = self.options.has("zero");
        // imageio punches holes on sparse tickets whatever we ask, so
        // NO_HOLE there needs real zeroes.
        let would_punch = flags.no_hole && self.sparse == Some(true);
        if !can_zero || would_punch {
            if flags.fast {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "the data server cannot zero this range quickly",
                ));
            }
            self.write_zeroes_by_put(offset, len, flags.fua).await?;
            self.mark(offset, len, false, true);
            return Ok(());
        }
        let patch = Patch::Zero {
            offset,
            size: len,
            flush: flags.fua,
        };
        retry(|| self.http.patch_once(&patch)).await?;
        self.mark(offset, len, self.sparse == Some(true), true);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        if !self.capabilities().trim {
            return Ok(());
        }
        let flags = ZeroFlags {
            no_hole: false,
            fast: true,
            fua,
        };
        self.zero(offset, len, flags).await
    }

    async fn flush(&self) -> Result<()> {
        if !self.options.has("flush") {
            return Ok(());
        }
        let body = serde_json::to_vec(&Patch::Flush)
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("PATCH body: {e}")))?;
        let ctx = self.http.ctx();
        let what = "PATCH flush";
        self.http
            .pool
            .flush_dirty(|mut conn| {
                let url = self.http.url.clone();
                let body = body.clone();
                async move {
                    let result = timed(what, &url, async {
                        let resp = conn
                            .send(what, Method::PATCH, &url, json_headers(), Parts::from(body))
                            .await?;
                        check(resp, what, &ctx).await.map(|_| ())
                    })
                    .await;
                    (conn, result)
                }
            })
            .await
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    async fn extents(
        &self,
        context: ExtentContext,
        offset: u64,
        len: u64,
        max_count: usize,
    ) -> Result<Vec<Extent>> {
        match context {
            ExtentContext::Allocation => match &self.caches.map {
                Some(map) => map
                    .lock()
                    .map(|m| m.query(offset, len, max_count))
                    .map_err(|_| Error::new(ErrorKind::Io, "extent map poisoned")),
                None => Ok(vec![Extent {
                    offset,
                    len,
                    hole: false,
                    zero: false,
                }]),
            },
            ExtentContext::Dirty => {
                let map = self
                    .dirty
                    .get_or_try_init(|| async {
                        let list = self.http.fetch_extents("dirty").await?;
                        Ok::<_, Error>(ExtentMap::new(list, self.size))
                    })
                    .await?;
                Ok(map.query(offset, len, max_count))
            }
        }
    }
}

/// The data server's unix socket, when the URL names this host and the
/// socket is a path we can reach.
fn local_socket(url: &str, socket: Option<&str>) -> Option<PathBuf> {
    let socket = socket?;
    if socket.is_empty() || socket.starts_with('\0') {
        return None;
    }
    let uri: hyper::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let local =
        matches!(host, "localhost" | "127.0.0.1" | "::1") || hostname().is_some_and(|h| h == host);
    let path = PathBuf::from(socket);
    (local && path.exists()).then_some(path)
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

/// `https://host:port/images/T` → `http://localhost/images/T` for the
/// unix socket (which speaks plain HTTP).
fn rebase_to_unix(url: &str) -> String {
    let uri = url.parse::<hyper::Uri>().ok();
    let path = uri
        .as_ref()
        .and_then(hyper::Uri::path_and_query)
        .map_or("/", |p| p.as_str());
    format!("http://localhost{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_rebase_keeps_the_path() {
        assert_eq!(
            rebase_to_unix("https://host.example:54322/images/abc"),
            "http://localhost/images/abc"
        );
        assert_eq!(
            rebase_to_unix("https://[::1]:54322/images/abc?x=1"),
            "http://localhost/images/abc?x=1"
        );
    }

    #[test]
    fn only_local_hosts_use_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        std::fs::write(&sock, b"").unwrap();
        let s = sock.to_str().unwrap();
        assert!(local_socket("http://127.0.0.1:1234/images/x", Some(s)).is_some());
        assert!(local_socket("http://[::1]:1234/images/x", Some(s)).is_some());
        assert!(local_socket("http://10.1.2.3:1234/images/x", Some(s)).is_none());
        assert!(local_socket("http://localhost/images/x", Some(s)).is_some());
        assert!(local_socket("http://127.0.0.1.example/images/x", Some(s)).is_none());
        assert!(local_socket("not a url", Some(s)).is_none());
        assert!(
            local_socket("http://127.0.0.1:1/images/x", Some("\0/org/ovirt/imageio")).is_none()
        );
        assert!(local_socket("http://127.0.0.1:1/images/x", None).is_none());
    }

    /// A GET body in any chunking, with few or many chunks (past
    /// `max_parts` it is copied together), gives back exactly its bytes;
    /// too much or too little is an error.
    #[test]
    fn body_parts_keep_the_bytes_in_any_chunking() {
        let body: Vec<u8> = (0..300u32).map(|i| (i * 13 % 251) as u8).collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..2000 {
            let len = next(body.len() + 1);
            let max_parts = 1 + next(8);
            let mut parts = BodyParts::new(len, max_parts);
            let mut at = 0;
            while at < len {
                let n = if round % 3 == 0 {
                    1
                } else {
                    next(len - at + 1)
                };
                parts
                    .push(Bytes::copy_from_slice(&body[at..at + n]))
                    .unwrap();
                at += n;
            }
            let got: Vec<u8> = parts
                .finish()
                .unwrap()
                .iter()
                .flat_map(|b| b.to_vec())
                .collect();
            assert_eq!(got, body[..len], "round {round}");
        }
        let mut over = BodyParts::new(2, 4);
        assert!(over.push(Bytes::from_static(b"abc")).is_err());
        let mut short = BodyParts::new(3, 4);
        short.push(Bytes::from_static(b"ab")).unwrap();
        assert!(short.finish().is_err());
    }
}
