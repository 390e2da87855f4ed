//! An in-memory backend for unit tests, fuzz targets and benches: sparse by
//! 4 KiB blocks, so holes and extents behave like a real sparse file.

use super::{Backend, Capabilities, Error, ErrorKind, Extent, ExtentContext, Result, ZeroFlags};
use bytes::Bytes;
use std::sync::Mutex;

/// Allocation granularity.
const BLOCK: u64 = 4096;

/// An image held in memory.
#[derive(Debug)]
pub struct MemoryBackend {
    size: u64,
    read_only: bool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

impl MemoryBackend {
    /// An all-hole image of `size` bytes (at most what memory holds).
    pub fn new(size: usize, read_only: bool) -> Self {
        let blocks = (size as u64).div_ceil(BLOCK) as usize;
        MemoryBackend {
            size: size as u64,
            read_only,
            state: Mutex::new(State {
                data: vec![0; size],
                allocated: vec![false; blocks],
            }),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "memory backend poisoned"))
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(Error::new(ErrorKind::OutOfRange, "past the end")),
        }
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            ..Capabilities::default()
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let r = self.range(offset, len as u64)?;
        let st = self.lock()?;
        Ok(Bytes::copy_from_slice(st.data.get(r).unwrap_or_default()))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        let mut st = self.lock()?;
        if let Some(dst) = st.data.get_mut(r.clone()) {
            dst.copy_from_slice(&data);
        }
        let (first, last) = (r.start as u64 / BLOCK, (r.end as u64).div_ceil(BLOCK));
        for b in first..last {
            if let Some(a) = st.allocated.get_mut(b as usize) {
                *a = true;
            }
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let r = self.range(offset, len)?;
        let mut st = self.lock()?;
        if let Some(dst) = st.data.get_mut(r.clone()) {
            dst.fill(0);
        }
        let (first, last) = ((r.start as u64).div_ceil(BLOCK), r.end as u64 / BLOCK);
        for b in first..last {
            if let Some(a) = st.allocated.get_mut(b as usize) {
                *a = flags.no_hole;
            }
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let flags = ZeroFlags {
            no_hole: false,
            fast: true,
            fua,
        };
        self.zero(offset, len, flags).await
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    async fn extents(
        &self,
        context: ExtentContext,
        offset: u64,
        len: u64,
        max_count: usize,
    ) -> Result<Vec<Extent>> {
        if context != ExtentContext::Allocation {
            return Err(Error::new(ErrorKind::Unsupported, "no dirty bitmap"));
        }
        let r = self.range(offset, len.min(self.size.saturating_sub(offset)))?;
        let st = self.lock()?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = r.start as u64;
        while pos < r.end as u64 && out.len() <= max_count {
            let block = pos / BLOCK;
            let hole = !st.allocated.get(block as usize).copied().unwrap_or(true);
            let next = ((block + 1) * BLOCK).min(r.end as u64);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = next;
        }
        out.truncate(max_count.max(1));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_zero_extents() {
        let m = MemoryBackend::new(64 * 1024, false);
        m.write(5000, Bytes::from_static(b"hello"), false)
            .await
            .unwrap();
        assert_eq!(&m.read(5000, 5).await.unwrap()[..], b"hello");
        let e = m
            .extents(ExtentContext::Allocation, 0, 65536, 10)
            .await
            .unwrap();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].hole && !e[1].hole && e[2].hole);
        m.zero(4096, 4096, ZeroFlags::default()).await.unwrap();
        assert_eq!(&m.read(5000, 5).await.unwrap()[..], &[0; 5]);
        let e = m
            .extents(ExtentContext::Allocation, 0, 65536, 10)
            .await
            .unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(m.read(65535, 2).await.is_err());
    }
}
