//! A modern NBD server: fixed newstyle handshake, simple and structured
//! replies, extended headers, metadata contexts, many requests in flight.
//!
//! It knows nothing of HTTP or oVirt: it validates requests against an
//! [`Export`] and calls its [`Backend`](crate::backend::Backend).
//!
//! - [`handshake`]: greeting and the option loop.
//! - [`transmission`]: requests, replies, the in-flight machinery.
//! - [`listener`]: the accept loop.

pub mod consts;
pub mod error;
pub mod export;
pub mod fuzzing;
pub mod handshake;
pub mod listener;
pub mod mode;
pub mod stats;
pub mod transmission;

pub use export::{Export, Exports};
pub use listener::Listener;
pub use transmission::{End, TransmissionConfig, Watch};

use crate::backend::Backend;
use crate::shutdown::Shutdown;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tracing::Instrument;

/// Read buffer of a connection.
const READ_BUFFER: usize = 256 * 1024;

/// A request the server answered, as an [`Observer`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// The command (`NBD_CMD_*`).
    pub command: u16,
    /// Offset.
    pub offset: u64,
    /// The length asked for; for BLOCK_STATUS, the length the reply
    /// described.
    pub len: u64,
    /// Answered without error (false too when validation refused it).
    pub ok: bool,
}

/// Told when connections come and go and of every answered request (the
/// transfer session listens). Calls come from the connections' tasks and
/// must not block for long.
pub trait Observer: Send + Sync + 'static {
    /// A client finished the handshake and entered transmission.
    fn connected(&self, _conn: u64) {}
    /// A request of `conn` was answered (before its reply is sent); every
    /// request of a connection is reported before its `disconnected`.
    fn answered(&self, _conn: u64, _request: &Answered) {}
    /// A client left transmission, how it ended (None: the server dropped
    /// it for a protocol error, or its socket failed).
    fn disconnected(&self, _conn: u64, _end: Option<End>) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}

/// An NBD server over a set of exports.
pub struct Server<B> {
    exports: Exports<B>,
    config: TransmissionConfig,
    shutdown: Shutdown,
    observer: Arc<dyn Observer>,
}

impl<B> std::fmt::Debug for Server<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish()
    }
}

impl<B: Backend> Server<B> {
    /// A server for `exports` that stops when `shutdown` fires.
    pub fn new(exports: Exports<B>, shutdown: Shutdown) -> Self {
        Server {
            exports,
            config: TransmissionConfig::default(),
            shutdown,
            observer: Arc::new(NoObserver),
        }
    }

    /// Set the in-flight limits.
    pub fn with_config(mut self, config: TransmissionConfig) -> Self {
        self.config = config;
        self
    }

    /// Report connections to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// The exports.
    pub fn exports(&self) -> &Exports<B> {
        &self.exports
    }

    /// The shutdown signal.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Serve `listener` until shutdown, then wait for connections to finish.
    pub async fn serve(self: Arc<Self>, listener: Listener) {
        listener::accept_loop(self, listener).await;
    }

    /// Serve one connection from handshake to close. Errors end only this
    /// connection and are logged here.
    pub async fn handle<R, W>(&self, conn: u64, peer: String, reader: R, writer: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let span = tracing::info_span!("conn", conn, peer = %peer);
        async move {
            let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
            let mut writer = writer;
            let negotiated =
                match handshake::negotiate(&mut reader, &mut writer, &self.exports, &self.shutdown)
                    .await
                {
                    Ok(Some(n)) => n,
                    Ok(None) => {
                        tracing::debug!("closed during handshake");
                        return;
                    }
                    Err(e) => {
                        log_protocol_error(&e, "handshake");
                        return;
                    }
                };
            tracing::debug!(
                export = negotiated.export.name(),
                mode = ?negotiated.mode,
                flags = negotiated.flags,
                "transmission"
            );
            self.observer.connected(conn);
            let watch = Watch {
                observer: Arc::clone(&self.observer),
                conn,
            };
            let end = transmission::run(
                reader,
                writer,
                negotiated,
                self.config,
                self.shutdown.clone(),
                watch,
            )
            .await;
            match &end {
                Ok(how) => tracing::debug!(?how, "closed"),
                Err(e) => log_protocol_error(e, "transmission"),
            }
            self.observer.disconnected(conn, end.ok());
        }
        .instrument(span)
        .await;
    }
}

fn log_protocol_error(e: &error::ProtocolError, phase: &str) {
    if e.is_disconnect() {
        tracing::debug!(error = %e, phase, "client went away");
    } else {
        tracing::info!(error = %e, phase, "closing connection");
    }
}
