//! `engine::Error` and its single mapping to an HTTP status plus an oVirt
//! `<fault>` document.

use super::xml;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

/// What went wrong while serving an API call or driving a transfer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something we cannot accept (400).
    #[error("{0}")]
    BadRequest(String),
    /// No valid bearer token, or wrong credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// An unknown id or path (404).
    #[error("{0}")]
    NotFound(String),
    /// The method is not served on this path (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The action does not fit the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The request body is larger than we accept (413).
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The engine cannot start with this configuration.
    #[error("{0}")]
    Config(String),
    /// A data server's control API failed.
    #[error("host {host}: {message}")]
    Host {
        /// The host's name.
        host: String,
        /// What failed.
        message: String,
    },
}

impl Error {
    /// A `Io` error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Db(_) | Error::Io { .. } | Error::Host { .. } | Error::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The fault `<detail>` text: the message for client errors, a generic
    /// text for internal ones (details go to the log only).
    fn detail(&self) -> String {
        match self {
            Error::NotFound(m) => m.clone(),
            Error::BadRequest(m) | Error::Conflict(m) | Error::MethodNotAllowed(m) => {
                format!("[{m}]")
            }
            Error::Unauthorized(m) => m.clone(),
            Error::TooLarge(_) => format!("[{self}]"),
            Error::Db(_) | Error::Io { .. } | Error::Host { .. } | Error::Config(_) => {
                "[Internal engine error, check the engine log]".to_string()
            }
        }
    }

    /// The reply for this error: status, XML content type, `<fault>` body.
    /// Internal errors are logged here, once, with their cause.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, %status, "request refused");
        }
        let reason = match self {
            Error::Unauthorized(_) => "Unauthorized",
            _ => "Operation Failed",
        };
        let mut w = xml::Writer::new();
        w.open("fault", &[]);
        w.text_element("detail", &self.detail());
        w.text_element("reason", reason);
        w.close("fault");
        let mut builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, xml::CONTENT_TYPE);
        if status == StatusCode::UNAUTHORIZED {
            builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
        }
        builder
            .body(Full::new(Bytes::from(w.finish())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, Error>;
