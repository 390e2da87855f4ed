//! qemu-img and qemu-io as NBD clients. qemu 10 negotiates extended
//! headers (NBD_OPT_EXTENDED_HEADERS), so these tests drive the 32-byte
//! request / extended reply path; each asserts from qemu's own trace that
//! extended headers were acknowledged.

use crate::support;

use std::path::Path;
use std::process::{Command, Output};
use support::nbd::{self, Run, ServeOpts};
use support::require;

const MIB: u64 = 1024 * 1024;

fn ready() -> bool {
    require("qemu-img") && require("qemu-io") && nbd::require_server()
}

/// Run a qemu tool with NBD option-reply tracing; assert success and that
/// extended headers were negotiated (option 11 answered with an ACK).
fn qemu_ext(tool: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(tool);
    cmd.args(["--trace", "nbd_receive_option_reply"]).args(args);
    let out = nbd::run_client(&mut cmd);
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        trace.contains("option reply 11 (extended headers), type 1 (ack)"),
        "{tool} did not get extended headers acknowledged; trace:\n{trace}"
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A larger mixed layout (32 MiB) with data at unaligned-looking places.
fn big_layout() -> Vec<(u64, Run)> {
    let k = 1024;
    vec![
        (3 * MIB, Run::Data(21)),
        (5 * MIB, Run::Hole),
        (192 * k, Run::Data(22)),
        (MIB - 192 * k, Run::Hole),
        (7 * MIB, Run::Data(23)),
        (15 * MIB, Run::Hole),
        (MIB, Run::Data(24)),
    ]
}

#[test]
fn convert_raw_to_nbd_and_back_is_bit_exact() {
    if !ready() {
        return;
    }
    let src = nbd::make_image(&big_layout());
    let size = std::fs::metadata(&src.path).expect("stat").len();
    // The target starts full of other data: convert must overwrite it all,
    // zeros included.
    let target = nbd::make_image(&[(size, Run::Data(99))]);
    let server = nbd::serve_file(&target.path, &ServeOpts::default());
    qemu_ext(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            s(&src.path),
            &server.uri,
        ],
    );
    server.stop();
    nbd::assert_same_bytes(&src.path, &target.path);

    // Download through a read-only export into a new sparse file.
    let server = nbd::serve_file(&target.path, &ServeOpts::read_only());
    let out = src.dir.path().join("download.raw");
    qemu_ext(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &server.uri, s(&out)],
    );
    server.stop();
    nbd::assert_same_bytes(&src.path, &out);
    // The holes of the source came back as holes (qemu-img asks for block
    // status and skips zero extents).
    let holes = |p: &Path| -> u64 {
        nbd::file_extents(p)
            .iter()
            .filter(|e| !e.2)
            .map(|e| e.1)
            .sum()
    };
    assert!(
        holes(&out) >= holes(&src.path),
        "download lost holes: source has {} hole bytes, download {}; extents {:?}",
        holes(&src.path),
        holes(&out),
        nbd::file_extents(&out)
    );
}

#[test]
fn sparse_qcow2_source_converts_and_compares() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let qcow = dir.path().join("src.qcow2");
    nbd::run_client(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&qcow),
        "32M",
    ]));
    nbd::run_client(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 1M 1M",
        "-c",
        "write -P 0xcd 20M 64k",
        "-c",
        "write -P 0x01 32704k 64k",
        "-c",
        "write -z 8M 1M",
        s(&qcow),
    ]));
    // A target full of other bytes: qemu-img must write the zeros too.
    let target = nbd::make_image(&[(32 * MIB, Run::Data(5))]);
    let server = nbd::serve_file(&target.path, &ServeOpts::default());
    qemu_ext(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&qcow),
            &server.uri,
        ],
    );
    // qemu-img compare through NBD: identical.
    qemu_ext(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&qcow), &server.uri],
    );
    // Change one byte through NBD; compare must now see the difference.
    nbd::run_client(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 5M 1",
        &server.uri,
    ]));
    let out = nbd::run_client_any(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&qcow),
        &server.uri,
    ]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare must report the changed byte (exit 1): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("offset 5242880"),
        "compare should name offset 5242880: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.stop();
    // And the file itself holds the qcow2's content plus that byte.
    let raw = dir.path().join("expected.raw");
    nbd::run_client(Command::new("qemu-img").args([
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&qcow),
        s(&raw),
    ]));
    let mut expected = std::fs::read(&raw).expect("read expected");
    expected[5 * MIB as usize] = 0x77;
    let got = std::fs::read(&target.path).expect("read target");
    assert_eq!(got.len(), expected.len(), "target size");
    if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("served file differs from the qcow2 at byte {i}");
    }
}

#[test]
fn qemu_img_info_reports_the_size() {
    if !ready() {
        return;
    }
    // An odd size: not a multiple of 4096.
    let size = 5 * MIB + 1536;
    let img = nbd::make_image(&[(MIB, Run::Data(3)), (size - MIB, Run::Hole)]);
    for opts in [ServeOpts::default(), ServeOpts::read_only()] {
        let server = nbd::serve_file(&img.path, &opts);
        let out = qemu_ext("qemu-img", &["info", "--output=json", &server.uri]);
        let info: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(size),
            "qemu-img info virtual-size (read_only={}): {info}",
            opts.read_only
        );
        server.stop();
    }
}

#[test]
fn qemu_io_odd_ranges_over_extended_headers() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(8 * MIB);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    let out = qemu_ext(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 4097 8191",
            "-c",
            "read -P 0x5a 4097 8191",
            "-c",
            "read -P 0 0 4097",
            "-c",
            "write -P 0x11 8388607 1",
            "-c",
            "write -z -u 1M 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "write -P 0x22 -f 2M 64k",
            "-c",
            "discard 2M 4k",
            "-c",
            "flush",
            &server.uri,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io reported a failure:\n{text}"
    );
    // A read of 0x5a where zeros are must fail: proves -P checks.
    let bad = nbd::run_client_any(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 4096",
        &server.uri,
    ]));
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"),
        "qemu-io pattern check should fail on zeros: {}",
        String::from_utf8_lossy(&bad.stdout)
    );
    server.stop();
    let data = std::fs::read(&img.path).expect("read image");
    assert!(
        data[4097..4097 + 8191].iter().all(|&b| b == 0x5a),
        "file: 0x5a run"
    );
    assert!(
        data[..4097].iter().all(|&b| b == 0),
        "file: zeros before 4097"
    );
    assert_eq!(data[8 * MIB as usize - 1], 0x11, "file: last byte");
    assert!(
        data[2 * MIB as usize + 4096..2 * MIB as usize + 65536]
            .iter()
            .all(|&b| b == 0x22),
        "file: FUA write after the discarded 4k"
    );
}

#[test]
fn qemu_io_reads_past_the_end_fail() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(MIB);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    // qemu's block layer refuses requests past the size itself, so this
    // checks the size the server advertised over extended headers.
    let out = nbd::run_client_any(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 1048064 1024",
        &server.uri,
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error") || text.contains("Invalid argument"),
        "a read past the end must fail: {text}"
    );
    server.stop();
}
