//! Reply headers and chunk payloads of the transmission phase, parsed and
//! checked without I/O, so hostile inputs can be tested byte by byte.
//!
//! The reader reads a 4-byte magic, then the rest of the header, then asks
//! [`check_chunk`] how many payload bytes it may read before reading them.

use super::{Error, MAX_CHUNK_EXTENTS, MAX_MESSAGE};
use crate::nbd::consts::*;
use crate::wire::Reader;
use bytes::{Buf, BufMut};

/// Bytes after the magic in a simple reply header (error, cookie).
pub const SIMPLE_REST: usize = 12;
/// Bytes after the magic in a structured reply header.
pub const CHUNK_REST: usize = 16;

/// Which header follows a magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// `NBD_SIMPLE_REPLY_MAGIC`.
    Simple,
    /// `NBD_STRUCTURED_REPLY_MAGIC`.
    Structured,
}

/// Identify a reply by its magic.
///
/// # Errors
/// Any other magic (extended replies are never negotiated).
pub fn parse_magic(bytes: [u8; 4], structured: bool) -> Result<Magic, Error> {
    match u32::from_be_bytes(bytes) {
        NBD_SIMPLE_REPLY_MAGIC => Ok(Magic::Simple),
        NBD_STRUCTURED_REPLY_MAGIC if structured => Ok(Magic::Structured),
        NBD_STRUCTURED_REPLY_MAGIC => Err(Error::Protocol(
            "structured reply without NBD_OPT_STRUCTURED_REPLY".into(),
        )),
        other => Err(Error::Protocol(format!("bad reply magic {other:#010x}"))),
    }
}

/// A simple reply header: error code and cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleHeader {
    /// 0 for success.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Parse the 12 bytes after a simple reply magic.
pub fn parse_simple(rest: &[u8; SIMPLE_REST]) -> SimpleHeader {
    // 4 + 8 bytes: the array's type fixes the length, so `Buf` cannot run
    // short here.
    let mut b = &rest[..];
    let error = b.get_u32();
    let cookie = b.get_u64();
    SimpleHeader { error, cookie }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// Parse the 16 bytes after a structured reply magic.
pub fn parse_chunk_header(rest: &[u8; CHUNK_REST]) -> ChunkHeader {
    // 2 + 2 + 8 + 4 bytes, fixed by the array's type.
    let mut b = &rest[..];
    let flags = b.get_u16();
    let kind = b.get_u16();
    let cookie = b.get_u64();
    let len = b.get_u32();
    ChunkHeader {
        flags,
        kind,
        cookie,
        len,
    }
}

/// The request a chunk answers, as far as checks need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestView {
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Request offset.
    pub offset: u64,
    /// Request length.
    pub len: u32,
}

/// What to do with a chunk's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPlan {
    /// Nothing to read (NONE).
    Empty,
    /// Read an 8-byte offset, then `len - 8` data bytes into the buffer.
    Data,
    /// Read 12 bytes: offset and hole length.
    Hole,
    /// Read `len` bytes of block status (bounded).
    BlockStatus,
    /// Read `len` bytes of an error chunk (bounded).
    Error,
}

/// Largest error chunk payload: code, message length, message, offset.
pub const MAX_ERROR_CHUNK: u32 = (4 + 2 + MAX_MESSAGE + 8) as u32;

/// Check a chunk header against its request before reading its payload.
///
/// # Errors
/// A chunk type that does not belong to this command, a length outside the
/// bounds of its type, or NONE without DONE.
pub fn check_chunk(h: &ChunkHeader, req: &RequestView) -> Result<ChunkPlan, Error> {
    let bad = |what: &str| {
        Err(Error::Protocol(format!(
            "{what} (chunk type {} length {} for {})",
            h.kind,
            h.len,
            command_name(req.command)
        )))
    };
    match h.kind {
        NBD_REPLY_TYPE_NONE => {
            if h.len != 0 {
                return bad("NONE chunk with a payload");
            }
            if !h.done() {
                return bad("NONE chunk without the DONE flag");
            }
            Ok(ChunkPlan::Empty)
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            if req.command != NBD_CMD_READ {
                return bad("data chunk for a command that reads nothing");
            }
            // Offset plus at least one byte, and never more than was asked.
            if h.len <= 8 || u64::from(h.len) - 8 > u64::from(req.len) {
                return bad("data chunk length out of bounds");
            }
            Ok(ChunkPlan::Data)
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if req.command != NBD_CMD_READ {
                return bad("hole chunk for a command that reads nothing");
            }
            if h.len != 12 {
                return bad("hole chunk length is not 12");
            }
            Ok(ChunkPlan::Hole)
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            if req.command != NBD_CMD_BLOCK_STATUS {
                return bad("block status chunk for another command");
            }
            let max = 4 + 8 * MAX_CHUNK_EXTENTS as u64;
            let len = u64::from(h.len);
            if len < 12 || (len - 4) % 8 != 0 || len > max {
                return bad("block status chunk length out of bounds");
            }
            Ok(ChunkPlan::BlockStatus)
        }
        kind if kind & (1 << 15) != 0 => {
            if h.len < 6 || h.len > MAX_ERROR_CHUNK {
                return bad("error chunk length out of bounds");
            }
            if kind == NBD_REPLY_TYPE_ERROR_OFFSET && h.len < 14 {
                return bad("error offset chunk too short");
            }
            Ok(ChunkPlan::Error)
        }
        _ => bad("unknown chunk type"),
    }
}

