//! Read-ahead for sequential readers of a ticket.
//!
//! NBD clients read in small requests (nbdcopy: 256 KiB, 64 in flight per
//! connection); one HTTP GET per request spends most of its time on the
//! request, not on the data. Once a reader is seen to be sequential (a read
//! starts where an earlier one ended), the rest of its aligned block is
//! fetched with one GET and the following reads are served from it, without
//! copying (slices of one buffer).
//!
//! Writes through this backend drop the blocks they touch once they reached
//! the server and before they are acknowledged ([`ReadAhead::invalidate`]):
//! a read sent after a write was answered plans after that, so it never
//! gets a block fetched before the write landed. (Writers behind our back,
//! e.g. another client of the same ticket, are not seen; neither would
//! they be without the cache, between two reads.) Memory is bounded by [`MAX_BLOCKS`] blocks of [`BLOCK`] bytes (plus the
//! slices replies still hold).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// Bytes fetched per block GET.
pub const BLOCK: u64 = 8 * 1024 * 1024;
/// Blocks cached at most (fetching or fetched).
pub const MAX_BLOCKS: usize = 12;
/// Read ends remembered to recognise sequential readers.
const RECENT_ENDS: usize = 64;
/// Blocks remembered as fully read, so a late read of one does not fetch
/// it again.
const DONE_BLOCKS: usize = 32;

/// One block: fetched once, shared by the reads that fall in it.
/// A block: the pieces of its GET body, in order.
pub type Slot = Arc<OnceCell<Vec<Bytes>>>;

/// How one read is served.
#[derive(Debug)]
pub enum Plan {
    /// Read directly (not sequential, or too large to gain).
    Direct,
    /// Served from block `index` (starting at `start`, `len` bytes): fetch
    /// it through the slot if nobody has yet.
    Block {
        /// The block's slot.
        slot: Slot,
        /// First byte of the block.
        start: u64,
        /// Bytes in the block (the last one may be short).
        len: usize,
    },
}

/// The block cache of one backend.
#[derive(Debug)]
pub struct ReadAhead {
    size: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Cached blocks by index, with the tick of their last use.
    blocks: HashMap<u64, (Slot, u64)>,
    tick: u64,
    /// Ends of recent reads (a ring).
    ends: VecDeque<u64>,
    /// Blocks whose last byte was read (a ring).
    done: VecDeque<u64>,
}

impl ReadAhead {
    /// A cache for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        ReadAhead {
            size,
            state: Mutex::new(State::default()),
        }
    }

    /// Decide how to serve `offset..offset+len` (`len` > 0, in the image).
    pub fn plan(&self, offset: u64, len: usize) -> Plan {
        let len64 = len as u64;
        let index = offset / BLOCK;
        let start = index * BLOCK;
        let end = offset.saturating_add(len64);
        let block_end = (start + BLOCK).min(self.size);
        let Ok(mut st) = self.state.lock() else {
            return Plan::Direct;
        };
        let sequential = st.ends.contains(&offset);
        st.remember_end(end);
        if len64 >= BLOCK / 2 || end > block_end {
            // Large reads gain nothing; reads across blocks stay simple.
            return Plan::Direct;
        }
        if end == block_end {
            st.remember_done(index);
        }
        st.tick += 1;
        let tick = st.tick;
        if let Some((slot, used)) = st.blocks.get_mut(&index) {
            *used = tick;
            let slot = slot.clone();
            if end == block_end {
                // The reader is leaving this block; reads already holding
                // the slot still get it.
                st.blocks.remove(&index);
            }
            return Plan::Block {
                slot,
                start,
                len: (block_end - start) as usize,
            };
        }
        if !sequential || st.done.contains(&index) || end == block_end {
            return Plan::Direct;
        }
        if st.blocks.len() >= MAX_BLOCKS {
            st.evict_oldest();
        }
        let slot = Slot::default();
        st.blocks.insert(index, (slot.clone(), tick));
        Plan::Block {
            slot,
            start,
            len: (block_end - start) as usize,
        }
    }

    /// Forget a block whose fetch failed, so the next reader tries afresh.
    pub fn forget(&self, start: u64, slot: &Slot) {
        if let Ok(mut st) = self.state.lock() {
            let index = start / BLOCK;
            if st
                .blocks
                .get(&index)
                .is_some_and(|(s, _)| Arc::ptr_eq(s, slot))
            {
                st.blocks.remove(&index);
            }
        }
    }

    /// `len` bytes at `offset` changed on the server: drop the blocks that
    /// hold any of them (reads already holding one were concurrent with the
    /// change, so either content is right for them).
    pub fn invalidate(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK;
        let last = offset.saturating_add(len - 1) / BLOCK;
        if let Ok(mut st) = self.state.lock() {
            st.blocks.retain(|index, _| *index < first || *index > last);
        }
    }

    /// Blocks cached now (for tests).
    pub fn cached_blocks(&self) -> usize {
        self.state.lock().map(|st| st.blocks.len()).unwrap_or(0)
    }
}

