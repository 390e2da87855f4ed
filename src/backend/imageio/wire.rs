//! The JSON imageio speaks: OPTIONS and extents answers, PATCH requests.

use crate::backend::Extent;
use serde::{Deserialize, Serialize};

/// The answer to `OPTIONS /images/<ticket>`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Options {
    /// `checksum`, `extents`, `flush`, `zero`.
    #[serde(default)]
    pub features: Vec<String>,
    /// The data server's local unix socket, if it has one.
    #[serde(default)]
    pub unix_socket: Option<String>,
    /// Advised number of reading connections.
    #[serde(default)]
    pub max_readers: Option<u32>,
    /// Advised number of writing connections.
    #[serde(default)]
    pub max_writers: Option<u32>,
}

impl Options {
    /// Whether the server offers `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// One element of `GET .../extents`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct WireExtent {
    /// Offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Reads as zeroes (context=zero).
    #[serde(default)]
    pub zero: bool,
    /// Not allocated (context=zero).
    #[serde(default)]
    pub hole: bool,
    /// Changed since the checkpoint (context=dirty).
    #[serde(default)]
    pub dirty: bool,
}

impl WireExtent {
    /// As an allocation extent.
    pub fn allocation(&self) -> Extent {
        Extent {
            offset: self.start,
            len: self.length,
            hole: self.hole,
            zero: self.zero,
        }
    }

    /// As a dirty extent (`zero` carries "dirty").
    pub fn dirty(&self) -> Extent {
        Extent {
            offset: self.start,
            len: self.length,
            hole: false,
            zero: self.dirty,
        }
    }
}

/// Body of `PATCH /images/<ticket>`.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Patch {
    /// Zero a range.
    Zero {
        /// Offset.
        offset: u64,
        /// Length.
        size: u64,
        /// Flush before answering.
        flush: bool,
    },
    /// Flush.
    Flush,
}

/// Parse an extents answer, refusing absurd ones.
///
/// # Errors
/// Not the JSON list imageio sends, or an extent that ends past the
/// largest offset (`start + length` > `u64::MAX`).
pub fn parse_extents(body: &[u8]) -> Result<Vec<WireExtent>, String> {
    let list = serde_json::from_slice::<Vec<WireExtent>>(body)
        .map_err(|e| format!("bad extents JSON: {e}"))?;
    if let Some(e) = list
        .iter()
        .find(|e| e.start.checked_add(e.length).is_none())
    {
        return Err(format!(
            "bad extents: start {} + length {} passes the largest offset",
            e.start, e.length
        ));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_of_the_real_daemon() {
        let o: Options = serde_json::from_str(
            r#"{"unix_socket": "\u0000/org/ovirt/imageio", "features": ["checksum","extents","flush","zero"], "max_readers": 8, "max_writers": 1}"#,
        )
        .unwrap();
        assert!(o.has("zero") && o.has("flush") && !o.has("dirty"));
        assert_eq!((o.max_readers, o.max_writers), (Some(8), Some(1)));
    }

    #[test]
    fn extents_and_patches() {
        let e = parse_extents(
            br#"[{"start":0,"length":65536,"zero":false,"hole":false},{"start":65536,"length":4096,"zero":true,"hole":true}]"#,
        )
        .unwrap();
        assert_eq!(e[1].allocation().offset, 65536);
        assert!(e[1].allocation().hole);
        assert!(parse_extents(b"{}").is_err());
        // Ends past u64::MAX are refused, the largest end is not.
        let max = u64::MAX;
        let over = format!(r#"[{{"start":{max},"length":1}}]"#);
        let err = parse_extents(over.as_bytes()).unwrap_err();
        assert!(err.contains("passes the largest offset"), "{err}");
        let over = format!(r#"[{{"start":0,"length":4096}},{{"start":4096,"length":{max}}}]"#);
        assert!(parse_extents(over.as_bytes()).is_err());
        let edge = format!(r#"[{{"start":1,"length":{}}}]"#, max - 1);
        assert_eq!(parse_extents(edge.as_bytes()).unwrap()[0].length, max - 1);
        let z = serde_json::to_string(&Patch::Zero {
            offset: 1,
            size: 2,
            flush: false,
        })
        .unwrap();
        assert_eq!(z, r#"{"op":"zero","offset":1,"size":2,"flush":false}"#);
        assert_eq!(
            serde_json::to_string(&Patch::Flush).unwrap(),
            r#"{"op":"flush"}"#
        );
    }
}
