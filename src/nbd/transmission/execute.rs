//! Carry out one validated command on the backend and encode its reply.

use super::extents::to_wire;
use super::reply::*;
use super::request::Command;
use crate::backend::{Backend, ExtentContext, ReadChunk, ZeroFlags};
use crate::nbd::Answered;
use crate::nbd::consts::*;
use crate::nbd::error::{ErrnoContext, RequestError, to_errno};
use crate::nbd::export::Export;
use crate::nbd::handshake::meta::MetaSelection;
use crate::nbd::mode::ReplyMode;
use bytes::{Bytes, BytesMut};

/// Run `command`; the reply as wire parts (headers and data), and what
/// observers are told of it.
pub async fn execute<B: Backend>(
    export: &Export<B>,
    mode: ReplyMode,
    meta: &MetaSelection,
    cookie: u64,
    request_offset: u64,
    command: Command,
    payload: Option<Bytes>,
) -> (Vec<Bytes>, Answered) {
    let backend = export.backend();
    let stats = export.stats();
    let native_fua = export.caps().fua;
    let mut head = BytesMut::with_capacity(64);
    let mut status = |r: Result<(), RequestError>| {
        encode_status(
            &mut head,
            mode,
            cookie,
            request_offset,
            r.as_ref().map(|_| ()),
        );
        r.is_ok()
    };
    let answered = |command: u16, offset: u64, len: u64, ok: bool| Answered {
        command,
        offset,
        len,
        ok,
    };
    let done = match command {
        Command::Read { offset, len, df } => {
            let (parts, ok) = read(export, mode, cookie, offset, len, df).await;
            return (parts, answered(NBD_CMD_READ, offset, u64::from(len), ok));
        }
        Command::Write { offset, len, fua } => {
            let data = payload.unwrap_or_default();
            let mut r = backend.write(offset, data, fua && native_fua).await;
            if r.is_ok() && fua && !native_fua {
                r = backend.flush().await;
            }
            if r.is_ok() {
                stats.write_done(u64::from(len));
            }
            let ok = status(r.map_err(|e| to_errno(&e, writes())));
            answered(NBD_CMD_WRITE, offset, u64::from(len), ok)
        }
        Command::Flush => {
            let r = backend.flush().await;
            let ok = status(r.map_err(|e| to_errno(&e, ErrnoContext::default())));
            answered(NBD_CMD_FLUSH, 0, 0, ok)
        }
        Command::Trim { offset, len, fua } => {
            let mut r = backend.trim(offset, len, fua && native_fua).await;
            if r.is_ok() && fua && !native_fua {
                r = backend.flush().await;
            }
            if r.is_ok() {
                stats.write_done(len);
            }
            let ok = status(r.map_err(|e| to_errno(&e, ErrnoContext::default())));
            answered(NBD_CMD_TRIM, offset, len, ok)
        }
        Command::Cache { offset, len } => {
            let r = if export.caps().cache {
                backend.cache(offset, len).await
            } else {
                Ok(())
            };
            let ok = status(r.map_err(|e| to_errno(&e, ErrnoContext::default())));
            answered(NBD_CMD_CACHE, offset, len, ok)
        }
        Command::WriteZeroes { offset, len, flags } => {
            let zf = ZeroFlags {
                fua: flags.fua && native_fua,
                ..flags
            };
            let mut r = backend.zero(offset, len, zf).await;
            if r.is_ok() && flags.fua && !native_fua {
                r = backend.flush().await;
            }
            if r.is_ok() {
                stats.write_done(len);
            }
            let ctx = ErrnoContext {
                fast_zero: flags.fast,
                writes: true,
            };
            let ok = status(r.map_err(|e| to_errno(&e, ctx)));
            answered(NBD_CMD_WRITE_ZEROES, offset, len, ok)
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let described =
                block_status(export, mode, meta, cookie, offset, len, req_one, &mut head).await;
            answered(
                NBD_CMD_BLOCK_STATUS,
                offset,
                described.unwrap_or(0),
                described.is_some(),
            )
        }
    };
    (vec![head.freeze()], done)
}

fn writes() -> ErrnoContext {
    ErrnoContext {
        writes: true,
        ..Default::default()
    }
}

