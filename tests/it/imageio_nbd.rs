//! `nbd:unix:` tickets: our data server and the real ovirt-imageio daemon
//! in front of a real `qemu-nbd` serving a QCOW2 image (what the engine
//! does for `format=raw` transfers of QCOW2 disks). Every scenario runs
//! against both servers and the observations are compared.

use crate::support;

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use support::imageio::{
    Kind, QemuNbd, Server, allocated, client, create_qcow2, curl, have_venv, nbd_ticket, start,
};
use support::{pattern, require, run_ok};

const MIB: u64 = 1024 * 1024;
const INTERNAL: &str = "Server failed to perform the request, check logs";

fn have_tools() -> bool {
    have_venv() && require("qemu-nbd") && require("qemu-img") && require("curl")
}

/// A server with a qemu-nbd on a fresh QCOW2 image of `size` bytes.
fn setup(kind: Kind, size: u64, shared: u32) -> (Server, QemuNbd) {
    let s = start(kind);
    let image = s.path("disk.qcow2");
    create_qcow2(&image, size);
    let nbd = QemuNbd::start(&image, &s.path("nbd.sock"), shared);
    (s, nbd)
}

fn put(url: &str, offset: u64, data: &[u8], dir: &Path) -> support::imageio::Resp {
    let file = dir.join(format!("put-{offset}"));
    std::fs::write(&file, data).unwrap();
    let range = format!(
        "Content-Range: bytes {offset}-{}/*",
        offset + data.len() as u64 - 1
    );
    curl(&[
        "-X",
        "PUT",
        "-H",
        &range,
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{url}?flush=n"),
    ])
}

fn get(url: &str, first: u64, last: u64) -> support::imageio::Resp {
    curl(&["-H", &format!("Range: bytes={first}-{last}"), url])
}

fn patch(url: &str, body: &Value) -> support::imageio::Resp {
    curl(&[
        "-X",
        "PATCH",
        "--data-binary",
        &body.to_string(),
        "-H",
        "Content-Type: application/json",
        url,
    ])
}

