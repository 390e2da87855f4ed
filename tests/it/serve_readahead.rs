//! Read-only tickets through `serve --imageio-url --read-only`, where the
//! imageio backend serves sequential readers from block read-ahead: the
//! bytes must be exact for every reader shape (sequential on several
//! connections, small requests, qemu-img's own pattern, an odd-sized tail),
//! against our data server and the real ovirt-imageio daemon.

use crate::support;

use std::process::Command;
use std::time::Duration;
use support::imageio::{Kind, have_venv, start, ticket};
use support::{Proc, bin, pattern, require, run_ok};

/// Several read-ahead blocks and a short last one.
const SIZE: usize = (40 << 20) + 12345;

fn read_only_reads_are_exact(kind: Kind) {
    let server = start(kind);
    let image = server.path("disk.raw");
    let data = pattern(11, SIZE);
    std::fs::write(&image, &data).unwrap();
    server.add_ticket(&ticket("tkt-ro", &image, SIZE as u64, &["read"]));

    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--imageio-url")
        .arg(server.url("tkt-ro"))
        .arg("--read-only")
        .arg("--socket")
        .arg(server.path("nbd.sock"));
    let mut bridge = Proc::start_announcing("nbdbridge serve --imageio-url --read-only", cmd);
    let uri = bridge.first_line.clone();

    for (i, args) in [
        vec!["--connections=4"],
        vec!["--connections=1", "--request-size=65536", "--requests=16"],
        vec!["--connections=2", "--request-size=1048576"],
    ]
    .iter()
    .enumerate()
    {
        let copy = server.path(&format!("copy{i}.raw"));
        run_ok(Command::new("nbdcopy").args(args).arg(&uri).arg(&copy));
        assert!(
            std::fs::read(&copy).unwrap() == data,
            "{kind:?}: nbdcopy {args:?} read back the image exactly"
        );
    }
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&uri),
    );
    // The export is read-only: qemu-io cannot even open it for writing.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4096"])
        .arg(&uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "{kind:?}: qemu-io cannot open the export for writing: {text}"
    );
    assert!(
        std::fs::read(&image).unwrap() == data,
        "{kind:?}: nothing written"
    );
    bridge.signal(15);
    let status = bridge.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{kind:?}: serve exit {status}");
}

#[test]
fn read_only_reads_through_our_data_server() {
    if !(require("qemu-img") && require("nbdcopy") && require("qemu-io")) {
        return;
    }
    read_only_reads_are_exact(Kind::Ours);
}

#[test]
fn read_only_reads_through_the_real_daemon() {
    if !(have_venv() && require("qemu-img") && require("nbdcopy") && require("qemu-io")) {
        return;
    }
    read_only_reads_are_exact(Kind::Daemon);
}
