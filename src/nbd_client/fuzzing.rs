//! Entry point for the cargo-fuzz target `nbd_client_replies` in `fuzz/`:
//! the real [`NbdClient`] over a socket pair whose server side says the
//! fuzz input (handshake replies, then transmission replies) and nothing
//! else. Kept in the library so that stable `cargo test` runs the seeds.

use super::{ExportInfo, NbdAddress, NbdClient};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Offset and length of the READ the client sends.
pub const READ_AT: (u64, usize) = (0, 8192);
/// Offset and length of the BLOCK_STATUS the client sends.
pub const STATUS_AT: (u64, u32) = (0, 1 << 20);
/// Offset of the WRITE the client sends ([`WRITE_DATA`] bytes).
pub const WRITE_AT: u64 = 4096;
/// Payload of the WRITE.
pub const WRITE_DATA: &[u8] = &[0xa5; 512];
/// Whole session bound: a hostile server may fail the client, never hang it.
const DEADLINE: Duration = Duration::from_secs(10);
/// Most client bytes kept by the fake server.
const MAX_SENT: usize = 1 << 20;

/// Block status descriptors, `(length, flags)`, per context id.
pub type Status = Vec<(u32, Vec<(u32, u32)>)>;

/// What the client did against the fuzzed server. `None`: not attempted
/// (the handshake failed, or the deadline passed first).
#[derive(Debug, Default)]
pub struct Outcome {
    /// The handshake result.
    pub handshake: Option<Result<ExportInfo, String>>,
    /// READ of [`READ_AT`].
    pub read: Option<Result<Vec<u8>, String>>,
    /// BLOCK_STATUS of [`STATUS_AT`]: descriptors per context id.
    pub block_status: Option<Result<Status, String>>,
    /// WRITE of [`WRITE_DATA`] at [`WRITE_AT`].
    pub write: Option<Result<(), String>>,
    /// FLUSH.
    pub flush: Option<Result<(), String>>,
    /// The session did not end within the deadline (a bug).
    pub timed_out: bool,
    /// What the client sent (bounded).
    pub sent: Vec<u8>,
}

/// Play `input` as everything an NBD server says on one connection while
/// the client connects, sends READ, BLOCK_STATUS, WRITE and FLUSH (all in
/// flight at once, so their cookies are 1, 2, 3, 4 in that order for the
/// commands the export allows), then closes.
pub fn server_replies(input: &[u8]) -> Outcome {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Outcome::default();
    };
    rt.block_on(async {
        let Ok((client_end, server_end)) = UnixStream::pair() else {
            return Outcome::default();
        };
        let input = input.to_vec();
        let server = tokio::spawn(async move {
            let (mut rd, mut wr) = server_end.into_split();
            let talk = async move {
                let _ = wr.write_all(&input).await;
                // EOF after the input: a short server errors, never hangs.
                let _ = wr.shutdown().await;
                wr
            };
            let listen = async move {
                let mut sent = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = rd.read(&mut buf).await {
                    let room = MAX_SENT.saturating_sub(sent.len()).min(n);
                    sent.extend_from_slice(buf.get(..room).unwrap_or_default());
                }
                sent
            };
            let (_wr, sent) = tokio::join!(talk, listen);
            sent
        });
        let mut out = Outcome::default();
        // No cooperative yields: all four requests go out before the reply
        // reader first runs, so replies never race their requests.
        let session = tokio::task::unconstrained(run_client(client_end, &mut out));
        if tokio::time::timeout(DEADLINE, session).await.is_err() {
            out.timed_out = true;
        }
        match tokio::time::timeout(DEADLINE, server).await {
            Ok(Ok(sent)) => out.sent = sent,
            Ok(Err(_)) => {}
            Err(_) => out.timed_out = true,
        }
        out
    })
}

