//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Install the stderr subscriber once. Later calls do nothing.
///
/// `RUST_LOG` takes `level` or `target=level` directives separated by
/// commas (`debug`, `info,nbdbridge::nbd=trace`); one that does not parse
/// is named on stderr and `info` is used.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => filter_from(&spec).unwrap_or_else(|e| {
            eprintln!("nbdbridge: ignoring RUST_LOG={spec:?} ({e}); logging at info");
            Targets::new().with_default(LevelFilter::INFO)
        }),
        _ => Targets::new().with_default(LevelFilter::INFO),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(crate::progress::StderrWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(filter);
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// The filter a `RUST_LOG` value asks for.
///
/// # Errors
/// A directive that is neither a level nor `target=level`.
fn filter_from(spec: &str) -> Result<Targets, tracing_subscriber::filter::ParseError> {
    spec.parse()
}

/// Show at most the first 8 characters of a secret (ticket ids, tokens).
pub fn redact(secret: &str) -> String {
    let head: String = secret.chars().take(8).collect();
    if head.len() < secret.len() {
        format!("{head}…")
    } else {
        head
    }
}

/// `url` with the ticket id after `/images/` cut short, as [`redact`]
/// does; other URLs unchanged.
pub fn redact_ticket_url(url: &str) -> String {
    let Some(at) = url.find("/images/") else {
        return url.to_string();
    };
    let start = at + "/images/".len();
    let rest = url.get(start..).unwrap_or_default();
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let ticket = rest.get(..end).unwrap_or_default();
    format!(
        "{}{}{}",
        url.get(..start).unwrap_or_default(),
        redact(ticket),
        rest.get(end..).unwrap_or_default()
    )
}

/// An error and its causes on one line: `outer: cause: root cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticket_urls_are_cut_short() {
        use super::redact_ticket_url as r;
        assert_eq!(
            r("http://h:1/images/0123456789abcdef/extents?context=zero"),
            "http://h:1/images/01234567…/extents?context=zero"
        );
        assert_eq!(
            r("http://h/images/0123456789abcdef"),
            "http://h/images/01234567…"
        );
        assert_eq!(r("http://h/images/short"), "http://h/images/short");
        assert_eq!(r("http://h/info/"), "http://h/info/");
    }

    #[test]
    fn chain_and_redaction() {
        let io = std::io::Error::other("disk on fire");
        let outer = crate::backend::Error::io("read", io);
        assert_eq!(super::error_chain(&outer), "read: disk on fire");
        assert_eq!(super::redact("0123456789abcdef"), "01234567…");
        assert_eq!(super::redact("short"), "short");
    }

    #[test]
    fn rust_log_takes_levels_and_targets() {
        use tracing::Level;
        let f = super::filter_from("info,nbdbridge::nbd=trace").expect("parses");
        assert!(f.would_enable("nbdbridge::nbd::handshake", &Level::TRACE));
        assert!(f.would_enable("nbdbridge::engine", &Level::INFO));
        assert!(!f.would_enable("nbdbridge::engine", &Level::DEBUG));
        let f = super::filter_from("debug").expect("parses");
        assert!(f.would_enable("hyper", &Level::DEBUG));
        assert!(super::filter_from("nbdbridge=loud").is_err());
    }
}
