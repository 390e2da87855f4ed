//! The client side of the fixed newstyle handshake: STRUCTURED_REPLY,
//! LIST_META_CONTEXT (`qemu:dirty-bitmap:`, only when asked for),
//! SET_META_CONTEXT (`base:allocation`, `qemu:allocation-depth`, the dirty
//! bitmap, extra contexts), GO.

use super::{Error, MAX_CONTEXT_NAME, MAX_EXTRA_CONTEXTS, MAX_IO, MAX_MESSAGE, MAX_OPTION_REPLY};
use crate::nbd::consts::*;
use crate::wire::Reader;
use bytes::{Buf, BufMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// qemu's allocation depth context: 0 = not allocated in any layer.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Most replies accepted to one option (a server cannot loop us forever).
const MAX_REPLIES: usize = 64;
/// Most replies accepted to NBD_OPT_LIST_META_CONTEXT: only the first
/// listed name is kept, so a long list costs time, not memory.
const MAX_LIST_REPLIES: usize = 4096;

/// What to negotiate besides `base:allocation` and
/// `qemu:allocation-depth` (which are always asked for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Find the export's dirty bitmap the way ovirt-imageio does for a
    /// ticket with `"dirty": true`: NBD_OPT_LIST_META_CONTEXT with the
    /// query `qemu:dirty-bitmap:` (qemu-nbd lists the bitmap of `-B NAME`
    /// as `qemu:dirty-bitmap:NAME`); when exactly one is listed it is
    /// selected too and becomes [`ExportInfo::dirty_bitmap`]. None or
    /// several: no dirty bitmap (not an error).
    pub dirty_bitmap: bool,
    /// More contexts to select by their exact names (for example
    /// `qemu:dirty-bitmap:b1`): at most [`MAX_EXTRA_CONTEXTS`], each
    /// 1 to [`MAX_CONTEXT_NAME`] bytes. The server may not have them:
    /// see [`ExportInfo::contexts`] for what it selected.
    pub contexts: Vec<String>,
}

/// A meta context the server selected, and the id its block status
/// chunks carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The id in NBD_REPLY_TYPE_BLOCK_STATUS chunks.
    pub id: u32,
    /// The full name (`base:allocation`, `qemu:dirty-bitmap:b1`, ...).
    pub name: String,
}

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
    /// Context id of the dirty bitmap found with
    /// [`ConnectOptions::dirty_bitmap`], if the server listed exactly one
    /// and selected it.
    pub dirty_bitmap: Option<u32>,
    /// Every context the server selected, in its order (ids and names
    /// unique; at most the number asked for).
    pub contexts: Vec<MetaContext>,
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

    /// The name of selected context `id`.
    pub fn context_name(&self, id: u32) -> Option<&str> {
        self.contexts
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.name.as_str())
    }

    /// The id of selected context `name`.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }

    /// The full name of the dirty bitmap context
    /// (`qemu:dirty-bitmap:NAME`), if one was selected.
    pub fn dirty_bitmap_name(&self) -> Option<&str> {
        self.dirty_bitmap.and_then(|id| self.context_name(id))
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

/// A context id and name from an NBD_REP_META_CONTEXT payload (the name
/// must be UTF-8 and at most [`MAX_CONTEXT_NAME`] bytes).
fn parse_meta_context(data: &[u8]) -> Result<MetaContext, Error> {
    let mut r = Reader::new(data);
    let id = r
        .u32()
        .map_err(|_| Error::Protocol("meta context reply shorter than 4 bytes".into()))?;
    let name = r.rest();
    if name.len() > MAX_CONTEXT_NAME {
        return Err(Error::Protocol(format!(
            "meta context name of {} bytes (limit {MAX_CONTEXT_NAME})",
            name.len()
        )));
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| Error::Protocol("meta context name is not UTF-8".into()))?;
    Ok(MetaContext {
        id,
        name: name.to_string(),
    })
}

/// The payload of LIST_META_CONTEXT and SET_META_CONTEXT: export name,
/// then the queries.
fn meta_context_data(export: &[u8], queries: &[&str]) -> Result<Vec<u8>, Error> {
    let too_long = || Error::Protocol("meta context request too long".into());
    let mut data: Vec<u8> = Vec::new();
    data.put_u32(u32::try_from(export.len()).map_err(|_| too_long())?);
    data.put_slice(export);
    data.put_u32(u32::try_from(queries.len()).map_err(|_| too_long())?);
    for q in queries {
        data.put_u32(u32::try_from(q.len()).map_err(|_| too_long())?);
        data.put_slice(q.as_bytes());
    }
    Ok(data)
}

/// imageio's `_query_dirty_bitmap`: list the contexts matching
/// `qemu:dirty-bitmap:`; the one name when exactly one is listed. A server
/// without LIST_META_CONTEXT (NBD_REP_ERR_UNSUP) has none; other refusals
/// fail the handshake, as they do in imageio.
async fn list_dirty_bitmap<S>(s: &mut S, export: &[u8]) -> Result<Option<String>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let option = NBD_OPT_LIST_META_CONTEXT;
    send_option(s, option, &meta_context_data(export, &[QEMU_DIRTY_BITMAP])?).await?;
    let mut first: Option<String> = None;
    let mut listed = 0usize;
    for _ in 0..MAX_LIST_REPLIES {
        let reply = recv_reply(s, option).await?;
        match reply.kind {
            NBD_REP_META_CONTEXT => {
                let ctx = parse_meta_context(&reply.data)?;
                if !ctx.name.starts_with(QEMU_DIRTY_BITMAP) {
                    return Err(Error::Protocol(format!(
                        "server listed meta context {:?} for the query {QEMU_DIRTY_BITMAP:?}",
                        ctx.name
                    )));
                }
                listed += 1;
                if first.is_none() {
                    first = Some(ctx.name);
                }
            }
            NBD_REP_ACK if reply.data.is_empty() => {
                return Ok(match listed {
                    1 => {
                        tracing::debug!(bitmap = ?first, "NBD server has a dirty bitmap");
                        first
                    }
                    0 => {
                        tracing::info!("NBD server has no dirty bitmap");
                        None
                    }
                    n => {
                        tracing::warn!(
                            count = n,
                            "NBD server has several dirty bitmaps, using none"
                        );
                        None
                    }
                });
            }
            NBD_REP_ACK => return Err(Error::Protocol("ACK with a payload".into())),
            NBD_REP_ERR_UNSUP => {
                tracing::info!("NBD server cannot list meta contexts");
                return Ok(None);
            }
            k if k & NBD_REP_FLAG_ERROR != 0 => return Err(refused(option, &reply)),
            k => {
                return Err(Error::Protocol(format!(
                    "unexpected reply {k} to NBD_OPT_LIST_META_CONTEXT"
                )));
            }
        }
    }
    Err(Error::Protocol(
        "too many replies to NBD_OPT_LIST_META_CONTEXT".into(),
    ))
}