/// Check that `offset..offset+len` of a data or hole chunk lies inside the
/// request; the index of its first byte in the request's buffer.
///
/// # Errors
/// An empty run or one reaching outside the request.
pub fn check_run(offset: u64, len: u64, req: &RequestView) -> Result<usize, Error> {
    let end = offset.checked_add(len);
    let req_end = req.offset + u64::from(req.len);
    match end {
        Some(end) if len > 0 && offset >= req.offset && end <= req_end => {
            usize::try_from(offset - req.offset)
                .map_err(|_| Error::Protocol("chunk offset does not fit in memory".into()))
        }
        _ => Err(Error::Protocol(format!(
            "chunk {offset}+{len} outside the request {}+{}",
            req.offset, req.len
        ))),
    }
}

/// Which bytes of a READ its data and hole chunks covered, so that
/// overlapping chunks (which the spec forbids, and which would let a
/// server make a short reply look complete) are refused. The first chunk
/// is kept as a range (a reply that is one chunk, the usual case, costs
/// nothing more); from the second on, one bit per byte.
#[derive(Debug, Default)]
pub struct Coverage {
    first: Option<(usize, usize)>,
    bits: Vec<u64>,
}

impl Coverage {
    /// Mark `at..at + n` of a request of `len` bytes; false if a byte of it
    /// was covered before (or it lies outside the request).
    pub fn mark(&mut self, len: usize, at: usize, n: usize) -> bool {
        let Some(end) = at.checked_add(n).filter(|&e| e <= len) else {
            return false;
        };
        if self.bits.is_empty() {
            match self.first {
                None => {
                    self.first = Some((at, end));
                    return true;
                }
                Some((a, e)) => {
                    self.bits = vec![0; len.div_ceil(64)];
                    self.set(a, e);
                }
            }
        }
        self.set(at, end)
    }

    /// Set the bits of `at..end`; false if one was set already.
    fn set(&mut self, at: usize, end: usize) -> bool {
        let mut i = at;
        while i < end {
            let bit = i % 64;
            let take = (64 - bit).min(end - i);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            let Some(word) = self.bits.get_mut(i / 64) else {
                return false;
            };
            if *word & mask != 0 {
                return false;
            }
            *word |= mask;
            i += take;
        }
        true
    }
}

/// Parse a hole chunk's 12-byte payload: offset and length.
pub fn parse_hole(payload: &[u8; 12]) -> (u64, u64) {
    // 8 + 4 bytes, fixed by the array's type.
    let mut b = &payload[..];
    let offset = b.get_u64();
    let len = b.get_u32();
    (offset, u64::from(len))
}

/// An error chunk: code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// The NBD error (never 0: a 0 becomes EIO).
    pub code: u32,
    /// The server's message (lossy UTF-8).
    pub message: String,
}

/// Parse an error chunk payload (length already checked by
/// [`check_chunk`]).
///
/// # Errors
/// A message length that does not fit the payload.
pub fn parse_error(kind: u16, payload: &[u8]) -> Result<ChunkError, Error> {
    let bad = || Error::Protocol(format!("malformed error chunk (type {kind})"));
    let mut r = Reader::new(payload);
    let code = r.u32().map_err(|_| bad())?;
    let msg_len = usize::from(r.u16().map_err(|_| bad())?);
    let trailer = if kind == NBD_REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    let known = kind == NBD_REPLY_TYPE_ERROR || kind == NBD_REPLY_TYPE_ERROR_OFFSET;
    if known && 6 + msg_len + trailer != payload.len() {
        return Err(bad());
    }
    let message = r.bytes(msg_len).map_err(|_| bad())?;
    Ok(ChunkError {
        code: if code == 0 { NBD_EIO } else { code },
        message: String::from_utf8_lossy(message).trim_end().to_string(),
    })
}

