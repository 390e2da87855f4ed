//! The engine's HTTP surface without the SDK: SSO, bearer tokens, faults,
//! body limits, double slashes, and the system phases against a host whose
//! data server is not running. Needs nothing but our binary.

use crate::support;

use std::time::Duration;
use support::engine::{Engine, element, first_id, http, login};
use support::wait_until;

const XML: &str = "application/xml";
const FORM: &str = "application/x-www-form-urlencoded";

fn phase_of(url: &str, token: &str, id: &str) -> String {
    let (status, _, body) = http(
        url,
        "GET",
        &format!("/ovirt-engine/api/imagetransfers/{id}"),
        Some(token),
        XML,
        b"",
    );
    assert_eq!(status, 200, "{body}");
    element(&body, "phase").unwrap().to_string()
}

#[test]
fn http_surface_and_system_phases() {
    let tmp = tempfile::tempdir().unwrap();
    let down = format!(
        "down={},http://127.0.0.1:9",
        tmp.path().join("no-such.sock").display()
    );
    let data = tmp.path().join("engine");
    let engine = Engine::start(&data, &[down], &[]);
    let url = engine.url.clone();
    let password = engine.password();
    let mode = std::fs::metadata(&engine.password_file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // SSO: wrong password -> JSON error; right one -> token.
    let (_, ctype, body) = login(&url, "wrong");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert!(
        body.contains("\"error\"") && body.contains("access_denied"),
        "{body}"
    );
    let (status, ctype, body) = login(&url, &password);
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = json["access_token"].as_str().unwrap().to_string();
    let tok = Some(token.as_str());

    // No or a bad token -> 401 with a fault.
    let (status, ctype, body) = http(&url, "GET", "/ovirt-engine/api/disks", None, XML, b"");
    assert_eq!(status, 401);
    assert!(ctype.starts_with("application/xml"), "{ctype}");
    assert!(body.contains("<fault>"), "{body}");
    let (status, _, _) = http(
        &url,
        "GET",
        "/ovirt-engine/api/disks",
        Some("nope"),
        XML,
        b"",
    );
    assert_eq!(status, 401);

    // Add a disk; double slashes are tolerated.
    let disk = b"<disk>\n  <format>raw</format>\n  <name>h</name>\n  <provisioned_size>1048576</provisioned_size>\n</disk>\n";
    let (status, _, body) = http(&url, "POST", "/ovirt-engine/api//disks", tok, XML, disk);
    assert_eq!(status, 201, "{body}");
    let disk_id = first_id(&body).unwrap().to_string();
    assert_eq!(element(&body, "status"), Some("ok"));
    assert_eq!(
        std::fs::metadata(data.join("images").join(&disk_id))
            .unwrap()
            .len(),
        1048576
    );

    // Bad input -> 400 faults; oversized bodies -> 413; unknown -> 404.
    for (body, what) in [
        (&b"<image_transfer><disk id=\"x\">"[..], "Malformed"),
        (&b"<vm/>"[..], "Expected a &lt;image_transfer&gt;"),
        (&b"<image_transfer/>"[..], "disk id is missing"),
    ] {
        let (status, _, reply) = http(
            &url,
            "POST",
            "/ovirt-engine/api/imagetransfers",
            tok,
            XML,
            body,
        );
        assert_eq!(status, 400, "{reply}");
        assert!(reply.contains(what) && reply.contains("<fault>"), "{reply}");
    }
    let bad_dir = format!(
        "<image_transfer><direction>sideways</direction><disk id=\"{disk_id}\"/></image_transfer>"
    );
    let (status, _, reply) = http(
        &url,
        "POST",
        "/ovirt-engine/api/imagetransfers",
        tok,
        XML,
        bad_dir.as_bytes(),
    );
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("sideways"), "{reply}");
    let big = vec![b' '; 2 * 1024 * 1024];
    let (status, _, _) = http(
        &url,
        "POST",
        "/ovirt-engine/api/imagetransfers",
        tok,
        XML,
        &big,
    );
    assert_eq!(status, 413);
    let (status, _, reply) = http(&url, "GET", "/ovirt-engine/api/networks", tok, XML, b"");
    assert_eq!(status, 404, "{reply}");
    // VMs exist (for backups); none yet.
    let (status, _, reply) = http(&url, "GET", "/ovirt-engine/api/vms", tok, XML, b"");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply.trim(), "<vms></vms>", "{reply}");
    let (status, _, _) = http(&url, "PUT", "/ovirt-engine/api/disks", tok, XML, b"");
    assert_eq!(status, 405);

    // A transfer on a host whose data server is down: paused_system.
    // (The embedded data server is the default host: name the down one.)
    let add = format!(
        "<image_transfer>\n  <disk id=\"{disk_id}\"/>\n  <host><name>down</name></host>\n</image_transfer>\n"
    );
    let (status, _, body) = http(
        &url,
        "POST",
        "/ovirt-engine/api/imagetransfers",
        tok,
        XML,
        add.as_bytes(),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(element(&body, "phase"), Some("initializing"));
    assert!(!body.contains("transfer_url"), "{body}");
    let id = first_id(&body).unwrap().to_string();
    wait_until("paused_system", Duration::from_secs(20), || {
        phase_of(&url, &token, &id) == "paused_system"
    });
    let action = |name: &str| {
        http(
            &url,
            "POST",
            &format!("/ovirt-engine/api/imagetransfers/{id}/{name}"),
            tok,
            XML,
            b"<action/>\n",
        )
    };
    let (status, _, body) = action("frobnicate");
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = action("finalize");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("in phase paused_system"), "{body}");
    let (status, _, body) = action("resume");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("<action><status>complete</status></action>"),
        "{body}"
    );
    wait_until("paused_system again", Duration::from_secs(20), || {
        phase_of(&url, &token, &id) == "paused_system"
    });
    let (status, _, body) = action("cancel");
    assert_eq!(status, 200, "{body}");
    wait_until("finished_failure", Duration::from_secs(20), || {
        phase_of(&url, &token, &id) == "finished_failure"
    });
    let (status, _, _) = http(
        &url,
        "GET",
        &format!("/ovirt-engine/api/disks/{disk_id}"),
        tok,
        XML,
        b"",
    );
    assert_eq!(status, 404);
    assert!(!data.join("images").join(&disk_id).exists());
    let (status, _, body) = action("cancel");
    assert_eq!(status, 409, "{body}");

    // Logout revokes the token.
    let form = format!("scope=ovirt-app-api&token={token}");
    let (status, ctype, body) = http(
        &url,
        "POST",
        "/ovirt-engine/services/sso-logout",
        None,
        FORM,
        form.as_bytes(),
    );
    assert_eq!((status, body.as_str()), (200, "{}"));
    assert!(ctype.starts_with("application/json"));
    let (status, _, _) = http(&url, "GET", "/ovirt-engine/api/disks", tok, XML, b"");
    assert_eq!(status, 401);
}

