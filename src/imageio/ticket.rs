//! Tickets: the unit of authorization (ops, size, expiry) and accounting
//! (in-flight operations, transferred bytes, connections).
//!
//! A [`Ticket`] is shared by every connection that uses it. Each data
//! request runs as an [`Op`] registered on the ticket; the op's guard
//! updates accounting and slides the expiry when it ends. [`TicketStore::remove`]
//! cancels a ticket and waits (bounded) for its ops to finish.

use super::error::ApiError;
use super::storage::Storage;
use crate::nbd_client::NbdAddress;
use crate::telemetry::redact;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest ticket id accepted.
const MAX_ID_LEN: usize = 256;

/// What a ticket may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// GET, extents, checksum, OPTIONS.
    Read,
    /// PUT, PATCH zero / flush.
    Write,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// A validated ticket JSON, as PUT on the control API.
#[derive(Debug, Clone)]
pub struct TicketSpec {
    /// Ticket id (a bearer secret).
    pub uuid: String,
    /// Bytes the ticket covers.
    pub size: u64,
    /// Allowed ops as given (`"read"`, `"write"`).
    pub ops: Vec<String>,
    /// Seconds of idleness before the ticket expires.
    pub timeout: u64,
    /// Connection idle timeout once the ticket was used.
    pub inactivity_timeout: u64,
    /// The `file:///…` or `nbd:unix:…` URL as given.
    pub url: String,
    /// The storage behind `url`.
    pub backend: BackendUrl,
    /// Label for logs and error texts.
    pub transfer_id: String,
    /// Name for `Content-Disposition`.
    pub filename: Option<String>,
    /// Zero deallocates (punches holes).
    pub sparse: bool,
    /// `extents?context=dirty` allowed.
    pub dirty: bool,
}

impl TicketSpec {
    /// Validate a ticket JSON the way imageio does (same texts), and more
    /// strictly where it matters: ids, ops and `file:` URLs.
    ///
    /// # Errors
    /// 400 `Invalid ticket: …`.
    pub fn parse(value: &Value, default_inactivity: u64) -> Result<Self, ApiError> {
        let invalid = |m: String| ApiError::BadRequest(format!("Invalid ticket: {m}"));
        let Some(obj) = value.as_object() else {
            return Err(invalid(format!(
                "Invalid ticket: {}, expecting a dict",
                py_repr(value)
            )));
        };
        let uuid = required(obj, "uuid", Kind::Str)?
            .as_str()
            .unwrap_or_default()
            .to_string();
        validate_id(&uuid).map_err(|reason| invalid(param_error("uuid", &json!(uuid), reason)))?;
        let size = required(obj, "size", Kind::Uint)?.as_u64().unwrap_or(0);
        let ops_value = required(obj, "ops", Kind::List)?;
        let mut ops = Vec::new();
        for op in ops_value.as_array().into_iter().flatten() {
            match op.as_str() {
                Some(s @ ("read" | "write")) => ops.push(s.to_string()),
                _ => {
                    return Err(invalid(param_error(
                        "ops",
                        ops_value,
                        "expecting 'read' or 'write'",
                    )));
                }
            }
        }
        let timeout = required(obj, "timeout", Kind::Uint)?.as_u64().unwrap_or(0);
        let inactivity_timeout = optional(obj, "inactivity_timeout", Kind::Uint)?
            .and_then(Value::as_u64)
            .unwrap_or(default_inactivity);
        let url_value = required(obj, "url", Kind::Str)?;
        let url = url_value.as_str().unwrap_or_default().to_string();
        let backend =
            parse_url(&url).map_err(|reason| invalid(param_error("url", url_value, &reason)))?;
        let transfer_id = match optional(obj, "transfer_id", Kind::Str)? {
            Some(v) => v.as_str().unwrap_or_default().to_string(),
            None => format!("(ticket/{})", uuid.chars().take(18).collect::<String>()),
        };
        let filename = optional(obj, "filename", Kind::Str)?
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(name) = &filename {
            if name.chars().any(|c| c.is_control() || c == '"') {
                return Err(invalid(param_error(
                    "filename",
                    &json!(name),
                    "control characters and quotes are not allowed",
                )));
            }
        }
        let sparse = optional(obj, "sparse", Kind::Bool)?
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let dirty = optional(obj, "dirty", Kind::Bool)?
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(TicketSpec {
            uuid,
            size,
            ops,
            timeout,
            inactivity_timeout,
            url,
            backend,
            transfer_id,
            filename,
            sparse,
            dirty,
        })
    }

