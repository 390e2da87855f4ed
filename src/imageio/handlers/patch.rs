//! PATCH `/images/<ticket>`: zero and flush.

use super::*;

pub(super) async fn patch(
    shared: &Shared,
    conn: &Conn,
    req: Request<RequestBody>,
    id: &str,
) -> Result<Response<Body>, Failure> {
    let data = crate::imageio::read_body(req.into_body(), MAX_PATCH_BODY).await?;
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
                        crate::imageio::ticket::py_repr(other)
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
            crate::imageio::ticket::py_repr(other)
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
            crate::imageio::ticket::py_repr(other)
        ))),
    }
}

pub(super) async fn zero(
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

pub(super) async fn flush(
    shared: &Shared,
    conn: &Conn,
    id: &str,
) -> Result<Response<Body>, Failure> {
    let ticket = authorize(shared, conn, id, Access::Write)?;
    let store = open_storage(&ticket).await?;
    let op = ticket.start_op(0)?;
    store.flush().await.map_err(ApiError::from)?;
    drop(op);
    Ok(Response::new(body::empty()))
}
