//! The data server embedded in-process (how the engine uses it): start,
//! install a ticket through the Rust API, serve, shut down cleanly.

use crate::support;

use nbdbridge::imageio::{Config, DataServer, TicketSpec};
use support::imageio::curl;

#[test]
fn embedded_server_serves_and_stops() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.raw");
    std::fs::write(&img, support::pattern(1, 1 << 20)).unwrap();
    let control = dir.path().join("ctl.sock");
    let mut config = Config::new("127.0.0.1:0", &control);
    config.local_socket = Some(dir.path().join("local.sock"));
    let server = rt.block_on(DataServer::start(config)).unwrap();
    assert!(server.url().starts_with("http://127.0.0.1:") && server.url().ends_with("/images/"));
    assert_eq!(server.control_socket(), control);

    let spec = TicketSpec::parse(
        &serde_json::json!({
            "uuid": "embedded-ticket", "size": 1 << 20, "ops": ["read"], "timeout": 60,
            "url": format!("file://{}", img.display()),
        }),
        60,
    )
    .unwrap();
    server.tickets().add(spec);
    let r = curl(&["-r", "0-99", &format!("{}embedded-ticket", server.url())]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, support::pattern(1, 100));
    // The control socket sees the same ticket.
    let r = curl(&[
        "--unix-socket",
        control.to_str().unwrap(),
        "http://localhost/tickets/embedded-ticket",
    ]);
    assert_eq!(
        (r.status, r.json()["transferred"].as_u64()),
        (200, Some(100))
    );

    rt.block_on(server.shutdown());
    assert!(!control.exists(), "control socket left behind");
    assert!(!dir.path().join("local.sock").exists());
}
