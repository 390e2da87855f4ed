//! [`NbdClient`]: one connection, many requests in flight, one reader task
//! that matches replies to requests by cookie.

use super::extents::{
    DirtyExtent, ExtentBuilder, ZeroExtent, alloc_flags, depth_flags, dirty_descriptors, merge,
};
use super::handshake::{self, ConnectOptions, ExportInfo};
use super::reply::{self, ChunkPlan, Magic, RequestView};
use super::{Error, MAX_IN_FLIGHT, MAX_STATUS, MAX_ZERO, NbdAddress, errno_name};
use crate::nbd::consts::*;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How long connecting and the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer of the reply reader.
const READ_BUFFER: usize = 256 * 1024;

/// What a completed request produced.
#[derive(Debug)]
enum Reply {
    Done,
    Data(Bytes),
    Status(Vec<(u32, Vec<(u32, u32)>)>),
}

/// A request waiting for its reply; owned by the reader once sent.
#[derive(Debug)]
struct Pending {
    req: RequestView,
    tx: oneshot::Sender<Result<Reply, Error>>,
    data: Option<BytesMut>,
    covered: u64,
    coverage: reply::Coverage,
    status: Vec<(u32, Vec<(u32, u32)>)>,
    error: Option<reply::ChunkError>,
}

impl Pending {
    fn request_error(&self, e: &reply::ChunkError) -> Error {
        Error::Request {
            command: command_name(self.req.command),
            offset: self.req.offset,
            len: u64::from(self.req.len),
            errno: errno_name(e.code),
            message: e.message.clone(),
        }
    }
}

/// State shared by the requesters and the reader task.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    broken: AtomicBool,
    reason: Mutex<String>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Mark the connection unusable and fail every request in flight.
    fn fail(&self, reason: String) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_empty() {
                *r = reason;
            }
        }
        self.broken.store(true, Ordering::SeqCst);
        let drained: Vec<Pending> = self.pending().drain().map(|(_, p)| p).collect();
        let reason = self.reason();
        for p in drained {
            let _ = p.tx.send(Err(Error::Disconnected(reason.clone())));
        }
    }
}

/// Marks the connection broken if a request is abandoned half-sent (its
/// future dropped in the middle of writing), since the stream is then out
/// of step.
struct SendGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared
                .fail("a request was abandoned while being sent".into());
        }
    }
}

/// Removes a pending request whose future was dropped before it was
/// sent (forgotten once the request goes out).
struct Unsent<'a> {
    shared: &'a Shared,
    cookie: u64,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.shared.pending().remove(&self.cookie);
    }
}

/// A connected NBD client. Cheap to share behind an `Arc`: every method
/// takes `&self` and may run concurrently with the others.
#[derive(Debug)]
pub struct NbdClient {
    address: NbdAddress,
    info: ExportInfo,
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    slots: Semaphore,
    next_cookie: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    /// Connect to `address` and run the handshake (the default
    /// [`ConnectOptions`]: `base:allocation` and `qemu:allocation-depth`).
    ///
    /// # Errors
    /// The socket is missing or refuses, the handshake fails or times out.
    pub async fn connect(address: &NbdAddress) -> Result<NbdClient, Error> {
        Self::connect_with(address, &ConnectOptions::default()).await
    }

    /// Connect to `address` and run the handshake, selecting the meta
    /// contexts of `options` too (the dirty bitmap, named contexts).
    ///
    /// # Errors
    /// The socket is missing or refuses, the handshake fails or times out,
    /// `options` asks for too many or oversized context names.
    pub async fn connect_with(
        address: &NbdAddress,
        options: &ConnectOptions,
    ) -> Result<NbdClient, Error> {
        let span = tracing::info_span!("nbd_client", socket = %address.socket.display(), export = %address.export);
        async {
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            let stream = tokio::time::timeout_at(deadline, UnixStream::connect(&address.socket))
                .await
                .map_err(|_| Error::Timeout(address.to_string()))?
                .map_err(|source| Error::Connect {
                    address: address.to_string(),
                    source,
                })?;
            crate::net::socket::prepare_unix(&stream);
            Self::over_with(stream, address, options, deadline).await
        }
        .instrument(span)
        .await
    }

    /// Run the handshake on a connected `stream` (by `deadline`) and start
    /// the reply reader.
    pub(crate) async fn over(
        stream: UnixStream,
        address: &NbdAddress,
        deadline: tokio::time::Instant,
    ) -> Result<NbdClient, Error> {
        Self::over_with(stream, address, &ConnectOptions::default(), deadline).await
    }