/// GET / PUT / PATCH zero / flush / extents / checksum / OPTIONS over an
/// nbd ticket; what the server answered, for comparison.
fn data_api(kind: Kind) -> Vec<Value> {
    let size = 8 * MIB;
    let (s, nbd) = setup(kind, size, 8);
    let mut seen = Vec::new();
    s.add_ticket(&nbd_ticket(
        "nbd-rw-0001",
        &nbd.url(),
        size,
        &["read", "write"],
    ));
    let url = s.url("nbd-rw-0001");

    let r = curl(&["-X", "OPTIONS", &url]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let mut options = r.json();
    options.as_object_mut().unwrap().remove("unix_socket");
    assert_eq!(
        options,
        json!({"features": ["checksum", "extents", "flush", "zero"],
               "max_readers": 8, "max_writers": 8}),
        "{kind:?}"
    );

    // A fresh QCOW2: nothing allocated anywhere.
    let r = curl(&[&format!("{url}/extents")]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    assert_eq!(
        r.json(),
        json!([{"start": 0, "length": size, "zero": true, "hole": true}]),
        "{kind:?}"
    );

    // PUT 1 MiB + 5 bytes at an unaligned offset; read it back bit-exact.
    let data = pattern(11, MIB as usize + 5);
    let at = MIB + 17;
    let r = put(&url, at, &data, s.dir.path());
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let r = get(&url, at, at + data.len() as u64 - 1);
    assert_eq!(r.status, 206, "{kind:?}: {}", r.text());
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {at}-{}/{size}", at + data.len() as u64 - 1).as_str())
    );
    assert!(r.body == data, "{kind:?}: data differs");
    // The bytes around it read as zeroes.
    let r = get(&url, at - 17, at - 1);
    assert_eq!(r.body, vec![0u8; 17], "{kind:?}");

    // A whole GET: the export size.
    let r = curl(&[&url]);
    assert_eq!((r.status, r.body.len() as u64), (200, size), "{kind:?}");

    // Zero inside the data (sparse=false: NO_HOLE, stays allocated).
    let r = patch(
        &url,
        &json!({"op": "zero", "offset": 2 * MIB - 4096, "size": 4096}),
    );
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let r = get(&url, 2 * MIB - 4096, 2 * MIB - 1);
    assert_eq!(r.body, vec![0u8; 4096], "{kind:?}");
    let r = patch(&url, &json!({"op": "flush"}));
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let r = patch(
        &url,
        &json!({"op": "zero", "offset": size - 10, "size": 11}),
    );
    assert_eq!(r.status, 416, "{kind:?}: {}", r.text());

    let r = curl(&[&format!("{url}/extents")]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let extents = r.json();
    let list = extents.as_array().unwrap();
    assert!(list.iter().any(|e| e["hole"] == true), "{extents}");
    assert!(list.iter().any(|e| e["zero"] == false), "{extents}");
    let end = list
        .last()
        .map(|e| e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap());
    assert_eq!(end, Some(size), "{extents}");
    seen.push(extents);

    let r = curl(&[&format!("{url}/checksum")]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    seen.push(r.json());
    let r = curl(&[&format!(
        "{url}/checksum?algorithm=blake2s&block_size=1048576"
    )]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    seen.push(r.json());

    // A sparse ticket punches: the range becomes a hole again for qemu.
    let mut sparse = nbd_ticket("nbd-sparse-01", &nbd.url(), size, &["write"]);
    sparse["sparse"] = true.into();
    s.add_ticket(&sparse);
    let r = patch(
        &s.url("nbd-sparse-01"),
        &json!({"op": "zero", "offset": MIB, "size": 2 * MIB, "flush": true}),
    );
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let r = curl(&[&format!("{url}/extents")]);
    seen.push(r.json());

    // A dirty context on a ticket without `"dirty": true` (see
    // `dirty_extents_ours_and_daemon_agree` for one with it).
    let r = curl(&[&format!("{url}/extents?context=dirty")]);
    assert_eq!(r.status, 404, "{kind:?}: {}", r.text());
    seen.push(json!(r.text().trim_end()));
    drop(nbd);
    seen
}

#[test]
fn data_api_ours_and_daemon_agree() {
    if !have_tools() {
        return;
    }
    let ours = data_api(Kind::Ours);
    let daemon = data_api(Kind::Daemon);
    assert_eq!(ours, daemon);
}

/// Granularity of a bitmap made by `qemu-img bitmap --add` (the default).
const GRANULARITY: u64 = 64 * 1024;

/// What `qemu-io` writes after the bitmap `b1` is added: offset, length,
/// and whether it writes zeroes (`write -z`) rather than data.
const DIRTY_WRITES: &[(u64, u64, bool)] = &[
    (0, 4096, false),
    (MIB + 100, 200 * 1024, false),
    (3 * MIB, 128 * 1024, true),
    (5 * MIB - 10, 20, false),
    (8 * MIB - GRANULARITY, GRANULARITY, false),
];

/// An 8 MiB QCOW2 with the persistent bitmap `b1`, then [`DIRTY_WRITES`]
/// through `qemu-io`, which marks them in `b1`.
fn dirty_image(path: &Path, size: u64) {
    create_qcow2(path, size);
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--add", "-f", "qcow2"])
            .arg(path)
            .arg("b1"),
    );
    for &(offset, len, zero) in DIRTY_WRITES {
        let write = if zero {
            format!("write -z {offset} {len}")
        } else {
            format!("write -P 1 {offset} {len}")
        };
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &write])
                .arg(path),
        );
    }
}

