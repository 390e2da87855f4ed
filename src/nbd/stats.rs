//! What clients moved through an export, counted across all its
//! connections: bytes for the progress line. (What the transfer session
//! decides on comes from [`Observer`](crate::nbd::Observer) events.)

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every connection of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// A copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes written, zeroed or trimmed successfully.
    pub bytes_written: u64,
}

impl ExportStats {
    /// A read of `n` bytes succeeded.
    pub fn read_done(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    /// A modifying command of `n` bytes succeeded.
    pub fn write_done(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    /// Read the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}
