//! The URI `serve` prints follows the NBD URI spec (percent-encoded export
//! name and socket path) so that real clients accept it, and the unix
//! sockets it makes are private: the default one in a fresh 0700 directory
//! (removed at exit), every socket 0600.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::nbd::{self, Endpoint, ServeOpts};
use support::{Proc, bin, require};

const MIB: u64 = 1024 * 1024;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn odd_socket_path_and_export_name_round_trip_through_nbdinfo() {
    if !nbd::ours() || !require("nbdinfo") {
        return;
    }
    let img = nbd::empty_image(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = dir.path().join("a b#c?d%e&f+g");
    std::fs::create_dir(&odd).expect("mkdir");
    let socket = odd.join("s.sock");
    let export = "disk #1?50% a&b=c+d/é";
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--file"])
        .arg(&img.path)
        .arg("--socket")
        .arg(&socket)
        .args(["--export-name", export]);
    let proc = Proc::start_announcing("nbdbridge serve", cmd);
    let uri = proc.first_line.trim().to_string();
    let (endpoint, name) = nbd::parse_uri(&uri);
    assert_eq!(endpoint, Endpoint::Unix(socket.clone()), "{uri}");
    assert_eq!(name, export, "{uri}");
    assert_eq!(mode(&socket), 0o600, "a --socket path must be 0600");
    // nbdinfo parses the printed URI and reaches the export.
    let out = nbd::run_client(Command::new("nbdinfo").args(["--json", &uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json");
    assert_eq!(v["exports"][0]["export-name"], export, "{v}");
    assert_eq!(v["exports"][0]["export-size"], MIB, "{v}");
    drop(proc);
    support::wait_until("the socket to be removed", Duration::from_secs(10), || {
        !socket.exists()
    });
}

#[test]
fn default_socket_is_private_and_removed_at_exit() {
    if !nbd::ours() {
        return;
    }
    let img = nbd::empty_image(MIB);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--file"]).arg(&img.path);
    // The default socket goes under TMPDIR.
    cmd.env("TMPDIR", tmp.path());
    let mut proc = Proc::start_announcing("nbdbridge serve", cmd);
    let uri = proc.first_line.trim().to_string();
    let (endpoint, _) = nbd::parse_uri(&uri);
    let Endpoint::Unix(socket) = endpoint else {
        panic!("default listener is not a unix socket: {uri}")
    };
    let parent: PathBuf = socket.parent().expect("socket dir").to_path_buf();
    assert_eq!(parent.parent(), Some(tmp.path()), "{uri}");
    assert_eq!(mode(&parent), 0o700, "the socket's directory must be 0700");
    assert_eq!(mode(&socket), 0o600, "the socket must be 0600");
    proc.signal(15);
    assert!(proc.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !parent.exists(),
        "{} was left behind at exit",
        parent.display()
    );
}

#[test]
fn tcp_uri_names_the_port_and_encodes_the_export() {
    if !nbd::ours() || !require("nbdinfo") {
        return;
    }
    let img = nbd::empty_image(MIB);
    let opts = ServeOpts {
        tcp: true,
        export_name: "a b/c".into(),
        ..ServeOpts::default()
    };
    let server = nbd::serve_file(&img.path, &opts);
    assert!(server.uri.ends_with("/a%20b%2Fc"), "{}", server.uri);
    nbd::run_client(Command::new("nbdinfo").arg(&server.uri));
    server.stop();
}
