//! The whole stack: qemu-img writes over NBD to `nbdbridge serve`, which
//! drives a transfer of `nbdbridge engine` and moves the data through a
//! real ovirt-imageio daemon registered as the engine's host.

mod support;

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
