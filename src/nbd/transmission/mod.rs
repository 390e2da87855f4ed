//! The transmission phase: read → validate → spawn → one writer.
//!
//! The reading side parses headers and payloads in order, validates each
//! request and spawns it; the requests run concurrently against the backend
//! and hand their encoded replies to a single writer task, so replies go out
//! as each completes. A semaphore bounds the requests in flight on each
//! connection, and one [`Budget`] the bytes in flight of all connections.

pub mod budget;
mod execute;
pub mod extents;
pub mod reply;
pub mod request;

pub use self::budget::Budget;
use self::budget::{Share, block_status_bytes};
use self::request::{Command, Limits, header_len, parse_request, validate_request};
use super::consts::*;
use super::error::ProtocolError;
use super::handshake::Negotiated;
use super::mode::ReplyMode;
use super::{Answered, Observer};
use crate::backend::Backend;
use crate::bufpool::PoolBuf;
use crate::shutdown::Shutdown;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

/// Limits of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct TransmissionConfig {
    /// Requests in flight at once on one connection.
    pub max_requests: u32,
    /// Bytes (read replies, write payloads, block status replies) in
    /// flight at once on all connections together; raised to the largest
    /// single request so that each always fits.
    pub max_bytes: u64,
}

impl Default for TransmissionConfig {
    fn default() -> Self {
        TransmissionConfig {
            max_requests: 256,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// How a connection's transmission phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent NBD_CMD_DISC.
    Disconnect,
    /// The client closed the socket without NBD_CMD_DISC.
    Vanished,
    /// The server is shutting down.
    Shutdown,
}

/// A reply ready for the wire, holding its share of the budget until written.
struct Outgoing {
    parts: Vec<Bytes>,
    _permits: (OwnedSemaphorePermit, Option<Share>),
}

/// Who is told of every answered request: the observer, and this
/// connection's number.
#[derive(Clone)]
pub struct Watch {
    /// Told of each answered request.
    pub observer: Arc<dyn Observer>,
    /// The connection.
    pub conn: u64,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("conn", &self.conn).finish()
    }
}

/// Run the transmission phase until DISC, EOF or shutdown, charging the
/// bytes in flight to the server's `budget`. In-flight requests are always
/// finished and their replies written before it returns, and `watch` is
/// told of each one before its reply is sent.
///
/// # Errors
/// The client broke the protocol (bad magic, oversized payload) or the
/// socket failed mid-request.
pub async fn run<R, W, B>(
    mut reader: BufReader<R>,
    writer: W,
    negotiated: Negotiated<B>,
    config: TransmissionConfig,
    budget: Budget,
    shutdown: Shutdown,
    watch: Watch,
) -> Result<End, ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let Negotiated {
        export,
        mode,
        meta,
        flags,
    } = negotiated;
    let limits = Limits {
        size: export.size(),
        flags,
        mode,
        max_payload: export.max_payload(),
        has_meta: !meta.is_empty(),
    };
    let contexts = usize::from(meta.allocation.is_some()) + usize::from(meta.dirty.is_some());
    let meta = Arc::new(meta);
    let requests = Arc::new(Semaphore::new(config.max_requests as usize));
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer_task = tokio::spawn(write_replies(writer, rx));

    let hlen = header_len(mode);
    let mut head = [0u8; 32];
    let result = loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.wait() => break Ok(End::Shutdown),
            r = reader.read_exact(head.get_mut(..hlen).unwrap_or_default()) => r,
        };
        if let Err(e) = read {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                break Ok(End::Vanished);
            }
            break Err(e.into());
        }
        let header = match parse_request(head.get(..hlen).unwrap_or_default(), mode) {
            Ok(h) => h,
            Err(e) => break Err(e),
        };
        if header.kind == NBD_CMD_DISC {
            break Ok(End::Disconnect);
        }
        let payload_len = header.payload_len(mode);
        if payload_len > u64::from(limits.max_payload) {
            break Err(ProtocolError::TooLarge(format!(
                "{} payload of {payload_len} bytes (limit {})",
                command_name(header.kind),
                limits.max_payload
            )));
        }
        let validated = validate_request(&header, &limits);
        // A rejected request's payload is discarded through a small
        // buffer, and its reply is a few bytes: it is not charged.
        let charge = match &validated {
            Ok(Command::Read { len, .. }) => u64::from(*len),
            Ok(Command::BlockStatus { req_one, .. }) => {
                block_status_bytes(mode == ReplyMode::Extended, contexts, *req_one)
            }
            Ok(_) => payload_len,
            Err(_) => 0,
        };
        let Ok(count_permit) = Arc::clone(&requests).acquire_owned().await else {
            break Ok(End::Shutdown);
        };
        let byte_permit = if charge > 0 {
            // Other connections may hold the budget: wait, but not past a
            // shutdown.
            let share = tokio::select! {
                biased;
                _ = shutdown.wait() => None,
                s = budget.charge(charge) => s,
            };
            match share {
                Some(share) => Some(share),
                None => break Ok(End::Shutdown),
            }
        } else {
            None
        };
        let permits = (count_permit, byte_permit);
        let command = match validated {
            Ok(command) => command,
            Err(err) => {
                if let Err(e) = discard(&mut reader, payload_len).await {
                    break Err(e);
                }
                tracing::debug!(
                    cookie = header.cookie,
                    cmd = command_name(header.kind),
                    errno = err.errno,
                    message = %err.message,
                    "request rejected"
                );
                watch.observer.answered(
                    watch.conn,
                    &Answered {
                        command: header.kind,
                        offset: header.offset,
                        len: header.len,
                        ok: false,
                    },
                );
                let mut buf = BytesMut::with_capacity(64);
                reply::encode_status(&mut buf, mode, header.cookie, header.offset, Err(&err));
                let _ = tx.send(Outgoing {
                    parts: vec![buf.freeze()],
                    _permits: permits,
                });
                continue;
            }
        };
        let payload = if payload_len > 0 {
            match read_payload(&mut reader, payload_len as usize).await {
                Ok(p) => Some(p),
                Err(e) => break Err(e),
            }
        } else {
            None
        };
        let span = tracing::debug_span!(
            "request",
            cookie = header.cookie,
            cmd = command_name(header.kind),
            offset = header.offset,
            len = header.len
        );
        let export = Arc::clone(&export);
        let meta = Arc::clone(&meta);
        let tx = tx.clone();
        let watch = watch.clone();
        tokio::spawn(
            async move {
                let (parts, answered) = execute::execute(
                    &export,
                    mode,
                    &meta,
                    header.cookie,
                    header.offset,
                    command,
                    payload,
                )
                .await;
                watch.observer.answered(watch.conn, &answered);
                let _ = tx.send(Outgoing {
                    parts,
                    _permits: permits,
                });
            }
            .instrument(span),
        );
    };

    // Finish what is in flight: every request holds a permit until its reply
    // is written.
    let _all = requests.acquire_many(config.max_requests).await;
    drop(tx);
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "reply writer stopped"),
        Err(e) => tracing::warn!(error = %e, "reply writer failed"),
    }
    result
}

