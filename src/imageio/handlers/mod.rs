//! The data API: `/images/<ticket>[/extents|/checksum[/algorithms]]` and
//! `/info/`. Each handler validates its input, authorizes the ticket,
//! registers an op on it and runs the work on its [`Storage`] (a file on
//! blocking threads, or an NBD export).
//!
//! Each handler reads as parse → authorize → operation → respond, one
//! module per operation: `read` (GET/HEAD), `write` (PUT), `patch` (zero,
//! flush), `options`, `extents`, `checksum`. This module routes and holds
//! what they share.

mod checksum;
mod extents;
mod options;
mod patch;
mod read;
mod write;

pub(crate) use patch::{PatchOp, parse_patch};

use super::body::{self, Body, ChannelBody};
use super::buffers::BufferPool;
use super::checksum::{self as sums, Algorithm};
use super::error::ApiError;
use super::range::{parse_content_range, parse_range};
use super::storage::Storage;
use super::ticket::{Access, Ticket};
use super::{Conn, Failure, Query, RequestBody, Shared};
use crate::telemetry::redact;
use bytes::Bytes;
use http_body_util::BodyExt;
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
    req: Request<RequestBody>,
    id: &str,
    resource: Resource,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let method = req.method().clone();
    if resource == Resource::Algorithms {
        // Server information: no ticket check, like imageio.
        return match method {
            Method::GET => Ok(json_response(&json!({"algorithms": sums::ALGORITHMS}))),
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
        (Resource::Image, &Method::GET) => read::get(shared, conn, &req, id, query, false).await,
        (Resource::Image, &Method::HEAD) => read::get(shared, conn, &req, id, query, true).await,
        (Resource::Image, &Method::PUT) => write::put(shared, conn, req, id, query).await,
        (Resource::Image, &Method::PATCH) => patch::patch(shared, conn, req, id).await,
        (Resource::Image, &Method::OPTIONS) => options::options(shared, conn, id).await,
        (Resource::Extents, &Method::GET) => extents::extents(shared, conn, id, query).await,
        (Resource::Checksum, &Method::GET) => checksum::checksum(shared, conn, id, query).await,
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
