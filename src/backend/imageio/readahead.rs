//! Read-ahead for sequential readers of a ticket.
//!
//! NBD clients read in small requests (nbdcopy: 256 KiB, 64 in flight per
//! connection); one HTTP GET per request spends most of its time on the
//! request, not on the data. Once a reader is seen to be sequential (a read
//! starts where an earlier one ended, or the block before is being read),
//! its aligned block is fetched with one GET and the reads in it are served
//! from it, without copying (slices of one buffer). Requests in flight are
//! planned in any order, so a block is released only once every byte of it
//! was asked for (reads that went directly before it existed count), not
//! when its last byte is: no read of it comes too late and fetches again.
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
/// Blocks cached at most (fetching or fetched): room for nbdcopy's four
/// connections with 16 MiB in flight each, whose current and next blocks
/// are all held at once (12 evicted blocks still in use: 10% of a
/// download was fetched twice).
pub const MAX_BLOCKS: usize = 16;
/// Read ends remembered to recognise sequential readers (all the reads in
/// flight of four connections).
const RECENT_ENDS: usize = 256;
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
    /// Cached blocks by index: the slot, the tick of its last use, and the
    /// bytes of it read so far (once all were, it is released).
    blocks: HashMap<u64, (Slot, u64, u64)>,
    tick: u64,
    /// Ends of recent reads (a ring).
    ends: VecDeque<u64>,
    /// Blocks whose last byte was read (a ring).
    done: VecDeque<u64>,
    /// Bytes of uncached blocks read directly, by block (a ring): a block
    /// made later counts them as read, so it is released once the rest is.
    direct: VecDeque<(u64, u64)>,
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
        // Sequential: a read ended where this one starts, or the reader is
        // coming from the block before (requests in flight are planned in
        // any order, so its predecessor may not have been yet).
        let sequential = st.ends.contains(&offset)
            || index
                .checked_sub(1)
                .is_some_and(|prev| st.blocks.contains_key(&prev) || st.done.contains(&prev));
        st.remember_end(end);
        if len64 >= BLOCK / 2 || end > block_end {
            // Large reads gain nothing; reads across blocks stay simple.
            return Plan::Direct;
        }
        st.tick += 1;
        let tick = st.tick;
        let block_len = block_end - start;
        if let Some((slot, used, read)) = st.blocks.get_mut(&index) {
            *used = tick;
            *read = read.saturating_add(len64);
            let slot = slot.clone();
            if *read >= block_len {
                // Every byte of it was asked for: released (reads already
                // holding the slot still get it).
                st.blocks.remove(&index);
                st.remember_done(index);
            }
            return Plan::Block {
                slot,
                start,
                len: block_len as usize,
            };
        }
        if !sequential || st.done.contains(&index) {
            st.remember_direct(index, len64);
            return Plan::Direct;
        }
        if st.blocks.len() >= MAX_BLOCKS {
            st.evict_oldest();
        }
        let slot = Slot::default();
        let read = len64.saturating_add(st.take_direct(index));
        st.blocks.insert(index, (slot.clone(), tick, read));
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
                .is_some_and(|(s, _, _)| Arc::ptr_eq(s, slot))
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

    fn remember_direct(&mut self, index: u64, len: u64) {
        if let Some((_, bytes)) = self.direct.iter_mut().find(|(i, _)| *i == index) {
            *bytes = bytes.saturating_add(len);
            return;
        }
        if self.direct.len() == RECENT_ENDS {
            self.direct.pop_front();
        }
        self.direct.push_back((index, len));
    }

    fn take_direct(&mut self, index: u64) -> u64 {
        match self.direct.iter().position(|(i, _)| *i == index) {
            Some(pos) => self.direct.remove(pos).map_or(0, |(_, bytes)| bytes),
            None => 0,
        }
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
            .min_by_key(|(_, (_, used, _))| *used)
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
        // The tail first (requests in flight come in any order): the block
        // stays until every byte of it was asked for.
        let tail = BLOCK - K256 as u64;
        assert!(is_block(&ra.plan(tail, K256)));
        let reads = BLOCK / K256 as u64;
        for i in 3..reads - 1 {
            assert_eq!(ra.cached_blocks(), 1, "read {i}");
            assert!(is_block(&ra.plan(i * K256 as u64, K256)));
        }
        // The first read went directly (before the reader was known) and
        // counts as read: with the rest read, the block is released.
        assert_eq!(ra.cached_blocks(), 0, "released once all was read");
        // A straggler of a released block reads directly, no refetch.
        assert!(!is_block(&ra.plan(3 * K256 as u64, K256)));
        // The reader goes on into the next block, even before a read
        // ending where this one starts was seen.
        assert!(is_block(&ra.plan(BLOCK + K256 as u64, K256)));
    }

    /// A tiny deterministic generator for the property tests.
    fn next(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Sequential readers whose requests are planned a little out of order
    /// (as an NBD server's tasks for requests in flight run: each of the
    /// next few may come first): every read is served by a block that holds
    /// it or directly, each block is fetched once, at most MAX_BLOCKS are
    /// cached, the bytes fetched stay within a few reads per reader of the
    /// bytes read (the oracle: each byte asked for once), and no block is
    /// left cached at the end.
    #[test]
    fn readers_out_of_order_fetch_each_byte_about_once() {
        const DISPLACEMENT: u64 = 8;
        for round in 0..60u64 {
            let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (round + 1);
            let streams = 1 + (round % 4) as usize;
            let per_stream = 4 * BLOCK;
            let size = per_stream * streams as u64;
            let ra = ReadAhead::new(size);
            let mut queues: Vec<VecDeque<u64>> = (0..streams)
                .map(|s| {
                    let base = s as u64 * per_stream;
                    (0..per_stream / K256 as u64)
                        .map(|i| base + i * K256 as u64)
                        .collect()
                })
                .collect();
            let mut fetched = 0u64;
            let mut seen: Vec<Slot> = Vec::new();
            while queues.iter().any(|q| !q.is_empty()) {
                let s = (next(&mut seed) % streams as u64) as usize;
                let q = &mut queues[s];
                if q.is_empty() {
                    continue;
                }
                let pick = (next(&mut seed) % DISPLACEMENT.min(q.len() as u64)) as usize;
                let Some(off) = q.remove(pick) else {
                    continue;
                };
                match ra.plan(off, K256) {
                    Plan::Direct => fetched += K256 as u64,
                    Plan::Block { slot, start, len } => {
                        assert!(start <= off && off + K256 as u64 <= start + len as u64);
                        if !seen.iter().any(|x| Arc::ptr_eq(x, &slot)) {
                            fetched += len as u64;
                            seen.push(slot);
                        }
                    }
                }
                assert!(ra.cached_blocks() <= MAX_BLOCKS);
            }
            // Before a reader is known, its first reads (in any order) go
            // directly and its block fetches them again.
            let slack = streams as u64 * 16 * K256 as u64;
            assert!(
                fetched <= size + slack,
                "round {round}: {streams} readers fetched {fetched} for {size}"
            );
            // Nothing lingers: every block was released once all of it
            // was read (its direct reads counted).
            assert_eq!(ra.cached_blocks(), 0, "round {round}");
        }
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
