//! `Range` (GET) and `Content-Range` (PUT) headers, parsed strictly: a
//! header we do not understand is an error, never "no range", so a client
//! can not be sent or write the wrong bytes.

use super::error::ApiError;

/// `Range: bytes=first-[last]`, one range only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub first: u64,
    /// Last byte, inclusive; `None` for an open range (`bytes=first-`).
    pub last: Option<u64>,
}

/// `Content-Range: bytes first-(last|*)/(complete|*)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// Offset of the first body byte.
    pub first: u64,
    /// Last byte, inclusive, if given.
    pub last: Option<u64>,
}

impl ContentRange {
    /// Bytes the range names, if it names its last byte. Never overflows:
    /// [`parse_content_range`] refuses a range whose length is not a u64.
    pub fn length(&self) -> Option<u64> {
        self.last
            .and_then(|last| last.checked_sub(self.first))
            .and_then(|n| n.checked_add(1))
    }
}

/// Parse a `Range` header value. Errors are 416, with imageio's texts.
pub fn parse_range(header: &str, total: u64) -> Result<ByteRange, ApiError> {
    let invalid = || {
        ApiError::range(
            format!("Cannot satisfy range '{header}', invalid range or multiple ranges"),
            total,
        )
    };
    let spec = header.strip_prefix("bytes=").ok_or_else(invalid)?;
    let (first, last) = spec.split_once('-').ok_or_else(invalid)?;
    if !is_digits_or_empty(first) || !is_digits_or_empty(last) {
        return Err(invalid());
    }
    match (first.is_empty(), last.is_empty()) {
        (true, true) => Err(ApiError::range(
            format!("Cannot satisfy range '{header}', no first or last"),
            total,
        )),
        (true, false) => Err(ApiError::range(
            "suffix-byte-range-spec not supported yet",
            total,
        )),
        (false, true) => Ok(ByteRange {
            first: first.parse().map_err(|_| invalid())?,
            last: None,
        }),
        (false, false) => {
            let first: u64 = first.parse().map_err(|_| invalid())?;
            let last: u64 = last.parse().map_err(|_| invalid())?;
            if first > last {
                return Err(ApiError::range(
                    format!("Cannot satisfy range '{header}', first > last"),
                    total,
                ));
            }
            Ok(ByteRange {
                first,
                last: Some(last),
            })
        }
    }
}

/// Parse a `Content-Range` header value. Errors are 400, with imageio's texts.
pub fn parse_content_range(header: &str) -> Result<ContentRange, ApiError> {
    let invalid = || ApiError::BadRequest(format!("Invalid Content-Range '{header}'"));
    let spec = header.strip_prefix("bytes ").ok_or_else(invalid)?;
    let (span, complete) = spec.split_once('/').ok_or_else(invalid)?;
    let (first, last) = span.split_once('-').ok_or_else(invalid)?;
    let first = parse_digits(first).ok_or_else(invalid)?;
    let last = match last {
        "*" => None,
        s => Some(parse_digits(s).ok_or_else(invalid)?),
    };
    let complete = match complete {
        "*" => None,
        s => Some(parse_digits(s).ok_or_else(invalid)?),
    };
    if let Some(last) = last {
        if last < first {
            return Err(ApiError::BadRequest(format!(
                "Invalid Content-Range '{header}', first > last"
            )));
        }
        if (last - first).checked_add(1).is_none() {
            return Err(ApiError::BadRequest(format!(
                "Invalid Content-Range '{header}', the range is longer than 2^64-1 bytes"
            )));
        }
        if complete.is_some_and(|c| last >= c) {
            return Err(ApiError::BadRequest(format!(
                "Invalid Content-Range '{header}', last >= complete"
            )));
        }
    }
    Ok(ContentRange { first, last })
}

fn is_digits_or_empty(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: ApiError) -> (u16, String) {
        (e.status().as_u16(), e.to_string())
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("bytes=0-99", 8).unwrap(),
            ByteRange {
                first: 0,
                last: Some(99)
            }
        );
        assert_eq!(
            parse_range("bytes=5-", 8).unwrap(),
            ByteRange {
                first: 5,
                last: None
            }
        );
        assert_eq!(
            msg(parse_range("bytes=-100", 8).unwrap_err()),
            (416, "suffix-byte-range-spec not supported yet".into())
        );
        assert_eq!(
            msg(parse_range("bytes=0-1,5-6", 8).unwrap_err()),
            (
                416,
                "Cannot satisfy range 'bytes=0-1,5-6', invalid range or multiple ranges".into()
            )
        );
        assert_eq!(msg(parse_range("items=0-5", 8).unwrap_err()).0, 416);
        assert_eq!(
            msg(parse_range("bytes=10-5", 8).unwrap_err()),
            (
                416,
                "Cannot satisfy range 'bytes=10-5', first > last".into()
            )
        );
        assert_eq!(
            msg(parse_range("bytes=99999999999999999999-", 8).unwrap_err()).0,
            416
        );
        assert_eq!(msg(parse_range("bytes= 1-2", 8).unwrap_err()).0, 416);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 300-999/*").unwrap(),
            ContentRange {
                first: 300,
                last: Some(999)
            }
        );
        assert_eq!(
            parse_content_range("bytes 7-*/*").unwrap(),
            ContentRange {
                first: 7,
                last: None
            }
        );
        assert_eq!(parse_content_range("bytes 0-9/10").unwrap().last, Some(9));
        assert_eq!(
            msg(parse_content_range("0-11").unwrap_err()),
            (400, "Invalid Content-Range '0-11'".into())
        );
        assert_eq!(
            msg(parse_content_range("bytes 20-11/*").unwrap_err()),
            (
                400,
                "Invalid Content-Range 'bytes 20-11/*', first > last".into()
            )
        );
        assert_eq!(
            msg(parse_content_range("bytes 0-10/10").unwrap_err()),
            (
                400,
                "Invalid Content-Range 'bytes 0-10/10', last >= complete".into()
            )
        );
        assert_eq!(msg(parse_content_range("bytes -1-2/*").unwrap_err()).0, 400);
        // A length that does not fit in 64 bits is refused, not wrapped.
        let max = u64::MAX;
        let e = msg(parse_content_range(&format!("bytes 0-{max}/*")).unwrap_err());
        assert_eq!(e.0, 400);
        assert!(e.1.contains("longer than"), "{}", e.1);
        let top = parse_content_range(&format!("bytes 1-{max}/*")).unwrap();
        assert_eq!(top.length(), Some(max));
        assert_eq!(parse_content_range("bytes 5-*/*").unwrap().length(), None);
        assert_eq!(
            parse_content_range("bytes 5-5/*").unwrap().length(),
            Some(1)
        );
    }
}
