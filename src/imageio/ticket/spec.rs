//! The ticket JSON of the control API's PUT, validated as imageio does
//! (same texts), and more strictly where it matters: ids, ops, URLs.

use super::url::{BackendUrl, parse_url};
use crate::imageio::error::ApiError;
use crate::telemetry::redact;
use serde_json::{Map, Value, json};

const MAX_ID_LEN: usize = 256;

/// What a ticket may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// GET, extents, checksum, OPTIONS.
    Read,
    /// PUT, PATCH zero / flush.
    Write,
}

impl Access {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// A validated ticket JSON, as PUT on the control API.
#[derive(Debug, Clone)]
pub struct TicketSpec {
    /// Ticket id (a bearer secret).
    pub uuid: String,
    /// Bytes the ticket covers.
    pub size: u64,
    /// Allowed ops as given (`"read"`, `"write"`).
    pub ops: Vec<String>,
    /// Seconds of idleness before the ticket expires.
    pub timeout: u64,
    /// Connection idle timeout once the ticket was used.
    pub inactivity_timeout: u64,
    /// The `file:///…` or `nbd:unix:…` URL as given.
    pub url: String,
    /// The storage behind `url`.
    pub backend: BackendUrl,
    /// Label for logs and error texts.
    pub transfer_id: String,
    /// Name for `Content-Disposition`.
    pub filename: Option<String>,
    /// Zero deallocates (punches holes).
    pub sparse: bool,
    /// `extents?context=dirty` allowed.
    pub dirty: bool,
}

impl TicketSpec {
    /// Validate a ticket JSON the way imageio does (same texts), and more
    /// strictly where it matters: ids, ops and `file:` URLs.
    ///
    /// # Errors
    /// 400 `Invalid ticket: …`.
    pub fn parse(value: &Value, default_inactivity: u64) -> Result<Self, ApiError> {
        let invalid = |m: String| ApiError::BadRequest(format!("Invalid ticket: {m}"));
        let Some(obj) = value.as_object() else {
            return Err(invalid(format!(
                "Invalid ticket: {}, expecting a dict",
                py_repr(value)
            )));
        };
        let uuid = required(obj, "uuid", Kind::Str)?
            .as_str()
            .unwrap_or_default()
            .to_string();
        validate_id(&uuid).map_err(|reason| invalid(param_error("uuid", &json!(uuid), reason)))?;
        let size = required(obj, "size", Kind::Uint)?.as_u64().unwrap_or(0);
        let ops_value = required(obj, "ops", Kind::List)?;
        let mut ops = Vec::new();
        for op in ops_value.as_array().into_iter().flatten() {
            match op.as_str() {
                Some(s @ ("read" | "write")) => ops.push(s.to_string()),
                _ => {
                    return Err(invalid(param_error(
                        "ops",
                        ops_value,
                        "expecting 'read' or 'write'",
                    )));
                }
            }
        }
        let timeout = required(obj, "timeout", Kind::Uint)?.as_u64().unwrap_or(0);
        let inactivity_timeout = optional(obj, "inactivity_timeout", Kind::Uint)?
            .and_then(Value::as_u64)
            .unwrap_or(default_inactivity);
        let url_value = required(obj, "url", Kind::Str)?;
        let url = url_value.as_str().unwrap_or_default().to_string();
        let backend =
            parse_url(&url).map_err(|reason| invalid(param_error("url", url_value, &reason)))?;
        let transfer_id = match optional(obj, "transfer_id", Kind::Str)? {
            Some(v) => v.as_str().unwrap_or_default().to_string(),
            None => format!("(ticket/{})", uuid.chars().take(18).collect::<String>()),
        };
        let filename = optional(obj, "filename", Kind::Str)?
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(name) = &filename {
            if name.chars().any(|c| c.is_control() || c == '"') {
                return Err(invalid(param_error(
                    "filename",
                    &json!(name),
                    "control characters and quotes are not allowed",
                )));
            }
        }
        let sparse = optional(obj, "sparse", Kind::Bool)?
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let dirty = optional(obj, "dirty", Kind::Bool)?
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(TicketSpec {
            uuid,
            size,
            ops,
            timeout,
            inactivity_timeout,
            url,
            backend,
            transfer_id,
            filename,
            sparse,
            dirty,
        })
    }

    /// The transfer label for logs: the given `transfer_id`, or, for the
    /// default one (which embeds 18 characters of the secret ticket id),
    /// a redacted form.
    pub fn log_label(&self) -> String {
        if self.transfer_id.starts_with("(ticket/") {
            format!("(ticket/{})", redact(&self.uuid))
        } else {
            self.transfer_id.clone()
        }
    }

