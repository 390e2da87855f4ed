//! One memory budget for the whole server: the payload bytes in flight
//! (read replies, write payloads, block status replies) of every connection
//! together. A request waits for its share before its payload is read or
//! its reply built, and gives it back once the reply is written.

use super::extents::MAX_EXTENTS;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per permit.
const PERMIT_BYTES: u64 = 4096;

/// The shared budget. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    limit: u64,
    in_use: AtomicU64,
    peak: AtomicU64,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    inner: Arc<Inner>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.inner.in_use.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Budget {
    /// A budget of `limit` bytes, raised to `floor` (the largest single
    /// charge) so that every request fits alone and nothing deadlocks.
    pub fn new(limit: u64, floor: u64) -> Self {
        let permits = limit.max(floor).div_ceil(PERMIT_BYTES).max(1);
        // Semaphores count in usize; bound it well below their maximum.
        let permits = permits.min(u64::from(u32::MAX >> 3));
        Budget {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(permits as usize)),
                limit: permits * PERMIT_BYTES,
                in_use: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            }),
        }
    }

    /// The budget in bytes (a multiple of the permit size).
    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Bytes charged now.
    pub fn in_use(&self) -> u64 {
        self.inner.in_use.load(Ordering::Relaxed)
    }

    /// The most bytes ever charged at once.
    pub fn peak(&self) -> u64 {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// Wait for `bytes` (at most the limit: larger charges are clamped, so
    /// they take the whole budget). `None` once the budget is closed.
    pub async fn charge(&self, bytes: u64) -> Option<Share> {
        let bytes = bytes.div_ceil(PERMIT_BYTES).max(1) * PERMIT_BYTES;
        let bytes = bytes.min(self.inner.limit);
        let n = u32::try_from(bytes / PERMIT_BYTES).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.inner.permits)
            .acquire_many_owned(n)
            .await
            .ok()?;
        let now = self.inner.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.inner.peak.fetch_max(now, Ordering::Relaxed);
        Some(Share {
            _permit: permit,
            bytes,
            inner: Arc::clone(&self.inner),
        })
    }
}

/// The most a BLOCK_STATUS reply can take on the wire: one chunk per
/// selected context, each with at most [`MAX_EXTENTS`] extents (one with
/// REQ_ONE), 8 bytes each in compact replies, 16 in extended ones.
pub fn block_status_bytes(extended: bool, contexts: usize, req_one: bool) -> u64 {
    let extents = if req_one { 1 } else { MAX_EXTENTS as u64 };
    let per_extent = if extended { 16 } else { 8 };
    // Chunk header (32 at most) and context id + count (8).
    contexts as u64 * (40 + extents * per_extent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_are_bounded_and_given_back() {
        let b = Budget::new(64 * 1024, 4096);
        assert_eq!(b.limit(), 64 * 1024);
        let a = b.charge(1).await;
        assert_eq!(b.in_use(), 4096);
        let c = b.charge(60 * 1024).await;
        assert_eq!(b.in_use(), 64 * 1024);
        // Full: the next charge waits.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), b.charge(1)).await;
        assert!(waiting.is_err());
        drop((a, c));
        assert_eq!(b.in_use(), 0);
        assert_eq!(b.peak(), 64 * 1024);
        // More than the limit takes the whole budget instead of hanging.
        let all = b.charge(1 << 30).await;
        assert_eq!(b.in_use(), b.limit());
        drop(all);
    }

    #[test]
    fn block_status_bound() {
        assert_eq!(block_status_bytes(false, 1, true), 48);
        assert_eq!(block_status_bytes(true, 2, false), 2 * (40 + 16 * 65536));
        assert_eq!(block_status_bytes(true, 0, false), 0);
    }

    #[test]
    fn the_floor_always_fits() {
        let b = Budget::new(0, 32 << 20);
        assert_eq!(b.limit(), 32 << 20);
    }
}
