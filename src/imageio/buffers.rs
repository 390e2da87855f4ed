//! Reused, page-aligned I/O buffers. Fresh multi-MiB allocations cost page
//! faults on every request; a small pool keeps a few buffers warm, and the
//! alignment lets PUT chunks go to disk with `O_DIRECT`.

use crate::store::DIRECT_ALIGN;
use std::sync::{Arc, Mutex};

/// Smallest size class: a small GET must not fault in a whole chunk.
const MIN_CLASS: usize = 64 * 1024;

/// A pool of buffers of up to one size, in power-of-two size classes from
/// [`MIN_CLASS`], so a small request takes a small buffer.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    max_free_bytes: usize,
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    /// Idle buffers by size class.
    classes: Vec<Vec<Vec<u8>>>,
    /// Capacity of the idle buffers.
    bytes: usize,
}

impl BufferPool {
    /// A pool of buffers of up to `size` bytes keeping at most `max_free`
    /// full-size buffers' worth of idle memory.
    pub fn new(size: usize, max_free: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            size,
            max_free_bytes: size.saturating_mul(max_free),
            free: Mutex::new(Free::default()),
        })
    }

    /// An empty buffer with capacity for the pool's size.
    pub fn get(self: &Arc<Self>) -> PoolBuf {
        self.get_for(self.size)
    }

    /// An empty buffer with capacity for at least `n` bytes (at most the
    /// pool's size).
    pub fn get_for(self: &Arc<Self>, n: usize) -> PoolBuf {
        let cap = n
            .clamp(1, self.size)
            .max(MIN_CLASS.min(self.size))
            .next_power_of_two()
            .min(self.size);
        let class = self.class_of(cap);
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let v = free.classes.get_mut(class).and_then(Vec::pop);
            if v.is_some() {
                free.bytes -= cap;
            }
            v
        };
        let vec = reused.unwrap_or_else(|| vec![0u8; cap + DIRECT_ALIGN]);
        let mut start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        if start.saturating_add(cap) > vec.len() {
            // No aligned window (never on real allocators): stay correct,
            // the write falls back to buffered I/O.
            start = 0;
        }
        PoolBuf {
            vec,
            start,
            len: 0,
            cap,
            pool: self.clone(),
        }
    }

    /// The free-list index of a buffer of capacity `cap`.
    fn class_of(&self, cap: usize) -> usize {
        if cap >= self.size {
            // The full size may not be a power of two: a class of its own.
            return 0;
        }
        1 + (cap.max(MIN_CLASS) / MIN_CLASS).trailing_zeros() as usize
    }

    fn put_back(&self, cap: usize, vec: Vec<u8>) {
        let class = self.class_of(cap);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.bytes + cap > self.max_free_bytes {
            return;
        }
        if free.classes.len() <= class {
            free.classes.resize_with(class + 1, Vec::new);
        }
        free.bytes += cap;
        if let Some(list) = free.classes.get_mut(class) {
            list.push(vec);
        }
    }
}

/// A buffer from a [`BufferPool`]; returns to the pool when dropped.
#[derive(Debug)]
pub struct PoolBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
    cap: usize,
    pool: Arc<BufferPool>,
}

impl PoolBuf {
    /// Bytes filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left.
    pub fn remaining(&self) -> usize {
        self.cap - self.len
    }

    /// Append as much of `data` as fits; how much was taken.
    pub fn extend(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.remaining());
        let at = self.start + self.len;
        if let (Some(dst), Some(src)) = (self.vec.get_mut(at..at + n), data.get(..n)) {
            dst.copy_from_slice(src);
            self.len += n;
            n
        } else {
            0
        }
    }

    /// Mark the first `n` bytes (at most the capacity) filled and return
    /// them for writing into.
    pub fn fill(&mut self, n: usize) -> &mut [u8] {
        self.len = n.min(self.cap);
        let (start, end) = (self.start, self.start + self.len);
        self.vec.get_mut(start..end).unwrap_or_default()
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        self.vec
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let vec = std::mem::take(&mut self.vec);
        self.pool.put_back(self.cap, vec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_reused_bounded() {
        let pool = BufferPool::new(8192, 1);
        let mut a = pool.get();
        assert_eq!(a.as_ref().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(a.extend(&[1u8; 5000]), 5000);
        assert_eq!(a.extend(&[2u8; 5000]), 3192);
        assert_eq!(a.remaining(), 0);
        assert_eq!(a.as_ref()[4999..5001], [1, 2]);
        let b = pool.get();
        let ptr = a.vec.as_ptr();
        drop(a);
        drop(b);
        // One idle buffer kept: the first one returned.
        let c = pool.get();
        assert_eq!(c.vec.as_ptr(), ptr);
        assert!(c.is_empty());
    }

    #[test]
    fn small_requests_take_small_buffers() {
        let pool = BufferPool::new(4 << 20, 4);
        let mut small = pool.get_for(100_000);
        assert_eq!(small.remaining(), 128 * 1024);
        assert_eq!(small.fill(1 << 20).len(), 128 * 1024);
        assert_eq!(pool.get_for(1).remaining(), MIN_CLASS);
        assert_eq!(pool.get_for(3 << 20).remaining(), 4 << 20);
        assert_eq!(pool.get_for(64 << 20).remaining(), 4 << 20);
        // An odd full size is its own class.
        let odd = BufferPool::new(3 * 1024 * 1024, 2);
        assert_eq!(odd.get_for(3 << 20).remaining(), 3 << 20);
        assert_eq!(odd.get_for(2 << 20).remaining(), 2 << 20);
        // Returned buffers are reused by size class, within the byte cap.
        let ptr = small.as_ref().as_ptr();
        drop(small);
        assert_eq!(pool.get_for(70_000).as_ref().as_ptr(), ptr);
    }
}