/// Select `queries`; the contexts the server selected (each one asked
/// for, ids and names unique). A refusal leaves the ones selected before
/// it, like imageio.
async fn set_meta_context<S>(
    s: &mut S,
    export: &[u8],
    queries: &[&str],
) -> Result<Vec<MetaContext>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let option = NBD_OPT_SET_META_CONTEXT;
    send_option(s, option, &meta_context_data(export, queries)?).await?;
    let mut contexts: Vec<MetaContext> = Vec::new();
    for _ in 0..MAX_REPLIES {
        let reply = recv_reply(s, option).await?;
        match reply.kind {
            NBD_REP_META_CONTEXT => {
                let ctx = parse_meta_context(&reply.data)?;
                if !queries.contains(&ctx.name.as_str()) {
                    return Err(Error::Protocol(format!(
                        "server selected meta context {:?} that was not asked",
                        ctx.name
                    )));
                }
                if contexts.iter().any(|c| c.id == ctx.id) {
                    return Err(Error::Protocol("two meta contexts share one id".into()));
                }
                if contexts.iter().any(|c| c.name == ctx.name) {
                    return Err(Error::Protocol(format!(
                        "meta context {:?} selected twice",
                        ctx.name
                    )));
                }
                contexts.push(ctx);
            }
            NBD_REP_ACK if reply.data.is_empty() => return Ok(contexts),
            NBD_REP_ACK => return Err(Error::Protocol("ACK with a payload".into())),
            k if k & NBD_REP_FLAG_ERROR != 0 => {
                tracing::info!(reason = rep_name(k), "NBD server has no meta contexts");
                return Ok(contexts);
            }
            k => {
                return Err(Error::Protocol(format!(
                    "unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"
                )));
            }
        }
    }
    Err(Error::Protocol(
        "too many replies to NBD_OPT_SET_META_CONTEXT".into(),
    ))
}