/// Read a write's payload. What the read buffer already holds is copied
/// out; the rest goes straight from the socket into the payload, not
/// through the read buffer (a payload as large as the buffer would
/// otherwise be copied twice: that was 16% of the bridge's CPU on nbdcopy's
/// 256 KiB writes).
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    len: usize,
) -> Result<Bytes, ProtocolError> {
    let mut buf = PoolBuf::new(len);
    let dst = buf.as_mut_slice();
    let buffered = reader.buffer();
    let n = buffered.len().min(dst.len());
    if let (Some(to), Some(from)) = (dst.get_mut(..n), buffered.get(..n)) {
        to.copy_from_slice(from);
    }
    std::pin::Pin::new(&mut *reader).consume(n);
    if let Some(rest) = dst.get_mut(n..) {
        if !rest.is_empty() {
            reader.get_mut().read_exact(rest).await?;
        }
    }
    Ok(buf.freeze())
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> Result<(), ProtocolError> {
    if len == 0 {
        return Ok(());
    }
    let copied = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    // Replies that are ready go out together in vectored writes: headers
    // and data of many replies in one syscall, data never copied.
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    let mut held: Vec<Outgoing> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(mut msg) = next {
            queue.extend(msg.parts.drain(..).filter(|p| !p.is_empty()));
            held.push(msg);
            next = if held.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        write_queue(&mut writer, &mut queue).await?;
        held.clear();
    }
    writer.flush().await?;
    writer.shutdown().await.or(Ok(()))
}

/// Most replies gathered into one round of vectored writes.
const MAX_BATCH: usize = 64;
/// Most buffers passed to one `writev`.
const MAX_IOVEC: usize = 128;

async fn write_queue<W: AsyncWrite + Unpin>(
    writer: &mut W,
    queue: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !queue.is_empty() {
        let slices: Vec<IoSlice<'_>> = queue
            .iter()
            .take(MAX_IOVEC)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = queue.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                queue.pop_front();
            } else {
                bytes::Buf::advance(front, n);
                n = 0;
            }
        }
    }
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Payloads read around the read buffer keep the stream's order, for
    /// every buffer size, payload size and amount already buffered.
    #[tokio::test]
    async fn payloads_bypass_the_read_buffer_in_order() {
        let stream: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
        for capacity in [1, 3, 16, 64, 1024] {
            for head in [0, 1, 5, 20] {
                for len in [0, 1, 7, 64, 200] {
                    let mut r = BufReader::with_capacity(capacity, &stream[..]);
                    let mut h = vec![0u8; head];
                    r.read_exact(&mut h).await.unwrap();
                    let payload = read_payload(&mut r, len).await.unwrap();
                    assert_eq!(
                        &payload[..],
                        &stream[head..head + len],
                        "{capacity} {head} {len}"
                    );
                    let mut next = [0u8; 5];
                    r.read_exact(&mut next).await.unwrap();
                    assert_eq!(next, stream[head + len..head + len + 5]);
                }
            }
        }
    }

    #[tokio::test]
    async fn a_short_payload_is_an_error() {
        let stream = [1u8, 2, 3];
        let mut r = BufReader::with_capacity(2, &stream[..]);
        assert!(read_payload(&mut r, 4).await.is_err());
    }
}
