//! `nbdbridge serve --engine-url`: the phase-aware bridge against
//! `nbdbridge engine` with the real ovirt-imageio daemon as its host, driven
//! by real NBD clients.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::engine::{Setup, element, first_id, have_tools};
use support::{Proc, bin, pattern, run_ok, wait_until};

const SIZE: u64 = 64 << 20;

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
    let api = api_of(&setup);
    let disk = api.new_disk("up1", "raw", SIZE);

    let mut bridge = serve(&setup, dir.path(), &["--disk", &disk]);
    let uri = bridge.first_line.clone();
    // A probe connects and leaves with DISC, writing nothing: no finalize.
    run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(
        api.phase_of_disk_transfer(&disk).as_deref(),
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
        api.phase_of_disk_transfer(&disk).as_deref(),
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
    let api = api_of(&setup);
    let disk = api.new_disk("up2", "raw", SIZE);
    let mut bridge = serve(&setup, dir.path(), &["--disk", &disk]);
    let uri = bridge.first_line.clone();
    // A client that writes, flushes and dies without NBD_CMD_DISC.
    let script = format!(
        "import nbd, os\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'x' * 65536, 0)\nh.flush()\nos._exit(0)\n"
    );
    run_ok(Command::new(support::SYSTEM_PYTHON).arg("-c").arg(&script));
    wait_until("paused_user", Duration::from_secs(30), || {
        api.phase_of_disk_transfer(&disk).as_deref() == Some("paused_user")
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
        api.phase_of_disk_transfer(&disk).as_deref(),
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

fn api_of(setup: &Setup) -> support::api::Api {
    support::api::Api {
        url: setup.engine.url.clone(),
        password_file: setup.password_file.clone(),
    }
}

/// `serve --engine-url URL ARGS` with stderr into `log`.
fn serve_logged(url: &str, password_file: &str, socket: &Path, log: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--engine-url")
        .arg(url)
        .arg("--password-file")
        .arg(password_file)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stderr(std::fs::File::create(log).unwrap());
    Proc::start_announcing("nbdbridge serve", cmd)
}

/// A libnbd client that writes 64 KiB at 0, flushes, says `ready` and
/// stays connected until killed.
fn lingering_client(uri: &str) -> Proc {
    let script = format!(
        "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'x' * 65536, 0)\nh.flush()\nprint('ready', flush=True)\ntime.sleep(300)\n"
    );
    let mut cmd = Command::new(support::SYSTEM_PYTHON);
    cmd.arg("-c").arg(script);
    let p = Proc::start_announcing("libnbd client", cmd);
    assert_eq!(p.first_line, "ready");
    p
}

/// Lines of `log` that contain `needle`.
fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_finished_transfer_is_refused_clearly() {
    if !have_tools() {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let api = api_of(&setup);
    let disk = api.new_disk("done", "raw", SIZE);
    let id = api.new_transfer(&disk, "upload", "raw");
    assert_eq!(api.act(&id, "finalize"), 200);
    wait_until("finished_success", Duration::from_secs(30), || {
        api.phase(&id).as_deref() == Some("finished_success")
    });
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--engine-url")
        .arg(&setup.engine.url)
        .arg("--password-file")
        .arg(&setup.password_file)
        .arg("--socket")
        .arg(dir.path().join("x.sock"))
        .args(["--transfer", &id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("transfer {id} is finished_success"))
            && err.contains("start a new one"),
        "stderr: {err}"
    );
    assert!(out.stdout.is_empty(), "no URI is printed");
}

/// SIGINT during an upload pauses it and names the id; `--transfer ID`
/// resumes it and nbdcopy completes it. stderr has one line per phase
/// change, naming the phase as the API does.
#[test]
fn sigint_pauses_and_transfer_id_resumes() {
    if !(have_tools() && support::require("nbdcopy")) {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let api = api_of(&setup);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_source(&src);
    let disk = api.new_disk("int1", "raw", SIZE);
    let log1 = dir.path().join("serve1.log");
    let mut bridge = serve_logged(
        &setup.engine.url,
        &setup.password_file,
        &dir.path().join("a.sock"),
        &log1,
        &["--disk", &disk],
    );
    let client = lingering_client(&bridge.first_line);
    bridge.signal(2);
    let status = bridge.wait_exit(Duration::from_secs(60));
    drop(client);
    assert!(!status.success(), "an interrupted upload exits non-zero");
    assert_eq!(
        api.phase_of_disk_transfer(&disk).as_deref(),
        Some("paused_user")
    );
    let id = api.transfer_of_disk(&disk).unwrap();
    let err = std::fs::read_to_string(&log1).unwrap();
    assert!(
        err.contains(&format!("--transfer {id}")),
        "the id to resume with is printed: {err}"
    );
    assert_eq!(count_lines(&err, "transfer transferring "), 1, "{err}");
    assert_eq!(count_lines(&err, "transfer paused_user "), 1, "{err}");

    let log2 = dir.path().join("serve2.log");
    let mut bridge = serve_logged(
        &setup.engine.url,
        &setup.password_file,
        &dir.path().join("b.sock"),
        &log2,
        &["--transfer", &id],
    );
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=2")
            .arg("--flush")
            .arg(&src)
            .arg(&bridge.first_line),
    );
    let status = bridge.wait_exit(Duration::from_secs(60));
    let err = std::fs::read_to_string(&log2).unwrap();
    assert!(status.success(), "resumed serve: {status}\n{err}");
    assert_eq!(api.phase(&id).as_deref(), Some("finished_success"));
    let image = setup.data.join("images").join(&disk);
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&src).unwrap(),
        "the disk holds exactly the source"
    );
    // (`resuming` may pass between two reads.)
    for phase in ["paused_user", "transferring", "finished_success"] {
        assert_eq!(
            count_lines(&err, &format!("transfer {phase} ")),
            1,
            "one line for {phase}:\n{err}"
        );
    }
}

#[test]
fn on_interrupt_cancel_cancels_the_upload() {
    if !have_tools() {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let api = api_of(&setup);
    let dir = tempfile::tempdir().unwrap();
    let disk = api.new_disk("int2", "raw", SIZE);
    let log = dir.path().join("serve.log");
    let mut bridge = serve_logged(
        &setup.engine.url,
        &setup.password_file,
        &dir.path().join("a.sock"),
        &log,
        &["--disk", &disk, "--on-interrupt", "cancel"],
    );
    let client = lingering_client(&bridge.first_line);
    bridge.signal(15);
    let status = bridge.wait_exit(Duration::from_secs(60));
    drop(client);
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(
        api.phase_of_disk_transfer(&disk).as_deref(),
        Some("finished_failure"),
    );
    assert_eq!(
        api.call("GET", &format!("/disks/{disk}"), "").0,
        404,
        "a cancelled upload removes its disk"
    );
}

/// A test CA and a server certificate for 127.0.0.1 it signed, as an
/// engine has them: (ca, cert, key). (A self-signed CA certificate cannot
/// serve as the server's own: rustls refuses a CA as end entity.)
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let csr = dir.join("cert.csr");
    let ext = dir.join("ext.cnf");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=nbdbridge test CA",
            ])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca),
    );
    run_ok(
        Command::new("openssl")
            .args(["req", "-subj", "/CN=127.0.0.1"])
            .args(ec)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-set_serial", "2"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert),
    );
    (ca, cert, key)
}

