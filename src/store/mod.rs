//! Local disk images: positional, blocking I/O shared by the NBD file backend
//! and the embedded imageio data server.
//!
//! Every call is positional (`pread`/`pwrite`/`fallocate`), so any number of
//! threads may use one [`FileStore`] at once. Callers on the async runtime go
//! through `tokio::task::spawn_blocking`.

mod file;

pub use file::{DIRECT_ALIGN, FileStore, StoreExtent};
