//! Write coalescing: sequential small NBD writes gathered into large PUTs.
//!
//! Every HTTP request costs the real imageio daemon a fixed time, so one PUT
//! per 256 KiB NBD write leaves most of the bandwidth unused. The
//! [`Gatherer`] keeps the writes that wait for a free PUT slot in batches:
//! a write that starts where an open batch ends joins it (whichever NBD
//! connection sent it), anything else starts a new batch. A batch is sent
//! as soon as a slot is free (so a lone write goes out at once, and batches
//! grow only while the server is busy: group commit), and no longer grows
//! once sent, full, or carrying a FUA write.
//!
//! Exactness: a batch's PUT result is the result of every write it carries
//! (the writer acknowledges nothing before the PUT answered); a FUA write
//! makes its batch `flush=y`, so its range is durable when acknowledged;
//! a FLUSH covers only acknowledged writes, which all reached the server.
//!
//! This module does no I/O: [`super::writer`] drives it.

use bytes::Bytes;
use std::collections::VecDeque;

/// How far gathering may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest batch (bytes in one PUT).
    pub max_batch: usize,
    /// Most batches being sent at once.
    pub max_inflight: usize,
    /// Most bytes held in batches not yet sent; past it no write is taken
    /// until a batch leaves.
    pub max_held: usize,
}

/// Writes that go out in one PUT, in order, contiguous from `offset`.
#[derive(Debug)]
pub struct Batch<T> {
    /// First byte.
    pub offset: u64,
    /// Bytes in all parts.
    pub len: u64,
    /// The writes' data, in order.
    pub parts: Vec<Bytes>,
    /// Whoever waits for each write's result, in order.
    pub waiters: Vec<T>,
    /// Send with `flush=y`: some write in it asked for FUA.
    pub fua: bool,
    /// Takes no more writes.
    sealed: bool,
}

impl<T> Batch<T> {
    fn end(&self) -> u64 {
        self.offset + self.len
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.end() && self.offset < offset + len
    }
}

/// The writes waiting to be sent, and how many batches are being sent.
#[derive(Debug)]
pub struct Gatherer<T> {
    limits: Limits,
    open: VecDeque<Batch<T>>,
    held: usize,
    inflight: usize,
}

impl<T> Gatherer<T> {
    /// An empty gatherer.
    pub fn new(limits: Limits) -> Self {
        Gatherer {
            limits: Limits {
                max_batch: limits.max_batch.max(1),
                max_inflight: limits.max_inflight.max(1),
                max_held: limits.max_held.max(1),
            },
            open: VecDeque::new(),
            held: 0,
            inflight: 0,
        }
    }

    /// Whether another write may be taken now (the memory bound).
    pub fn can_take(&self) -> bool {
        self.held < self.limits.max_held
    }

