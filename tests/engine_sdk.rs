//! The real oVirt SDK and the real imageio client against `nbdbridge
//! engine`, with a real ovirt-imageio daemon registered as the host.

mod support;

use support::engine::{Engine, Imageio, have_tools, run_script};

#[test]
fn sdk_upload_download_pause_resume_finalize_cancel_errors() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = Imageio::start(&tmp.path().join("imageio"));
    let engine = Engine::start(&tmp.path().join("engine"), &[imageio.host_arg("h1")], &[]);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let pw = engine.password_file.to_string_lossy().into_owned();
    let out = run_script(
        "engine_flows.py",
        &[&engine.url, &pw, "h1", &work.to_string_lossy()],
    );
    for step in [
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
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
}

#[test]
fn cow_uploads_are_verified_at_finalize() {
    if !have_tools() || !support::require("qemu-io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = Imageio::start(&tmp.path().join("imageio"));
    let engine = Engine::start(&tmp.path().join("engine"), &[imageio.host_arg("h1")], &[]);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let pw = engine.password_file.to_string_lossy().into_owned();
    let out = run_script(
        "engine_verify.py",
        &[&engine.url, &pw, "h1", &work.to_string_lossy()],
    );
    for step in [
        "OK qcow2 finished_success",
        "OK qcow2 download bit-exact",
        "OK not qcow2 finished_failure",
        "OK backing file finished_failure",
        "DONE",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
}

#[test]
fn host_down_inactivity_policies_and_ticket_renewal() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = Imageio::start(&tmp.path().join("imageio"));
    let down = format!(
        "down={},http://127.0.0.1:9",
        tmp.path().join("no-such.sock").display()
    );
    let engine = Engine::start(
        &tmp.path().join("engine"),
        &[imageio.host_arg("h1"), down],
        &["--ticket-timeout", "3"],
    );
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let pw = engine.password_file.to_string_lossy().into_owned();
    let out = run_script(
        "engine_system.py",
        &[&engine.url, &pw, "h1", "down", &work.to_string_lossy()],
    );
    for step in [
        "OK host down paused_system",
        "OK inactivity cancel",
        "OK inactivity legacy upload paused_system",
        "OK resume after paused_system",
        "OK ticket renewed",
        "DONE",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
}

#[test]
fn a_restarted_engine_keeps_disks_and_transfers() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = Imageio::start(&tmp.path().join("imageio"));
    let data = tmp.path().join("engine");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let work = work.to_string_lossy().into_owned();
    let hosts = [imageio.host_arg("h1")];
    let mut engine = Engine::start(&data, &hosts, &[]);
    let pw = engine.password_file.to_string_lossy().into_owned();
    let out = run_script("engine_restart.py", &["start", &engine.url, &pw, &work]);
    assert!(out.contains("OK started"), "{out}");
    // Killed mid-transfer: no chance to clean up.
    engine.proc.signal(9);
    engine.proc.wait_exit(std::time::Duration::from_secs(10));
    let engine = Engine::start(&data, &hosts, &[]);
    let out = run_script("engine_restart.py", &["finish", &engine.url, &pw, &work]);
    assert!(out.contains("OK finished after restart"), "{out}");
}
