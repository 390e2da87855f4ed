//! File modes of the engine's data dir: it holds ticket ids (`engine.db`),
//! the password and guests' disk images, so the dir is 0700 and every file
//! we create in it 0600, from creation on (no window with a wider mode).
//! An existing data dir and its files are narrowed at start.

use super::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the data dir and the dirs under it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the engine creates there.
pub const FILE_MODE: u32 = 0o600;

/// Create `dir` (and missing parents) with mode 0700; narrow an existing
/// one that is ours to 0700. A shared dir (sticky bit, e.g. `/tmp`) or one
/// owned by someone else is left alone, with a warning.
///
/// # Errors
/// The dir cannot be created, or its mode cannot be changed.
pub fn dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let meta =
        std::fs::metadata(dir).map_err(|e| Error::io(format!("stat {}", dir.display()), e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    // SAFETY: geteuid(2) has no preconditions.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    if mode & 0o1000 != 0 || !ours {
        tracing::warn!(
            dir = %dir.display(),
            mode = %format!("{mode:o}"),
            "the data dir is shared; leaving its mode alone (use a dir of its own)"
        );
        return Ok(());
    }
    tracing::info!(dir = %dir.display(), mode = %format!("{mode:o}"), "narrowing the mode to 0700");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))
}

/// Narrow an existing file of ours to 0600 (nothing when it is missing).
///
/// # Errors
/// The mode cannot be changed.
pub fn narrow_file(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.is_file() || meta.mode() & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

/// Narrow every regular file directly in `dir` to 0600.
///
/// # Errors
/// A mode cannot be changed.
pub fn narrow_files_in(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        narrow_file(&entry.path())?;
    }
    Ok(())
}

/// Options that create a file with mode 0600.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Create `path` with mode 0600 if it does not exist (its content is kept
/// when it does).
///
/// # Errors
/// The file cannot be opened or created.
pub fn touch(path: &Path) -> Result<File> {
    options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn dirs_and_files_are_private_from_the_start_and_narrowed_later() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b");
        dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        let f = d.join("f");
        touch(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        dir(&d).unwrap();
        narrow_files_in(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        // A shared (sticky) dir is left alone.
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        dir(&shared).unwrap();
        assert_eq!(std::fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777);
    }
}
