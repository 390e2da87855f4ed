//! NBD over TLS (NBD_OPT_STARTTLS) with the real clients: qemu-img with
//! tls-creds-x509, nbdinfo / nbdcopy with `nbds://` URIs, libnbd's Python
//! binding; plaintext refused under `--tls require`, a wrong CA refused,
//! client certificates with `--tls-verify-peer`. Certificates are made by
//! `openssl` per test (support/tls.rs).

use crate::support;

use std::path::Path;
use std::process::{Command, Output};
use support::nbd::{self, Endpoint, Run, ServeOpts, Server};
use support::require;
use support::tls::Certs;

const MIB: u64 = 1024 * 1024;

fn ready() -> bool {
    // TLS is ours to test: qemu-nbd takes TLS through --object, not our flags.
    nbd::ours()
        && require("openssl")
        && require("nbdinfo")
        && require("nbdcopy")
        && require("qemu-img")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn layout() -> Vec<(u64, Run)> {
    vec![
        (MIB, Run::Data(71)),
        (2 * MIB, Run::Hole),
        (MIB, Run::Data(72)),
    ]
}

/// Serve `image` with `--tls MODE --tls-certificates SERVER` (+ `extra`).
fn serve_tls(image: &Path, certs: &Certs, mode: &str, tcp: bool, extra: &[&str]) -> Server {
    let mut args = vec![
        "--tls".to_string(),
        mode.to_string(),
        "--tls-certificates".to_string(),
        s(&certs.server).to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let opts = ServeOpts {
        tcp,
        args,
        ..ServeOpts::default()
    };
    nbd::serve_file(image, &opts)
}

/// `URI` plus a query parameter (URIs without a query get `?`).
fn with_query(uri: &str, param: &str) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{param}")
}

fn certs_uri(uri: &str, dir: &Path) -> String {
    with_query(uri, &format!("tls-certificates={}", s(dir)))
}

fn nbdinfo_any(uri: &str) -> Output {
    nbd::run_client_any(Command::new("nbdinfo").arg(uri))
}

fn assert_refused(out: &Output, what: &str, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} was served:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: expected an error mentioning {needle:?}, got: {err}"
    );
}

fn tcp_port(server: &Server) -> String {
    match &server.endpoint {
        Endpoint::Tcp(a) => a.rsplit_once(':').expect("host:port").1.to_string(),
        Endpoint::Unix(_) => panic!("not TCP"),
    }
}

#[test]
fn require_over_tcp_serves_nbdinfo_nbdcopy_and_qemu_img() {
    if !ready() {
        return;
    }
    let certs = Certs::make();
    let img = nbd::make_image(&layout());
    let server = serve_tls(&img.path, &certs, "require", true, &[]);
    assert!(
        server.uri.starts_with("nbds://127.0.0.1:"),
        "the URI must ask for TLS: {}",
        server.uri
    );
    let uri = certs_uri(&server.uri, &certs.client);

    // nbdinfo over TLS.
    let out = nbd::run_client(Command::new("nbdinfo").args(["--json", &uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json");
    assert_eq!(v["exports"][0]["export-size"], 4 * MIB, "{v}");

    // nbdcopy download, bit-exact.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("copy.img");
    nbd::run_client(Command::new("nbdcopy").args([&uri, s(&copy)]));
    nbd::assert_same_bytes(&img.path, &copy);

    // qemu-img upload over TLS (x509 creds in the client's dir), then info.
    let src = nbd::make_image(&[(4 * MIB, Run::Data(73))]);
    let port = tcp_port(&server);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        s(&certs.client)
    );
    let target = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"
    );
    nbd::run_client(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "--object",
        &object,
        "--target-image-opts",
        s(&src.path),
        &target,
    ]));
    let out = nbd::run_client(Command::new("qemu-img").args([
        "info",
        "--object",
        &object,
        "--image-opts",
        &target,
    ]));
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    server.stop();
    nbd::assert_same_bytes(&src.path, &img.path);
}

