//! The one place where HTTP answers and transport failures become
//! `backend::Error`s.

use crate::backend::{Error, ErrorKind, Result};

/// Longest error body kept for the message.
const MAX_ERROR_BODY: usize = 4096;

/// What changes the meaning of an answer.
#[derive(Debug, Default, Clone, Copy)]
pub struct ErrorContext {
    /// The transfer has ended: a 403 means "gone", not "forbidden".
    pub ended: bool,
}

/// Pass a successful answer through; turn any other into an error carrying
/// the server's message.
///
/// # Errors
/// The status is not 2xx.
pub async fn check(
    resp: reqwest::Response,
    what: &str,
    ctx: &ErrorContext,
) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_error_body(resp).await;
    Err(from_status(what, status.as_u16(), body.trim(), ctx))
}

/// Map a status to an error kind: 403 → forbidden (or shut down once the
/// transfer ended), 404 → unsupported, 400 / 416 → invalid, 5xx and the
/// rest → I/O.
pub fn from_status(what: &str, status: u16, body: &str, ctx: &ErrorContext) -> Error {
    let kind = match status {
        403 if ctx.ended => ErrorKind::Shutdown,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::Unsupported,
        400 | 416 => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    let message = if body.is_empty() {
        format!("{what}: HTTP {status}")
    } else {
        format!("{what}: HTTP {status}: {body}")
    };
    Error::new(kind, message)
}

async fn read_error_body(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// A transport failure (connect, reset, timeout, body cut short).
pub fn transport(what: &str, err: &reqwest::Error) -> Error {
    let mut msg = format!("{what}: {}", crate::telemetry::error_chain(err));
    if let Some(url) = err.url() {
        // The URL holds the ticket, a bearer secret.
        msg = msg.replace(
            url.as_str(),
            &crate::telemetry::redact_ticket_url(url.as_str()),
        );
    }
    Error::new(ErrorKind::Io, msg).with_source(Transport)
}

/// Whether `err` came from the transport (and so may be retried when the
/// request is idempotent).
pub fn is_transport(err: &Error) -> bool {
    std::error::Error::source(err).is_some_and(|s| s.is::<Transport>())
}

/// Marker cause of transport errors.
#[derive(Debug)]
struct Transport;

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("transport failure")
    }
}

impl std::error::Error for Transport {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transport_errors_do_not_quote_the_ticket() {
        // Nothing listens on a port we bound and dropped.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let url = format!("http://127.0.0.1:{port}/images/0123456789abcdef0123/extents");
        let client =
            crate::backend::imageio::build_client(&Default::default(), None).expect("a client");
        let err = client
            .get(&url)
            .send()
            .await
            .expect_err("nothing listens there");
        let e = transport("GET extents", &err);
        let text = e.to_string();
        assert!(is_transport(&e));
        assert!(!text.contains("0123456789abcdef0123"), "{text}");
        assert!(text.contains("/images/01234567…/extents"), "{text}");
    }

    #[test]
    fn statuses_map_once() {
        let c = ErrorContext::default();
        let e = from_status("PUT", 403, "forbids write", &c);
        assert_eq!(e.kind(), ErrorKind::Forbidden);
        assert_eq!(e.message(), "PUT: HTTP 403: forbids write");
        let ended = ErrorContext { ended: true };
        assert_eq!(
            from_status("PUT", 403, "", &ended).kind(),
            ErrorKind::Shutdown
        );
        assert_eq!(from_status("GET", 416, "", &c).kind(), ErrorKind::Invalid);
        assert_eq!(
            from_status("GET", 404, "", &c).kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(from_status("GET", 500, "", &c).kind(), ErrorKind::Io);
        assert!(!is_transport(&from_status("GET", 500, "", &c)));
    }
}
