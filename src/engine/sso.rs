//! SSO as the SDK uses it (ENGINE-API.md sections 2 and 3): a password
//! grant on `/ovirt-engine/sso/oauth/token` and a form POST on
//! `/ovirt-engine/services/sso-logout`, both answered with JSON.

use super::State;
use super::error::Result;
use super::model::now;
use crate::telemetry::redact;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

/// How long a token lives (the engine's default SSO session is 10 h idle).
const TOKEN_LIFETIME: i64 = 10 * 3600;

/// Decode `application/x-www-form-urlencoded`.
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Percent-decode `s` (and `+` as space when `plus` is set). Bad escapes
/// stay as they are.
pub fn percent_decode(s: &str, plus: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if plus && b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn same(a: &str, b: &str) -> bool {
    // Constant time for equal lengths.
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `POST /ovirt-engine/sso/oauth/token`.
pub fn token(state: &State, body: &str) -> Result<Response<Full<Bytes>>> {
    let form = parse_form(body);
    let grant = field(&form, "grant_type").unwrap_or("");
    let user = field(&form, "username").unwrap_or("");
    let password = field(&form, "password").unwrap_or("");
    if grant != "password" {
        return Ok(json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({
                "error_code": "unsupported_grant_type",
                "error": format!("Unsupported grant type '{grant}'"),
            }),
        ));
    }
    if user != super::USER || !same(password, &state.password) {
        tracing::info!(user, "login refused");
        return Ok(json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({
                "error_code": "access_denied",
                "error": format!("Cannot authenticate user '{user}': The username or password is incorrect."),
            }),
        ));
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let expires = now() + TOKEN_LIFETIME;
    state.db.insert_token(&token, user, expires)?;
    tracing::info!(user, token = %redact(&token), "login");
    Ok(json(
        StatusCode::OK,
        serde_json::json!({
            "access_token": token,
            "scope": "ovirt-app-api",
            "exp": (expires * 1000).to_string(),
            "token_type": "bearer",
        }),
    ))
}

/// `POST /ovirt-engine/services/sso-logout`.
pub fn logout(state: &State, body: &str) -> Result<Response<Full<Bytes>>> {
    let form = parse_form(body);
    if let Some(token) = field(&form, "token") {
        state.db.delete_token(token, now())?;
        tracing::info!(token = %redact(token), "logout");
    }
    Ok(json(StatusCode::OK, serde_json::json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = parse_form(
            "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=a+b%2",
        );
        assert_eq!(field(&f, "username"), Some("admin@internal"));
        assert_eq!(field(&f, "password"), Some("a b%2"));
        assert_eq!(percent_decode("disk%2Chost", false), "disk,host");
        assert_eq!(percent_decode("%zz%", false), "%zz%");
    }
}
