//! qemu-nbd for transfers in guest-data format (`format=raw`) on QCOW2
//! disks: as vdsm does on a real host, the engine serves the QCOW2 volume
//! through qemu-nbd on a unix socket and gives the data server an
//! `nbd:unix:` ticket URL, so clients read and write guest data while the
//! volume stays QCOW2.
//!
//! Each server writes a pid file next to its socket, so an engine that was
//! restarted can still stop the server its predecessor started.

use super::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long qemu-nbd may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(15);
/// How long it may take to exit after SIGTERM before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// The qemu-nbd servers of live transfers.
#[derive(Debug)]
pub struct NbdServers {
    run_dir: PathBuf,
    children: Mutex<HashMap<String, Child>>,
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

impl NbdServers {
    /// Servers with sockets and pid files in `run_dir` (created).
    pub fn new(run_dir: PathBuf) -> Result<NbdServers> {
        // 0700: qemu-nbd's sockets and pid files live here.
        super::private::dir(&run_dir)?;
        Ok(NbdServers {
            run_dir,
            children: Mutex::new(HashMap::new()),
        })
    }

    /// The socket of transfer `id` (short: unix socket paths are limited).
    pub fn socket(&self, id: &str) -> PathBuf {
        self.run_dir.join(format!("nbd-{}.sock", short(id)))
    }

    fn pid_file(&self, id: &str) -> PathBuf {
        self.run_dir.join(format!("nbd-{}.pid", short(id)))
    }

    /// The ticket URL of transfer `id`.
    pub fn url(&self, id: &str) -> String {
        format!("nbd:unix:{}", self.socket(id).display())
    }

