//! One memory budget for all connections: many connections with big reads
//! in flight whose replies nobody reads hold at most the server's budget
//! (not a budget per connection), and once they go the server serves a
//! real client (nbdinfo) again. The server runs in this process so the
//! test can read the budget's high-water mark.

use crate::support;

use nbdbridge::backend::file::FileBackend;
use nbdbridge::nbd::{Export, Exports, Listener, Server, TransmissionConfig};
use nbdbridge::shutdown::Shutdown;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use support::nbd;

const MIB: u64 = 1024 * 1024;
const BUDGET: u64 = 64 * MIB;
const READ_LEN: u32 = 4 * MIB as u32;

/// A client that enters transmission with EXPORT_NAME and sends `count`
/// READs of READ_LEN, never reading a reply.
fn greedy_client(socket: &std::path::Path, count: u64) -> UnixStream {
    let mut c = UnixStream::connect(socket).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).expect("greeting");
    let mut b = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    b.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    b.extend_from_slice(&0u32.to_be_bytes()); // the default export
    c.write_all(&b).expect("EXPORT_NAME");
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).expect("EXPORT_NAME reply");
    for cookie in 0..count {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes()); // READ
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&((cookie % 4) * u64::from(READ_LEN)).to_be_bytes());
        r.extend_from_slice(&READ_LEN.to_be_bytes());
        c.write_all(&r).expect("READ");
    }
    c
}

#[test]
fn connections_share_one_budget() {
    if !support::require("nbdinfo") {
        return;
    }
    let img = nbd::make_image(&[(16 * MIB, nbd::Run::Data(5))]);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let shutdown = Shutdown::new();
    let server = {
        let _g = rt.enter();
        let backend = Arc::new(FileBackend::open(&img.path, true).expect("open image"));
        let export = Export::new("", None, backend);
        Arc::new(
            Server::new(Exports::single(export), shutdown.clone()).with_config(
                TransmissionConfig {
                    max_requests: 256,
                    max_bytes: BUDGET,
                },
            ),
        )
    };
    // The budget never goes below the largest single request (32 MiB).
    assert_eq!(server.budget().limit(), BUDGET);
    let listener = {
        let _g = rt.enter();
        Listener::unix(socket.clone()).expect("listen")
    };
    let serving = rt.spawn(Arc::clone(&server).serve(listener));

    // 8 connections × 32 reads × 4 MiB = 1 GiB asked for; each connection
    // alone could hold 128 MiB with a budget per connection.
    let greedy: Vec<UnixStream> = (0..8).map(|_| greedy_client(&socket, 32)).collect();
    let budget = server.budget().clone();
    support::wait_until(
        "the greedy clients to fill the budget",
        Duration::from_secs(30),
        || budget.in_use() + u64::from(READ_LEN) > BUDGET,
    );
    assert!(
        budget.peak() <= BUDGET,
        "{} bytes in flight, over the {BUDGET}-byte budget",
        budget.peak()
    );
    // Let them go: their shares come back, and a real client is served.
    drop(greedy);
    support::wait_until(
        "the budget to be given back",
        Duration::from_secs(30),
        || budget.in_use() == 0,
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    nbd::run_client(std::process::Command::new("nbdinfo").arg(&uri));
    assert!(budget.peak() <= BUDGET, "peak {}", budget.peak());

    shutdown.trigger();
    rt.block_on(serving).expect("server task");
}