    /// The transfer label for logs: the given `transfer_id`, or, for the
    /// default one (which embeds 18 characters of the secret ticket id),
    /// a redacted form.
    pub fn log_label(&self) -> String {
        if self.transfer_id.starts_with("(ticket/") {
            format!("(ticket/{})", redact(&self.uuid))
        } else {
            self.transfer_id.clone()
        }
    }

    /// Whether the ticket allows `access` (write implies read).
    pub fn may(&self, access: Access) -> bool {
        match access {
            Access::Read => self.ops.iter().any(|o| o == "read" || o == "write"),
            Access::Write => self.ops.iter().any(|o| o == "write"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Uint,
    List,
    Bool,
}

impl Kind {
    fn matches(self, v: &Value) -> bool {
        match self {
            Kind::Str => v.is_string(),
            Kind::Uint => v.is_u64(),
            Kind::List => v.is_array(),
            Kind::Bool => v.is_boolean(),
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Kind::Str => "expecting a <class 'str'> value",
            Kind::Uint => "expecting a <class 'int'> value",
            Kind::List => "expecting a <class 'list'> value",
            Kind::Bool => "expecting a <class 'bool'> value",
        }
    }
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str, kind: Kind) -> Result<&'a Value, ApiError> {
    match obj.get(key) {
        None => Err(ApiError::BadRequest(format!(
            "Invalid ticket: Required ticket parameter is missing: {key}"
        ))),
        Some(v) => check(key, v, kind),
    }
}

fn optional<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    kind: Kind,
) -> Result<Option<&'a Value>, ApiError> {
    obj.get(key).map(|v| check(key, v, kind)).transpose()
}

fn check<'a>(key: &str, v: &'a Value, kind: Kind) -> Result<&'a Value, ApiError> {
    if kind.matches(v) {
        Ok(v)
    } else {
        Err(ApiError::BadRequest(format!(
            "Invalid ticket: {}",
            param_error(key, v, kind.reason())
        )))
    }
}

fn param_error(key: &str, value: &Value, reason: &str) -> String {
    format!("Invalid value for '{key}': {}: {reason}", py_repr(value))
}

/// `repr()` of a JSON value as Python would print it, for imageio's texts.
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("'{k}': {}", py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Check a ticket id: non-empty, at most 256 characters of
/// `[A-Za-z0-9._-]`, not `.` or `..`. Ids reach file-system-free code
/// only, but odd ids are refused so paths can never be played with.
pub fn validate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("ticket id is empty");
    }
    if id.len() > MAX_ID_LEN {
        return Err("ticket id is longer than 256 characters");
    }
    if id == "." || id == ".." {
        return Err("ticket id may not be '.' or '..'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("ticket id may contain only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// The storage a ticket URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUrl {
    /// `file:///abs/path`: a local image file.
    File(PathBuf),
    /// `nbd:unix:/abs/path.sock[:exportname=NAME]`: an NBD export.
    Nbd(NbdAddress),
}

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest NBD export name (the NBD protocol's string limit).
const MAX_EXPORT_NAME: usize = 4096;

/// Parse a ticket URL: `file:///abs/path` or
/// `nbd:unix:/abs/path.sock[:exportname=NAME]`.
///
/// # Errors
/// The reason, for imageio's `Invalid value for 'url'` text.
pub fn parse_url(url: &str) -> Result<BackendUrl, String> {
    match url.split_once(':') {
        Some(("nbd", rest)) => parse_nbd_url(url, rest).map(BackendUrl::Nbd),
        _ => parse_file_url(url).map(BackendUrl::File),
    }
}

/// The address of an `nbd:unix:/abs/path.sock[:exportname=NAME]` URL
/// (`rest` is what follows `nbd:`). The path follows the rules of
/// [`parse_file_url`] and may not contain `:`; the name may not contain
/// control characters. TCP forms (`nbd:HOST:PORT`, `nbd://…`) are refused.
pub fn parse_nbd_url(url: &str, rest: &str) -> Result<NbdAddress, String> {
    let expecting = "expecting nbd:unix:/absolute/path[:exportname=NAME]";
    let Some(rest) = rest.strip_prefix("unix:") else {
        return Err(format!("Unsupported NBD URL: {url}, {expecting}"));
    };
    let (path, export) = match rest.split_once(':') {
        None => (rest, ""),
        Some((path, opt)) => match opt.strip_prefix("exportname=") {
            Some(name) => (path, name),
            None => return Err(format!("Unsupported NBD URL: {url}, {expecting}")),
        },
    };
    if !path.starts_with('/') {
        return Err(format!("NBD socket path must be absolute, {expecting}"));
    }
    check_path(path)?;
    if path.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "NBD socket path is longer than {MAX_SOCKET_PATH} bytes"
        ));
    }
    if export.len() > MAX_EXPORT_NAME || export.chars().any(char::is_control) {
        return Err(format!(
            "NBD export name must be at most {MAX_EXPORT_NAME} bytes without control characters"
        ));
    }
    Ok(NbdAddress {
        socket: PathBuf::from(path),
        export: export.to_string(),
    })
}

