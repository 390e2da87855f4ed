//! Image checksums computed like imageio's `blkhash`: hash every block of
//! `block_size` bytes (the last may be short) with the algorithm, then hash
//! the concatenated block digests. blake2b / blake2s use a 32-byte digest.
//! Blocks inside a hole are not read: their digest is the zero block's.

use super::error::ApiError;
use crate::nbd_client::NbdClient;
use crate::store::{FileStore, StoreExtent};
use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2s, Digest};
use std::sync::Arc;

/// Default block size (4 MiB).
pub const BLOCK_SIZE: u64 = 4 * 1024 * 1024;
/// Smallest allowed block size.
pub const MIN_BLOCK_SIZE: u64 = BLOCK_SIZE / 4;
/// Largest allowed block size.
pub const MAX_BLOCK_SIZE: u64 = BLOCK_SIZE * 4;
/// Algorithms we compute, sorted.
pub const ALGORITHMS: &[&str] = &["blake2b", "blake2s"];
/// The default algorithm.
pub const DEFAULT_ALGORITHM: &str = "blake2b";

/// A supported hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// BLAKE2b, 32-byte digest.
    Blake2b,
    /// BLAKE2s, 32-byte digest.
    Blake2s,
}

impl Algorithm {
    /// Parse a query value.
    ///
    /// # Errors
    /// 400 for an unknown name, with imageio's text.
    pub fn parse(name: &str) -> Result<Self, ApiError> {
        match name {
            "blake2b" => Ok(Algorithm::Blake2b),
            "blake2s" => Ok(Algorithm::Blake2s),
            other => Err(ApiError::BadRequest(
                format!(
                    "Unsupported value '{other}' for 'algorithm', expecting one of {ALGORITHMS:?}"
                )
                .replace('"', "'"),
            )),
        }
    }

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Blake2b => "blake2b",
            Algorithm::Blake2s => "blake2s",
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Algorithm::Blake2b => Blake2b::<U32>::digest(data).to_vec(),
            Algorithm::Blake2s => Blake2s::<U32>::digest(data).to_vec(),
        }
    }
}

/// Parse and check `block_size` (1..16 MiB, multiple of 4096).
///
/// # Errors
/// 400 with imageio's texts.
pub fn parse_block_size(value: Option<&str>) -> Result<u64, ApiError> {
    let Some(v) = value else {
        return Ok(BLOCK_SIZE);
    };
    let size: u64 = v
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("Invalid block size: '{v}'")))?;
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
        return Err(ApiError::BadRequest(format!(
            "Block size out of allowed range: {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}"
        )));
    }
    if size % 4096 != 0 {
        return Err(ApiError::BadRequest(
            "Block size is not aligned to 4096".into(),
        ));
    }
    Ok(size)
}

/// Most zero extents asked of an NBD export for a checksum (past them,
/// blocks are read).
const MAX_NBD_EXTENTS: usize = 1 << 20;

/// The outer hash: block digests are fed in order, zero blocks cheaply.
#[derive(Debug)]
struct BlockHasher {
    algorithm: Algorithm,
    block_size: u64,
    zero_digest: Vec<u8>,
    outer: Vec<u8>,
}

impl BlockHasher {
    fn new(algorithm: Algorithm, block_size: u64, zero_block: &[u8]) -> Self {
        BlockHasher {
            algorithm,
            block_size,
            zero_digest: algorithm.digest(zero_block),
            outer: Vec::new(),
        }
    }

    fn add_block(&mut self, data: &[u8]) {
        let d = self.algorithm.digest(data);
        self.outer.extend_from_slice(&d);
    }

    fn add_digest(&mut self, digest: &[u8]) {
        self.outer.extend_from_slice(digest);
    }

    fn add_zero_block(&mut self, len: u64) {
        if len == self.block_size {
            self.outer.extend_from_slice(&self.zero_digest);
        } else {
            let d = self.algorithm.digest(&vec![0u8; len as usize]);
            self.outer.extend_from_slice(&d);
        }
    }

    fn finish(self) -> String {
        hex(&self.algorithm.digest(&self.outer))
    }
}

