//! Write coalescing in `nbdbridge serve --imageio-url`: real NBD clients
//! (qemu-img, nbdcopy, libnbd's Python binding) writing many small
//! requests, FUA, FLUSH and overwrites, against our data server and the
//! real ovirt-imageio daemon (an nbd ticket over `qemu-nbd -f raw -e 8 -t`,
//! the production path), compared byte for byte; and a PUT failed by a
//! fault-injecting proxy in front of the real daemon fails exactly the NBD
//! writes it carried.

use crate::support::imageio::{Kind, Server, have_venv, nbd_ticket, start, ticket};
use crate::support::{
    Proc, START_DEADLINE, SYSTEM_PYTHON, bin, pattern, repo, require, run_ok, wait_until,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 16 << 20;

fn have_clients() -> bool {
    require("qemu-img") && require("nbdcopy") && require("qemu-nbd") && require(SYSTEM_PYTHON)
}

/// The image behind a ticket, and what serves it.
struct Target {
    image: PathBuf,
    _qemu_nbd: Option<Proc>,
}

/// A writable ticket `id` of SIZE bytes on `server`: a plain file for ours,
/// an nbd ticket over `qemu-nbd -f raw -e 8 -t` for the real daemon.
fn writable_ticket(server: &Server, id: &str) -> Target {
    let image = server.path(&format!("{id}.raw"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let ops = ["read", "write"];
    if server.kind == Kind::Ours {
        server.add_ticket(&ticket(id, &image, SIZE, &ops));
        return Target {
            image,
            _qemu_nbd: None,
        };
    }
    let socket = server.path(&format!("{id}.nbd.sock"));
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-e", "8", "-t"])
        .arg(format!("--socket={}", socket.display()))
        .arg(&image);
    let proc = Proc::start("qemu-nbd", cmd);
    wait_until("qemu-nbd listening", START_DEADLINE, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let url = format!("nbd:unix:{}", socket.display());
    server.add_ticket(&nbd_ticket(id, &url, SIZE, &ops));
    Target {
        image,
        _qemu_nbd: Some(proc),
    }
}

fn serve(url: &str, socket: &Path) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--imageio-url")
        .arg(url)
        .arg("--socket")
        .arg(socket);
    Proc::start_announcing("nbdbridge serve --imageio-url", cmd)
}

fn stop(mut bridge: Proc, kind: Kind) {
    bridge.signal(15);
    let status = bridge.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{kind:?}: serve exit {status}");
}

fn same_bytes(kind: Kind, what: &str, a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{kind:?} {what}: sizes");
    if let Some(i) = (0..x.len()).find(|&i| x[i] != y[i]) {
        panic!("{kind:?} {what}: first difference at byte {i}");
    }
}

fn clients_write_exactly(kind: Kind) {
    let server = start(kind);
    let target = writable_ticket(&server, "tkt-co");
    let bridge = serve(&server.url("tkt-co"), &server.path("nbd.sock"));
    let uri = bridge.first_line.clone();

    // qemu-img: out-of-order parallel writes.
    let mut data = pattern(11, SIZE as usize);
    data[(5 << 20)..(6 << 20)].fill(0);
    let src = server.path("src.raw");
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&target.image),
    );
    same_bytes(kind, "qemu-img convert", &src, &target.image);

    // nbdcopy with small requests (gathered) over two connections, then
    // with its defaults.
    for (seed, flags) in [
        (
            12,
            vec!["--request-size=65536", "--connections=2", "--flush"],
        ),
        (13, vec![]),
    ] {
        std::fs::write(&src, pattern(seed, SIZE as usize)).unwrap();
        run_ok(Command::new("nbdcopy").args(&flags).arg(&src).arg(&uri));
        same_bytes(kind, &format!("nbdcopy {flags:?}"), &src, &target.image);
    }

    // libnbd: FUA, FLUSH, overwrites, unaligned chains, zeroes, two
    // connections meeting; read back over NBD, then the image itself.
    let model = server.path("model.raw");
    let out = run_ok(
        Command::new(SYSTEM_PYTHON)
            .arg(repo().join("tests/python/coalesce_mix.py"))
            .arg(&uri)
            .arg(SIZE.to_string())
            .arg(&model),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    stop(bridge, kind);
    same_bytes(kind, "libnbd mix", &model, &target.image);
}

#[test]
fn clients_write_exactly_through_our_data_server() {
    if !have_clients() {
        return;
    }
    clients_write_exactly(Kind::Ours);
}

#[test]
fn clients_write_exactly_through_the_real_daemon() {
    if !(have_venv() && have_clients()) {
        return;
    }
    clients_write_exactly(Kind::Daemon);
}

/// An HTTP/1.1 proxy in front of a data server that answers the first PUT
/// of at least `fail_len` bytes (a gathered one) with 500 itself (never forwarding it), and hides the server's unix
/// socket from OPTIONS so the bridge keeps talking through the proxy.
struct FaultProxy {
    port: u16,
    puts: Arc<AtomicUsize>,
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    fn start(upstream: u16, fail_len: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let puts = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, f, s) = (puts.clone(), failed.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (p, f) = (p.clone(), f.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, upstream, fail_len, &p, &f);
                });
            }
        });
        FaultProxy {
            port,
            puts,
            failed,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Read one HTTP message head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<(String, u64)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    Ok(Some((head, len)))
}