    /// Make sure a qemu-nbd serves `image` (QCOW2) for transfer `id`;
    /// with `bitmap`, the export also has the meta context
    /// `qemu:dirty-bitmap:BITMAP` (`qemu-nbd -B`, read-only exports only:
    /// qemu refuses an enabled bitmap on a writable export).
    pub async fn ensure(
        &self,
        id: &str,
        image: &Path,
        read_only: bool,
        bitmap: Option<&str>,
    ) -> Result<()> {
        let socket = self.socket(id);
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", self.pid_file(id).display()))
            .args([
                "--format=qcow2",
                "--shared=8",
                "--persistent",
                "--allocation-depth",
            ])
            .arg("--discard=unmap");
        if read_only {
            cmd.arg("--read-only");
        }
        if let Some(name) = bitmap {
            cmd.arg(format!("--bitmap={name}"));
        }
        cmd.arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().map_err(|e| Error::io("start qemu-nbd", e))?;
        tracing::info!(pid = child.id(), socket = %socket.display(), read_only, "qemu-nbd started");
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), child);
        let end = Instant::now() + START_DEADLINE;
        loop {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return Ok(());
            }
            let exited = {
                let mut map = self.children.lock().unwrap_or_else(|p| p.into_inner());
                match map.get_mut(id).map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => {
                        map.remove(id);
                        Some(status.to_string())
                    }
                    _ => None,
                }
            };
            if let Some(status) = exited {
                return Err(Error::io(
                    "qemu-nbd",
                    std::io::Error::other(format!("exited at start ({status})")),
                ));
            }
            if Instant::now() > end {
                self.stop(id).await;
                return Err(Error::io(
                    "qemu-nbd",
                    std::io::Error::other("did not listen in time"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the server of transfer `id`, ours or one a previous engine
    /// started (found by its pid file, checked against its command line).
    pub async fn stop(&self, id: &str) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let socket = self.socket(id);
        match child {
            Some(mut child) => {
                let pid = child.id() as i32;
                // SAFETY: kill(2) with a pid we spawned and still own (not
                // reaped), so it cannot name another process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let _ = tokio::task::spawn_blocking(move || {
                    let end = Instant::now() + STOP_DEADLINE;
                    while Instant::now() < end {
                        if let Ok(Some(_)) = child.try_wait() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                })
                .await;
            }
            None => self.stop_orphan(id, &socket).await,
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(self.pid_file(id));
    }

    async fn stop_orphan(&self, id: &str, socket: &Path) {
        let Some(pid) = std::fs::read_to_string(self.pid_file(id))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return;
        };
        let is_ours = |pid: i32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let text = String::from_utf8_lossy(&c);
                    text.contains("qemu-nbd") && text.contains(&*socket.to_string_lossy())
                })
                .unwrap_or(false)
        };
        if !is_ours(pid) {
            return;
        }
        tracing::info!(pid, "stopping the qemu-nbd of a previous engine");
        // SAFETY: kill(2) on a pid whose command line names our socket.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let end = Instant::now() + STOP_DEADLINE;
        while is_ours(pid) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if is_ours(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Create an empty QCOW2 image of `size` bytes with qemu-img.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "compat=1.1"])
        .arg(path)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run qemu-img", e))?;
    if !out.status.success() {
        return Err(Error::io(
            "qemu-img create",
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

/// Run `qemu-img ARGS` and fail with its stderr.
fn qemu_img(what: &str, args: &[&OsStr]) -> Result<String> {
    let out = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run qemu-img", e))?;
    if !out.status.success() {
        return Err(Error::io(
            what.to_string(),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img info --output=json --force-share` of an image (readable
/// while a qemu-nbd has it open).
fn info(path: &Path) -> Result<serde_json::Value> {
    let text = qemu_img(
        "qemu-img info",
        &[
            OsStr::new("info"),
            OsStr::new("--force-share"),
            OsStr::new("--output=json"),
            path.as_os_str(),
        ],
    )?;
    serde_json::from_str(&text).map_err(|e| {
        Error::io(
            "qemu-img info",
            std::io::Error::other(format!("bad JSON: {e}")),
        )
    })
}

/// The persistent dirty bitmaps in `qemu-img info` JSON
/// (`format-specific.data.bitmaps`, absent when there are none).
fn bitmap_list(info: &serde_json::Value) -> &[serde_json::Value] {
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The names of the persistent dirty bitmaps of a QCOW2 image.
pub fn bitmaps(path: &Path) -> Result<Vec<String>> {
    Ok(bitmap_list(&info(path)?)
        .iter()
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect())
}

/// Whether a bitmap can serve an incremental backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    /// Present and consistent.
    Usable,
    /// The image has no bitmap of that name.
    Missing,
    /// Flagged `in-use`: the image was not closed cleanly (qemu-nbd
    /// killed) while the bitmap was enabled, so it may miss changes.
    InUse,
}

/// The state of bitmap `name` in `qemu-img info` JSON.
fn bitmap_state_in(info: &serde_json::Value, name: &str) -> BitmapState {
    let Some(b) = bitmap_list(info)
        .iter()
        .find(|b| b["name"].as_str() == Some(name))
    else {
        return BitmapState::Missing;
    };
    let in_use = b["flags"]
        .as_array()
        .is_some_and(|flags| flags.iter().any(|f| f.as_str() == Some("in-use")));
    if in_use {
        BitmapState::InUse
    } else {
        BitmapState::Usable
    }
}

/// The state of the bitmap `name` of a QCOW2 image.
pub fn bitmap_state(path: &Path, name: &str) -> Result<BitmapState> {
    Ok(bitmap_state_in(&info(path)?, name))
}

/// Add the persistent, enabled bitmap `name` to a QCOW2 image (replacing
/// one of that name: a checkpoint starts empty). Every later write by
/// qemu (qemu-nbd) marks it.
pub fn add_bitmap(path: &Path, name: &str) -> Result<()> {
    remove_bitmap(path, name)?;
    bitmap_op(path, "--add", name)
}

/// Remove the bitmap `name` from a QCOW2 image, if it has it.
pub fn remove_bitmap(path: &Path, name: &str) -> Result<()> {
    if !bitmaps(path)?.iter().any(|b| b == name) {
        return Ok(());
    }
    bitmap_op(path, "--remove", name)
}

/// `qemu-img bitmap OP -f qcow2 PATH NAME`.
fn bitmap_op(path: &Path, op: &str, name: &str) -> Result<()> {
    qemu_img(
        &format!("qemu-img bitmap {op}"),
        &[
            OsStr::new("bitmap"),
            OsStr::new(op),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            path.as_os_str(),
            OsStr::new(name),
        ],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-img info --output=json` (qemu 8) of a 1 MiB QCOW2 image after
    /// `qemu-img bitmap --add IMG b1`, with `FLAGS` for the bitmap's flags.
    const INFO: &str = r#"{
    "children": [
        {
            "name": "file",
            "info": {
                "children": [
                ],
                "virtual-size": 328192,
                "filename": "/tmp/x.qcow2",
                "format": "file",
                "actual-size": 208896,
                "format-specific": {
                    "type": "file",
                    "data": {
                    }
                },
                "dirty-flag": false
            }
        }
    ],
    "virtual-size": 1048576,
    "filename": "/tmp/x.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 208896,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "bitmaps": [
                {
                    "flags": [
                        FLAGS
                    ],
                    "name": "b1",
                    "granularity": 65536
                }
            ],
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "dirty-flag": false
}"#;

    /// The same image after `qemu-img bitmap --remove IMG b1`: no
    /// `bitmaps` key at all.
    const INFO_NO_BITMAPS: &str = r#"{
    "virtual-size": 1048576,
    "filename": "/tmp/x.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 208896,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "dirty-flag": false
}"#;

    fn parse(flags: &str) -> serde_json::Value {
        serde_json::from_str(&INFO.replace("FLAGS", flags)).unwrap()
    }

    #[test]
    fn bitmap_states_from_qemu_img_info() {
        // A clean enabled bitmap.
        let clean = parse(r#""auto""#);
        assert_eq!(bitmap_state_in(&clean, "b1"), BitmapState::Usable);
        assert_eq!(bitmap_state_in(&clean, "b2"), BitmapState::Missing);
        // As qemu-img shows it after the qemu-nbd that had the image open
        // was killed (SIGKILL).
        let killed = parse(
            r#""in-use",
                        "auto""#,
        );
        assert_eq!(bitmap_state_in(&killed, "b1"), BitmapState::InUse);
        let none: serde_json::Value = serde_json::from_str(INFO_NO_BITMAPS).unwrap();
        assert_eq!(bitmap_state_in(&none, "b1"), BitmapState::Missing);
        assert!(bitmap_list(&none).is_empty());
        let names: Vec<&str> = bitmap_list(&killed)
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        assert_eq!(names, ["b1"]);
    }

    #[test]
    fn bitmap_state_of_a_real_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        create_qcow2(&path, 1 << 20).unwrap();
        assert_eq!(bitmap_state(&path, "b1").unwrap(), BitmapState::Missing);
        add_bitmap(&path, "b1").unwrap();
        assert_eq!(bitmap_state(&path, "b1").unwrap(), BitmapState::Usable);
        assert_eq!(bitmaps(&path).unwrap(), ["b1"]);
        remove_bitmap(&path, "b1").unwrap();
        assert_eq!(bitmap_state(&path, "b1").unwrap(), BitmapState::Missing);
    }
}
