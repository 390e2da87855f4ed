//! The engine-compatible control plane (`nbdbridge engine`): the parts of
//! the oVirt REST API v4 that image transfers need (disks, storage
//! domains, hosts, image transfers), VM backups (VMs, disk attachments,
//! backups, checkpoints), plus the SSO login, spoken exactly as the oVirt
//! Python SDK expects (see `shared/ENGINE-API.md`).
//!
//! # Layout
//! - `api`: routing, authentication, XML rendering of each resource.
//! - `sso`: `/ovirt-engine/sso/oauth/token` and `/services/sso-logout`.
//! - `transfer`: the phase machine; one driver task per live transfer.
//! - `backup`: VM backups and checkpoints (QCOW2 dirty bitmaps); one
//!   driver task per backup that has not ended.
//! - `host`: the ticket control API client for data servers, and their
//!   status (a probe of the control API every [`Timing::host_check`]).
//! - `disk`: image files and finalize verification (QCOW2 header checks).
//! - `qemu`: qemu-nbd for guest-data (`format=raw`) transfers of QCOW2
//!   disks, and `qemu-img bitmap` for checkpoints.
//! - `db`: state in SQLite, so a restart loses nothing.
//! - `error`: `engine::Error` and its only mapping to a status + `<fault>`.
//! - `model`, `xml`: entities, wire enums, XML in and out.
//!
//! The engine never touches disk data itself: it installs tickets on a
//! host's data server, which serves the bytes. Hosts are given as
//! [`HostSpec`]s (`NAME=CONTROL_SOCKET,DATA_URL`); the embedded data
//! server becomes one more host once it is wired in (see
//! `cli/engine.rs`).

mod api;
mod backup;
mod db;
mod disk;
pub mod embedded;
mod error;
mod host;
mod model;
mod private;
mod qemu;
mod sso;
mod transfer;
mod xml;

pub use error::Error;
pub use model::Host;

use crate::net::accept::AcceptOptions;
use crate::shutdown::Shutdown;
use db::Db;
use disk::Images;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::Instrument;

/// The one user.
pub const USER: &str = "admin@internal";

/// A data server registered as a host: `NAME=CONTROL_SOCKET,DATA_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Host name (unique).
    pub name: String,
    /// Unix socket of its ticket control API.
    pub control_socket: PathBuf,
    /// Base URL of its data API, e.g. `http://127.0.0.1:54322`.
    pub data_url: String,
}

impl std::str::FromStr for HostSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected NAME=CONTROL_SOCKET,DATA_URL"))?;
        let (socket, url) = rest
            .split_once(',')
            .ok_or_else(|| format!("'{s}': expected NAME=CONTROL_SOCKET,DATA_URL"))?;
        if name.is_empty() || name.len() > 255 {
            return Err(format!(
                "'{s}': the host name must have 1 to 255 characters"
            ));
        }
        if socket.is_empty() {
            return Err(format!("'{s}': the control socket path is empty"));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "'{s}': the data URL must start with http:// or https://"
            ));
        }
        Ok(HostSpec {
            name: name.to_string(),
            control_socket: PathBuf::from(socket),
            data_url: url.to_string(),
        })
    }
}

/// Timeouts and intervals of the phase machine (ENGINE-API.md 3.4).
#[derive(Debug, Clone)]
pub struct Timing {
    /// How often a transfer's driver looks at its ticket.
    pub tick: Duration,
    /// Ticket lifetime given to data servers (engine default 300 s).
    pub ticket_timeout: u64,
    /// Default client inactivity timeout (engine default 60 s).
    pub inactivity_timeout: u64,
    /// How long finished_success transfers stay readable (15 min).
    pub keep_succeeded: Duration,
    /// How long failed transfers stay readable (30 min).
    pub keep_failed: Duration,
    /// How often the hosts' control APIs are probed for their status.
    pub host_check: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick: Duration::from_millis(500),
            ticket_timeout: 300,
            inactivity_timeout: 60,
            keep_succeeded: Duration::from_secs(15 * 60),
            keep_failed: Duration::from_secs(30 * 60),
            host_check: Duration::from_secs(5),
        }
    }
}

impl Timing {
    /// Renew a ticket when it has less than this many seconds left: the
    /// engine's 240 s of 300, scaled down for short test timeouts.
    pub fn renew_margin(&self) -> u64 {
        (self.ticket_timeout * 4 / 5).min(240)
    }
}

/// Everything `nbdbridge engine` needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Database, password file and disk images live here.
    pub data_dir: PathBuf,
    /// API address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// File holding admin@internal's password; `None`: generate one at
    /// first start into `DATA_DIR/password` (0600).
    pub password_file: Option<PathBuf>,
    /// The data servers.
    pub hosts: Vec<HostSpec>,
    /// Phase machine timing.
    pub timing: Timing,
    /// Serve https with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Most API connections served at once; more wait in the listen
    /// backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request head (also how long
    /// an idle keep-alive connection is kept).
    pub header_timeout: Duration,
}

