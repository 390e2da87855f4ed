//! Safe to expose (issue 10): what a stranger on the network can hold, and
//! a fragmented disk. Slowloris connections (a partial request head, then
//! nothing) on the data server and on the engine are closed at the header
//! deadline while real clients are served; past a connection cap, clients
//! wait and are served once others leave (data server, NBD listener); a
//! raw image of 10^5 alternating data/hole extents goes through `serve
//! --imageio-url` and comes out of `nbdinfo --map` and `qemu-img map`
//! exactly, within the command deadline. (The engine's private data dir
//! is tested in `src/engine/mod.rs`.)
//!
//! Loopback only, no sleeps: each wait is a socket read with a deadline or
//! a bounded poll.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use support::imageio::{curl, start_ours_with, ticket};
use support::{Proc, bin, nbd, output_within, require};

/// Longer than any header deadline a test sets, far shorter than the
/// idle timeout (60 s): a close before it is the header deadline's work.
const CLOSE_DEADLINE: Duration = Duration::from_secs(20);

/// `host:port` of an `http://host:port/...` URL.
fn host_port(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http URL");
    rest.split('/').next().expect("host").to_string()
}

/// A connection that sends the start of a request head and stalls.
fn slowloris(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /info/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("partial head");
    s.set_read_timeout(Some(CLOSE_DEADLINE)).expect("timeout");
    s
}

/// Whether the server closed `s` (EOF or reset) before the read deadline.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An answer (e.g. 408) before the close is fine.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn data_server_closes_slowloris_and_serves_real_clients() {
    if !require("curl") {
        return;
    }
    let server = start_ours_with(&["--header-timeout", "1", "--max-connections", "8"]);
    let addr = host_port(&server.base);
    let mut slow: Vec<TcpStream> = (0..4).map(|_| slowloris(&addr)).collect();
    // A real client is served meanwhile.
    let info = curl(&["--max-time", "10", &format!("http://{addr}/info/")]);
    assert_eq!(
        info.status, 200,
        "curl /info/ while slowloris connections wait"
    );
    for s in &mut slow {
        assert!(
            closed_by_server(s),
            "a stalled request head was not cut off"
        );
    }
    // And after.
    let info = curl(&["--max-time", "10", &format!("http://{addr}/info/")]);
    assert_eq!(info.status, 200);
}

#[test]
fn data_server_cap_holds_extra_clients_until_others_leave() {
    if !require("curl") {
        return;
    }
    let server = start_ours_with(&["--max-connections", "3"]);
    let addr = host_port(&server.base);
    let image = server.path("disk.raw");
    std::fs::write(&image, vec![7u8; 65536]).unwrap();
    server.add_ticket(&ticket("cap-ticket", &image, 65536, &["read"]));
    let url = server.url("cap-ticket");
    // Three idle connections take every slot.
    let holders: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Make sure all three were accepted: each answers a request.
    let mut holders: Vec<TcpStream> = holders
        .into_iter()
        .map(|mut s| {
            s.write_all(b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s.set_read_timeout(Some(CLOSE_DEADLINE)).unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).expect("answered");
            assert_eq!(&buf, b"HTTP/1.1 200");
            s
        })
        .collect();
    // A fourth client waits in the backlog: not served within its limit.
    let waiting = curl(&["--max-time", "2", "-r", "0-4095", &url]);
    assert_eq!(waiting.status, 0, "served past the cap");
    assert_eq!(waiting.exit, 28, "curl timed out (exit 28)");
    // Others leave: a real client is served.
    holders.clear();
    let served = curl(&["--max-time", "20", "-r", "0-4095", &url]);
    assert_eq!(served.status, 206);
    assert_eq!(served.body, vec![7u8; 4096]);
}

