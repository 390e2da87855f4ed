//! Request headers (compact and extended) and the per-command validity table.

use crate::backend::ZeroFlags;
use crate::nbd::consts::*;
use crate::nbd::error::{ProtocolError, RequestError};
use crate::nbd::mode::ReplyMode;
use crate::wire::{Reader, WireError};

/// Size of a compact request header.
pub const COMPACT_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_LEN: usize = 32;

/// A request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque cookie echoed in replies.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length, or the payload length (WRITE; PAYLOAD_LEN).
    pub len: u64,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    ///
    /// A WRITE always carries `len` bytes. The extended-headers text says a
    /// WRITE MUST set PAYLOAD_LEN, but qemu 10 (the real client) sends
    /// extended WRITEs without it, and qemu's server reads the payload
    /// either way; so do we.
    pub fn payload_len(&self, mode: ReplyMode) -> u64 {
        if self.kind == NBD_CMD_WRITE
            || (mode == ReplyMode::Extended && self.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0)
        {
            self.len
        } else {
            0
        }
    }
}

/// Parse a header of `COMPACT_LEN` or `EXTENDED_LEN` bytes.
///
/// # Errors
/// The magic does not match the negotiated header style.
pub fn parse_request(buf: &[u8], mode: ReplyMode) -> Result<RequestHeader, ProtocolError> {
    let want = header_len(mode);
    if buf.len() < want {
        return Err(ProtocolError::violation("short request header"));
    }
    // The length is checked above: no read below runs short.
    let short = |_: WireError| ProtocolError::violation("short request header");
    let mut r = Reader::new(buf);
    let magic = r.u32().map_err(short)?;
    let expected = if mode == ReplyMode::Extended {
        NBD_EXTENDED_REQUEST_MAGIC
    } else {
        NBD_REQUEST_MAGIC
    };
    if magic != expected {
        return Err(ProtocolError::violation(format!(
            "bad request magic {magic:#010x}"
        )));
    }
    let flags = r.u16().map_err(short)?;
    let kind = r.u16().map_err(short)?;
    let cookie = r.u64().map_err(short)?;
    let offset = r.u64().map_err(short)?;
    let len = if mode == ReplyMode::Extended {
        r.u64().map_err(short)?
    } else {
        u64::from(r.u32().map_err(short)?)
    };
    Ok(RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len,
    })
}

/// Header length for `mode`.
pub fn header_len(mode: ReplyMode) -> usize {
    if mode == ReplyMode::Extended {
        EXTENDED_LEN
    } else {
        COMPACT_LEN
    }
}

/// A validated command, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ.
    Read {
        /// Offset.
        offset: u64,
        /// Length (at most the maximum payload).
        len: u32,
        /// DF: one content chunk.
        df: bool,
    },
    /// NBD_CMD_WRITE; the payload follows the header.
    Write {
        /// Offset.
        offset: u64,
        /// Payload length.
        len: u32,
        /// FUA.
        fua: bool,
    },
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// FUA.
        fua: bool,
    },
    /// NBD_CMD_CACHE.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// NO_HOLE, FAST_ZERO, FUA.
        flags: ZeroFlags,
    },
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length (nonzero).
        len: u64,
        /// REQ_ONE.
        req_one: bool,
    },
}

/// What validation needs to know about the connection and export.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size.
    pub size: u64,
    /// Transmission flags sent.
    pub flags: u16,
    /// Reply style.
    pub mode: ReplyMode,
    /// Largest payload.
    pub max_payload: u32,
    /// A metadata context is selected.
    pub has_meta: bool,
}