/// Run the handshake for `export` on a fresh connection, selecting the
/// meta contexts of `options` too.
///
/// # Errors
/// Not an NBD server, no fixed newstyle, the export refused or unknown,
/// malformed or oversized replies, I/O failures; `options` with too many
/// or oversized context names ([`Error::Unsupported`]).
pub async fn negotiate_with<S>(
    s: &mut S,
    export: &str,
    options: &ConnectOptions,
) -> Result<ExportInfo, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if options.contexts.len() > MAX_EXTRA_CONTEXTS {
        return Err(Error::Unsupported("more than 8 extra meta contexts"));
    }
    if options
        .contexts
        .iter()
        .any(|c| c.is_empty() || c.len() > MAX_CONTEXT_NAME)
    {
        return Err(Error::Unsupported(
            "meta context names that are empty or longer than 4096 bytes",
        ));
    }
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
    let mut contexts: Vec<MetaContext> = Vec::new();
    let mut dirty_bitmap = None;
    if structured {
        // Like imageio: the bitmap's name first (only for dirty tickets),
        // then one SET_META_CONTEXT for everything.
        let bitmap = if options.dirty_bitmap {
            list_dirty_bitmap(s, name).await?
        } else {
            None
        };
        let mut queries: Vec<&str> = vec![BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH];
        for q in bitmap.iter().chain(options.contexts.iter()) {
            if !queries.contains(&q.as_str()) {
                queries.push(q.as_str());
            }
        }
        contexts = set_meta_context(s, name, &queries).await?;
        dirty_bitmap = bitmap
            .as_deref()
            .and_then(|b| contexts.iter().find(|c| c.name == b).map(|c| c.id));
        for q in &queries {
            if !contexts.iter().any(|c| c.name == *q) {
                tracing::debug!(context = %q, "NBD meta context not available");
            }
        }
    }
    let find = |name: &str| contexts.iter().find(|c| c.name == name).map(|c| c.id);
    let base_allocation = find(BASE_ALLOCATION);
    let allocation_depth = find(QEMU_ALLOCATION_DEPTH);

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
                    dirty_bitmap,
                    contexts,
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
        let r = negotiate_with(&mut client, "", &ConnectOptions::default()).await;
        drop(client);
        let _ = feeder.await;
        r
    }

    /// Like [`against`] with `options`; also what the client sent.
    async fn session(
        server: Vec<u8>,
        options: ConnectOptions,
    ) -> (Result<ExportInfo, Error>, Vec<u8>) {
        let (mut client, mut peer) = duplex(1 << 20);
        let feeder = tokio::spawn(async move {
            let _ = peer.write_all(&server).await;
            let _ = peer.shutdown().await;
            let mut sent = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Ok(n @ 1..) = peer.read(&mut buf).await {
                sent.extend_from_slice(buf.get(..n).unwrap_or_default());
            }
            sent
        });
        let r = negotiate_with(&mut client, "", &options).await;
        drop(client);
        let sent = feeder.await.unwrap_or_default();
        (r, sent)
    }

    fn meta(id: u32, name: &str) -> Vec<u8> {
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d
    }

    /// A qemu-nbd -B handshake: structured replies, LIST answered with
    /// `listed`, SET answered with `selected`, then GO.
    fn dirty_server(listed: &[&str], selected: &[(u32, &str)]) -> Vec<u8> {
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        for name in listed {
            s.extend(option_reply(
                NBD_OPT_LIST_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                &meta(0, name),
            ));
        }
        s.extend(option_reply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ACK, &[]));
        for (id, name) in selected {
            s.extend(option_reply(
                NBD_OPT_SET_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                &meta(*id, name),
            ));
        }
        s.extend(option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        s.extend(option_reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &export_info(1 << 20, 0x4d),
        ));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        s
    }

    fn dirty() -> ConnectOptions {
        ConnectOptions {
            dirty_bitmap: true,
            contexts: Vec::new(),
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Whether the client sent option `opt` (its header's magic and code).
    fn sent_option(sent: &[u8], opt: u32) -> bool {
        let mut head = IHAVEOPT.to_be_bytes().to_vec();
        head.extend_from_slice(&opt.to_be_bytes());
        contains(sent, &head)
    }

    #[tokio::test]
    async fn dirty_bitmap_is_listed_then_selected() {
        let server = dirty_server(
            &["qemu:dirty-bitmap:b1"],
            &[(0, "base:allocation"), (2, "qemu:dirty-bitmap:b1")],
        );
        let (r, sent) = session(server, dirty()).await;
        let info = r.unwrap();
        assert_eq!(info.base_allocation, Some(0));
        assert_eq!(info.allocation_depth, None);
        assert_eq!(info.dirty_bitmap, Some(2));
        assert_eq!(info.dirty_bitmap_name(), Some("qemu:dirty-bitmap:b1"));
        assert_eq!(info.context_name(0), Some("base:allocation"));
        assert_eq!(info.context_id("qemu:dirty-bitmap:b1"), Some(2));
        assert_eq!(info.contexts.len(), 2);
        // LIST asked for the prefix, SET for the listed name.
        assert!(sent_option(&sent, NBD_OPT_LIST_META_CONTEXT));
        assert!(contains(&sent, b"qemu:dirty-bitmap:b1"));
    }

    #[tokio::test]
    async fn no_or_several_bitmaps_select_none() {
        const NONE: &[&str] = &[];
        const TWO: &[&str] = &["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"];
        for listed in [NONE, TWO] {
            let server = dirty_server(listed, &[(0, "base:allocation")]);
            let (r, sent) = session(server, dirty()).await;
            let info = r.unwrap();
            assert_eq!(info.dirty_bitmap, None, "{listed:?}");
            assert_eq!(info.base_allocation, Some(0));
            assert!(!contains(&sent, b"qemu:dirty-bitmap:a"), "{listed:?}");
        }
        // A server without LIST_META_CONTEXT.
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        s.extend(option_reply(
            NBD_OPT_LIST_META_CONTEXT,
            NBD_REP_ERR_UNSUP,
            &[],
        ));
        s.extend(option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        s.extend(option_reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &export_info(1 << 20, 0x4d),
        ));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let info = session(s, dirty()).await.0.unwrap();
        assert_eq!((info.dirty_bitmap, info.base_allocation), (None, None));
        // Without `dirty_bitmap` nothing is listed.
        let server = dirty_server(&[], &[(0, "base:allocation")]);
        let (r, sent) = session(server, ConnectOptions::default()).await;
        // The canned LIST reply now answers SET: refused as a reply to
        // another option.
        assert!(r.is_err());
        assert!(!sent_option(&sent, NBD_OPT_LIST_META_CONTEXT));
        assert!(sent_option(&sent, NBD_OPT_SET_META_CONTEXT));
    }

    #[tokio::test]
    async fn extra_contexts_are_selected_by_name() {
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        for (id, name) in [(0, "base:allocation"), (7, "qemu:dirty-bitmap:x")] {
            s.extend(option_reply(
                NBD_OPT_SET_META_CONTEXT,
                NBD_REP_META_CONTEXT,
                &meta(id, name),
            ));
        }
        s.extend(option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]));
        s.extend(option_reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &export_info(1 << 20, 0x4d),
        ));
        s.extend(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let options = ConnectOptions {
            dirty_bitmap: false,
            contexts: vec!["qemu:dirty-bitmap:x".into()],
        };
        let (r, sent) = session(s, options).await;
        let info = r.unwrap();
        assert_eq!(info.context_id("qemu:dirty-bitmap:x"), Some(7));
        // Asked by name, not found by listing: not "the" dirty bitmap.
        assert_eq!(info.dirty_bitmap, None);
        assert!(contains(&sent, b"qemu:dirty-bitmap:x"));

        // Too many or oversized names are refused before any I/O.
        let many = ConnectOptions {
            dirty_bitmap: false,
            contexts: vec!["a:b".to_string(); MAX_EXTRA_CONTEXTS + 1],
        };
        assert!(matches!(
            session(greeting(), many).await.0,
            Err(Error::Unsupported(_))
        ));
        let long = ConnectOptions {
            dirty_bitmap: false,
            contexts: vec!["x".repeat(MAX_CONTEXT_NAME + 1)],
        };
        assert!(matches!(
            session(greeting(), long).await.0,
            Err(Error::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn hostile_meta_context_replies() {
        // A listed name outside the query.
        let server = dirty_server(&["base:allocation"], &[]);
        let e = session(server, dirty()).await.0.unwrap_err().to_string();
        assert!(e.contains("for the query"), "{e}");
        // A selected context that was not asked for.
        let server = dirty_server(&["qemu:dirty-bitmap:b1"], &[(1, "qemu:dirty-bitmap:b2")]);
        let e = session(server, dirty()).await.0.unwrap_err().to_string();
        assert!(e.contains("was not asked"), "{e}");
        // Two contexts with one id; one context twice.
        let server = dirty_server(
            &["qemu:dirty-bitmap:b1"],
            &[(1, "base:allocation"), (1, "qemu:dirty-bitmap:b1")],
        );
        let e = session(server, dirty()).await.0.unwrap_err().to_string();
        assert!(e.contains("share one id"), "{e}");
        let server = dirty_server(&[], &[(1, "base:allocation"), (2, "base:allocation")]);
        let e = session(server, dirty()).await.0.unwrap_err().to_string();
        assert!(e.contains("selected twice"), "{e}");
        // A name that is not UTF-8.
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        let mut bad = 0u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"qemu:dirty-bitmap:");
        bad.push(0xff);
        s.extend(option_reply(
            NBD_OPT_LIST_META_CONTEXT,
            NBD_REP_META_CONTEXT,
            &bad,
        ));
        let e = session(s, dirty()).await.0.unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        // Endless LIST replies end with an error, not a hang.
        let mut s = greeting();
        s.extend(option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]));
        let one = option_reply(
            NBD_OPT_LIST_META_CONTEXT,
            NBD_REP_META_CONTEXT,
            &meta(0, "qemu:dirty-bitmap:b"),
        );
        for _ in 0..=MAX_LIST_REPLIES {
            s.extend_from_slice(&one);
        }
        let e = session(s, dirty()).await.0.unwrap_err().to_string();
        assert!(e.contains("too many replies"), "{e}");
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
