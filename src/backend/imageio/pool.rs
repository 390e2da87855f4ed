//! A fixed set of keep-alive HTTP connections: one client each, one request
//! at a time each, so a flush can reach every connection that wrote.

use super::TlsOptions;
use crate::backend::{Error, ErrorKind, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinSet;

/// Idle connections are dropped before imageio's default 60 s timeout
/// would close them under us.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single request (a zero of a huge range can take a while).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Conn {
    client: reqwest::Client,
    dirty: AtomicBool,
}

/// The connection pool.
#[derive(Debug)]
pub struct Pool {
    conns: Vec<Conn>,
    free: Mutex<Vec<usize>>,
    permits: Semaphore,
}

/// One connection, held for one request.
#[derive(Debug)]
pub struct PoolConn<'a> {
    pool: &'a Pool,
    index: usize,
    _permit: SemaphorePermit<'a>,
}

impl PoolConn<'_> {
    /// The client of this connection.
    pub fn client(&self) -> &reqwest::Client {
        &self.conn().client
    }

    /// This connection changed data: the next flush must reach it.
    pub fn set_dirty(&self) {
        self.conn().dirty.store(true, Ordering::SeqCst);
    }

    fn conn(&self) -> &Conn {
        // `index` always comes from `free`, which holds valid indexes only.
        &self.pool.conns[self.index]
    }
}

impl Drop for PoolConn<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(self.index);
        }
    }
}

impl Pool {
    /// `n` connections (at least one).
    ///
    /// # Errors
    /// The TLS settings are unusable.
    pub fn new(n: usize, tls: &TlsOptions, unix: Option<&Path>) -> Result<Self> {
        let n = n.max(1);
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(Conn {
                client: build_client(tls, unix)?,
                dirty: AtomicBool::new(false),
            });
        }
        Ok(Pool {
            conns,
            free: Mutex::new((0..n).rev().collect()),
            permits: Semaphore::new(n),
        })
    }

    /// Wait for a free connection.
    ///
    /// # Errors
    /// The pool was closed.
    pub async fn get(&self) -> Result<PoolConn<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "connection pool closed"))?;
        let index = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or_else(|| Error::new(ErrorKind::Io, "connection pool out of step"))?;
        Ok(PoolConn {
            pool: self,
            index,
            _permit: permit,
        })
    }

    /// Wait until no request is in flight, then run `flush` on every
    /// connection that wrote since its last flush (on one connection if none
    /// did), all at once.
    ///
    /// # Errors
    /// Any flush failed (those connections stay dirty).
    pub async fn flush_dirty<F, Fut>(&self, flush: F) -> Result<()>
    where
        F: Fn(reqwest::Client) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let _all = self
            .permits
            .acquire_many(self.conns.len() as u32)
            .await
            .map_err(|_| Error::new(ErrorKind::Shutdown, "connection pool closed"))?;
        let mut targets: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].dirty.load(Ordering::SeqCst))
            .collect();
        if targets.is_empty() {
            targets.push(0);
        }
        let mut tasks = JoinSet::new();
        for &i in &targets {
            let fut = flush(self.conns[i].client.clone());
            tasks.spawn(async move { (i, fut.await) });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(()))) => self.conns[i].dirty.store(false, Ordering::SeqCst),
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error
                        .get_or_insert(Error::new(ErrorKind::Io, format!("flush task: {e}")));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A client for one keep-alive HTTP/1.1 connection.
///
/// # Errors
/// The CA file cannot be read or parsed.
pub fn build_client(tls: &TlsOptions, unix: Option<&Path>) -> Result<reqwest::Client> {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only if another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut b = reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(IDLE_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = unix {
        b = b.unix_socket(Arc::<Path>::from(path));
    }
    if tls.insecure {
        b = b
            .tls_danger_accept_invalid_certs(true)
            .tls_danger_accept_invalid_hostnames(true);
    }
    if let Some(ca) = &tls.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| Error::io(format!("cannot read CA file {}", ca.display()), e))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::new(ErrorKind::Invalid, format!("CA file {}: {e}", ca.display()))
        })?;
        b = b.tls_certs_only(certs);
    }
    b.build()
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("HTTP client: {e}")))
}