/// Check a request against the export: a pure function that either gives
/// the command or the errno to answer with. DISC is handled before this.
///
/// # Errors
/// The request is not valid for this export and connection.
pub fn validate_request(h: &RequestHeader, l: &Limits) -> Result<Command, RequestError> {
    let has = |flag: u16| l.flags & flag != 0;
    let mut allowed = 0u16;
    if has(NBD_FLAG_SEND_FUA) {
        allowed |= NBD_CMD_FLAG_FUA;
    }
    let name = command_name(h.kind);
    // (extra flags, needs write access, needs flag, writes past end = ENOSPC)
    let (extra, writes, needs): (u16, bool, u16) = match h.kind {
        NBD_CMD_READ => (
            if l.mode >= ReplyMode::Structured {
                NBD_CMD_FLAG_DF
            } else {
                0
            },
            false,
            0,
        ),
        NBD_CMD_WRITE => (
            if l.mode == ReplyMode::Extended {
                NBD_CMD_FLAG_PAYLOAD_LEN
            } else {
                0
            },
            true,
            0,
        ),
        NBD_CMD_FLUSH => (0, false, NBD_FLAG_SEND_FLUSH),
        NBD_CMD_TRIM => (0, true, NBD_FLAG_SEND_TRIM),
        NBD_CMD_CACHE => (0, false, 0),
        NBD_CMD_WRITE_ZEROES => (
            NBD_CMD_FLAG_NO_HOLE
                | if has(NBD_FLAG_SEND_FAST_ZERO) {
                    NBD_CMD_FLAG_FAST_ZERO
                } else {
                    0
                },
            true,
            NBD_FLAG_SEND_WRITE_ZEROES,
        ),
        NBD_CMD_BLOCK_STATUS => (NBD_CMD_FLAG_REQ_ONE, false, 0),
        other => {
            return Err(RequestError::invalid(format!(
                "unsupported command {other} ({name})"
            )));
        }
    };
    if writes && has(NBD_FLAG_READ_ONLY) {
        return Err(RequestError::new(
            NBD_EPERM,
            format!("{name} on a read-only export"),
        ));
    }
    if needs != 0 && !has(needs) {
        return Err(RequestError::invalid(format!("{name} was not negotiated")));
    }
    let bad_flags = h.flags & !(allowed | extra);
    if bad_flags != 0 {
        return Err(RequestError::invalid(format!(
            "flags {bad_flags:#x} are not valid for {name}"
        )));
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    if h.kind == NBD_CMD_FLUSH {
        return Ok(Command::Flush);
    }
    if h.kind == NBD_CMD_BLOCK_STATUS && (l.mode < ReplyMode::Structured || !l.has_meta) {
        return Err(RequestError::invalid(
            "NBD_CMD_BLOCK_STATUS needs a selected metadata context",
        ));
    }
    // Bounds without overflow: offset first, then length against the rest.
    if h.offset > l.size || h.len > l.size - h.offset {
        let errno = if writes && h.kind != NBD_CMD_TRIM {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return Err(RequestError::new(
            errno,
            format!(
                "{name} at {} + {} is past the end of the export ({})",
                h.offset, h.len, l.size
            ),
        ));
    }
    let (offset, len) = (h.offset, h.len);
    let payload_len = || -> Result<u32, RequestError> {
        u32::try_from(len)
            .ok()
            .filter(|&n| n <= l.max_payload)
            .ok_or_else(|| {
                RequestError::invalid(format!(
                    "{name} of {len} bytes is over the maximum of {}",
                    l.max_payload
                ))
            })
    };
    Ok(match h.kind {
        NBD_CMD_READ => Command::Read {
            offset,
            len: payload_len()?,
            df: h.flags & NBD_CMD_FLAG_DF != 0,
        },
        NBD_CMD_WRITE => Command::Write {
            offset,
            len: payload_len()?,
            fua,
        },
        NBD_CMD_TRIM => Command::Trim { offset, len, fua },
        NBD_CMD_CACHE => Command::Cache { offset, len },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                no_hole: h.flags & NBD_CMD_FLAG_NO_HOLE != 0,
                fast: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                fua,
            },
        },
        _ => {
            if len == 0 {
                return Err(RequestError::invalid("NBD_CMD_BLOCK_STATUS of 0 bytes"));
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn limits(flags: u16) -> Limits {
        Limits {
            size: 1 << 20,
            flags,
            mode: ReplyMode::Structured,
            max_payload: 1 << 25,
            has_meta: true,
        }
    }

    const RW: u16 = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_SEND_DF;

    #[test]
    fn compact_header_bytes() {
        let bytes = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0,
            0, 0x10, 0x00, 0, 0, 0x02, 0x00,
        ];
        let h = parse_request(&bytes, ReplyMode::Simple).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: NBD_CMD_FLAG_FUA,
                kind: NBD_CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(h.payload_len(ReplyMode::Simple), 512);
        assert_eq!(compact(1, 1, 0x0102_0304_0506_0708, 4096, 512), bytes);
    }

    #[test]
    fn extended_header_bytes() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&NBD_CMD_FLAG_PAYLOAD_LEN.to_be_bytes());
        bytes.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        bytes.extend_from_slice(&7u64.to_be_bytes());
        bytes.extend_from_slice(&0u64.to_be_bytes());
        bytes.extend_from_slice(&(1u64 << 33).to_be_bytes());
        let h = parse_request(&bytes, ReplyMode::Extended).unwrap();
        assert_eq!(h.len, 1 << 33);
        assert_eq!(h.payload_len(ReplyMode::Extended), 1 << 33);
        assert!(parse_request(&bytes, ReplyMode::Structured).is_err());
    }

    #[test]
    fn short_headers_are_protocol_errors() {
        let b = compact(0, 0, 0, 0, 0);
        for n in 0..b.len() {
            let e = parse_request(&b[..n], ReplyMode::Simple).unwrap_err();
            assert!(e.to_string().contains("short request header"), "{n}: {e}");
        }
        // A whole compact header is 4 bytes short of an extended one.
        let mut ext = b;
        ext[..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert!(parse_request(&ext, ReplyMode::Extended).is_err());
        ext.extend_from_slice(&[0; 4]);
        assert!(parse_request(&ext, ReplyMode::Extended).is_ok());
    }

    #[test]
    fn bad_magic_is_protocol_error() {
        let mut b = compact(0, 0, 0, 0, 0);
        b[0] = 0;
        assert!(parse_request(&b, ReplyMode::Simple).is_err());
    }

    fn hdr(kind: u16, flags: u16, offset: u64, len: u64) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn bounds_never_overflow() {
        let l = limits(RW);
        let e = validate_request(&hdr(NBD_CMD_READ, 0, u64::MAX, 10), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        let e = validate_request(&hdr(NBD_CMD_WRITE, 0, 1 << 20, 1), &l).unwrap_err();
        assert_eq!(e.errno, NBD_ENOSPC);
        let e = validate_request(&hdr(NBD_CMD_WRITE_ZEROES, 0, 10, u64::MAX), &l).unwrap_err();
        assert_eq!(e.errno, NBD_ENOSPC);
        let e = validate_request(&hdr(NBD_CMD_TRIM, 0, 10, 1 << 20), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        assert!(validate_request(&hdr(NBD_CMD_READ, 0, (1 << 20) - 1, 1), &l).is_ok());
    }

    #[test]
    fn flags_table() {
        let l = limits(RW);
        assert!(validate_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &l).is_ok());
        let e = validate_request(&hdr(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 1), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        let ok = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA;
        assert!(validate_request(&hdr(NBD_CMD_WRITE_ZEROES, ok, 0, 1), &l).is_ok());
        let no_fast = limits(RW & !NBD_FLAG_SEND_FAST_ZERO);
        let e = validate_request(
            &hdr(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 1),
            &no_fast,
        )
        .unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        assert!(validate_request(&hdr(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0), &l).is_ok());
        let e = validate_request(&hdr(99, 0, 0, 0), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        let simple = Limits {
            mode: ReplyMode::Simple,
            ..l
        };
        assert!(validate_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &simple).is_err());
        assert!(validate_request(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &simple).is_err());
    }

    #[test]
    fn read_only_is_eperm() {
        let l = limits(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY);
        for kind in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            let e = validate_request(&hdr(kind, 0, 0, 1), &l).unwrap_err();
            assert_eq!(e.errno, NBD_EPERM, "{}", command_name(kind));
        }
        assert!(validate_request(&hdr(NBD_CMD_READ, 0, 0, 1), &l).is_ok());
    }

    #[test]
    fn oversized_read_and_empty_block_status() {
        let mut l = limits(RW);
        l.size = 1 << 30;
        let e = validate_request(&hdr(NBD_CMD_READ, 0, 0, (1 << 25) + 1), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        let e = validate_request(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 0), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
        let no_meta = Limits {
            has_meta: false,
            ..l
        };
        assert!(validate_request(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &no_meta).is_err());
    }

    #[test]
    fn extended_write_payload_with_or_without_flag() {
        let l = Limits {
            mode: ReplyMode::Extended,
            ..limits(RW)
        };
        // qemu 10 sends extended WRITEs without PAYLOAD_LEN.
        assert!(validate_request(&hdr(NBD_CMD_WRITE, 0, 0, 1), &l).is_ok());
        assert_eq!(
            hdr(NBD_CMD_WRITE, 0, 0, 9).payload_len(ReplyMode::Extended),
            9
        );
        assert_eq!(
            hdr(NBD_CMD_READ, 0, 0, 9).payload_len(ReplyMode::Extended),
            0
        );
        assert!(validate_request(&hdr(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1), &l).is_ok());
        let e =
            validate_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1), &l).unwrap_err();
        assert_eq!(e.errno, NBD_EINVAL);
    }
}
