//! The image's zero/hole map as imageio reported it once, kept coherent
//! with the writes and zeroes that go through this bridge.

use crate::backend::Extent;

/// Sorted, contiguous, merged runs covering `0..size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    runs: Vec<Extent>,
    size: u64,
}

impl ExtentMap {
    /// Build from imageio's extents; gaps read as data, anything past
    /// `size` is cut off.
    pub fn new(mut extents: Vec<Extent>, size: u64) -> Self {
        extents.sort_by_key(|e| e.offset);
        let mut map = ExtentMap {
            runs: vec![Extent {
                offset: 0,
                len: size,
                hole: false,
                zero: false,
            }],
            size,
        };
        if size == 0 {
            map.runs.clear();
        }
        for e in extents {
            if e.offset < size && e.len > 0 {
                let len = e.len.min(size - e.offset);
                map.set(e.offset, len, e.hole, e.zero);
            }
        }
        map
    }

    /// Mark `offset..offset+len` with a status (clamped to the size).
    pub fn set(&mut self, offset: u64, len: u64, hole: bool, zero: bool) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let mut out: Vec<Extent> = Vec::with_capacity(self.runs.len() + 2);
        let mut placed = false;
        for r in &self.runs {
            let r_end = r.offset + r.len;
            if r_end <= offset || r.offset >= end {
                if r.offset >= end && !placed {
                    push(&mut out, offset, end - offset, hole, zero);
                    placed = true;
                }
                push(&mut out, r.offset, r.len, r.hole, r.zero);
                continue;
            }
            if r.offset < offset {
                push(&mut out, r.offset, offset - r.offset, r.hole, r.zero);
            }
            if !placed {
                push(&mut out, offset, end - offset, hole, zero);
                placed = true;
            }
            if r_end > end {
                push(&mut out, end, r_end - end, r.hole, r.zero);
            }
        }
        if !placed {
            push(&mut out, offset, end - offset, hole, zero);
        }
        self.runs = out;
    }

    /// Runs overlapping `offset..offset+len`, the first starting at
    /// `offset`, the last possibly ending past the range; at most `max`.
    pub fn query(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let end = offset.saturating_add(len).min(self.size);
        let first = self.runs.partition_point(|r| r.offset + r.len <= offset);
        let mut out = Vec::new();
        for r in self.runs.iter().skip(first) {
            if r.offset >= end || out.len() >= max.max(1) {
                break;
            }
            let start = r.offset.max(offset);
            out.push(Extent {
                offset: start,
                len: r.offset + r.len - start,
                hole: r.hole,
                zero: r.zero,
            });
        }
        out
    }

    /// Number of runs (for tests and logs).
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether the map is empty (a zero-sized image).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

fn push(out: &mut Vec<Extent>, offset: u64, len: u64, hole: bool, zero: bool) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.hole == hole && last.zero == zero && last.offset + last.len == offset {
            last.len += len;
            return;
        }
    }
    out.push(Extent {
        offset,
        len,
        hole,
        zero,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64, z: bool) -> Extent {
        Extent {
            offset,
            len,
            hole: z,
            zero: z,
        }
    }

    #[test]
    fn writes_split_and_merge() {
        let mut m = ExtentMap::new(vec![e(0, 100, true)], 100);
        assert_eq!(m.len(), 1);
        m.set(10, 20, false, false);
        assert_eq!(
            m.query(0, 100, 10),
            vec![e(0, 10, true), e(10, 20, false), e(30, 70, true)]
        );
        m.set(30, 70, false, false);
        assert_eq!(m.query(0, 100, 10), vec![e(0, 10, true), e(10, 90, false)]);
        m.set(0, 100, true, true);
        assert_eq!(m.len(), 1);
        assert_eq!(m.query(50, 10, 10), vec![e(50, 50, true)]);
    }

    #[test]
    fn gaps_are_data_and_past_end_is_cut() {
        let m = ExtentMap::new(vec![e(50, 100, true)], 100);
        assert_eq!(m.query(0, 100, 10), vec![e(0, 50, false), e(50, 50, true)]);
        assert_eq!(m.query(0, 100, 1), vec![e(0, 50, false)]);
        assert!(m.query(100, 10, 10).is_empty());
    }
}