async fn run_client(stream: UnixStream, out: &mut Outcome) {
    let address = NbdAddress {
        socket: "/fuzz.sock".into(),
        export: String::new(),
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let client = match NbdClient::over(stream, &address, deadline).await {
        Ok(c) => c,
        Err(e) => {
            out.handshake = Some(Err(e.to_string()));
            return;
        }
    };
    out.handshake = Some(Ok(client.info().clone()));
    let (read, status, write, flush) = tokio::join!(
        client.read(READ_AT.0, READ_AT.1),
        client.block_status(STATUS_AT.0, STATUS_AT.1),
        client.write(WRITE_AT, WRITE_DATA, true),
        client.flush(),
    );
    out.read = Some(read.map(|b| b.to_vec()).map_err(|e| e.to_string()));
    out.block_status = Some(status.map_err(|e| e.to_string()));
    out.write = Some(write.map_err(|e| e.to_string()));
    out.flush = Some(flush.map_err(|e| e.to_string()));
    client.close().await;
}

/// Byte builders for seed sessions: what qemu-nbd says.
pub mod seed {
    use crate::nbd::consts::*;

    /// Greeting: fixed newstyle, no zeroes.
    pub fn greeting() -> Vec<u8> {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
        b
    }

    /// One option reply.
    pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = NBD_REP_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// One structured reply chunk.
    pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// One simple reply header.
    pub fn simple(error: u32, cookie: u64) -> Vec<u8> {
        let mut b = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b
    }

    /// The handshake of `qemu-nbd -f qcow2`: structured replies,
    /// `base:allocation` (id 1) and `qemu:allocation-depth` (id 2), then
    /// GO with the export size, flags and block sizes.
    pub fn handshake(size: u64) -> Vec<u8> {
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        for (id, name) in [(1u32, "base:allocation"), (2, "qemu:allocation-depth")] {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            s.extend(option_reply(
                NBD_OPT_SET_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                &d,
            ));
        }
        s.extend(option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        let mut name = NBD_INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_INFO, &name));
        let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&size.to_be_bytes());
        let flags = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_CAN_MULTI_CONN
            | NBD_FLAG_SEND_CACHE
            | NBD_FLAG_SEND_FAST_ZERO;
        export.extend_from_slice(&flags.to_be_bytes());
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_INFO, &export));
        let mut block = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 32 << 20] {
            block.extend_from_slice(&v.to_be_bytes());
        }
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_INFO, &block));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        s
    }

    /// The data the valid session's READ returns: 4 KiB of data, then a
    /// 4 KiB hole.
    pub fn read_data() -> Vec<u8> {
        let mut v: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        v.resize(8192, 0);
        v
    }

    /// A whole valid session: [`handshake`], then the replies to READ
    /// (cookie 1: data chunk, hole chunk), BLOCK_STATUS (2: one chunk per
    /// context), WRITE (3: simple reply) and FLUSH (4: NONE chunk).
    pub fn valid_session() -> Vec<u8> {
        let mut s = handshake(1 << 20);
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&read_data()[..4096]);
        s.extend(chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, 1, &data));
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        s.extend(chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_HOLE,
            1,
            &hole,
        ));
        let status = |ctx: u32, extents: &[(u32, u32)]| {
            let mut d = ctx.to_be_bytes().to_vec();
            for (len, flags) in extents {
                d.extend_from_slice(&len.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
            }
            d
        };
        let base = status(1, &[(4096, 0), (4096, 3), ((1 << 20) - 8192, 3)]);
        s.extend(chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, 2, &base));
        let depth = status(2, &[(4096, 1), ((1 << 20) - 4096, 0)]);
        s.extend(chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            2,
            &depth,
        ));
        s.extend(simple(0, 3));
        s.extend(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 4, &[]));
        s
    }

    /// A session whose server fails every request: error chunks with
    /// messages, a simple error reply, and an offset error.
    pub fn error_session() -> Vec<u8> {
        let mut s = handshake(1 << 20);
        let error = |code: u32, msg: &str, offset: Option<u64>| {
            let mut d = code.to_be_bytes().to_vec();
            d.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            d.extend_from_slice(msg.as_bytes());
            if let Some(o) = offset {
                d.extend_from_slice(&o.to_be_bytes());
            }
            d
        };
        s.extend(chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR_OFFSET,
            1,
            &error(NBD_EIO, "read failed", Some(512)),
        ));
        s.extend(chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR,
            2,
            &error(NBD_EINVAL, "no status", None),
        ));
        s.extend(simple(NBD_ENOSPC, 3));
        s.extend(chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR,
            4,
            &error(NBD_EIO, "", None),
        ));
        s
    }

    /// A server without structured replies or meta contexts (simple
    /// replies only), like `nbd-server` of old.
    pub fn simple_session() -> Vec<u8> {
        let mut s = greeting();
        s.extend(option_reply(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_UNSUP,
            b"no",
        ));
        let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_INFO, &export));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        // READ (1), then WRITE (2) and FLUSH (3): no BLOCK_STATUS.
        s.extend(simple(0, 1));
        s.extend(super::seed::read_data());
        s.extend(simple(0, 2));
        s.extend(simple(0, 3));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn seeds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/nbd_client_replies")
    }

    fn ok<T: std::fmt::Debug>(r: &Option<Result<T, String>>) -> &T {
        match r {
            Some(Ok(v)) => v,
            other => panic!("expected success, got {other:?}"),
        }
    }

    #[test]
    fn valid_session_succeeds() {
        let out = server_replies(&seed::valid_session());
        assert!(!out.timed_out);
        let info = ok(&out.handshake);
        assert_eq!(info.size, 1 << 20);
        assert_eq!(
            (info.base_allocation, info.allocation_depth),
            (Some(1), Some(2))
        );
        assert_eq!(ok(&out.read), &seed::read_data());
        let status = ok(&out.block_status);
        assert_eq!(status.len(), 2);
        assert_eq!(status[0].1[1], (4096, 3));
        ok(&out.write);
        ok(&out.flush);
        // The WRITE payload went out after its header.
        let pos = out
            .sent
            .windows(WRITE_DATA.len())
            .position(|w| w == WRITE_DATA);
        assert!(
            pos.is_some(),
            "no WRITE payload in {} bytes",
            out.sent.len()
        );
    }

    #[test]
    fn error_and_simple_sessions() {
        let out = server_replies(&seed::error_session());
        for e in [
            out.read.as_ref().and_then(|r| r.as_ref().err()),
            out.block_status.as_ref().and_then(|r| r.as_ref().err()),
            out.write.as_ref().and_then(|r| r.as_ref().err()),
            out.flush.as_ref().and_then(|r| r.as_ref().err()),
        ] {
            let e = e.expect("a request error");
            assert!(e.contains("failed"), "{e}");
        }
        let out = server_replies(&seed::simple_session());
        assert!(!ok(&out.handshake).structured);
        assert_eq!(ok(&out.read), &seed::read_data());
        assert!(matches!(out.block_status, Some(Err(_))));
        ok(&out.write);
        ok(&out.flush);
    }

    /// Regression: two chunks over the same bytes made a READ look
    /// complete while half of it was never sent (zeros were returned).
    #[test]
    fn overlapping_read_chunks_are_refused() {
        use crate::nbd::consts::*;
        let mut s = seed::handshake(1 << 20);
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7; 4096]);
        s.extend(seed::chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, 1, &data));
        s.extend(seed::chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            1,
            &data,
        ));
        let out = server_replies(&s);
        let e = out.read.expect("a READ").expect_err("overlap refused");
        assert!(e.contains("overlaps"), "{e}");
        let mut s = seed::handshake(1 << 20);
        let mut hole = 0u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&8192u32.to_be_bytes());
        s.extend(seed::chunk(0, NBD_REPLY_TYPE_OFFSET_HOLE, 1, &hole));
        s.extend(seed::chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            1,
            &data,
        ));
        let e = server_replies(&s)
            .read
            .expect("a READ")
            .expect_err("overlap");
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn truncated_sessions_fail_cleanly() {
        let full = seed::valid_session();
        let handshake_len = seed::handshake(1 << 20).len();
        for cut in (0..full.len())
            .step_by(7)
            .chain([handshake_len, full.len() - 1])
        {
            let out = server_replies(&full[..cut]);
            assert!(!out.timed_out, "cut at {cut}");
            let failed = [
                out.handshake.as_ref().map(|r| r.is_err()),
                out.read.as_ref().map(|r| r.is_err()),
                out.block_status.as_ref().map(|r| r.is_err()),
                out.write.as_ref().map(|r| r.is_err()),
                out.flush.as_ref().map(|r| r.is_err()),
            ]
            .contains(&Some(true));
            assert!(failed, "cut at {cut}: {out:?}");
        }
    }

    #[test]
    fn corrupted_sessions_never_panic() {
        let full = seed::valid_session();
        for at in (0..full.len()).step_by(5) {
            for byte in [0x00, 0xff, 0x80] {
                let mut v = full.clone();
                v[at] ^= byte ^ 0x5a;
                let out = server_replies(&v);
                assert!(!out.timed_out, "byte {at}");
            }
        }
    }

    /// The files in `fuzz/seeds/nbd_client_replies` (the fuzzer's starting
    /// corpus) replay without a hang; `NBDBRIDGE_WRITE_SEEDS=1` rewrites
    /// them from the builders above.
    #[test]
    fn seed_files_replay() {
        let dir = seeds_dir();
        if std::env::var_os("NBDBRIDGE_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).expect("seed dir");
            let full = seed::valid_session();
            let handshake_len = seed::handshake(1 << 20).len();
            for (name, bytes) in [
                ("valid", full.clone()),
                ("errors", seed::error_session()),
                ("simple", seed::simple_session()),
                ("handshake-only", full[..handshake_len].to_vec()),
                ("truncated-read", full[..handshake_len + 100].to_vec()),
            ] {
                std::fs::write(dir.join(name), bytes).expect("write seed");
            }
        }
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .expect("fuzz/seeds/nbd_client_replies")
            .map(|e| e.expect("seed entry").path())
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 5, "{seeds:?}");
        for seed in seeds {
            let out = server_replies(&std::fs::read(&seed).expect("seed"));
            assert!(!out.timed_out, "{}", seed.display());
            assert!(out.handshake.is_some(), "{}", seed.display());
        }
    }
}
