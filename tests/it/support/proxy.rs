//! Fault injection in front of real servers:
//! - [`HttpFaults`]: an HTTP/1.1 proxy in front of a data server (ours or
//!   the real ovirt-imageio daemon) that answers chosen requests with a 500
//!   instead of forwarding them, and hides the data server's `unix_socket`
//!   in OPTIONS so that clients keep going through it;
//! - [`NbdRelay`]: a unix-socket relay in front of an NBD server that cuts
//!   the n-th connection after it has sent so many bytes, as a network
//!   failure would.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// One injected fault: requests with this method whose JSON body has this
/// `"op"` get a 500, `times` times.
#[derive(Debug, Clone)]
struct Fault {
    method: String,
    op: String,
    times: u32,
}

#[derive(Debug, Default)]
struct Faults {
    list: Mutex<Vec<Fault>>,
    injected: AtomicU64,
    forwarded: AtomicU64,
}

/// An HTTP proxy in its own thread; stops when dropped.
#[derive(Debug)]
pub struct HttpFaults {
    addr: SocketAddr,
    faults: Arc<Faults>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpFaults {
    /// A proxy on 127.0.0.1 forwarding to `upstream` (`HOST:PORT`).
    pub fn start(upstream: SocketAddr) -> HttpFaults {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&faults);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        let faults = Arc::clone(&shared);
                        tokio::spawn(proxy_connection(client, upstream, faults));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = rx => {}
                }
            });
        });
        HttpFaults {
            addr,
            faults,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// The proxy's data URL prefix (`http://127.0.0.1:PORT/images/`).
    pub fn images_url(&self) -> String {
        format!("http://{}/images/", self.addr)
    }

    /// Answer the next `times` requests of `method` whose JSON body has
    /// `"op": op` with a 500 (e.g. `("PATCH", "flush", 1)`).
    pub fn fail(&self, method: &str, op: &str, times: u32) {
        self.faults.list.lock().unwrap().push(Fault {
            method: method.to_string(),
            op: op.to_string(),
            times,
        });
    }

    /// Requests answered with an injected 500 so far.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::SeqCst)
    }

    /// Requests forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.faults.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for HttpFaults {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One client connection: one upstream connection, requests in order.
async fn proxy_connection(client: TcpStream, upstream: SocketAddr, faults: Arc<Faults>) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let Ok((sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await else {
        return;
    };
    tokio::spawn(conn);
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        let faults = Arc::clone(&faults);
        async move { forward(req, sender, faults).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn forward(
    req: Request<Incoming>,
    sender: Arc<tokio::sync::Mutex<Sender>>,
    faults: Arc<Faults>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let method = parts.method.as_str().to_string();
    if take_fault(&faults, &method, &body) {
        faults.injected.fetch_add(1, Ordering::SeqCst);
        let mut resp = Response::new(Full::new(Bytes::from_static(
            b"injected fault: the proxy refused this request",
        )));
        *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(resp);
    }
    faults.forwarded.fetch_add(1, Ordering::SeqCst);
    let is_options = parts.method == hyper::Method::OPTIONS;
    let up = Request::from_parts(parts, Full::new(body));
    let resp = sender.lock().await.send_request(up).await?;
    let (mut parts, body) = resp.into_parts();
    let mut body = body.collect().await?.to_bytes();
    if is_options {
        // Keep clients on this proxy: no unix socket shortcut.
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
            if let Some(map) = v.as_object_mut() {
                map.remove("unix_socket");
            }
            body = Bytes::from(serde_json::to_vec(&v).unwrap());
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
        }
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn take_fault(faults: &Faults, method: &str, body: &[u8]) -> bool {
    let mut list = faults.list.lock().unwrap();
    let op = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string));
    for f in list.iter_mut() {
        if f.times > 0 && f.method == method && op.as_deref() == Some(f.op.as_str()) {
            f.times -= 1;
            return true;
        }
    }
    false
}

/// A unix-socket relay in front of an NBD server, in its own thread;
/// stops when dropped.
#[derive(Debug)]
pub struct NbdRelay {
    path: PathBuf,
    cut: Arc<Cut>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Cut {
    /// A cut is still to be made.
    armed: AtomicBool,
    /// After this many bytes from a client.
    after: AtomicU64,
    done: AtomicUsize,
}

impl NbdRelay {
    /// Listen on `path`, relaying every connection to `target`.
    pub fn start(path: &Path, target: &Path) -> NbdRelay {
        let std_listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let target = target.to_path_buf();
        let cut = Arc::new(Cut::default());
        let shared = Arc::clone(&cut);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = UnixListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        let target = target.clone();
                        let shared = Arc::clone(&shared);
                        tokio::spawn(async move {
                            if relay(client, &target, &shared).await {
                                shared.done.fetch_add(1, Ordering::SeqCst);
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = rx => {}
                }
            });
        });
        NbdRelay {
            path: path.to_path_buf(),
            cut,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// The URI of the relay (default export).
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.path.display())
    }

    /// Cut the first connection whose client has sent `after` bytes, both
    /// ways at once, as a dead network would; exactly one is cut, whichever
    /// of a multi-connection client's connections carries the data
    /// (nbdcopy gives an image this small to a single worker).
    pub fn cut(&self, after: u64) {
        self.cut.after.store(after, Ordering::SeqCst);
        self.cut.armed.store(true, Ordering::SeqCst);
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cut.done.load(Ordering::SeqCst)
    }
}

impl Drop for NbdRelay {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Relay one connection; true when it was cut.
async fn relay(client: UnixStream, target: &Path, cut: &Cut) -> bool {
    let Ok(server) = UnixStream::connect(target).await else {
        return false;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let was_cut = loop {
        let limit = cut
            .armed
            .load(Ordering::SeqCst)
            .then(|| cut.after.load(Ordering::SeqCst));
        let room = match limit {
            // The first connection past the limit takes the one cut.
            Some(l) if sent >= l && cut.armed.swap(false, Ordering::SeqCst) => break true,
            Some(l) if sent >= l => buf.len(),
            Some(l) => buf
                .len()
                .min(usize::try_from(l - sent).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = match cr.read(&mut buf[..room]).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => n,
        };
        if sw.write_all(&buf[..n]).await.is_err() {
            break false;
        }
        sent += n as u64;
    };
    if was_cut {
        // Both ways at once, as a dead network would.
        down.abort();
        drop(sw);
        drop(cr);
        return true;
    }
    let _ = sw.shutdown().await;
    let _ = down.await;
    false
}