/// curl against the https engine; the body.
fn curl_api(ca: &Path, args: &[&str]) -> String {
    let out = run_ok(
        Command::new("curl")
            .args(["-s", "--fail-with-body", "--cacert"])
            .arg(ca)
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `serve --engine-url https://…` against `nbdbridge engine --tls-cert`:
/// with `--ca-file` (upload), with `--insecure` (download), and refused
/// without either.
#[test]
fn https_engine_with_ca_file_and_insecure() {
    if !(have_tools() && support::require("openssl") && support::require("curl")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(tmp.path());
    let imageio = support::engine::Imageio::start(&tmp.path().join("imageio"));
    let data = tmp.path().join("engine");
    let mut cmd = Command::new(bin());
    cmd.arg("engine")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--host", &imageio.host_arg("h1")])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key);
    let engine = Proc::start_announcing("nbdbridge engine (tls)", cmd);
    let url = engine.first_line.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let origin = url.trim_end_matches("/ovirt-engine/api");
    let pw_file = data.join("password");
    let pw = std::fs::read_to_string(&pw_file).unwrap();
    let login = curl_api(
        &ca,
        &[
            "-H",
            "Accept: application/json",
            "--data",
            &format!(
                "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password={}",
                pw.trim()
            ),
            &format!("{origin}/ovirt-engine/sso/oauth/token"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&login).unwrap();
    let token = v["access_token"].as_str().unwrap().to_string();
    let auth = format!("Authorization: Bearer {token}");
    let xml = curl_api(
        &ca,
        &[
            "-H",
            &auth,
            "-H",
            "Content-Type: application/xml",
            "-H",
            "Version: 4",
            "--data",
            &format!(
                "<disk><alias>tls</alias><format>raw</format>\
                 <provisioned_size>{SIZE}</provisioned_size></disk>"
            ),
            &format!("{url}/disks"),
        ],
    );
    let disk = first_id(&xml).unwrap().to_string();
    wait_until("disk ok", Duration::from_secs(30), || {
        let xml = curl_api(&ca, &["-H", &auth, &format!("{url}/disks/{disk}")]);
        element(&xml, "status") == Some("ok")
    });
    let src = tmp.path().join("src.raw");
    write_source(&src);
    let pw_path = pw_file.to_string_lossy().into_owned();

    // Neither --ca-file nor --insecure: the self-signed engine is refused.
    let out = Command::new(bin())
        .args(["serve", "--engine-url", &url, "--password-file", &pw_path])
        .arg("--socket")
        .arg(tmp.path().join("no.sock"))
        .args(["--disk", &disk])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "stderr: {err}");

    let ca_path = ca.to_string_lossy().into_owned();
    let mut up = serve_logged(
        &url,
        &pw_path,
        &tmp.path().join("up.sock"),
        &tmp.path().join("up.log"),
        &["--disk", &disk, "--ca-file", &ca_path],
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&up.first_line),
    );
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "upload over https: {status}");

    let mut down = serve_logged(
        &url,
        &pw_path,
        &tmp.path().join("down.sock"),
        &tmp.path().join("down.log"),
        &["--disk", &disk, "--direction", "download", "--insecure"],
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&down.first_line),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    let status = down.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "download over https: {status}");
}

/// An upload through `serve --disk` on an engine in `dir/engine` with
/// `imageio` as host `h1`, whose client wrote, flushed and vanished without
/// NBD_CMD_DISC: the transfer is `paused_user`, serve keeps listening.
struct Vanished {
    engine: support::engine::Engine,
    api: support::api::Api,
    disk: String,
    id: String,
    bridge: Proc,
    uri: String,
    log: PathBuf,
}

impl Vanished {
    fn start(dir: &Path, imageio: &support::engine::Imageio, name: &str) -> Vanished {
        let engine =
            support::engine::Engine::start(&dir.join("engine"), &[imageio.host_arg("h1")], &[]);
        let api = support::api::Api {
            url: engine.url.clone(),
            password_file: engine.password_file.to_string_lossy().into_owned(),
        };
        let disk = api.new_disk(name, "raw", SIZE);
        let log = dir.join("serve.log");
        let bridge = serve_logged(
            &api.url,
            &api.password_file,
            &dir.join("nbd.sock"),
            &log,
            &["--disk", &disk],
        );
        let uri = bridge.first_line.clone();
        let script = format!(
            "import nbd, os\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
             h.pwrite(b'x' * 65536, 0)\nh.flush()\nos._exit(0)\n"
        );
        run_ok(Command::new(support::SYSTEM_PYTHON).arg("-c").arg(&script));
        wait_until("paused_user", Duration::from_secs(30), || {
            api.phase_of_disk_transfer(&disk).as_deref() == Some("paused_user")
        });
        let id = api.transfer_of_disk(&disk).unwrap();
        Vanished {
            engine,
            api,
            disk,
            id,
            bridge,
            uri,
            log,
        }
    }
}

/// Stop `engine` and start it again on the same port and data dir
/// (`dir/engine`) with `host` as its only `--host`.
fn restart_engine(engine: support::engine::Engine, dir: &Path, host: &str) -> Proc {
    let port = engine
        .url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    drop(engine);
    let mut cmd = Command::new(bin());
    cmd.arg("engine")
        .arg("--data-dir")
        .arg(dir.join("engine"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--host", host]);
    Proc::start_announcing("nbdbridge engine (restarted)", cmd)
}

/// The engine restarts (same port) with host `h1` now served by another
/// imageio daemon: after the resume, the transfer's URL changed and the
/// bridge follows it; the first daemon is gone.
#[test]
fn after_a_resume_the_bridge_follows_a_new_data_url() {
    if !(have_tools() && support::require("nbdcopy")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let first = support::engine::Imageio::start(&tmp.path().join("imageio1"));
    let src = tmp.path().join("src.raw");
    write_source(&src);
    let Vanished {
        engine,
        api,
        disk,
        mut bridge,
        uri,
        log,
        ..
    } = Vanished::start(tmp.path(), &first, "moved");
    drop(first);
    let second = support::engine::Imageio::start(&tmp.path().join("imageio2"));
    let _engine = restart_engine(engine, tmp.path(), &second.host_arg("h1"));

    run_ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri));
    let status = bridge.wait_exit(Duration::from_secs(60));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "serve: {status}\n{err}");
    assert!(
        err.contains("the transfer moved to another data server"),
        "{err}"
    );
    assert!(
        err.contains(&second.data_url),
        "the new data URL is used: {err}"
    );
    assert_eq!(
        api.phase_of_disk_transfer(&disk).as_deref(),
        Some("finished_success")
    );
    let image = tmp.path().join("engine/images").join(&disk);
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&src).unwrap(),
        "the disk holds exactly the source"
    );
}

