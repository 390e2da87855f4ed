//! PUT `/images/<ticket>`: the body gathered into chunks written while
//! the next ones arrive.

use super::*;

pub(super) async fn put(
    shared: &Shared,
    conn: &Conn,
    req: Request<RequestBody>,
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
            if let Some(n) = cr.length() {
                if n != len && len != 0 {
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
    op: &crate::imageio::ticket::OpGuard,
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
