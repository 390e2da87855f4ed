//! A set of byte ranges: disjoint, non-adjacent half-open runs kept in a
//! `BTreeMap` (start → end), so that adding or removing a range costs
//! O(log n) plus the runs it merges or cuts.

use std::collections::BTreeMap;

/// Disjoint byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    runs: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes in the set.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether the set holds no byte.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs, in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// Whether `[start, end)` lies inside one run (an empty range always does).
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        match self.runs.range(..=start).next_back() {
            Some((_, &e)) => e >= end,
            None => false,
        }
    }

    /// Add `[start, end)`, merging with the runs it touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut lo, mut hi) = (start, end);
        // A run that begins before `start` and reaches it.
        if let Some((&s, &e)) = self.runs.range(..=start).next_back()
            && e >= start
        {
            lo = s;
            hi = hi.max(e);
        }
        // Every run that begins inside [lo, hi] is swallowed.
        let swallowed: Vec<(u64, u64)> = self.runs.range(lo..=hi).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in swallowed {
            self.runs.remove(&s);
            self.total -= e - s;
            hi = hi.max(e);
        }
        self.runs.insert(lo, hi);
        self.total += hi - lo;
    }

    /// Take `[start, end)` out.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut cut: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = self.runs.range(..start).next_back()
            && e > start
        {
            cut.push((s, e));
        }
        cut.extend(self.runs.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in cut {
            self.runs.remove(&s);
            self.total -= e - s;
            if s < start {
                self.runs.insert(s, start);
                self.total += start - s;
            }
            if e > end {
                self.runs.insert(end, e);
                self.total += e - end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    /// The plain oracle: one bool per byte of a small space.
    fn oracle(ops: &[(bool, u64, u64)], space: usize) -> Vec<bool> {
        let mut bits = vec![false; space];
        for &(add, s, e) in ops {
            for b in bits.iter_mut().take(e as usize).skip(s as usize) {
                *b = add;
            }
        }
        bits
    }

    fn runs_of(bits: &[bool]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bits.len() {
            if bits[i] {
                let s = i;
                while i < bits.len() && bits[i] {
                    i += 1;
                }
                out.push((s as u64, i as u64));
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn every_pair_of_operations_on_a_small_space_matches_a_bitmap() {
        // All ranges in [0, 7), every sequence of three adds/removes.
        let ranges: Vec<(u64, u64)> = (0..7).flat_map(|s| (s..=7).map(move |e| (s, e))).collect();
        let ops: Vec<(bool, u64, u64)> = ranges
            .iter()
            .flat_map(|&(s, e)| [(true, s, e), (false, s, e)])
            .collect();
        let mut checked = 0;
        for a in &ops {
            for b in &ops {
                for c in &ops {
                    let seq = [*a, *b, *c];
                    let mut set = RangeSet::new();
                    for &(add, s, e) in &seq {
                        if add {
                            set.insert(s, e);
                        } else {
                            set.remove(s, e);
                        }
                    }
                    let bits = oracle(&seq, 8);
                    let want = runs_of(&bits);
                    let got: Vec<_> = set.runs().collect();
                    assert_eq!(got, want, "after {seq:?}");
                    assert_eq!(set.total(), bits.iter().filter(|b| **b).count() as u64);
                    for &(s, e) in &ranges {
                        let all = (s..e).all(|i| bits[i as usize]);
                        assert_eq!(set.contains(s, e), all, "contains({s},{e}) after {seq:?}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 100_000);
    }

    #[test]
    fn a_million_runs_build_and_drain_in_linear_steps() {
        let mut set = RangeSet::new();
        for i in 0..1_000_000u64 {
            set.insert(i * 8, i * 8 + 4);
        }
        assert_eq!(set.runs().count(), 1_000_000);
        assert_eq!(set.total(), 4_000_000);
        // One read over everything takes it all out.
        set.remove(0, u64::MAX);
        assert!(set.is_empty());
        assert_eq!(set.total(), 0);
    }

    #[test]
    fn ranges_at_the_top_of_the_space() {
        let mut set = RangeSet::new();
        set.insert(u64::MAX - 10, u64::MAX);
        set.insert(0, 1);
        assert_eq!(set.total(), 11);
        set.remove(u64::MAX - 5, u64::MAX);
        assert_eq!(
            set.runs().collect::<Vec<_>>(),
            vec![(0, 1), (u64::MAX - 10, u64::MAX - 5)]
        );
    }
}