/// `serve --engine-url URL --password-file PW ARGS` that must fail: its
/// stderr (exit non-zero and no URI checked).
fn serve_fails(url: &str, password_file: &str, dir: &Path, args: &[&str]) -> String {
    let out = support::output_within(
        Command::new(bin())
            .arg("serve")
            .args(["--engine-url", url, "--password-file", password_file])
            .arg("--socket")
            .arg(dir.join("failing.sock"))
            .args(args),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve must fail:\n{err}");
    assert!(out.stdout.is_empty(), "no URI is printed:\n{err}");
    err
}

/// The line of `log` that says why serve failed (`nbdbridge: ...`).
fn failure_line(log: &str) -> &str {
    log.lines()
        .rev()
        .find(|l| l.starts_with("nbdbridge: "))
        .unwrap_or_else(|| panic!("no failure line in:\n{log}"))
}

#[test]
fn an_engine_that_is_down_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/ovirt-engine/api",
        support::closed_port()
    );
    let err = serve_fails(&url, &pw.to_string_lossy(), dir.path(), &["--disk", "d1"]);
    let line = failure_line(&err);
    assert!(
        line.contains(&format!("cannot log in to the engine at {url}"))
            && line.contains("Connection refused"),
        "{err}"
    );
}

/// A host whose data URL points at a closed port (its ticket control API
/// works): a new upload transfer cannot be served, so serve pauses it,
/// names the URL (ticket cut short) and how to resume, and exits 1; a new
/// download transfer is cancelled and its disk kept.
#[test]
fn a_new_transfer_whose_data_url_is_down_is_paused_and_named() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = support::engine::Imageio::start(&tmp.path().join("imageio"));
    let dead = format!("http://127.0.0.1:{}", support::closed_port());
    let host = format!("h1={},{dead}", imageio.control.display());
    let data = tmp.path().join("engine");
    let engine = support::engine::Engine::start(&data, &[host], &[]);
    let api = support::api::Api {
        url: engine.url.clone(),
        password_file: engine.password_file.to_string_lossy().into_owned(),
    };
    let disk = api.new_disk("dead", "raw", SIZE);

    let err = serve_fails(&api.url, &api.password_file, tmp.path(), &["--disk", &disk]);
    let id = api.transfer_of_disk(&disk).unwrap();
    assert_eq!(api.phase(&id).as_deref(), Some("paused_user"), "{err}");
    let line = failure_line(&err);
    assert!(
        line.contains(&format!(
            "cannot use the transfer's data server: {dead}/images/"
        )) && line.contains('…')
            && line.contains("Connection refused")
            && line.contains(&format!("--transfer {id}")),
        "{err}"
    );

    // (The paused upload keeps its disk locked: download another one.)
    let other = api.new_disk("dead2", "raw", SIZE);
    let err = serve_fails(
        &api.url,
        &api.password_file,
        tmp.path(),
        &["--disk", &other, "--direction", "download"],
    );
    let down = api.transfer_of_disk(&other).unwrap();
    let line = failure_line(&err);
    assert!(
        line.contains(&format!("{dead}/images/")) && line.contains("cancelled"),
        "{err}"
    );
    let phase = api.phase(&down).unwrap_or_default();
    assert!(
        phase.starts_with("finished_failure") || phase.starts_with("cancelled"),
        "{phase}"
    );
    assert_eq!(
        api.call("GET", &format!("/disks/{other}"), "").0,
        200,
        "a cancelled download keeps its disk"
    );
}

