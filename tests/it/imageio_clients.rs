//! The real ovirt-imageio Python client against our data server and against
//! the real ovirt-imageio daemon: the same test function runs for both, so
//! the client cannot tell them apart.

use crate::support;

use std::path::Path;
use std::process::Command;
use support::imageio::{Kind, Server, allocated, client, have_venv, start, ticket};
use support::{pattern, require, run_ok};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 64 * MIB;

/// A sparse raw image with data runs at `(offset, len, seed)`.
fn sparse_image(path: &Path, size: u64, runs: &[(u64, usize, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
    for &(offset, len, seed) in runs {
        f.write_all_at(&pattern(seed, len), offset).expect("write");
    }
}

fn empty_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    assert!(
        first.is_none(),
        "{} and {} differ at byte {first:?}",
        a.display(),
        b.display()
    );
}

fn round_trip(kind: Kind) {
    if !have_venv() || !require("qemu-img") {
        return;
    }
    let s = start(kind);
    let src = s.path("src.raw");
    // Unaligned data runs, a run across a 4 MiB block edge, long holes.
    sparse_image(
        &src,
        SIZE,
        &[
            (3 * MIB, 2 * MIB as usize, 1),
            (40 * MIB + 4096 + 17, MIB as usize + 5, 2),
            (SIZE - 4096, 4096, 3),
        ],
    );
    let dst = s.path("dst.raw");
    empty_image(&dst, SIZE);

    // Upload: bit-exact, sparse stays sparse.
    let mut up = ticket("upload-ticket-0001", &dst, SIZE, &["write"]);
    up["sparse"] = true.into();
    s.add_ticket(&up);
    let url = s.url("upload-ticket-0001");
    client(&["upload", src.to_str().unwrap(), &url]);
    assert_same_file(&src, &dst);
    assert!(
        allocated(&dst) < 8 * MIB,
        "{kind:?}: upload allocated {} bytes",
        allocated(&dst)
    );

    // Server checksum == the client's local checksum of the source.
    let local: serde_json::Value =
        serde_json::from_slice(&client(&["checksum", src.to_str().unwrap()]).stdout).unwrap();
    let remote = support::imageio::curl(&[&format!("{url}/checksum")]);
    assert_eq!(remote.status, 200, "{}", remote.text());
    assert_eq!(remote.json(), local, "{kind:?}");

    // Accounting: every byte was written or zeroed.
    let status = s.ticket_status("upload-ticket-0001");
    assert_eq!(status["transferred"], SIZE, "{kind:?}: {status}");
    assert_eq!(status["active"], false);

    // What the client learns from OPTIONS and extents.
    let info: serde_json::Value = serde_json::from_slice(&client(&["info", &url]).stdout).unwrap();
    assert_eq!(info["size"], SIZE);
    assert_eq!(info["max_readers"], 8);
    let writers = info["max_writers"].as_u64().unwrap();
    match kind {
        Kind::Ours => assert!(writers > 1, "{info}"),
        Kind::Daemon => assert_eq!(writers, 1, "{info}"),
    }

    // Download through a read ticket, raw and qcow2.
    s.add_ticket(&ticket("download-ticket-01", &dst, SIZE, &["read"]));
    let durl = s.url("download-ticket-01");
    let raw = s.path("down.raw");
    client(&["download", &durl, raw.to_str().unwrap(), "raw"]);
    assert_same_file(&src, &raw);
    let qcow = s.path("down.qcow2");
    client(&["download", &durl, qcow.to_str().unwrap(), "qcow2"]);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&qcow),
    );

    let extents: serde_json::Value =
        serde_json::from_slice(&client(&["extents", &durl]).stdout).unwrap();
    let list = extents.as_array().unwrap();
    let end = list
        .last()
        .map(|e| e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap());
    assert_eq!(end, Some(SIZE));
    if kind == Kind::Ours {
        // Real holes: the download skips them and stays sparse too.
        assert!(list.iter().any(|e| e["hole"] == true), "{extents}");
        assert_eq!(list[0]["start"], 0);
        assert_eq!(list[0]["length"], 3 * MIB);
        assert_eq!(list[0]["zero"], true);
        assert!(
            allocated(&raw) < 8 * MIB,
            "download allocated {}",
            allocated(&raw)
        );
    } else {
        // The daemon's file backend reports one data extent.
        assert_eq!(list.len(), 1, "{extents}");
    }

    // A removed ticket stops the client.
    let r = s.control("DELETE", "/tickets/download-ticket-01", None);
    assert_eq!(r.status, 204);
    let out = Command::new(support::venv_python())
        .arg(support::repo().join("tests/imageio/client.py"))
        .args(["info", &durl])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{kind:?}: client worked on a removed ticket"
    );
}

#[test]
fn client_round_trip_ours() {
    round_trip(Kind::Ours);
}

#[test]
fn client_round_trip_daemon() {
    round_trip(Kind::Daemon);
}

/// Upload a fully allocated image into a non-sparse ticket and check the
/// data lands via several connections.
fn dense_upload(kind: Kind) {
    if !have_venv() {
        return;
    }
    let s: Server = start(kind);
    let size = 24 * MIB + 512;
    let src = s.path("dense.raw");
    std::fs::write(&src, pattern(7, size as usize)).unwrap();
    let dst = s.path("dst.raw");
    empty_image(&dst, size);
    s.add_ticket(&ticket(
        "dense-upload-00001",
        &dst,
        size,
        &["read", "write"],
    ));
    client(&[
        "upload",
        src.to_str().unwrap(),
        &s.url("dense-upload-00001"),
    ]);
    let (want, got) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert!(got.len() >= want.len());
    assert!(got[..want.len()] == want[..], "{kind:?}: data differs");
    match kind {
        Kind::Ours => assert_eq!(got.len(), want.len()),
        // The daemon's O_DIRECT read-modify-write of the unaligned tail
        // grows the file to the next 4 KiB.
        Kind::Daemon => assert_eq!(got.len() as u64, size.next_multiple_of(4096)),
    }
    // read+write tickets report no `transferred`, like imageio.
    let status = s.ticket_status("dense-upload-00001");
    assert!(status.get("transferred").is_none(), "{kind:?}: {status}");
}

#[test]
fn dense_upload_ours() {
    dense_upload(Kind::Ours);
}

#[test]
fn dense_upload_daemon() {
    dense_upload(Kind::Daemon);
}
