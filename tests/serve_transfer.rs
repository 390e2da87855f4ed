//! `nbdbridge serve --engine-url`: the phase-aware bridge against
//! `nbdbridge engine` with the real ovirt-imageio daemon as its host, driven
//! by real NBD clients.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::engine::{Setup, element, first_id, have_tools, http};
use support::{Proc, bin, pattern, run_ok, wait_until};

const SIZE: u64 = 64 << 20;

/// A bearer token for the engine's API.
fn token(setup: &Setup) -> String {
    let password = std::fs::read_to_string(&setup.password_file).unwrap();
    let form = format!(
        "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password={}",
        password.trim()
    );
    let (status, _, body) = http(
        &setup.engine.url,
        "POST",
        "/ovirt-engine/sso/oauth/token",
        None,
        "application/x-www-form-urlencoded",
        form.as_bytes(),
    );
    assert_eq!(status, 200, "login: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

fn api(setup: &Setup, method: &str, path: &str, body: &str) -> (u16, String) {
    let t = token(setup);
    let (status, _, text) = http(
        &setup.engine.url,
        method,
        &format!("/ovirt-engine/api{path}"),
        Some(&t),
        "application/xml",
        body.as_bytes(),
    );
    (status, text)
}

/// Create a raw disk and wait until it is `ok`; its id.
fn new_disk(setup: &Setup, alias: &str) -> String {
    let (status, xml) = api(
        setup,
        "POST",
        "/disks",
        &format!(
            "<disk><alias>{alias}</alias><format>raw</format>\
             <provisioned_size>{SIZE}</provisioned_size></disk>"
        ),
    );
    assert!((200..300).contains(&status), "add disk: {status} {xml}");
    let id = first_id(&xml).unwrap().to_string();
    wait_until("disk ok", Duration::from_secs(30), || {
        element(&api(setup, "GET", &format!("/disks/{id}"), "").1, "status") == Some("ok")
    });
    id
}

fn serve(setup: &Setup, dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--engine-url")
        .arg(&setup.engine.url)
        .arg("--password-file")
        .arg(&setup.password_file)
        .arg("--socket")
        .arg(dir.join("nbd.sock"))
        .args(args);
    Proc::start_announcing("nbdbridge serve", cmd)
}

/// The phase of the newest transfer of `disk`.
fn phase_of_disk_transfer(setup: &Setup, disk: &str) -> Option<String> {
    let (_, xml) = api(setup, "GET", "/imagetransfers", "");
    xml.split("<image_transfer ")
        .filter(|t| t.contains(&format!("id=\"{disk}\"")))
        .last()
        .and_then(|t| element(t, "phase").map(str::to_string))
}

fn write_source(path: &Path) {
    let mut data = pattern(7, 8 << 20);
    data.resize(SIZE as usize, 0);
    data[(40 << 20)..(40 << 20) + 4096].copy_from_slice(&pattern(9, 4096));
    std::fs::write(path, &data).unwrap();
}

#[test]
fn upload_probe_finalize_then_download_compares() {
    if !have_tools() {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_source(&src);
    let disk = new_disk(&setup, "up1");

    let mut bridge = serve(&setup, dir.path(), &["--disk", &disk]);
    let uri = bridge.first_line.clone();
    // A probe connects and leaves with DISC, writing nothing: no finalize.
    run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(
        phase_of_disk_transfer(&setup, &disk).as_deref(),
        Some("transferring"),
        "a probe must not end the transfer"
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let status = bridge.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "serve exit: {status}");
    assert_eq!(
        phase_of_disk_transfer(&setup, &disk).as_deref(),
        Some("finished_success")
    );

    let down = tempfile::tempdir().unwrap();
    let mut bridge = serve(
        &setup,
        down.path(),
        &["--disk", &disk, "--direction", "download"],
    );
    let uri = bridge.first_line.clone();
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    let status = bridge.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "download serve exit: {status}");
}

#[test]
fn killed_client_pauses_and_a_new_one_completes() {
    if !have_tools() {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_source(&src);
    let disk = new_disk(&setup, "up2");
    let mut bridge = serve(&setup, dir.path(), &["--disk", &disk]);
    let uri = bridge.first_line.clone();
    // A client that writes, flushes and dies without NBD_CMD_DISC.
    let script = format!(
        "import nbd, os\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'x' * 65536, 0)\nh.flush()\nos._exit(0)\n"
    );
    run_ok(Command::new(support::SYSTEM_PYTHON).arg("-c").arg(&script));
    wait_until("paused_user", Duration::from_secs(30), || {
        phase_of_disk_transfer(&setup, &disk).as_deref() == Some("paused_user")
    });
    // nbdcopy with several connections completes the upload.
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg("--flush")
            .arg(&src)
            .arg(&uri),
    );
    let status = bridge.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "serve exit: {status}");
    assert_eq!(
        phase_of_disk_transfer(&setup, &disk).as_deref(),
        Some("finished_success")
    );
    let image = setup.data.join("images").join(&disk);
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&src).unwrap(),
        "the disk holds exactly the source"
    );
}

#[test]
fn unknown_disk_fails_clearly() {
    if !have_tools() {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--engine-url")
        .arg(&setup.engine.url)
        .arg("--password-file")
        .arg(&setup.password_file)
        .arg("--socket")
        .arg(dir.path().join("x.sock"))
        .args(["--disk", "00000000-0000-0000-0000-000000000000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("404"), "stderr: {err}");
}