/// The engine restarts (same port) with host `h1`'s data URL now on a
/// closed port: when a client comes back, the resumed transfer cannot be
/// served, so serve pauses it again and exits 1 naming the new URL.
#[test]
fn after_a_resume_an_unreachable_data_url_pauses_again() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let imageio = support::engine::Imageio::start(&tmp.path().join("imageio"));
    let Vanished {
        engine,
        api,
        disk: _,
        id,
        mut bridge,
        uri,
        log,
    } = Vanished::start(tmp.path(), &imageio, "unreachable");
    let dead = format!("http://127.0.0.1:{}", support::closed_port());
    let host = format!("h1={},{dead}", imageio.control.display());
    let _engine = restart_engine(engine, tmp.path(), &host);

    // A client comes back: its read is held, then fails when serve gives up.
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         try:\n    h.pread(512, 0)\n    print('read')\nexcept nbd.Error as e:\n    print('failed', e)\n"
    );
    let client = support::output_within(
        Command::new(support::SYSTEM_PYTHON).arg("-c").arg(&script),
        Duration::from_secs(60),
    );
    let status = bridge.wait_exit(Duration::from_secs(60));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "serve gives up: {status}\n{err}");
    assert!(
        String::from_utf8_lossy(&client.stdout).starts_with("failed"),
        "the held read fails: {client:?}"
    );
    assert_eq!(api.phase(&id).as_deref(), Some("paused_user"), "{err}");
    let line = failure_line(&err);
    assert!(
        line.contains(&format!(
            "cannot use the transfer's data server: {dead}/images/"
        )) && line.contains(&format!("--transfer {id}")),
        "{err}"
    );
}

