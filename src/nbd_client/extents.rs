//! Zero and dirty extents the way ovirt-imageio's nbd backend reports them
//! (`nbdutil.extents` and `nbdutil.merged`): flags of `base:allocation`
//! (HOLE, ZERO) merged with `qemu:allocation-depth` (depth 0 = "backing":
//! not allocated in any layer) for `context=zero`, or with the dirty
//! bitmap (DIRTY) for `context=dirty`; consecutive extents with equal
//! flags joined (all the bits: two dirty extents stay apart when only
//! HOLE differs, as in imageio), the last one clipped to the end.

use crate::nbd::consts::{NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO};

/// imageio's private bit for "depth 0" extents.
const BACKING: u32 = 1 << 3;
/// imageio's private bit for dirty extents (`EXTENT_DIRTY`).
const DIRTY: u32 = 1 << 2;

/// One run of an export, as `extents?context=zero` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroExtent {
    /// Start offset.
    pub start: u64,
    /// Length, never 0.
    pub length: u64,
    /// Reads as zeroes.
    pub zero: bool,
    /// Not allocated in any layer of the image (needs allocation depth).
    pub hole: bool,
}

/// One run of an export, as `extents?context=dirty` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    /// Start offset.
    pub start: u64,
    /// Length, never 0.
    pub length: u64,
    /// Changed since the bitmap's checkpoint.
    pub dirty: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// Internal flags of a `base:allocation` descriptor.
pub fn alloc_flags(flags: u32) -> u32 {
    flags & (NBD_STATE_HOLE | NBD_STATE_ZERO)
}

/// Internal flags of a `qemu:allocation-depth` descriptor.
pub fn depth_flags(depth: u32) -> u32 {
    if depth == 0 { BACKING } else { 0 }
}

/// Internal flags of a dirty bitmap (`qemu:dirty-bitmap:NAME`) descriptor.
pub fn dirty_flags(flags: u32) -> u32 {
    if flags & NBD_STATE_DIRTY != 0 {
        DIRTY
    } else {
        0
    }
}

/// The descriptors of one block status reply for `context=dirty`:
/// `base:allocation` and the dirty bitmap (wire `(length, flags)`),
/// mapped to internal flags and overlaid with [`merge`].
pub fn dirty_descriptors(base: &[(u32, u32)], bitmap: &[(u32, u32)]) -> Vec<(u64, u32)> {
    let base: Vec<(u64, u32)> = base
        .iter()
        .map(|&(len, f)| (u64::from(len), alloc_flags(f)))
        .collect();
    let bitmap: Vec<(u64, u32)> = bitmap
        .iter()
        .map(|&(len, f)| (u64::from(len), dirty_flags(f)))
        .collect();
    merge(&base, &bitmap)
}

/// imageio's `nbdutil.merged`: overlay two descriptor lists, OR-ing their
/// flags; stops where the shorter list ends.
pub fn merge(a: &[(u64, u32)], b: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    let (mut ia, mut ib) = (a.iter().copied(), b.iter().copied());
    let (mut x, mut y) = (ia.next(), ib.next());
    while let (Some((la, fa)), Some((lb, fb))) = (x, y) {
        let n = la.min(lb);
        out.push((n, fa | fb));
        x = if la > n {
            Some((la - n, fa))
        } else {
            ia.next()
        };
        y = if lb > n {
            Some((lb - n, fb))
        } else {
            ib.next()
        };
    }
    out
}

/// Collects descriptors from successive block status replies into runs
/// over `0..end`, then [`ZeroExtent`]s or [`DirtyExtent`]s.
#[derive(Debug)]
pub struct ExtentBuilder {
    end: u64,
    offset: u64,
    cur: Option<(u64, u64, u32)>,
    /// Finished runs: start, length, internal flags.
    out: Vec<(u64, u64, u32)>,
    max_count: usize,
}

impl ExtentBuilder {
    /// A builder for an export of `end` bytes keeping at most `max_count`
    /// extents.
    pub fn new(end: u64, max_count: usize) -> Self {
        ExtentBuilder {
            end,
            offset: 0,
            cur: None,
            out: Vec::new(),
            max_count: max_count.max(1),
        }
    }

    /// Where the next block status request starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the whole export is covered, or the extent cap reached.
    pub fn finished(&self) -> bool {
        self.offset >= self.end || self.out.len() >= self.max_count
    }