/// [`DIRTY_WRITES`] rounded out to [`GRANULARITY`], touching or
/// overlapping ranges joined: `(start, end)`.
fn expected_dirty() -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = DIRTY_WRITES
        .iter()
        .map(|&(offset, len, _)| {
            (
                offset / GRANULARITY * GRANULARITY,
                (offset + len).div_ceil(GRANULARITY) * GRANULARITY,
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// The ranges of an extents list with `"dirty": true`, neighbours joined
/// (the servers split them where `zero` or the hole bit changes).
fn dirty_ranges(extents: &Value) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents.as_array().expect("a list") {
        if e["dirty"] != true {
            continue;
        }
        let start = e["start"].as_u64().expect("start");
        let end = start + e["length"].as_u64().expect("length");
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// Assert that `extents` cover `0..size` in order, each with exactly the
/// fields `keys`.
fn assert_covers(extents: &Value, size: u64, keys: &[&str], what: &str) {
    let mut at = 0;
    for e in extents.as_array().expect("a list") {
        let mut have: Vec<&str> = e
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        have.sort_unstable();
        assert_eq!(have, keys, "{what}: {extents}");
        assert_eq!(e["start"].as_u64(), Some(at), "{what}: {extents}");
        let len = e["length"].as_u64().expect("length");
        assert!(len > 0, "{what}: {extents}");
        at += len;
    }
    assert_eq!(at, size, "{what}: {extents}");
}

/// `extents?context=dirty` and `context=zero` on a `"dirty": true` ticket
/// over `qemu-nbd -B b1` (the engine's backup export, read-only), then
/// `context=dirty` on a `"dirty": true` ticket over an export without a
/// bitmap; what the server answered, for comparison.
fn dirty_extents(kind: Kind) -> Vec<Value> {
    let size = 8 * MIB;
    let s = start(kind);
    let image = s.path("dirty.qcow2");
    dirty_image(&image, size);
    let nbd = QemuNbd::start_with(
        &image,
        &s.path("dirty.sock"),
        &[
            "--read-only",
            "--format=qcow2",
            "--bitmap=b1",
            "--persistent",
            "--shared=8",
        ],
    );
    let mut seen = Vec::new();
    let mut ticket = nbd_ticket("nbd-dirty-0001", &nbd.url(), size, &["read"]);
    ticket["dirty"] = true.into();
    s.add_ticket(&ticket);
    let url = s.url("nbd-dirty-0001");

    let r = curl(&[&format!("{url}/extents?context=dirty")]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let dirty = r.json();
    assert_covers(&dirty, size, &["dirty", "length", "start", "zero"], "dirty");
    // Exactly what qemu-io wrote, at the bitmap's granularity.
    assert_eq!(dirty_ranges(&dirty), expected_dirty(), "{kind:?}: {dirty}");
    let list = dirty.as_array().expect("a list");
    // The `write -z` range is dirty and reads as zeroes; the data is not.
    assert!(
        list.iter()
            .any(|e| e["dirty"] == true && e["zero"] == true && e["start"] == 3 * MIB),
        "{kind:?}: {dirty}"
    );
    assert!(
        list[0]["dirty"] == true && list[0]["zero"] == false,
        "{kind:?}: {dirty}"
    );
    seen.push(dirty);

    // context=zero still works on that ticket (and is the default).
    let r = curl(&[&format!("{url}/extents?context=zero")]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    let zero = r.json();
    assert_covers(&zero, size, &["hole", "length", "start", "zero"], "zero");
    assert!(
        zero.as_array()
            .expect("a list")
            .iter()
            .any(|e| e["zero"] == false),
        "{kind:?}: {zero}"
    );
    let r = curl(&[&format!("{url}/extents")]);
    assert_eq!(r.json(), zero, "{kind:?}");
    seen.push(zero);

    // The data reads back through the same ticket.
    let r = get(&url, MIB + 100, MIB + 100 + 4095);
    assert_eq!(r.status, 206, "{kind:?}: {}", r.text());
    assert!(r.body == vec![1u8; 4096], "{kind:?}: data differs");

    // A dirty ticket on an export without a bitmap: 404, not everything
    // dirty (a backup must not silently become a full one).
    let plain_image = s.path("plain.qcow2");
    create_qcow2(&plain_image, size);
    let plain = QemuNbd::start_with(
        &plain_image,
        &s.path("plain.sock"),
        &[
            "--read-only",
            "--format=qcow2",
            "--persistent",
            "--shared=8",
        ],
    );
    let mut ticket = nbd_ticket("nbd-nobitmap-01", &plain.url(), size, &["read"]);
    ticket["dirty"] = true.into();
    s.add_ticket(&ticket);
    let plain_url = s.url("nbd-nobitmap-01");
    let r = curl(&[&format!("{plain_url}/extents?context=dirty")]);
    r.assert_error(
        404,
        "Operation not supported: NBD export '' does not support dirty extents",
    );
    seen.push(json!(r.text().trim_end()));
    let r = curl(&[&format!("{plain_url}/extents?context=zero")]);
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text());
    seen.push(r.json());
    drop(plain);
    drop(nbd);
    seen
}

#[test]
fn dirty_extents_ours_and_daemon_agree() {
    if !have_tools() || !require("qemu-io") {
        return;
    }
    let ours = dirty_extents(Kind::Ours);
    let daemon = dirty_extents(Kind::Daemon);
    assert_eq!(ours[0], daemon[0], "context=dirty");
    assert_eq!(ours, daemon);
}

/// A sparse raw image with data runs at `(offset, len, seed)`.
fn sparse_image(path: &Path, size: u64, runs: &[(u64, usize, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
    for &(offset, len, seed) in runs {
        f.write_all_at(&pattern(seed, len), offset).expect("write");
    }
}

/// The real imageio client uploads a sparse image into a QCOW2 disk
/// through an nbd ticket and downloads it again; the extents it saw.
fn client_round_trip(kind: Kind) -> Value {
    let size = 64 * MIB;
    let (s, mut nbd) = setup(kind, size, 8);
    let src = s.path("src.raw");
    sparse_image(
        &src,
        size,
        &[
            (3 * MIB, 2 * MIB as usize, 1),
            (40 * MIB + 4096 + 17, MIB as usize + 5, 2),
            (size - 4096, 4096, 3),
        ],
    );
    let mut up = nbd_ticket("nbd-upload-0001", &nbd.url(), size, &["write"]);
    up["sparse"] = true.into();
    s.add_ticket(&up);
    client(&["upload", src.to_str().unwrap(), &s.url("nbd-upload-0001")]);
    let status = s.ticket_status("nbd-upload-0001");
    assert_eq!(status["transferred"], size, "{kind:?}: {status}");

    s.add_ticket(&nbd_ticket("nbd-download-01", &nbd.url(), size, &["read"]));
    let durl = s.url("nbd-download-01");
    let down = s.path("down.raw");
    client(&["download", &durl, down.to_str().unwrap(), "raw"]);
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&down).unwrap(),
        "{kind:?}: download differs"
    );
    assert!(allocated(&down) < 8 * MIB, "{kind:?}: {}", allocated(&down));
    let extents: Value = serde_json::from_slice(&client(&["extents", &durl]).stdout).unwrap();
    let info: Value = serde_json::from_slice(&client(&["info", &durl]).stdout).unwrap();
    assert_eq!(info["size"], size, "{kind:?}");

    for id in ["nbd-upload-0001", "nbd-download-01"] {
        assert_eq!(
            s.control("DELETE", &format!("/tickets/{id}"), None).status,
            204
        );
    }
    nbd.stop();
    let image = s.path("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&image),
    );
    assert!(
        allocated(&image) < 16 * MIB,
        "{kind:?}: qcow2 allocated {}",
        allocated(&image)
    );
    extents
}

#[test]
fn python_client_round_trip_ours_and_daemon() {
    if !have_tools() {
        return;
    }
    let ours = client_round_trip(Kind::Ours);
    let daemon = client_round_trip(Kind::Daemon);
    // The client zeroed the holes, so qcow2 has zero clusters (allocated
    // in the top layer: `hole` false, `zero` true), not unallocated ones.
    let list = ours.as_array().unwrap();
    assert!(list.iter().any(|e| e["zero"] == true), "{ours}");
    assert!(list.iter().any(|e| e["zero"] == false), "{ours}");
    assert_eq!(ours, daemon);
}

/// The NBD server goes away and comes back: 500 while it is gone, then
/// the next request reconnects.
fn reconnect(kind: Kind) {
    let size = 4 * MIB;
    let (s, mut nbd) = setup(kind, size, 8);
    s.add_ticket(&nbd_ticket(
        "nbd-reconnect-1",
        &nbd.url(),
        size,
        &["read", "write"],
    ));
    let url = s.url("nbd-reconnect-1");
    let data = pattern(5, 4096);
    assert_eq!(put(&url, 0, &data, s.dir.path()).status, 200);
    nbd.stop();
    get(&url, 0, 4095).assert_error(500, INTERNAL);
    let nbd = QemuNbd::start(&s.path("disk.qcow2"), &s.path("nbd.sock"), 8);
    let r = get(&url, 0, 4095);
    assert_eq!(r.status, 206, "{kind:?}: {}", r.text());
    assert!(r.body == data, "{kind:?}");
    drop(nbd);
}

#[test]
fn reconnect_ours() {
    if have_tools() {
        reconnect(Kind::Ours);
    }
}

#[test]
fn reconnect_daemon() {
    if have_tools() {
        reconnect(Kind::Daemon);
    }
}

/// Deleting a ticket releases its NBD connection: with `--shared=1` a
/// second ticket can only work once the first one's connection is gone.
fn delete_releases(kind: Kind) {
    let size = MIB;
    let (s, nbd) = setup(kind, size, 1);
    for id in ["nbd-first-0001", "nbd-second-001"] {
        s.add_ticket(&nbd_ticket(id, &nbd.url(), size, &["read"]));
        let r = curl(&["-m", "20", "-H", "Range: bytes=0-99", &s.url(id)]);
        assert_eq!(r.status, 206, "{kind:?} {id}: {}", r.text());
        assert_eq!(
            s.control("DELETE", &format!("/tickets/{id}"), None).status,
            204
        );
    }
}

#[test]
fn delete_releases_the_connection_ours() {
    if have_tools() {
        delete_releases(Kind::Ours);
    }
}

#[test]
fn delete_releases_the_connection_daemon() {
    if have_tools() {
        delete_releases(Kind::Daemon);
    }
}

/// No NBD server behind the socket: the ticket installs, then every data
/// request is a bare 500, like imageio.
fn socket_missing(kind: Kind) -> Vec<(u16, String)> {
    let s = start(kind);
    let url = format!("nbd:unix:{}", s.path("missing.sock").display());
    s.add_ticket(&nbd_ticket("nbd-missing-01", &url, MIB, &["read", "write"]));
    let image = s.url("nbd-missing-01");
    let answers = vec![
        get(&image, 0, 99),
        curl(&["-X", "OPTIONS", &image]),
        put(&image, 0, b"abc", s.dir.path()),
        patch(&image, &json!({"op": "zero", "size": 10})),
        patch(&image, &json!({"op": "flush"})),
        curl(&[&format!("{image}/extents")]),
        curl(&[&format!("{image}/checksum")]),
    ];
    for r in &answers {
        r.assert_error(500, INTERNAL);
    }
    answers
        .iter()
        .map(|r| (r.status, r.text().trim_end().to_string()))
        .collect()
}

#[test]
fn socket_missing_ours_and_daemon_agree() {
    if !have_tools() {
        return;
    }
    assert_eq!(socket_missing(Kind::Ours), socket_missing(Kind::Daemon));
}

#[test]
fn bad_nbd_urls() {
    if !have_tools() {
        return;
    }
    let s = start(Kind::Ours);
    let cases = [
        (
            "nbd:localhost:10809",
            "Unsupported NBD URL: nbd:localhost:10809, expecting nbd:unix:/absolute/path[:exportname=NAME]",
        ),
        (
            "nbd:unix:relative.sock",
            "NBD socket path must be absolute, expecting nbd:unix:/absolute/path[:exportname=NAME]",
        ),
        (
            "nbd:unix:/run/../x.sock",
            "Path may not contain '.' or '..' components",
        ),
        (
            "nbd:unix:/run/x.sock:export=a",
            "Unsupported NBD URL: nbd:unix:/run/x.sock:export=a, expecting nbd:unix:/absolute/path[:exportname=NAME]",
        ),
    ];
    for (url, reason) in cases {
        let ticket = nbd_ticket("bad-url", url, MIB, &["read"]);
        let r = s.control("PUT", "/tickets/bad-url", Some(&ticket.to_string()));
        r.assert_error(
            400,
            &format!("Invalid ticket: Invalid value for 'url': '{url}': {reason}"),
        );
    }
    // The daemon checks only the scheme when the ticket is installed; the
    // URL fails when a request opens the backend.
    let d = start(Kind::Daemon);
    d.add_ticket(&nbd_ticket(
        "bad-url",
        "nbd:unix:relative.sock",
        MIB,
        &["read"],
    ));
    get(&d.url("bad-url"), 0, 9).assert_error(500, INTERNAL);
}
