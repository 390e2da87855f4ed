//! The two ways a request can fail, and the one mapping of backend errors to
//! NBD errno.

use super::consts::*;
use crate::backend::{self, ErrorKind};

/// A failure that ends the connection: the byte stream can no longer be
/// trusted, or the peer went away.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer broke a MUST of the protocol.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The peer asked for more than we accept (option or payload length).
    #[error("too large: {0}")]
    TooLarge(String),
    /// The socket failed or closed mid-message.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// A peer-side violation.
    pub fn violation(msg: impl Into<String>) -> Self {
        ProtocolError::Violation(msg.into())
    }

    /// Whether this is only the peer closing the socket.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ProtocolError::Io(e) if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ))
    }
}

/// A failed request: answered with an errno (and a message where the reply
/// style can carry one); the connection goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// NBD error value (`NBD_EINVAL`, ...).
    pub errno: u32,
    /// Human-readable cause, sent in structured error chunks.
    pub message: String,
}

impl RequestError {
    /// An error with `errno` and `message`.
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        RequestError {
            errno,
            message: message.into(),
        }
    }

    /// EINVAL with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(NBD_EINVAL, message)
    }
}

/// Context of the failed command that decides how an error is narrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrnoContext {
    /// The command carried FAST_ZERO (ENOTSUP allowed).
    pub fast_zero: bool,
    /// The command writes (out of range means ENOSPC).
    pub writes: bool,
}

/// The single mapping from a backend error to an NBD errno. Logs the full
/// error chain once, here, before narrowing it.
pub fn to_errno(err: &backend::Error, ctx: ErrnoContext) -> RequestError {
    let chain = crate::telemetry::error_chain(err);
    let errno = match err.kind() {
        ErrorKind::ReadOnly | ErrorKind::Forbidden => NBD_EPERM,
        ErrorKind::NoSpace => NBD_ENOSPC,
        ErrorKind::OutOfRange if ctx.writes => NBD_ENOSPC,
        ErrorKind::OutOfRange | ErrorKind::Invalid => NBD_EINVAL,
        ErrorKind::Unsupported if ctx.fast_zero => NBD_ENOTSUP,
        ErrorKind::Unsupported => NBD_EINVAL,
        ErrorKind::Io => NBD_EIO,
        ErrorKind::Shutdown => NBD_ESHUTDOWN,
    };
    if errno == NBD_EIO || errno == NBD_ESHUTDOWN {
        tracing::warn!(errno, error = %chain, "request failed");
    } else {
        tracing::debug!(errno, error = %chain, "request failed");
    }
    RequestError::new(errno, chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Error;

    #[test]
    fn narrowing_depends_on_context() {
        let unsup = Error::new(ErrorKind::Unsupported, "slow");
        assert_eq!(to_errno(&unsup, ErrnoContext::default()).errno, NBD_EINVAL);
        let fast = ErrnoContext {
            fast_zero: true,
            ..Default::default()
        };
        assert_eq!(to_errno(&unsup, fast).errno, NBD_ENOTSUP);
        let range = Error::new(ErrorKind::OutOfRange, "past end");
        assert_eq!(to_errno(&range, ErrnoContext::default()).errno, NBD_EINVAL);
        let writes = ErrnoContext {
            writes: true,
            ..Default::default()
        };
        assert_eq!(to_errno(&range, writes).errno, NBD_ENOSPC);
        let forbidden = Error::new(ErrorKind::Forbidden, "ticket expired");
        let e = to_errno(&forbidden, ErrnoContext::default());
        assert_eq!((e.errno, e.message.as_str()), (NBD_EPERM, "ticket expired"));
        let io = Error::io("read", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(to_errno(&io, ErrnoContext::default()).errno, NBD_EIO);
        let full = Error::io("write", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(to_errno(&full, ErrnoContext::default()).errno, NBD_ENOSPC);
    }
}
