//! The whole stack: qemu-img writes over NBD to `nbdbridge serve`, which
//! drives a transfer of `nbdbridge engine` and moves the data through a
//! real ovirt-imageio daemon registered as the engine's host.

use crate::support;

use std::process::Command;
use std::time::Duration;
use support::engine::{Engine, Imageio, element, have_tools, http};

#[test]
fn qemu_img_through_serve_to_an_engine_disk() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = Imageio::start(&tmp.path().join("imageio"));
    let data = tmp.path().join("engine");
    let engine = Engine::start(&data, &[imageio.host_arg("h1")], &[]);
    let token = engine.token();
    let size = 8 << 20;
    let disk_id = engine.add_disk(
        &token,
        &format!(
            "<disk><format>raw</format><name>e2e</name><provisioned_size>{size}</provisioned_size></disk>"
        ),
    );

    let src = tmp.path().join("src.raw");
    std::fs::write(&src, support::pattern(11, size)).unwrap();
    let socket = tmp.path().join("nbd.sock");
    let mut cmd = Command::new(support::bin());
    cmd.args(["serve", "--engine-url", &engine.url, "--password-file"])
        .arg(&engine.password_file)
        .args(["--disk", &disk_id, "--socket"])
        .arg(&socket);
    let mut serve = support::Proc::start_announcing("nbdbridge serve", cmd);
    let uri = serve.first_line.clone();
    assert!(uri.starts_with("nbd+unix://"), "{uri}");
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    // serve finalizes when the last client leaves, waits for
    // finished_success and exits 0.
    let status = serve.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "serve: {status}");
    let (status, _, body) = http(
        &engine.url,
        "GET",
        &format!("/ovirt-engine/api/disks/{disk_id}"),
        Some(&token),
        "application/xml",
        b"",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(element(&body, "status"), Some("ok"), "{body}");
    let written = std::fs::read(data.join("images").join(&disk_id)).unwrap();
    assert!(written == std::fs::read(&src).unwrap(), "disk data differs");
}

fn serve_cmd(setup: &support::engine::Setup, socket: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(support::bin());
    cmd.args([
        "serve",
        "--engine-url",
        &setup.engine.url,
        "--password-file",
    ])
    .arg(&setup.password_file)
    .arg("--socket")
    .arg(socket)
    .args(args);
    cmd
}

/// A QCOW2 disk: serve asks for a raw-format transfer, so qemu-img writes
/// guest data (through the engine's qemu-nbd and the real daemon) and the
/// disk stays a QCOW2 image; a download compares identical. A cow-format
/// transfer is refused unless `--allow-cow`, which shows the container.
#[test]
fn cow_disk_upload_is_guest_data_and_cow_transfers_are_refused() {
    if !(have_tools() && support::require("qemu-io") && support::require("nbdinfo")) {
        return;
    }
    let setup = support::engine::Setup::start(&[], &[]);
    let api = support::api::Api {
        url: setup.engine.url.clone(),
        password_file: setup.password_file.clone(),
    };
    let w = setup.tmp.path();
    let src = w.join("src.qcow2");
    support::sparse_qcow2(&src);
    let disk = api.new_disk("cow1", "cow", 64 << 20);

    let mut up = support::Proc::start_announcing(
        "nbdbridge serve (cow upload)",
        serve_cmd(&setup, &w.join("up.sock"), &["--disk", &disk]),
    );
    let uri = up.first_line.clone();
    let size = support::run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (64u64 << 20).to_string(),
        "clients see the virtual size, not the QCOW2 file"
    );
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "upload serve: {status}");
    assert_eq!(
        api.phase_of_disk_transfer(&disk).as_deref(),
        Some("finished_success")
    );
    let info = support::run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(setup.data.join("images").join(&disk)),
    );
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"format\": \"qcow2\""),
        "the disk is still a QCOW2 image: {info}"
    );

    let mut down = support::Proc::start_announcing(
        "nbdbridge serve (cow download)",
        serve_cmd(
            &setup,
            &w.join("down.sock"),
            &["--disk", &disk, "--direction", "download"],
        ),
    );
    let uri = down.first_line.clone();
    let out = support::run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    let status = down.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "download serve: {status}");

    // Someone else's cow-format transfer: the container bytes.
    let cow = api.new_transfer(&disk, "download", "cow");
    let out = serve_cmd(&setup, &w.join("cow.sock"), &["--transfer", &cow])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("format cow") && err.contains("--allow-cow"),
        "stderr: {err}"
    );
    assert!(out.stdout.is_empty(), "no URI on refusal");
    let mut raw = support::Proc::start_announcing(
        "nbdbridge serve --allow-cow",
        serve_cmd(
            &setup,
            &w.join("cow.sock"),
            &["--transfer", &cow, "--allow-cow"],
        ),
    );
    let info = support::run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&raw.first_line),
    );
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"format\": \"qcow2\""),
        "--allow-cow shows the QCOW2 container: {info}"
    );
    // `qemu-img info` is a probe: it read the header and left, but the
    // download is not copied yet, so it is not the end.
    assert!(raw.running(), "a probe must not end a download");
    assert_eq!(api.phase(&cow).as_deref(), Some("transferring"));
    // The copy reads every byte of data: then it is finalized.
    let copy = w.join("container.qcow2");
    support::run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&raw.first_line)
            .arg(&copy),
    );
    let status = raw.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "--allow-cow serve: {status}");
    assert_eq!(api.phase(&cow).as_deref(), Some("finished_success"));
    let out = support::run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&src)
            .arg(&copy),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("identical"),
        "the container bytes make the same guest data"
    );
}