/// PEM files for https.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        Error::Config(format!("TLS: cannot load {}: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&files.cert, &e))?;
    if certs.is_empty() {
        return Err(bad(&files.cert, &"no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad(&files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    // libcurl would speak HTTP/2 if offered; we speak HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Shared by the API handlers and the transfer drivers (`Debug` hides the
/// password).
pub(crate) struct State {
    db: Db,
    images: Images,
    nbd: qemu::NbdServers,
    hosts: Vec<Host>,
    host_status: host::HostStatuses,
    config: Timing,
    password: String,
    base: String,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per VM: held by a backup's start and a checkpoint's removal, so
    /// neither runs between the other's checks and its changes.
    vm_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Disks whose checkpoint bitmaps are being removed. A transfer's
    /// disk lock is taken under this mutex, and a removal checks the locks
    /// and fills the set under it: a transfer never starts on a disk whose
    /// bitmap is being removed, nor a removal on a disk being transferred.
    removing_bitmaps: Mutex<std::collections::HashSet<String>>,
    shutdown: Shutdown,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("db", &self.db)
            .field("images", &self.images)
            .field("hosts", &self.hosts)
            .field("config", &self.config)
            .field("password", &"<redacted>")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// What one turn of a driver found (see [`spawn_driver_loop`]).
enum Turn {
    /// Turn again at the next tick or wake-up.
    Again,
    /// The object ended (or is gone): the driver stops.
    Ended,
}

/// Run the driver task of the transfer or backup `id`: `turn` once per
/// tick, or sooner when the object's waker is notified, until it says the
/// object ended or the engine stops.
fn spawn_driver_loop<F, Fut>(state: Arc<State>, id: String, span: tracing::Span, turn: F)
where
    F: Fn(Arc<State>, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Turn> + Send + 'static,
{
    let notify = state.register_waker(&id);
    tokio::spawn(
        async move {
            loop {
                if state.shutdown.is_triggered() {
                    break;
                }
                if let Turn::Ended = turn(state.clone(), id.clone()).await {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(state.config.tick) => {}
                    _ = notify.notified() => {}
                    _ = state.shutdown.wait() => break,
                }
            }
            state.unregister_waker(&id);
        }
        .instrument(span),
    );
}

impl State {
    fn register_waker(&self, id: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut map = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(id.to_string(), notify.clone());
        notify
    }

    fn unregister_waker(&self, id: &str) {
        let mut map = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }

    /// Take VM `vm_id`'s lock (see `vm_locks`), waiting for it.
    async fn lock_vm(&self, vm_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(vm_id.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        };
        lock.lock_owned().await
    }

    /// Make transfer `id`'s driver look at it now.
    fn wake(&self, id: &str) {
        let map = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get(id) {
            n.notify_one();
        }
    }
}

/// A started engine: bound, state loaded, drivers running.
pub struct Engine {
    state: Arc<State>,
    listener: TcpListener,
    url: String,
    password_path: PathBuf,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
    header_timeout: Duration,
    /// Held while the engine runs: one engine per data dir.
    _lock: std::fs::File,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("url", &self.url)
            .field("password_path", &self.password_path)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Default most API connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Default time a client gets to send a request head, and to send the
/// next one on a keep-alive connection (hyper's `header_read_timeout`;
/// the SDK reopens a connection the engine closed).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head (431 past it); the SDK sends under 2 KiB.
const MAX_HEAD_SIZE: usize = 64 * 1024;
/// hyper's read buffer: bounds a head still arriving; API bodies are small
/// XML and JSON, read in frames of this size at most.
const MAX_BUF_SIZE: usize = 128 * 1024;
/// How long API connections get to finish at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Take `DATA_DIR/engine.lock` (flock): a second engine on the same data
/// dir would drive the same transfers twice.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, Error> {
    use std::os::fd::AsRawFd;
    let path = dir.join("engine.lock");
    let file = private::touch(&path)?;
    // SAFETY: flock(2) on a descriptor we own for the file's lifetime.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::Config(format!(
            "another engine is using {} ({})",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(file)
}

/// The password in `path`: its first line.
fn read_password(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        return Err(Error::Config(format!(
            "the password file {} is empty",
            path.display()
        )));
    }
    Ok(pw)
}

/// The password in `path`, generated and stored (0600) if the file does
/// not exist.
fn read_or_create_password(path: &Path) -> Result<String, Error> {
    use std::io::Write;
    if path.exists() {
        return read_password(path);
    }
    let pw = uuid::Uuid::new_v4().simple().to_string();
    let mut f = private::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    writeln!(f, "{pw}").map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(pw)
}

impl Engine {
    /// Open the data directory, register the hosts, bind the listener and
    /// restart the driver of every transfer that is not finished.
    ///
    /// # Errors
    /// The data directory, database, password file or listen address
    /// cannot be used.
    pub async fn start(config: EngineConfig, shutdown: Shutdown) -> Result<Engine, Error> {
        // 0700: it holds ticket ids, the password and disk images.
        private::dir(&config.data_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        private::narrow_files_in(&config.data_dir)?;
        let db = Db::open(&config.data_dir.join("engine.db"))?;
        let images = Images::open(config.data_dir.join("images"))?;
        let nbd = qemu::NbdServers::new(config.data_dir.join("run"))?;
        let password_path = match &config.password_file {
            Some(p) => p.clone(),
            None => config.data_dir.join("password"),
        };
        let password = if config.password_file.is_some() {
            read_password(&password_path)?
        } else {
            read_or_create_password(&password_path)?
        };
        let mut hosts = Vec::new();
        for spec in &config.hosts {
            hosts.push(db.upsert_host(&spec.name, &spec.control_socket, &spec.data_url)?);
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io(format!("listen on {}", config.listen), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))?;
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}/ovirt-engine/api");
        let state = Arc::new(State {
            db,
            images,
            nbd,
            hosts,
            host_status: host::HostStatuses::default(),
            config: config.timing.clone(),
            password,
            base: "/ovirt-engine/api".to_string(),
            wakers: Mutex::new(HashMap::new()),
            vm_locks: Mutex::new(HashMap::new()),
            removing_bitmaps: Mutex::new(std::collections::HashSet::new()),
            shutdown,
        });
        for t in state.db.transfers()? {
            if !t.phase.is_finished() {
                tracing::info!(transfer = %t.id, phase = %t.phase, "resuming the driver");
                let id = t.id.clone();
                transfer::check_at_start(&state, t).await;
                transfer::spawn_driver(state.clone(), id);
            }
        }
        // Know which hosts are up before the first transfer picks one.
        host::check_hosts(&state.hosts, &state.host_status).await;
        spawn_host_monitor(state.clone());
        for b in state.db.backups(None)? {
            if !b.phase.is_finished() {
                tracing::info!(backup = %b.id, phase = %b.phase, "resuming the backup driver");
                backup::spawn_driver(state.clone(), b.id);
            }
        }
        spawn_janitor(state.clone());
        Ok(Engine {
            state,
            listener,
            url,
            password_path,
            tls,
            max_connections: config.max_connections.max(1),
            header_timeout: config.header_timeout,
            _lock: lock,
        })
    }

    /// The API base URL, `http://HOST:PORT/ovirt-engine/api`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The file holding admin@internal's password.
    pub fn password_path(&self) -> &Path {
        &self.password_path
    }

    /// The registered hosts.
    pub fn hosts(&self) -> &[Host] {
        &self.state.hosts
    }

    /// Serve until the shutdown signal, then give open connections a
    /// short grace to finish.
    pub async fn serve(self) {
        let options = AcceptOptions {
            name: "engine",
            max_connections: self.max_connections,
            stop_grace: STOP_GRACE * 2,
        };
        let shutdown = self.state.shutdown.clone();
        let state = self.state.clone();
        let tls = self.tls.clone();
        let header_timeout = self.header_timeout;
        crate::net::accept::serve(self.listener, options, shutdown, move |stream, info| {
            let state = state.clone();
            let tls = tls.clone();
            let span = tracing::debug_span!("conn", conn = info.id, peer = %info.peer);
            async move {
                match tls {
                    None => serve_connection(state, stream, header_timeout).await,
                    Some(acceptor) => {
                        let accepted =
                            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await;
                        match accepted {
                            Ok(Ok(stream)) => serve_connection(state, stream, header_timeout).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(span)
        })
        .await;
    }
}

/// Serve HTTP/1.1 on one connection until the peer closes it, the header
/// deadline passes, or the engine stops.
async fn serve_connection<I>(state: Arc<State>, io: I, header_timeout: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = state.shutdown.clone();
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(api::handle(state, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEAD_SIZE)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(STOP_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Keep the hosts' status: probe their control APIs every
/// [`Timing::host_check`].
fn spawn_host_monitor(state: Arc<State>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(state.config.host_check) => {}
                _ = state.shutdown.wait() => break,
            }
            host::check_hosts(&state.hosts, &state.host_status).await;
        }
    });
}

/// Forget finished transfers after their keep time.
fn spawn_janitor(state: Arc<State>) {
    tokio::spawn(async move {
        loop {
            let now = model::now();
            let ok = now - state.config.keep_succeeded.as_secs() as i64;
            let failed = now - state.config.keep_failed.as_secs() as i64;
            match state.db.purge_transfers(ok, failed) {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "finished transfers forgotten"),
                Err(e) => tracing::warn!(error = %e, "cannot purge transfers"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                _ = state.shutdown.wait() => break,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_specs() {
        let h: HostSpec = "h1=/run/c.sock,http://127.0.0.1:5".parse().unwrap();
        assert_eq!(h.name, "h1");
        assert_eq!(h.control_socket, PathBuf::from("/run/c.sock"));
        assert_eq!(h.data_url, "http://127.0.0.1:5");
        assert!("h1".parse::<HostSpec>().is_err());
        assert!("h1=/s".parse::<HostSpec>().is_err());
        assert!("=/s,http://x".parse::<HostSpec>().is_err());
        assert!("h=/s,ftp://x".parse::<HostSpec>().is_err());
    }

    /// A fake data server control API on a unix socket: records every
    /// request and answers GET with a status that has no idle_time (as an
    /// old or minimal data server would).
    /// How the fake control API misbehaves.
    #[derive(Debug, Clone, Copy, Default)]
    struct Fake {
        /// DELETE answers 409.
        fail_delete: bool,
        /// PUT answers after this long.
        put_delay: Duration,
        /// GET reports `transferred`: [`FAKE_TRANSFERRED`] (one test only).
        report_transferred: bool,
    }

    /// What a [`Fake`] with `report_transferred` reports.
    static FAKE_TRANSFERRED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    async fn fake_control(socket: PathBuf, fake: Fake) -> Arc<Mutex<Vec<(String, String)>>> {
        use http_body_util::{BodyExt, Full};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let method = req.method().to_string();
                            // Host status probes are not part of a transfer.
                            let probe = req.uri().path().ends_with(host::PROBE_TICKET);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            if !probe {
                                record.lock().unwrap().push((
                                    method.clone(),
                                    String::from_utf8_lossy(&body).into_owned(),
                                ));
                            }
                            if method == "PUT" {
                                tokio::time::sleep(fake.put_delay).await;
                            }
                            let reported = format!(
                                r#"{{"active": false, "connections": 0, "transferred": {}}}"#,
                                FAKE_TRANSFERRED.load(std::sync::atomic::Ordering::SeqCst)
                            );
                            let (status, reply) = match method.as_str() {
                                "GET" if fake.report_transferred => (200, reported.as_str()),
                                "GET" => (200, r#"{"active": false, "connections": 0}"#),
                                "DELETE" if fake.fail_delete => (409, "busy"),
                                "DELETE" => (204, ""),
                                _ => (200, ""),
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(bytes::Bytes::from(reply.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        seen
    }

    /// Poll `cond` until it holds. The deadline only bounds a failing
    /// test: CI machines run these beside CPU-bound tests with little CPU
    /// each, so it is generous.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(90);
        while !cond() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An engine whose only host is a fake control API; its state, the
    /// fake's request log, and the temp dir.
    async fn engine_with_fake(
        fake: Fake,
        timing: Timing,
    ) -> (
        Arc<State>,
        Arc<Mutex<Vec<(String, String)>>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let seen = fake_control(socket.clone(), fake).await;
        let config = EngineConfig {
            data_dir: dir.path().join("engine"),
            listen: "127.0.0.1:0".parse().unwrap(),
            password_file: None,
            hosts: vec![HostSpec {
                name: "fake".into(),
                control_socket: socket,
                data_url: "http://127.0.0.1:9".into(),
            }],
            timing,
            tls: None,
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        };
        let engine = Engine::start(config, Shutdown::new()).await.unwrap();
        (engine.state.clone(), seen, dir)
    }

    /// A new 1 MiB disk: its image made, its row stored.
    fn new_disk(
        state: &Arc<State>,
        name: &str,
        format: model::Format,
        backup: model::DiskBackup,
    ) -> model::Disk {
        let disk = model::Disk {
            id: model::new_id(),
            name: name.into(),
            description: String::new(),
            format,
            provisioned_size: 1 << 20,
            status: model::DiskStatus::Ok,
            backup,
        };
        state.images.create(&disk).unwrap();
        state.db.insert_disk(&disk).unwrap();
        disk
    }

    /// A new VM with `disk` attached.
    fn vm_with(state: &Arc<State>, disk: &model::Disk) -> model::Vm {
        let vm = model::Vm {
            id: model::new_id(),
            name: "vm".into(),
            description: String::new(),
        };
        state.db.insert_vm(&vm).unwrap();
        state.db.attach_disk(&vm.id, &disk.id).unwrap();
        vm
    }

    /// A new 1 MiB raw disk and an upload transfer of it.
    fn disk_and_transfer(
        state: &Arc<State>,
        inactivity: Option<&str>,
    ) -> (model::Disk, model::Transfer) {
        let disk = new_disk(state, "d", model::Format::Raw, model::DiskBackup::None);
        let req = xml::ImageTransferIn {
            disk: Some(xml::IdRef {
                id: Some(disk.id.clone()),
                name: None,
            }),
            inactivity_timeout: inactivity.map(str::to_string),
            ..Default::default()
        };
        let t = transfer::add(state, req).unwrap();
        (disk, t)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drives_any_control_api_and_renews_tickets_while_transferring() {
        let timing = Timing {
            tick: Duration::from_millis(50),
            ticket_timeout: 2,
            ..Timing::default()
        };
        let (state, seen, _dir) = engine_with_fake(Fake::default(), timing).await;
        // Inactivity checks off: only the renewal is under test, whatever
        // the machine's speed.
        let (disk, t) = disk_and_transfer(&state, Some("0"));
        let phase = || state.db.transfer(&t.id).unwrap().unwrap().phase;
        wait_for("transferring", || phase() == model::Phase::Transferring).await;
        let calls = |m: &str| seen.lock().unwrap().iter().filter(|(x, _)| x == m).count();
        {
            let log = seen.lock().unwrap();
            let put: serde_json::Value = serde_json::from_str(&log[0].1).unwrap();
            assert_eq!(log[0].0, "PUT");
            assert_eq!(put["uuid"], t.ticket_id.as_str());
            assert_eq!(put["size"], 1 << 20);
            assert_eq!(put["ops"], serde_json::json!(["write"]));
            assert_eq!(put["timeout"], 2);
            assert!(put.get("inactivity_timeout").is_none(), "{put}");
            let url = put["url"].as_str().unwrap();
            assert!(
                url.starts_with("file:///") && url.ends_with(&disk.id),
                "{url}"
            );
        }
        // Renewed before the 2 s ticket runs out, again and again.
        wait_for("two PATCH renewals", || calls("PATCH") >= 2).await;
        assert_eq!(phase(), model::Phase::Transferring);
        let patch = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(m, _)| m == "PATCH")
            .cloned()
            .unwrap();
        assert_eq!(patch.1, r#"{"timeout":2}"#);
        transfer::act(&state, &t.id, transfer::Action::Cancel)
            .await
            .unwrap();
        wait_for("finished_failure", || {
            phase() == model::Phase::FinishedFailure
        })
        .await;
        assert_eq!(calls("DELETE"), 1);
        assert!(state.db.disk(&disk.id).unwrap().is_none());
        assert!(!state.images.path(&disk.id).exists());
        state.shutdown.trigger();
    }

    /// A transfer finalized before the engine polled its ticket again
    /// still records the bytes the data server counted last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finalize_records_the_last_transferred() {
        let timing = Timing {
            // No poll but the ones the test asks for.
            tick: Duration::from_secs(3600),
            ..Timing::default()
        };
        let fake = Fake {
            report_transferred: true,
            ..Fake::default()
        };
        let (state, seen, _dir) = engine_with_fake(fake, timing).await;
        let (_disk, t) = disk_and_transfer(&state, Some("0"));
        let current = || state.db.transfer(&t.id).unwrap().unwrap();
        wait_for("transferring", || {
            current().phase == model::Phase::Transferring
        })
        .await;
        state.wake(&t.id);
        let gets = || {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(m, _)| m == "GET")
                .count()
        };
        wait_for("a poll", || gets() >= 1).await;
        assert_eq!(current().transferred, 0);
        FAKE_TRANSFERRED.store(777, std::sync::atomic::Ordering::SeqCst);
        transfer::act(&state, &t.id, transfer::Action::Finalize)
            .await
            .unwrap();
        wait_for("finished_success", || {
            current().phase == model::Phase::FinishedSuccess
        })
        .await;
        assert_eq!(current().transferred, 777);
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn times_out_an_idle_upload_without_idle_time() {
        let timing = Timing {
            tick: Duration::from_millis(50),
            ..Timing::default()
        };
        let (state, seen, _dir) = engine_with_fake(Fake::default(), timing).await;
        let (_, t) = disk_and_transfer(&state, Some("2"));
        let phase = || state.db.transfer(&t.id).unwrap().unwrap().phase;
        let calls = |m: &str| seen.lock().unwrap().iter().filter(|(x, _)| x == m).count();
        wait_for("transferring", || phase() == model::Phase::Transferring).await;
        let put: serde_json::Value = serde_json::from_str(&seen.lock().unwrap()[0].1).unwrap();
        assert_eq!(put["inactivity_timeout"], 2);
        // The fake reports no idle_time and no progress: idle since the
        // last update, so the legacy policy pauses the upload after 2 s.
        wait_for("paused_system", || phase() == model::Phase::PausedSystem).await;
        assert!(calls("GET") >= 2);
        transfer::act(&state, &t.id, transfer::Action::Cancel)
            .await
            .unwrap();
        wait_for("finished_failure", || {
            phase() == model::Phase::FinishedFailure
        })
        .await;
        assert_eq!(calls("DELETE"), 1);
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ticket_removal_failures_retry_finalize_and_give_up_on_cancel() {
        let timing = Timing {
            tick: Duration::from_millis(20),
            ..Timing::default()
        };
        let fake = Fake {
            fail_delete: true,
            ..Fake::default()
        };
        let (state, seen, _dir) = engine_with_fake(fake, timing).await;
        let calls = |m: &str| seen.lock().unwrap().iter().filter(|(x, _)| x == m).count();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (_, t) = disk_and_transfer(&state, None);
            let id = t.id.clone();
            let st = state.clone();
            wait_for("transferring", || {
                st.db.transfer(&id).unwrap().unwrap().phase == model::Phase::Transferring
            })
            .await;
            ids.push(t.id);
        }
        let phase = |id: &str| state.db.transfer(id).unwrap().unwrap().phase;
        // Finalize keeps retrying: success is never reported with the
        // ticket still open.
        transfer::act(&state, &ids[0], transfer::Action::Finalize)
            .await
            .unwrap();
        wait_for("DELETE retries", || calls("DELETE") >= 4).await;
        assert_eq!(phase(&ids[0]), model::Phase::FinalizingSuccess);
        // Cancel gives up after a few tries and ends the transfer.
        transfer::act(&state, &ids[1], transfer::Action::Cancel)
            .await
            .unwrap();
        wait_for("finished_failure", || {
            phase(&ids[1]) == model::Phase::FinishedFailure
        })
        .await;
        assert_eq!(phase(&ids[0]), model::Phase::FinalizingSuccess);
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ticket_installed_while_the_client_paused_is_still_removed() {
        let fake = Fake {
            put_delay: Duration::from_millis(500),
            ..Fake::default()
        };
        let timing = Timing {
            tick: Duration::from_millis(20),
            ..Timing::default()
        };
        let (state, seen, _dir) = engine_with_fake(fake, timing).await;
        let calls = |m: &str| seen.lock().unwrap().iter().filter(|(x, _)| x == m).count();
        let (_, t) = disk_and_transfer(&state, None);
        // Pause while the PUT is in flight (it is recorded when it arrives,
        // answered 500 ms later).
        wait_for("the PUT", || calls("PUT") == 1).await;
        transfer::act(&state, &t.id, transfer::Action::Pause)
            .await
            .unwrap();
        let row = || state.db.transfer(&t.id).unwrap().unwrap();
        wait_for("ticket recorded", || row().ticket_installed).await;
        assert_eq!(row().phase, model::Phase::PausedUser);
        transfer::act(&state, &t.id, transfer::Action::Cancel)
            .await
            .unwrap();
        wait_for("finished_failure", || {
            row().phase == model::Phase::FinishedFailure
        })
        .await;
        assert_eq!(calls("DELETE"), 1);
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_data_dir_and_its_files_are_private() {
        use std::os::unix::fs::MetadataExt;
        let (state, _seen, dir) = engine_with_fake(Fake::default(), Timing::default()).await;
        let (raw, _t) = disk_and_transfer(&state, None);
        // A cow image is made by qemu-img in the file created 0600 first.
        let cow = model::Disk {
            id: model::new_id(),
            name: "c".into(),
            description: String::new(),
            format: model::Format::Cow,
            provisioned_size: 1 << 20,
            status: model::DiskStatus::Ok,
            backup: model::DiskBackup::None,
        };
        state.images.create(&cow).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        let data = dir.path().join("engine");
        for d in [data.clone(), data.join("images"), data.join("run")] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        for f in ["engine.db", "engine.lock", "password"] {
            assert_eq!(mode(&data.join(f)), 0o600, "{f}");
        }
        for d in [&raw, &cow] {
            assert_eq!(mode(&state.images.path(&d.id)), 0o600, "{:?}", d.format);
        }
        state.shutdown.trigger();
    }

    #[tokio::test]
    async fn debug_hides_the_password() {
        let (state, _seen, _dir) = engine_with_fake(Fake::default(), Timing::default()).await;
        let text = format!("{state:?}");
        assert!(!text.contains(&state.password), "{text}");
        assert!(text.contains("password: \"<redacted>\""), "{text}");
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_without_a_host_go_to_a_host_that_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let _seen = fake_control(socket.clone(), Fake::default()).await;
        let spec = |name: &str, control_socket: PathBuf| HostSpec {
            name: name.into(),
            control_socket,
            data_url: "http://127.0.0.1:9".into(),
        };
        let config = EngineConfig {
            data_dir: dir.path().join("engine"),
            listen: "127.0.0.1:0".parse().unwrap(),
            password_file: None,
            // The dead host is registered first.
            hosts: vec![
                spec("dead", dir.path().join("nobody.sock")),
                spec("fake", socket),
            ],
            timing: Timing::default(),
            tls: None,
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        };
        let engine = Engine::start(config, Shutdown::new()).await.unwrap();
        let state = engine.state.clone();
        let (dead, up) = (state.hosts[0].clone(), state.hosts[1].clone());
        assert_eq!(
            state.host_status.get(&dead.id),
            host::HostStatus::NonResponsive
        );
        assert_eq!(state.host_status.get(&up.id), host::HostStatus::Up);
        let (_, t) = disk_and_transfer(&state, None);
        assert_eq!(t.host_id, up.id);
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_holds_its_disks_until_finalized() {
        let timing = Timing {
            tick: Duration::from_millis(20),
            ..Timing::default()
        };
        let (state, _seen, _dir) = engine_with_fake(Fake::default(), timing).await;
        let disk = new_disk(&state, "b", model::Format::Raw, model::DiskBackup::None);
        let vm = vm_with(&state, &disk);
        let b = backup::add(&state, &vm.id, xml::BackupIn::default())
            .await
            .unwrap();
        // A raw disk takes no part in incremental backups: no checkpoint.
        assert_eq!(b.to_checkpoint_id, None);
        assert_eq!(b.disks, std::slice::from_ref(&disk.id));
        let phase = || state.db.backup(&b.id).unwrap().unwrap().phase;
        let status = || state.db.disk(&disk.id).unwrap().unwrap().status;
        assert_eq!(status(), model::DiskStatus::Locked);
        wait_for("ready", || phase() == model::BackupPhase::Ready).await;
        // One backup of a VM at a time.
        assert!(matches!(
            backup::add(&state, &vm.id, xml::BackupIn::default()).await,
            Err(Error::Conflict(_))
        ));
        backup::finalize(&state, &vm.id, &b.id).unwrap();
        wait_for("succeeded", || phase() == model::BackupPhase::Succeeded).await;
        assert_eq!(status(), model::DiskStatus::Ok);
        // Finalizing again changes nothing.
        backup::finalize(&state, &vm.id, &b.id).unwrap();
        assert!(state.db.checkpoints(&vm.id).unwrap().is_empty());
        state.shutdown.trigger();
    }

    /// A VM with one 1 MiB QCOW2 disk enabled for incremental backup.
    fn vm_with_incremental_disk(state: &Arc<State>) -> (model::Vm, model::Disk) {
        let disk = new_disk(
            state,
            "inc",
            model::Format::Cow,
            model::DiskBackup::Incremental,
        );
        (vm_with(state, &disk), disk)
    }

    /// An engine on a fake control API ticking every 20 ms, with a VM
    /// whose disk is enabled for incremental backup; the temp dir lives as
    /// long as it is kept.
    async fn backup_engine() -> (Arc<State>, tempfile::TempDir, model::Vm, model::Disk) {
        let timing = Timing {
            tick: Duration::from_millis(20),
            ..Timing::default()
        };
        let (state, _seen, dir) = engine_with_fake(Fake::default(), timing).await;
        let (vm, disk) = vm_with_incremental_disk(&state);
        (state, dir, vm, disk)
    }

    fn from_checkpoint(id: &str) -> xml::BackupIn {
        xml::BackupIn {
            from_checkpoint_id: Some(id.to_string()),
            ..Default::default()
        }
    }

    /// Wait until backup `id` is ready.
    async fn ready(state: &Arc<State>, id: &str) {
        wait_for("ready", || {
            state.db.backup(id).unwrap().unwrap().phase == model::BackupPhase::Ready
        })
        .await;
    }

    /// Finalize the ready backup `id` and wait until it succeeded.
    async fn finish(state: &Arc<State>, vm_id: &str, id: &str) {
        backup::finalize(state, vm_id, id).unwrap();
        wait_for("succeeded", || {
            state.db.backup(id).unwrap().unwrap().phase == model::BackupPhase::Succeeded
        })
        .await;
    }

    /// Run a backup of `vm` (from checkpoint `from`, if any) to its end;
    /// its new checkpoint.
    async fn run_backup(state: &Arc<State>, vm: &model::Vm, from: Option<&str>) -> String {
        let req = from.map(from_checkpoint).unwrap_or_default();
        let b = backup::add(state, &vm.id, req).await.unwrap();
        ready(state, &b.id).await;
        finish(state, &vm.id, &b.id).await;
        b.to_checkpoint_id.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_removal_and_a_backup_from_it_exclude_each_other() {
        let (state, _dir, vm, disk) = backup_engine().await;
        let image = state.images.path(&disk.id);
        let has = |cp: &str| qemu::bitmaps(&image).unwrap().iter().any(|b| b == cp);
        let cp1 = run_backup(&state, &vm, None).await;
        assert!(has(&cp1));

        // A backup from cp1 runs: cp1 cannot be removed.
        let b = backup::add(&state, &vm.id, from_checkpoint(&cp1))
            .await
            .unwrap();
        ready(&state, &b.id).await;
        assert!(matches!(
            backup::remove_checkpoint(&state, &vm.id, &cp1).await,
            Err(Error::Conflict(_))
        ));
        assert!(state.db.checkpoint(&cp1).unwrap().is_some());
        assert!(has(&cp1));
        finish(&state, &vm.id, &b.id).await;
        let cp2 = b.to_checkpoint_id.clone().unwrap();

        // cp1 removed: a backup from it is refused.
        backup::remove_checkpoint(&state, &vm.id, &cp1)
            .await
            .unwrap();
        assert!(!has(&cp1));
        assert!(matches!(
            backup::add(&state, &vm.id, from_checkpoint(&cp1)).await,
            Err(Error::BadRequest(_))
        ));
        assert_eq!(
            state.db.disk(&disk.id).unwrap().unwrap().status,
            model::DiskStatus::Ok
        );

        // Both at once: one wins, and the other sees what it did.
        let (added, removed) = tokio::join!(
            backup::add(&state, &vm.id, from_checkpoint(&cp2)),
            backup::remove_checkpoint(&state, &vm.id, &cp2),
        );
        match (added, removed) {
            (Ok(b), Err(Error::Conflict(_))) => {
                assert!(state.db.checkpoint(&cp2).unwrap().is_some());
                assert!(has(&cp2));
                ready(&state, &b.id).await;
                finish(&state, &vm.id, &b.id).await;
            }
            (Err(Error::BadRequest(_)), Ok(())) => {
                assert!(state.db.checkpoint(&cp2).unwrap().is_none());
                assert!(!has(&cp2));
            }
            other => panic!("inconsistent outcome: {other:?}"),
        }
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_is_not_removed_while_a_disk_of_the_vm_is_locked() {
        let (state, _dir, vm, _disk) = backup_engine().await;
        let cp = run_backup(&state, &vm, None).await;
        // A raw disk attached after the checkpoint, locked by an upload.
        let (raw, _t) = disk_and_transfer(&state, Some("0"));
        state.db.attach_disk(&vm.id, &raw.id).unwrap();
        match backup::remove_checkpoint(&state, &vm.id, &cp).await {
            Err(Error::Conflict(m)) => assert!(m.contains(&raw.id), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(state.db.checkpoint(&cp).unwrap().is_some());
        state.shutdown.trigger();
    }

    /// An upload of a disk and the removal of a checkpoint holding its
    /// bitmap, at once, in either order: exactly one goes ahead, and the
    /// other is refused (409) without leaving anything behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_and_a_checkpoint_removal_of_its_disk_exclude_each_other() {
        let (state, _dir, vm, disk) = backup_engine().await;
        let image = state.images.path(&disk.id);
        let has = |cp: &str| qemu::bitmaps(&image).unwrap().iter().any(|b| b == cp);
        let upload = || {
            let req = xml::ImageTransferIn {
                disk: Some(xml::IdRef {
                    id: Some(disk.id.clone()),
                    name: None,
                }),
                inactivity_timeout: Some("0".into()),
                ..Default::default()
            };
            async { transfer::add(&state, req) }
        };
        let locked =
            || state.db.disk(&disk.id).unwrap().unwrap().status == model::DiskStatus::Locked;

        // The removal first: it claims the disk before its bitmaps go.
        let cp1 = run_backup(&state, &vm, None).await;
        let (removed, added) =
            tokio::join!(backup::remove_checkpoint(&state, &vm.id, &cp1), upload(),);
        removed.unwrap();
        match added {
            Err(Error::Conflict(m)) => assert!(m.contains("being removed"), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(!has(&cp1));
        assert!(!locked(), "the refused upload locked nothing");
        assert!(state.removing_bitmaps.lock().unwrap().is_empty());

        // The upload first: the removal sees the disk locked.
        let cp2 = run_backup(&state, &vm, None).await;
        let (added, removed) =
            tokio::join!(upload(), backup::remove_checkpoint(&state, &vm.id, &cp2),);
        let t = added.unwrap();
        match removed {
            Err(Error::Conflict(m)) => assert!(m.contains(&disk.id), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(has(&cp2));
        assert!(state.db.checkpoint(&cp2).unwrap().is_some());
        assert!(locked());
        assert!(state.removing_bitmaps.lock().unwrap().is_empty());
        transfer::act(&state, &t.id, transfer::Action::Cancel)
            .await
            .unwrap();
        state.shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_incremental_backup_whose_bitmap_is_gone_is_refused() {
        let (state, _dir, vm, disk) = backup_engine().await;
        let cp = run_backup(&state, &vm, None).await;
        // Behind the engine's back.
        qemu::remove_bitmap(&state.images.path(&disk.id), &cp).unwrap();
        match backup::add(&state, &vm.id, from_checkpoint(&cp)).await {
            Err(Error::BadRequest(m)) => {
                assert_eq!(
                    m,
                    format!(
                        "Cannot backup VM. Checkpoint {cp} cannot be used for disk {}: its \
                         bitmap is missing; start a full backup without from_checkpoint_id.",
                        disk.id
                    )
                );
            }
            other => panic!("expected a 400, got {other:?}"),
        }
        // Nothing was stored or locked; a full backup still works.
        assert_eq!(state.db.backups(Some(&vm.id)).unwrap().len(), 1);
        assert_eq!(
            state.db.disk(&disk.id).unwrap().unwrap().status,
            model::DiskStatus::Ok
        );
        run_backup(&state, &vm, None).await;
        state.shutdown.trigger();
    }

    #[test]
    fn renew_margin_scales() {
        let mut t = Timing::default();
        assert_eq!(t.renew_margin(), 240);
        t.ticket_timeout = 5;
        assert_eq!(t.renew_margin(), 4);
    }
}