/// Compute the block checksum of a whole NBD export: blocks inside zero
/// extents are not read.
///
/// # Errors
/// NBD failures, or `Interrupted` when cancelled.
pub async fn compute_nbd(
    client: Arc<NbdClient>,
    algorithm: Algorithm,
    block_size: u64,
    canceled: impl Fn() -> bool,
    mut progress: impl FnMut(u64),
) -> std::io::Result<String> {
    let size = client.size();
    let zeros: Vec<(u64, u64)> = client
        .zero_extents(MAX_NBD_EXTENTS)
        .await
        .map_err(std::io::Error::other)?
        .into_iter()
        .filter(|e| e.zero)
        .map(|e| (e.start, e.start + e.length))
        .collect();
    let block_len = usize::try_from(block_size).map_err(|_| std::io::Error::other("block size"))?;
    let mut hasher = BlockHasher::new(algorithm, block_size, &vec![0u8; block_len]);
    let mut offset = 0u64;
    let mut idx = 0;
    while offset < size {
        if canceled() {
            return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        }
        let len = block_size.min(size - offset);
        while zeros.get(idx).is_some_and(|&(_, end)| end <= offset) {
            idx += 1;
        }
        let in_zero = zeros
            .get(idx)
            .is_some_and(|&(start, end)| start <= offset && offset + len <= end);
        if in_zero {
            hasher.add_zero_block(len);
        } else {
            let data = client
                .read(offset, len as usize)
                .await
                .map_err(std::io::Error::other)?;
            // Hashing a block takes milliseconds: off the runtime.
            let digest = tokio::task::spawn_blocking(move || algorithm.digest(&data))
                .await
                .map_err(std::io::Error::other)?;
            hasher.add_digest(&digest);
        }
        progress(len);
        offset += len;
    }
    Ok(hasher.finish())
}

/// Compute the block checksum of the whole store (blocking). `progress` is
/// called with each block's length; `canceled` is asked before each block.
///
/// # Errors
/// I/O failures, or `Interrupted` when cancelled.
pub fn compute(
    store: &FileStore,
    algorithm: Algorithm,
    block_size: u64,
    canceled: impl Fn() -> bool,
    mut progress: impl FnMut(u64),
) -> std::io::Result<String> {
    let size = store.size();
    let holes: Vec<StoreExtent> = store
        .extents(0, size, usize::MAX)?
        .into_iter()
        .filter(|e| e.hole)
        .collect();
    let block_len = usize::try_from(block_size).map_err(|_| std::io::Error::other("block size"))?;
    // Aligned for direct reads.
    let mut raw = vec![0u8; block_len + crate::store::DIRECT_ALIGN];
    let start = raw.as_ptr().align_offset(crate::store::DIRECT_ALIGN);
    let buf = raw
        .get_mut(start..start + block_len)
        .ok_or_else(|| std::io::Error::other("block buffer"))?;
    let mut hasher = BlockHasher::new(algorithm, block_size, buf);
    let mut offset = 0u64;
    let mut hole_idx = 0;
    while offset < size {
        if canceled() {
            return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        }
        let len = block_size.min(size - offset);
        while holes
            .get(hole_idx)
            .is_some_and(|h| h.offset + h.len <= offset)
        {
            hole_idx += 1;
        }
        let in_hole = holes
            .get(hole_idx)
            .is_some_and(|h| h.offset <= offset && offset + len <= h.offset + h.len);
        let n = len as usize;
        if in_hole {
            hasher.add_zero_block(len);
        } else {
            let chunk = buf
                .get_mut(..n)
                .ok_or_else(|| std::io::Error::other("block buffer"))?;
            store.read_direct(offset, chunk)?;
            hasher.add_block(chunk);
        }
        progress(len);
        offset += len;
    }
    Ok(hasher.finish())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // Python: blake2b(b"abc", digest_size=32).hexdigest()
        assert_eq!(
            hex(&Algorithm::Blake2b.digest(b"abc")),
            "bddd813c634239723171ef3fee98579b94964e3bb1cb3e427262c8c068d52319"
        );
    }

    #[test]
    fn holes_hash_like_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let size = 3 * MIN_BLOCK_SIZE + 4096;
        let sparse = FileStore::create(&path, size).unwrap();
        sparse.write_at(MIN_BLOCK_SIZE, &[7u8; 100]).unwrap();
        let dense_path = dir.path().join("dense");
        let mut data = vec![0u8; size as usize];
        data[MIN_BLOCK_SIZE as usize..MIN_BLOCK_SIZE as usize + 100].fill(7);
        std::fs::write(&dense_path, &data).unwrap();
        let dense = FileStore::open(&dense_path, false).unwrap();
        let a = compute(
            &sparse,
            Algorithm::Blake2b,
            MIN_BLOCK_SIZE,
            || false,
            |_| {},
        )
        .unwrap();
        let b = compute(&dense, Algorithm::Blake2b, MIN_BLOCK_SIZE, || false, |_| {}).unwrap();
        assert_eq!(a, b);
        // Manual block hash.
        let mut outer = Vec::new();
        for block in data.chunks(MIN_BLOCK_SIZE as usize) {
            outer.extend(Algorithm::Blake2b.digest(block));
        }
        assert_eq!(a, hex(&Algorithm::Blake2b.digest(&outer)));
    }

    #[test]
    fn block_size_rules() {
        assert_eq!(parse_block_size(None).unwrap(), BLOCK_SIZE);
        assert!(parse_block_size(Some("4096")).is_err());
        assert!(parse_block_size(Some("1048577")).is_err());
        assert!(parse_block_size(Some("x")).is_err());
        assert_eq!(parse_block_size(Some("2097152")).unwrap(), 2097152);
    }
}
