//! Reused, page-aligned I/O buffers. Fresh multi-MiB allocations cost page
//! faults on every request; a small pool keeps a few buffers warm, and the
//! alignment lets PUT chunks go to disk with `O_DIRECT`.

use crate::store::DIRECT_ALIGN;
use std::sync::{Arc, Mutex};

/// A pool of buffers of one size.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    max_free: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool of `size`-byte buffers keeping at most `max_free` idle ones.
    pub fn new(size: usize, max_free: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            size,
            max_free,
            free: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer with capacity for the pool's size.
    pub fn get(self: &Arc<Self>) -> PoolBuf {
        let vec = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size + DIRECT_ALIGN]);
        let mut start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        if start.saturating_add(self.size) > vec.len() {
            // No aligned window (never on real allocators): stay correct,
            // the write falls back to buffered I/O.
            start = 0;
        }
        PoolBuf {
            vec,
            start,
            len: 0,
            cap: self.size,
            pool: self.clone(),
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
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.pool.max_free {
            free.push(std::mem::take(&mut self.vec));
        }
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
}
