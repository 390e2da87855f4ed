//! Ticket URLs: `file:///abs/path` and
//! `nbd:unix:/abs/path.sock[:exportname=NAME]`, the storage behind a ticket.

use crate::nbd_client::NbdAddress;
use std::path::{Component, Path, PathBuf};

/// The storage a ticket URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUrl {
    /// `file:///abs/path`: a local image file.
    File(PathBuf),
    /// `nbd:unix:/abs/path.sock[:exportname=NAME]`: an NBD export.
    Nbd(NbdAddress),
}

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest NBD export name (the NBD protocol's string limit).
const MAX_EXPORT_NAME: usize = 4096;

/// Parse a ticket URL: `file:///abs/path` or
/// `nbd:unix:/abs/path.sock[:exportname=NAME]`.
///
/// # Errors
/// The reason, for imageio's `Invalid value for 'url'` text.
pub fn parse_url(url: &str) -> Result<BackendUrl, String> {
    match url.split_once(':') {
        Some(("nbd", rest)) => parse_nbd_url(url, rest).map(BackendUrl::Nbd),
        _ => parse_file_url(url).map(BackendUrl::File),
    }
}

/// The address of an `nbd:unix:/abs/path.sock[:exportname=NAME]` URL
/// (`rest` is what follows `nbd:`). The path follows the rules of
/// [`parse_file_url`] and may not contain `:`; the name may not contain
/// control characters. TCP forms (`nbd:HOST:PORT`, `nbd://…`) are refused.
pub fn parse_nbd_url(url: &str, rest: &str) -> Result<NbdAddress, String> {
    let expecting = "expecting nbd:unix:/absolute/path[:exportname=NAME]";
    let Some(rest) = rest.strip_prefix("unix:") else {
        return Err(format!("Unsupported NBD URL: {url}, {expecting}"));
    };
    let (path, export) = match rest.split_once(':') {
        None => (rest, ""),
        Some((path, opt)) => match opt.strip_prefix("exportname=") {
            Some(name) => (path, name),
            None => return Err(format!("Unsupported NBD URL: {url}, {expecting}")),
        },
    };
    if !path.starts_with('/') {
        return Err(format!("NBD socket path must be absolute, {expecting}"));
    }
    check_path(path)?;
    if path.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "NBD socket path is longer than {MAX_SOCKET_PATH} bytes"
        ));
    }
    if export.len() > MAX_EXPORT_NAME || export.chars().any(char::is_control) {
        return Err(format!(
            "NBD export name must be at most {MAX_EXPORT_NAME} bytes without control characters"
        ));
    }
    Ok(NbdAddress {
        socket: PathBuf::from(path),
        export: export.to_string(),
    })
}

/// The path of a `file:///abs/path` URL. Refused: other schemes, a host,
/// relative paths, `.`/`..` components, empty components, percent escapes,
/// query, fragment and control characters.
pub fn parse_file_url(url: &str) -> Result<PathBuf, String> {
    let Some((scheme, rest)) = url.split_once(':') else {
        return Err("Unsupported url scheme: ".into());
    };
    if scheme != "file" {
        return Err(format!("Unsupported url scheme: {scheme}"));
    }
    let Some(path) = rest.strip_prefix("//") else {
        return Err("Expecting file:///absolute/path".into());
    };
    if !path.starts_with('/') {
        return Err("Expecting file:///absolute/path (no host)".into());
    }
    check_path(path)?;
    Ok(PathBuf::from(path))
}

/// Rules shared by file and socket paths: absolute, normalized, no
/// escapes, naming something other than `/`.
fn check_path(path: &str) -> Result<(), String> {
    if path
        .chars()
        .any(|c| c.is_control() || matches!(c, '%' | '?' | '#'))
    {
        return Err("Path may not contain control characters, '%', '?' or '#'".into());
    }
    if path.len() > 1 && (path.ends_with('/') || path.contains("//")) {
        return Err("Path may not contain empty components".into());
    }
    let p = Path::new(path);
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || path.split('/').any(|c| c == "." || c == "..")
    {
        return Err("Path may not contain '.' or '..' components".into());
    }
    if path == "/" {
        return Err("Path must name a file".into());
    }
    Ok(())
}
