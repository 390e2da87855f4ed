use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest zero buffer written when the filesystem cannot zero a range.
const ZERO_BUF: usize = 1024 * 1024;

/// Alignment of offsets, lengths and buffer addresses for direct I/O.
pub const DIRECT_ALIGN: usize = 4096;

/// `cachestat(2)`: the same number on every Linux architecture.
const SYS_CACHESTAT: libc::c_long = 451;
/// Page size assumed when counting cached pages (a larger real page size
/// only makes ranges look uncached, which is safe).
const PAGE_SIZE: u64 = 4096;

/// Set once the kernel said it has no `cachestat`.
static NO_CACHESTAT: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// One run of an image with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreExtent {
    /// Start offset.
    pub offset: u64,
    /// Length, never 0.
    pub len: u64,
    /// `true` for a hole (reads as zeroes, not allocated).
    pub hole: bool,
}

/// A raw image file opened for positional I/O.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    size: u64,
    writable: bool,
    /// Whether `RWF_NOWAIT` writes are worth trying on this file.
    nowait_writes: AtomicBool,
    /// A second descriptor opened with `O_DIRECT`, for
    /// [`FileStore::write_direct`] and [`FileStore::read_direct`].
    direct: Option<File>,
}

impl FileStore {
    /// Open `path`; with `writable`, for reading and writing.
    ///
    /// # Errors
    /// The file cannot be opened or is not a regular file or block device.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let meta = file.metadata()?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in metadata; ask the kernel.
            let end = unsafe_lseek(&file, 0, libc::SEEK_END)?;
            unsafe_lseek(&file, 0, libc::SEEK_SET)?;
            end
        };
        Ok(FileStore {
            file,
            path: path.to_path_buf(),
            size,
            writable,
            nowait_writes: AtomicBool::new(true),
            direct: None,
        })
    }

    /// Create (or truncate to) a sparse file of `size` bytes and open it.
    ///
    /// # Errors
    /// The file cannot be created or sized.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Ok(FileStore {
            file,
            path: path.to_path_buf(),
            size,
            writable: true,
            nowait_writes: AtomicBool::new(true),
            direct: None,
        })
    }

    /// Also open the file with `O_DIRECT` for [`FileStore::write_direct`]
    /// and [`FileStore::read_direct`]. On a filesystem that refuses direct
    /// I/O (tmpfs), nothing changes and all I/O stays buffered.
    pub fn with_direct_io(mut self) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.direct = OpenOptions::new()
            .read(true)
            .write(self.writable)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .ok();
        self
    }

    /// Like [`FileStore::read_at`], but a range that is not in the page
    /// cache is read with `O_DIRECT` (when offset, length and buffer are
    /// aligned to [`DIRECT_ALIGN`] and direct I/O was enabled). Cached data
    /// is copied from the cache; cold data skips it, since filling the page
    /// cache costs more CPU than the disk read on many machines and evicts
    /// the working set. The check is `cachestat(2)` (Linux 6.5); where the
    /// kernel lacks it, every read stays buffered.
    ///
    /// # Errors
    /// The read failed.
    pub fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            return self.read_at(offset, buf);
        };
        let aligned = offset % DIRECT_ALIGN as u64 == 0
            && buf.len() % DIRECT_ALIGN == 0
            && (buf.as_ptr() as usize) % DIRECT_ALIGN == 0;
        if !aligned || buf.is_empty() || self.cached(offset, buf.len() as u64) != Some(false) {
            return self.read_at(offset, buf);
        }
        let mut got = 0;
        while got < buf.len() {
            let Some(part) = buf.get_mut(got..) else {
                break;
            };
            match direct.read_at(part, offset + got as u64) {
                Ok(0) => {
                    part.fill(0);
                    break;
                }
                Ok(n) => {
                    got += n;
                    if n % DIRECT_ALIGN != 0 {
                        // A short read at EOF: the rest reads as zeroes.
                        let tail_pos = offset + got as u64;
                        return match buf.get_mut(got..) {
                            Some(tail) => self.read_at(tail_pos, tail),
                            None => Ok(()),
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Some filesystems accept O_DIRECT at open but not the read.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let tail_pos = offset + got as u64;
                    return match buf.get_mut(got..) {
                        Some(tail) => self.read_at(tail_pos, tail),
                        None => Ok(()),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether every page of `offset..offset+len` is in the page cache, by
    /// `cachestat(2)`, which (unlike a `RWF_NOWAIT` read) starts no
    /// readahead. `None` when the kernel cannot tell.
    fn cached(&self, offset: u64, len: u64) -> Option<bool> {
        if NO_CACHESTAT.load(Ordering::Relaxed) {
            return None;
        }
        let range = CachestatRange { off: offset, len };
        let mut stat = Cachestat::default();
        // SAFETY: cachestat reads `range` and writes `stat`, both valid
        // #[repr(C)] values that live across the call; the descriptor is
        // owned; flags must be 0.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0u32,
            )
        };
        if rc != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                NO_CACHESTAT.store(true, Ordering::Relaxed);
            }
            return None;
        }
        let page = PAGE_SIZE;
        let pages = (offset + len).div_ceil(page) - offset / page;
        Some(stat.nr_cache >= pages)
    }

    /// Write all of `data` at `offset`, bypassing the page cache when the
    /// offset, the length and the buffer address are multiples of
    /// [`DIRECT_ALIGN`] and direct I/O was enabled; otherwise like
    /// [`FileStore::write_at`]. Large sequential uploads avoid filling the
    /// page cache (and the cost of writing it back later).
    ///
    /// # Errors
    /// The write failed.
    pub fn write_direct(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = offset % DIRECT_ALIGN as u64 == 0
            && data.len() % DIRECT_ALIGN == 0
            && (data.as_ptr() as usize) % DIRECT_ALIGN == 0;
        match &self.direct {
            Some(direct) if aligned && self.writable => match direct.write_all_at(data, offset) {
                // Some filesystems accept O_DIRECT at open but not the write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.write_at(offset, data),
                other => other,
            },
            _ => self.write_at(offset, data),
        }
    }

    /// Size of the image in bytes, as it was at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the image lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Fill `buf` from `offset`. Bytes past the end of the file read as zeroes.
    ///
    /// # Errors
    /// The read failed.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let Some(rest) = buf.get_mut(done..) else {
                break;
            };
            match self.file.read_at(rest, offset + done as u64) {
                Ok(0) => {
                    rest.fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` into a pooled buffer (see
    /// [`crate::bufpool`]). Bytes past the end of the file read as zeroes.
    ///
    /// # Errors
    /// The read failed.
    pub fn read_new(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let mut buf = crate::bufpool::PoolBuf::new(len);
        self.read_at(offset, buf.as_mut_slice())?;
        Ok(buf.freeze())
    }

    /// Read `len` bytes at `offset` only if that needs no waiting: the data
    /// is in the page cache (`preadv2` with `RWF_NOWAIT`). `Ok(None)` means
    /// the read would block (or the kernel cannot tell): do it on a blocking
    /// thread with [`FileStore::read_new`].
    ///
    /// # Errors
    /// The read failed for another reason.
    pub fn try_read_cached(&self, offset: u64, len: usize) -> io::Result<Option<bytes::Bytes>> {
        if offset.saturating_add(len as u64) > self.size {
            return Ok(None);
        }
        let mut buf = crate::bufpool::PoolBuf::new(len);
        let slice = buf.as_mut_slice();
        let mut done = 0usize;
        while done < len {
            let Some(rest) = slice.get_mut(done..) else {
                break;
            };
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast::<libc::c_void>(),
                iov_len: rest.len(),
            };
            let pos = libc::off_t::try_from(offset + done as u64).map_err(|_| einval())?;
            // SAFETY: one iovec over `rest`, memory owned by `buf` and valid for
            // writes of `rest.len()` bytes for the duration of the call.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN)
                    | Some(libc::EOPNOTSUPP)
                    | Some(libc::ENOSYS)
                    | Some(libc::EINVAL) => Ok(None),
                    _ => Err(err),
                };
            }
            if n == 0 {
                return Ok(None);
            }
            done += n as usize;
        }
        Ok(Some(buf.freeze()))
    }

    /// Write as much of `data` at `offset` as can be written without
    /// waiting (`pwritev2` with `RWF_NOWAIT`); how many bytes that was. The
    /// rest goes through [`FileStore::write_at`] on a blocking thread.
    ///
    /// # Errors
    /// The write failed for a reason other than "would block".
    pub fn try_write_nowait(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        if !self.nowait_writes.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut done = 0usize;
        while done < data.len() {
            let Some(rest) = data.get(done..) else {
                break;
            };
            let iov = libc::iovec {
                iov_base: rest.as_ptr().cast_mut().cast::<libc::c_void>(),
                iov_len: rest.len(),
            };
            let pos = libc::off_t::try_from(offset + done as u64).map_err(|_| einval())?;
            // SAFETY: one iovec over `rest`, valid for reads of `rest.len()`
            // bytes for the duration of the call; the kernel only reads it.
            let n =
                unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT) };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => Ok(done),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                        // This filesystem never takes buffered writes without
                        // waiting (ext4 here): stop asking.
                        self.nowait_writes.store(false, Ordering::Relaxed);
                        Ok(done)
                    }
                    _ => Err(err),
                };
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(done)
    }

    /// Write all of `data` at `offset`.
    ///
    /// # Errors
    /// The write failed.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Make `len` bytes at `offset` read as zeroes. With `punch`, deallocate
    /// them (hole); otherwise keep them allocated. With `fast`, fail with
    /// `EOPNOTSUPP` instead of writing zeroes when the filesystem cannot zero
    /// the range by itself.
    ///
    /// # Errors
    /// The filesystem failed, or (`fast`) cannot zero quickly.
    pub fn zero(&self, offset: u64, len: u64, punch: bool, fast: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if !is_unsupported(&e) => return Err(e),
            Err(_) => {}
        }
        if !punch {
            // Punch then allocate gives allocated zeroes on filesystems
            // without ZERO_RANGE.
            let punched = self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
            if punched.is_ok()
                && self
                    .fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
                    .is_ok()
            {
                return Ok(());
            }
        }
        if fast {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_BUF.min(usize::try_from(len).unwrap_or(ZERO_BUF))];
        let mut done = 0u64;
        while done < len {
            let step = (len - done).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(zeroes.get(..step).unwrap_or(&zeroes), offset + done)?;
            done += step as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let n = libc::off_t::try_from(len).map_err(|_| einval())?;
        loop {
            // SAFETY: fallocate on a valid, owned descriptor; no memory is passed.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Ask the kernel to read `len` bytes at `offset` ahead (`POSIX_FADV_WILLNEED`).
    ///
    /// # Errors
    /// The advice was refused.
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let n = libc::off_t::try_from(len).map_err(|_| einval())?;
        // SAFETY: posix_fadvise on a valid, owned descriptor; no memory is passed.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, n, libc::POSIX_FADV_WILLNEED)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Make completed writes durable (`fdatasync`).
    ///
    /// # Errors
    /// The sync failed.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Allocation of `offset..offset+len` (clamped to the size), from
    /// `SEEK_DATA`/`SEEK_HOLE`, merged, at most `max_count` extents. The
    /// extents are contiguous from `offset`; the last ends at
    /// `min(offset+len, size)` unless `max_count` cut the list short.
    ///
    /// # Errors
    /// `lseek` failed with something other than "not supported".
    pub fn extents(&self, offset: u64, len: u64, max_count: usize) -> io::Result<Vec<StoreExtent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<StoreExtent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_count.max(1) {
            let (hole, next) = match self.next_boundary(pos) {
                Ok(v) => v,
                Err(e) if is_unsupported(&e) => (false, end),
                Err(e) => return Err(e),
            };
            let next = next.min(end).max(pos + 1);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += next - pos,
                _ => out.push(StoreExtent {
                    offset: pos,
                    len: next - pos,
                    hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }

    /// Status at `pos` and where it changes.
    fn next_boundary(&self, pos: u64) -> io::Result<(bool, u64)> {
        let data = match self.seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data after pos: a hole to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok((true, self.size)),
            Err(e) => return Err(e),
        };
        if data > pos {
            return Ok((true, data));
        }
        let hole = match self.seek(pos, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.size,
            Err(e) => return Err(e),
        };
        Ok((false, hole))
    }

    fn seek(&self, pos: u64, whence: libc::c_int) -> io::Result<u64> {
        let off = libc::off_t::try_from(pos).map_err(|_| einval())?;
        // SAFETY: lseek on a valid, owned descriptor. Every I/O in this module
        // is positional, so moving the shared file offset is harmless.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as u64)
        }
    }
}

fn unsafe_lseek(file: &File, off: libc::off_t, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a valid descriptor owned by `file`.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as u64)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(size: u64) -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::create(&dir.path().join("img"), size).unwrap();
        (dir, s)
    }

    #[test]
    fn new_file_is_one_hole() {
        let (_d, s) = store(1 << 20);
        let ext = s.extents(0, 1 << 20, 100).unwrap();
        assert_eq!(
            ext,
            vec![StoreExtent {
                offset: 0,
                len: 1 << 20,
                hole: true
            }]
        );
    }

    #[test]
    fn data_then_punch() {
        let (_d, s) = store(4 << 20);
        s.write_at(1 << 20, &vec![7u8; 1 << 20]).unwrap();
        let ext = s.extents(0, 4 << 20, 100).unwrap();
        assert_eq!(ext.len(), 3, "{ext:?}");
        assert!(ext[0].hole && !ext[1].hole && ext[2].hole);
        assert_eq!((ext[1].offset, ext[1].len), (1 << 20, 1 << 20));
        let mut buf = vec![1u8; 16];
        s.read_at((1 << 20) + 5, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 16]);
        s.zero(1 << 20, 1 << 20, true, false).unwrap();
        s.read_at((1 << 20) + 5, &mut buf).unwrap();
        assert_eq!(buf, vec![0u8; 16]);
        let ext = s.extents(0, 4 << 20, 100).unwrap();
        assert_eq!(ext.len(), 1, "{ext:?}");
    }

    #[test]
    fn zero_keeps_allocation_without_punch() {
        let (_d, s) = store(1 << 20);
        s.write_at(0, &vec![9u8; 1 << 20]).unwrap();
        s.zero(4096, 8192, false, false).unwrap();
        let mut buf = vec![1u8; 8192];
        s.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let ext = s.extents(0, 1 << 20, 100).unwrap();
        assert!(ext.iter().all(|e| !e.hole), "{ext:?}");
    }

    #[test]
    fn extents_clamp_and_cap() {
        let (_d, s) = store(1 << 20);
        s.write_at(0, &[1u8; 4096]).unwrap();
        let ext = s.extents(100, 10 << 20, 1).unwrap();
        assert_eq!(ext.len(), 1);
        assert_eq!(ext[0].offset, 100);
        let ext = s.extents(0, 10 << 20, 10).unwrap();
        let end = ext.last().map(|e| e.offset + e.len).unwrap();
        assert_eq!(end, 1 << 20);
    }

    #[test]
    fn read_new_matches_read_at() {
        let (_d, s) = store(1 << 20);
        s.write_at(100, &[3u8; 5000]).unwrap();
        let got = s.read_new(50, 6000).unwrap();
        let mut want = vec![0u8; 6000];
        s.read_at(50, &mut want).unwrap();
        assert_eq!(&got[..], &want[..]);
        let tail = s.read_new((1 << 20) - 10, 30).unwrap();
        assert_eq!(&tail[..], &[0u8; 30][..]);
    }

    #[test]
    fn cached_read_gives_the_data_or_nothing() {
        let (_d, s) = store(1 << 20);
        s.write_at(0, &[4u8; 8192]).unwrap();
        // Just written: in the page cache, unless the kernel cannot tell.
        if let Some(b) = s.try_read_cached(100, 5000).unwrap() {
            assert_eq!(&b[..], &[4u8; 5000][..]);
        }
        assert!(s.try_read_cached((1 << 20) - 1, 2).unwrap().is_none());
    }

    #[test]
    fn nowait_write_then_rest() {
        let (_d, s) = store(1 << 20);
        let data = vec![6u8; 100_000];
        let n = s.try_write_nowait(10, &data).unwrap();
        assert!(n <= data.len());
        s.write_at(10 + n as u64, &data[n..]).unwrap();
        let mut back = vec![0u8; 100_000];
        s.read_at(10, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn direct_and_buffered_writes_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let s = FileStore::create(&path, 1 << 20).unwrap().with_direct_io();
        let mut raw = vec![0u8; 3 * DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        let block = &mut raw[start..start + DIRECT_ALIGN];
        block.fill(3);
        s.write_direct(8192, block).unwrap();
        s.write_direct(100, &[4u8; 10]).unwrap();
        let mut buf = vec![0u8; DIRECT_ALIGN];
        s.read_at(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        s.read_at(100, &mut buf[..10]).unwrap();
        assert_eq!(&buf[..10], &[4u8; 10]);
        // Direct reads see buffered writes, and zeroes past the end.
        let block = &mut raw[start..start + 2 * DIRECT_ALIGN];
        s.read_direct(0, block).unwrap();
        assert_eq!(&block[100..110], &[4u8; 10]);
        s.read_direct((1 << 20) - DIRECT_ALIGN as u64, block)
            .unwrap();
        assert!(block.iter().all(|&b| b == 0));
        s.read_direct(8192, &mut block[..DIRECT_ALIGN]).unwrap();
        assert!(block[..DIRECT_ALIGN].iter().all(|&b| b == 3));
    }

    #[test]
    fn cachestat_sees_cached_and_dropped_pages() {
        let (_d, s) = store(1 << 20);
        s.write_at(0, &vec![1u8; 1 << 20]).unwrap();
        let Some(cached) = s.cached(0, 1 << 20) else {
            return; // Kernel before 6.5: reads stay buffered.
        };
        assert!(cached);
        s.flush().unwrap();
        // SAFETY: fadvise on an owned descriptor; no memory is passed.
        let rc =
            unsafe { libc::posix_fadvise(s.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert_eq!(s.cached(0, 1 << 20), Some(false));
        // Cold and aligned: read with O_DIRECT, same bytes.
        let s = FileStore::open(s.path(), false).unwrap().with_direct_io();
        let mut raw = vec![0u8; 2 * DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        s.read_direct(0, &mut raw[start..start + DIRECT_ALIGN])
            .unwrap();
        assert!(raw[start..start + DIRECT_ALIGN].iter().all(|&b| b == 1));
        assert_eq!(s.cached(0, DIRECT_ALIGN as u64), Some(false));
    }

    #[test]
    fn read_past_eof_is_zero() {
        let (_d, s) = store(10);
        let mut buf = vec![5u8; 20];
        s.read_at(5, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