#[test]
fn without_hosts_the_embedded_data_server_is_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = Engine::start(tmp.path(), &[], &[]);
    let token = engine.token();
    let token = token.as_str();
    let (status, _, hosts) = http(
        &engine.url,
        "GET",
        "/ovirt-engine/api/hosts",
        Some(token),
        XML,
        b"",
    );
    assert_eq!(status, 200, "{hosts}");
    assert_eq!(element(&hosts, "name"), Some("embedded"), "{hosts}");
    // A transfer with no host named goes to the embedded data server and
    // becomes transferring with a transfer_url on it.
    let disk_id = engine.add_disk(
        token,
        "<disk><alias>d</alias><format>raw</format><provisioned_size>1048576</provisioned_size></disk>",
    );
    wait_until("disk ok", Duration::from_secs(30), || {
        let (_, _, d) = http(
            &engine.url,
            "GET",
            &format!("/ovirt-engine/api/disks/{disk_id}"),
            Some(token),
            XML,
            b"",
        );
        element(&d, "status") == Some("ok")
    });
    let body = format!("<image_transfer><disk id=\"{disk_id}\"/></image_transfer>");
    let (status, _, t) = http(
        &engine.url,
        "POST",
        "/ovirt-engine/api/imagetransfers",
        Some(token),
        XML,
        body.as_bytes(),
    );
    assert_eq!(status, 201, "{t}");
    let id = first_id(&t).unwrap().to_string();
    wait_until("transferring", Duration::from_secs(30), || {
        phase_of(&engine.url, token, &id) == "transferring"
    });
    let transfer_url = |engine: &Engine, token: &str| {
        let (_, _, t) = http(
            &engine.url,
            "GET",
            &format!("/ovirt-engine/api/imagetransfers/{id}"),
            Some(token),
            XML,
            b"",
        );
        element(&t, "transfer_url").unwrap_or_default().to_string()
    };
    let before = transfer_url(&engine, token);
    assert!(before.starts_with("http://127.0.0.1:"), "{before}");

    // Killed and started again: the embedded data server comes back on the
    // same port, so the transfer_url clients hold still works.
    let mut engine = engine;
    engine.proc.signal(9);
    engine.proc.wait_exit(Duration::from_secs(10));
    let engine = Engine::start(tmp.path(), &[], &[]);
    let token = engine.token();
    assert_eq!(phase_of(&engine.url, &token, &id), "transferring");
    assert_eq!(transfer_url(&engine, &token), before);
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "OPTIONS",
        ])
        .arg(&before)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "OPTIONS {before}"
    );
}

#[test]
fn password_file_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "s3cret&more\n").unwrap();
    let down = format!(
        "down={},http://127.0.0.1:9",
        tmp.path().join("x.sock").display()
    );
    let data = tmp.path().join("engine");
    let engine = Engine::start(&data, &[down], &["--password-file", &pw.to_string_lossy()]);
    let (status, _, body) = login(&engine.url, "s3cret%26more");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("access_token"), "{body}");
    let (status, _, _) = login(&engine.url, "s3cret");
    assert_eq!(status, 401);
    assert!(!data.join("password").exists());
    // One engine per data dir.
    let out = std::process::Command::new(support::bin())
        .args([
            "engine",
            "--listen",
            "127.0.0.1:0",
            "--host",
            "x=/s,http://h",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another engine is using"), "{err}");
}
