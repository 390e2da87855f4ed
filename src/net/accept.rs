//! The one accept loop, used by every listener (NBD, the data server's
//! remote, local and control sockets, the engine's API).
//!
//! - **A connection cap.** A permit is taken *before* `accept`, so past the
//!   cap new connections wait in the kernel's listen backlog and are
//!   accepted as others leave. This is what `qemu-nbd -e/--shared N` does
//!   (it stops watching the listening socket at N clients), and it keeps
//!   a client that waits from seeing a reset it cannot tell from a crash.
//! - **Backoff on accept errors** (out of descriptors, `ECONNABORTED`):
//!   10 ms doubling to 1 s, reset by the next successful accept; the loop
//!   never ends because one accept failed.
//! - **TCP keepalive** on every accepted TCP socket (a peer that vanished
//!   without a FIN is found within minutes instead of holding its permit
//!   forever) and `TCP_NODELAY` (small replies go out at once).
//! - **One task per connection**, holding its permit until it ends.
//! - **An orderly stop.** When the shutdown fires the listening socket is
//!   closed, connections get [`AcceptOptions::stop_grace`] to finish (they
//!   watch the same shutdown and wind down), and the rest are aborted.

use crate::shutdown::Shutdown;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// First pause after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed accepts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Idle time before the first keepalive probe.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_RETRIES: u32 = 6;

/// Something that accepts connections.
pub trait Acceptor: Send + Sync + 'static {
    /// An accepted connection.
    type Conn: Send + 'static;

    /// Wait for the next connection; it and its peer, for logs.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, String)>> + Send;
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        prepare_tcp(&stream);
        Ok((stream, peer.to_string()))
    }
}

impl Acceptor for UnixListener {
    type Conn = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        super::socket::prepare_unix(&stream);
        Ok((stream, "unix".to_string()))
    }
}

/// Turn on TCP keepalive and `TCP_NODELAY` on an accepted socket. A
/// failure is logged and otherwise ignored: the connection still works.
pub fn prepare_tcp(stream: &TcpStream) {
    super::socket::tune_tcp(
        stream,
        KEEPALIVE_TIME,
        KEEPALIVE_INTERVAL,
        KEEPALIVE_RETRIES,
    );
}

/// How a listener is served.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// Names the listener in logs.
    pub name: &'static str,
    /// Most connections served at once (at least 1).
    pub max_connections: usize,
    /// How long connections get to finish once the shutdown fired.
    pub stop_grace: Duration,
}

/// An accepted connection's number (from 1, per listener) and peer.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Connection number.
    pub id: u64,
    /// `IP:PORT`, or `unix`.
    pub peer: String,
}

/// Exponential backoff between failed accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_MIN)
    }
}

impl Backoff {
    /// The pause to take now; the next one doubles, up to the maximum.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        pause
    }

    /// An accept succeeded: start again from the shortest pause.
    pub fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Accept on `acceptor` until `shutdown` fires, running `handle` for each
/// connection in a task of its own; then drop the acceptor (closing the
/// listening socket) and wait, at most `stop_grace`, for the connections.
pub async fn serve<A, F, Fut>(
    acceptor: A,
    options: AcceptOptions,
    shutdown: Shutdown,
    mut handle: F,
) where
    A: Acceptor,
    F: FnMut(A::Conn, ConnInfo) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::default();
    let mut next_id: u64 = 0;
    loop {
        while tasks.try_join_next().is_some() {}
        // Past the cap, wait here: new clients stay in the backlog.
        let permit = tokio::select! {
            _ = shutdown.wait() => break,
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.wait() => break,
            r = acceptor.accept() => r,
        };
        match accepted {
            Ok((conn, peer)) => {
                backoff.reset();
                next_id += 1;
                let task = handle(conn, ConnInfo { id: next_id, peer });
                tasks.spawn(async move {
                    task.await;
                    drop(permit);
                });
            }
            Err(e) => {
                let pause = backoff.next_pause();
                tracing::warn!(listener = options.name, error = %e, ?pause, "accept failed");
                drop(permit);
                tokio::select! {
                    _ = shutdown.wait() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    drop(acceptor);
    let finished = tokio::time::timeout(options.stop_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            listener = options.name,
            remaining = tasks.len(),
            "connections did not finish in time; closing them"
        );
        tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<_> = (0..10).map(|_| b.next_pause()).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert_eq!(pauses[1], BACKOFF_MIN * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next_pause(), BACKOFF_MIN);
    }

    /// An accepted unix socket sends with a buffer larger than the
    /// default, so a 256 KiB reply needs no wait half-way (where the
    /// kernel allows more than the default at all).
    #[tokio::test]
    async fn accepted_unix_sockets_get_a_larger_send_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).await.unwrap();
        let (accepted, peer) = Acceptor::accept(&listener).await.unwrap();
        assert_eq!(peer, "unix");
        let default = socket2::SockRef::from(&client).send_buffer_size().unwrap();
        let ours = socket2::SockRef::from(&accepted)
            .send_buffer_size()
            .unwrap();
        let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if max > default / 2 {
            assert!(ours > default, "SO_SNDBUF {ours}, default {default}");
        }
        // The kernel doubles what it grants and grants at most wmem_max.
        assert!(
            ours <= 2 * super::super::socket::UNIX_SEND_BUFFER.max(default),
            "{ours}"
        );
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < end, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Two connections at most: the third waits in the backlog until one
    /// leaves; the stop closes the listener and ends the loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cap_holds_extra_clients_in_the_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let served = Arc::new(AtomicUsize::new(0));
        let options = AcceptOptions {
            name: "test",
            max_connections: 2,
            stop_grace: Duration::from_secs(5),
        };
        let count = served.clone();
        let stop = shutdown.clone();
        let server = tokio::spawn(serve(
            listener,
            options,
            shutdown.clone(),
            move |mut s: TcpStream, info| {
                count.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                async move {
                    assert!(info.peer.starts_with("127.0.0.1:"));
                    let keepalive = socket2::SockRef::from(&s).keepalive().unwrap();
                    assert!(keepalive, "keepalive is on");
                    assert!(s.nodelay().unwrap());
                    s.write_all(&info.id.to_be_bytes()).await.unwrap();
                    let mut b = [0u8; 1];
                    tokio::select! {
                        _ = s.read(&mut b) => {}
                        _ = stop.wait() => {}
                    }
                }
            },
        ));
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        let mut id = [0u8; 8];
        a.read_exact(&mut id).await.unwrap();
        b.read_exact(&mut id).await.unwrap();
        // The third connects (backlog) but is not served.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), c.read_exact(&mut id)).await;
        assert!(early.is_err(), "served past the cap");
        assert_eq!(served.load(Ordering::SeqCst), 2);
        // One leaves: the third is served.
        drop(a);
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut id))
            .await
            .expect("served once a slot is free")
            .unwrap();
        assert_eq!(u64::from_be_bytes(id), 3);
        wait_for("three served", || served.load(Ordering::SeqCst) == 3).await;
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the loop stops")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
        drop((b, c));
    }
}