    /// Add the descriptors of one reply; how many bytes they covered.
    pub fn push(&mut self, descriptors: &[(u64, u32)]) -> u64 {
        let before = self.offset;
        for &(len, flags) in descriptors {
            if self.finished() || len == 0 {
                break;
            }
            let len = len.min(self.end - self.offset);
            self.cur = match self.cur {
                None => Some((self.offset, len, flags)),
                Some((start, l, f)) if f == flags => Some((start, l + len, f)),
                Some(prev) => {
                    self.emit(prev);
                    Some((self.offset, len, flags))
                }
            };
            self.offset += len;
        }
        self.offset - before
    }

    fn emit(&mut self, run: (u64, u64, u32)) {
        self.out.push(run);
    }

    /// The runs so far (covering `0..offset()`): start, length, flags.
    fn runs(mut self) -> Vec<(u64, u64, u32)> {
        if let Some(cur) = self.cur.take() {
            self.emit(cur);
        }
        self.out
    }

    /// The zero extents so far (covering `0..offset()`).
    pub fn finish(self) -> Vec<ZeroExtent> {
        self.runs()
            .into_iter()
            .map(|(start, length, flags)| ZeroExtent {
                start,
                length,
                zero: flags & NBD_STATE_ZERO != 0,
                hole: flags & BACKING != 0,
            })
            .collect()
    }

