//! A local raw file as an NBD backend: used by `serve --file`, the tests and
//! the benches.

use super::{
    Backend, Capabilities, Error, ErrorKind, Extent, ExtentContext, ReadChunk, Result,
    SPARSE_READ_EXTENTS, ZeroFlags, read_planned,
};
use crate::store::FileStore;
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;

/// A raw image file served with positional I/O from the blocking pool.
#[derive(Debug, Clone)]
pub struct FileBackend {
    store: Arc<FileStore>,
    read_only: bool,
}

impl FileBackend {
    /// Open `path`; `read_only` refuses every write.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        Ok(FileBackend {
            store: Arc::new(FileStore::open(path, !read_only)?),
            read_only,
        })
    }

    async fn blocking<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&FileStore) -> std::io::Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::io(what, e)),
            Err(e) => Err(Error::new(
                ErrorKind::Io,
                format!("{what}: worker failed: {e}"),
            )),
        }
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.store.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            ..Capabilities::default()
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        // Data in the page cache is copied right here: a trip to the blocking
        // pool costs more than the copy.
        if let Ok(Some(data)) = self.store.try_read_cached(offset, len) {
            return Ok(data);
        }
        self.blocking("read", move |s| s.read_new(offset, len))
            .await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        // Holes come from lseek, which does not wait for data; cached data is
        // copied right here. Only what would block goes to the blocking pool.
        let extents: Vec<Extent> = self
            .store
            .extents(offset, len as u64, SPARSE_READ_EXTENTS)
            .unwrap_or_default()
            .into_iter()
            .map(to_extent)
            .collect();
        read_planned(self, &extents, offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        // Like reads: what the page cache takes without waiting is written
        // right here.
        let done = self
            .store
            .try_write_nowait(offset, &data)
            .map_err(|e| Error::io("write", e))?;
        if done == data.len() && !fua {
            return Ok(());
        }
        // A buffered write rarely blocks for long: do it on this worker,
        // telling the runtime to move its other tasks away meanwhile. That
        // costs a third less CPU than a trip to the blocking pool. Syncs
        // (FUA) do block, so they go to the pool.
        if !fua && can_block_in_place() {
            let rest = data.get(done..).unwrap_or_default();
            return tokio::task::block_in_place(|| self.store.write_at(offset + done as u64, rest))
                .map_err(|e| Error::io("write", e));
        }
        self.blocking("write", move |s| {
            if let Some(rest) = data.get(done..) {
                s.write_at(offset + done as u64, rest)?;
            }
            if fua {
                s.flush()?;
            }
            Ok(())
        })
        .await
    }

    async fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.blocking("zero", move |s| {
            s.zero(offset, len, !flags.no_hole, flags.fast)?;
            if flags.fua {
                s.flush()?;
            }
            Ok(())
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.blocking("trim", move |s| {
            s.zero(offset, len, true, true).or_else(|e| {
                // TRIM is a hint: a filesystem that cannot punch holes ignores it.
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            if fua {
                s.flush()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.blocking("flush", |s| s.flush()).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.blocking("cache", move |s| s.prefetch(offset, len))
            .await
    }

    async fn extents(
        &self,
        context: ExtentContext,
        offset: u64,
        len: u64,
        max_count: usize,
    ) -> Result<Vec<Extent>> {
        if context != ExtentContext::Allocation {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "a local file has no dirty bitmap",
            ));
        }
        let found = self
            .blocking("extents", move |s| s.extents(offset, len, max_count))
            .await?;
        Ok(found.into_iter().map(to_extent).collect())
    }
}

/// `block_in_place` needs a multi-threaded runtime.
fn can_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn to_extent(e: crate::store::StoreExtent) -> Extent {
    Extent {
        offset: e.offset,
        len: e.len,
        hole: e.hole,
        zero: e.hole,
    }
}
