//! Idle connections: imageio closes a connection that moved no bytes for
//! 60 s, or for the `inactivity_timeout` of the ticket it used. A
//! connection is idle when no request is being handled and its socket saw
//! no read or write for that long.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shortest pause between two idle checks.
const MIN_CHECK: Duration = Duration::from_millis(100);
/// Longest pause between two idle checks (the timeout may shrink when a
/// ticket is bound).
const MAX_CHECK: Duration = Duration::from_secs(1);

/// `d` in whole milliseconds, saturated: a ticket's `inactivity_timeout`
/// near u64::MAX seconds must not wrap to a short timeout.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Activity of one connection.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    /// Milliseconds since `base` of the last socket I/O.
    last_ms: AtomicU64,
    /// Requests being handled.
    busy: AtomicUsize,
    timeout_ms: AtomicU64,
}

impl Activity {
    /// A fresh connection with `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            timeout_ms: AtomicU64::new(millis(timeout)),
        }
    }

    /// Use `timeout` from now on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Mark a request as being handled until the guard drops.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    /// Resolves once the connection has been idle for its timeout.
    pub async fn idle_expired(&self) {
        loop {
            let timeout = self.timeout_ms.load(Ordering::Relaxed);
            let idle = self
                .now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed));
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            if !busy && idle >= timeout {
                return;
            }
            let wait = if busy { timeout } else { timeout - idle };
            tokio::time::sleep(Duration::from_millis(wait).clamp(MIN_CHECK, MAX_CHECK)).await;
        }
    }
}

/// Ends a request's busy mark; socket activity continues to count.
#[derive(Debug)]
pub struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records its reads and writes in an [`Activity`].
#[derive(Debug)]
pub struct ActivityIo<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> ActivityIo<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_saturate() {
        assert_eq!(millis(Duration::from_secs(u64::MAX)), u64::MAX);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        let a = Activity::new(Duration::from_secs(u64::MAX));
        assert_eq!(a.timeout_ms.load(Ordering::Relaxed), u64::MAX);
    }

    #[tokio::test]
    async fn idle_after_timeout_unless_busy() {
        let a = Arc::new(Activity::new(Duration::from_millis(200)));
        let busy = a.busy();
        // Busy: not idle, long after the timeout.
        assert!(
            tokio::time::timeout(Duration::from_millis(800), a.idle_expired())
                .await
                .is_err()
        );
        drop(busy);
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), a.idle_expired())
            .await
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
