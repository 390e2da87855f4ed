//! Reusable data buffers for reads and write payloads.
//!
//! Every NBD read reply and write payload needs a buffer of up to 32 MiB.
//! Fresh large allocations cost page faults and zeroing on every request;
//! this pool hands out buffers that were used before, as [`Bytes`] that
//! return their memory to the pool when the last reference drops.

use bytes::Bytes;
use std::sync::Mutex;

/// Smallest pooled size; smaller buffers are plain allocations.
const MIN_POOLED: usize = 16 * 1024;
/// Largest pooled size class (the protocol's payload limit).
const MAX_POOLED: usize = 32 * 1024 * 1024;
/// Bytes the pool keeps at most, over all size classes.
const POOL_BYTES: usize = 96 * 1024 * 1024;

/// Size classes are powers of two from `MIN_POOLED` to `MAX_POOLED`.
const CLASSES: usize = (MAX_POOLED / MIN_POOLED).trailing_zeros() as usize + 1;

struct Pool {
    free: [Vec<Vec<u8>>; CLASSES],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

fn class_of(len: usize) -> Option<usize> {
    if len > MAX_POOLED {
        return None;
    }
    let size = len.max(MIN_POOLED).next_power_of_two();
    Some((size / MIN_POOLED).trailing_zeros() as usize)
}

/// A buffer of exactly `len` initialised bytes (contents unspecified: the
/// caller overwrites them). Pooled when `len` is in the pooled range.
#[derive(Debug)]
pub struct PoolBuf {
    vec: Vec<u8>,
    len: usize,
}

impl PoolBuf {
    /// A buffer of `len` bytes, reused from the pool when possible.
    pub fn new(len: usize) -> Self {
        let Some(class) = class_of(len) else {
            return PoolBuf {
                vec: vec![0; len],
                len,
            };
        };
        let reused = POOL.lock().ok().and_then(|mut p| {
            let v = p.free.get_mut(class)?.pop()?;
            p.bytes -= v.len();
            Some(v)
        });
        let vec = reused.unwrap_or_else(|| vec![0; MIN_POOLED << class]);
        PoolBuf { vec, len }
    }

    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        self.vec.get_mut(..len).unwrap_or_default()
    }

    /// Freeze into `Bytes` that return the memory to the pool on drop.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        self.vec.get(..self.len).unwrap_or_default()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let Some(class) = class_of(self.vec.len()) else {
            return;
        };
        if self.vec.len() != MIN_POOLED << class {
            return;
        }
        if let Ok(mut p) = POOL.lock() {
            if p.bytes + self.vec.len() <= POOL_BYTES {
                p.bytes += self.vec.len();
                if let Some(list) = p.free.get_mut(class) {
                    list.push(std::mem::take(&mut self.vec));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        // The 4 MiB class is used by no other unit test.
        let mut a = PoolBuf::new(3 << 20);
        a.as_mut_slice().fill(7);
        let ptr = a.as_ref().as_ptr();
        let b = a.freeze();
        assert_eq!(b.len(), 3 << 20);
        assert!(b.iter().all(|&x| x == 7));
        drop(b);
        let c = PoolBuf::new((3 << 20) + 5);
        assert_eq!(c.as_ref().len(), (3 << 20) + 5);
        assert_eq!(c.as_ref().as_ptr(), ptr, "the freed buffer is reused");
        assert_eq!(PoolBuf::new(10).as_ref().len(), 10);
        assert_eq!(PoolBuf::new(MAX_POOLED + 1).as_ref().len(), MAX_POOLED + 1);
    }
}
