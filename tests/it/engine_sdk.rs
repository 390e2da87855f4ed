//! The real oVirt SDK and the real imageio client against `nbdbridge
//! engine`, on both kinds of host: the engine's embedded data server (the
//! engine started without `--host`) and a real ovirt-imageio daemon
//! registered with `--host`. Each flow is one function of the host kind;
//! [`on_both_hosts!`] makes a `FLOW::embedded_host` and a
//! `FLOW::daemon_host` test of it.

use crate::support;

use support::engine::{HostKind, Setup, have_tools, run_script};

/// Tests `$flow::embedded_host` and `$flow::daemon_host` running
/// `$flow(HostKind)`. Transfers of guest data of QCOW2 disks (`format=raw`
/// of a `cow` disk) go through the engine's qemu-nbd behind an `nbd:unix:`
/// ticket on both kinds of host.
macro_rules! on_both_hosts {
    ($flow:ident) => {
        mod $flow {
            use super::HostKind;

            #[test]
            fn embedded_host() {
                super::$flow(HostKind::Embedded)
            }

            #[test]
            fn daemon_host() {
                super::$flow(HostKind::Daemon)
            }
        }
    };
}

on_both_hosts!(upload_download_pause_resume_finalize_cancel_errors);
/// Upload (the imageio client) + finalize, download bit-exact, pause and
/// resume, cancel removing the disk, and the error faults.
fn upload_download_pause_resume_finalize_cancel_errors(kind: HostKind) {
    if !have_tools() {
        return;
    }
    let s = Setup::on_host(kind, &[], &[]);
    s.run(
        "engine_flows.py",
        &[s.host(), &s.work],
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

on_both_hosts!(cow_uploads_are_verified_at_finalize);
/// QCOW2 bytes to a cow disk (`format=cow`, a file ticket) are verified
/// at finalize.
fn cow_uploads_are_verified_at_finalize(kind: HostKind) {
    if !have_tools() || !support::require("qemu-io") {
        return;
    }
    let s = Setup::on_host(kind, &[], &[]);
    s.run(
        "engine_verify.py",
        &[s.host(), &s.work],
        &[
            "OK qcow2 finished_success",
            "OK qcow2 download bit-exact",
            "OK not qcow2 finished_failure",
            "OK backing file finished_failure",
            "DONE",
        ],
    );
}

on_both_hosts!(inactivity_policies_and_ticket_renewal);
/// timeout_policy cancel / legacy (uploads pause, downloads are
/// cancelled), resume after paused_system, a 3 s ticket renewed.
fn inactivity_policies_and_ticket_renewal(kind: HostKind) {
    if !have_tools() {
        return;
    }
    let s = Setup::on_host(kind, &[], &["--ticket-timeout", "3"]);
    s.run(
        "engine_system.py",
        &[s.host(), &s.work],
        &[
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

/// Uploads of `cases` (see engine_restart.py) half written, the engine
/// killed and started again, then the rest written, finalized and
/// downloaded: a restart loses nothing. On the embedded host the data
/// server dies and comes back with the engine, which installs the
/// transfers' tickets again.
fn restart_mid_upload(kind: HostKind, cases: &[&str]) {
    let mut s = Setup::on_host(kind, &[], &[]);
    let args = |mode: &'static str, s: &Setup| -> Vec<String> {
        let mut a = vec![mode.to_string(), s.host().to_string(), s.work.clone()];
        a.extend(cases.iter().map(|c| c.to_string()));
        a
    };
    let start = args("start", &s);
    s.run(
        "engine_restart.py",
        &start.iter().map(String::as_str).collect::<Vec<_>>(),
        &["OK started"],
    );
    s.restart_engine();
    let finish = args("finish", &s);
    let expect: Vec<String> = cases
        .iter()
        .map(|c| format!("OK finished after restart: {c}"))
        .chain(["DONE".to_string()])
        .collect();
    s.run(
        "engine_restart.py",
        &finish.iter().map(String::as_str).collect::<Vec<_>>(),
        &expect.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Any qemu-nbd the first engine started was stopped by the second.
    let left = left_in_run_dir(&s.data);
    assert!(left.is_empty(), "left: {left:?}");
}

on_both_hosts!(restart_keeps_file_ticket_transfers);
/// A raw disk, and the QCOW2 bytes of a cow disk (`format=cow`).
fn restart_keeps_file_ticket_transfers(kind: HostKind) {
    if !have_tools() || !support::require("qemu-io") {
        return;
    }
    restart_mid_upload(kind, &["raw:raw", "cow:cow"]);
}

on_both_hosts!(restart_keeps_guest_data_transfers_of_cow_disks);
/// Guest data of a cow disk (`format=raw`, through qemu-nbd).
fn restart_keeps_guest_data_transfers_of_cow_disks(kind: HostKind) {
    if !have_tools() {
        return;
    }
    restart_mid_upload(kind, &["cow:raw"]);
}

/// A host whose data server is down. Only external hosts can be down: the
/// embedded data server lives in the engine's process, so it is up exactly
/// while the engine is (the engine going down is
/// `restart_keeps_*`). Two cases: a registered host whose daemon never
/// ran, and the real daemon killed in the middle of an upload.
#[test]
fn external_host_down_pauses_uploads() {
    if !have_tools() {
        return;
    }
    let down = "down=/nonexistent/control.sock,http://127.0.0.1:9".to_string();
    let mut s = Setup::on_host(HostKind::Daemon, &[down], &[]);
    s.run(
        "engine_host_down.py",
        &["never", "down", &s.work],
        &["OK host never up paused_system", "DONE"],
    );
    s.run(
        "engine_host_down.py",
        &["start", s.host(), &s.work],
        &["OK transferring"],
    );
    s.imageio.as_mut().expect("the daemon").kill();
    s.run(
        "engine_host_down.py",
        &["finish", s.host(), &s.work],
        &[
            "OK host died paused_system",
            "OK resume on a dead host paused_system",
            "OK cancel removes the disk",
            "DONE",
        ],
    );
}

/// `GET /disks?search=` and the faults of refused snapshot transfers and
/// of transfers of an unknown backup, through the SDK (no data moves: the
/// embedded host).
#[test]
fn disk_search_and_refused_transfer_kinds() {
    if !support::require(&support::venv_python().to_string_lossy()) {
        return;
    }
    let s = Setup::on_host(HostKind::Embedded, &[], &[]);
    s.run(
        "engine_api.py",
        &[],
        &[
            "OK search name alias id status",
            "OK search case_sensitive max",
            "OK unsupported search 400",
            "OK snapshot and backup transfers 400",
            "DONE",
        ],
    );
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

/// ovirt-imageio's own `ovirt-img` tool (SDK + imageio client) uploads an
/// image of format `fmt` to a new disk and downloads it; qemu-img
/// compares. A QCOW2 image goes to a cow disk as guest data, through a
/// qemu-nbd the engine runs.
fn ovirt_img_upload_and_download(kind: HostKind, fmt: &str, id: &str) {
    if !have_tools() || !support::require("qemu-io") {
        return;
    }
    let s = Setup::on_host(kind, &[], &[]);
    let base = s
        .engine
        .url
        .trim_end_matches("/ovirt-engine/api")
        .to_string();
    let w = s.tmp.path();
    let src = w.join(format!("src.{fmt}"));
    if fmt == "qcow2" {
        support::run_ok(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&src)
                .arg("8M"),
        );
        support::run_ok(
            std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x33 1M 128k", "-c"])
                .args(["write -P 0x44 6M 64k"])
                .arg(&src),
        );
    } else {
        std::fs::write(&src, support::pattern(7, 3 << 20)).unwrap();
    }
    let ovirt_img = support::repo().join(".venv/bin/ovirt-img");
    let common = |cmd: &mut std::process::Command| {
        cmd.args(["--engine-url", &base, "--username", "admin@internal"])
            .args(["--password-file", &s.password_file, "-o", "json"]);
    };
    let mut up = std::process::Command::new(&ovirt_img);
    up.arg("upload-disk");
    common(&mut up);
    up.args(["-s", "data", "-f", fmt, "--disk-id", id])
        .arg(&src);
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
            .arg(&src)
            .arg(&back),
    );
    // Every qemu-nbd the engine started was stopped at finalize.
    let left = left_in_run_dir(&s.data);
    assert!(left.is_empty(), "left: {left:?}");
}

on_both_hosts!(ovirt_img_raw);
/// A raw image to a raw disk.
fn ovirt_img_raw(kind: HostKind) {
    ovirt_img_upload_and_download(kind, "raw", "6b1e3a52-0c4a-4d55-9d3b-3f2a4a1c0002");
}

on_both_hosts!(ovirt_img_qcow2);
/// A QCOW2 image to a cow disk, as guest data (`format=raw`).
fn ovirt_img_qcow2(kind: HostKind) {
    ovirt_img_upload_and_download(kind, "qcow2", "6b1e3a52-0c4a-4d55-9d3b-3f2a4a1c0001");
}

/// VM backups as the SDK example does them (full, writes, incremental
/// from the checkpoint downloaded with `incremental=True` into an overlay;
/// `qemu-img compare` against the disk at each checkpoint), checkpoint
/// removal and the faults. On the real daemon as host, which reads the
/// dirty bitmap from the engine's `qemu-nbd -B`.
#[test]
fn backup_full_then_incremental_on_the_daemon_host() {
    backup_full_then_incremental(HostKind::Daemon);
}

/// The same on the engine's embedded data server, which reads the dirty
/// bitmap from `qemu-nbd -B` like the daemon does.
#[test]
fn backup_full_then_incremental_on_the_embedded_host() {
    backup_full_then_incremental(HostKind::Embedded);
}

fn backup_full_then_incremental(kind: HostKind) {
    if !have_tools() {
        return;
    }
    let s = Setup::on_host(kind, &[], &[]);
    s.run(
        "engine_backup.py",
        &["flow", s.host(), &s.work],
        &[
            "OK vm with disk",
            "OK full backup",
            "OK incremental backup",
            "OK checkpoint removed",
            "OK faults",
            "DONE",
        ],
    );
}

on_both_hosts!(backup_survives_an_engine_restart);
/// A backup left ready survives an engine restart (state in SQLite): still
/// ready, its disk still locked, downloadable, then finalized.
fn backup_survives_an_engine_restart(kind: HostKind) {
    if !have_tools() {
        return;
    }
    let mut s = Setup::on_host(kind, &[], &[]);
    s.run(
        "engine_backup.py",
        &["start", s.host(), &s.work],
        &["OK backup ready", "DONE"],
    );
    s.restart_engine();
    s.run(
        "engine_backup.py",
        &["finish", s.host(), &s.work],
        &["OK backup survives a restart", "DONE"],
    );
}

/// A dead host registered first: a transfer that names no host goes to
/// the host that is up (as oVirt only picks an `up` host), and the hosts
/// show their status. Before, the first host was taken and the SDK's plain
/// upload went to `paused_system`.
#[test]
fn transfers_without_a_host_go_to_a_host_that_is_up() {
    if !have_tools() {
        return;
    }
    let down = "down=/nonexistent/control.sock,http://127.0.0.1:9".to_string();
    let s = Setup::on_host(HostKind::Embedded, &[down], &[]);
    s.run(
        "engine_hosts.py",
        &["down", "embedded", &s.work],
        &[
            "OK host status",
            "OK upload went to the host that is up",
            "DONE",
        ],
    );
}
