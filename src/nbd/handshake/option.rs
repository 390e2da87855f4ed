//! Option requests parsed from (code, payload). Unknown options are a value,
//! not an error; malformed ones carry the reason for `NBD_REP_ERR_INVALID`.

use crate::nbd::consts::*;
use crate::wire::{Reader, WireError};

/// Longest string (export name, context query) accepted.
pub const MAX_STRING: usize = 4096;
/// Most info requests in one INFO/GO, or queries in one meta-context option.
pub const MAX_ITEMS: usize = 1024;

/// The name and info requests of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` types, in order.
    pub requests: Vec<u16>,
}

/// The export and queries of LIST/SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Context queries.
    pub queries: Vec<String>,
}

/// One client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// NBD_OPT_EXPORT_NAME.
    ExportName(String),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO.
    Info(InfoRequest),
    /// NBD_OPT_GO.
    Go(InfoRequest),
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT.
    ListMetaContext(MetaRequest),
    /// NBD_OPT_SET_META_CONTEXT.
    SetMetaContext(MetaRequest),
    /// NBD_OPT_EXTENDED_HEADERS.
    ExtendedHeaders,
    /// A known option with bad contents: answered with ERR_INVALID.
    Malformed {
        /// The option code.
        code: u32,
        /// Why it was rejected.
        reason: String,
    },
    /// An option we do not know: answered with ERR_UNSUP.
    Unknown(u32),
}

/// Why a payload ran short or long, as the client is told.
fn reason(e: WireError) -> String {
    match e {
        WireError::Short { .. } => format!("{e} in the option"),
        WireError::Trailing(_) => e.to_string(),
    }
}

/// A u32 length, then that many bytes of UTF-8.
fn string(r: &mut Reader<'_>, what: &str) -> Result<String, String> {
    let len = r.u32().map_err(reason)? as usize;
    if len > MAX_STRING {
        return Err(format!("{what} is {len} bytes, more than {MAX_STRING}"));
    }
    let bytes = r.bytes(len).map_err(reason)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

/// Parse one option.
pub fn parse_option(code: u32, data: &[u8]) -> OptionRequest {
    let malformed = |reason: String| OptionRequest::Malformed { code, reason };
    let no_data = |req: OptionRequest| {
        if data.is_empty() {
            req
        } else {
            OptionRequest::Malformed {
                code,
                reason: format!("{} takes no data", option_name(code)),
            }
        }
    };
    match code {
        NBD_OPT_EXPORT_NAME => match std::str::from_utf8(data) {
            Ok(name) if name.len() <= MAX_STRING => OptionRequest::ExportName(name.to_string()),
            _ => malformed("export name is not a valid string".into()),
        },
        // The spec says the server SHOULD ignore data sent with ABORT.
        NBD_OPT_ABORT => OptionRequest::Abort,
        NBD_OPT_LIST => no_data(OptionRequest::List),
        NBD_OPT_STARTTLS => no_data(OptionRequest::StartTls),
        NBD_OPT_STRUCTURED_REPLY => no_data(OptionRequest::StructuredReply),
        NBD_OPT_EXTENDED_HEADERS => no_data(OptionRequest::ExtendedHeaders),
        NBD_OPT_INFO | NBD_OPT_GO => match parse_info(data) {
            Ok(req) if code == NBD_OPT_GO => OptionRequest::Go(req),
            Ok(req) => OptionRequest::Info(req),
            Err(reason) => malformed(reason),
        },
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => match parse_meta(data) {
            Ok(req) if code == NBD_OPT_SET_META_CONTEXT => OptionRequest::SetMetaContext(req),
            Ok(req) => OptionRequest::ListMetaContext(req),
            Err(reason) => malformed(reason),
        },
        other => OptionRequest::Unknown(other),
    }
}

fn parse_info(data: &[u8]) -> Result<InfoRequest, String> {
    let mut r = Reader::new(data);
    let name = string(&mut r, "export name")?;
    let count = r.u16().map_err(reason)? as usize;
    if count > MAX_ITEMS {
        return Err(format!("{count} info requests"));
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(r.u16().map_err(reason)?);
    }
    r.finish().map_err(reason)?;
    Ok(InfoRequest { name, requests })
}

fn parse_meta(data: &[u8]) -> Result<MetaRequest, String> {
    let mut r = Reader::new(data);
    let name = string(&mut r, "export name")?;
    let count = r.u32().map_err(reason)? as usize;
    if count > MAX_ITEMS {
        return Err(format!("{count} queries"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(string(&mut r, "context query")?);
    }
    r.finish().map_err(reason)?;
    Ok(MetaRequest { name, queries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_with_name_and_requests() {
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 2, 0, 3, 0, 1];
        assert_eq!(
            parse_option(NBD_OPT_GO, &data),
            OptionRequest::Go(InfoRequest {
                name: "abc".into(),
                requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME],
            })
        );
    }

    #[test]
    fn info_name_past_end_is_malformed() {
        let data = [0, 0, 0, 9, b'a', 0, 0];
        assert!(matches!(
            parse_option(NBD_OPT_INFO, &data),
            OptionRequest::Malformed {
                code: NBD_OPT_INFO,
                ..
            }
        ));
    }

    #[test]
    fn meta_queries() {
        let mut data = vec![0, 0, 0, 0, 0, 0, 0, 2];
        for q in ["base:allocation", "qemu:"] {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            parse_option(NBD_OPT_LIST_META_CONTEXT, &data),
            OptionRequest::ListMetaContext(MetaRequest {
                name: String::new(),
                queries: vec!["base:allocation".into(), "qemu:".into()],
            })
        );
        data.push(0);
        assert!(matches!(
            parse_option(NBD_OPT_SET_META_CONTEXT, &data),
            OptionRequest::Malformed { .. }
        ));
    }

    #[test]
    fn malformed_reasons() {
        let why = |data: &[u8]| match parse_option(NBD_OPT_GO, data) {
            OptionRequest::Malformed { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            why(&[0, 0, 0, 9, b'a', 0, 0]),
            "needs 9 more bytes, 3 left in the option"
        );
        assert_eq!(
            why(&[0, 0, 0, 0, 0]),
            "needs 2 more bytes, 1 left in the option"
        );
        assert_eq!(why(&[0, 0, 0, 0, 0, 0, 7]), "1 trailing bytes");
        assert_eq!(why(&[0, 0, 0, 1, 0xff, 0, 0]), "export name is not UTF-8");
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_option(NBD_OPT_SET_META_CONTEXT, &data),
            OptionRequest::Malformed { .. }
        ));
    }

    #[test]
    fn data_on_dataless_options_is_malformed() {
        assert!(matches!(
            parse_option(NBD_OPT_STRUCTURED_REPLY, &[1]),
            OptionRequest::Malformed { .. }
        ));
        assert_eq!(parse_option(NBD_OPT_LIST, &[]), OptionRequest::List);
        assert_eq!(parse_option(999, &[1, 2]), OptionRequest::Unknown(999));
        assert_eq!(parse_option(NBD_OPT_ABORT, &[1]), OptionRequest::Abort);
    }
}
