//! Whether a download has been copied: every byte of the disk's data (what
//! the export does not report as zero; with a dirty bitmap, the dirty part
//! of that) returned by a successful READ at least once, on any connection,
//! in any period. Copy tools skip what reads as zero, so this is exactly
//! what a full copy reads, and what a probe (`qemu-img info`, `nbdinfo`)
//! never does.
//!
//! A disk with no data at all would be "covered" by any probe. There a
//! copy tool shows itself differently: it asks BLOCK_STATUS (or reads)
//! over the whole disk to find out that there is nothing to copy, which
//! `qemu-img info` does not. So, for such a disk only, every byte must also
//! have been described by BLOCK_STATUS or read.

use super::RangeSet;
use crate::progress::format_bytes;

/// What a download must still read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    size: u64,
    data: u64,
    missing: RangeSet,
    /// For a disk without data: what no reply has described or read yet.
    unseen: Option<RangeSet>,
}

impl Coverage {
    /// A disk of `size` bytes whose data lies in `data` (ranges
    /// `[start, end)`, clipped to the disk).
    pub fn new(size: u64, data: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut missing = RangeSet::new();
        for (start, end) in data {
            missing.insert(start.min(size), end.min(size));
        }
        let unseen = missing.is_empty().then(|| {
            let mut all = RangeSet::new();
            all.insert(0, size);
            all
        });
        Coverage {
            size,
            data: missing.total(),
            missing,
            unseen,
        }
    }

    /// A READ of `[offset, offset + len)` succeeded.
    pub fn read(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        self.missing.remove(offset, end);
        if let Some(u) = &mut self.unseen {
            u.remove(offset, end);
        }
    }

    /// A BLOCK_STATUS reply described `[offset, offset + len)`.
    pub fn described(&mut self, offset: u64, len: u64) {
        if let Some(u) = &mut self.unseen {
            u.remove(offset, offset.saturating_add(len));
        }
    }

    /// Every byte of data was read (and, for a disk without data, every
    /// byte described).
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.unseen.as_ref().is_none_or(RangeSet::is_empty)
    }

    /// Bytes of data that a copy reads.
    pub fn data(&self) -> u64 {
        self.data
    }

    /// Bytes of data read so far.
    pub fn done(&self) -> u64 {
        self.data - self.missing.total()
    }

    /// "covered 3 of 64 MiB of data", for the log.
    pub fn summary(&self) -> String {
        if self.data == 0 {
            let seen = self.size - self.unseen.as_ref().map_or(0, RangeSet::total);
            return format!(
                "the disk has no data; {} of {} described",
                format_bytes(seen),
                format_bytes(self.size)
            );
        }
        format!(
            "{} of {} of data read ({}%)",
            format_bytes(self.done()),
            format_bytes(self.data),
            self.done() * 100 / self.data
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Coverage;

    #[test]
    fn data_must_be_read_holes_need_not() {
        let mut c = Coverage::new(100, [(0, 10), (50, 60)]);
        assert!(!c.complete());
        c.described(0, 100);
        assert!(!c.complete(), "a map is not a copy");
        c.read(0, 10);
        assert!(!c.complete());
        assert_eq!(c.done(), 10);
        c.read(45, 20);
        assert!(c.complete());
        assert_eq!(c.summary(), "20 B of 20 B of data read (100%)");
    }

    #[test]
    fn a_disk_without_data_needs_a_whole_walk() {
        let mut c = Coverage::new(1 << 20, []);
        c.read(0, 512);
        assert!(!c.complete(), "reading the header is a probe");
        c.described(0, 1 << 19);
        assert!(!c.complete());
        c.described(1 << 19, 1 << 19);
        assert!(c.complete());
    }

    #[test]
    fn data_past_the_end_is_clipped() {
        let mut c = Coverage::new(10, [(5, 20)]);
        assert_eq!(c.data(), 5);
        c.read(5, 5);
        assert!(c.complete());
    }
}
