//! curl-level tests of the data and control APIs. `*_alike` tests run the
//! same requests against our server and the real ovirt-imageio daemon and
//! expect the same status codes and texts; `ours_*` tests cover where we
//! deliberately differ (HEAD, range clamping, stricter input checks) and
//! robustness (bad input never writes, the server keeps serving).

use crate::support;

use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;
use support::imageio::{Kind, Resp, Server, allocated, curl, have_venv, start, start_ours, ticket};
use support::pattern;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 8 * MIB;

fn image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let data = pattern(seed, size as usize);
    std::fs::write(path, &data).unwrap();
    data
}

/// A server with an 8 MiB data image, a read+write ticket "rw-ticket" and
/// a read-only ticket "ro-ticket" (transfer id "tr-ro").
fn setup(kind: Kind) -> (Server, Vec<u8>) {
    let s = start(kind);
    let img = s.path("img.raw");
    let data = image(&img, SIZE, 11);
    let mut rw = ticket("rw-ticket", &img, SIZE, &["read", "write"]);
    rw["transfer_id"] = "tr-rw".into();
    s.add_ticket(&rw);
    let mut ro = ticket("ro-ticket", &img, SIZE, &["read"]);
    ro["transfer_id"] = "tr-ro".into();
    s.add_ticket(&ro);
    (s, data)
}

fn get(url: &str, range: Option<&str>) -> Resp {
    match range {
        Some(r) => curl(&["-H", &format!("Range: {r}"), url]),
        None => curl(&[url]),
    }
}

fn put(url: &str, data: &[u8], headers: &[&str]) -> Resp {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("body");
    std::fs::write(&f, data).unwrap();
    let mut args = vec!["-X", "PUT", "--data-binary"];
    let at = format!("@{}", f.display());
    args.push(&at);
    for h in headers {
        args.push("-H");
        args.push(h);
    }
    args.push(url);
    curl(&args)
}

fn patch(url: &str, body: &str) -> Resp {
    curl(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        url,
    ])
}

