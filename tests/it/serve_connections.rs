//! The imageio backend never opens more HTTP connections than the data
//! server advertised (`max_readers` / `max_writers`): against the real
//! ovirt-imageio daemon with an nbd ticket over `qemu-nbd -e 8` (the
//! production setup), where the daemon opens one NBD connection per HTTP
//! connection and a 9th waits inside the daemon until another closes
//! (with a pool that let a slot open a second connection, that wait was
//! the daemon's 60 s idle timeout). Downloads and an upload through
//! `serve --imageio-url` must be exact and quick, and the daemon's log must
//! never show more than 8 connections open at once.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::imageio::{Kind, Server, have_venv, nbd_ticket, start};
use support::{Proc, START_DEADLINE, bin, output_within, pattern, require, wait_until};

/// Enough data for many requests on every connection.
const SIZE: usize = 64 << 20;
/// Connections qemu-nbd takes (`-e`), and the daemon advertises.
const MAX_OPEN: usize = 8;
/// A copy of SIZE bytes takes a second or two; a connection waiting for
/// the daemon's idle timeout waits up to 60 s.
const COPY_DEADLINE: Duration = Duration::from_secs(40);

/// Connection ids the daemon's log shows open at the end, and the most it
/// ever showed open at once (`[http] OPEN connection=N ...` and
/// `[http] CLOSE connection=N ...`, in log order).
fn replay(log: &str) -> (BTreeSet<u64>, usize, usize) {
    let mut open = BTreeSet::new();
    let mut max = 0;
    let mut opened = 0;
    for line in log.lines() {
        let id = |tag: &str| -> Option<u64> {
            line.split(tag)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        if let Some(n) = id("[http] OPEN connection=") {
            open.insert(n);
            opened += 1;
            max = max.max(open.len());
        } else if let Some(n) = id("[http] CLOSE connection=") {
            open.remove(&n);
        }
    }
    (open, max, opened)
}

/// Wait until the daemon logged the end of every connection it opened, so
/// one bridge's connections are never counted with the next one's.
fn all_closed(server: &Server, after: &str) {
    wait_until(
        &format!("the daemon to close every connection after {after}"),
        Duration::from_secs(30),
        || replay(&server.log()).0.is_empty(),
    );
}

fn serve(url: &str, socket: &Path, read_only: bool) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve").arg("--imageio-url").arg(url);
    if read_only {
        cmd.arg("--read-only");
    }
    cmd.arg("--socket").arg(socket);
    Proc::start_announcing("nbdbridge serve --imageio-url", cmd)
}

fn stop(mut bridge: Proc) {
    bridge.signal(15);
    let status = bridge.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "serve exit {status}");
}

fn nbdcopy(args: &[&str], what: &str) {
    let out = output_within(Command::new("nbdcopy").args(args), COPY_DEADLINE);
    assert!(
        out.status.success(),
        "{what}: nbdcopy {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn same_bytes(what: &str, got: &Path, want: &[u8]) {
    let got = std::fs::read(got).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    if got == want {
        return;
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
fn never_more_connections_than_the_daemon_allows() {
    if !(have_venv() && require("nbdcopy") && require("qemu-nbd")) {
        return;
    }
    let server = start(Kind::Daemon);
    let image = server.path("disk.raw");
    let data = pattern(31, SIZE);
    std::fs::write(&image, &data).unwrap();
    let socket = server.path("disk.nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-t", "-e"])
        .arg(MAX_OPEN.to_string())
        .arg(format!("--socket={}", socket.display()))
        .arg(&image);
    let _qemu_nbd = Proc::start("qemu-nbd", cmd);
    wait_until("qemu-nbd listening", START_DEADLINE, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let ops = ["read", "write"];
    let nbd_url = format!("nbd:unix:{}", socket.display());
    server.add_ticket(&nbd_ticket("tkt-conns", &nbd_url, SIZE as u64, &ops));
    let url = server.url("tkt-conns");

    // Three downloads in a row, each through a new bridge.
    for run in 0..3 {
        all_closed(&server, "the previous bridge");
        let bridge = serve(&url, &server.path(&format!("down{run}.sock")), true);
        let out = server.path(&format!("out{run}.raw"));
        let out_arg = out.to_string_lossy().into_owned();
        nbdcopy(
            &[bridge.first_line.as_str(), out_arg.as_str()],
            &format!("download {run}"),
        );
        stop(bridge);
        same_bytes(&format!("download {run}"), &out, &data);
    }

    // One upload, flushed.
    all_closed(&server, "the downloads");
    let src = server.path("src.raw");
    let upload = pattern(32, SIZE);
    std::fs::write(&src, &upload).unwrap();
    let bridge = serve(&url, &server.path("up.sock"), false);
    let src_arg = src.to_string_lossy().into_owned();
    nbdcopy(
        &["--flush", src_arg.as_str(), bridge.first_line.as_str()],
        "upload",
    );
    stop(bridge);
    same_bytes("upload", &image, &upload);

    all_closed(&server, "the upload");
    let (_, max, opened) = replay(&server.log());
    assert!(
        opened >= 4,
        "every bridge opened connections: {opened} OPEN lines in the daemon's log"
    );
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[http] OPEN") || l.contains("[http] CLOSE"))
        .collect();
    assert!(
        max <= MAX_OPEN,
        "the daemon had {max} HTTP connections open at once (at most {MAX_OPEN}):\n{}",
        lines.join("\n")
    );
    eprintln!("{opened} connections in all, at most {max} open at once");
}
