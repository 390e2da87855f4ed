//! The real oVirt SDK and the real imageio client against `nbdbridge
//! engine`, with a real ovirt-imageio daemon registered as the host.

mod support;

use support::engine::{Engine, Setup, have_tools, run_script};

#[test]
fn sdk_upload_download_pause_resume_finalize_cancel_errors() {
    if !have_tools() {
        return;
    }
    let s = Setup::start(&[], &[]);
    s.run(
        "engine_flows.py",
        &["h1", &s.work],
        &[
            "OK upload transferring",
            "OK follow disk: locked",
            "OK disk locked",
            "OK pause resume",
            "OK transferred reported",
            "OK upload finished_success",
            "OK pause finished 409",
            "OK download bit-exact",
            "OK cancel removes the disk",
            "OK errors",
            "OK disk removed",
            "OK auth",
            "DONE",
        ],
    );
}

#[test]
fn cow_uploads_are_verified_at_finalize() {
    if !have_tools() || !support::require("qemu-io") {
        return;
    }
    let s = Setup::start(&[], &[]);
    s.run(
        "engine_verify.py",
        &["h1", &s.work],
        &[
            "OK qcow2 finished_success",
            "OK qcow2 download bit-exact",
            "OK not qcow2 finished_failure",
            "OK backing file finished_failure",
            "DONE",
        ],
    );
}

#[test]
fn host_down_inactivity_policies_and_ticket_renewal() {
    if !have_tools() {
        return;
    }
    let down = "down=/nonexistent/control.sock,http://127.0.0.1:9".to_string();
    let s = Setup::start(&[down], &["--ticket-timeout", "3"]);
    s.run(
        "engine_system.py",
        &["h1", "down", &s.work],
        &[
            "OK host down paused_system",
            "OK inactivity cancel",
            "OK inactivity legacy upload paused_system",
            "OK resume after paused_system",
            "OK inactivity legacy download cancelled",
            "OK ticket renewed",
            "DONE",
        ],
    );
}

/// Files left in the engine's run dir (qemu-nbd sockets and pid files).
fn left_in_run_dir(data: &std::path::Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(data.join("run"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

#[test]
fn a_restarted_engine_keeps_disks_and_transfers() {
    if !have_tools() {
        return;
    }
    let mut s = Setup::start(&[], &[]);
    s.run("engine_restart.py", &["start", &s.work], &["OK started"]);
    // Killed mid-transfer: no chance to clean up.
    s.engine.proc.signal(9);
    s.engine.proc.wait_exit(std::time::Duration::from_secs(10));
    s.engine = Engine::start(&s.data, &[s.imageio.host_arg("h1")], &[]);
    s.run(
        "engine_restart.py",
        &["finish", &s.work],
        &[
            "OK finished after restart: raw",
            "OK finished after restart: cow",
        ],
    );
    // The qemu-nbd the first engine started was stopped by the second.
    let left = left_in_run_dir(&s.data);
    assert!(left.is_empty(), "left: {left:?}");
}

#[test]
fn https_with_ca_file_and_insecure() {
    if !support::require(&support::venv_python().to_string_lossy()) || !support::require("openssl")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("cert.pem");
    let key = tmp.path().join("key.pem");
    support::run_ok(
        std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    let down = format!(
        "down={},http://127.0.0.1:9",
        tmp.path().join("x.sock").display()
    );
    let mut cmd = std::process::Command::new(support::bin());
    cmd.arg("engine")
        .arg("--data-dir")
        .arg(tmp.path().join("engine"))
        .args(["--listen", "127.0.0.1:0", "--host", &down])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    let proc = support::Proc::start_announcing("nbdbridge engine (tls)", cmd);
    let url = proc.first_line.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let pw = tmp.path().join("engine/password");
    let out = run_script(
        "engine_tls.py",
        &[&url, &pw.to_string_lossy(), &cert.to_string_lossy()],
    );
    for step in ["OK ca_file", "OK insecure", "OK unverified refused", "DONE"] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
}

/// ovirt-imageio's own `ovirt-img` tool (SDK + imageio client) uploads a
/// QCOW2 image to a new cow disk (guest data through qemu-nbd) and a raw
/// image to a raw disk, then downloads both; qemu-img compares.
#[test]
fn ovirt_img_upload_and_download_qcow2_and_raw() {
    if !have_tools() || !support::require("qemu-io") {
        return;
    }
    let s = Setup::start(&[], &[]);
    let base = s
        .engine
        .url
        .trim_end_matches("/ovirt-engine/api")
        .to_string();
    let pw = s.password_file.clone();
    let w = s.tmp.path();
    let qcow = w.join("src.qcow2");
    support::run_ok(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow)
            .arg("8M"),
    );
    support::run_ok(
        std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x33 1M 128k", "-c"])
            .args(["write -P 0x44 6M 64k"])
            .arg(&qcow),
    );
    let raw = w.join("src.raw");
    std::fs::write(&raw, support::pattern(7, 3 << 20)).unwrap();
    let ovirt_img = support::repo().join(".venv/bin/ovirt-img");
    let common = |cmd: &mut std::process::Command| {
        cmd.args(["--engine-url", &base, "--username", "admin@internal"])
            .args(["--password-file", &pw, "-o", "json"]);
    };
    for (src, fmt, id) in [
        (&qcow, "qcow2", "6b1e3a52-0c4a-4d55-9d3b-3f2a4a1c0001"),
        (&raw, "raw", "6b1e3a52-0c4a-4d55-9d3b-3f2a4a1c0002"),
    ] {
        let mut up = std::process::Command::new(&ovirt_img);
        up.arg("upload-disk");
        common(&mut up);
        up.args(["-s", "data", "-f", fmt, "--disk-id", id]).arg(src);
        let out = support::run_ok(&mut up);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("upload completed"), "{text}");
        let image = s.data.join("images").join(id);
        let info = support::run_ok(
            std::process::Command::new("qemu-img")
                .arg("info")
                .arg(&image),
        );
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains(&format!("file format: {fmt}")), "{info}");
        let back = w.join(format!("back.{fmt}"));
        let mut down = std::process::Command::new(&ovirt_img);
        down.arg("download-disk");
        common(&mut down);
        down.args(["-f", fmt, id]).arg(&back);
        let out = support::run_ok(&mut down);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("download completed"), "{text}");
        support::run_ok(
            std::process::Command::new("qemu-img")
                .arg("compare")
                .arg(src)
                .arg(&back),
        );
    }
    // Every qemu-nbd the engine started was stopped at finalize.
    let left = left_in_run_dir(&s.data);
    assert!(left.is_empty(), "left: {left:?}");
}
