//! The seam between the NBD server and where the data lives.
//!
//! The NBD layer validates every request against [`Backend::size`] and the
//! [`Capabilities`] before it calls the backend, so a backend only sees
//! in-range requests for operations it declared.

mod error;
pub mod file;
pub mod gate;
pub mod imageio;
pub mod memory;

pub use error::{Error, ErrorKind, Result};

use bytes::Bytes;
use std::future::Future;

/// What a backend can do, asked once when a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, zeroes and trims are refused.
    pub read_only: bool,
    /// `flush` makes completed writes durable.
    pub flush: bool,
    /// `write` / `zero` / `trim` honour `fua` natively (otherwise the NBD layer
    /// flushes after the command).
    pub fua: bool,
    /// `trim` is meaningful (may punch holes).
    pub trim: bool,
    /// `zero` is efficient (no data written).
    pub zero: bool,
    /// `zero` with `fast` fails with [`ErrorKind::Unsupported`] rather than
    /// falling back to writing zeroes.
    pub fast_zero: bool,
    /// `cache` prefetches.
    pub cache: bool,
    /// Flush and FUA on one connection make writes from all connections
    /// durable and visible: the backend keeps no per-connection cache.
    pub multi_conn: bool,
    /// `extents` reports real allocation (holes and zeroes).
    pub extents: bool,
    /// The name of the dirty bitmap served as `qemu:dirty-bitmap:<name>`,
    /// when the backend can report dirty extents.
    pub dirty_bitmap: Option<String>,
    /// Smallest I/O unit the backend handles without read-modify-write.
    pub min_block: u32,
    /// Preferred I/O size.
    pub preferred_block: u32,
    /// Largest read or write payload the backend takes in one call.
    pub max_payload: u32,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            zero: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            extents: true,
            dirty_bitmap: None,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 * 1024 * 1024,
        }
    }
}

/// Which metadata an `extents` call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentContext {
    /// Allocation: holes and zeroes (`base:allocation`).
    Allocation,
    /// Changed blocks (`qemu:dirty-bitmap:<name>`).
    Dirty,
}

/// One run of bytes with the same status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where the run starts in the image.
    pub offset: u64,
    /// How long it is (never 0).
    pub len: u64,
    /// Allocation: not allocated. Dirty: unused.
    pub hole: bool,
    /// Allocation: reads as zeroes. Dirty: the run changed (dirty).
    pub zero: bool,
}

/// One piece of a sparse read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes read from the image at `offset`.
    Data {
        /// Image offset of the first byte.
        offset: u64,
        /// The bytes, in pieces that follow each other (see
        /// [`Backend::read_parts`]).
        data: Vec<Bytes>,
    },
    /// `len` bytes at `offset` that read as zeroes.
    Zero {
        /// Image offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// Most extents a sparse read looks at before reading the rest as data.
pub const SPARSE_READ_EXTENTS: usize = 64;

/// How a zero request may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// Leave the range allocated (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with [`ErrorKind::Unsupported`] unless zeroing is fast.
    pub fast: bool,
    /// Durable before returning.
    pub fua: bool,
}

/// Storage behind one export. Shared by all connections of that export.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes, fixed for the life of the backend.
    fn size(&self) -> u64;

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = Result<Bytes>> + Send;

    /// Read `len` bytes at `offset` as pieces that follow each other: a
    /// backend that receives the data in pieces (HTTP body chunks) hands
    /// them over without joining them, and the NBD reply writes them as
    /// they are. The default reads one piece with [`Backend::read`].
    fn read_parts(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Vec<Bytes>>> + Send {
        async move { Ok(vec![self.read(offset, len).await?]) }
    }

    /// Read `len` bytes at `offset` as data and zero runs, in order,
    /// covering the range exactly. Zero runs are not read at all.
    ///
    /// The default asks `extents` for allocation, then reads the data runs;
    /// backends that can do both in one step override it.
    fn read_sparse(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Vec<ReadChunk>>> + Send {
        async move {
            let extents = self
                .extents(
                    ExtentContext::Allocation,
                    offset,
                    len as u64,
                    SPARSE_READ_EXTENTS,
                )
                .await
                .unwrap_or_default();
            read_planned(self, &extents, offset, len).await
        }
    }

    /// Write `data` at `offset`; durable before returning when `fua`.
    fn write(&self, offset: u64, data: Bytes, fua: bool)
    -> impl Future<Output = Result<()>> + Send;

    /// Make `len` bytes at `offset` read as zeroes.
    fn zero(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Hint that `len` bytes at `offset` are no longer needed.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send;

    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;

    /// Prefetch `len` bytes at `offset`.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;

    /// Extents covering at least the start of `offset..offset+len`, in order,
    /// contiguous, starting at `offset`; at most `max_count` of them. The last
    /// may end past `offset + len` but never past the size.
    fn extents(
        &self,
        context: ExtentContext,
        offset: u64,
        len: u64,
        max_count: usize,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send;
}

/// Read `offset..offset+len` as the runs `extents` give: zero runs become
/// [`ReadChunk::Zero`] without a read, the rest is read from `backend`.
///
/// # Errors
/// A read failed.
pub async fn read_planned<B: Backend + ?Sized>(
    backend: &B,
    extents: &[Extent],
    offset: u64,
    len: usize,
) -> Result<Vec<ReadChunk>> {
    let mut chunks = Vec::new();
    for (start, run, zero) in plan_sparse_read(extents, offset, len as u64) {
        chunks.push(if zero {
            ReadChunk::Zero {
                offset: start,
                len: run,
            }
        } else {
            ReadChunk::Data {
                offset: start,
                data: backend.read_parts(start, run as usize).await?,
            }
        });
    }
    Ok(chunks)
}

/// Split `offset..offset+len` into (start, len, reads-as-zero) runs from
/// allocation `extents`, merging neighbours; whatever the extents do not
/// cover is data.
pub fn plan_sparse_read(extents: &[Extent], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    for e in extents {
        let e_end = e.offset.saturating_add(e.len).min(end);
        if e.offset > pos || e_end <= pos {
            if e.offset > pos {
                break;
            }
            continue;
        }
        push_run(&mut runs, pos, e_end - pos, e.zero);
        pos = e_end;
        if pos >= end {
            break;
        }
    }
    if pos < end {
        push_run(&mut runs, pos, end - pos, false);
    }
    runs
}

fn push_run(runs: &mut Vec<(u64, u64, bool)>, start: u64, len: u64, zero: bool) {
    match runs.last_mut() {
        Some(last) if last.2 == zero => last.1 += len,
        _ => runs.push((start, len, zero)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, zero: bool) -> Extent {
        Extent {
            offset,
            len,
            hole: zero,
            zero,
        }
    }

    #[test]
    fn plan_merges_and_fills_gaps() {
        let e = [ext(0, 10, false), ext(10, 10, false), ext(20, 100, true)];
        assert_eq!(
            plan_sparse_read(&e, 5, 50),
            vec![(5, 15, false), (20, 35, true)]
        );
        // Nothing known: all data.
        assert_eq!(plan_sparse_read(&[], 7, 3), vec![(7, 3, false)]);
        // Extents stopping short: the rest is data.
        assert_eq!(
            plan_sparse_read(&[ext(0, 4, true)], 0, 10),
            vec![(0, 4, true), (4, 6, false)]
        );
    }
}