impl State {
    fn remember_end(&mut self, end: u64) {
        if self.ends.len() == RECENT_ENDS {
            self.ends.pop_front();
        }
        self.ends.push_back(end);
    }

    fn remember_done(&mut self, index: u64) {
        if self.done.contains(&index) {
            return;
        }
        if self.done.len() == DONE_BLOCKS {
            self.done.pop_front();
        }
        self.done.push_back(index);
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .blocks
            .iter()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(index, _)| *index);
        if let Some(index) = oldest {
            self.blocks.remove(&index);
        }
    }
}

/// The part `offset..offset+len` of a fetched block starting at `start`.
/// The pieces of a block (starting at `start`) that hold
/// `offset..offset+len`, without copying; `None` when the block does not
/// hold all of it.
pub fn slice(block: &[Bytes], start: u64, offset: u64, len: usize) -> Option<Vec<Bytes>> {
    let from = usize::try_from(offset.checked_sub(start)?).ok()?;
    let to = from.checked_add(len)?;
    let total = block
        .iter()
        .try_fold(0usize, |sum, piece| sum.checked_add(piece.len()))?;
    if to > total {
        return None;
    }
    let mut out = Vec::new();
    let mut at = 0usize;
    for piece in block {
        let end = at + piece.len();
        if end > from && at < to {
            let lo = from.max(at) - at;
            let hi = to.min(end) - at;
            out.push(piece.slice(lo..hi));
        }
        if end >= to {
            break;
        }
        at = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K256: usize = 256 * 1024;

    fn is_block(p: &Plan) -> bool {
        matches!(p, Plan::Block { .. })
    }

    #[test]
    fn a_sequential_reader_is_served_from_blocks() {
        let ra = ReadAhead::new(4 * BLOCK);
        // The first read cannot know; the second starts where it ended.
        assert!(!is_block(&ra.plan(0, K256)));
        let Plan::Block { slot, start, len } = ra.plan(K256 as u64, K256) else {
            panic!("the second sequential read should use a block");
        };
        assert_eq!((start, len), (0, BLOCK as usize));
        // Later reads of the block share the same slot.
        let Plan::Block { slot: again, .. } = ra.plan(2 * K256 as u64, K256) else {
            panic!("same block");
        };
        assert!(Arc::ptr_eq(&slot, &again));
        assert_eq!(ra.cached_blocks(), 1);
        // Reading the block's tail releases it...
        let tail = BLOCK - K256 as u64;
        assert!(is_block(&ra.plan(tail, K256)));
        assert_eq!(ra.cached_blocks(), 0);
        // ...and a straggler of that block reads directly, no refetch.
        assert!(!is_block(&ra.plan(3 * K256 as u64, K256)));
        // The reader goes on into the next block.
        assert!(is_block(&ra.plan(BLOCK, K256)));
    }

    #[test]
    fn random_and_large_reads_go_direct() {
        let ra = ReadAhead::new(16 * BLOCK);
        for off in [5 * BLOCK + 4096, 2 * BLOCK, 9 * BLOCK + 65536, 100] {
            assert!(!is_block(&ra.plan(off, 4096)));
        }
        assert!(!is_block(&ra.plan(0, (BLOCK / 2) as usize)));
        assert!(!is_block(&ra.plan(BLOCK / 2, (BLOCK / 2) as usize)));
        // A read across a block boundary stays direct.
        ra.plan(BLOCK - 8192, 4096);
        assert!(!is_block(&ra.plan(BLOCK - 4096, 8192)));
        assert_eq!(ra.cached_blocks(), 0);
    }

    #[test]
    fn the_cache_is_bounded_and_the_last_block_is_short() {
        let size = 40 * BLOCK + 12345;
        let ra = ReadAhead::new(size);
        for b in 0..40 {
            let off = b * BLOCK + 4096;
            ra.plan(b * BLOCK, 4096);
            assert!(is_block(&ra.plan(off, 4096)));
            assert!(ra.cached_blocks() <= MAX_BLOCKS);
        }
        ra.plan(40 * BLOCK, 4096);
        let Plan::Block { start, len, .. } = ra.plan(40 * BLOCK + 4096, 4096) else {
            panic!("the last block");
        };
        assert_eq!((start, len), (40 * BLOCK, 12345));
    }

    #[test]
    fn a_failed_block_is_forgotten() {
        let ra = ReadAhead::new(2 * BLOCK);
        ra.plan(0, 4096);
        let Plan::Block { slot, start, .. } = ra.plan(4096, 4096) else {
            panic!("block");
        };
        ra.forget(start, &slot);
        assert_eq!(ra.cached_blocks(), 0);
    }

    #[test]
    fn a_write_drops_the_blocks_it_touches() {
        let ra = ReadAhead::new(8 * BLOCK);
        for b in [1, 2, 5] {
            ra.plan(b * BLOCK, 4096);
            assert!(is_block(&ra.plan(b * BLOCK + 4096, 4096)));
        }
        assert_eq!(ra.cached_blocks(), 3);
        ra.invalidate(2 * BLOCK - 1, 2);
        assert_eq!(ra.cached_blocks(), 1, "blocks 1 and 2 dropped");
        ra.invalidate(5 * BLOCK + 100, 0);
        assert_eq!(ra.cached_blocks(), 1, "an empty range drops nothing");
        ra.invalidate(u64::MAX - 1, 10);
        assert_eq!(ra.cached_blocks(), 1);
        ra.invalidate(5 * BLOCK + 100, 1);
        assert_eq!(ra.cached_blocks(), 0);
        // The next sequential read fetches the block afresh.
        let Plan::Block { slot, .. } = ra.plan(5 * BLOCK + 8192, 4096) else {
            panic!("a new block");
        };
        assert!(slot.get().is_none());
    }

    #[test]
    fn slices_stay_inside_the_block() {
        let block = [Bytes::from(vec![7u8; 100])];
        let total = |p: Option<Vec<Bytes>>| p.map(|p| p.iter().map(Bytes::len).sum::<usize>());
        assert_eq!(total(slice(&block, 1000, 1010, 20)), Some(20));
        assert!(slice(&block, 1000, 1090, 20).is_none());
        assert!(slice(&block, 1000, 999, 1).is_none());
    }

    /// Slices of a block in pieces equal the same slices of the joined
    /// block, for every split, offset and length (a per-byte oracle).
    #[test]
    fn slices_across_pieces_match_the_joined_block() {
        let whole: Vec<u8> = (0..40u8).collect();
        for cut1 in 0..=40usize {
            for cut2 in cut1..=40usize {
                let pieces = [
                    Bytes::copy_from_slice(&whole[..cut1]),
                    Bytes::copy_from_slice(&whole[cut1..cut2]),
                    Bytes::copy_from_slice(&whole[cut2..]),
                ];
                for from in 0..=40usize {
                    for len in 0..=(42 - from) {
                        let got = slice(&pieces, 100, 100 + from as u64, len)
                            .map(|p| p.iter().flat_map(|b| b.to_vec()).collect::<Vec<u8>>());
                        let want = whole.get(from..from + len).map(<[u8]>::to_vec);
                        assert_eq!(got, want, "{cut1} {cut2} {from} {len}");
                    }
                }
            }
        }
    }
}
