//! The data API: `/images/<ticket>[/extents|/checksum[/algorithms]]` and
//! `/info/`. Each handler validates its input, authorizes the ticket,
//! registers an op on it and runs the work on its [`Storage`] (a file on
//! blocking threads, or an NBD export).

use super::body::{self, Body, ChannelBody};
use super::buffers::BufferPool;
use super::checksum::{self, Algorithm};
use super::error::ApiError;
use super::range::{parse_content_range, parse_range};
use super::storage::Storage;
use super::ticket::{Access, Ticket};
use super::{Conn, Failure, Query, Shared};
use crate::telemetry::redact;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    ACCEPT_RANGES, ALLOW, CONNECTION, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, HeaderValue,
};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Bytes read from disk per GET chunk.
pub(crate) const READ_CHUNK: usize = 4 * 1024 * 1024;
/// GET chunks queued ahead of the socket.
const READ_AHEAD: usize = 2;
/// GET chunk reads running at once (the disk likes a queue depth above 1).
const READS_IN_FLIGHT: usize = 2;
/// Bytes gathered from a PUT body before one `pwrite`.
pub(crate) const WRITE_CHUNK: usize = 8 * 1024 * 1024;
/// PUT chunks written at once (the disk likes a queue depth above 1).
const WRITES_IN_FLIGHT: usize = 2;
/// Largest PATCH body read.
const MAX_PATCH_BODY: usize = 64 * 1024;
/// Largest single zero step (cancellation is checked between steps).
const ZERO_STEP: u64 = 1 << 30;
/// Most extents returned; the rest is reported as data.
const MAX_EXTENTS: usize = 1 << 20;
/// Features of a writable ticket.
const ALL_FEATURES: [&str; 4] = ["checksum", "extents", "flush", "zero"];
/// Features of a read-only ticket.
const READ_FEATURES: [&str; 2] = ["checksum", "extents"];

/// The resource under `/images/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `/images/<id>`
    Image,
    /// `/images/<id>/extents`
    Extents,
    /// `/images/<id>/checksum`
    Checksum,
    /// `/images/<id>/checksum/algorithms`
    Algorithms,
}

/// Split `rest` (the path after `/images/`) into ticket id and resource.
pub fn parse_image_path(rest: &str) -> Option<(&str, Resource)> {
    if let Some(id) = rest.strip_suffix("/checksum/algorithms") {
        return Some((id, Resource::Algorithms));
    }
    if let Some(id) = rest.strip_suffix("/checksum") {
        return Some((id, Resource::Checksum));
    }
    if let Some(id) = rest.strip_suffix("/extents") {
        return Some((id, Resource::Extents));
    }
    if rest.contains('/') {
        return None;
    }
    Some((rest, Resource::Image))
}

/// Serve one `/images/...` request.
pub async fn images(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    id: &str,
    resource: Resource,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let method = req.method().clone();
    if resource == Resource::Algorithms {
        // Server information: no ticket check, like imageio.
        return match method {
            Method::GET => Ok(json_response(&json!({"algorithms": checksum::ALGORITHMS}))),
            _ => Err(not_allowed(&method, req.uri().path())),
        };
    }
    if id.is_empty() {
        return Err(Failure::closing(ApiError::BadRequest(
            "Ticket id is required".into(),
        )));
    }
    if id != "*" && super::ticket::validate_id(id).is_err() {
        return Err(Failure::closing(ApiError::BadRequest(
            "Invalid ticket id".into(),
        )));
    }
    tracing::debug!(%method, ticket = %redact(id), ?resource, "request");
    match (resource, &method) {
        (Resource::Image, &Method::GET) => get(shared, conn, &req, id, query, false).await,
        (Resource::Image, &Method::HEAD) => get(shared, conn, &req, id, query, true).await,
        (Resource::Image, &Method::PUT) => put(shared, conn, req, id, query).await,
        (Resource::Image, &Method::PATCH) => patch(shared, conn, req, id).await,
        (Resource::Image, &Method::OPTIONS) => options(shared, conn, id).await,
        (Resource::Extents, &Method::GET) => extents(shared, conn, id, query).await,
        (Resource::Checksum, &Method::GET) => checksum(shared, conn, id, query).await,
        _ => Err(Failure::closing(not_allowed(&method, req.uri().path()).err)),
    }
}