#[test]
fn engine_closes_slowloris_and_serves_the_login() {
    if !require("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine =
        support::engine::Engine::start(&dir.path().join("engine"), &[], &["--header-timeout", "1"]);
    let addr = host_port(&engine.url);
    let mut slow: Vec<TcpStream> = (0..4).map(|_| slowloris(&addr)).collect();
    let (status, _, body) = support::engine::login(&engine.url, &engine.password());
    assert_eq!(status, 200, "{body}");
    for s in &mut slow {
        assert!(
            closed_by_server(s),
            "a stalled request head was not cut off"
        );
    }
    let (status, _, body) = support::engine::login(&engine.url, &engine.password());
    assert_eq!(status, 200, "{body}");
}

/// Read the NBD greeting's magic (`NBDMAGIC`) within `deadline`; false
/// when nothing came.
fn greeted(s: &mut TcpStream, deadline: Duration) -> bool {
    s.set_read_timeout(Some(deadline)).unwrap();
    let mut magic = [0u8; 8];
    match s.read_exact(&mut magic) {
        Ok(()) => {
            assert_eq!(&magic, b"NBDMAGIC");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn nbd_max_connections_holds_extra_clients_in_the_backlog() {
    if !require("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = Command::new(bin());
    // No handshake limit: the two holders stay in the handshake.
    cmd.arg("serve").arg("--file").arg(&image).args([
        "--listen",
        "127.0.0.1:0",
        "--max-connections",
        "2",
        "--handshake-limit",
        "0",
    ]);
    let mut bridge = Proc::start_announcing("nbdbridge serve --max-connections", cmd);
    let uri = bridge.first_line.clone();
    let addr = uri
        .strip_prefix("nbd://")
        .and_then(|r| r.split('/').next())
        .expect("nbd://HOST:PORT/")
        .to_string();
    let mut a = TcpStream::connect(&addr).unwrap();
    let mut b = TcpStream::connect(&addr).unwrap();
    assert!(greeted(&mut a, CLOSE_DEADLINE));
    assert!(greeted(&mut b, CLOSE_DEADLINE));
    // The third waits in the backlog, as with qemu-nbd -e 2.
    let mut c = TcpStream::connect(&addr).unwrap();
    assert!(
        !greeted(&mut c, Duration::from_secs(1)),
        "served past the cap"
    );
    drop(a);
    assert!(greeted(&mut c, CLOSE_DEADLINE), "served once a client left");
    drop((b, c));
    // A real client is served too.
    let size = output_within(
        Command::new("nbdinfo").arg("--size").arg(&uri),
        Duration::from_secs(30),
    );
    assert!(size.status.success(), "{size:?}");
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "1048576");
    bridge.signal(15);
    assert!(bridge.wait_exit(Duration::from_secs(30)).success());
}

/// Data extents of 4 KiB every 8 KiB: `pairs` data and `pairs` holes.
fn fragmented_image(path: &std::path::Path, pairs: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(pairs * 8192).unwrap();
    let block = vec![0xa5u8; 4096];
    for i in 0..pairs {
        f.write_all_at(&block, i * 8192).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn a_fragmented_image_maps_exactly_through_serve() {
    if !(require("nbdinfo") && require("qemu-img")) {
        return;
    }
    const PAIRS: u64 = 50_000; // 10^5 extents
    let server = start_ours_with(&[]);
    let image = server.path("frag.raw");
    fragmented_image(&image, PAIRS);
    let size = PAIRS * 8192;
    server.add_ticket(&ticket("frag-ticket", &image, size, &["read"]));
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--imageio-url")
        .arg(server.url("frag-ticket"))
        .arg("--read-only")
        .arg("--socket")
        .arg(server.path("nbd.sock"));
    let mut bridge = Proc::start_announcing("nbdbridge serve (fragmented)", cmd);
    let uri = bridge.first_line.clone();
    // What the filesystem keeps: 10^5 extents where 4 KiB holes exist.
    let want = nbd::file_extents(&image);
    assert!(
        want.len() as u64 >= PAIRS,
        "the filesystem merged the holes: {} extents",
        want.len()
    );

    let map = output_within(
        Command::new("nbdinfo").arg("--map").arg(&uri),
        Duration::from_secs(120),
    );
    assert!(map.status.success(), "{map:?}");
    let text = String::from_utf8_lossy(&map.stdout);
    let rows: Vec<(u64, u64, u32)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), want.len(), "one row per extent");
    for (i, (&(offset, len, ty), &(w_offset, w_len, w_data))) in
        rows.iter().zip(want.iter()).enumerate()
    {
        assert_eq!((offset, len), (w_offset, w_len), "extent {i}");
        // 0: data; 3: hole, reads as zero.
        assert_eq!(ty, if w_data { 0 } else { 3 }, "extent {i}");
    }

    let qmap = output_within(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&uri),
        Duration::from_secs(120),
    );
    assert!(qmap.status.success(), "{qmap:?}");
    let json: serde_json::Value = serde_json::from_slice(&qmap.stdout).unwrap();
    let list = json.as_array().expect("a list");
    assert_eq!(list.len(), want.len());
    for (i, (e, &(w_offset, _, w_data))) in list.iter().zip(want.iter()).enumerate() {
        assert_eq!(e["start"], w_offset, "extent {i}");
        assert_eq!(e["data"], w_data, "extent {i}");
    }
    bridge.signal(15);
    assert!(bridge.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn wrapping_numbers_in_headers_and_tickets_are_refused_or_saturated() {
    if !require("curl") {
        return;
    }
    let server = start_ours_with(&[]);
    let image = server.path("disk.raw");
    std::fs::write(&image, vec![5u8; 65536]).unwrap();
    let max = u64::MAX;
    // A ticket whose timeout and inactivity timeout are near u64::MAX is
    // taken, and neither expires it nor cuts its connections short.
    let mut t = ticket("wrap-ticket", &image, 65536, &["read", "write"]);
    t["timeout"] = serde_json::json!(max);
    t["inactivity_timeout"] = serde_json::json!(max);
    server.add_ticket(&t);
    assert_eq!(server.ticket_status("wrap-ticket")["expires"], max);
    let url = server.url("wrap-ticket");
    // A Content-Range whose length passes u64: 400, nothing written.
    let body = server.path("one-byte");
    std::fs::write(&body, b"x").unwrap();
    let wrapped = format!("Content-Range: bytes 0-{max}/*");
    for range in [
        wrapped.as_str(),
        "Content-Range: bytes 18446744073709551615-18446744073709551615/*",
    ] {
        let put = curl(&[
            "-X",
            "PUT",
            "-H",
            range,
            "--data-binary",
            &format!("@{}", body.display()),
            &url,
        ]);
        assert!(
            put.status == 400 || put.status == 416,
            "{range}: {} {}",
            put.status,
            put.text()
        );
    }
    // A Range past the end of u64.
    let get = curl(&["-r", &format!("{max}-{max}"), &url]);
    assert_eq!(get.status, 416, "{}", get.text());
    // The server and the image are untouched.
    let read = curl(&["-r", "0-65535", &url]);
    assert_eq!(read.status, 206);
    assert_eq!(read.body, vec![5u8; 65536]);
}
