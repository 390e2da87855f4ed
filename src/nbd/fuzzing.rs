//! Entry points for the cargo-fuzz targets in `fuzz/`: the real server code
//! over an in-memory stream with the memory backend. Kept in the library so
//! that stable `cargo test` runs them on seed inputs too.

use super::handshake::option::parse_option;
use super::mode::ReplyMode;
use super::transmission::request::{Limits, parse_request, validate_request};
use super::{Export, Exports, Server};
use crate::backend::memory::MemoryBackend;
use crate::shutdown::Shutdown;
use crate::wire::Reader;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the fuzzed export.
const EXPORT_SIZE: usize = 1 << 20;

/// Feed `input` as everything a client sends on one connection (handshake
/// and transmission), drain what the server answers, and return it. The
/// server must neither panic nor hang.
pub fn client_bytes(input: &[u8]) -> Vec<u8> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let backend = Arc::new(MemoryBackend::new(EXPORT_SIZE, false));
        let export = Export::new("fuzz", Some("fuzz export".into()), backend);
        let server = Server::new(Exports::single(export), Shutdown::new());
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let (mut cr, mut cw) = tokio::io::split(client);
        let input = input.to_vec();
        let feed = async move {
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
            // Keep the write half alive until the server is done.
            cw
        };
        let drain = async move {
            let mut out = Vec::new();
            let _ = cr.read_to_end(&mut out).await;
            out
        };
        let serve = async move {
            server.handle(1, "fuzz".into(), server_end).await;
        };
        let all = async {
            let (_, out, _) = tokio::join!(feed, drain, serve);
            out
        };
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .unwrap_or_default()
    })
}

/// Parse and validate `input` as one request header in every reply mode.
pub fn request_bytes(input: &[u8]) {
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        if let Ok(h) = parse_request(input, mode) {
            let flags = Reader::new(input.get(32..).unwrap_or_default())
                .u16()
                .unwrap_or(0xffff);
            let limits = Limits {
                size: EXPORT_SIZE as u64,
                flags,
                mode,
                max_payload: 1 << 25,
                has_meta: input.len() % 2 == 0,
            };
            let _ = h.payload_len(mode);
            let _ = validate_request(&h, &limits);
        }
    }
}

/// Parse `input` as an option: the first 4 bytes are the code, the rest the
/// payload.
pub fn option_bytes(input: &[u8]) {
    let mut r = Reader::new(input);
    let (code, data) = match r.u32() {
        Ok(code) => (code, r.rest()),
        Err(_) => (0, &[][..]),
    };
    let _ = parse_option(code, data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::consts::*;

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(NBD_OPT_GO, &d)
    }

    fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = NBD_REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn a_whole_session_over_memory() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(999, b"junk"));
        input.extend(go("fuzz"));
        let mut w = request(NBD_CMD_WRITE, 7, 4096, 4);
        w.extend_from_slice(b"abcd");
        input.extend(w);
        input.extend(request(NBD_CMD_READ, 8, 8192, 4));
        input.extend(request(NBD_CMD_READ, 9, (1 << 20) - 1, 2));
        input.extend(request(NBD_CMD_DISC, 10, 0, 0));
        let out = client_bytes(&input);
        assert_eq!(&out[..8], b"NBDMAGIC");
        // Replies may come in any order: parse them into (cookie, error, data).
        let mut replies = std::collections::HashMap::new();
        let start = out
            .windows(4)
            .position(|w| w == NBD_SIMPLE_REPLY_MAGIC.to_be_bytes())
            .expect("a simple reply");
        let mut rest = &out[start..];
        while rest.len() >= 16 {
            let err = u32::from_be_bytes(rest[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(rest[8..16].try_into().unwrap());
            let data_len = if cookie == 8 && err == 0 { 4 } else { 0 };
            replies.insert(cookie, (err, rest[16..16 + data_len].to_vec()));
            rest = &rest[16 + data_len..];
        }
        assert!(rest.is_empty(), "trailing bytes {rest:?}");
        assert_eq!(replies[&7], (0, vec![]));
        assert_eq!(replies[&8], (0, vec![0; 4]));
        assert_eq!(replies[&9].0, NBD_EINVAL);
        assert_eq!(replies.len(), 3);
    }

    /// Sessions of real clients (qemu-img, qemu-io, nbdinfo, nbdcopy)
    /// captured by `fuzz/capture_seeds.py`, replayed through the server:
    /// each one opens the export (GO acknowledged) and ends within the
    /// deadline. They are the fuzz target's seeds too.
    #[test]
    fn captured_client_sessions_replay() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/handshake");
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .expect("fuzz/seeds/handshake")
            .map(|e| e.expect("seed entry").path())
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 8, "seeds in {}: {seeds:?}", dir.display());
        let mut go_ack = NBD_REP_MAGIC.to_be_bytes().to_vec();
        go_ack.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        go_ack.extend_from_slice(&NBD_REP_ACK.to_be_bytes());
        for seed in seeds {
            let input = std::fs::read(&seed).expect("seed");
            let out = client_bytes(&input);
            let name = seed.display();
            assert!(out.starts_with(b"NBDMAGIC"), "{name}: no greeting");
            if !name.to_string().contains("list") {
                assert!(
                    out.windows(go_ack.len()).any(|w| w == go_ack.as_slice()),
                    "{name}: the export was not opened"
                );
            }
        }
    }

    #[test]
    fn garbage_ends_quietly() {
        for input in [
            &b""[..],
            &b"\0\0\0\x03garbage-garbage-garbage"[..],
            &[0xff; 100][..],
        ] {
            let out = client_bytes(input);
            assert_eq!(&out[..8], b"NBDMAGIC");
        }
        request_bytes(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0, 0, 0]);
        request_bytes(&request(NBD_CMD_WRITE, 1, u64::MAX, u32::MAX));
        option_bytes(&[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
    }
}