/// 405 for a method this path does not serve.
pub fn not_allowed(method: &Method, path: &str) -> Failure {
    Failure::from(ApiError::MethodNotAllowed(format!(
        "Method '{method}' not defined for '{path}'"
    )))
}

/// `GET /info/`.
pub fn info() -> Response<Body> {
    json_response(&json!({
        "version": "2.5.1",
        "server": concat!("nbdbridge/", env!("CARGO_PKG_VERSION")),
    }))
}

/// A 200 JSON response.
pub fn json_response(value: &Value) -> Response<Body> {
    let mut resp = Response::new(body::full(value.to_string()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn header_value(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Authorize and bind the ticket to this connection; 403 closes.
fn authorize(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    access: Access,
) -> Result<Arc<Ticket>, Failure> {
    let ticket = shared
        .tickets
        .authorize(id, access)
        .map_err(Failure::closing)?;
    conn.bind(&ticket);
    Ok(ticket)
}

async fn open_storage(ticket: &Ticket) -> Result<Storage, ApiError> {
    ticket.storage().await.map_err(ApiError::Internal)
}

fn canceled_error(ticket: &Ticket) -> ApiError {
    ApiError::Forbidden(format!(
        "Transfer {} was canceled",
        ticket.spec().transfer_id
    ))
}

async fn get(
    shared: &Shared,
    conn: &Conn,
    req: &Request<Incoming>,
    id: &str,
    query: &Query,
    head: bool,
) -> Result<Response<Body>, Failure> {
    let close = query.get("close") == Some("y");
    let ticket = authorize(shared, conn, id, Access::Read)?;
    let store = open_storage(&ticket).await?;
    let size = ticket.spec().size;
    let available = size.min(store.size());
    let range = match req.headers().get(hyper::header::RANGE) {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| {
                ApiError::range(
                    "Cannot satisfy range, invalid range or multiple ranges",
                    size,
                )
            })?;
            Some(parse_range(text, size)?)
        }
    };
    let (offset, len) = match range {
        None => (0, available),
        Some(r) => {
            if r.first >= size {
                return Err(ApiError::range("Requested range out of allowed range", size).into());
            }
            if r.first >= available {
                return Err(ApiError::range(
                    format!(
                        "Requested more bytes than available: {} > {available}",
                        r.first + 1
                    ),
                    available,
                )
                .into());
            }
            // HTTP: a last byte past the end means "to the end".
            let last = r.last.unwrap_or(u64::MAX).min(available - 1);
            (r.first, last - r.first + 1)
        }
    };
    let mut resp = if head || len == 0 {
        if head {
            ticket.touch();
        }
        Response::new(body::empty())
    } else {
        let op = ticket.start_op(offset)?;
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        tokio::spawn(produce(
            op,
            store,
            shared.read_pool.clone(),
            offset,
            len,
            tx,
        ));
        Response::new(ChannelBody::new(rx, len).boxed())
    };
    let headers = resp.headers_mut();
    headers.insert(CONTENT_LENGTH, header_value(len));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let disposition = match &ticket.spec().filename {
        Some(name) => format!("attachment; filename={name}"),
        None => "attachment".into(),
    };
    headers.insert(CONTENT_DISPOSITION, header_value(disposition));
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let last = (offset + len).saturating_sub(1);
        resp.headers_mut().insert(
            CONTENT_RANGE,
            header_value(format!("bytes {offset}-{last}/{size}")),
        );
    }
    if close {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// Read `offset..offset+len` in chunks ahead of the socket. Ends the op
/// (dropping its guard) when the last chunk was handed over.
async fn produce(
    op: super::ticket::OpGuard,
    store: Storage,
    pool: Arc<BufferPool>,
    offset: u64,
    len: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let end = offset + len;
    let mut next = offset;
    let mut reads: VecDeque<(JoinHandle<io::Result<Bytes>>, usize)> = VecDeque::new();
    loop {
        while reads.len() < READS_IN_FLIGHT && next < end {
            let n = (end - next).min(READ_CHUNK as u64) as usize;
            reads.push_back((store.spawn_read(&pool, next, n), n));
            next += n as u64;
        }
        let Some((read, n)) = reads.pop_front() else {
            return;
        };
        if op.ticket().canceled() {
            let _ = tx
                .send(Err(io::Error::other("ticket canceled during read")))
                .await;
            return;
        }
        let chunk = match read.await {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "read failed");
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e))).await;
                return;
            }
        };
        op.progress().add(n as u64);
        tokio::select! {
            sent = tx.send(Ok(chunk)) => if sent.is_err() {
                // The client went away.
                return;
            },
            // Dropping `tx` early aborts the response: the client sees a
            // truncated body, as with imageio.
            _ = op.ticket().wait_canceled() => return,
        }
    }
}

