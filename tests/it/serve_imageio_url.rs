//! `nbdbridge serve --imageio-url`: the imageio backend alone, against our
//! data server and the real ovirt-imageio daemon, with real NBD clients.

use crate::support;

use std::process::Command;
use std::time::Duration;
use support::imageio::{Kind, have_venv, start, ticket};
use support::{Proc, bin, pattern, require, run_ok};

const SIZE: usize = 16 << 20;

fn bridge_round_trip(kind: Kind) {
    let server = start(kind);
    let image = server.path("disk.raw");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(SIZE as u64).unwrap();
    server.add_ticket(&ticket("tkt-rw", &image, SIZE as u64, &["read", "write"]));

    let mut src_data = pattern(3, 4 << 20);
    src_data.resize(SIZE, 0);
    src_data[(12 << 20)..(12 << 20) + 65536].copy_from_slice(&pattern(5, 65536));
    let src = server.path("src.raw");
    std::fs::write(&src, &src_data).unwrap();

    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--imageio-url")
        .arg(server.url("tkt-rw"))
        .arg("--socket")
        .arg(server.path("nbd.sock"));
    let mut bridge = Proc::start_announcing("nbdbridge serve --imageio-url", cmd);
    let uri = bridge.first_line.clone();

    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        SIZE.to_string()
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(
        std::fs::read(&image).unwrap() == src_data,
        "{kind:?}: the image holds exactly the source"
    );
    let copy = server.path("copy.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(&uri)
            .arg(&copy),
    );
    assert!(
        std::fs::read(&copy).unwrap() == src_data,
        "{kind:?}: nbdcopy read back the source"
    );
    bridge.signal(15);
    let status = bridge.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{kind:?}: serve exit {status}");
}

#[test]
fn round_trip_through_our_data_server() {
    if !(require("qemu-img") && require("nbdcopy") && require("nbdinfo")) {
        return;
    }
    bridge_round_trip(Kind::Ours);
}

#[test]
fn round_trip_through_the_real_daemon() {
    if !(have_venv() && require("qemu-img") && require("nbdcopy") && require("nbdinfo")) {
        return;
    }
    bridge_round_trip(Kind::Daemon);
}

#[test]
fn a_data_server_that_is_down_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .args(["--imageio-url", "http://127.0.0.1:9/images/nope"])
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot use http://127.0.0.1:9/images/nope"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// `serve --imageio-url URL --dirty-bitmap NAME ARGS`, started.
fn serve_dirty(url: &str, sock: &std::path::Path, name: &str) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .args(["--imageio-url", url, "--dirty-bitmap", name])
        .arg("--socket")
        .arg(sock);
    Proc::start_announcing("nbdbridge serve --dirty-bitmap", cmd)
}

/// `serve --imageio-url URL --dirty-bitmap b1` that must refuse to start:
/// its stderr.
fn dirty_refused(url: &str, sock: &std::path::Path) -> String {
    let out = support::output_within(
        Command::new(bin())
            .arg("serve")
            .args(["--imageio-url", url, "--dirty-bitmap", "b1"])
            .arg("--socket")
            .arg(sock),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "a ticket without dirty extents");
    assert!(out.stdout.is_empty(), "no URI is printed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn nbdinfo_map(uri: &str, context: &str) -> String {
    let out = run_ok(
        Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .arg(uri),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our data server keeps no bitmap for a file: a `"dirty": true` ticket is
/// dirty all over, and the bridge says so as `qemu:dirty-bitmap:b1` (to
/// nbdinfo, and to qemu-img, which shows dirty as `"data": false`). Without
/// `"dirty": true` the bridge refuses to start.
#[test]
fn dirty_bitmap_through_our_data_server() {
    if !(require("nbdinfo") && require("qemu-img")) {
        return;
    }
    let server = start(Kind::Ours);
    let image = server.path("disk.raw");
    std::fs::write(&image, pattern(1, 65536)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let mut dirty = ticket("tkt-dirty", &image, SIZE as u64, &["read"]);
    dirty["dirty"] = serde_json::Value::Bool(true);
    server.add_ticket(&dirty);
    server.add_ticket(&ticket("tkt-plain", &image, SIZE as u64, &["read"]));

    let sock = server.path("dirty.sock");
    let mut bridge = serve_dirty(&server.url("tkt-dirty"), &sock, "qemu:dirty-bitmap:b1");
    let uri = bridge.first_line.clone();
    let info = run_ok(Command::new("nbdinfo").arg(&uri));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("qemu:dirty-bitmap:b1"), "offered: {info}");
    let map = nbdinfo_map(&uri, "qemu:dirty-bitmap:b1");
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        vec![vec!["0", &SIZE.to_string(), "1", "dirty"]],
        "{map}"
    );
    let out = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b1",
            sock.display()
        ),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["length"], SIZE as u64);
    assert_eq!(list[0]["data"], false, "dirty reads as no data: {v}");
    bridge.signal(15);
    assert!(bridge.wait_exit(Duration::from_secs(30)).success());

    let err = dirty_refused(&server.url("tkt-plain"), &server.path("plain.sock"));
    assert!(
        err.contains("no dirty extents for qemu:dirty-bitmap:b1")
            && err.contains("HTTP 404: Ticket does not support dirty extents"),
        "{err}"
    );
}

