//! A local raw file as an NBD backend: used by `serve --file`, the tests and
//! the benches.

use super::{Backend, Capabilities, Error, ErrorKind, Extent, ExtentContext, Result, ZeroFlags};
use crate::store::FileStore;
use bytes::{Bytes, BytesMut};
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
        self.blocking("read", move |s| {
            let mut buf = BytesMut::zeroed(len);
            s.read_at(offset, &mut buf)?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.blocking("write", move |s| {
            s.write_at(offset, &data)?;
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
        Ok(found
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                len: e.len,
                hole: e.hole,
                zero: e.hole,
            })
            .collect())
    }
}