async fn put(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let close = query.get("close") == Some("y");
    let len: u64 = match req.headers().get(CONTENT_LENGTH) {
        None => {
            return Err(Failure::closing(ApiError::BadRequest(
                "Content-Length header is required".into(),
            )));
        }
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Failure::closing(ApiError::BadRequest("Invalid Content-Length".into()))
            })?,
    };
    let offset = match req.headers().get(CONTENT_RANGE) {
        None => 0,
        Some(v) => {
            let text = v.to_str().map_err(|_| {
                Failure::closing(ApiError::BadRequest("Invalid Content-Range".into()))
            })?;
            let cr = parse_content_range(text).map_err(Failure::closing)?;
            if let Some(length) = cr.length() {
                if length != len && len != 0 {
                    return Err(Failure::closing(ApiError::BadRequest(format!(
                        "Content-Range '{text}' does not match Content-Length {len}"
                    ))));
                }
            }
            cr.first
        }
    };
    let flush = match query.get("flush") {
        None | Some("y") => true,
        Some("n") => false,
        Some(other) => {
            return Err(Failure::closing(ApiError::BadRequest(format!(
                "Unsupported value '{other}' for 'flush', expecting one of ['n', 'y']"
            ))));
        }
    };
    let ticket = authorize(shared, conn, id, Access::Write)?;
    let size = ticket.spec().size;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Failure::closing(ApiError::range(
            "Requested range out of allowed range",
            size,
        )));
    }
    let store = open_storage(&ticket).await.map_err(Failure::closing)?;
    let op = ticket.start_op(offset).map_err(Failure::closing)?;
    let mut body = req.into_body();
    let pool = &shared.write_pool;
    let mut buf = pool.get();
    let mut pos = offset;
    let mut received = 0u64;
    let mut pending: VecDeque<(JoinHandle<io::Result<()>>, u64)> = VecDeque::new();
    let mut body_error = None;
    while received < len {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = ticket.wait_canceled() => {
                finish_writes(&op, &mut pending, 0).await.ok();
                return Err(Failure::closing(canceled_error(&ticket)));
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                body_error = Some(e);
                break;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        received += data.len() as u64;
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let taken = buf.extend(rest);
            rest = rest.get(taken..).unwrap_or_default();
            if buf.remaining() == 0 {
                // Bounded: WRITES_IN_FLIGHT chunks being written, one filling.
                let full = std::mem::replace(&mut buf, pool.get());
                finish_writes(&op, &mut pending, WRITES_IN_FLIGHT - 1)
                    .await
                    .map_err(Failure::closing)?;
                let n = full.len() as u64;
                pending.push_back((store.spawn_write(pos, full), n));
                pos += n;
            }
        }
    }
    if !buf.is_empty() {
        let n = buf.len() as u64;
        pending.push_back((store.spawn_write(pos, buf), n));
    } else {
        drop(buf);
    }
    finish_writes(&op, &mut pending, 0)
        .await
        .map_err(Failure::closing)?;
    if received < len {
        if let Some(e) = body_error {
            tracing::debug!(error = %e, "PUT body ended early");
        }
        return Err(Failure::closing(ApiError::BadRequest(format!(
            "Requested {len} bytes, available {received} bytes"
        ))));
    }
    if flush {
        store.flush().await.map_err(ApiError::from)?;
    }
    drop(op);
    let mut resp = Response::new(body::empty());
    if close {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// Wait for the oldest writes until at most `keep` are in flight.
async fn finish_writes(
    op: &super::ticket::OpGuard,
    pending: &mut VecDeque<(JoinHandle<io::Result<()>>, u64)>,
    keep: usize,
) -> Result<(), ApiError> {
    while pending.len() > keep {
        let Some((handle, n)) = pending.pop_front() else {
            break;
        };
        match handle.await {
            Ok(Ok(())) => op.progress().add(n),
            Ok(Err(e)) => return Err(ApiError::Internal(e)),
            Err(e) => return Err(ApiError::Internal(io::Error::other(e))),
        }
    }
    Ok(())
}

async fn patch(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, Failure> {
    let data = super::read_body(req.into_body(), MAX_PATCH_BODY).await?;
    match parse_patch(&data)? {
        PatchOp::Zero {
            size,
            offset,
            flush: and_flush,
        } => zero(shared, conn, id, size, offset, and_flush).await,
        PatchOp::Flush => flush(shared, conn, id).await,
    }
}

/// A parsed PATCH message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchOp {
    /// `{"op": "zero", "size": N, "offset": N, "flush": B}`.
    Zero {
        /// Bytes to zero.
        size: u64,
        /// Where.
        offset: u64,
        /// Flush afterwards.
        flush: bool,
    },
    /// `{"op": "flush"}`.
    Flush,
}

/// Parse a PATCH body the way imageio does (same texts).
pub(crate) fn parse_patch(data: &[u8]) -> Result<PatchOp, ApiError> {
    let msg: Value = serde_json::from_slice(data)
        .map_err(|e| ApiError::BadRequest(format!("Invalid JSON message {e}")))?;
    let Some(msg) = msg.as_object() else {
        return Err(ApiError::BadRequest(
            "Invalid JSON message: expecting an object".into(),
        ));
    };
    match msg.get("op") {
        None => Err(ApiError::BadRequest("Missing required value for op".into())),
        Some(Value::String(op)) if op == "zero" => {
            let size = msg_uint(msg, "size", None)?;
            let offset = msg_uint(msg, "offset", Some(0))?;
            let flush = match msg.get("flush") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "Boolean required {}",
                        super::ticket::py_repr(other)
                    )));
                }
            };
            Ok(PatchOp::Zero {
                size,
                offset,
                flush,
            })
        }
        Some(Value::String(op)) if op == "flush" => Ok(PatchOp::Flush),
        Some(other) => Err(ApiError::BadRequest(format!(
            "Unsupported value {} for 'op', expecting one of ['flush', 'zero']",
            super::ticket::py_repr(other)
        ))),
    }
}