fn data_api_alike(kind: Kind) {
    if !have_venv() {
        return;
    }
    let (s, data) = setup(kind);
    let rw = s.url("rw-ticket");
    let ro = s.url("ro-ticket");

    // Ranges.
    let r = get(&ro, Some("bytes=0-99"));
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 0-99/8388608"));
    assert_eq!(r.body, data[..100]);
    let r = get(&ro, Some("bytes=1048570-1048579"));
    assert_eq!((r.status, &r.body[..]), (206, &data[1048570..1048580]));
    let r = get(&ro, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("8388608"));
    assert!(r.body == data, "{kind:?}: whole GET differs");
    let r = get(&ro, Some("bytes=8388000-"));
    assert_eq!((r.status, r.body.len()), (206, 608));
    get(&ro, Some("bytes=-100")).assert_error(416, "suffix-byte-range-spec not supported yet");
    get(&ro, Some("bytes=0-1,5-6")).assert_error(
        416,
        "Cannot satisfy range 'bytes=0-1,5-6', invalid range or multiple ranges",
    );
    get(&ro, Some("items=0-5")).assert_error(
        416,
        "Cannot satisfy range 'items=0-5', invalid range or multiple ranges",
    );
    get(&ro, Some("bytes=10-5"))
        .assert_error(416, "Cannot satisfy range 'bytes=10-5', first > last");

    // PUT.
    let r = put(
        &rw,
        b"hello world!",
        &["Content-Range: bytes 8388600-8388611/*"],
    );
    r.assert_error(416, "Requested range out of allowed range");
    assert_eq!(r.header("content-range"), Some("bytes */8388608"));
    put(&rw, b"hello world!", &["Content-Range: 0-11"])
        .assert_error(400, "Invalid Content-Range '0-11'");
    put(&rw, b"hello world!", &["Content-Range: bytes 20-11/*"])
        .assert_error(400, "Invalid Content-Range 'bytes 20-11/*', first > last");
    put(&format!("{rw}?flush=maybe"), b"x", &[]).assert_error(
        400,
        "Unsupported value 'maybe' for 'flush', expecting one of ['n', 'y']",
    );
    put(&rw, b"chunked", &["Transfer-Encoding: chunked"])
        .assert_error(400, "Content-Length header is required");
    let r = put(
        &format!("{rw}?flush=n"),
        b"hello world!",
        &["Content-Range: bytes 300-311/*"],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&ro, Some("bytes=300-311")).body, b"hello world!");
    assert_eq!(patch(&rw, r#"{"op":"flush"}"#).status, 200);

    // PATCH.
    let r = patch(&rw, r#"{"op":"zero","offset":8388000,"size":4096}"#);
    r.assert_error(416, "Requested range out of allowed range");
    assert_eq!(r.header("content-range"), Some("bytes */8388608"));
    patch(&rw, r#"{"op":"zero","offset":0}"#)
        .assert_error(400, "Missing required value for 'size'");
    patch(&rw, r#"{"op":"zero","offset":-1,"size":1}"#).assert_error(400, "Invalid value -1 < 0");
    patch(&rw, r#"{"op":"zero","size":"4096"}"#).assert_error(400, "Integer required '4096'");
    patch(&rw, r#"{"op":"zero","size":4096,"flush":"y"}"#)
        .assert_error(400, "Boolean required 'y'");
    patch(&rw, r#"{"op":"trim"}"#).assert_error(
        400,
        "Unsupported value 'trim' for 'op', expecting one of ['flush', 'zero']",
    );
    patch(&rw, r#"{"size":1}"#).assert_error(400, "Missing required value for op");
    let r = patch(&rw, "{nope");
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Invalid JSON message"), "{}", r.text());
    let r = patch(
        &rw,
        r#"{"op":"zero","offset":4096,"size":8192,"flush":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        get(&ro, Some("bytes=4096-12287"))
            .body
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(get(&ro, Some("bytes=12288-12288")).body, data[12288..12289]);

    // Extents and checksum.
    let r = curl(&[&format!("{ro}/extents?context=foo")]);
    r.assert_error(
        400,
        "Unsupported value 'foo' for 'context', expecting one of ['dirty', 'zero']",
    );
    curl(&[&format!("{ro}/extents?context=dirty")])
        .assert_error(404, "Ticket does not support dirty extents");
    let r = curl(&[&format!("{ro}/extents")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()[0]["start"], 0);
    curl(&[&format!("{ro}/checksum?block_size=4096")])
        .assert_error(400, "Block size out of allowed range: 1048576-16777216");
    curl(&[&format!("{ro}/checksum?block_size=1048577")])
        .assert_error(400, "Block size is not aligned to 4096");
    let r = curl(&[&format!("{ro}/checksum?block_size=1048576")]);
    assert_eq!((r.status, &r.json()["block_size"]), (200, &json!(1048576)));
    let r = curl(&[&format!("{}any-id/checksum/algorithms", s.base)]);
    assert_eq!(r.status, 200);
    assert!(
        r.json()["algorithms"]
            .as_array()
            .unwrap()
            .contains(&json!("blake2b"))
    );

    // Authorization.
    let r = get(&s.url("nope"), None);
    r.assert_error(
        403,
        "You are not allowed to access this resource: No such ticket nope",
    );
    assert_eq!(r.header("connection"), Some("close"));
    put(&ro, b"x", &[]).assert_error(
        403,
        "You are not allowed to access this resource: Transfer=tr-ro forbids write",
    );
    patch(&ro, r#"{"op":"flush"}"#).assert_error(
        403,
        "You are not allowed to access this resource: Transfer=tr-ro forbids write",
    );
    assert_eq!(
        s.control("PATCH", "/tickets/ro-ticket", Some(r#"{"timeout":0}"#))
            .status,
        200
    );
    get(&ro, None).assert_error(
        403,
        "You are not allowed to access this resource: Transfer=tr-ro expired",
    );
    assert_eq!(
        s.control("PATCH", "/tickets/ro-ticket", Some(r#"{"timeout":300}"#))
            .status,
        200
    );
    assert_eq!(get(&ro, Some("bytes=0-0")).status, 206);

    // OPTIONS.
    let r = curl(&["-X", "OPTIONS", &s.url("*")]);
    assert_eq!(r.status, 200);
    let all = json!(["checksum", "extents", "flush", "zero"]);
    assert_eq!(r.json()["features"], all);
    assert_eq!(r.json()["unix_socket"], s.local.to_str().unwrap());
    let r = curl(&["-X", "OPTIONS", &rw]);
    assert_eq!(
        (r.status, r.header("allow")),
        (200, Some("OPTIONS,GET,PUT,PATCH"))
    );
    assert_eq!(r.json()["features"], all);
    let r = curl(&["-X", "OPTIONS", &ro]);
    assert_eq!((r.status, r.header("allow")), (200, Some("OPTIONS,GET")));
    assert_eq!(r.json()["features"], json!(["checksum", "extents"]));

    // Other paths. The local socket serves the same routes.
    let base = s.base.trim_end_matches("images/");
    let r = curl(&[&format!("{base}info/")]);
    assert_eq!((r.status, &r.json()["version"]), (200, &json!("2.5.1")));
    curl(&[&format!("{base}info")]).assert_error(404, "No handler for '/info'");
    curl(&[&format!("{base}foo")]).assert_error(404, "No handler for '/foo'");
    curl(&["-X", "PUT", "--data-binary", "x", &s.base]).assert_error(400, "Ticket id is required");
    let r = curl(&[
        "--unix-socket",
        s.local.to_str().unwrap(),
        "-r",
        "0-9",
        "http://localhost/images/ro-ticket",
    ]);
    assert_eq!((r.status, &r.body[..]), (206, &data[..10]));
}

#[test]
fn data_api_alike_ours() {
    data_api_alike(Kind::Ours);
}

#[test]
fn data_api_alike_daemon() {
    data_api_alike(Kind::Daemon);
}

fn control_api_alike(kind: Kind) {
    if !have_venv() {
        return;
    }
    let s = start(kind);
    let img = s.path("img.raw");
    image(&img, MIB, 3);
    let good = ticket("ctl-ticket", &img, MIB, &["write"]);
    let put_with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut t = good.clone();
        change(&mut t);
        s.control("PUT", "/tickets/ctl-ticket", Some(&t.to_string()))
    };
    s.control("PUT", "/tickets/", Some(&good.to_string()))
        .assert_error(400, "Ticket id is required");
    let r = s.control("PUT", "/tickets/ctl-ticket", Some("{not json"));
    assert_eq!(r.status, 400);
    assert!(
        r.text().starts_with("Ticket is not in a json format: "),
        "{}",
        r.text()
    );
    put_with(&|t| {
        t.as_object_mut().unwrap().remove("size");
    })
    .assert_error(
        400,
        "Invalid ticket: Required ticket parameter is missing: size",
    );
    put_with(&|t| t["size"] = "1".into()).assert_error(
        400,
        "Invalid ticket: Invalid value for 'size': '1': expecting a <class 'int'> value",
    );
    put_with(&|t| t["url"] = "ftp://x".into()).assert_error(
        400,
        "Invalid ticket: Invalid value for 'url': 'ftp://x': Unsupported url scheme: ftp",
    );
    put_with(&|t| t["sparse"] = "yes".into()).assert_error(
        400,
        "Invalid ticket: Invalid value for 'sparse': 'yes': expecting a <class 'bool'> value",
    );

    s.control("GET", "/tickets/nope", None)
        .assert_error(404, "No such ticket 'nope'");
    s.control("PATCH", "/tickets/nope", Some(r#"{"timeout":1}"#))
        .assert_error(404, "No such ticket: nope");
    assert_eq!(s.control("DELETE", "/tickets/nope", None).status, 204);

    s.add_ticket(&good);
    s.control("PATCH", "/tickets/ctl-ticket", Some("{}"))
        .assert_error(400, "Missing required value for 'timeout'");
    s.control("PATCH", "/tickets/ctl-ticket", Some(r#"{"timeout":-1}"#))
        .assert_error(400, "Invalid value -1 < 0");
    s.control("POST", "/tickets/ctl-ticket", Some("{}"))
        .assert_error(405, "Method 'POST' not defined for '/tickets/ctl-ticket'");

    // Status JSON: the same keys and values.
    let st = s.ticket_status("ctl-ticket");
    let mut keys: Vec<&str> = st.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "active",
            "canceled",
            "connections",
            "dirty",
            "expires",
            "idle_time",
            "inactivity_timeout",
            "ops",
            "size",
            "sparse",
            "timeout",
            "transfer_id",
            "transferred",
            "url",
            "uuid"
        ],
        "{kind:?}"
    );
    assert_eq!(st["transfer_id"], "(ticket/ctl-ticket)");
    assert_eq!(st["inactivity_timeout"], 60);
    assert_eq!(
        (st["transferred"].as_u64(), st["connections"].as_u64()),
        (Some(0), Some(0))
    );

    // Writes count; a connection bound to the ticket is counted while open.
    let r = put(
        &s.url("ctl-ticket"),
        &[1u8; 1000],
        &["Content-Range: bytes 100-1099/*"],
    );
    assert_eq!(r.status, 200);
    assert_eq!(s.ticket_status("ctl-ticket")["transferred"], 1000);

    // Re-PUT replaces; DELETE removes; DELETE /tickets/ removes all.
    let mut other = good.clone();
    other["uuid"] = "second-ticket".into();
    s.add_ticket(&other);
    assert_eq!(s.control("DELETE", "/tickets/ctl-ticket", None).status, 204);
    assert_eq!(s.control("GET", "/tickets/ctl-ticket", None).status, 404);
    assert_eq!(s.control("GET", "/tickets/second-ticket", None).status, 200);
    assert_eq!(s.control("DELETE", "/tickets/", None).status, 204);
    assert_eq!(s.control("GET", "/tickets/second-ticket", None).status, 404);
}

#[test]
fn control_api_alike_ours() {
    control_api_alike(Kind::Ours);
}

#[test]
fn control_api_alike_daemon() {
    control_api_alike(Kind::Daemon);
}

// ---- Ours only: deliberate differences and robustness. ----

/// Send raw bytes to `addr`, half-close, read the whole answer.
fn raw(server: &Server, request: &[u8]) -> String {
    let addr = server
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.write_all(request).unwrap();
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn ours_head_and_clamped_ranges() {
    let (s, data) = setup(Kind::Ours);
    let ro = s.url("ro-ticket");
    let r = curl(&["-I", &ro]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("8388608"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    // curl -I writes the headers as the "body": nothing may follow them.
    assert!(r.text().ends_with("\r\n\r\n"), "{:?}", r.text());
    let r = curl(&["-I", "-H", "Range: bytes=100-", &ro]);
    assert_eq!(
        (r.status, r.header("content-length")),
        (206, Some("8388508"))
    );

    // Last byte past the end: clamped (HTTP), not 416.
    let r = get(&ro, Some("bytes=8388000-9999999"));
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 8388000-8388607/8388608")
    );
    assert_eq!(r.body, data[8388000..]);
    // Start past the end stays 416.
    let r = get(&ro, Some("bytes=9000000-"));
    r.assert_error(416, "Requested range out of allowed range");
    assert_eq!(r.header("content-range"), Some("bytes */8388608"));
    get(&ro, Some("bytes=8388608-")).assert_error(416, "Requested range out of allowed range");

    // Ticket larger than the file: clamped to the file, total = ticket size.
    let img = s.path("img.raw");
    s.add_ticket(&ticket("big-ticket", &img, 2 * SIZE, &["read"]));
    let r = get(&s.url("big-ticket"), Some("bytes=8388600-8388700"));
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 8388600-8388607/16777216")
    );
    assert_eq!(r.body, data[8388600..]);
    get(&s.url("big-ticket"), Some("bytes=8388608-8388700")).assert_error(
        416,
        "Requested more bytes than available: 8388609 > 8388608",
    );
}

#[test]
fn ours_bad_input_writes_nothing_and_keeps_serving() {
    let (s, data) = setup(Kind::Ours);
    let img = s.path("img.raw");
    let rw = s.url("rw-ticket");

    // Huge Content-Length: refused before any body is read.
    let resp = raw(
        &s,
        b"PUT /images/rw-ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999999999\r\n\r\nabc",
    );
    assert!(resp.starts_with("HTTP/1.1 416"), "{resp}");
    assert!(
        resp.contains("Requested range out of allowed range"),
        "{resp}"
    );
    let resp = raw(
        &s,
        b"PUT /images/rw-ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nabc",
    );
    // hyper refuses an unparsable length itself.
    assert!(resp.starts_with("HTTP/1.1 4"), "{resp}");

    // A body shorter than its Content-Length.
    let resp = raw(
        &s,
        b"PUT /images/rw-ticket?flush=n HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(
        resp.contains("Requested 100 bytes, available 3 bytes"),
        "{resp}"
    );
    std::fs::write(&img, &data).unwrap();

    // Content-Range that disagrees with the body length.
    put(&rw, b"0123456789", &["Content-Range: bytes 0-99/*"]).assert_error(
        400,
        "Content-Range 'bytes 0-99/*' does not match Content-Length 10",
    );
    put(
        &rw,
        b"0123456789",
        &["Content-Range: bytes 99999999999999999999999-1/*"],
    )
    .assert_error(
        400,
        "Invalid Content-Range 'bytes 99999999999999999999999-1/*'",
    );
    get(&rw, Some("bytes=99999999999999999999999-")).assert_error(
        416,
        "Cannot satisfy range 'bytes=99999999999999999999999-', invalid range or multiple ranges",
    );
    patch(&rw, "[1]").assert_error(400, "Invalid JSON message: expecting an object");
    patch(&rw, &format!(r#"{{"op":"zero","size":{}}}"#, u64::MAX))
        .assert_error(416, "Requested range out of allowed range");
    let big = "x".repeat(100 * 1024);
    assert_eq!(patch(&rw, &big).status, 413);

    // Path tricks: ids and ticket URLs.
    let base = s.base.clone();
    curl(&["--path-as-is", &format!("{base}../tickets/rw-ticket")])
        .assert_error(404, "No handler for '/images/../tickets/rw-ticket'");
    curl(&["--path-as-is", &format!("{base}..")]).assert_error(400, "Invalid ticket id");
    curl(&[&format!("{base}rw%2Dticket")]).assert_error(400, "Invalid ticket id");
    curl(&[&format!("{base}rw-ticket/extents/x")])
        .assert_error(404, "No handler for '/images/rw-ticket/extents/x'");
    for (url, reason) in [
        (
            "file:///tmp/../etc/passwd",
            "Path may not contain '.' or '..' components",
        ),
        (
            "file://host/etc/passwd",
            "Expecting file:///absolute/path (no host)",
        ),
        ("file:etc/passwd", "Expecting file:///absolute/path"),
        (
            "file:///tmp/%2e%2e/x",
            "Path may not contain control characters, '%', '?' or '#'",
        ),
        (
            "nbd://localhost:10809/x",
            "Unsupported NBD URL: nbd://localhost:10809/x, expecting nbd:unix:/absolute/path[:exportname=NAME]",
        ),
        ("http://host/images/x", "Unsupported url scheme: http"),
    ] {
        let mut t = ticket("trick-ticket", &img, SIZE, &["read"]);
        t["url"] = url.into();
        s.control("PUT", "/tickets/trick-ticket", Some(&t.to_string()))
            .assert_error(
                400,
                &format!("Invalid ticket: Invalid value for 'url': '{url}': {reason}"),
            );
    }
    let mut t = ticket("../x", &img, SIZE, &["read"]);
    t["uuid"] = "../x".into();
    let r = s.control("PUT", "/tickets/x", Some(&t.to_string()));
    assert_eq!(r.status, 400, "{}", r.text());
    let mut t = ticket("typed", &img, SIZE, &["read"]);
    t["size"] = true.into();
    assert_eq!(
        s.control("PUT", "/tickets/typed", Some(&t.to_string()))
            .status,
        400
    );
    t["size"] = 1.5.into();
    assert_eq!(
        s.control("PUT", "/tickets/typed", Some(&t.to_string()))
            .status,
        400
    );
    t["size"] = SIZE.into();
    t["ops"] = json!(["delete"]);
    assert_eq!(
        s.control("PUT", "/tickets/typed", Some(&t.to_string()))
            .status,
        400
    );

    // A missing file behind a valid ticket: 500, no details.
    s.add_ticket(&ticket(
        "missing-file",
        &s.path("nothere.raw"),
        SIZE,
        &["read"],
    ));
    get(&s.url("missing-file"), None)
        .assert_error(500, "Server failed to perform the request, check logs");

    // Nothing was written, and the server still serves.
    assert!(
        std::fs::read(&img).unwrap() == data,
        "bad input changed the image"
    );
    let r = get(&rw, None);
    assert!(r.status == 200 && r.body == data);
}

#[test]
fn ours_concurrent_writers() {
    let (s, _) = setup(Kind::Ours);
    let rw = s.url("rw-ticket");
    let chunk = (SIZE / 4) as usize;
    let want = pattern(99, SIZE as usize);
    std::thread::scope(|scope| {
        for i in 0..4 {
            let (rw, want) = (&rw, &want);
            scope.spawn(move || {
                let part = &want[i * chunk..(i + 1) * chunk];
                let cr = format!(
                    "Content-Range: bytes {}-{}/*",
                    i * chunk,
                    (i + 1) * chunk - 1
                );
                let r = put(&format!("{rw}?flush=n"), part, &[&cr]);
                assert_eq!(r.status, 200, "{}", r.text());
            });
        }
    });
    assert_eq!(patch(&rw, r#"{"op":"flush"}"#).status, 200);
    assert!(std::fs::read(s.path("img.raw")).unwrap() == want);
}

#[test]
fn ours_sparse_zero_and_extents() {
    let s = start_ours();
    let img = s.path("sparse.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(4 * MIB).unwrap();
    drop(f);
    let mut t = ticket("sparse-ticket", &img, 4 * MIB, &["write"]);
    t["sparse"] = true.into();
    s.add_ticket(&t);
    let mut t = ticket("dense-ticket", &img, 4 * MIB, &["write"]);
    t["dirty"] = true.into();
    s.add_ticket(&t);
    let url = s.url("sparse-ticket");
    let r = put(
        &url,
        &vec![5u8; 2 * MIB as usize],
        &["Content-Range: bytes 1048576-3145727/*"],
    );
    assert_eq!(r.status, 200);
    let ext = curl(&[&format!("{url}/extents")]).json();
    assert_eq!(
        ext,
        json!([
            {"start": 0, "length": MIB, "zero": true, "hole": true},
            {"start": MIB, "length": 2 * MIB, "zero": false, "hole": false},
            {"start": 3 * MIB, "length": MIB, "zero": true, "hole": true},
        ])
    );
    // sparse=false allocates zeroes; sparse=true punches holes.
    assert_eq!(
        patch(
            &s.url("dense-ticket"),
            r#"{"op":"zero","offset":1048576,"size":1048576}"#
        )
        .status,
        200
    );
    assert!(allocated(&img) >= 2 * MIB);
    assert_eq!(
        patch(&url, r#"{"op":"zero","offset":1048576,"size":2097152}"#).status,
        200
    );
    assert_eq!(allocated(&img), 0);
    let ext = curl(&[&format!("{url}/extents")]).json();
    assert_eq!(
        ext,
        json!([{"start": 0, "length": 4 * MIB, "zero": true, "hole": true}])
    );
    // A dirty ticket on a file: everything is dirty.
    let ext = curl(&[&format!("{}/extents?context=dirty", s.url("dense-ticket"))]).json();
    assert_eq!(
        ext,
        json!([{"start": 0, "length": 4 * MIB, "dirty": true, "zero": false}])
    );
}

#[test]
fn ours_delete_waits_for_streaming_get() {
    let s = start_ours();
    let img = s.path("big.raw");
    let size = 256 * MIB;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    s.add_ticket(&ticket("slow-ticket", &img, size, &["read"]));
    let url = s.url("slow-ticket");
    let out = s.path("out");
    let mut slow = std::process::Command::new("curl")
        .args(["-s", "--limit-rate", "4M", "-o"])
        .arg(&out)
        .arg(&url)
        .spawn()
        .unwrap();
    support::wait_until("GET in flight", Duration::from_secs(10), || {
        s.ticket_status("slow-ticket")["active"] == true
    });
    let r = s.control("DELETE", "/tickets/slow-ticket", None);
    assert_eq!(r.status, 204);
    // The streaming client was cut off, not served the whole image.
    let status = slow.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(18),
        "curl should report a partial transfer"
    );
    assert!(std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) < size);
    get(&url, None).assert_error(
        403,
        "You are not allowed to access this resource: No such ticket slow-ticket",
    );
}

#[test]
fn ours_stops_on_sigterm() {
    let mut s = start_ours();
    assert!(s.control.exists() && s.local.exists());
    let status = s.terminate();
    assert!(status.success(), "{status}");
    assert!(
        !s.control.exists() && !s.local.exists(),
        "sockets left behind"
    );
}

/// A generic HTTP client: nbdkit's curl plugin (HEAD for the size, then
/// ranged GETs) reads an image through our server, and nbdcopy copies it
/// out bit-exact. The real daemon answers HEAD with 405, so this is ours
/// only.
#[test]
fn ours_serves_nbdkit_curl_plugin() {
    if !support::require("nbdkit") || !support::require("nbdcopy") {
        return;
    }
    let (s, data) = setup(Kind::Ours);
    let sock = s.path("nbd.sock");
    let out = s.path("copy.raw");
    let url = s.url("ro-ticket");
    support::run_ok(
        std::process::Command::new("nbdkit")
            .args(["-U"])
            .arg(&sock)
            .args(["--run", "nbdcopy \"$uri\" \"$OUT\"", "curl"])
            .arg(format!("url={url}"))
            .env("OUT", &out),
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdkit curl copy differs"
    );
}

/// A connection that used a ticket is closed after the ticket's
/// inactivity_timeout without traffic, like imageio.
#[test]
fn ours_closes_idle_connection_after_inactivity_timeout() {
    let s = start_ours();
    let img = s.path("img.raw");
    image(&img, MIB, 5);
    let mut t = ticket("idle-ticket", &img, MIB, &["read"]);
    t["inactivity_timeout"] = 1.into();
    s.add_ticket(&t);
    let addr = s
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sock.write_all(b"GET /images/idle-ticket HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n")
        .unwrap();
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    // Keep-alive: the server answers, then closes the idle socket (EOF).
    let n = sock.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
}

/// `connections` counts the HTTP connections that used a ticket, while
/// they are open; `active` is false between requests.
fn connections_alike(kind: Kind) {
    if !have_venv() {
        return;
    }
    let (s, data) = setup(kind);
    let addr = s
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sock.write_all(b"GET /images/ro-ticket HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n")
        .unwrap();
    // Read the whole response (headers + 10 bytes), keep the socket open.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(&data[..10]) {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "{kind:?}: closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let st = s.ticket_status("ro-ticket");
    assert_eq!(
        (st["connections"].as_u64(), &st["active"]),
        (Some(1), &json!(false)),
        "{kind:?}"
    );
    drop(sock);
    support::wait_until("connection released", Duration::from_secs(10), || {
        s.ticket_status("ro-ticket")["connections"] == 0
    });
}

#[test]
fn connections_alike_ours() {
    connections_alike(Kind::Ours);
}

#[test]
fn connections_alike_daemon() {
    connections_alike(Kind::Daemon);
}

/// DELETE while a PUT body is still arriving: the upload is refused with
/// 403 and the ticket goes away at once.
#[test]
fn ours_delete_cancels_stalled_put() {
    let (s, _) = setup(Kind::Ours);
    let addr = s
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Announce 1 MiB, send 1000 bytes, then stall.
    sock.write_all(b"PUT /images/rw-ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
        .unwrap();
    sock.write_all(&[9u8; 1000]).unwrap();
    support::wait_until("PUT in flight", Duration::from_secs(10), || {
        s.ticket_status("rw-ticket")["active"] == true
    });
    assert_eq!(s.control("DELETE", "/tickets/rw-ticket", None).status, 204);
    let mut got = Vec::new();
    let _ = sock.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("Transfer tr-rw was canceled"), "{text}");
    assert_eq!(s.control("GET", "/tickets/rw-ticket", None).status, 404);
}
