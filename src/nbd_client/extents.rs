//! Zero extents the way ovirt-imageio's nbd backend reports them: flags of
//! `base:allocation` (HOLE, ZERO) merged with `qemu:allocation-depth`
//! (depth 0 = "backing": not allocated in any layer), consecutive extents
//! with equal flags joined, the last one clipped to the end.

use crate::nbd::consts::{NBD_STATE_HOLE, NBD_STATE_ZERO};

/// imageio's private bit for "depth 0" extents.
const BACKING: u32 = 1 << 3;

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

/// Internal flags of a `base:allocation` descriptor.
pub fn alloc_flags(flags: u32) -> u32 {
    flags & (NBD_STATE_HOLE | NBD_STATE_ZERO)
}

/// Internal flags of a `qemu:allocation-depth` descriptor.
pub fn depth_flags(depth: u32) -> u32 {
    if depth == 0 { BACKING } else { 0 }
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

/// Collects descriptors from successive block status replies into
/// [`ZeroExtent`]s over `0..end`.
#[derive(Debug)]
pub struct ExtentBuilder {
    end: u64,
    offset: u64,
    cur: Option<(u64, u64, u32)>,
    out: Vec<ZeroExtent>,
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

    fn emit(&mut self, (start, length, flags): (u64, u64, u32)) {
        self.out.push(ZeroExtent {
            start,
            length,
            zero: flags & NBD_STATE_ZERO != 0,
            hole: flags & BACKING != 0,
        });
    }

    /// The extents so far (covering `0..offset()`).
    pub fn finish(mut self) -> Vec<ZeroExtent> {
        if let Some(cur) = self.cur.take() {
            self.emit(cur);
        }
        self.out
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

    #[test]
    fn builder_caps_extents() {
        let mut b = ExtentBuilder::new(u64::MAX, 2);
        let many: Vec<(u64, u32)> = (0..1000).map(|i| (1, i % 2)).collect();
        b.push(&many);
        assert!(b.finished());
        assert_eq!(b.finish().len(), 3);
    }
}
