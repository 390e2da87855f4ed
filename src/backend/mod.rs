//! The seam between the NBD server and where the data lives.
//!
//! The NBD layer validates every request against [`Backend::size`] and the
//! [`Capabilities`] before it calls the backend, so a backend only sees
//! in-range requests for operations it declared.

mod error;
pub mod file;

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