/// `--dirty-bitmap` with engine modes: refused with `--disk` (serve never
/// creates backup transfers); with `--transfer ID` of a plain download
/// (no dirty extents) a clear start-up error, the transfer left as it was.
#[test]
fn dirty_bitmap_needs_a_backup_transfer() {
    if !have_tools() {
        return;
    }
    let setup = Setup::start(&[], &[]);
    let api = api_of(&setup);
    let dir = tempfile::tempdir().unwrap();
    let disk = api.new_disk("nodirty", "raw", SIZE);
    let err = serve_fails(
        &setup.engine.url,
        &setup.password_file,
        dir.path(),
        &["--disk", &disk, "--dirty-bitmap", "b1"],
    );
    assert!(
        failure_line(&err)
            .contains("--dirty-bitmap b1 needs the download transfer of an incremental backup"),
        "{err}"
    );
    assert_eq!(api.transfer_of_disk(&disk), None, "no transfer was created");

    let id = api.new_transfer(&disk, "download", "raw");
    let err = serve_fails(
        &setup.engine.url,
        &setup.password_file,
        dir.path(),
        &["--transfer", &id, "--dirty-bitmap", "b1"],
    );
    let line = failure_line(&err);
    assert!(
        line.contains("no dirty extents for qemu:dirty-bitmap:b1")
            && line.contains("Ticket does not support dirty extents")
            && line.contains(&format!("transfer {id} is left transferring")),
        "{err}"
    );
    assert_eq!(api.phase(&id).as_deref(), Some("transferring"));
}
