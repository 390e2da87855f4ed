//! The one place where HTTP answers and transport failures become
//! `backend::Error`s.

use super::pool::RespBody;
use crate::backend::{Error, ErrorKind, Result};
use http_body_util::BodyExt;
use hyper::Response;

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
    resp: Response<RespBody>,
    what: &str,
    ctx: &ErrorContext,
) -> Result<Response<RespBody>> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_error_body(resp.into_body()).await;
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
        // The message reaches logs and NBD clients: a ticket id the server
        // quotes ("No such ticket <id>") is a bearer secret.
        format!("{what}: HTTP {status}: {}", redact_ids(body))
    };
    Error::new(kind, message)
}

/// Shortest word taken for an id (a ticket, a transfer): UUIDs have 36
/// characters, imageio ticket ids are UUIDs or longer random words.
const MIN_ID_LEN: usize = 16;

/// `123` or `0-4095` (a UUID has four dashes).
fn is_number_or_range(word: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match word.split_once('-') {
        Some((a, b)) => digits(a) && digits(b),
        None => digits(word),
    }
}

/// `text` with every word that may be a ticket id cut short as
/// [`crate::telemetry::redact`] does: a run of ticket-id characters
/// (`[A-Za-z0-9._-]`) of at least 16 characters that is not a plain number
/// or range (sizes, offsets and byte ranges stay readable).
pub fn redact_ids(text: &str) -> String {
    let is_id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_id_char) {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        let end = from.find(|c: char| !is_id_char(c)).unwrap_or(from.len());
        let (word, after) = from.split_at(end);
        if word.len() >= MIN_ID_LEN && !is_number_or_range(word) {
            out.push_str(&crate::telemetry::redact(word));
        } else {
            out.push_str(word);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

async fn read_error_body(mut body: RespBody) -> String {
    let mut text = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let room = MAX_ERROR_BODY.saturating_sub(text.len());
        text.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        if text.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// A transport failure (connect, TLS, reset, timeout, body cut short) of a
/// request to `url`, which is named with its ticket cut short (a bearer
/// secret).
pub fn transport(what: &str, url: &str, err: &dyn std::error::Error) -> Error {
    let msg = format!(
        "{what}: {}: {}",
        crate::telemetry::redact_ticket_url(url),
        crate::telemetry::error_chain(err)
    );
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
        use crate::backend::imageio::body::Parts;
        use crate::backend::imageio::pool::{Connection, Target};
        // Nothing listens on a port we bound and dropped.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let url = format!("http://127.0.0.1:{port}/images/0123456789abcdef0123/extents");
        let target = Target::new(&url, &Default::default(), None).expect("a target");
        let mut conn = Connection::new(target);
        let e = conn
            .send(
                "GET extents",
                hyper::Method::GET,
                &url,
                hyper::HeaderMap::new(),
                Parts::empty(),
            )
            .await
            .expect_err("nothing listens there");
        let text = e.to_string();
        assert!(is_transport(&e));
        assert!(!text.contains("0123456789abcdef0123"), "{text}");
        assert!(text.contains("/images/01234567…/extents"), "{text}");
        assert!(text.contains("Connection refused"), "{text}");
    }

    #[test]
    fn ticket_ids_in_server_messages_are_cut_short() {
        let c = ErrorContext::default();
        let id = "6c9b2e3a-6f1d-4d7e-9d55-0123456789ab";
        // ovirt-imageio's and our data server's wording.
        for body in [
            format!("You are not allowed to access this resource: No such ticket {id}"),
            format!("No such ticket '{id}'"),
        ] {
            let e = from_status("GET", 403, &body, &c);
            let text = e.to_string();
            assert!(!text.contains(id), "{text}");
            assert!(!text.contains("0123456789ab"), "{text}");
            assert!(text.contains("6c9b2e3a…"), "{text}");
            assert!(text.contains("No such ticket"), "{text}");
        }
        // Numbers and short words stay.
        assert_eq!(
            redact_ids("Requested range 0-10995116277760 is past size 4294967296000000"),
            "Requested range 0-10995116277760 is past size 4294967296000000"
        );
        assert_eq!(redact_ids("(x) a.b, c"), "(x) a.b, c");
        assert_eq!(redact_ids(""), "");
        assert_eq!(
            redact_ids("é ticket=abcdefghijklmnopqrst!"),
            "é ticket=abcdefgh…!"
        );
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
