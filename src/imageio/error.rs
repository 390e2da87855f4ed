//! [`ApiError`]: every way a data or control request can fail, and the one
//! place where a failure becomes an HTTP status and a `text/plain` body.

use super::Body;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONNECTION, CONTENT_RANGE, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

/// The text of every 500: details stay in the server log.
pub const INTERNAL_MESSAGE: &str = "Server failed to perform the request, check logs";

/// A failed request. The message is what the client reads; it follows the
/// texts of ovirt-imageio 2.5.1 where that server has the same error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown, expired, cancelled ticket or a forbidden op: 403. The message
    /// is the reason; the body prefixes it like imageio does.
    #[error("You are not allowed to access this resource: {0}")]
    Forbidden(String),
    /// Unknown resource or unsupported extents context: 404.
    #[error("{0}")]
    NotFound(String),
    /// Method not served on this path: 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A ticket could not be removed in time: 409.
    #[error("{0}")]
    Conflict(String),
    /// A request body larger than this kind of request may have: 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A range outside the ticket or the image: 416 with
    /// `Content-Range: bytes */total`.
    #[error("{message}")]
    RangeNotSatisfiable {
        /// What was wrong.
        message: String,
        /// The size the range was checked against.
        total: u64,
    },
    /// Anything else (I/O failures): 500. The cause is logged, never sent.
    #[error("{INTERNAL_MESSAGE}")]
    Internal(#[source] std::io::Error),
}

impl ApiError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A 416 for `message`, checked against `total` bytes.
    pub fn range(message: impl Into<String>, total: u64) -> Self {
        ApiError::RangeNotSatisfiable {
            message: message.into(),
            total,
        }
    }

    /// Build the response. `close` asks the client to drop the connection,
    /// used when the request body was not read; 403 always closes, as
    /// imageio does.
    pub fn into_response(self, close: bool) -> Response<Body> {
        if let ApiError::Internal(e) = &self {
            // The one place a server-side failure is logged with its cause.
            tracing::error!(error = %e, "request failed");
        }
        let status = self.status();
        let close = close || status == StatusCode::FORBIDDEN;
        let mut resp = Response::new(
            Full::new(Bytes::from(format!("{self}\n")))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=UTF-8"),
        );
        if let ApiError::RangeNotSatisfiable { total, .. } = &self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                headers.insert(CONTENT_RANGE, v);
            }
        }
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::Internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_closes_and_prefixes() {
        let resp = ApiError::Forbidden("No such ticket x".into()).into_response(false);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[CONNECTION], "close");
    }

    #[test]
    fn range_has_content_range() {
        let resp = ApiError::range("Requested range out of allowed range", 8).into_response(false);
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()[CONTENT_RANGE], "bytes */8");
        assert!(resp.headers().get(CONNECTION).is_none());
    }

    #[test]
    fn internal_hides_cause() {
        let e = ApiError::Internal(std::io::Error::other("secret path"));
        assert_eq!(e.to_string(), INTERNAL_MESSAGE);
    }
}
