//! `nbdbridge serve --imageio-url`: the imageio backend alone, against our
//! data server and the real ovirt-imageio daemon, with real NBD clients.

mod support;

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