    /// [`over`](Self::over) with `options` for the handshake.
    pub(crate) async fn over_with(
        mut stream: UnixStream,
        address: &NbdAddress,
        options: &ConnectOptions,
        deadline: tokio::time::Instant,
    ) -> Result<NbdClient, Error> {
        let info = tokio::time::timeout_at(
            deadline,
            handshake::negotiate_with(&mut stream, &address.export, options),
        )
        .await
        .map_err(|_| Error::Timeout(address.to_string()))??;
        tracing::debug!(
            size = info.size,
            flags = info.flags,
            ?info,
            "NBD export ready"
        );
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(
            read_replies(
                shared.clone(),
                BufReader::with_capacity(READ_BUFFER, rd),
                info.clone(),
            )
            .in_current_span(),
        );
        Ok(NbdClient {
            address: address.clone(),
            info,
            shared,
            writer: tokio::sync::Mutex::new(wr),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            next_cookie: AtomicU64::new(1),
            reader,
        })
    }

    /// What the server told about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The address this client is connected to.
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// Whether the connection failed; a broken client only returns errors.
    pub fn is_broken(&self) -> bool {
        self.shared.broken.load(Ordering::SeqCst)
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected(self.shared.reason())
    }

    /// Send one request and wait for its reply.
    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<Reply, Error> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| self.disconnected())?;
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending();
            if self.is_broken() {
                return Err(self.disconnected());
            }
            pending.insert(
                cookie,
                Pending {
                    req: RequestView {
                        command,
                        offset,
                        len,
                    },
                    tx,
                    data: None,
                    covered: 0,
                    coverage: reply::Coverage::default(),
                    status: Vec::new(),
                    error: None,
                },
            );
        }
        let header = reply::encode_request(flags, command, cookie, offset, len);
        // Dropped before the request went out: forget it (no reply comes).
        let unsent = Unsent {
            shared: &self.shared,
            cookie,
        };
        {
            let mut w = self.writer.lock().await;
            std::mem::forget(unsent);
            let mut guard = SendGuard {
                shared: &self.shared,
                armed: true,
            };
            let sent = async {
                w.write_all(&header).await?;
                if let Some(data) = payload {
                    w.write_all(data).await?;
                }
                w.flush().await
            }
            .await;
            guard.armed = false;
            if let Err(e) = sent {
                self.shared
                    .fail(format!("sending {}: {e}", command_name(command)));
                return Err(Error::Io(e));
            }
        }
        rx.await.map_err(|_| self.disconnected())?
    }

    /// Read `len` bytes at `offset` (split into requests the server takes).
    ///
    /// # Errors
    /// A request error, a protocol error, a lost connection.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, Error> {
        let max = self.info.max_io() as usize;
        if len <= max {
            return self.read_one(offset, len).await;
        }
        let mut out = BytesMut::with_capacity(len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            out.extend_from_slice(&self.read_one(offset + done as u64, n).await?);
            done += n;
        }
        Ok(out.freeze())
    }

    async fn read_one(&self, offset: u64, len: usize) -> Result<Bytes, Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let n = u32::try_from(len).map_err(|_| Error::Unsupported("reads this large"))?;
        match self.submit(NBD_CMD_READ, 0, offset, n, None).await? {
            Reply::Data(b) => Ok(b),
            other => Err(Error::Protocol(format!("READ answered with {other:?}"))),
        }
    }

    /// Write `data` at `offset`; with `fua`, the server persists it before
    /// answering.
    ///
    /// # Errors
    /// A read-only export, a request error, a lost connection.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        if self.info.read_only() {
            return Err(Error::Unsupported("writes (the export is read-only)"));
        }
        let flags = if fua && self.info.has(NBD_FLAG_SEND_FUA) {
            NBD_CMD_FLAG_FUA
        } else {
            0
        };
        let max = self.info.max_io() as usize;
        let mut at = offset;
        for piece in data.chunks(max) {
            let n = piece.len() as u32;
            self.submit(NBD_CMD_WRITE, flags, at, n, Some(piece))
                .await?;
            at += u64::from(n);
        }
        Ok(())
    }

    /// Zero `len` bytes at `offset`. `punch` allows deallocation; without
    /// it NO_HOLE keeps the range allocated.
    ///
    /// # Errors
    /// No WRITE_ZEROES on this export, a request error, a lost connection.
    pub async fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<(), Error> {
        if self.info.read_only() {
            return Err(Error::Unsupported("zeroing (the export is read-only)"));
        }
        if !self.info.has(NBD_FLAG_SEND_WRITE_ZEROES) {
            return Err(Error::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        let flags = if punch { 0 } else { NBD_CMD_FLAG_NO_HOLE };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(u64::from(MAX_ZERO));
            self.submit(NBD_CMD_WRITE_ZEROES, flags, offset + done, n as u32, None)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Flush written data to stable storage (a no-op when the server has
    /// no FLUSH, like imageio).
    ///
    /// # Errors
    /// A request error, a lost connection.
    pub async fn flush(&self) -> Result<(), Error> {
        if !self.info.has(NBD_FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.submit(NBD_CMD_FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    /// One BLOCK_STATUS request: `(length, flags)` descriptors per context
    /// id, one entry per context the server answered for (each at most
    /// [`MAX_CHUNK_EXTENTS`](super::MAX_CHUNK_EXTENTS) descriptors, each id
    /// one of [`ExportInfo::contexts`]; [`ExportInfo::context_name`] names
    /// it).
    ///
    /// # Errors
    /// No block status negotiated, a request error, a lost connection.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, Vec<(u32, u32)>)>, Error> {
        if self.info.base_allocation.is_none() {
            return Err(Error::Unsupported("base:allocation"));
        }
        match self
            .submit(NBD_CMD_BLOCK_STATUS, 0, offset, len, None)
            .await?
        {
            Reply::Status(s) => Ok(s),
            other => Err(Error::Protocol(format!(
                "BLOCK_STATUS answered with {other:?}"
            ))),
        }
    }

    /// [`block_status`](Self::block_status) with the contexts named.
    ///
    /// # Errors
    /// As [`block_status`](Self::block_status).
    pub async fn block_status_named(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(String, Vec<(u32, u32)>)>, Error> {
        let status = self.block_status(offset, len).await?;
        status
            .into_iter()
            .map(|(id, list)| match self.info.context_name(id) {
                Some(name) => Ok((name.to_string(), list)),
                None => Err(Error::Protocol(format!(
                    "block status for unknown context id {id}"
                ))),
            })
            .collect()
    }

    /// Whether the handshake found and selected a dirty bitmap
    /// ([`ConnectOptions::dirty_bitmap`]).
    pub fn has_dirty_bitmap(&self) -> bool {
        self.info.dirty_bitmap.is_some()
    }

    /// The whole export as imageio's dirty extents: `base:allocation`
    /// merged with the dirty bitmap (at most `max_count` extents, then
    /// they stop short of the end).
    ///
    /// # Errors
    /// No dirty bitmap was selected ([`Error::Unsupported`]), a reply
    /// without one of the two contexts or that does not advance, a
    /// request error, a lost connection.
    pub async fn dirty_extents(&self, max_count: usize) -> Result<Vec<DirtyExtent>, Error> {
        let Some(bitmap_id) = self.info.dirty_bitmap else {
            return Err(Error::Unsupported("dirty bitmaps (no bitmap selected)"));
        };
        let Some(base_id) = self.info.base_allocation else {
            return Err(Error::Protocol(
                "a dirty bitmap without base:allocation".into(),
            ));
        };
        let size = self.info.size;
        let mut builder = ExtentBuilder::new(size, max_count);
        while !builder.finished() {
            let offset = builder.offset();
            let step = (size - offset).min(u64::from(MAX_STATUS)) as u32;
            let reply = self.block_status(offset, step).await?;
            let of = |id: u32, what: &'static str| {
                reply
                    .iter()
                    .find(|(ctx, _)| *ctx == id)
                    .map(|(_, l)| l.as_slice())
                    .ok_or_else(|| Error::Protocol(format!("block status reply without {what}")))
            };
            let descriptors = dirty_descriptors(
                of(base_id, "base:allocation")?,
                of(bitmap_id, "the dirty bitmap")?,
            );
            if builder.push(&descriptors) == 0 {
                return Err(Error::Protocol(format!(
                    "block status at {offset} did not advance"
                )));
            }
        }
        Ok(builder.finish_dirty())
    }

    /// The whole export as imageio's zero extents (at most `max_count`
    /// extents, then they stop short of the end).
    ///
    /// # Errors
    /// A request error, a reply that does not advance, a lost connection.
    pub async fn zero_extents(&self, max_count: usize) -> Result<Vec<ZeroExtent>, Error> {
        let size = self.info.size;
        let Some(base_id) = self.info.base_allocation else {
            // Like imageio: no allocation information, one data extent.
            return Ok(if size == 0 {
                Vec::new()
            } else {
                vec![ZeroExtent {
                    start: 0,
                    length: size,
                    zero: false,
                    hole: false,
                }]
            });
        };
        let mut builder = ExtentBuilder::new(size, max_count);
        while !builder.finished() {
            let offset = builder.offset();
            let step = (size - offset).min(u64::from(MAX_STATUS)) as u32;
            let reply = self.block_status(offset, step).await?;
            let list = |id: Option<u32>, map: fn(u32) -> u32| {
                id.and_then(|id| reply.iter().find(|(ctx, _)| *ctx == id))
                    .map(|(_, l)| {
                        l.iter()
                            .map(|&(len, f)| (u64::from(len), map(f)))
                            .collect::<Vec<_>>()
                    })
            };
            let base = list(Some(base_id), alloc_flags).ok_or_else(|| {
                Error::Protocol("block status reply without base:allocation".into())
            })?;
            let descriptors = match list(self.info.allocation_depth, depth_flags) {
                Some(depth) => merge(&base, &depth),
                None => base,
            };
            if builder.push(&descriptors) == 0 {
                return Err(Error::Protocol(format!(
                    "block status at {offset} did not advance"
                )));
            }
        }
        Ok(builder.finish())
    }

    /// Send NBD_CMD_DISC and close the connection. Requests still in flight
    /// fail.
    pub async fn close(&self) {
        if !self.is_broken() {
            let header = reply::encode_request(0, NBD_CMD_DISC, 0, 0, 0);
            let mut w = self.writer.lock().await;
            let _ = w.write_all(&header).await;
            let _ = w.shutdown().await;
        }
        self.shared.fail("closed".into());
        self.reader.abort();
        tracing::debug!(socket = %self.address.socket.display(), "NBD connection closed");
    }
}

/// The reader task: read replies until EOF or a protocol error, then fail
/// whatever is still in flight.
async fn read_replies(shared: Arc<Shared>, mut rd: BufReader<OwnedReadHalf>, info: ExportInfo) {
    let reason = loop {
        match read_reply(&shared, &mut rd, &info).await {
            Ok(()) => {}
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "the server closed the connection".to_string();
            }
            Err(e) => break e.to_string(),
        }
    };
    if !shared.broken.load(Ordering::SeqCst) {
        tracing::warn!(%reason, "NBD connection failed");
    }
    shared.fail(reason);
}

fn take(shared: &Shared, cookie: u64) -> Result<Pending, Error> {
    shared
        .pending()
        .remove(&cookie)
        .ok_or_else(|| Error::Protocol(format!("reply for unknown cookie {cookie}")))
}

/// Read one reply (simple) or one chunk (structured) and route it.
async fn read_reply(
    shared: &Shared,
    rd: &mut BufReader<OwnedReadHalf>,
    info: &ExportInfo,
) -> Result<(), Error> {
    let mut magic = [0u8; 4];
    rd.read_exact(&mut magic).await?;
    match reply::parse_magic(magic, info.structured)? {
        Magic::Simple => {
            let mut rest = [0u8; reply::SIMPLE_REST];
            rd.read_exact(&mut rest).await?;
            let h = reply::parse_simple(&rest);
            let p = take(shared, h.cookie)?;
            if h.error != 0 {
                let err = p.request_error(&reply::ChunkError {
                    code: h.error,
                    message: String::new(),
                });
                let _ = p.tx.send(Err(err));
                return Ok(());
            }
            let result = match p.req.command {
                NBD_CMD_READ => {
                    let mut buf = BytesMut::zeroed(p.req.len as usize);
                    rd.read_exact(&mut buf).await?;
                    Reply::Data(buf.freeze())
                }
                NBD_CMD_BLOCK_STATUS => {
                    return Err(Error::Protocol(
                        "simple reply to a successful BLOCK_STATUS".into(),
                    ));
                }
                _ => Reply::Done,
            };
            let _ = p.tx.send(Ok(result));
            Ok(())
        }
        Magic::Structured => {
            let mut rest = [0u8; reply::CHUNK_REST];
            rd.read_exact(&mut rest).await?;
            let h = reply::parse_chunk_header(&rest);
            let mut p = take(shared, h.cookie)?;
            let plan = reply::check_chunk(&h, &p.req)?;
            match plan {
                ChunkPlan::Empty => {}
                ChunkPlan::Data => {
                    let offset = rd.read_u64().await?;
                    let n = u64::from(h.len) - 8;
                    let at = reply::check_run(offset, n, &p.req)?;
                    let len = p.req.len as usize;
                    if !p.coverage.mark(len, at, n as usize) {
                        return Err(Error::Protocol(format!(
                            "data chunk {offset}+{n} overlaps an earlier chunk"
                        )));
                    }
                    let buf = p.data.get_or_insert_with(|| BytesMut::zeroed(len));
                    let dst = buf
                        .get_mut(at..at + n as usize)
                        .ok_or_else(|| Error::Protocol("data chunk outside buffer".into()))?;
                    rd.read_exact(dst).await?;
                    p.covered += n;
                }
                ChunkPlan::Hole => {
                    let mut payload = [0u8; 12];
                    rd.read_exact(&mut payload).await?;
                    let (offset, n) = reply::parse_hole(&payload);
                    let at = reply::check_run(offset, n, &p.req)?;
                    let len = p.req.len as usize;
                    if !p.coverage.mark(len, at, n as usize) {
                        return Err(Error::Protocol(format!(
                            "hole chunk {offset}+{n} overlaps an earlier chunk"
                        )));
                    }
                    // Fresh buffers are zeroed, and runs never overlap.
                    p.data.get_or_insert_with(|| BytesMut::zeroed(len));
                    p.covered += n;
                }
                ChunkPlan::BlockStatus => {
                    let mut payload = vec![0u8; h.len as usize];
                    rd.read_exact(&mut payload).await?;
                    let (ctx, list) = reply::parse_block_status(&payload)?;
                    if info.context_name(ctx).is_none() {
                        return Err(Error::Protocol(format!(
                            "block status for unknown context id {ctx}"
                        )));
                    }
                    if p.status.iter().any(|(c, _)| *c == ctx) {
                        return Err(Error::Protocol(format!(
                            "two block status chunks for context id {ctx}"
                        )));
                    }
                    p.status.push((ctx, list));
                }
                ChunkPlan::Error => {
                    let mut payload = vec![0u8; h.len as usize];
                    rd.read_exact(&mut payload).await?;
                    let e = reply::parse_error(h.kind, &payload)?;
                    p.error.get_or_insert(e);
                }
            }
            if !h.done() {
                shared.pending().insert(h.cookie, p);
                return Ok(());
            }
            let result = if let Some(e) = &p.error {
                Err(p.request_error(e))
            } else {
                match p.req.command {
                    NBD_CMD_READ => {
                        if p.covered != u64::from(p.req.len) {
                            return Err(Error::Protocol(format!(
                                "READ reply covered {} of {} bytes",
                                p.covered, p.req.len
                            )));
                        }
                        Ok(Reply::Data(p.data.take().unwrap_or_default().freeze()))
                    }
                    NBD_CMD_BLOCK_STATUS => {
                        if p.status.is_empty() {
                            return Err(Error::Protocol(
                                "BLOCK_STATUS reply without extents".into(),
                            ));
                        }
                        Ok(Reply::Status(std::mem::take(&mut p.status)))
                    }
                    _ => Ok(Reply::Done),
                }
            };
            let _ = p.tx.send(result);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    async fn option(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).await.unwrap();
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        (opt, data)
    }

    /// The queries of a LIST/SET_META_CONTEXT payload.
    fn queries(data: &[u8]) -> Vec<String> {
        let be = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let mut at = 4 + be(0);
        let count = be(at);
        at += 4;
        let mut out = Vec::new();
        for _ in 0..count {
            let n = be(at);
            out.push(String::from_utf8(data[at + 4..at + 4 + n].to_vec()).unwrap());
            at += 4 + n;
        }
        out
    }

    async fn option_reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) {
        let mut b = NBD_REP_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        s.write_all(&b).await.unwrap();
    }

    /// A fake server: handshake with structured replies and
    /// base:allocation (id 1), then `script` on the transmission phase.
    async fn fake<F, Fut>(script: F) -> (NbdClient, JoinHandle<()>, tempfile::TempDir)
    where
        F: FnOnce(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        fake_with(ConnectOptions::default(), &[], script).await
    }

    /// [`fake`] with `options` for the client and `bitmaps` for the
    /// server, like `qemu-nbd -B` for each: LIST_META_CONTEXT lists them,
    /// SET_META_CONTEXT selects the ones asked for (ids 3, 4, ...).
    async fn fake_with<F, Fut>(
        options: ConnectOptions,
        bitmaps: &'static [&'static str],
        script: F,
    ) -> (NbdClient, JoinHandle<()>, tempfile::TempDir)
    where
        F: FnOnce(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut g = NBDMAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&NBD_FLAG_FIXED_NEWSTYLE.to_be_bytes());
            s.write_all(&g).await.unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).await.unwrap();
            loop {
                let (opt, data) = option(&mut s).await;
                match opt {
                    NBD_OPT_LIST_META_CONTEXT => {
                        assert_eq!(queries(&data), vec!["qemu:dirty-bitmap:".to_string()]);
                        for name in bitmaps {
                            let mut ctx = 0u32.to_be_bytes().to_vec();
                            ctx.extend_from_slice(format!("qemu:dirty-bitmap:{name}").as_bytes());
                            option_reply(&mut s, opt, NBD_REP_META_CONTEXT, &ctx).await;
                        }
                        option_reply(&mut s, opt, NBD_REP_ACK, &[]).await;
                    }
                    NBD_OPT_SET_META_CONTEXT => {
                        for q in queries(&data) {
                            let id = if q == "base:allocation" {
                                Some(1u32)
                            } else {
                                bitmaps
                                    .iter()
                                    .position(|b| q == format!("qemu:dirty-bitmap:{b}"))
                                    .map(|i| 3 + i as u32)
                            };
                            if let Some(id) = id {
                                let mut ctx = id.to_be_bytes().to_vec();
                                ctx.extend_from_slice(q.as_bytes());
                                option_reply(&mut s, opt, NBD_REP_META_CONTEXT, &ctx).await;
                            }
                        }
                        option_reply(&mut s, opt, NBD_REP_ACK, &[]).await;
                    }
                    NBD_OPT_GO => {
                        let mut d = NBD_INFO_EXPORT.to_be_bytes().to_vec();
                        d.extend_from_slice(&(1u64 << 20).to_be_bytes());
                        let f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;
                        d.extend_from_slice(&f.to_be_bytes());
                        option_reply(&mut s, opt, NBD_REP_INFO, &d).await;
                        option_reply(&mut s, opt, NBD_REP_ACK, &[]).await;
                        break;
                    }
                    _ => option_reply(&mut s, opt, NBD_REP_ACK, &[]).await,
                }
            }
            script(s).await;
        });
        let address = NbdAddress {
            socket: dir.path().join("nbd.sock"),
            export: String::new(),
        };
        let client = NbdClient::connect_with(&address, &options).await.unwrap();
        (client, server, dir)
    }

    /// A block status chunk payload: context id, then descriptors.
    fn status(ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
        let mut d = ctx.to_be_bytes().to_vec();
        for (len, flags) in extents {
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&flags.to_be_bytes());
        }
        d
    }

    fn dirty_options() -> ConnectOptions {
        ConnectOptions {
            dirty_bitmap: true,
            contexts: Vec::new(),
        }
    }

    #[tokio::test]
    async fn dirty_extents_merge_base_allocation_and_the_bitmap() {
        const K: u32 = 1024;
        let (client, server, _dir) = fake_with(dirty_options(), &["b1"], |mut s| async move {
            // The bitmap answers for half the range only: the merge stops
            // there and the next request starts at 512 KiB.
            let (cmd, cookie, offset, len) = request(&mut s).await;
            assert_eq!((cmd, offset, len), (NBD_CMD_BLOCK_STATUS, 0, 1 << 20));
            let base = status(1, &[(64 * K, 0), (192 * K, 3), (768 * K, 3)]);
            s.write_all(&chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, &base))
                .await
                .unwrap();
            let bitmap = status(3, &[(128 * K, 1), (384 * K, 0)]);
            s.write_all(&chunk(1, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, &bitmap))
                .await
                .unwrap();
            let (cmd, cookie, offset, len) = request(&mut s).await;
            assert_eq!(
                (cmd, offset, len),
                (NBD_CMD_BLOCK_STATUS, 512 * 1024, 512 * 1024)
            );
            let bitmap = status(3, &[(512 * K, 1 | 0x10)]);
            s.write_all(&chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, &bitmap))
                .await
                .unwrap();
            let base = status(1, &[(512 * K, 3)]);
            s.write_all(&chunk(1, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, &base))
                .await
                .unwrap();
            let (cmd, ..) = request(&mut s).await;
            assert_eq!(cmd, NBD_CMD_DISC);
        })
        .await;
        assert!(client.has_dirty_bitmap());
        assert_eq!(
            client.info().dirty_bitmap_name(),
            Some("qemu:dirty-bitmap:b1")
        );
        let got = client.dirty_extents(1 << 20).await.unwrap();
        let k = 1024u64;
        let e = |start: u64, length: u64, dirty: bool, zero: bool| DirtyExtent {
            start,
            length,
            dirty,
            zero,
        };
        assert_eq!(
            got,
            vec![
                e(0, 64 * k, true, false),
                e(64 * k, 64 * k, true, true),
                e(128 * k, 384 * k, false, true),
                e(512 * k, 512 * k, true, true),
            ]
        );
        client.close().await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn block_status_names_its_contexts() {
        let (client, server, _dir) = fake_with(dirty_options(), &["b1"], |mut s| async move {
            let (cmd, cookie, ..) = request(&mut s).await;
            assert_eq!(cmd, NBD_CMD_BLOCK_STATUS);
            s.write_all(&chunk(
                0,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                cookie,
                &status(3, &[(4096, 1)]),
            ))
            .await
            .unwrap();
            s.write_all(&chunk(
                1,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                cookie,
                &status(1, &[(4096, 0)]),
            ))
            .await
            .unwrap();
            let (cmd, ..) = request(&mut s).await;
            assert_eq!(cmd, NBD_CMD_DISC);
        })
        .await;
        let named = client.block_status_named(0, 4096).await.unwrap();
        assert_eq!(
            named,
            vec![
                ("qemu:dirty-bitmap:b1".to_string(), vec![(4096, 1)]),
                ("base:allocation".to_string(), vec![(4096, 0)]),
            ]
        );
        client.close().await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn no_single_bitmap_no_dirty_extents() {
        const NONE: &[&str] = &[];
        const TWO: &[&str] = &["a", "b"];
        for bitmaps in [NONE, TWO] {
            let (client, server, _dir) = fake_with(dirty_options(), bitmaps, |mut s| async move {
                let (cmd, ..) = request(&mut s).await;
                assert_eq!(cmd, NBD_CMD_DISC);
            })
            .await;
            assert!(!client.has_dirty_bitmap(), "{bitmaps:?}");
            assert_eq!(client.info().base_allocation, Some(1));
            let e = client.dirty_extents(10).await.unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{e}");
            assert!(!client.is_broken());
            client.close().await;
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn block_status_for_an_unselected_context_breaks_the_connection() {
        // Id 3 is the bitmap's, but no bitmap was asked for.
        let (client, server, _dir) = fake(|mut s| async move {
            let (_, cookie, ..) = request(&mut s).await;
            let _ = s
                .write_all(&chunk(
                    1,
                    NBD_REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    &status(3, &[(4096, 1)]),
                ))
                .await;
            let mut sink = [0u8; 64];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        let e = client.block_status(0, 4096).await.unwrap_err().to_string();
        assert!(e.contains("unknown context id 3"), "{e}");
        assert!(client.is_broken());
        drop(client);
        server.await.unwrap();
    }

    /// Read one request header: (command, cookie, offset, len).
    async fn request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
        let mut h = [0u8; 28];
        s.read_exact(&mut h).await.unwrap();
        (
            u16::from_be_bytes(h[6..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u64::from_be_bytes(h[16..24].try_into().unwrap()),
            u32::from_be_bytes(h[24..28].try_into().unwrap()),
        )
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        chunk_claiming(flags, kind, cookie, payload.len() as u32, payload)
    }

    fn chunk_claiming(flags: u16, kind: u16, cookie: u64, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[tokio::test]
    async fn sparse_read_and_request_errors() {
        let (client, server, _dir) = fake(|mut s| async move {
            // READ 0+8192: a hole, then data.
            let (cmd, cookie, offset, len) = request(&mut s).await;
            assert_eq!((cmd, offset, len), (NBD_CMD_READ, 0, 8192));
            let mut hole = 0u64.to_be_bytes().to_vec();
            hole.extend_from_slice(&4096u32.to_be_bytes());
            s.write_all(&chunk(0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, &hole))
                .await
                .unwrap();
            let mut data = 4096u64.to_be_bytes().to_vec();
            data.extend_from_slice(&[7u8; 4096]);
            s.write_all(&chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &data))
                .await
                .unwrap();
            // FLUSH: an error chunk; the connection stays usable.
            let (cmd, cookie, _, _) = request(&mut s).await;
            assert_eq!(cmd, NBD_CMD_FLUSH);
            let mut err = NBD_EIO.to_be_bytes().to_vec();
            err.extend_from_slice(&4u16.to_be_bytes());
            err.extend_from_slice(b"oops");
            s.write_all(&chunk(1, NBD_REPLY_TYPE_ERROR, cookie, &err))
                .await
                .unwrap();
            let (cmd, cookie, _, _) = request(&mut s).await;
            assert_eq!(cmd, NBD_CMD_FLUSH);
            s.write_all(&chunk(1, NBD_REPLY_TYPE_NONE, cookie, &[]))
                .await
                .unwrap();
            let (cmd, ..) = request(&mut s).await;
            assert_eq!(cmd, NBD_CMD_DISC);
        })
        .await;
        let data = client.read(0, 8192).await.unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0));
        assert!(data[4096..].iter().all(|&b| b == 7));
        let e = client.flush().await.unwrap_err().to_string();
        assert_eq!(
            e,
            "NBD NBD_CMD_FLUSH at offset 0 length 0 failed: EIO: oops"
        );
        client.flush().await.unwrap();
        assert!(!client.is_broken());
        client.close().await;
        server.await.unwrap();
    }

    /// Each hostile reply breaks the connection with a clear error: the
    /// request fails, later requests fail fast, nothing panics.
    async fn hostile(reply: fn(u64) -> Vec<u8>, expect: &str) {
        let (client, server, _dir) = fake(move |mut s| async move {
            let (_, cookie, _, _) = request(&mut s).await;
            let bytes = reply(cookie);
            if bytes.is_empty() {
                // Hang up instead.
                return;
            }
            let _ = s.write_all(&bytes).await;
            // Keep the socket open: the client must not wait for more.
            let mut sink = [0u8; 64];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        let e = client.read(0, 4096).await.unwrap_err().to_string();
        assert!(e.contains(expect), "{e}");
        assert!(client.is_broken());
        assert!(client.read(0, 10).await.is_err());
        drop(client);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_cookie() {
        hostile(
            |c| chunk(1, NBD_REPLY_TYPE_NONE, c + 1000, &[]),
            "reply for unknown cookie",
        )
        .await;
    }

    #[tokio::test]
    async fn simple_reply_with_wrong_cookie() {
        hostile(
            |c| {
                let mut b = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                b.extend_from_slice(&0u32.to_be_bytes());
                b.extend_from_slice(&(c ^ 0xff).to_be_bytes());
                b
            },
            "reply for unknown cookie",
        )
        .await;
    }

    #[tokio::test]
    async fn data_chunk_too_long() {
        // Claims 4 GiB of data for a 4 KiB read: refused before reading.
        hostile(
            |c| {
                chunk_claiming(
                    1,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    c,
                    u32::MAX,
                    &0u64.to_be_bytes(),
                )
            },
            "data chunk length out of bounds",
        )
        .await;
    }

    #[tokio::test]
    async fn data_chunk_outside_request() {
        hostile(
            |c| {
                let mut p = 1u64.to_be_bytes().to_vec();
                p.extend_from_slice(&[1u8; 4096]);
                chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, c, &p)
            },
            "outside the request",
        )
        .await;
    }

    #[tokio::test]
    async fn short_read_reply() {
        hostile(
            |c| {
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend_from_slice(&[1u8; 100]);
                chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, c, &p)
            },
            "covered 100 of 4096 bytes",
        )
        .await;
    }

    #[tokio::test]
    async fn block_status_for_a_read() {
        hostile(
            |c| chunk_claiming(1, NBD_REPLY_TYPE_BLOCK_STATUS, c, u32::MAX, &[]),
            "block status chunk for another command",
        )
        .await;
    }

    #[tokio::test]
    async fn garbage_magic() {
        hostile(|_| b"garbage!garbage!".to_vec(), "bad reply magic").await;
    }

    #[tokio::test]
    async fn server_hangs_up() {
        hostile(|_| Vec::new(), "the server closed the connection").await;
    }
}
