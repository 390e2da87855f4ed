//! The image's zero/hole map as imageio reported it once, kept coherent
//! with the writes and zeroes that go through this bridge.
//!
//! An interval map: runs keyed by their start in a `BTreeMap`, covering
//! `0..size` with no gap, neighbours always of different status. Building
//! from imageio's (sorted, disjoint) extents is one pass; an update splits
//! at most two runs, drops the runs it covers and merges with its
//! neighbours, so it costs O(log n) plus the runs it removes (each run is
//! removed at most once after being made). A disk fragmented into 10^6
//! extents no longer stalls `connect` or every write.

use crate::backend::Extent;
use std::collections::BTreeMap;

/// One run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    hole: bool,
    zero: bool,
}

/// A run: its length and status (its start is the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    len: u64,
    status: Status,
}

/// Sorted, contiguous, merged runs covering `0..size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    runs: BTreeMap<u64, Run>,
    size: u64,
}

const DATA: Status = Status {
    hole: false,
    zero: false,
};

impl ExtentMap {
    /// Build from imageio's extents; gaps read as data, anything past
    /// `size` is cut off, and where extents overlap the one starting later
    /// wins (the one later in the list for equal starts).
    pub fn new(mut extents: Vec<Extent>, size: u64) -> Self {
        extents.sort_by_key(|e| e.offset);
        if let Some(runs) = Self::one_pass(&extents, size) {
            return ExtentMap { runs, size };
        }
        // Overlapping extents (no imageio server sends them): apply in order.
        let mut map = ExtentMap::new(Vec::new(), size);
        for e in extents {
            map.set(e.offset, e.len, e.hole, e.zero);
        }
        map
    }

    /// The runs of sorted, disjoint `extents` in one pass; `None` when
    /// two overlap.
    fn one_pass(extents: &[Extent], size: u64) -> Option<BTreeMap<u64, Run>> {
        let mut out: Vec<(u64, Run)> = Vec::with_capacity(extents.len() + 1);
        let mut at = 0u64;
        for e in extents {
            if e.offset >= size || e.len == 0 {
                continue;
            }
            if e.offset < at {
                return None;
            }
            if e.offset > at {
                push(&mut out, at, e.offset - at, DATA);
            }
            let end = e.offset.saturating_add(e.len).min(size);
            let status = Status {
                hole: e.hole,
                zero: e.zero,
            };
            push(&mut out, e.offset, end - e.offset, status);
            at = end;
        }
        if at < size {
            push(&mut out, at, size - at, DATA);
        }
        // Sorted input: the map is built in bulk, in linear time.
        Some(out.into_iter().collect())
    }

