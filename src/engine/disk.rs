//! Disk images on the local file system (one file per disk in
//! `DATA_DIR/images/`) and the finalize verification of uploads.

use super::error::{Error, Result};
use super::model::{Disk, Format};
use crate::wire::{Reader, WireError};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where disk images live.
#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
}

/// Largest virtual size we accept for a new disk (1 PiB).
pub const MAX_DISK_SIZE: u64 = 1 << 50;

impl Images {
    /// Images under `dir` (created 0700 if missing; an existing dir and
    /// its images are narrowed to 0700 / 0600).
    pub fn open(dir: PathBuf) -> Result<Images> {
        super::private::dir(&dir)?;
        super::private::narrow_files_in(&dir)?;
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::io(format!("resolve {}", dir.display()), e))?;
        Ok(Images { dir })
    }

    /// The image file of disk `id` (ids are UUIDs we generated).
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// `file:///...` URL of the image, for data server tickets.
    pub fn url(&self, id: &str) -> String {
        format!("file://{}", self.path(id).display())
    }

    /// Create the image file: a sparse file of the virtual size for raw, an
    /// empty QCOW2 image for cow (qemu-img; without it an empty file, which
    /// a `format=cow` upload then fills with QCOW2 bytes).
    ///
    /// The file is created 0600 here first; qemu-img then writes into the
    /// existing file, which keeps its mode.
    pub fn create(&self, disk: &Disk) -> Result<()> {
        let path = self.path(&disk.id);
        let file = super::private::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        if disk.format == Format::Cow {
            match super::qemu::create_qcow2(&path, disk.provisioned_size) {
                Ok(()) => return Ok(()),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!("qemu-img not found: the cow disk starts as an empty file");
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
        }
        if disk.format == Format::Raw {
            file.set_len(disk.provisioned_size)
                .map_err(|e| Error::io(format!("size {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Remove the image file (a missing file is fine).
    pub fn remove(&self, id: &str) -> Result<()> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }

    /// Bytes the file takes on disk and its apparent size.
    pub fn sizes(&self, id: &str) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(self.path(id)) {
            Ok(m) => (m.blocks() * 512, m.len()),
            Err(_) => (0, 0),
        }
    }

    /// Check an uploaded image before it becomes legal (ENGINE-API.md 3.5).
    pub fn verify(&self, disk: &Disk) -> std::result::Result<(), String> {
        let path = self.path(&disk.id);
        match disk.format {
            Format::Raw => {
                let len = std::fs::metadata(&path)
                    .map_err(|e| format!("cannot stat the image: {e}"))?
                    .len();
                if len > disk.provisioned_size {
                    return Err(format!(
                        "the image is {len} bytes, larger than the disk's {} bytes",
                        disk.provisioned_size
                    ));
                }
                Ok(())
            }
            Format::Cow => verify_qcow2(&path, disk.provisioned_size),
        }
    }

    /// The ticket size for a transfer of `disk` moving `format` bytes.
    pub fn ticket_size(&self, disk: &Disk, upload: bool, format: Format) -> u64 {
        if format == Format::Raw {
            // Guest data: raw files, or QCOW2 through qemu-nbd.
            return disk.provisioned_size;
        }
        match (disk.format, upload) {
            (Format::Raw, _) => disk.provisioned_size,
            // QCOW2 bytes: virtual size plus metadata room (L2 and refcount
            // tables are well under 1/10 with 64 KiB clusters).
            (Format::Cow, true) => disk
                .provisioned_size
                .saturating_add(disk.provisioned_size / 10)
                .saturating_add(16 << 20),
            (Format::Cow, false) => self.sizes(&disk.id).1,
        }
    }
}

/// QCOW2 header fields we check (big endian, qcow2 spec).
const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature bits we refuse: corrupt (1), external data file (2).
const QCOW_REFUSED_INCOMPATIBLE: u64 = 0b110;

/// The QCOW2 header fields we check.
struct Qcow2Fields {
    magic: u32,
    version: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    size: u64,
    crypt_method: u32,
    /// Only in a version 3 header (at offset 72).
    incompatible_features: Option<u64>,
}

/// Read the fields in file order; shorter than the 72 bytes of a version 2
/// header is an error.
fn qcow2_fields(header: &[u8]) -> std::result::Result<Qcow2Fields, WireError> {
    let mut r = Reader::new(header);
    let magic = r.u32()?;
    let version = r.u32()?;
    let backing_file_offset = r.u64()?;
    let backing_file_size = r.u32()?;
    r.skip(4)?; // cluster_bits
    let size = r.u64()?;
    let crypt_method = r.u32()?;
    // l1_size, l1_table_offset, refcount_table_offset,
    // refcount_table_clusters, nb_snapshots, snapshots_offset.
    r.skip(36)?;
    let incompatible_features = r.u64().ok();
    Ok(Qcow2Fields {
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        size,
        crypt_method,
        incompatible_features,
    })
}

/// The image at `path` must be QCOW2 (version 2 or 3), without a backing
/// file, not encrypted, not corrupt, without an external data file, and
/// its virtual size must fit `max_size`.
pub fn verify_qcow2(path: &Path, max_size: u64) -> std::result::Result<(), String> {
    let mut header = Vec::with_capacity(104);
    std::fs::File::open(path)
        .and_then(|f| f.take(104).read_to_end(&mut header))
        .map_err(|e| format!("cannot read the image: {e}"))?;
    check_qcow2_header(&header, max_size)
}

/// [`verify_qcow2`] on the first bytes of the image.
pub fn check_qcow2_header(header: &[u8], max_size: u64) -> std::result::Result<(), String> {
    let Ok(h) = qcow2_fields(header) else {
        return Err("the image is not a QCOW2 image".into());
    };
    if h.magic != QCOW_MAGIC {
        return Err("the image is not a QCOW2 image".into());
    }
    let version = h.version;
    if version != 2 && version != 3 {
        return Err(format!("unsupported QCOW2 version {version}"));
    }
    if h.backing_file_offset != 0 || h.backing_file_size != 0 {
        return Err("the QCOW2 image has a backing file".into());
    }
    let size = h.size;
    if size > max_size {
        return Err(format!(
            "the QCOW2 virtual size {size} is larger than the disk's {max_size} bytes"
        ));
    }
    if h.crypt_method != 0 {
        return Err("the QCOW2 image is encrypted".into());
    }
    if version == 3 {
        let features = match h.incompatible_features {
            Some(features) if header.len() >= 104 => features,
            _ => return Err("the QCOW2 v3 header is truncated".into()),
        };
        if features & QCOW_REFUSED_INCOMPATIBLE != 0 {
            return Err("the QCOW2 image is corrupt or uses an external data file".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, backing: u64, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[16..20].copy_from_slice(&(if backing > 0 { 5u32 } else { 0 }).to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_headers() {
        assert!(check_qcow2_header(&header(3, 0, 1 << 20), 1 << 20).is_ok());
        assert!(check_qcow2_header(&header(2, 0, 1 << 20), 1 << 20).is_ok());
        let e = check_qcow2_header(&header(3, 512, 1 << 20), 1 << 20).unwrap_err();
        assert!(e.contains("backing"), "{e}");
        assert!(check_qcow2_header(&header(3, 0, 2 << 20), 1 << 20).is_err());
        assert!(check_qcow2_header(&header(4, 0, 1 << 20), 1 << 20).is_err());
        assert!(check_qcow2_header(&[0u8; 104], 1 << 20).is_err());
        assert!(check_qcow2_header(&header(3, 0, 1)[..50], 1 << 20).is_err());
        let mut corrupt = header(3, 0, 1 << 20);
        corrupt[79] = 2;
        assert!(check_qcow2_header(&corrupt, 1 << 20).is_err());
    }

    #[test]
    fn truncated_qcow2_headers() {
        let v3 = header(3, 0, 1 << 20);
        for n in 0..v3.len() {
            let e = check_qcow2_header(&v3[..n], 1 << 20).unwrap_err();
            let want = if n < 72 {
                "the image is not a QCOW2 image"
            } else {
                "the QCOW2 v3 header is truncated"
            };
            assert_eq!(e, want, "{n} bytes");
        }
        // A version 2 header is 72 bytes.
        assert!(check_qcow2_header(&header(2, 0, 1 << 20)[..72], 1 << 20).is_ok());
    }
}
