//! The client side of the fixed newstyle handshake: STRUCTURED_REPLY,
//! SET_META_CONTEXT (`base:allocation`, `qemu:allocation-depth`), GO.

use super::{Error, MAX_IO, MAX_MESSAGE, MAX_OPTION_REPLY};
use crate::nbd::consts::*;
use crate::wire::Reader;
use bytes::{Buf, BufMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// qemu's allocation depth context: 0 = not allocated in any layer.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Most replies accepted to one option (a server cannot loop us forever).
const MAX_REPLIES: usize = 64;

/// What NBD_OPT_GO told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum block size (1 unless the server says otherwise).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest payload per request.
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, if the server has it.
    pub base_allocation: Option<u32>,
    /// Context id of `qemu:allocation-depth`, if the server has it.
    pub allocation_depth: Option<u32>,
}

impl ExportInfo {
    /// Whether the export has transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.has(NBD_FLAG_READ_ONLY)
    }

    /// The largest READ/WRITE payload we send.
    pub fn max_io(&self) -> u32 {
        self.max_block.clamp(1, MAX_IO)
    }
}

fn rep_name(code: u32) -> &'static str {
    match code {
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        NBD_REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown error reply",
    }
}

/// One option reply: type and payload (bounded).
#[derive(Debug)]
struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), Error> {
    let len =
        u32::try_from(data.len()).map_err(|_| Error::Protocol("option payload too long".into()))?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 + data.len());
    buf.put_u64(IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(len);
    buf.put_slice(data);
    s.write_all(&buf).await?;
    s.flush().await?;
    Ok(())
}

