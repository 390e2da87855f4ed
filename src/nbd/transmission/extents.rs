//! Backend extents to wire extents: 64-bit inside, clipped to the request,
//! merged when the status is equal, capped, narrowed only on encode.

use crate::backend::{Extent, ExtentContext};
use crate::nbd::consts::*;

/// Most extents sent in one block status chunk (the spec allows 2^20).
pub const MAX_EXTENTS: usize = 64 * 1024;

/// Wire status of an extent in `context`.
pub fn status(e: &Extent, context: ExtentContext) -> u32 {
    match context {
        ExtentContext::Allocation => {
            let mut s = 0;
            if e.hole {
                s |= NBD_STATE_HOLE;
            }
            if e.zero {
                s |= NBD_STATE_ZERO;
            }
            s
        }
        ExtentContext::Dirty => {
            if e.zero {
                NBD_STATE_DIRTY
            } else {
                0
            }
        }
    }
}

/// (length, status) pairs for `offset..offset+len`: contiguous from
/// `offset`, never past the request's end, neighbours of equal status
/// merged, at most one with `req_one`, at most [`MAX_EXTENTS`]. Empty when
/// the backend's extents do not start at `offset`.
pub fn to_wire(
    extents: &[Extent],
    context: ExtentContext,
    offset: u64,
    len: u64,
    req_one: bool,
) -> Vec<(u64, u32)> {
    let end = offset.saturating_add(len);
    let cap = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    for e in extents {
        let e_end = e.offset.saturating_add(e.len).min(end);
        if e.offset > pos {
            break;
        }
        if e_end <= pos {
            continue;
        }
        let st = status(e, context);
        match out.last_mut() {
            Some(last) if last.1 == st => last.0 += e_end - pos,
            _ => {
                if out.len() == cap {
                    break;
                }
                out.push((e_end - pos, st));
            }
        }
        pos = e_end;
        if pos >= end {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, hole: bool) -> Extent {
        Extent {
            offset,
            len,
            hole,
            zero: hole,
        }
    }

    #[test]
    fn clip_merge_cap() {
        let e = [
            ext(0, 4096, false),
            ext(4096, 4096, false),
            ext(8192, 1 << 20, true),
        ];
        let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
        assert_eq!(
            to_wire(&e, ExtentContext::Allocation, 0, 10000, false),
            vec![(8192, 0), (10000 - 8192, hz)]
        );
        assert_eq!(
            to_wire(&e, ExtentContext::Allocation, 100, 10000, true),
            vec![(8092, 0)]
        );
        assert!(to_wire(&e[1..], ExtentContext::Allocation, 0, 10, false).is_empty());
    }

    #[test]
    fn dirty_status() {
        let e = Extent {
            offset: 0,
            len: 10,
            hole: false,
            zero: true,
        };
        assert_eq!(status(&e, ExtentContext::Dirty), NBD_STATE_DIRTY);
    }
}