#[test]
fn require_refuses_plaintext_and_strangers() {
    if !ready() {
        return;
    }
    let certs = Certs::make();
    let img = nbd::make_image(&layout());
    let server = serve_tls(&img.path, &certs, "require", true, &[]);
    let plain = server.uri.replacen("nbds://", "nbd://", 1);

    // A plaintext client is refused. The reply is NBD_REP_ERR_TLS_REQD
    // (nbd_raw checks the bytes); libnbd reports it as ENOTSUP on opt_go.
    let out = nbdinfo_any(&plain);
    assert_refused(&out, "plaintext nbdinfo", "opt_go");
    // qemu-img without TLS creds: the same.
    let port = tcp_port(&server);
    let out = nbd::run_client_any(Command::new("qemu-img").args([
        "info",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk"
        ),
    ]));
    assert_refused(&out, "plaintext qemu-img", "TLS");
    // A client that trusts another CA does not accept our server.
    let out = nbdinfo_any(&certs_uri(&server.uri, &certs.wrong_ca));
    assert_refused(&out, "nbdinfo trusting another CA", "certificate");
    // The server goes on serving good clients.
    nbd::run_client(Command::new("nbdinfo").arg(certs_uri(&server.uri, &certs.client)));
    server.stop();
}

#[test]
fn verify_peer_needs_a_client_certificate_from_the_ca() {
    if !ready() {
        return;
    }
    let certs = Certs::make();
    let img = nbd::make_image(&layout());
    let server = serve_tls(&img.path, &certs, "require", true, &["--tls-verify-peer"]);
    // With a client certificate signed by the CA: served.
    nbd::run_client(Command::new("nbdinfo").arg(certs_uri(&server.uri, &certs.client)));
    // Without one: refused.
    let out = nbdinfo_any(&certs_uri(&server.uri, &certs.anonymous));
    assert!(
        !out.status.success(),
        "a client without a certificate was served"
    );
    // With a certificate from another CA (and trusting ours): refused.
    let stranger = tempfile::tempdir().expect("tempdir");
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(certs.wrong_ca.join(f), stranger.path().join(f)).expect("copy");
    }
    std::fs::copy(
        certs.client.join("ca-cert.pem"),
        stranger.path().join("ca-cert.pem"),
    )
    .expect("copy");
    let out = nbdinfo_any(&certs_uri(&server.uri, stranger.path()));
    assert!(
        !out.status.success(),
        "a client certificate from another CA was accepted"
    );
    // qemu-img with the client certificate in its creds dir: served.
    let port = tcp_port(&server);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        s(&certs.client)
    );
    nbd::run_client(Command::new("qemu-img").args([
        "info",
        "--object",
        &object,
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"
        ),
    ]));
    server.stop();
}

#[test]
fn unix_socket_with_libnbd_python_and_nbdcopy() {
    if !ready() {
        return;
    }
    let certs = Certs::make();
    let img = nbd::make_image(&layout());
    let server = serve_tls(&img.path, &certs, "require", false, &[]);
    assert!(
        server.uri.starts_with("nbds+unix:///disk?socket="),
        "{}",
        server.uri
    );
    let Endpoint::Unix(socket) = &server.endpoint else {
        panic!("not a unix socket")
    };
    // libnbd's binding: TLS_REQUIRE with the certificates dir, then I/O.
    nbd::run_python("tls.py", &[s(socket), s(&certs.client), s(&img.path)]);
    // nbdcopy upload over nbds+unix.
    let src = nbd::make_image(&[(4 * MIB, Run::Data(74))]);
    nbd::run_client(
        Command::new("nbdcopy").args([s(&src.path), &certs_uri(&server.uri, &certs.client)]),
    );
    server.stop();
    nbd::assert_same_bytes(&src.path, &img.path);
}

#[test]
fn on_serves_both_plaintext_and_tls() {
    if !ready() {
        return;
    }
    let certs = Certs::make();
    let img = nbd::make_image(&layout());
    let server = serve_tls(&img.path, &certs, "on", true, &[]);
    assert!(server.uri.starts_with("nbds://"), "{}", server.uri);
    let plain = server.uri.replacen("nbds://", "nbd://", 1);
    nbd::run_client(Command::new("nbdinfo").arg(&plain));
    nbd::run_client(Command::new("nbdinfo").arg(certs_uri(&server.uri, &certs.client)));
    server.stop();
}
