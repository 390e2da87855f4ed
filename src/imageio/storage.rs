//! What a ticket's image lives in: a local file ([`FileStore`], blocking
//! positional I/O on the blocking pool) or an NBD export ([`NbdClient`],
//! one pipelined connection per ticket). The handlers see one [`Storage`]
//! and never branch on the backend themselves.
//!
//! NBD operations run in their own tasks, so a handler that is dropped
//! (client gone) never abandons a request half-sent on the shared
//! connection.

use super::buffers::{BufferPool, PoolBuf};
use super::checksum::{self, Algorithm};
use super::ticket::BackendUrl;
use crate::nbd_client::{self, ConnectOptions, DirtyExtent, NbdClient, ZeroExtent};
use crate::store::FileStore;
use bytes::Bytes;
use std::future::Future;
use std::io;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// The open storage of a ticket; cheap to clone.
#[derive(Debug, Clone)]
pub enum Storage {
    /// A local image file.
    File(Arc<FileStore>),
    /// An NBD export.
    Nbd(Arc<NbdClient>),
}

/// An NBD failure as an I/O error (the cause stays its source).
fn nbd_io(e: nbd_client::Error) -> io::Error {
    io::Error::other(e)
}

/// Run an NBD operation in its own task (see the module docs).
async fn detached<T: Send + 'static>(
    f: impl Future<Output = Result<T, nbd_client::Error>> + Send + 'static,
) -> io::Result<T> {
    match tokio::spawn(f).await {
        Ok(r) => r.map_err(nbd_io),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Run blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(e)),
    }
}

impl Storage {
    /// Open what `url` names (`writable` for tickets that may write;
    /// `dirty` for tickets with `"dirty": true`, whose NBD connection looks
    /// for the export's dirty bitmap like imageio's does).
    ///
    /// # Errors
    /// The file cannot be opened; the NBD server cannot be reached or
    /// refuses the export.
    pub async fn open(url: &BackendUrl, writable: bool, dirty: bool) -> io::Result<Storage> {
        match url {
            BackendUrl::File(path) => {
                let path = path.clone();
                let store = blocking(move || {
                    FileStore::open(&path, writable).map(FileStore::with_direct_io)
                })
                .await?;
                Ok(Storage::File(Arc::new(store)))
            }
            BackendUrl::Nbd(address) => {
                let options = ConnectOptions {
                    dirty_bitmap: dirty,
                    contexts: Vec::new(),
                };
                let client = NbdClient::connect_with(address, &options)
                    .await
                    .map_err(nbd_io)?;
                tracing::info!(
                    socket = %address.socket.display(),
                    size = client.size(),
                    dirty_bitmap = client.info().dirty_bitmap_name().unwrap_or(""),
                    "NBD export connected"
                );
                Ok(Storage::Nbd(Arc::new(client)))
            }
        }
    }

    /// The image size: the file's, or the NBD export's.
    pub fn size(&self) -> u64 {
        match self {
            Storage::File(f) => f.size(),
            Storage::Nbd(c) => c.size(),
        }
    }

    /// Whether the storage cannot serve any more requests (a failed NBD
    /// connection).
    pub fn is_broken(&self) -> bool {
        match self {
            Storage::File(_) => false,
            Storage::Nbd(c) => c.is_broken(),
        }
    }

    /// Start reading `n` bytes at `at`.
    pub fn spawn_read(
        &self,
        pool: &Arc<BufferPool>,
        at: u64,
        n: usize,
    ) -> JoinHandle<io::Result<Bytes>> {
        match self {
            Storage::File(f) => {
                let f = f.clone();
                let mut buf = pool.get_for(n);
                tokio::task::spawn_blocking(move || {
                    f.read_direct(at, buf.fill(n))?;
                    // The buffer goes back to the pool when hyper drops it.
                    Ok(Bytes::from_owner(buf))
                })
            }
            Storage::Nbd(c) => {
                let c = c.clone();
                tokio::spawn(async move { c.read(at, n).await.map_err(nbd_io) })
            }
        }
    }