    /// Mark `offset..offset+len` with a status (clamped to the size).
    pub fn set(&mut self, offset: u64, len: u64, hole: bool, zero: bool) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let status = Status { hole, zero };
        self.split_at(offset);
        self.split_at(end);
        let covered: Vec<u64> = self.runs.range(offset..end).map(|(&k, _)| k).collect();
        for k in covered {
            self.runs.remove(&k);
        }
        let mut start = offset;
        let mut run = Run {
            len: end - offset,
            status,
        };
        if let Some((&prev, prev_run)) = self.runs.range(..offset).next_back() {
            if prev_run.status == status {
                start = prev;
                run.len += prev_run.len;
            }
        }
        if let Some(next) = self.runs.get(&end).copied() {
            if next.status == status {
                self.runs.remove(&end);
                run.len += next.len;
            }
        }
        self.runs.insert(start, run);
    }

    /// Make `at` the start of a run (no-op at 0, at the end, or where a run
    /// already starts). Leaves two neighbours of equal status, which the
    /// caller's update then replaces or merges.
    fn split_at(&mut self, at: u64) {
        if at == 0 || at >= self.size {
            return;
        }
        let Some((&start, run)) = self.runs.range_mut(..=at).next_back() else {
            return;
        };
        if start == at {
            return;
        }
        let tail = Run {
            len: start + run.len - at,
            status: run.status,
        };
        run.len = at - start;
        self.runs.insert(at, tail);
    }

    /// Runs overlapping `offset..offset+len`, the first starting at
    /// `offset`, the last possibly ending past the range; at most `max`.
    pub fn query(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        if offset >= end {
            return out;
        }
        let first = self
            .runs
            .range(..=offset)
            .next_back()
            .map_or(0, |(&start, _)| start);
        for (&start, run) in self.runs.range(first..) {
            if start >= end || out.len() >= max.max(1) {
                break;
            }
            let from = start.max(offset);
            out.push(Extent {
                offset: from,
                len: start + run.len - from,
                hole: run.status.hole,
                zero: run.status.zero,
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

    /// Check the invariants: runs cover `0..size` with no gap or overlap,
    /// none is empty, neighbours differ. For tests.
    #[cfg(test)]
    fn check(&self) {
        let mut at = 0;
        let mut last: Option<Status> = None;
        for (&start, run) in &self.runs {
            assert_eq!(start, at, "gap or overlap at {start}");
            assert!(run.len > 0, "empty run at {start}");
            assert_ne!(last, Some(run.status), "unmerged neighbours at {start}");
            last = Some(run.status);
            at = start + run.len;
        }
        assert_eq!(at, self.size, "runs do not reach the size");
    }
}

/// Append a run, merging with the last one when they match.
fn push(out: &mut Vec<(u64, Run)>, offset: u64, len: u64, status: Status) {
    if len == 0 {
        return;
    }
    if let Some((start, last)) = out.last_mut() {
        if last.status == status && *start + last.len == offset {
            last.len += len;
            return;
        }
    }
    out.push((offset, Run { len, status }));
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

    /// A tiny xorshift: deterministic random updates without a crate.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The oracle: one status per byte; a query answers maximal runs.
    fn oracle_query(bytes: &[(bool, bool)], offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let size = bytes.len() as u64;
        let end = offset.saturating_add(len).min(size);
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end && out.len() < max.max(1) {
            let (hole, zero) = bytes[at as usize];
            let mut stop = at + 1;
            while stop < size && bytes[stop as usize] == (hole, zero) {
                stop += 1;
            }
            out.push(Extent {
                offset: at,
                len: stop - at,
                hole,
                zero,
            });
            at = stop;
        }
        out
    }

    #[test]
    fn random_updates_and_queries_match_a_per_byte_oracle() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let size = 1 + rng.below(300);
            // Random starting extents, possibly overlapping and past the end.
            let count = rng.below(12);
            let extents: Vec<Extent> = (0..count)
                .map(|_| {
                    let s = rng.below(4);
                    Extent {
                        offset: rng.below(size + 20),
                        len: rng.below(80),
                        hole: s & 1 != 0,
                        zero: s & 2 != 0,
                    }
                })
                .collect();
            let mut bytes = vec![(false, false); size as usize];
            let mut sorted = extents.clone();
            sorted.sort_by_key(|e| e.offset);
            for e in &sorted {
                for b in e.offset..e.offset.saturating_add(e.len).min(size) {
                    bytes[b as usize] = (e.hole, e.zero);
                }
            }
            let mut map = ExtentMap::new(extents, size);
            map.check();
            for _ in 0..40 {
                let s = rng.below(4);
                let (offset, len) = (rng.below(size + 10), rng.below(size / 2 + 5));
                map.set(offset, len, s & 1 != 0, s & 2 != 0);
                for b in offset..offset.saturating_add(len).min(size) {
                    bytes[b as usize] = (s & 1 != 0, s & 2 != 0);
                }
                map.check();
                let (q, ql, max) = (
                    rng.below(size + 5),
                    rng.below(size + 5),
                    rng.below(6) as usize,
                );
                let got = map.query(q, ql, max);
                // The map answers maximal runs, the last one to its end.
                assert_eq!(got, oracle_query(&bytes, q, ql, max), "round {round}");
            }
            let whole = map.query(0, size, usize::MAX);
            assert_eq!(whole.len(), map.len());
        }
    }

    /// 10^6 alternating extents: built in one pass, then updated; the
    /// structure stays exact (an O(n^2) map would not finish this test).
    #[test]
    fn a_million_extents_build_and_update() {
        const N: u64 = 1_000_000;
        let extents: Vec<Extent> = (0..N).map(|i| e(i * 4096, 4096, i % 2 == 1)).collect();
        let size = N * 4096;
        let mut map = ExtentMap::new(extents, size);
        assert_eq!(map.len(), N as usize);
        // Fill 1000 holes with data: each merges three runs into one.
        for i in 0..1000u64 {
            map.set((2 * i + 1) * 4096 * 100 + 4096, 4096, false, false);
        }
        assert_eq!(map.len(), N as usize - 2000);
        // Zero the second half at once: one run replaces half a million.
        map.set(size / 2, size / 2, true, true);
        map.check();
        // It merged with the hole before it (extent 499999).
        assert_eq!(map.len(), 498_000);
        assert_eq!(
            map.query(size / 2, 1, 10),
            vec![e(size / 2, size / 2, true)]
        );
        assert_eq!(
            map.query(size / 2 - 8192, 4096, 1),
            vec![e(size / 2 - 8192, 4096, false)]
        );
    }
}
