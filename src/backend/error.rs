//! The error every backend returns: what went wrong, never how to react.
//!
//! The NBD layer turns it into an errno in exactly one place
//! (`nbd::error::to_errno`); the imageio backend is the only code that builds it
//! from HTTP statuses.

use std::fmt;

/// What kind of failure a backend met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The storage failed (I/O error, HTTP 5xx, timeout, dropped connection).
    Io,
    /// The range lies outside the image.
    OutOfRange,
    /// No space left to write.
    NoSpace,
    /// The operation is not supported, or would not be fast (FAST_ZERO).
    Unsupported,
    /// The image or the transfer does not allow writing.
    ReadOnly,
    /// The peer refused the request (HTTP 403: unknown, expired ticket).
    Forbidden,
    /// The request was malformed for this backend.
    Invalid,
    /// The transfer or the server is going away.
    Shutdown,
}

/// A backend failure: a kind, a message for the client, and the cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result of a backend operation.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a message meant for the client.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::ReadOnly,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        // The message is this layer only; the cause is the source (see
        // `telemetry::error_chain` for the whole line).
        Error::new(kind, context).with_source(err)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
