//! Encoders for option replies. Each reply shape has its own small function.

use crate::nbd::consts::*;
use bytes::{BufMut, BytesMut};

/// Append one option reply: magic, option, type, length, data.
pub fn encode_reply(buf: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    buf.put_u64(NBD_REP_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// NBD_REP_ACK.
pub fn encode_ack(buf: &mut BytesMut, option: u32) {
    encode_reply(buf, option, NBD_REP_ACK, &[]);
}

/// An error reply with a message (truncated to 4096 bytes).
pub fn encode_error(buf: &mut BytesMut, option: u32, error: u32, message: &str) {
    encode_reply(buf, option, error, truncate(message).as_bytes());
}

/// NBD_REP_SERVER: name length, name, description.
pub fn encode_server(buf: &mut BytesMut, option: u32, name: &str, description: &str) {
    let mut data = BytesMut::with_capacity(4 + name.len() + description.len());
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    data.put_slice(truncate(description).as_bytes());
    encode_reply(buf, option, NBD_REP_SERVER, &data);
}

/// NBD_REP_INFO with NBD_INFO_EXPORT.
pub fn encode_info_export(buf: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut data = BytesMut::with_capacity(12);
    data.put_u16(NBD_INFO_EXPORT);
    data.put_u64(size);
    data.put_u16(flags);
    encode_reply(buf, option, NBD_REP_INFO, &data);
}

/// NBD_REP_INFO with NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn encode_info_text(buf: &mut BytesMut, option: u32, info: u16, text: &str) {
    let text = truncate(text);
    let mut data = BytesMut::with_capacity(2 + text.len());
    data.put_u16(info);
    data.put_slice(text.as_bytes());
    encode_reply(buf, option, NBD_REP_INFO, &data);
}

/// NBD_REP_INFO with NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(buf: &mut BytesMut, option: u32, min: u32, pref: u32, max: u32) {
    let mut data = BytesMut::with_capacity(14);
    data.put_u16(NBD_INFO_BLOCK_SIZE);
    data.put_u32(min);
    data.put_u32(pref);
    data.put_u32(max);
    encode_reply(buf, option, NBD_REP_INFO, &data);
}

/// NBD_REP_META_CONTEXT: id, name.
pub fn encode_meta_context(buf: &mut BytesMut, option: u32, id: u32, name: &str) {
    let mut data = BytesMut::with_capacity(4 + name.len());
    data.put_u32(id);
    data.put_slice(name.as_bytes());
    encode_reply(buf, option, NBD_REP_META_CONTEXT, &data);
}

/// The raw reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless
/// both sides agreed on NO_ZEROES.
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= 4096 {
        return s;
    }
    let mut end = 4096;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_bytes() {
        let mut b = BytesMut::new();
        encode_ack(&mut b, NBD_OPT_STRUCTURED_REPLY);
        assert_eq!(
            &b[..],
            &[
                0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn info_export_bytes() {
        let mut b = BytesMut::new();
        encode_info_export(&mut b, NBD_OPT_GO, 0x1_0000_0000, 0x0d03);
        assert_eq!(b.len(), 20 + 12);
        assert_eq!(&b[8..20], &[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12]);
        assert_eq!(&b[20..], &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x0d, 0x03]);
    }

    #[test]
    fn block_size_and_meta_bytes() {
        let mut b = BytesMut::new();
        encode_info_block_size(&mut b, NBD_OPT_GO, 1, 4096, 1 << 25);
        assert_eq!(
            &b[16..],
            &[0, 0, 0, 14, 0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        let mut b = BytesMut::new();
        encode_meta_context(&mut b, NBD_OPT_SET_META_CONTEXT, 1, "base:allocation");
        assert_eq!(&b[12..20], &[0, 0, 0, 4, 0, 0, 0, 19]);
        assert_eq!(&b[20..24], &[0, 0, 0, 1]);
        assert_eq!(&b[24..], b"base:allocation");
    }

    #[test]
    fn export_name_reply_lengths() {
        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 512, 1, false);
        assert_eq!(b.len(), 134);
        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 512, 1, true);
        assert_eq!(&b[..], &[0, 0, 0, 0, 0, 0, 2, 0, 0, 1]);
    }

    #[test]
    fn server_reply() {
        let mut b = BytesMut::new();
        encode_server(&mut b, NBD_OPT_LIST, "ab", "d");
        assert_eq!(
            &b[12..],
            &[0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 2, b'a', b'b', b'd']
        );
    }
}
