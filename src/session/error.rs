//! Errors of the transfer session: what the engine said, or why we could
//! not ask it.

use crate::backend;

/// A session failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine answered with an error status and a fault.
    #[error("engine: HTTP {status}: {reason}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Engine {
        /// HTTP status.
        status: u16,
        /// Fault reason.
        reason: String,
        /// Fault detail.
        detail: String,
    },
    /// Login failed.
    #[error("engine login failed: {0}")]
    Auth(String),
    /// The engine could not be reached.
    #[error("engine unreachable: {0}")]
    Transport(String),
    /// The engine answered something we do not understand.
    #[error("engine protocol: {0}")]
    Protocol(String),
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// The transfer reached a phase we cannot serve in.
    #[error("transfer {id} is {phase}{}", if why.is_empty() { String::new() } else { format!(": {why}") })]
    Phase {
        /// Transfer id.
        id: String,
        /// The phase.
        phase: crate::ovirt::Phase,
        /// More words.
        why: String,
    },
    /// No data URL of the transfer could be used (the message names them,
    /// tickets redacted, and what became of the transfer).
    #[error("cannot use the transfer's data server: {0}")]
    DataServer(String),
    /// The data server failed.
    #[error("data server: {0}")]
    Backend(#[from] backend::Error),
}

/// Result of a session operation.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A transport failure of `what`.
    pub fn transport(what: &str, err: &reqwest::Error) -> Self {
        Error::Transport(format!("{what}: {}", crate::telemetry::error_chain(err)))
    }

    /// Whether the engine said "not found".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Engine { status: 404, .. })
    }
}