async fn read<B: Backend>(
    export: &Export<B>,
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    len: u32,
    df: bool,
) -> (Vec<Bytes>, bool) {
    let backend = export.backend();
    let mut head = BytesMut::with_capacity(64);
    if mode == ReplyMode::Simple {
        return match backend.read_parts(offset, len as usize).await {
            Ok(data) => {
                export.stats().read_done(u64::from(len));
                encode_simple(&mut head, cookie, 0);
                let mut parts = Vec::with_capacity(1 + data.len());
                parts.push(head.freeze());
                parts.extend(data);
                (parts, true)
            }
            Err(e) => {
                encode_simple(
                    &mut head,
                    cookie,
                    to_errno(&e, ErrnoContext::default()).errno,
                );
                (vec![head.freeze()], false)
            }
        };
    }
    if len == 0 {
        encode_none(&mut head, mode, cookie, offset);
        return (vec![head.freeze()], true);
    }
    let chunks = if df || !export.caps().extents {
        backend
            .read_parts(offset, len as usize)
            .await
            .map(|data| vec![ReadChunk::Data { offset, data }])
    } else {
        backend.read_sparse(offset, len as usize).await
    };
    let chunks = match chunks {
        Ok(c) => c,
        Err(e) => {
            encode_error_chunk(
                &mut head,
                mode,
                cookie,
                offset,
                &to_errno(&e, ErrnoContext::default()),
            );
            return (vec![head.freeze()], false);
        }
    };
    export.stats().read_done(u64::from(len));
    let last = chunks.len().saturating_sub(1);
    let mut parts = Vec::with_capacity(chunks.len() * 2);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let done = i == last;
        match chunk {
            ReadChunk::Data { offset: at, data } => {
                let n = data.iter().map(Bytes::len).sum();
                encode_data_header(&mut head, mode, done, cookie, offset, at, n);
                parts.push(head.split().freeze());
                parts.extend(data);
            }
            ReadChunk::Zero { offset: at, len: n } => {
                // A read is at most 32 MiB, so a hole always fits a u32.
                encode_hole(&mut head, mode, done, cookie, offset, at, n as u32);
            }
        }
    }
    if !head.is_empty() {
        parts.push(head.freeze());
    }
    (parts, true)
}

#[allow(clippy::too_many_arguments)]
async fn block_status<B: Backend>(
    export: &Export<B>,
    mode: ReplyMode,
    meta: &MetaSelection,
    cookie: u64,
    offset: u64,
    len: u64,
    req_one: bool,
    head: &mut BytesMut,
) -> Option<u64> {
    let contexts: Vec<(ExtentContext, u32)> = [
        meta.allocation.map(|id| (ExtentContext::Allocation, id)),
        meta.dirty.map(|id| (ExtentContext::Dirty, id)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let max = if req_one {
        1
    } else {
        super::extents::MAX_EXTENTS
    };
    let mut body = BytesMut::new();
    // What every context's reply described: the shortest of them.
    let mut described = len;
    for (i, &(context, id)) in contexts.iter().enumerate() {
        let found = export.backend().extents(context, offset, len, max).await;
        let mut wire = match found {
            Ok(list) => to_wire(&list, context, offset, len, req_one),
            Err(e) => {
                encode_error_chunk(
                    head,
                    mode,
                    cookie,
                    offset,
                    &to_errno(&e, ErrnoContext::default()),
                );
                return None;
            }
        };
        if wire.is_empty() {
            if context == ExtentContext::Allocation {
                // Status 0 (allocated data) is always a safe answer.
                wire.push((len, 0));
            } else {
                let err = RequestError::new(NBD_EIO, "the backend returned no dirty extents");
                encode_error_chunk(head, mode, cookie, offset, &err);
                return None;
            }
        }
        if mode != ReplyMode::Extended {
            // Compact requests have 32-bit lengths and extents never pass the
            // request's end, but guard the narrowing anyway.
            for e in &mut wire {
                e.0 = e.0.min(u64::from(u32::MAX) & !511);
            }
        }
        described = described.min(wire.iter().fold(0u64, |n, e| n.saturating_add(e.0)));
        let done = i + 1 == contexts.len();
        encode_block_status(&mut body, mode, done, cookie, offset, id, &wire);
    }
    head.unsplit(body);
    Some(if contexts.is_empty() { 0 } else { described })
}
