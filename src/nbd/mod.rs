//! A modern NBD server: fixed newstyle handshake, simple and structured
//! replies, extended headers, metadata contexts, many requests in flight.
//!
//! It knows nothing of HTTP or oVirt: it validates requests against an
//! [`Export`] and calls its [`Backend`](crate::backend::Backend).
//!
//! - [`handshake`]: greeting and the option loop.
//! - [`transmission`]: requests, replies, the in-flight machinery.
//! - [`listener`]: the accept loop.
//! - [`stream`]: the sockets a connection runs over, and how they split.
//! - [`tls`]: NBD TLS (STARTTLS) modes and credentials.

pub mod consts;
pub mod error;
pub mod export;
pub mod fuzzing;
pub mod handshake;
pub mod listener;
pub mod mode;
pub mod stats;
pub mod stream;
pub mod tls;
pub mod transmission;

pub use export::{Export, Exports};
pub use handshake::HandshakeOptions;
pub use listener::Listener;
pub use stream::Stream;
pub use tls::{ServerTls, TlsMode};
pub use transmission::{Budget, End, TransmissionConfig, Watch};

use crate::backend::Backend;
use crate::shutdown::Shutdown;
use error::ProtocolError;
use handshake::{Negotiated, Outcome};
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tracing::Instrument;

/// Read buffer of a connection: request headers are read through it, many
/// at a time; write payloads go around it (see `transmission::read_payload`),
/// so it is small: whatever of a payload a header read pulls in is copied
/// once more.
const READ_BUFFER: usize = 16 * 1024;

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
    /// A client finished the handshake and entered transmission on
    /// `export` (a server of several exports tells them apart here); by
    /// default, [`Observer::connected`].
    fn entered(&self, conn: u64, _export: &str) {
        self.connected(conn);
    }
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
    budget: Budget,
    handshake: HandshakeOptions,
    shutdown: Shutdown,
    observer: Arc<dyn Observer>,
    max_connections: usize,
}

impl<B> std::fmt::Debug for Server<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("handshake", &self.handshake)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl<B: Backend> Server<B> {
    /// A server for `exports` that stops when `shutdown` fires.
    pub fn new(exports: Exports<B>, shutdown: Shutdown) -> Self {
        let config = TransmissionConfig::default();
        Server {
            exports,
            config,
            budget: budget_for(&config),
            handshake: HandshakeOptions::default(),
            shutdown,
            observer: Arc::new(NoObserver),
            max_connections: listener::MAX_CONNECTIONS,
        }
    }

    /// Serve at most `n` clients at once (qemu-nbd's `-e/--shared`); more
    /// wait in the listen backlog.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Most clients served at once.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Set the in-flight limits (a new, shared byte budget).
    pub fn with_config(mut self, config: TransmissionConfig) -> Self {
        self.config = config;
        self.budget = budget_for(&config);
        self
    }

    /// Set TLS and the handshake deadline.
    pub fn with_handshake(mut self, options: HandshakeOptions) -> Self {
        self.handshake = options;
        self
    }

    /// The handshake settings (TLS mode, deadline).
    pub fn handshake_options(&self) -> &HandshakeOptions {
        &self.handshake
    }

    /// The byte budget shared by all connections.
    pub fn budget(&self) -> &Budget {
        &self.budget
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
    /// connection and are logged here. A connection that has not entered
    /// transmission within the handshake limit is closed.
    pub async fn handle<S: Stream>(&self, conn: u64, peer: String, stream: S) {
        let span = tracing::info_span!("conn", conn, peer = %peer);
        async move {
            let shaken = match self.handshake.limit {
                Some(limit) => match tokio::time::timeout(limit, self.handshake(stream)).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::info!(?limit, "handshake not finished in time: closing");
                        return;
                    }
                },
                None => self.handshake(stream).await,
            };
            let (connected, negotiated) = match shaken {
                Ok(Some(c)) => c,
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
                tls = matches!(connected, Connected::Tls(_)),
                "transmission"
            );
            self.observer.entered(conn, negotiated.export.name());
            let end = match connected {
                Connected::Plain(s) => self.transmit(conn, s, negotiated).await,
                Connected::Tls(s) => self.transmit(conn, *s, negotiated).await,
            };
            match &end {
                Ok(how) => tracing::debug!(?how, "closed"),
                Err(e) => log_protocol_error(e, "transmission"),
            }
            self.observer.disconnected(conn, end.ok());
        }
        .instrument(span)
        .await;
    }

    /// Greeting and options, upgrading to TLS on STARTTLS. `Ok(None)`: the
    /// client left or was refused before transmission.
    async fn handshake<S: Stream>(
        &self,
        mut stream: S,
    ) -> Result<Option<(Connected<S>, Negotiated<B>)>, ProtocolError> {
        let mode = self.handshake.tls_mode();
        let Some(mut session) = handshake::greet(&mut stream, mode).await? else {
            return Ok(None);
        };
        let outcome = handshake::negotiate(
            &mut stream,
            &self.exports,
            &self.shutdown,
            mode,
            &mut session,
        )
        .await?;
        match outcome {
            Outcome::Closed => Ok(None),
            Outcome::Transmission(n) => Ok(Some((Connected::Plain(stream), n))),
            Outcome::StartTls => {
                let Some(tls) = &self.handshake.tls else {
                    return Err(ProtocolError::violation("STARTTLS without TLS"));
                };
                let mut stream = match tls.acceptor().accept(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(error = %e, "TLS handshake failed: closing");
                        return Ok(None);
                    }
                };
                session.set_tls();
                {
                    let (_, state) = stream.get_ref();
                    tracing::debug!(
                        version = ?state.protocol_version(),
                        client_certificate = state.peer_certificates().is_some(),
                        "TLS is up"
                    );
                }
                let outcome = handshake::negotiate(
                    &mut stream,
                    &self.exports,
                    &self.shutdown,
                    mode,
                    &mut session,
                )
                .await?;
                match outcome {
                    Outcome::Transmission(n) => Ok(Some((Connected::Tls(Box::new(stream)), n))),
                    Outcome::Closed => {
                        // close_notify, so the client sees a clean end.
                        let _ = stream.shutdown().await;
                        Ok(None)
                    }
                    Outcome::StartTls => Err(ProtocolError::violation("STARTTLS over TLS")),
                }
            }
        }
    }

    /// The transmission phase of connection `conn`, its requests reported
    /// to the observer.
    async fn transmit<S: Stream>(
        &self,
        conn: u64,
        stream: S,
        negotiated: Negotiated<B>,
    ) -> Result<End, ProtocolError> {
        let (reader, writer) = stream.into_halves();
        let watch = Watch {
            observer: Arc::clone(&self.observer),
            conn,
        };
        transmission::run(
            BufReader::with_capacity(READ_BUFFER, reader),
            writer,
            negotiated,
            self.config,
            self.budget.clone(),
            self.shutdown.clone(),
            watch,
        )
        .await
    }
}

/// The stream a connection continues on after the handshake.
enum Connected<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

/// The server's byte budget: `config.max_bytes`, never below the largest
/// single request (a full payload or a full block status reply).
fn budget_for(config: &TransmissionConfig) -> Budget {
    let block_status = transmission::budget::block_status_bytes(true, 2, false);
    let floor = u64::from(export::MAX_PAYLOAD).max(block_status);
    Budget::new(config.max_bytes, floor)
}

fn log_protocol_error(e: &error::ProtocolError, phase: &str) {
    if e.is_disconnect() {
        tracing::debug!(error = %e, phase, "client went away");
    } else {
        tracing::info!(error = %e, phase, "closing connection");
    }
}
