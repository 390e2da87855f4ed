//! Entry point for the cargo-fuzz target `imageio_requests` in `fuzz/`: the
//! data and control servers' parsers of HTTP input, chosen by the first
//! byte of the fuzz input. Kept in the library so that stable `cargo test`
//! runs the seeds. Besides never panicking, accepted values are checked
//! against the parsers' promises.

use super::handlers::{PatchOp, parse_image_path, parse_patch};
use super::range::{parse_content_range, parse_range};
use super::ticket::{BackendUrl, TicketSpec, parse_url, py_repr, validate_id};
use std::path::Component;

/// Image size the `Range` parser checks against.
const TOTAL: u64 = 1 << 30;

/// Which parser gets the rest of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Selector {
    /// `Range` header (GET).
    Range = 0,
    /// `Content-Range` header (PUT).
    ContentRange = 1,
    /// PATCH JSON body.
    Patch = 2,
    /// Ticket JSON (control API PUT).
    Ticket = 3,
    /// Ticket URL (`file:` / `nbd:unix:`).
    Url = 4,
    /// Path after `/images/` and the ticket id in it.
    ImagePath = 5,
}

/// Feed `input[1..]` to the parser `input[0] % 6` selects.
///
/// # Panics
/// Only when a parser accepts something it promises to refuse.
pub fn request_bytes(input: &[u8]) {
    let Some((&sel, rest)) = input.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match sel % 6 {
        0 => {
            if let Ok(r) = parse_range(&text, TOTAL) {
                assert!(r.last.is_none_or(|l| l >= r.first), "{text:?}: {r:?}");
            }
        }
        1 => {
            if let Ok(r) = parse_content_range(&text) {
                assert!(r.last.is_none_or(|l| l >= r.first), "{text:?}: {r:?}");
            }
        }
        2 => match parse_patch(rest) {
            Ok(PatchOp::Zero { .. } | PatchOp::Flush) => {}
            Err(e) => {
                let _ = e.to_string();
            }
        },
        3 => {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            let _ = py_repr(&value);
            match TicketSpec::parse(&value, 60) {
                Ok(spec) => {
                    assert!(validate_id(&spec.uuid).is_ok(), "{spec:?}");
                    assert_eq!(parse_url(&spec.url).ok(), Some(spec.backend.clone()));
                    check_backend(&spec.backend);
                    let _ = spec.log_label();
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        4 => {
            if let Ok(b) = parse_url(&text) {
                check_backend(&b);
            }
        }
        _ => {
            if let Some((id, _)) = parse_image_path(&text) {
                if validate_id(id).is_ok() {
                    assert!(!id.contains('/') && id != "." && id != "..", "{id:?}");
                }
            }
        }
    }
}

/// Accepted paths are absolute and normalized.
fn check_backend(b: &BackendUrl) {
    let path = match b {
        BackendUrl::File(p) => p.as_path(),
        BackendUrl::Nbd(a) => a.socket.as_path(),
    };
    assert!(path.is_absolute(), "{b:?}");
    assert!(
        path.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{b:?}"
    );
}

/// Seed inputs: a selector byte and the text.
pub fn seeds() -> Vec<Vec<u8>> {
    let cases: &[(Selector, &str)] = &[
        (Selector::Range, "bytes=0-"),
        (Selector::Range, "bytes=0-511"),
        (Selector::Range, "bytes=-512"),
        (Selector::Range, "bytes=10-5"),
        (Selector::Range, "bytes=0-1,4-5"),
        (Selector::Range, "bytes=18446744073709551615-"),
        (Selector::Range, "bytes=99999999999999999999-"),
        (Selector::ContentRange, "bytes 0-511/1024"),
        (Selector::ContentRange, "bytes 0-*/*"),
        (Selector::ContentRange, "bytes 512-1023/*"),
        (Selector::ContentRange, "bytes 5-4/10"),
        (Selector::ContentRange, "bytes 0-10/10"),
        (
            Selector::Patch,
            r#"{"op": "zero", "size": 4096, "offset": 0, "flush": true}"#,
        ),
        (Selector::Patch, r#"{"op": "flush"}"#),
        (Selector::Patch, r#"{"op": "zero", "size": -1}"#),
        (
            Selector::Patch,
            r#"{"op": "zero", "size": 1.5, "flush": "yes"}"#,
        ),
        (Selector::Patch, r#"{"op": ["zero"]}"#),
        (Selector::Patch, r#"[1, 2"#),
        (
            Selector::Ticket,
            r#"{"uuid": "4b1c5a6e-ticket", "size": 1073741824, "ops": ["read", "write"],
               "timeout": 300, "inactivity_timeout": 60, "url": "file:///var/tmp/disk.img",
               "transfer_id": "t-1", "filename": "disk.img", "sparse": true, "dirty": false}"#,
        ),
        (
            Selector::Ticket,
            r#"{"uuid": "nbd", "size": 1048576, "ops": ["read"], "timeout": 30,
               "url": "nbd:unix:/run/nbd.sock:exportname=disk"}"#,
        ),
        (
            Selector::Ticket,
            r#"{"uuid": "..", "size": -1, "ops": "read", "timeout": 1e3, "url": "file:///a/../b"}"#,
        ),
        (Selector::Ticket, r#"{"uuid": "x", "filename": "a\"b"}"#),
        (Selector::Url, "file:///var/tmp/disk.img"),
        (Selector::Url, "nbd:unix:/run/nbd.sock"),
        (Selector::Url, "nbd:unix:/run/nbd.sock:exportname=a:b"),
        (Selector::Url, "nbd://host:10809/export"),
        (Selector::Url, "file:///a/./b"),
        (Selector::Url, "file:///a%2f..%2fb"),
        (Selector::ImagePath, "abc"),
        (Selector::ImagePath, "abc/extents"),
        (Selector::ImagePath, "abc/checksum/algorithms"),
        (Selector::ImagePath, "../etc/passwd"),
        (Selector::ImagePath, "/checksum"),
    ];
    cases
        .iter()
        .map(|(sel, text)| {
            let mut v = vec![*sel as u8];
            v.extend_from_slice(text.as_bytes());
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn seeds_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/imageio_requests")
    }

    #[test]
    fn seeds_parse_without_panics() {
        for s in seeds() {
            request_bytes(&s);
        }
        request_bytes(&[]);
        request_bytes(&[3, 0xff, 0xfe]);
        assert!(matches!(
            parse_patch(br#"{"op": "zero", "size": 8}"#),
            Ok(PatchOp::Zero {
                size: 8,
                offset: 0,
                flush: false
            })
        ));
    }

    /// The files in `fuzz/seeds/imageio_requests` are [`seeds`];
    /// `NBDBRIDGE_WRITE_SEEDS=1` rewrites them.
    #[test]
    fn seed_files_replay() {
        let dir = seeds_dir();
        if std::env::var_os("NBDBRIDGE_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).expect("seed dir");
            for (i, s) in seeds().iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("write seed");
            }
        }
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("fuzz/seeds/imageio_requests") {
            request_bytes(&std::fs::read(e.expect("seed entry").path()).expect("seed"));
            n += 1;
        }
        assert!(n >= seeds().len(), "{n} seeds in {}", dir.display());
    }
}