    /// Nothing waiting and nothing being sent.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty() && self.inflight == 0
    }

    /// Batches being sent.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Take the write of `data` at `offset` (`offset + len` must not
    /// overflow: the NBD layer checked it against the size).
    pub fn add(&mut self, offset: u64, data: Bytes, fua: bool, waiter: T) {
        let len = data.len();
        let max = self.limits.max_batch;
        self.held += len;
        let joined = self
            .open
            .iter_mut()
            .find(|b| !b.sealed && b.end() == offset && b.len as usize + len <= max);
        if let Some(b) = joined {
            b.len += len as u64;
            b.parts.push(data);
            b.waiters.push(waiter);
            b.fua |= fua;
            b.sealed = fua || b.len as usize >= max;
            return;
        }
        // A batch that cannot take this write stops growing where the
        // write lands, so each batch stays free of overlaps and a
        // sequential writer that outgrew a batch starts the next one.
        for b in self.open.iter_mut() {
            if b.end() == offset || b.overlaps(offset, len as u64) {
                b.sealed = true;
            }
        }
        self.open.push_back(Batch {
            offset,
            len: len as u64,
            parts: vec![data],
            waiters: vec![waiter],
            fua,
            sealed: fua || len >= max,
        });
    }

    /// The next batch to send, if a slot is free: the oldest one.
    pub fn next_batch(&mut self) -> Option<Batch<T>> {
        if self.inflight >= self.limits.max_inflight {
            return None;
        }
        let b = self.open.pop_front()?;
        self.held -= b.len as usize;
        self.inflight += 1;
        Some(b)
    }

    /// A batch given by [`Gatherer::next_batch`] was answered.
    pub fn done(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    const SIZE: usize = 256;

    /// A data server: what a read sees, and what survives a crash.
    struct Server {
        volatile: Vec<u8>,
        durable: Vec<u8>,
    }

    /// One write in the model: its id, range, byte value.
    #[derive(Debug, Clone, Copy)]
    struct W {
        id: usize,
        offset: u64,
        len: u64,
        value: u8,
        fua: bool,
    }

    /// Run one random history: a client issuing writes (never overlapping a
    /// write it has not seen answered, as a careful client does) and
    /// flushes, a gatherer, PUTs answered in any order, some failing.
    /// Checks, against a byte-array oracle:
    /// - every write is answered exactly once, with its PUT's result;
    /// - an Ok write's bytes are on the server when it is answered, and
    ///   durable too when it asked for FUA;
    /// - a flush finds every write answered Ok before it durable;
    /// - batches are contiguous, in order, within the limits;
    /// - in the end the server holds exactly the successful writes applied
    ///   in issue order.
    fn history(seed: u64, limits: Limits, fail_one_in: u64) {
        let mut rng = Rng(seed | 1);
        let mut g: Gatherer<usize> = Gatherer::new(limits);
        let mut server = Server {
            volatile: vec![0; SIZE],
            durable: vec![0; SIZE],
        };
        let mut writes: Vec<W> = Vec::new();
        let mut answered: BTreeMap<usize, bool> = BTreeMap::new();
        let mut inflight: Vec<Batch<usize>> = Vec::new();
        let mut cursor = 0u64;
        let mut issued = 0;
        let target = 10 + rng.below(60) as usize;
        let mut oracle = vec![0u8; SIZE];
        let mut oracle_ok: Vec<bool> = Vec::new();

        let pending_overlap = |writes: &[W], answered: &BTreeMap<usize, bool>, o: u64, l: u64| {
            writes
                .iter()
                .any(|w| !answered.contains_key(&w.id) && o < w.offset + w.len && w.offset < o + l)
        };

        loop {
            let choice = rng.below(10);
            if choice < 4 && issued < target && g.can_take() {
                // Mostly sequential, sometimes anywhere.
                let len = 1 + rng.below(24);
                let offset = if rng.below(4) == 0 {
                    rng.below(SIZE as u64 - len)
                } else if cursor + len <= SIZE as u64 {
                    cursor
                } else {
                    0
                };
                if pending_overlap(&writes, &answered, offset, len) {
                    continue;
                }
                cursor = offset + len;
                let w = W {
                    id: writes.len(),
                    offset,
                    len,
                    value: (writes.len() % 250 + 1) as u8,
                    fua: rng.below(8) == 0,
                };
                writes.push(w);
                oracle_ok.push(true);
                issued += 1;
                let data = Bytes::from(vec![w.value; len as usize]);
                g.add(offset, data, w.fua, w.id);
            } else if choice < 5 {
                // FLUSH: every write answered Ok so far must be durable
                // once the server flushed (our flush is a PATCH after the
                // PUTs it covers were answered).
                server.durable.copy_from_slice(&server.volatile);
                for w in writes.iter().filter(|w| answered.get(&w.id) == Some(&true)) {
                    let later_overlap = writes.iter().any(|v| {
                        v.id > w.id && v.offset < w.offset + w.len && w.offset < v.offset + v.len
                    });
                    if !later_overlap {
                        let r = w.offset as usize..(w.offset + w.len) as usize;
                        assert!(
                            server.durable[r].iter().all(|&b| b == w.value),
                            "seed {seed}: flush misses write {}",
                            w.id
                        );
                    }
                }
            } else if choice < 8 {
                if let Some(b) = g.next_batch() {
                    assert!(g.inflight() <= limits.max_inflight);
                    inflight.push(b);
                }
            } else if !inflight.is_empty() {
                let i = rng.below(inflight.len() as u64) as usize;
                let b = inflight.swap_remove(i);
                g.done();
                check_batch(&b, &writes, limits);
                let ok = rng.below(fail_one_in) != 0;
                if ok {
                    let mut at = b.offset as usize;
                    for p in &b.parts {
                        server.volatile[at..at + p.len()].copy_from_slice(p);
                        at += p.len();
                    }
                    if b.fua {
                        let r = b.offset as usize..at;
                        server.durable[r.clone()].copy_from_slice(&server.volatile[r]);
                    }
                }
                for &id in &b.waiters {
                    assert!(
                        answered.insert(id, ok).is_none(),
                        "seed {seed}: answered twice"
                    );
                    let w = writes[id];
                    let r = w.offset as usize..(w.offset + w.len) as usize;
                    if ok {
                        assert!(server.volatile[r.clone()].iter().all(|&v| v == w.value));
                        if w.fua {
                            assert!(server.durable[r].iter().all(|&v| v == w.value));
                        }
                    } else {
                        oracle_ok[id] = false;
                    }
                }
            }
            if issued >= target {
                // Drain: everything must leave without new writes.
                while let Some(b) = g.next_batch() {
                    inflight.push(b);
                }
                if inflight.is_empty() && g.is_idle() {
                    break;
                }
            }
        }
        assert_eq!(
            answered.len(),
            writes.len(),
            "seed {seed}: every write answered"
        );
        // The oracle: successful writes in issue order. A failed write may
        // have left nothing: compare only bytes no failed write touched.
        let mut touched_by_failure = vec![false; SIZE];
        for w in &writes {
            let r = w.offset as usize..(w.offset + w.len) as usize;
            if oracle_ok[w.id] {
                oracle[r.clone()].fill(w.value);
            } else {
                touched_by_failure[r].fill(true);
            }
        }
        for i in 0..SIZE {
            if !touched_by_failure[i] {
                assert_eq!(server.volatile[i], oracle[i], "seed {seed}: byte {i}");
            }
        }
    }

    fn check_batch(b: &Batch<usize>, writes: &[W], limits: Limits) {
        assert_eq!(b.parts.len(), b.waiters.len());
        assert!(b.len as usize <= limits.max_batch || b.parts.len() == 1);
        let mut at = b.offset;
        let mut fua = false;
        for (p, &id) in b.parts.iter().zip(&b.waiters) {
            let w = writes[id];
            assert_eq!(
                (w.offset, w.len),
                (at, p.len() as u64),
                "contiguous, in order"
            );
            at += w.len;
            fua |= w.fua;
        }
        assert_eq!(at, b.offset + b.len);
        assert_eq!(fua, b.fua, "flush=y exactly when a write asked for FUA");
    }

    #[test]
    fn random_histories_match_the_byte_oracle() {
        for seed in 0..3000u64 {
            let limits = Limits {
                max_batch: 1 + (seed % 64) as usize,
                max_inflight: 1 + (seed % 4) as usize,
                max_held: 16 + (seed % 97) as usize,
            };
            history(
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                limits,
                1 + seed % 7 * 3,
            );
        }
    }

    #[test]
    fn sequential_writes_gather_while_slots_are_busy() {
        let mut g = Gatherer::new(Limits {
            max_batch: 16,
            max_inflight: 1,
            max_held: 1024,
        });
        g.add(0, Bytes::from_static(&[1; 4]), false, 0);
        // A free slot: the first write goes out alone at once.
        let first = g.next_batch().unwrap();
        assert_eq!((first.offset, first.len), (0, 4));
        for i in 1..8u64 {
            g.add(i * 4, Bytes::from_static(&[2; 4]), false, i as usize);
        }
        assert!(g.next_batch().is_none(), "no slot while the first PUT runs");
        g.done();
        let b = g.next_batch().unwrap();
        assert_eq!(
            (b.offset, b.len, b.waiters.clone()),
            (4, 16, vec![1, 2, 3, 4])
        );
        g.done();
        let b = g.next_batch().unwrap();
        assert_eq!(
            (b.offset, b.len, b.waiters.clone()),
            (20, 12, vec![5, 6, 7])
        );
        g.done();
        assert!(g.is_idle());
    }

    #[test]
    fn fua_and_overlaps_end_a_batch_and_memory_is_bounded() {
        let mut g = Gatherer::new(Limits {
            max_batch: 64,
            max_inflight: 1,
            max_held: 12,
        });
        let _busy = {
            g.add(100, Bytes::from_static(&[9; 1]), false, 99);
            g.next_batch().unwrap()
        };
        g.add(0, Bytes::from_static(&[1; 4]), true, 0);
        g.add(4, Bytes::from_static(&[1; 4]), false, 1); // after FUA: new batch
        g.add(6, Bytes::from_static(&[1; 4]), false, 2); // overlaps: new batch
        assert!(!g.can_take(), "12 bytes held");
        g.done();
        let ends: BTreeSet<u64> = std::iter::from_fn(|| {
            let b = g.next_batch()?;
            g.done();
            Some(b.offset + b.len)
        })
        .collect();
        assert_eq!(ends, BTreeSet::from([4, 8, 10]));
        assert!(g.can_take() && g.is_idle());
    }
}