fn relay(
    client: TcpStream,
    upstream: u16,
    fail_len: u64,
    puts: &AtomicUsize,
    failed: &Mutex<Option<String>>,
) -> std::io::Result<()> {
    let up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut up_r = BufReader::new(up.try_clone()?);
    let mut up_w = up;
    let mut client_w = client.try_clone()?;
    let mut client_r = BufReader::new(client);
    while let Some((head, len)) = read_head(&mut client_r)? {
        let mut body = vec![0; len as usize];
        client_r.read_exact(&mut body)?;
        let method = head.split(' ').next().unwrap_or("").to_string();
        let put = method == "PUT";
        if put {
            puts.fetch_add(1, Ordering::SeqCst);
        }
        if put && len >= fail_len && failed.lock().unwrap().is_none() {
            let range = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-range")
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            *failed.lock().unwrap() = Some(range);
            let msg = "injected failure";
            write!(
                client_w,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{msg}",
                msg.len()
            )?;
            continue;
        }
        up_w.write_all(head.as_bytes())?;
        up_w.write_all(&body)?;
        let Some((rhead, rlen)) = read_head(&mut up_r)? else {
            return Ok(());
        };
        let mut rbody = vec![0; if method == "HEAD" { 0 } else { rlen as usize }];
        up_r.read_exact(&mut rbody)?;
        if method == "OPTIONS" {
            let text =
                String::from_utf8_lossy(&rbody).replace("\"unix_socket\"", "\"unix_hidden\"");
            rbody = text.into_bytes();
        }
        client_w.write_all(rhead.as_bytes())?;
        client_w.write_all(&rbody)?;
    }
    Ok(())
}

#[test]
fn a_failed_put_fails_every_write_it_carried() {
    if !(have_venv() && have_clients()) {
        return;
    }
    const CHUNK: u64 = 64 * 1024;
    const COUNT: u64 = 200;
    let server = start(Kind::Daemon);
    let image = server.path("fault.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    server.add_ticket(&ticket("tkt-fault", &image, SIZE, &["read", "write"]));
    let port: u16 = server
        .base
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("daemon port");
    // The first PUT that carries two writes or more fails: every write
    // in it, and only those, must fail.
    let proxy = FaultProxy::start(port, 2 * CHUNK);
    let url = format!("http://127.0.0.1:{}/images/tkt-fault", proxy.port);
    let bridge = serve(&url, &server.path("nbd.sock"));
    let uri = bridge.first_line.clone();

    let out = run_ok(
        Command::new(SYSTEM_PYTHON)
            .arg(repo().join("tests/python/coalesce_fault.py"))
            .arg(&uri)
            .arg(COUNT.to_string())
            .arg(CHUNK.to_string()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results: Vec<(u64, i64)> = stdout
        .lines()
        .map(|l| {
            l.split_once(' ')
                .and_then(|(i, e)| Some((i.parse().ok()?, e.parse().ok()?)))
                .unwrap_or_else(|| panic!("not 'INDEX ERRNO': {l:?} in {stdout}"))
        })
        .collect();
    assert_eq!(results.len() as u64, COUNT);
    let range = proxy
        .failed
        .lock()
        .unwrap()
        .clone()
        .expect("a PUT was failed");
    // "bytes FIRST-LAST/*"
    let (first, last) = range
        .trim_start_matches("bytes ")
        .split('/')
        .next()
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()))
        .expect("content-range");
    assert_eq!(first % CHUNK, 0, "{range}");
    assert_eq!((last + 1) % CHUNK, 0, "{range}");
    let carried = first / CHUNK..(last + 1) / CHUNK;
    assert!(carried.end - carried.start >= 2, "{range} was gathered");
    let data = std::fs::read(&image).unwrap();
    for (i, errno) in results {
        let at = (i * CHUNK) as usize;
        if carried.contains(&i) {
            assert_eq!(errno, 5, "write {i} was in the failed PUT {range}: EIO");
            assert!(data[at..at + CHUNK as usize].iter().all(|&b| b == 0));
        } else {
            assert_eq!(errno, 0, "write {i} was not in the failed PUT {range}");
            assert!(
                data[at..at + CHUNK as usize]
                    .iter()
                    .all(|&b| b == (i % 250 + 1) as u8)
            );
        }
    }
    let puts = proxy.puts.load(Ordering::SeqCst);
    assert!(
        (puts as u64) < COUNT,
        "{COUNT} writes went out in {puts} PUTs: they were gathered"
    );
    eprintln!(
        "failed PUT {range} carried {} writes; {puts} PUTs",
        carried.end - carried.start
    );
    stop(bridge, Kind::Daemon);
}
