//! GET / HEAD `/images/<ticket>`: a pipelined read of the range,
//! chunks read ahead of the socket.

use super::*;

pub(super) async fn get(
    shared: &Shared,
    conn: &Conn,
    req: &Request<RequestBody>,
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
    op: crate::imageio::ticket::OpGuard,
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