/// The path of a `file:///abs/path` URL. Refused: other schemes, a host,
/// relative paths, `.`/`..` components, empty components, percent escapes,
/// query, fragment and control characters.
pub fn parse_file_url(url: &str) -> Result<PathBuf, String> {
    let Some((scheme, rest)) = url.split_once(':') else {
        return Err("Unsupported url scheme: ".into());
    };
    if scheme != "file" {
        return Err(format!("Unsupported url scheme: {scheme}"));
    }
    let Some(path) = rest.strip_prefix("//") else {
        return Err("Expecting file:///absolute/path".into());
    };
    if !path.starts_with('/') {
        return Err("Expecting file:///absolute/path (no host)".into());
    }
    check_path(path)?;
    Ok(PathBuf::from(path))
}

/// Rules shared by file and socket paths: absolute, normalized, no
/// escapes, naming something other than `/`.
fn check_path(path: &str) -> Result<(), String> {
    if path
        .chars()
        .any(|c| c.is_control() || matches!(c, '%' | '?' | '#'))
    {
        return Err("Path may not contain control characters, '%', '?' or '#'".into());
    }
    if path.len() > 1 && (path.ends_with('/') || path.contains("//")) {
        return Err("Path may not contain empty components".into());
    }
    let p = Path::new(path);
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || path.split('/').any(|c| c == "." || c == "..")
    {
        return Err("Path may not contain '.' or '..' components".into());
    }
    if path == "/" {
        return Err("Path must name a file".into());
    }
    Ok(())
}

/// Merged, sorted byte ranges `[start, end)`: the bytes a ticket moved.
#[derive(Debug, Default, Clone)]
struct RangeList(Vec<(u64, u64)>);