    /// The dirty extents so far (covering `0..offset()`).
    pub fn finish_dirty(self) -> Vec<DirtyExtent> {
        self.runs()
            .into_iter()
            .map(|(start, length, flags)| DirtyExtent {
                start,
                length,
                dirty: flags & DIRTY != 0,
                zero: flags & NBD_STATE_ZERO != 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overlays_like_imageio() {
        let a = [(10, 1), (5, 2)];
        let b = [(4, 8), (20, 0)];
        assert_eq!(merge(&a, &b), vec![(4, 9), (6, 1), (5, 2)]);
        assert_eq!(merge(&a, &[]), vec![]);
    }

    #[test]
    fn builder_joins_and_clips() {
        let mut b = ExtentBuilder::new(100, 10);
        assert_eq!(b.push(&[(30, 0), (20, 0), (10, 3 | BACKING)]), 60);
        assert!(!b.finished());
        assert_eq!(b.push(&[(10, 3 | BACKING), (1000, 3)]), 40);
        assert!(b.finished());
        let out = b.finish();
        assert_eq!(
            out,
            vec![
                ZeroExtent {
                    start: 0,
                    length: 50,
                    zero: false,
                    hole: false
                },
                ZeroExtent {
                    start: 50,
                    length: 20,
                    zero: true,
                    hole: true
                },
                ZeroExtent {
                    start: 70,
                    length: 30,
                    zero: true,
                    hole: false
                },
            ]
        );
    }

    /// A fixed-seed generator (splitmix64): the same cases on every run.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// A number in `lo..=hi`.
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next_u64() % (hi - lo + 1)
        }

        fn one_in(&mut self, n: u64) -> bool {
            self.next_u64() % n == 0
        }
    }

    /// A descriptor list, byte by byte: the flags of each byte.
    fn per_byte(list: &[(u64, u32)]) -> Vec<u32> {
        list.iter()
            .flat_map(|&(len, f)| std::iter::repeat_n(f, len as usize))
            .collect()
    }

    /// The oracle of `merge`: cut at every boundary of either list (up to
    /// the shorter one's end), each piece with the OR of the bytes' flags.
    fn merge_oracle(a: &[(u64, u32)], b: &[(u64, u32)]) -> Vec<(u64, u32)> {
        let (fa, fb) = (per_byte(a), per_byte(b));
        let n = fa.len().min(fb.len());
        let mut cuts: Vec<usize> = Vec::new();
        for list in [a, b] {
            let mut at = 0;
            for &(len, _) in list {
                at += len as usize;
                if at < n {
                    cuts.push(at);
                }
            }
        }
        cuts.push(n);
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts {
            if cut > start {
                out.push(((cut - start) as u64, fa[start] | fb[start]));
                start = cut;
            }
        }
        out
    }

    /// Every list of up to 3 descriptors, lengths 1..=3, flags 0 or `bit`.
    fn small_lists(bit: u32) -> Vec<Vec<(u64, u32)>> {
        let mut all = vec![Vec::new()];
        let mut frontier: Vec<Vec<(u64, u32)>> = vec![Vec::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for l in &frontier {
                for len in 1..=3 {
                    for f in [0, bit] {
                        let mut v = l.clone();
                        v.push((len, f));
                        next.push(v);
                    }
                }
            }
            all.extend(next.iter().cloned());
            frontier = next;
        }
        all
    }

    #[test]
    fn merge_matches_the_byte_oracle_exhaustively() {
        let (xs, ys) = (small_lists(1), small_lists(DIRTY));
        assert_eq!(xs.len(), 1 + 6 + 36 + 216);
        for a in &xs {
            for b in &ys {
                let got = merge(a, b);
                assert_eq!(got, merge_oracle(a, b), "{a:?} {b:?}");
                assert!(got.iter().all(|&(len, _)| len > 0), "{a:?} {b:?}");
                // Byte for byte: the OR of both, up to the shorter end.
                let (fa, fb) = (per_byte(a), per_byte(b));
                let want: Vec<u32> = fa.iter().zip(&fb).map(|(x, y)| x | y).collect();
                assert_eq!(per_byte(&got), want, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn merge_matches_the_byte_oracle_on_random_lists() {
        let mut rng = Rng(0x5eed_0001);
        for _ in 0..5000 {
            let list = |rng: &mut Rng| -> Vec<(u64, u32)> {
                (0..rng.range(0, 8))
                    .map(|_| (rng.range(1, 9), rng.range(0, 15) as u32))
                    .collect()
            };
            let (a, b) = (list(&mut rng), list(&mut rng));
            assert_eq!(merge(&a, &b), merge_oracle(&a, &b), "{a:?} {b:?}");
        }
    }

    /// Random runs of wire flags over `size` bytes, byte by byte; flags
    /// drawn from `flags` (with unknown bits, which must be ignored).
    fn truth(rng: &mut Rng, size: usize, flags: &[u32]) -> Vec<u32> {
        let mut t = Vec::with_capacity(size);
        while t.len() < size {
            let f = flags[rng.range(0, flags.len() as u64 - 1) as usize];
            let n = rng.range(1, 8) as usize;
            t.extend(std::iter::repeat_n(f, n.min(size - t.len())));
        }
        t
    }

    /// A truthful server's block status reply for one context at
    /// `offset`, asked for `len` bytes: runs of equal flags split at
    /// random, a reply that stops early at random (short reply), the last
    /// descriptor possibly past the request (long reply) or past the end.
    fn reply(rng: &mut Rng, t: &[u32], offset: usize, len: usize) -> Vec<(u32, u32)> {
        let req_end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        loop {
            let f = t[at];
            let cap = rng.range(1, 6) as usize;
            let mut end = at + 1;
            while end < t.len() && t[end] == f && end - at < cap {
                end += 1;
            }
            let mut n = end - at;
            if end == t.len() && rng.one_in(3) {
                n += rng.range(1, 5) as usize;
            }
            out.push((n as u32, f));
            at = end;
            if at >= t.len() || at >= req_end || rng.one_in(4) {
                return out;
            }
        }
    }

    /// imageio's answer, computed byte by byte: internal flags of each
    /// byte, runs of equal flags.
    fn dirty_oracle(base: &[u32], bitmap: &[u32]) -> Vec<DirtyExtent> {
        let flags: Vec<u32> = base
            .iter()
            .zip(bitmap)
            .map(|(&b, &d)| alloc_flags(b) | dirty_flags(d))
            .collect();
        let mut out: Vec<DirtyExtent> = Vec::new();
        let mut start = 0u64;
        for run in flags.chunk_by(|a, b| a == b) {
            let f = run[0];
            out.push(DirtyExtent {
                start,
                length: run.len() as u64,
                dirty: f & DIRTY != 0,
                zero: f & NBD_STATE_ZERO != 0,
            });
            start += run.len() as u64;
        }
        out
    }

    #[test]
    fn dirty_extents_match_the_byte_oracle() {
        let mut rng = Rng(0xd1b7_0011);
        // HOLE and ZERO combinations, some with a reserved bit set.
        let base_flags = [0, 1, 2, 3, 2 | (1 << 7), 3 | (1 << 30)];
        let bitmap_flags = [0, 1, 1 << 4, 1 | (1 << 9)];
        for case in 0..3000 {
            let size = rng.range(1, 48) as usize;
            let base = truth(&mut rng, size, &base_flags);
            let bitmap = truth(&mut rng, size, &bitmap_flags);
            let mut b = ExtentBuilder::new(size as u64, usize::MAX);
            let mut requests = 0;
            while !b.finished() {
                let offset = b.offset() as usize;
                let len = rng.range(1, (size - offset) as u64) as usize;
                let d = dirty_descriptors(
                    &reply(&mut rng, &base, offset, len),
                    &reply(&mut rng, &bitmap, offset, len),
                );
                assert!(b.push(&d) > 0, "case {case}: no progress");
                requests += 1;
                assert!(requests <= size, "case {case}: too many requests");
            }
            let got = b.finish_dirty();
            assert_eq!(got, dirty_oracle(&base, &bitmap), "case {case}");
            // Contiguous from 0 to the end.
            let mut at = 0;
            for e in &got {
                assert_eq!(e.start, at, "case {case}");
                at += e.length;
            }
            assert_eq!(at, size as u64, "case {case}");
        }
    }

    /// What qemu-nbd 10.0 answered for an 8 MiB qcow2 with bitmap `b1`
    /// after five writes (`qemu-io`), and what ovirt-imageio 2.5.1's nbd
    /// backend made of it (`Backend.extents("dirty")`, run by hand).
    #[test]
    fn dirty_extents_match_imageio_on_a_qemu_reply() {
        let base: &[(u32, u32)] = &[
            (4096, 0),
            (61440, 2),
            (983040, 3),
            (208896, 0),
            (53248, 2),
            (3866624, 3),
            (61440, 2),
            (8192, 0),
            (61440, 2),
            (3014656, 3),
            (65536, 0),
        ];
        let bitmap: &[(u32, u32)] = &[
            (65536, 1),
            (983040, 0),
            (262144, 1),
            (1835008, 0),
            (131072, 1),
            (1900544, 0),
            (131072, 1),
            (3014656, 0),
            (65536, 1),
        ];
        let mut b = ExtentBuilder::new(8 << 20, 1 << 20);
        assert_eq!(b.push(&dirty_descriptors(base, bitmap)), 8 << 20);
        let got: Vec<(u64, u64, bool, bool)> = b
            .finish_dirty()
            .iter()
            .map(|e| (e.start, e.length, e.dirty, e.zero))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 4096, true, false),
                (4096, 61440, true, true),
                (65536, 983040, false, true),
                (1048576, 208896, true, false),
                (1257472, 53248, true, true),
                (1310720, 1835008, false, true),
                (3145728, 131072, true, true),
                (3276800, 1900544, false, true),
                (5177344, 61440, true, true),
                (5238784, 8192, true, false),
                (5246976, 61440, true, true),
                (5308416, 3014656, false, true),
                (8323072, 65536, true, false),
            ]
        );
    }

    /// imageio joins neighbours only when all the flags match, HOLE too:
    /// two dirty zero extents stay apart where HOLE changes.
    #[test]
    fn dirty_neighbours_differing_only_in_hole_stay_apart() {
        let mut b = ExtentBuilder::new(30, 10);
        b.push(&dirty_descriptors(&[(10, 2), (10, 3), (10, 3)], &[(30, 1)]));
        let got: Vec<(u64, u64, bool, bool)> = b
            .finish_dirty()
            .iter()
            .map(|e| (e.start, e.length, e.dirty, e.zero))
            .collect();
        assert_eq!(got, vec![(0, 10, true, true), (10, 20, true, true)]);
    }

    #[test]
    fn dirty_flags_ignore_unknown_bits() {
        assert_eq!(dirty_flags(1), DIRTY);
        assert_eq!(dirty_flags(1 | 0xf0), DIRTY);
        assert_eq!(dirty_flags(0xfe), 0);
        assert_eq!(alloc_flags(0xff), 3);
    }

    #[test]
    fn builder_caps_extents() {
        let mut b = ExtentBuilder::new(u64::MAX, 2);
        let many: Vec<(u64, u32)> = (0..1000).map(|i| (1, i % 2)).collect();
        b.push(&many);
        assert!(b.finished());
        assert_eq!(b.finish().len(), 3);
    }
}
