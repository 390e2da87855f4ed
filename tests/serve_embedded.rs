//! The README's main job: `nbdbridge serve --disk NAME --size SIZE` with
//! the embedded engine and data server, driven by qemu-img and nbdcopy.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::{Proc, bin, require, run_ok};

fn serve(data: &Path, sock: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--socket")
        .arg(sock)
        .args(args);
    Proc::start_announcing("nbdbridge serve (embedded)", cmd)
}

/// A sparse qcow2 source: 64 MiB virtual, 3 MiB of data.
fn sparse_qcow2(path: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg("64M"),
    );
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x55 1M 2M",
                "-c",
                "write -P 0x66 40M 1M",
            ])
            .arg(path),
    );
}

/// Bytes the file really occupies on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn qcow2_upload_finalizes_and_downloads_identical_with_holes_kept() {
    if !(require("qemu-img") && require("qemu-io") && require("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("src.qcow2");
    sparse_qcow2(&src);

    let mut up = serve(
        &data,
        &tmp.path().join("up.sock"),
        &["--disk", "demo", "--size", "64M"],
    );
    let uri = up.first_line.clone();
    assert!(uri.starts_with("nbd+unix:///"), "{uri}");
    // A probe does not end the transfer.
    run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "upload serve: {status}");

    let images: Vec<_> = std::fs::read_dir(data.join("images"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let used = allocated(&images[0]);
    assert!(
        used < 16 << 20,
        "holes stayed holes: {used} bytes allocated"
    );

    let mut down = serve(
        &data,
        &tmp.path().join("down.sock"),
        &["--disk", "demo", "--direction", "download"],
    );
    let uri = down.first_line.clone();
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(&uri));
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    let status = down.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "download serve: {status}");
}

#[test]
fn a_missing_disk_without_size_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .args(["--disk", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("there is no disk 'nope'") && err.contains("--size"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no URI is printed on failure");
}
