//! What clients did to an export, counted across all its connections: what
//! the transfer session needs to decide whether an upload is complete.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every connection of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    writes_started: AtomicU64,
    writes_completed: AtomicU64,
    write_failures: AtomicU64,
    /// `writes_completed` as it was when the newest successful flush began.
    flushed_writes: AtomicU64,
}

/// A consistent-enough copy of [`ExportStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Bytes written, zeroed or trimmed successfully.
    pub bytes_written: u64,
    /// Modifying commands completed successfully.
    pub writes_completed: u64,
    /// Modifying commands that failed.
    pub write_failures: u64,
    /// Whether every completed write was followed by a successful flush and
    /// none is in flight.
    pub flushed: bool,
}

impl ExportStats {
    /// A read of `n` bytes succeeded.
    pub fn read_done(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    /// A modifying command begins.
    pub fn write_started(&self) {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
    }

    /// A modifying command ended.
    pub fn write_done(&self, n: u64, ok: bool) {
        if ok {
            self.bytes_written.fetch_add(n, Ordering::Relaxed);
            self.writes_completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.write_failures.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A flush begins: the writes it covers.
    pub fn flush_started(&self) -> u64 {
        self.writes_completed.load(Ordering::SeqCst)
    }

    /// A flush that began when `covered` writes had completed succeeded.
    pub fn flush_done(&self, covered: u64) {
        self.flushed_writes.fetch_max(covered, Ordering::SeqCst);
    }

    /// Read the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let started = self.writes_started.load(Ordering::SeqCst);
        let completed = self.writes_completed.load(Ordering::SeqCst);
        let failures = self.write_failures.load(Ordering::SeqCst);
        let flushed = self.flushed_writes.load(Ordering::SeqCst);
        StatsSnapshot {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            writes_completed: completed,
            write_failures: failures,
            flushed: started == completed + failures && flushed >= completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_must_follow_the_last_write() {
        let s = ExportStats::default();
        assert!(s.snapshot().flushed, "nothing written is trivially flushed");
        s.write_started();
        s.write_done(10, true);
        assert!(!s.snapshot().flushed);
        let covered = s.flush_started();
        s.write_started();
        s.flush_done(covered);
        assert!(!s.snapshot().flushed, "a write is still in flight");
        s.write_done(5, true);
        assert!(!s.snapshot().flushed, "the flush began before that write");
        let covered = s.flush_started();
        s.flush_done(covered);
        let snap = s.snapshot();
        assert!(snap.flushed);
        assert_eq!((snap.bytes_written, snap.writes_completed), (15, 2));
    }
}
