//! The TLS policy of the option loop, as a pure function: what happens to
//! one option given the server's TLS mode and whether TLS is already up.
//! The NBD spec's "TLS support" section (NOTLS, SELECTIVETLS, FORCEDTLS).

use super::option::OptionRequest;
use crate::nbd::consts::*;
use crate::nbd::tls::TlsMode;

/// What the TLS policy does with an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsGate {
    /// Handle the option as usual.
    Handle,
    /// Acknowledge STARTTLS, then run the TLS handshake.
    StartTls,
    /// Answer with this option error and message, and go on.
    Refuse(u32, &'static str),
    /// Hang up (EXPORT_NAME cannot be refused with an error).
    Close,
}

/// Decide what the TLS policy does with `request`.
pub fn tls_gate(mode: TlsMode, tls_active: bool, request: &OptionRequest) -> TlsGate {
    let forced = mode == TlsMode::Require && !tls_active;
    match request {
        OptionRequest::StartTls => match (mode, tls_active) {
            (TlsMode::Off, _) => Refuse(NBD_REP_ERR_UNSUP, "TLS is not enabled on this server"),
            (_, true) => Refuse(NBD_REP_ERR_INVALID, "TLS is already on"),
            (_, false) => TlsGate::StartTls,
        },
        OptionRequest::Abort => TlsGate::Handle,
        OptionRequest::ExportName(_) if forced => TlsGate::Close,
        OptionRequest::Malformed { code, .. } if forced && *code == NBD_OPT_EXPORT_NAME => {
            TlsGate::Close
        }
        OptionRequest::Malformed { code, .. } if *code == NBD_OPT_STARTTLS => TlsGate::Handle,
        _ if forced => Refuse(
            NBD_REP_ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first",
        ),
        _ => TlsGate::Handle,
    }
}

use TlsGate::Refuse;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::handshake::option::InfoRequest;

    fn requests() -> Vec<OptionRequest> {
        let info = InfoRequest {
            name: String::new(),
            requests: vec![],
        };
        vec![
            OptionRequest::ExportName("x".into()),
            OptionRequest::Abort,
            OptionRequest::List,
            OptionRequest::StartTls,
            OptionRequest::Info(info.clone()),
            OptionRequest::Go(info),
            OptionRequest::StructuredReply,
            OptionRequest::ExtendedHeaders,
            OptionRequest::Malformed {
                code: NBD_OPT_EXPORT_NAME,
                reason: String::new(),
            },
            OptionRequest::Malformed {
                code: NBD_OPT_STARTTLS,
                reason: String::new(),
            },
            OptionRequest::Malformed {
                code: NBD_OPT_GO,
                reason: String::new(),
            },
            OptionRequest::Unknown(99),
        ]
    }

    /// The spec's rules, read as a table: (option code, mode, TLS up) → reply.
    fn oracle(mode: TlsMode, up: bool, code: u32, well_formed: bool) -> TlsGate {
        let plaintext_forced = mode == TlsMode::Require && !up;
        if code == NBD_OPT_ABORT {
            return TlsGate::Handle;
        }
        if code == NBD_OPT_STARTTLS {
            if !well_formed {
                return TlsGate::Handle; // ERR_INVALID from the usual handler
            }
            return if mode == TlsMode::Off {
                Refuse(NBD_REP_ERR_UNSUP, "")
            } else if up {
                Refuse(NBD_REP_ERR_INVALID, "")
            } else {
                TlsGate::StartTls
            };
        }
        if code == NBD_OPT_EXPORT_NAME && plaintext_forced {
            return TlsGate::Close;
        }
        if plaintext_forced {
            return Refuse(NBD_REP_ERR_TLS_REQD, "");
        }
        TlsGate::Handle
    }

    fn code_of(r: &OptionRequest) -> (u32, bool) {
        match r {
            OptionRequest::ExportName(_) => (NBD_OPT_EXPORT_NAME, true),
            OptionRequest::Abort => (NBD_OPT_ABORT, true),
            OptionRequest::List => (NBD_OPT_LIST, true),
            OptionRequest::StartTls => (NBD_OPT_STARTTLS, true),
            OptionRequest::Info(_) => (NBD_OPT_INFO, true),
            OptionRequest::Go(_) => (NBD_OPT_GO, true),
            OptionRequest::StructuredReply => (NBD_OPT_STRUCTURED_REPLY, true),
            OptionRequest::ExtendedHeaders => (NBD_OPT_EXTENDED_HEADERS, true),
            OptionRequest::ListMetaContext(_) => (NBD_OPT_LIST_META_CONTEXT, true),
            OptionRequest::SetMetaContext(_) => (NBD_OPT_SET_META_CONTEXT, true),
            OptionRequest::Malformed { code, .. } => (*code, false),
            OptionRequest::Unknown(code) => (*code, true),
        }
    }

    /// Every mode × TLS state × option kind against the table.
    #[test]
    fn gate_matches_the_spec_table() {
        for mode in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
            for up in [false, true] {
                if mode == TlsMode::Off && up {
                    continue;
                }
                for r in requests() {
                    let (code, ok) = code_of(&r);
                    let got = match tls_gate(mode, up, &r) {
                        Refuse(e, _) => Refuse(e, ""),
                        g => g,
                    };
                    assert_eq!(got, oracle(mode, up, code, ok), "{mode:?} up={up} {r:?}");
                }
            }
        }
    }

    #[test]
    fn never_tls_reqd_once_tls_is_up_or_off() {
        for r in requests() {
            for (mode, up) in [
                (TlsMode::Off, false),
                (TlsMode::On, false),
                (TlsMode::On, true),
                (TlsMode::Require, true),
            ] {
                assert!(
                    !matches!(tls_gate(mode, up, &r), Refuse(NBD_REP_ERR_TLS_REQD, _)),
                    "{mode:?} up={up} {r:?}"
                );
            }
        }
    }
}
