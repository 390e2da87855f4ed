//! Progress accounting of a ticket: the byte ranges its ops moved.

use std::sync::atomic::{AtomicU64, Ordering};

/// Merged, sorted byte ranges `[start, end)`: the bytes a ticket moved.
#[derive(Debug, Default, Clone)]
pub(super) struct RangeList(pub(super) Vec<(u64, u64)>);

impl RangeList {
    pub(super) fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut merged = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.0 {
            if e < merged.0 {
                out.push((s, e));
            } else if s > merged.1 {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((s, e));
            } else {
                merged = (merged.0.min(s), merged.1.max(e));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.0 = out;
    }

    pub(super) fn sum(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Progress of one running op.
#[derive(Debug)]
pub struct OpProgress {
    pub(super) offset: u64,
    pub(super) done: AtomicU64,
}

impl OpProgress {
    /// Count `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        let mut r = RangeList::default();
        r.add(0, 10);
        r.add(20, 30);
        r.add(5, 25);
        r.add(40, 50);
        assert_eq!(r.0, vec![(0, 30), (40, 50)]);
        assert_eq!(r.sum(), 40);
    }
}
