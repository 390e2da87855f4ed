//! The fixed-newstyle handshake: greeting, client flags, and a bounded
//! option loop ending in transmission (GO / EXPORT_NAME) or a close.

pub mod meta;
pub mod option;
pub mod policy;
pub mod reply;

use self::meta::{MetaSelection, context_id, match_list, match_set};
use self::option::{InfoRequest, MetaRequest, OptionRequest, parse_option};
use self::policy::{TlsGate, tls_gate};
use self::reply::*;
use super::consts::*;
use super::error::ProtocolError;
use super::export::{Export, Exports};
use super::mode::ReplyMode;
use super::tls::{ServerTls, TlsMode};
use crate::backend::Backend;
use crate::shutdown::Shutdown;
use bytes::{Buf, BufMut, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest option payload accepted; a longer one ends the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most options one connection may send before transmission (STARTTLS
/// included: the count goes on over TLS).
pub const MAX_OPTIONS: usize = 128;
/// How long a client may take from connecting to entering transmission
/// (qemu-nbd's `--handshake-limit` default).
pub const DEFAULT_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Settings of the handshake phase, the same for every connection.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    /// TLS mode and credentials; `None`: no TLS (STARTTLS gets ERR_UNSUP).
    pub tls: Option<ServerTls>,
    /// A connection that has not entered transmission by then is closed;
    /// `None`: no limit.
    pub limit: Option<Duration>,
}

impl Default for HandshakeOptions {
    fn default() -> Self {
        HandshakeOptions {
            tls: None,
            limit: Some(DEFAULT_HANDSHAKE_LIMIT),
        }
    }
}

impl HandshakeOptions {
    /// Off, On or Require.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls.as_ref().map_or(TlsMode::Off, ServerTls::mode)
    }
}

/// What the handshake agreed on.
#[derive(Debug)]
pub struct Negotiated<B> {
    /// The export chosen.
    pub export: Arc<Export<B>>,
    /// The reply style.
    pub mode: ReplyMode,
    /// Selected metadata contexts.
    pub meta: MetaSelection,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// What survives STARTTLS: the client's flags, the option budget, whether
/// TLS is up. Everything else is negotiated again over TLS.
#[derive(Debug, Clone)]
pub struct Session {
    no_zeroes: bool,
    options: usize,
    tls: bool,
}

impl Session {
    /// Whether TLS is up.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Mark TLS as up (after a successful TLS handshake).
    pub fn set_tls(&mut self) {
        self.tls = true;
    }
}

/// How an option loop ended.
#[derive(Debug)]
pub enum Outcome<B> {
    /// GO or EXPORT_NAME: enter transmission.
    Transmission(Negotiated<B>),
    /// The client aborted or left, or was refused.
    Closed,
    /// STARTTLS was acknowledged: run the TLS handshake on the stream, then
    /// [`negotiate`] again over TLS.
    StartTls,
}

/// Send the greeting and read the client flags. `Ok(None)`: the client
/// left, or cannot do what `tls` requires (fixed newstyle).
///
/// # Errors
/// Unknown client flags, or the socket failed.
pub async fn greet<S>(stream: &mut S, tls: TlsMode) -> Result<Option<Session>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = match stream.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::violation(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if tls == TlsMode::Require && client_flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        // TLS needs fixed newstyle; without it the client cannot comply.
        tracing::info!("client without fixed newstyle cannot start TLS: closing");
        return Ok(None);
    }
    Ok(Some(Session {
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        options: 0,
        tls: false,
    }))
}