/// Parse a block status payload (length already checked): the context id
/// and its `(length, flags)` descriptors.
///
/// # Errors
/// A zero-length extent.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), Error> {
    let mut r = Reader::new(payload);
    let ctx = r
        .u32()
        .map_err(|_| Error::Protocol("block status chunk too short".into()))?;
    let mut list = Vec::with_capacity(r.remaining() / 8);
    // Whole (length, flags) descriptors: check_chunk made the payload
    // 4 + 8n bytes, and a partial one at the end would be left unread.
    while let (Ok(len), Ok(flags)) = (r.u32(), r.u32()) {
        if len == 0 {
            return Err(Error::Protocol("block status extent of length 0".into()));
        }
        list.push((len, flags));
    }
    Ok((ctx, list))
}

/// Encode a compact request header.
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    // 4 + 2 + 2 + 8 + 8 + 4 bytes: exactly the array, which `BufMut` on a
    // slice needs (it panics past the end).
    let mut w = &mut b[..];
    w.put_u32(NBD_REQUEST_MAGIC);
    w.put_u16(flags);
    w.put_u16(command);
    w.put_u64(cookie);
    w.put_u64(offset);
    w.put_u32(len);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_req(offset: u64, len: u32) -> RequestView {
        RequestView {
            command: NBD_CMD_READ,
            offset,
            len,
        }
    }

    fn chunk(flags: u16, kind: u16, len: u32) -> ChunkHeader {
        ChunkHeader {
            flags,
            kind,
            cookie: 7,
            len,
        }
    }

    #[test]
    fn headers_parse() {
        let mut rest = [0u8; CHUNK_REST];
        rest[0..2].copy_from_slice(&1u16.to_be_bytes());
        rest[2..4].copy_from_slice(&NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        rest[4..12].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        rest[12..16].copy_from_slice(&4104u32.to_be_bytes());
        let h = parse_chunk_header(&rest);
        assert_eq!(
            h,
            chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, 4104).with_cookie(0xdead_beef)
        );
        assert!(h.done());
        let mut s = [0u8; SIMPLE_REST];
        s[0..4].copy_from_slice(&5u32.to_be_bytes());
        s[4..12].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            parse_simple(&s),
            SimpleHeader {
                error: 5,
                cookie: 9
            }
        );
    }

    impl ChunkHeader {
        fn with_cookie(mut self, cookie: u64) -> Self {
            self.cookie = cookie;
            self
        }
    }

    #[test]
    fn bad_magic() {
        assert!(parse_magic(0x1234_5678u32.to_be_bytes(), true).is_err());
        // Extended replies were never negotiated.
        assert!(parse_magic(NBD_EXTENDED_REPLY_MAGIC.to_be_bytes(), true).is_err());
        // Structured replies only when negotiated.
        assert!(parse_magic(NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes(), false).is_err());
        assert_eq!(
            parse_magic(NBD_SIMPLE_REPLY_MAGIC.to_be_bytes(), false).unwrap(),
            Magic::Simple
        );
    }

    #[test]
    fn data_chunk_longer_than_request_is_refused() {
        let req = read_req(4096, 4096);
        let ok = chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, 8 + 4096);
        assert_eq!(check_chunk(&ok, &req).unwrap(), ChunkPlan::Data);
        for len in [8 + 4097, u32::MAX, 8, 0] {
            let h = chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, len);
            assert!(check_chunk(&h, &req).is_err(), "{len}");
        }
    }

    #[test]
    fn runs_must_stay_inside_the_request() {
        let req = read_req(4096, 4096);
        assert_eq!(check_run(4096, 4096, &req).unwrap(), 0);
        assert_eq!(check_run(6000, 100, &req).unwrap(), 6000 - 4096);
        assert!(check_run(4095, 10, &req).is_err());
        assert!(check_run(8000, 200, &req).is_err());
        assert!(check_run(u64::MAX - 1, 10, &req).is_err());
        assert!(check_run(5000, 0, &req).is_err());
    }

    #[test]
    fn chunk_types_must_match_the_command() {
        let write = RequestView {
            command: NBD_CMD_WRITE,
            offset: 0,
            len: 10,
        };
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_OFFSET_DATA, 18), &write).is_err());
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_OFFSET_HOLE, 12), &write).is_err());
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_BLOCK_STATUS, 12), &write).is_err());
        assert!(check_chunk(&chunk(1, 77, 0), &write).is_err());
        assert!(check_chunk(&chunk(0, NBD_REPLY_TYPE_NONE, 0), &write).is_err());
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_NONE, 4), &write).is_err());
        assert_eq!(
            check_chunk(&chunk(1, NBD_REPLY_TYPE_NONE, 0), &write).unwrap(),
            ChunkPlan::Empty
        );
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_OFFSET_HOLE, 13), &read_req(0, 10)).is_err());
    }

    #[test]
    fn block_status_and_error_lengths_are_bounded() {
        let bs = RequestView {
            command: NBD_CMD_BLOCK_STATUS,
            offset: 0,
            len: 1 << 20,
        };
        assert!(check_chunk(&chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, 12), &bs).is_ok());
        for len in [
            4,
            8,
            13,
            u32::MAX - 3,
            4 + 8 * (MAX_CHUNK_EXTENTS as u32 + 1),
        ] {
            assert!(
                check_chunk(&chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, len), &bs).is_err(),
                "{len}"
            );
        }
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_ERROR, 5), &bs).is_err());
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_ERROR, MAX_ERROR_CHUNK + 1), &bs).is_err());
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_ERROR_OFFSET, 10), &bs).is_err());
        assert!(check_chunk(&chunk(1, NBD_REPLY_TYPE_ERROR, 6), &bs).is_ok());
        // An unknown error type is still an error, bounded the same way.
        assert!(check_chunk(&chunk(1, 0x8005, 6), &bs).is_ok());
    }

    #[test]
    fn coverage_refuses_overlaps() {
        let mut c = Coverage::default();
        assert!(c.mark(200, 0, 64));
        assert!(c.mark(200, 70, 130));
        assert!(!c.mark(200, 63, 2));
        assert!(!c.mark(200, 199, 1));
        assert!(c.mark(200, 64, 6));
        assert!(!c.mark(200, 0, 1));
        assert!(!c.mark(200, 150, 100));
        // One chunk for the whole read: no bitmap; a second one overlapping
        // it is still refused.
        let mut c = Coverage::default();
        assert!(c.mark(100, 0, 100));
        assert!(c.bits.is_empty());
        assert!(!c.mark(100, 50, 1));
        let mut c = Coverage::default();
        assert!(!c.mark(100, 90, 20));
    }

    #[test]
    fn error_payloads() {
        let mut p = Vec::new();
        p.extend_from_slice(&NBD_EPERM.to_be_bytes());
        p.extend_from_slice(&8u16.to_be_bytes());
        p.extend_from_slice(b"readonly");
        let e = parse_error(NBD_REPLY_TYPE_ERROR, &p).unwrap();
        assert_eq!((e.code, e.message.as_str()), (NBD_EPERM, "readonly"));
        // The message length claims more than the payload holds.
        let mut lying = p.clone();
        lying[4..6].copy_from_slice(&200u16.to_be_bytes());
        assert!(parse_error(NBD_REPLY_TYPE_ERROR, &lying).is_err());
        // ERROR_OFFSET needs its 8-byte offset after the message.
        assert!(parse_error(NBD_REPLY_TYPE_ERROR_OFFSET, &p).is_err());
        p.extend_from_slice(&0u64.to_be_bytes());
        assert!(parse_error(NBD_REPLY_TYPE_ERROR_OFFSET, &p).is_ok());
        // Code 0 is not success in an error chunk.
        let zero = [0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_error(NBD_REPLY_TYPE_ERROR, &zero).unwrap().code,
            NBD_EIO
        );
    }

    #[test]
    fn block_status_payloads() {
        let mut p = 3u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 0u32), (8192, 3)] {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        assert_eq!(
            parse_block_status(&p).unwrap(),
            (3, vec![(4096, 0), (8192, 3)])
        );
        p[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_block_status(&p).is_err());
        assert!(parse_block_status(&[0, 0]).is_err());
    }

    #[test]
    fn request_bytes() {
        let b = encode_request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0x0102, 0x10, 0x20);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&b[16..24], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(&b[24..28], &[0, 0, 0, 0x20]);
    }
}