    /// Start writing `chunk` at `at`.
    pub fn spawn_write(&self, at: u64, chunk: PoolBuf) -> JoinHandle<io::Result<()>> {
        match self {
            Storage::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.write_direct(at, chunk.as_ref()))
            }
            Storage::Nbd(c) => {
                let c = c.clone();
                tokio::spawn(
                    async move { c.write(at, chunk.as_ref(), false).await.map_err(nbd_io) },
                )
            }
        }
    }

    /// Zero `len` bytes at `at`; `punch` deallocates (the ticket's
    /// `sparse`), otherwise the range stays allocated.
    ///
    /// # Errors
    /// I/O or NBD failures (a read-only export included).
    pub async fn zero(&self, at: u64, len: u64, punch: bool) -> io::Result<()> {
        match self {
            Storage::File(f) => {
                let f = f.clone();
                blocking(move || f.zero(at, len, punch, false)).await
            }
            Storage::Nbd(c) => {
                let c = c.clone();
                detached(async move { c.zero(at, len, punch).await }).await
            }
        }
    }

    /// Make written data durable (fsync / NBD FLUSH).
    ///
    /// # Errors
    /// I/O or NBD failures.
    pub async fn flush(&self) -> io::Result<()> {
        match self {
            Storage::File(f) => {
                let f = f.clone();
                blocking(move || f.flush()).await
            }
            Storage::Nbd(c) => {
                let c = c.clone();
                detached(async move { c.flush().await }).await
            }
        }
    }

    /// Zero extents from the start, at most about `max_count` of them
    /// (they may stop short of the end). Files report holes as
    /// `zero` and `hole`; NBD exports as imageio's nbd backend does.
    ///
    /// # Errors
    /// I/O or NBD failures.
    pub async fn zero_extents(&self, max_count: usize) -> io::Result<Vec<ZeroExtent>> {
        match self {
            Storage::File(f) => {
                let f = f.clone();
                let found = blocking(move || f.extents(0, f.size(), max_count)).await?;
                Ok(found
                    .iter()
                    .map(|e| ZeroExtent {
                        start: e.offset,
                        length: e.len,
                        zero: e.hole,
                        hole: e.hole,
                    })
                    .collect())
            }
            Storage::Nbd(c) => {
                let c = c.clone();
                detached(async move { c.zero_extents(max_count).await }).await
            }
        }
    }

    /// Dirty extents from the start, at most about `max_count` of them
    /// (they may stop short of the end); `None` when there is no dirty
    /// bitmap to ask (an NBD export without one, as imageio's nbd backend
    /// refuses). A file keeps no bitmap: all of it is dirty data.
    ///
    /// # Errors
    /// I/O or NBD failures.
    pub async fn dirty_extents(&self, max_count: usize) -> io::Result<Option<Vec<DirtyExtent>>> {
        match self {
            Storage::File(f) => {
                let size = f.size();
                Ok(Some(if size == 0 {
                    Vec::new()
                } else {
                    vec![DirtyExtent {
                        start: 0,
                        length: size,
                        dirty: true,
                        zero: false,
                    }]
                }))
            }
            Storage::Nbd(c) if !c.has_dirty_bitmap() => Ok(None),
            Storage::Nbd(c) => {
                let c = c.clone();
                detached(async move { c.dirty_extents(max_count).await })
                    .await
                    .map(Some)
            }
        }
    }

    /// The block checksum of the whole image; `canceled` is asked before
    /// each block, `progress` told each block's length.
    ///
    /// # Errors
    /// I/O or NBD failures; `Interrupted` when cancelled.
    pub async fn checksum(
        &self,
        algorithm: Algorithm,
        block_size: u64,
        canceled: impl Fn() -> bool + Send + 'static,
        progress: impl FnMut(u64) + Send + 'static,
    ) -> io::Result<String> {
        match self {
            Storage::File(f) => {
                let f = f.clone();
                blocking(move || checksum::compute(&f, algorithm, block_size, canceled, progress))
                    .await
            }
            Storage::Nbd(c) => {
                let c = c.clone();
                match tokio::spawn(checksum::compute_nbd(
                    c, algorithm, block_size, canceled, progress,
                ))
                .await
                {
                    Ok(r) => r,
                    Err(e) => Err(io::Error::other(e)),
                }
            }
        }
    }

    /// Release the storage: an NBD connection sends DISC and closes.
    pub async fn close(self) {
        if let Storage::Nbd(c) = self {
            c.close().await;
        }
    }
}