/// Run the option loop over `stream` (the plain socket, or TLS after
/// STARTTLS). Reads exactly what the options hold, never ahead, so nothing
/// sent in plaintext after STARTTLS can be taken for TLS-protected data.
///
/// # Errors
/// The client broke the protocol, sent too much, or the socket failed.
pub async fn negotiate<S, B>(
    stream: &mut S,
    exports: &Exports<B>,
    shutdown: &Shutdown,
    tls: TlsMode,
    session: &mut Session,
) -> Result<Outcome<B>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    let mut state = State {
        exports,
        mode: ReplyMode::Simple,
        meta: MetaSelection::default(),
        no_zeroes: session.no_zeroes,
        out: BytesMut::with_capacity(512),
    };

    while session.options < MAX_OPTIONS {
        session.options += 1;
        let mut head = [0u8; 16];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        }
        let (magic, code, len) = parse_option_header(&head);
        if magic != IHAVEOPT {
            return Err(ProtocolError::violation(format!(
                "bad option magic {magic:#x}"
            )));
        }
        if len > MAX_OPTION_LEN {
            return Err(ProtocolError::TooLarge(format!(
                "{} of {len} bytes (limit {MAX_OPTION_LEN})",
                option_name(code)
            )));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        let request = parse_option(code, &data);
        tracing::debug!(option = option_name(code), len, "option");

        let step = if shutdown.is_triggered() && request != OptionRequest::Abort {
            encode_error(
                &mut state.out,
                code,
                NBD_REP_ERR_SHUTDOWN,
                "server is shutting down",
            );
            Step::Continue
        } else {
            match tls_gate(tls, session.tls, &request) {
                TlsGate::Handle => state.handle(code, request),
                TlsGate::StartTls => {
                    encode_ack(&mut state.out, code);
                    Step::StartTls
                }
                TlsGate::Refuse(error, message) => {
                    tracing::debug!(option = option_name(code), reason = message, "refused");
                    encode_error(&mut state.out, code, error, message);
                    Step::Continue
                }
                TlsGate::Close => {
                    tracing::info!(
                        option = option_name(code),
                        "option before the TLS this server requires: closing"
                    );
                    Step::Close
                }
            }
        };
        if !state.out.is_empty() {
            stream.write_all(&state.out).await?;
            stream.flush().await?;
            state.out.clear();
        }
        match step {
            Step::Continue => {}
            Step::Close => return Ok(Outcome::Closed),
            Step::StartTls => return Ok(Outcome::StartTls),
            Step::Transmission(export) => {
                let flags = export.transmission_flags(state.mode);
                if state.meta.export != export.name() {
                    state.meta = MetaSelection::default();
                }
                return Ok(Outcome::Transmission(Negotiated {
                    export,
                    mode: state.mode,
                    meta: state.meta,
                    flags,
                }));
            }
        }
    }
    Err(ProtocolError::TooLarge(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

/// Magic, option code and payload length.
fn parse_option_header(head: &[u8; 16]) -> (u64, u32, u32) {
    // 8 + 4 + 4 bytes: the array's type fixes the length, so `Buf` cannot
    // run short here.
    let mut b = &head[..];
    let magic = b.get_u64();
    let code = b.get_u32();
    let len = b.get_u32();
    (magic, code, len)
}

enum Step<B> {
    Continue,
    Close,
    StartTls,
    Transmission(Arc<Export<B>>),
}

struct State<'a, B> {
    exports: &'a Exports<B>,
    mode: ReplyMode,
    meta: MetaSelection,
    no_zeroes: bool,
    out: BytesMut,
}

impl<B: Backend> State<'_, B> {
    fn handle(&mut self, code: u32, request: OptionRequest) -> Step<B> {
        match request {
            OptionRequest::ExportName(name) => {
                if self.mode == ReplyMode::Extended {
                    tracing::info!("EXPORT_NAME after EXTENDED_HEADERS: closing");
                    return Step::Close;
                }
                let Some(export) = self.exports.find(&name) else {
                    tracing::info!(export = %name, "unknown export: closing");
                    return Step::Close;
                };
                let export = Arc::clone(export);
                encode_export_name_reply(
                    &mut self.out,
                    export.size(),
                    export.transmission_flags(self.mode),
                    self.no_zeroes,
                );
                Step::Transmission(export)
            }
            OptionRequest::Abort => {
                encode_ack(&mut self.out, code);
                Step::Close
            }
            OptionRequest::List => {
                for export in self.exports.iter() {
                    encode_server(
                        &mut self.out,
                        code,
                        export.name(),
                        export.description().unwrap_or(""),
                    );
                }
                encode_ack(&mut self.out, code);
                Step::Continue
            }
            OptionRequest::StartTls => {
                encode_error(
                    &mut self.out,
                    code,
                    NBD_REP_ERR_UNSUP,
                    "TLS is not supported by this server",
                );
                Step::Continue
            }
            OptionRequest::Info(req) => {
                self.info(code, &req);
                Step::Continue
            }
            OptionRequest::Go(req) => match self.info(code, &req) {
                Some(export) => Step::Transmission(export),
                None => Step::Continue,
            },
            OptionRequest::StructuredReply => {
                if self.mode == ReplyMode::Extended {
                    encode_error(
                        &mut self.out,
                        code,
                        NBD_REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already on",
                    );
                } else {
                    self.mode = ReplyMode::Structured;
                    encode_ack(&mut self.out, code);
                }
                Step::Continue
            }
            OptionRequest::ExtendedHeaders => {
                self.mode = ReplyMode::Extended;
                encode_ack(&mut self.out, code);
                Step::Continue
            }
            OptionRequest::ListMetaContext(req) => {
                self.meta_context(code, &req, false);
                Step::Continue
            }
            OptionRequest::SetMetaContext(req) => {
                self.meta = MetaSelection::default();
                self.meta_context(code, &req, true);
                Step::Continue
            }
            OptionRequest::Malformed {
                code: NBD_OPT_EXPORT_NAME,
                reason,
            } => {
                // EXPORT_NAME has no error reply: a bad name ends the
                // connection.
                tracing::info!(%reason, "bad NBD_OPT_EXPORT_NAME: closing");
                Step::Close
            }
            OptionRequest::Malformed { reason, .. } => {
                tracing::debug!(option = option_name(code), %reason, "malformed option");
                encode_error(&mut self.out, code, NBD_REP_ERR_INVALID, &reason);
                Step::Continue
            }
            OptionRequest::Unknown(_) => {
                encode_error(
                    &mut self.out,
                    code,
                    NBD_REP_ERR_UNSUP,
                    &format!("option {code} is not supported"),
                );
                Step::Continue
            }
        }
    }

    /// Answer INFO / GO; the export when it was found.
    fn info(&mut self, code: u32, req: &InfoRequest) -> Option<Arc<Export<B>>> {
        let Some(export) = self.exports.find(&req.name) else {
            encode_error(
                &mut self.out,
                code,
                NBD_REP_ERR_UNKNOWN,
                &format!("unknown export '{}'", req.name),
            );
            return None;
        };
        let export = Arc::clone(export);
        encode_info_export(
            &mut self.out,
            code,
            export.size(),
            export.transmission_flags(self.mode),
        );
        for &info in &req.requests {
            match info {
                NBD_INFO_NAME => encode_info_text(&mut self.out, code, info, export.name()),
                NBD_INFO_DESCRIPTION => {
                    if let Some(d) = export.description() {
                        encode_info_text(&mut self.out, code, info, d);
                    }
                }
                _ => {}
            }
        }
        // Sent whether asked or not: clients ignore what they did not ask
        // for, and those that care learn our limits.
        let (min, pref, max) = export.block_sizes();
        encode_info_block_size(&mut self.out, code, min, pref, max);
        encode_ack(&mut self.out, code);
        Some(export)
    }

    fn meta_context(&mut self, code: u32, req: &MetaRequest, set: bool) {
        if self.mode < ReplyMode::Structured {
            encode_error(
                &mut self.out,
                code,
                NBD_REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let Some(export) = self.exports.find(&req.name) else {
            encode_error(
                &mut self.out,
                code,
                NBD_REP_ERR_UNKNOWN,
                &format!("unknown export '{}'", req.name),
            );
            return;
        };
        let available = export.contexts();
        if set {
            let export_name = export.name().to_string();
            for name in match_set(&available, &req.queries) {
                let id = context_id(name);
                encode_meta_context(&mut self.out, code, id, name);
                if name == BASE_ALLOCATION {
                    self.meta.allocation = Some(id);
                } else {
                    self.meta.dirty = Some(id);
                }
            }
            self.meta.export = export_name;
        } else {
            for name in match_list(&available, &req.queries) {
                encode_meta_context(&mut self.out, code, 0, name);
            }
        }
        encode_ack(&mut self.out, code);
    }
}