async fn recv_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<OptionReply, Error> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).await?;
    // 8 + 4 + 4 + 4 bytes: the array's type fixes the length, so `Buf`
    // cannot run short here.
    let mut h = &head[..];
    let magic = h.get_u64();
    let opt = h.get_u32();
    let kind = h.get_u32();
    let len = h.get_u32();
    if magic != NBD_REP_MAGIC {
        return Err(Error::Protocol(format!(
            "bad option reply magic {magic:#x} for {}",
            option_name(option)
        )));
    }
    if opt != option {
        return Err(Error::Protocol(format!(
            "reply to option {opt} while waiting for {}",
            option_name(option)
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(Error::Protocol(format!(
            "option reply of {len} bytes to {} (limit {MAX_OPTION_REPLY})",
            option_name(option)
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok(OptionReply { kind, data })
}

fn refused(option: u32, reply: &OptionReply) -> Error {
    let text = reply.data.get(..MAX_MESSAGE).unwrap_or(&reply.data);
    Error::OptionRefused {
        option: option_name(option),
        reason: rep_name(reply.kind),
        message: String::from_utf8_lossy(text).trim_end().to_string(),
    }
}

/// Run the handshake for `export` on a fresh connection.
///
/// # Errors
/// Not an NBD server, no fixed newstyle, the export refused or unknown,
/// malformed or oversized replies, I/O failures.
pub async fn negotiate<S>(s: &mut S, export: &str) -> Result<ExportInfo, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await?;
    // 8 + 8 + 2 bytes, fixed by the array's type.
    let mut g = &greeting[..];
    let magic = g.get_u64();
    let opt_magic = g.get_u64();
    let server_flags = g.get_u16();
    if magic != NBDMAGIC {
        return Err(Error::Protocol(format!(
            "not an NBD server (magic {magic:#x})"
        )));
    }
    if opt_magic != IHAVEOPT {
        return Err(Error::Protocol(
            "server does not speak newstyle negotiation".into(),
        ));
    }
    if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Protocol(
            "server does not support fixed newstyle negotiation".into(),
        ));
    }
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if server_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    s.write_u32(client_flags).await?;

    // Structured replies: needed for sparse reads and block status.
    send_option(s, NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    let reply = recv_reply(s, NBD_OPT_STRUCTURED_REPLY).await?;
    let structured = match reply.kind {
        NBD_REP_ACK if reply.data.is_empty() => true,
        NBD_REP_ACK => return Err(Error::Protocol("ACK with a payload".into())),
        k if k & NBD_REP_FLAG_ERROR != 0 => {
            tracing::info!(reason = rep_name(k), "NBD server has no structured replies");
            false
        }
        k => {
            return Err(Error::Protocol(format!(
                "unexpected reply {k} to NBD_OPT_STRUCTURED_REPLY"
            )));
        }
    };

    let name = export.as_bytes();
    let name_len =
        u32::try_from(name.len()).map_err(|_| Error::Protocol("export name too long".into()))?;
    let (mut base_allocation, mut allocation_depth) = (None, None);
    if structured {
        let queries = [BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH];
        let mut data: Vec<u8> = Vec::new();
        data.put_u32(name_len);
        data.put_slice(name);
        data.put_u32(queries.len() as u32);
        for q in queries {
            data.put_u32(q.len() as u32);
            data.put_slice(q.as_bytes());
        }
        send_option(s, NBD_OPT_SET_META_CONTEXT, &data).await?;
        let mut done = false;
        for _ in 0..MAX_REPLIES {
            let reply = recv_reply(s, NBD_OPT_SET_META_CONTEXT).await?;
            match reply.kind {
                NBD_REP_META_CONTEXT => {
                    let mut r = Reader::new(&reply.data);
                    let id = r.u32().map_err(|_| {
                        Error::Protocol("meta context reply shorter than 4 bytes".into())
                    })?;
                    let ctx = String::from_utf8_lossy(r.rest());
                    match &*ctx {
                        BASE_ALLOCATION => base_allocation = Some(id),
                        QEMU_ALLOCATION_DEPTH => allocation_depth = Some(id),
                        other => {
                            return Err(Error::Protocol(format!(
                                "server selected meta context {other:?} that was not asked"
                            )));
                        }
                    }
                }
                NBD_REP_ACK => {
                    done = true;
                    break;
                }
                k if k & NBD_REP_FLAG_ERROR != 0 => {
                    tracing::info!(reason = rep_name(k), "NBD server has no meta contexts");
                    done = true;
                    break;
                }
                k => {
                    return Err(Error::Protocol(format!(
                        "unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"
                    )));
                }
            }
        }
        if !done {
            return Err(Error::Protocol(
                "too many replies to NBD_OPT_SET_META_CONTEXT".into(),
            ));
        }
        if base_allocation.is_some() && base_allocation == allocation_depth {
            return Err(Error::Protocol("two meta contexts share one id".into()));
        }
    }

    // GO: export name, no information requests (we honour no block size
    // constraints; qemu-nbd's minimum is 1).
    let mut data: Vec<u8> = Vec::new();
    data.put_u32(name_len);
    data.put_slice(name);
    data.put_u16(0);
    send_option(s, NBD_OPT_GO, &data).await?;
    let mut size_flags = None;
    let (mut min_block, mut preferred_block, mut max_block) = (1, 4096, MAX_IO);
    for _ in 0..MAX_REPLIES {
        let reply = recv_reply(s, NBD_OPT_GO).await?;
        match reply.kind {
            NBD_REP_ACK => {
                let Some((size, flags)) = size_flags else {
                    return Err(Error::Protocol(
                        "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
                    ));
                };
                return Ok(ExportInfo {
                    size,
                    flags,
                    min_block,
                    preferred_block,
                    max_block,
                    structured,
                    base_allocation,
                    allocation_depth,
                });
            }
            NBD_REP_INFO => {
                let d = &reply.data;
                let mut r = Reader::new(d);
                let info = r
                    .u16()
                    .map_err(|_| Error::Protocol("NBD_REP_INFO shorter than 2 bytes".into()))?;
                match info {
                    NBD_INFO_EXPORT => {
                        // Exactly 12 bytes: type, size, flags.
                        let (Ok(size), Ok(flags), Ok(())) = (r.u64(), r.u16(), r.finish()) else {
                            return Err(Error::Protocol(format!(
                                "NBD_INFO_EXPORT of {} bytes",
                                d.len()
                            )));
                        };
                        size_flags = Some((size, flags));
                    }
                    NBD_INFO_BLOCK_SIZE => {
                        // Exactly 14 bytes: type, minimum, preferred, maximum.
                        let (Ok(min), Ok(pref), Ok(max), Ok(())) =
                            (r.u32(), r.u32(), r.u32(), r.finish())
                        else {
                            return Err(Error::Protocol(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes",
                                d.len()
                            )));
                        };
                        if min == 0 || max < min {
                            return Err(Error::Protocol(format!(
                                "bad block sizes min {min} preferred {pref} max {max}"
                            )));
                        }
                        (min_block, preferred_block, max_block) = (min, pref, max);
                    }
                    // Name, description and others: not needed.
                    _ => {}
                }
            }
            k if k & NBD_REP_FLAG_ERROR != 0 => return Err(refused(NBD_OPT_GO, &reply)),
            k => {
                return Err(Error::Protocol(format!(
                    "unexpected reply {k} to NBD_OPT_GO"
                )));
            }
        }
    }
    Err(Error::Protocol("too many replies to NBD_OPT_GO".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = NBD_REP_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn greeting() -> Vec<u8> {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
        b
    }

    /// Run the handshake against canned server bytes (what the client
    /// sends is drained and ignored).
    async fn against(server: Vec<u8>) -> Result<ExportInfo, Error> {
        let (mut client, mut peer) = duplex(1 << 20);
        let feeder = tokio::spawn(async move {
            let _ = peer.write_all(&server).await;
            // EOF after the canned bytes: a short server errors, never hangs.
            let _ = peer.shutdown().await;
            let mut sink = vec![0u8; 4096];
            while matches!(peer.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let r = negotiate(&mut client, "").await;
        drop(client);
        let _ = feeder.await;
        r
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut d = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d
    }

    #[tokio::test]
    async fn full_handshake() {
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        let mut ctx = 5u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        s.extend(option_reply(
            NBD_OPT_SET_META_CONTEXT,
            NBD_REP_META_CONTEXT,
            &ctx,
        ));
        s.extend(option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        s.extend(option_reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &export_info(1 << 20, 0x4d),
        ));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let info = against(s).await.unwrap();
        assert_eq!(info.size, 1 << 20);
        assert!(info.structured);
        assert_eq!(info.base_allocation, Some(5));
        assert_eq!(info.allocation_depth, None);
    }

    #[tokio::test]
    async fn hostile_handshakes_fail_cleanly() {
        // Oversized option reply.
        let mut s = greeting();
        let mut big = option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]);
        big[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        s.extend(big);
        let e = against(s).await.unwrap_err().to_string();
        assert!(e.contains("option reply of 4294967295 bytes"), "{e}");

        // Reply to another option.
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        assert!(against(s).await.is_err());

        // GO acknowledged without the export info.
        let mut s = greeting();
        s.extend(option_reply(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_UNSUP,
            &[],
        ));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let e = against(s).await.unwrap_err().to_string();
        assert!(e.contains("without NBD_INFO_EXPORT"), "{e}");

        // Unknown export: the server's message is kept.
        let mut s = greeting();
        s.extend(option_reply(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_UNSUP,
            &[],
        ));
        s.extend(option_reply(
            NBD_OPT_GO,
            NBD_REP_ERR_UNKNOWN,
            b"export 'x' not present",
        ));
        let e = against(s).await.unwrap_err().to_string();
        assert_eq!(
            e,
            "NBD server refused NBD_OPT_GO: NBD_REP_ERR_UNKNOWN (no such export): export 'x' not present"
        );

        // Endless INFO replies.
        let mut s = greeting();
        s.extend(option_reply(
            NBD_OPT_STRUCTURED_REPLY,
            NBD_REP_ERR_UNSUP,
            &[],
        ));
        for _ in 0..100 {
            s.extend(option_reply(NBD_OPT_GO, NBD_REP_INFO, &export_info(1, 1)));
        }
        let e = against(s).await.unwrap_err().to_string();
        assert!(e.contains("too many replies"), "{e}");

        // Not an NBD server; a truncated greeting.
        assert!(
            against(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec())
                .await
                .is_err()
        );
        assert!(against(greeting()[..10].to_vec()).await.is_err());
    }
}
