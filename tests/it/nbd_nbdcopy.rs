//! nbdcopy (libnbd 1.14: structured replies, compact headers) with several
//! connections and many requests in flight, in both directions: bit-exact,
//! holes preserved.

use crate::support;

use std::path::Path;
use std::process::Command;
use support::nbd::{self, Run, ServeOpts};
use support::require;

const MIB: u64 = 1024 * 1024;

fn ready() -> bool {
    require("nbdcopy") && nbd::require_server()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// 48 MiB: data and holes, some runs not multiples of nbdcopy's 256 KiB
/// request size.
fn layout() -> Vec<(u64, Run)> {
    let k = 1024;
    vec![
        (5 * MIB + 64 * k, Run::Data(31)),
        (11 * MIB, Run::Hole),
        (320 * k, Run::Data(32)),
        (MIB - 320 * k - 64 * k, Run::Hole),
        (16 * MIB, Run::Data(33)),
        (14 * MIB, Run::Hole),
        (MIB, Run::Data(34)),
    ]
}

/// Run nbdcopy with 4 connections, 4 threads and 64 requests each; assert
/// it really used 4 connections (the server advertised CAN_MULTI_CONN).
fn nbdcopy(src: &str, dst: &str) {
    let mut cmd = Command::new("nbdcopy");
    cmd.args([
        "--verbose",
        "--connections=4",
        "--threads=4",
        "--requests=64",
        src,
        dst,
    ]);
    let out = nbd::run_client(&mut cmd);
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .find(|l| l.starts_with("nbdcopy: connections="))
        .unwrap_or("<no 'nbdcopy: connections=' line>");
    assert!(
        line.starts_with("nbdcopy: connections=4 requests=64"),
        "nbdcopy did not use 4 connections (is CAN_MULTI_CONN advertised?): {line}"
    );
}

fn hole_bytes(p: &Path) -> u64 {
    nbd::file_extents(p)
        .iter()
        .filter(|e| !e.2)
        .map(|e| e.1)
        .sum()
}

#[test]
fn upload_file_to_nbd_with_four_connections() {
    if !ready() {
        return;
    }
    let src = nbd::make_image(&layout());
    let size = std::fs::metadata(&src.path).expect("stat").len();
    // The target is full of other data, so the source's holes must be
    // written as zeros (nbdcopy sends WRITE_ZEROES for them).
    let target = nbd::make_image(&[(size, Run::Data(77))]);
    let server = nbd::serve_file(&target.path, &ServeOpts::default());
    nbdcopy(s(&src.path), &server.uri);
    server.stop();
    nbd::assert_same_bytes(&src.path, &target.path);
    // Zeroed ranges became holes again: WRITE_ZEROES without NO_HOLE
    // punches holes in the file backend (qemu-nbd --discard=unmap too).
    assert!(
        hole_bytes(&target.path) >= hole_bytes(&src.path),
        "upload did not preserve holes: source {} hole bytes, target {}; target extents {:?}",
        hole_bytes(&src.path),
        hole_bytes(&target.path),
        nbd::file_extents(&target.path)
    );
}

#[test]
fn download_nbd_to_file_with_four_connections() {
    if !ready() {
        return;
    }
    let src = nbd::make_image(&layout());
    let server = nbd::serve_file(&src.path, &ServeOpts::read_only());
    let out = src.dir.path().join("download.raw");
    std::fs::File::create(&out).expect("create download");
    nbdcopy(&server.uri, s(&out));
    server.stop();
    nbd::assert_same_bytes(&src.path, &out);
    // nbdcopy asks for block status and leaves holes unwritten.
    assert_eq!(
        nbd::file_extents(&out),
        nbd::file_extents(&src.path),
        "download extents differ from the source's"
    );
}

#[test]
fn round_trip_nbd_to_nbd_and_read_to_null() {
    if !ready() {
        return;
    }
    let src = nbd::make_image(&layout());
    let size = std::fs::metadata(&src.path).expect("stat").len();
    let dst = nbd::empty_image(size);
    let a = nbd::serve_file(&src.path, &ServeOpts::read_only());
    let b = nbd::serve_file(&dst.path, &ServeOpts::default());
    nbdcopy(&a.uri, &b.uri);
    // Read everything back out of both (to null:), as the bench does.
    nbd::run_client(Command::new("nbdcopy").args([
        "--connections=4",
        "--threads=4",
        &a.uri,
        "null:",
    ]));
    nbd::run_client(Command::new("nbdcopy").args([
        "--connections=4",
        "--threads=4",
        &b.uri,
        "null:",
    ]));
    a.stop();
    b.stop();
    nbd::assert_same_bytes(&src.path, &dst.path);
}