/// The real daemon on a file ticket with `"dirty": true` has no dirty
/// extents (its file backend keeps no bitmap: 404): the bridge refuses to
/// start with the daemon's words. On an nbd ticket backed by
/// `qemu-nbd -B b1` of a qcow2 with a bitmap, the bridge serves exactly the
/// bitmap qemu-nbd serves.
#[test]
fn dirty_bitmap_through_the_real_daemon() {
    if !(have_venv() && require("nbdinfo") && require("qemu-nbd") && require("qemu-io")) {
        return;
    }
    let server = start(Kind::Daemon);
    let image = server.path("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let mut file = ticket("tkt-file", &image, SIZE as u64, &["read"]);
    file["dirty"] = serde_json::Value::Bool(true);
    server.add_ticket(&file);
    let direct =
        support::imageio::curl(&[&format!("{}/extents?context=dirty", server.url("tkt-file"))]);
    assert_eq!(direct.status, 404, "{}", direct.text());
    let err = dirty_refused(&server.url("tkt-file"), &server.path("file.sock"));
    assert!(
        err.contains(direct.text().trim()) && err.contains("no dirty extents"),
        "the daemon's answer {:?} in: {err}",
        direct.text()
    );

    // A qcow2 whose bitmap b1 recorded two writes, exported by qemu-nbd.
    let qcow2 = server.path("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg(SIZE.to_string()),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--add"])
            .arg(&qcow2)
            .arg("b1"),
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write 1M 64k", "-c", "write 5M 1M"])
            .arg(&qcow2),
    );
    let nbd_sock = server.path("qemu-nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-t",
        "-r",
        "-f",
        "qcow2",
        "-B",
        "b1",
        "--shared=8",
        "--socket",
    ])
    .arg(&nbd_sock)
    .arg(&qcow2);
    let _qemu_nbd = Proc::start("qemu-nbd", cmd);
    support::wait_until("qemu-nbd socket", Duration::from_secs(30), || {
        nbd_sock.exists()
    });
    let expected = nbdinfo_map(
        &format!("nbd+unix:///?socket={}", nbd_sock.display()),
        "qemu:dirty-bitmap:b1",
    );
    assert_eq!(
        expected.lines().filter(|l| l.ends_with("dirty")).count(),
        2,
        "{expected}"
    );
    server.add_ticket(&serde_json::json!({
        "uuid": "tkt-nbd",
        "size": SIZE,
        "url": format!("nbd:unix:{}", nbd_sock.display()),
        "timeout": 300,
        "ops": ["read"],
        "dirty": true,
    }));
    let mut bridge = serve_dirty(&server.url("tkt-nbd"), &server.path("nbd.sock"), "b1");
    let got = nbdinfo_map(&bridge.first_line, "qemu:dirty-bitmap:b1");
    assert_eq!(got, expected, "the bridge serves qemu-nbd's bitmap");
    bridge.signal(15);
    assert!(bridge.wait_exit(Duration::from_secs(30)).success());
}