impl RangeList {
    fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut merged = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.0 {
            if e < merged.0 {
                out.push((s, e));
            } else if s > merged.1 {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((s, e));
            } else {
                merged = (merged.0.min(s), merged.1.max(e));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.0 = out;
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Progress of one running op.
#[derive(Debug)]
pub struct OpProgress {
    offset: u64,
    done: AtomicU64,
}

impl OpProgress {
    /// Count `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct TicketState {
    /// Expiry in store-clock seconds.
    expires: u64,
    access_time: u64,
    canceled: bool,
    ongoing: HashMap<u64, Arc<OpProgress>>,
    next_op: u64,
    completed: RangeList,
    connections: HashSet<u64>,
}

/// One installed ticket.
#[derive(Debug)]
pub struct Ticket {
    spec: TicketSpec,
    clock: Clock,
    state: Mutex<TicketState>,
    /// Number of ops in flight; `remove` waits for 0.
    ongoing_tx: watch::Sender<usize>,
    /// Becomes true when the ticket is cancelled.
    canceled_tx: watch::Sender<bool>,
    /// The open storage, opened on first use; an NBD connection that
    /// failed is reopened by the next request.
    storage: tokio::sync::Mutex<Option<Storage>>,
}

/// Seconds since the store was made: the clock of `expires`.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
    fn now_secs(&self) -> u64 {
        self.0.elapsed().as_secs()
    }
}

impl Ticket {
    fn new(spec: TicketSpec, clock: Clock) -> Self {
        let now = clock.now_secs();
        let state = TicketState {
            expires: now.saturating_add(spec.timeout),
            access_time: now,
            ..TicketState::default()
        };
        Ticket {
            spec,
            clock,
            state: Mutex::new(state),
            ongoing_tx: watch::channel(0).0,
            canceled_tx: watch::channel(false).0,
            storage: tokio::sync::Mutex::new(None),
        }
    }

    /// The ticket as installed.
    pub fn spec(&self) -> &TicketSpec {
        &self.spec
    }

    fn state(&self) -> MutexGuard<'_, TicketState> {
        // A panic while holding this lock leaves plain counters behind:
        // keep serving with them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether DELETE has cancelled the ticket.
    pub fn canceled(&self) -> bool {
        self.state().canceled
    }

    /// Slide the expiry: `timeout` seconds from now.
    pub fn touch(&self) {
        let now = self.clock.now_secs();
        let mut st = self.state();
        st.expires = now.saturating_add(self.spec.timeout);
        st.access_time = now;
    }

    /// Control `PATCH {"timeout": n}`: expire `n` seconds from now, once.
    pub fn extend(&self, timeout: u64) {
        let now = self.clock.now_secs();
        self.state().expires = now.saturating_add(timeout);
    }

    /// Bind a connection to the ticket (counted in `connections`).
    pub fn add_connection(&self, conn: u64) {
        self.state().connections.insert(conn);
    }

    /// Unbind a closed connection.
    pub fn remove_connection(&self, conn: u64) {
        self.state().connections.remove(&conn);
    }

    /// Register an op over `offset..` ; the returned guard ends it.
    ///
    /// # Errors
    /// 403 when the ticket was cancelled meanwhile.
    pub fn start_op(self: &Arc<Self>, offset: u64) -> Result<OpGuard, ApiError> {
        let progress = Arc::new(OpProgress {
            offset,
            done: AtomicU64::new(0),
        });
        let id = {
            let mut st = self.state();
            if st.canceled {
                return Err(ApiError::Forbidden(format!(
                    "Transfer {} was canceled",
                    self.spec.transfer_id
                )));
            }
            st.next_op += 1;
            let id = st.next_op;
            st.ongoing.insert(id, progress.clone());
            self.ongoing_tx.send_replace(st.ongoing.len());
            id
        };
        Ok(OpGuard {
            ticket: self.clone(),
            id,
            progress,
        })
    }

    /// The storage behind the ticket: opened once, shared by every
    /// request; a broken NBD connection is replaced.
    ///
    /// # Errors
    /// The file cannot be opened, or the NBD server cannot be reached.
    pub(crate) async fn storage(&self) -> std::io::Result<Storage> {
        let mut slot = self.storage.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_broken() {
                return Ok(s.clone());
            }
            tracing::info!(transfer = %self.spec.log_label(), "reconnecting to the NBD server");
        }
        let s = Storage::open(&self.spec.backend, self.spec.may(Access::Write)).await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Close the storage (NBD: disconnect); the next request reopens it.
    pub(crate) async fn close_storage(&self) {
        let taken = self.storage.lock().await.take();
        if let Some(s) = taken {
            s.close().await;
        }
    }

    /// Bytes moved so far (union of completed and running op ranges); only
    /// for tickets with exactly one op, like imageio.
    pub fn transferred(&self) -> Option<u64> {
        if self.spec.ops.len() != 1 {
            return None;
        }
        let st = self.state();
        let mut ranges = st.completed.clone();
        for op in st.ongoing.values() {
            ranges.add(op.offset, op.offset + op.done.load(Ordering::Relaxed));
        }
        Some(ranges.sum())
    }

    /// The status JSON of the control API's GET.
    pub fn info(&self) -> Value {
        let transferred = self.transferred();
        let now = self.clock.now_secs();
        let st = self.state();
        let active = !st.ongoing.is_empty();
        let mut info = json!({
            "active": active,
            "canceled": st.canceled,
            "connections": st.connections.len(),
            "expires": st.expires,
            "idle_time": if active { 0 } else { now.saturating_sub(st.access_time) },
            "inactivity_timeout": self.spec.inactivity_timeout,
            "ops": self.spec.ops,
            "size": self.spec.size,
            "sparse": self.spec.sparse,
            "dirty": self.spec.dirty,
            "timeout": self.spec.timeout,
            "url": self.spec.url,
            "uuid": self.spec.uuid,
            "transfer_id": self.spec.transfer_id,
        });
        if let Some(obj) = info.as_object_mut() {
            if let Some(name) = &self.spec.filename {
                obj.insert("filename".into(), json!(name));
            }
            if let Some(t) = transferred {
                obj.insert("transferred".into(), json!(t));
            }
        }
        info
    }

    fn cancel(&self) {
        self.state().canceled = true;
        self.canceled_tx.send_replace(true);
    }

    /// Resolves once the ticket is cancelled, so an op blocked on a slow
    /// peer can stop without waiting for the peer.
    pub async fn wait_canceled(&self) {
        let mut rx = self.canceled_tx.subscribe();
        // The sender lives as long as the ticket: an error cannot happen.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// A running op; dropping it ends the op: accounting, expiry slide, and a
/// wake-up for a waiting DELETE.
#[derive(Debug)]
pub struct OpGuard {
    ticket: Arc<Ticket>,
    id: u64,
    progress: Arc<OpProgress>,
}

impl OpGuard {
    /// Progress handle, to count bytes from another task.
    pub fn progress(&self) -> &Arc<OpProgress> {
        &self.progress
    }

    /// The ticket this op runs on.
    pub fn ticket(&self) -> &Arc<Ticket> {
        &self.ticket
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let t = &self.ticket;
        let canceled = {
            let mut st = t.state();
            st.ongoing.remove(&self.id);
            t.ongoing_tx.send_replace(st.ongoing.len());
            if !st.canceled && t.spec.ops.len() == 1 {
                let p = &self.progress;
                st.completed
                    .add(p.offset, p.offset + p.done.load(Ordering::Relaxed));
            }
            st.canceled
        };
        if !canceled {
            t.touch();
        }
    }
}

/// Every installed ticket, by id.
#[derive(Debug)]
pub struct TicketStore {
    tickets: Mutex<HashMap<String, Arc<Ticket>>>,
    clock: Clock,
    default_inactivity: u64,
    remove_timeout: Duration,
}

impl TicketStore {
    /// An empty store. `default_inactivity` fills a ticket's missing
    /// `inactivity_timeout`; `remove_timeout` bounds DELETE's wait.
    pub fn new(default_inactivity: u64, remove_timeout: Duration) -> Self {
        TicketStore {
            tickets: Mutex::new(HashMap::new()),
            clock: Clock(Instant::now()),
            default_inactivity,
            remove_timeout,
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Ticket>>> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Default `inactivity_timeout` for tickets that do not set one.
    pub fn default_inactivity(&self) -> u64 {
        self.default_inactivity
    }

    /// Install (or replace) a ticket.
    pub fn add(&self, spec: TicketSpec) {
        tracing::info!(
            ticket = %redact(&spec.uuid),
            transfer = %spec.log_label(),
            size = spec.size,
            ops = ?spec.ops,
            "ticket added"
        );
        let ticket = Arc::new(Ticket::new(spec, self.clock));
        // Like imageio, a re-PUT replaces the ticket; ops running on the old
        // one finish on it.
        self.map().insert(ticket.spec.uuid.clone(), ticket);
    }

    /// The ticket `id`, if installed.
    pub fn get(&self, id: &str) -> Option<Arc<Ticket>> {
        self.map().get(id).cloned()
    }

    /// Check that `id` may do `access` now.
    ///
    /// # Errors
    /// 403 with imageio's reasons: no such ticket, canceled, expired, forbids.
    pub fn authorize(&self, id: &str, access: Access) -> Result<Arc<Ticket>, ApiError> {
        let Some(ticket) = self.get(id) else {
            return Err(ApiError::Forbidden(format!("No such ticket {id}")));
        };
        let tid = &ticket.spec.transfer_id;
        let (canceled, expires) = {
            let st = ticket.state();
            (st.canceled, st.expires)
        };
        if canceled {
            return Err(ApiError::Forbidden(format!("Transfer={tid} was canceled")));
        }
        if (expires as f64) <= self.clock.now() {
            return Err(ApiError::Forbidden(format!("Transfer={tid} expired")));
        }
        if !ticket.spec.may(access) {
            return Err(ApiError::Forbidden(format!(
                "Transfer={tid} forbids {}",
                access.name()
            )));
        }
        Ok(ticket)
    }

    /// Cancel ticket `id`, wait (bounded) for its ops to end, then remove it.
    /// Unknown ids are fine (DELETE is idempotent).
    ///
    /// # Errors
    /// 409 when ops are still running after the remove timeout; the ticket
    /// stays, cancelled, and a later DELETE may succeed.
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        let Some(ticket) = self.get(id) else {
            return Ok(());
        };
        ticket.cancel();
        let mut rx = ticket.ongoing_tx.subscribe();
        let idle = matches!(
            tokio::time::timeout(self.remove_timeout, rx.wait_for(|n| *n == 0)).await,
            Ok(Ok(_))
        );
        if !idle {
            return Err(ApiError::Conflict(format!(
                "Timeout cancelling transfer {}",
                ticket.spec.transfer_id
            )));
        }
        {
            let mut map = self.map();
            if map.get(id).is_some_and(|t| Arc::ptr_eq(t, &ticket)) {
                map.remove(id);
            }
        }
        ticket.close_storage().await;
        tracing::info!(ticket = %redact(id), transfer = %ticket.spec.log_label(), "ticket removed");
        Ok(())
    }

    /// Remove every ticket (cancelling running ops, not waiting).
    pub fn clear(&self) {
        let mut map = self.map();
        for t in map.values() {
            t.cancel();
        }
        map.clear();
        tracing::info!("all tickets removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: Value) -> Result<TicketSpec, ApiError> {
        let mut v = json!({
            "uuid": "abc", "size": 100, "ops": ["read"], "timeout": 10,
            "url": "file:///tmp/x.img"
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, val) in e {
                o.insert(k.clone(), val.clone());
            }
        }
        TicketSpec::parse(&v, 60)
    }

    #[test]
    fn parse_defaults() {
        let s = spec(json!({})).unwrap();
        assert_eq!(s.transfer_id, "(ticket/abc)");
        let long = spec(json!({"uuid": "0123456789abcdef0123"})).unwrap();
        assert_eq!(long.log_label(), "(ticket/01234567…)");
        assert_eq!(s.inactivity_timeout, 60);
        assert!(!s.sparse && !s.dirty);
        assert!(s.may(Access::Read) && !s.may(Access::Write));
    }

    #[test]
    fn parse_errors() {
        let e = spec(json!({"size": "1"})).unwrap_err().to_string();
        assert_eq!(
            e,
            "Invalid ticket: Invalid value for 'size': '1': expecting a <class 'int'> value"
        );
        let e = spec(json!({"url": "ftp://x"})).unwrap_err().to_string();
        assert_eq!(
            e,
            "Invalid ticket: Invalid value for 'url': 'ftp://x': Unsupported url scheme: ftp"
        );
        for bad in [
            "file:///a/../etc/passwd",
            "file://host/a",
            "file:relative",
            "file:///a/%2e%2e/b",
            "file:///a//b",
            "file:///",
        ] {
            assert!(spec(json!({"url": bad})).is_err(), "{bad}");
        }
        assert!(spec(json!({"uuid": "../x"})).is_err());
        assert!(spec(json!({"ops": ["read", 1]})).is_err());
        assert!(spec(json!({"size": -1})).is_err());
        let mut v = json!({"uuid": "a"});
        v.as_object_mut().unwrap().remove("uuid");
        assert_eq!(
            TicketSpec::parse(&json!({"uuid": "a"}), 60)
                .unwrap_err()
                .to_string(),
            "Invalid ticket: Required ticket parameter is missing: size"
        );
    }

    #[test]
    fn nbd_urls() {
        let addr = |url: &str| match spec(json!({ "url": url })).unwrap().backend {
            BackendUrl::Nbd(a) => (a.socket.display().to_string(), a.export),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            addr("nbd:unix:/run/x.sock"),
            ("/run/x.sock".into(), "".into())
        );
        assert_eq!(
            addr("nbd:unix:/run/x.sock:exportname=sda"),
            ("/run/x.sock".into(), "sda".into())
        );
        assert_eq!(
            addr("nbd:unix:/run/x.sock:exportname=a:b/c"),
            ("/run/x.sock".into(), "a:b/c".into())
        );
        let err = |url: &str| spec(json!({ "url": url })).unwrap_err().to_string();
        assert_eq!(
            err("nbd:localhost:10809"),
            "Invalid ticket: Invalid value for 'url': 'nbd:localhost:10809': Unsupported NBD URL: \
             nbd:localhost:10809, expecting nbd:unix:/absolute/path[:exportname=NAME]"
        );
        for bad in [
            "nbd://localhost:10809/sda",
            "nbd:unix:relative.sock",
            "nbd:unix:",
            "nbd:unix:/a/../b.sock",
            "nbd:unix:/a//b.sock",
            "nbd:unix:/a/b.sock:export=x",
            "nbd:unix:/a/b.sock:exportname=x\ny",
            "nbd:unix:/a/%2e.sock",
            "nbd:unix:/",
        ] {
            assert!(spec(json!({ "url": bad })).is_err(), "{bad}");
        }
        let long = format!("nbd:unix:/{}", "x".repeat(120));
        assert!(err(&long).contains("longer than 107 bytes"));
    }

    #[test]
    fn ranges_merge() {
        let mut r = RangeList::default();
        r.add(0, 10);
        r.add(20, 30);
        r.add(5, 25);
        r.add(40, 50);
        assert_eq!(r.0, vec![(0, 30), (40, 50)]);
        assert_eq!(r.sum(), 40);
    }

    #[tokio::test]
    async fn ops_and_cancel() {
        let store = TicketStore::new(60, Duration::from_secs(5));
        store.add(spec(json!({"ops": ["write"]})).unwrap());
        let t = store.authorize("abc", Access::Write).unwrap();
        assert!(store.authorize("abc", Access::Read).is_ok());
        let op = t.start_op(10).unwrap();
        op.progress().add(5);
        assert_eq!(t.transferred(), Some(5));
        assert_eq!(t.info()["active"], json!(true));
        let remove = store.remove("abc");
        tokio::pin!(remove);
        // DELETE waits while the op runs.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut remove)
                .await
                .is_err()
        );
        assert!(store.authorize("abc", Access::Read).is_err());
        drop(op);
        remove.await.unwrap();
        assert!(store.get("abc").is_none());
    }

    #[test]
    fn timeouts_near_u64_max_saturate() {
        let store = TicketStore::new(60, Duration::from_secs(1));
        let max = u64::MAX;
        store.add(spec(json!({"timeout": max, "inactivity_timeout": max})).unwrap());
        let t = store.authorize("abc", Access::Read).unwrap();
        assert_eq!(t.info()["expires"], json!(max));
        t.extend(max);
        t.touch();
        assert!(store.authorize("abc", Access::Read).is_ok());
        assert_eq!(t.info()["expires"], json!(max));
    }

    #[tokio::test]
    async fn expiry_and_forbid() {
        let store = TicketStore::new(60, Duration::from_secs(1));
        store.add(spec(json!({})).unwrap());
        let e = store
            .authorize("abc", Access::Write)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("Transfer=(ticket/abc) forbids write"), "{e}");
        store.get("abc").unwrap().extend(0);
        let e = store
            .authorize("abc", Access::Read)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("expired"), "{e}");
        let e = store
            .authorize("nope", Access::Read)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "You are not allowed to access this resource: No such ticket nope"
        );
    }
}