/// imageio's `validate.integer(msg, name, minval=0)`.
fn msg_uint(msg: &Map<String, Value>, name: &str, default: Option<u64>) -> Result<u64, ApiError> {
    match msg.get(name) {
        None => default
            .ok_or_else(|| ApiError::BadRequest(format!("Missing required value for '{name}'"))),
        Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64().unwrap_or(0)),
        Some(Value::Number(n)) if n.is_i64() => {
            Err(ApiError::BadRequest(format!("Invalid value {n} < 0")))
        }
        Some(other) => Err(ApiError::BadRequest(format!(
            "Integer required {}",
            super::ticket::py_repr(other)
        ))),
    }
}

async fn zero(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    len: u64,
    offset: u64,
    flush: bool,
) -> Result<Response<Body>, Failure> {
    let ticket = authorize(shared, conn, id, Access::Write)?;
    let size = ticket.spec().size;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(ApiError::range("Requested range out of allowed range", size).into());
    }
    let store = open_storage(&ticket).await?;
    let op = ticket.start_op(offset)?;
    let punch = ticket.spec().sparse;
    let mut done = 0;
    while done < len {
        if ticket.canceled() {
            return Err(canceled_error(&ticket).into());
        }
        let step = (len - done).min(ZERO_STEP);
        store
            .zero(offset + done, step, punch)
            .await
            .map_err(ApiError::from)?;
        op.progress().add(step);
        done += step;
    }
    if flush {
        store.flush().await.map_err(ApiError::from)?;
    }
    drop(op);
    Ok(Response::new(body::empty()))
}

async fn flush(shared: &Shared, conn: &Conn, id: &str) -> Result<Response<Body>, Failure> {
    let ticket = authorize(shared, conn, id, Access::Write)?;
    let store = open_storage(&ticket).await?;
    let op = ticket.start_op(0)?;
    store.flush().await.map_err(ApiError::from)?;
    drop(op);
    Ok(Response::new(body::empty()))
}

