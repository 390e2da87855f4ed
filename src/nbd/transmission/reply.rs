//! Reply encoders: simple replies, structured and extended chunks.
//!
//! Every function appends to a `BytesMut`; data payloads travel separately
//! as `Bytes` so they are never copied.

use crate::nbd::consts::*;
use crate::nbd::error::RequestError;
use crate::nbd::mode::ReplyMode;
use bytes::{BufMut, BytesMut};

/// Append a simple reply header.
pub fn encode_simple(buf: &mut BytesMut, cookie: u64, error: u32) {
    buf.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Append a chunk header for `mode` (structured: 20 bytes, extended: 32
/// bytes with the request's offset).
pub fn encode_chunk_header(
    buf: &mut BytesMut,
    mode: ReplyMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    request_offset: u64,
    payload_len: u64,
) {
    if mode == ReplyMode::Extended {
        buf.put_u32(NBD_EXTENDED_REPLY_MAGIC);
        buf.put_u16(flags);
        buf.put_u16(kind);
        buf.put_u64(cookie);
        buf.put_u64(request_offset);
        buf.put_u64(payload_len);
    } else {
        buf.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
        buf.put_u16(flags);
        buf.put_u16(kind);
        buf.put_u64(cookie);
        buf.put_u32(payload_len as u32);
    }
}

/// Append the final NONE chunk.
pub fn encode_none(buf: &mut BytesMut, mode: ReplyMode, cookie: u64, request_offset: u64) {
    encode_chunk_header(
        buf,
        mode,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        cookie,
        request_offset,
        0,
    );
}

/// Append an ERROR chunk (DONE) with the message, cut to fit a u16 and 4096.
pub fn encode_error_chunk(
    buf: &mut BytesMut,
    mode: ReplyMode,
    cookie: u64,
    request_offset: u64,
    err: &RequestError,
) {
    let mut end = err.message.len().min(4096);
    while !err.message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = err.message.get(..end).unwrap_or("");
    encode_chunk_header(
        buf,
        mode,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        request_offset,
        6 + msg.len() as u64,
    );
    buf.put_u32(err.errno);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg.as_bytes());
}

/// Append the reply to a command that carries no data: success or error in
/// the form `mode` requires.
pub fn encode_status(
    buf: &mut BytesMut,
    mode: ReplyMode,
    cookie: u64,
    request_offset: u64,
    result: Result<(), &RequestError>,
) {
    match (mode, result) {
        (ReplyMode::Simple, Ok(())) | (ReplyMode::Structured, Ok(())) => {
            encode_simple(buf, cookie, 0)
        }
        (ReplyMode::Simple, Err(e)) => encode_simple(buf, cookie, e.errno),
        (ReplyMode::Extended, Ok(())) => encode_none(buf, mode, cookie, request_offset),
        (_, Err(e)) => encode_error_chunk(buf, mode, cookie, request_offset, e),
    }
}

/// Append an OFFSET_DATA chunk header and its offset; `data_len` bytes of
/// data must follow.
pub fn encode_data_header(
    buf: &mut BytesMut,
    mode: ReplyMode,
    done: bool,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    data_len: usize,
) {
    encode_chunk_header(
        buf,
        mode,
        if done { NBD_REPLY_FLAG_DONE } else { 0 },
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        request_offset,
        8 + data_len as u64,
    );
    buf.put_u64(offset);
}

/// Append an OFFSET_HOLE chunk.
pub fn encode_hole(
    buf: &mut BytesMut,
    mode: ReplyMode,
    done: bool,
    cookie: u64,
    request_offset: u64,
    offset: u64,
    len: u32,
) {
    encode_chunk_header(
        buf,
        mode,
        if done { NBD_REPLY_FLAG_DONE } else { 0 },
        NBD_REPLY_TYPE_OFFSET_HOLE,
        cookie,
        request_offset,
        12,
    );
    buf.put_u64(offset);
    buf.put_u32(len);
}

/// Append a block status chunk for one context: BLOCK_STATUS with 32-bit
/// lengths, or BLOCK_STATUS_EXT under extended headers. Each extent is
/// (length, status); lengths must already fit the mode.
pub fn encode_block_status(
    buf: &mut BytesMut,
    mode: ReplyMode,
    done: bool,
    cookie: u64,
    request_offset: u64,
    context: u32,
    extents: &[(u64, u32)],
) {
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    if mode == ReplyMode::Extended {
        encode_chunk_header(
            buf,
            mode,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            request_offset,
            8 + 16 * extents.len() as u64,
        );
        buf.put_u32(context);
        buf.put_u32(extents.len() as u32);
        for &(len, status) in extents {
            buf.put_u64(len);
            buf.put_u64(u64::from(status));
        }
    } else {
        encode_chunk_header(
            buf,
            mode,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie,
            request_offset,
            4 + 8 * extents.len() as u64,
        );
        buf.put_u32(context);
        for &(len, status) in extents {
            buf.put_u32(len as u32);
            buf.put_u32(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_bytes() {
        let mut b = BytesMut::new();
        encode_simple(&mut b, 0x1122_3344_5566_7788, NBD_EINVAL);
        assert_eq!(
            &b[..],
            &[
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
    }

    #[test]
    fn structured_error_bytes() {
        let mut b = BytesMut::new();
        let e = RequestError::new(NBD_EPERM, "ro");
        encode_error_chunk(&mut b, ReplyMode::Structured, 5, 0, &e);
        assert_eq!(
            &b[..],
            &[
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0,
                0, 1, 0, 2, b'r', b'o'
            ]
        );
    }

    #[test]
    fn extended_none_bytes() {
        let mut b = BytesMut::new();
        encode_none(&mut b, ReplyMode::Extended, 9, 4096);
        assert_eq!(
            &b[..],
            &[
                0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn data_and_hole_chunks() {
        let mut b = BytesMut::new();
        encode_data_header(&mut b, ReplyMode::Structured, true, 1, 0, 512, 4);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[16..20], &[0, 0, 0, 12]);
        assert_eq!(&b[20..28], &[0, 0, 0, 0, 0, 0, 2, 0]);
        let mut b = BytesMut::new();
        encode_hole(&mut b, ReplyMode::Structured, false, 1, 0, 0, 65536);
        assert_eq!(&b[4..8], &[0, 0, 0, 2]);
        assert_eq!(&b[16..], &[0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn block_status_both_forms() {
        let mut b = BytesMut::new();
        let ext = [(4096u64, 0u32), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)];
        encode_block_status(&mut b, ReplyMode::Structured, true, 3, 0, 1, &ext);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[6..8], &[0, 5]);
        assert_eq!(
            &b[20..],
            &[
                0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 3
            ]
        );
        let mut b = BytesMut::new();
        encode_block_status(&mut b, ReplyMode::Extended, true, 3, 0, 1, &ext);
        assert_eq!(b.len(), 32 + 8 + 32);
        assert_eq!(&b[6..8], &[0, 6]);
        assert_eq!(&b[32..40], &[0, 0, 0, 1, 0, 0, 0, 2]);
    }

    #[test]
    fn status_reply_forms() {
        let e = RequestError::invalid("x");
        let mut b = BytesMut::new();
        encode_status(&mut b, ReplyMode::Structured, 1, 0, Ok(()));
        assert_eq!(b.len(), 16);
        let mut b = BytesMut::new();
        encode_status(&mut b, ReplyMode::Structured, 1, 0, Err(&e));
        assert_eq!(b.len(), 20 + 7);
        let mut b = BytesMut::new();
        encode_status(&mut b, ReplyMode::Extended, 1, 0, Ok(()));
        assert_eq!(b.len(), 32);
    }
}