    /// Whether the ticket allows `access` (write implies read).
    pub fn may(&self, access: Access) -> bool {
        match access {
            Access::Read => self.ops.iter().any(|o| o == "read" || o == "write"),
            Access::Write => self.ops.iter().any(|o| o == "write"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Uint,
    List,
    Bool,
}

impl Kind {
    fn matches(self, v: &Value) -> bool {
        match self {
            Kind::Str => v.is_string(),
            Kind::Uint => v.is_u64(),
            Kind::List => v.is_array(),
            Kind::Bool => v.is_boolean(),
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Kind::Str => "expecting a <class 'str'> value",
            Kind::Uint => "expecting a <class 'int'> value",
            Kind::List => "expecting a <class 'list'> value",
            Kind::Bool => "expecting a <class 'bool'> value",
        }
    }
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str, kind: Kind) -> Result<&'a Value, ApiError> {
    match obj.get(key) {
        None => Err(ApiError::BadRequest(format!(
            "Invalid ticket: Required ticket parameter is missing: {key}"
        ))),
        Some(v) => check(key, v, kind),
    }
}

fn optional<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    kind: Kind,
) -> Result<Option<&'a Value>, ApiError> {
    obj.get(key).map(|v| check(key, v, kind)).transpose()
}

fn check<'a>(key: &str, v: &'a Value, kind: Kind) -> Result<&'a Value, ApiError> {
    if kind.matches(v) {
        Ok(v)
    } else {
        Err(ApiError::BadRequest(format!(
            "Invalid ticket: {}",
            param_error(key, v, kind.reason())
        )))
    }
}

fn param_error(key: &str, value: &Value, reason: &str) -> String {
    format!("Invalid value for '{key}': {}: {reason}", py_repr(value))
}

/// `repr()` of a JSON value as Python would print it, for imageio's texts.
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("'{k}': {}", py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Check a ticket id: non-empty, at most 256 characters of
/// `[A-Za-z0-9._-]`, not `.` or `..`. Ids reach file-system-free code
/// only, but odd ids are refused so paths can never be played with.
pub fn validate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("ticket id is empty");
    }
    if id.len() > MAX_ID_LEN {
        return Err("ticket id is longer than 256 characters");
    }
    if id == "." || id == ".." {
        return Err("ticket id may not be '.' or '..'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("ticket id may contain only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid ticket JSON with `extra` keys replaced, parsed.
    pub(crate) fn spec(extra: Value) -> Result<TicketSpec, ApiError> {
        let mut v = json!({
            "uuid": "abc", "size": 100, "ops": ["read"], "timeout": 10,
            "url": "file:///tmp/x.img"
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, val) in e {
                o.insert(k.clone(), val.clone());
            }
        }
        TicketSpec::parse(&v, 60)
    }

    #[test]
    fn parse_defaults() {
        let s = spec(json!({})).unwrap();
        assert_eq!(s.transfer_id, "(ticket/abc)");
        let long = spec(json!({"uuid": "0123456789abcdef0123"})).unwrap();
        assert_eq!(long.log_label(), "(ticket/01234567…)");
        assert_eq!(s.inactivity_timeout, 60);
        assert!(!s.sparse && !s.dirty);
        assert!(s.may(Access::Read) && !s.may(Access::Write));
    }

    #[test]
    fn parse_errors() {
        let e = spec(json!({"size": "1"})).unwrap_err().to_string();
        assert_eq!(
            e,
            "Invalid ticket: Invalid value for 'size': '1': expecting a <class 'int'> value"
        );
        let e = spec(json!({"url": "ftp://x"})).unwrap_err().to_string();
        assert_eq!(
            e,
            "Invalid ticket: Invalid value for 'url': 'ftp://x': Unsupported url scheme: ftp"
        );
        for bad in [
            "file:///a/../etc/passwd",
            "file://host/a",
            "file:relative",
            "file:///a/%2e%2e/b",
            "file:///a//b",
            "file:///",
        ] {
            assert!(spec(json!({"url": bad})).is_err(), "{bad}");
        }
        assert!(spec(json!({"uuid": "../x"})).is_err());
        assert!(spec(json!({"ops": ["read", 1]})).is_err());
        assert!(spec(json!({"size": -1})).is_err());
        let mut v = json!({"uuid": "a"});
        v.as_object_mut().unwrap().remove("uuid");
        assert_eq!(
            TicketSpec::parse(&json!({"uuid": "a"}), 60)
                .unwrap_err()
                .to_string(),
            "Invalid ticket: Required ticket parameter is missing: size"
        );
    }

    #[test]
    fn nbd_urls() {
        let addr = |url: &str| match spec(json!({ "url": url })).unwrap().backend {
            BackendUrl::Nbd(a) => (a.socket.display().to_string(), a.export),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            addr("nbd:unix:/run/x.sock"),
            ("/run/x.sock".into(), "".into())
        );
        assert_eq!(
            addr("nbd:unix:/run/x.sock:exportname=sda"),
            ("/run/x.sock".into(), "sda".into())
        );
        assert_eq!(
            addr("nbd:unix:/run/x.sock:exportname=a:b/c"),
            ("/run/x.sock".into(), "a:b/c".into())
        );
        let err = |url: &str| spec(json!({ "url": url })).unwrap_err().to_string();
        assert_eq!(
            err("nbd:localhost:10809"),
            "Invalid ticket: Invalid value for 'url': 'nbd:localhost:10809': Unsupported NBD URL: \
             nbd:localhost:10809, expecting nbd:unix:/absolute/path[:exportname=NAME]"
        );
        for bad in [
            "nbd://localhost:10809/sda",
            "nbd:unix:relative.sock",
            "nbd:unix:",
            "nbd:unix:/a/../b.sock",
            "nbd:unix:/a//b.sock",
            "nbd:unix:/a/b.sock:export=x",
            "nbd:unix:/a/b.sock:exportname=x\ny",
            "nbd:unix:/a/%2e.sock",
            "nbd:unix:/",
        ] {
            assert!(spec(json!({ "url": bad })).is_err(), "{bad}");
        }
        let long = format!("nbd:unix:/{}", "x".repeat(120));
        assert!(err(&long).contains("longer than 107 bytes"));
    }
}