async fn options(shared: &Shared, conn: &Conn, id: &str) -> Result<Response<Body>, Failure> {
    let mut options = Map::new();
    if let Some(sock) = &shared.local_socket {
        options.insert("unix_socket".into(), json!(sock));
    }
    let allow = if id == "*" {
        options.insert("features".into(), json!(ALL_FEATURES));
        "OPTIONS,GET,PUT,PATCH"
    } else {
        let ticket = authorize(shared, conn, id, Access::Read)?;
        // Like imageio: OPTIONS opens the backend, so an unreachable NBD
        // server or a missing file is a 500 here already.
        open_storage(&ticket).await?;
        ticket.touch();
        options.insert("max_readers".into(), json!(shared.max_readers));
        options.insert("max_writers".into(), json!(shared.max_writers));
        if ticket.spec().may(Access::Write) {
            options.insert("features".into(), json!(ALL_FEATURES));
            "OPTIONS,GET,PUT,PATCH"
        } else {
            options.insert("features".into(), json!(READ_FEATURES));
            "OPTIONS,GET"
        }
    };
    let mut resp = json_response(&Value::Object(options));
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    Ok(resp)
}

async fn extents(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let ticket = authorize(shared, conn, id, Access::Read)?;
    let context = query.get("context").unwrap_or("zero");
    if context != "zero" && context != "dirty" {
        return Err(ApiError::BadRequest(format!(
            "Unsupported value '{context}' for 'context', expecting one of ['dirty', 'zero']"
        ))
        .into());
    }
    if context == "dirty" && !ticket.spec().dirty {
        return Err(ApiError::NotFound("Ticket does not support dirty extents".into()).into());
    }
    let store = open_storage(&ticket).await?;
    let size = store.size();
    if context == "dirty" && store.is_nbd() {
        // We do not ask qemu-nbd for its dirty bitmap (imageio does, with
        // the same answer when the export has none).
        let name = match &ticket.spec().backend {
            super::ticket::BackendUrl::Nbd(a) => a.export.clone(),
            super::ticket::BackendUrl::File(_) => String::new(),
        };
        return Err(ApiError::NotFound(format!(
            "NBD export '{name}' does not support dirty extents"
        ))
        .into());
    }
    if context == "dirty" {
        // A plain file keeps no dirty bitmap: everything may have changed.
        let list = if size == 0 {
            json!([])
        } else {
            json!([{"start": 0, "length": size, "dirty": true, "zero": false}])
        };
        return Ok(json_response(&list));
    }
    let found = store
        .zero_extents(MAX_EXTENTS)
        .await
        .map_err(ApiError::from)?;
    let mut list: Vec<Value> = found
        .iter()
        .map(|e| json!({"start": e.start, "length": e.length, "zero": e.zero, "hole": e.hole}))
        .collect();
    let covered = found.last().map(|e| e.start + e.length).unwrap_or(0);
    if covered < size {
        list.push(
            json!({"start": covered, "length": size - covered, "zero": false, "hole": false}),
        );
    }
    Ok(json_response(&Value::Array(list)))
}

async fn checksum(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let algorithm = Algorithm::parse(
        query
            .get("algorithm")
            .unwrap_or(checksum::DEFAULT_ALGORITHM),
    )?;
    let block_size = checksum::parse_block_size(query.get("block_size"))?;
    let ticket = authorize(shared, conn, id, Access::Read)?;
    let store = open_storage(&ticket).await?;
    let op = ticket.start_op(0)?;
    let progress = op.progress().clone();
    let t = ticket.clone();
    let result = store
        .checksum(
            algorithm,
            block_size,
            move || t.canceled(),
            move |n| progress.add(n),
        )
        .await;
    let digest = match result {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            return Err(canceled_error(&ticket).into());
        }
        Err(e) => return Err(ApiError::Internal(e).into()),
    };
    drop(op);
    Ok(json_response(&json!({
        "algorithm": algorithm.name(),
        "block_size": block_size,
        "checksum": digest,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths() {
        assert_eq!(parse_image_path("abc"), Some(("abc", Resource::Image)));
        assert_eq!(
            parse_image_path("abc/extents"),
            Some(("abc", Resource::Extents))
        );
        assert_eq!(
            parse_image_path("abc/checksum"),
            Some(("abc", Resource::Checksum))
        );
        assert_eq!(
            parse_image_path("abc/checksum/algorithms"),
            Some(("abc", Resource::Algorithms))
        );
        assert_eq!(parse_image_path("abc/other"), None);
        assert_eq!(parse_image_path("../x/y"), None);
    }
}
