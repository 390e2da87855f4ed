//! Idle connections: imageio closes a connection that moved no bytes for
//! 60 s, or for the `inactivity_timeout` of the ticket it used. A
//! connection is idle when no request is being handled and its socket saw
//! no read or write for that long.
//!
//! Request heads: once the first byte of a request head arrives, the whole
//! head must arrive within the header deadline and stay under
//! [`MAX_HEAD_READ`] bytes, or the connection is closed (a slowloris that
//! drips a byte now and then never counts as idle). hyper's own
//! `header_read_timeout` is not used: it also runs while a keep-alive
//! connection waits for its next request, which imageio clients may do for
//! a ticket's whole `inactivity_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shortest pause between two idle checks.
const MIN_CHECK: Duration = Duration::from_millis(100);
/// Longest pause between two idle checks (the timeout may shrink when a
/// ticket is bound).
const MAX_CHECK: Duration = Duration::from_secs(1);
/// Most bytes a request head may take before the connection is closed
/// (twice hyper's `max_header_size`, so that a whole head past that limit
/// still gets hyper's 431 answer).
pub const MAX_HEAD_READ: usize = 2 * super::MAX_HEAD_SIZE;
/// No request head is being received.
const NO_HEAD: u64 = u64::MAX;

/// Why a connection is closed by its watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No bytes and no request for the idle timeout.
    Idle,
    /// A request head took longer than the header deadline.
    HeadDeadline,
}

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
    /// The next bytes read start a request head.
    expect_head: AtomicBool,
    /// Milliseconds since `base` when the head being received began
    /// (`NO_HEAD`: none), pushed forward while we write.
    head_start_ms: AtomicU64,
    header_timeout_ms: u64,
}

impl Activity {
    /// A fresh connection with an idle `timeout` and a deadline for each
    /// request head.
    pub fn new(timeout: Duration, header_timeout: Duration) -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            timeout_ms: AtomicU64::new(millis(timeout)),
            expect_head: AtomicBool::new(true),
            head_start_ms: AtomicU64::new(NO_HEAD),
            header_timeout_ms: millis(header_timeout),
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
        // The head is complete: what the request reads is its body.
        self.head_done();
        BusyGuard(self.clone())
    }

    fn head_done(&self) {
        self.expect_head.store(false, Ordering::Relaxed);
        self.head_start_ms.store(NO_HEAD, Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle for its timeout, or a
    /// request head missed its deadline; which of the two.
    pub async fn idle_expired(&self) -> Expired {
        loop {
            let now = self.now_ms();
            let head = self.head_start_ms.load(Ordering::Relaxed);
            let mut wait = u64::MAX;
            if head != NO_HEAD {
                let taken = now.saturating_sub(head);
                if taken >= self.header_timeout_ms {
                    return Expired::HeadDeadline;
                }
                wait = self.header_timeout_ms - taken;
            }
            let timeout = self.timeout_ms.load(Ordering::Relaxed);
            let idle = now.saturating_sub(self.last_ms.load(Ordering::Relaxed));
            let busy = self.busy.load(Ordering::Relaxed) > 0;
            if !busy && idle >= timeout {
                return Expired::Idle;
            }
            wait = wait.min(if busy { timeout } else { timeout - idle });
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
        if self.0.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.expect_head.store(true, Ordering::Relaxed);
        }
    }
}

/// Finds the blank line that ends a request head across reads: `\n\n`,
/// with any `\r` in between ignored (as httparse accepts).
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadScan {
    /// The last significant byte was a line feed.
    after_newline: bool,
    /// Bytes of this head seen so far.
    seen: usize,
}

impl HeadScan {
    /// Feed `data`; the index just past the head's end, if it is in there.
    pub fn feed(&mut self, data: &[u8]) -> Option<usize> {
        for (i, &b) in data.iter().enumerate() {
            match b {
                b'\n' if self.after_newline => {
                    *self = HeadScan::default();
                    return Some(i + 1);
                }
                b'\n' => self.after_newline = true,
                b'\r' => {}
                _ => self.after_newline = false,
            }
        }
        self.seen = self.seen.saturating_add(data.len());
        None
    }

    /// Bytes of the unfinished head seen so far.
    pub fn seen(&self) -> usize {
        self.seen
    }
}

/// A socket that records its reads and writes in an [`Activity`].
#[derive(Debug)]
pub struct ActivityIo<S> {
    inner: S,
    activity: Arc<Activity>,
    head: HeadScan,
}

impl<S> ActivityIo<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        ActivityIo {
            inner,
            activity,
            head: HeadScan::default(),
        }
    }

    /// Account for `data` just read: start, follow or end a request head.
    fn on_read(&mut self, data: &[u8]) -> io::Result<()> {
        let a = &self.activity;
        a.touch();
        if !a.expect_head.load(Ordering::Relaxed) {
            return Ok(());
        }
        if a.head_start_ms.load(Ordering::Relaxed) == NO_HEAD {
            a.head_start_ms.store(a.now_ms(), Ordering::Relaxed);
        }
        if self.head.feed(data).is_some() {
            a.head_done();
        } else if self.head.seen() > MAX_HEAD_READ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request head larger than {MAX_HEAD_READ} bytes"),
            ));
        }
        Ok(())
    }

    fn on_write(&self) {
        let a = &self.activity;
        a.touch();
        // A head that arrives while we send waits on us, not on the peer.
        if a.head_start_ms.load(Ordering::Relaxed) != NO_HEAD {
            a.head_start_ms.store(a.now_ms(), Ordering::Relaxed);
        }
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
            let data = buf.filled().get(before..).unwrap_or_default();
            // Split borrow: the scan state lives beside the reader.
            let this = &mut *self;
            if let Err(e) = this.on_read(data) {
                return Poll::Ready(Err(e));
            }
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
            self.on_write();
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
            self.on_write();
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
        let a = Activity::new(Duration::from_secs(u64::MAX), Duration::from_secs(u64::MAX));
        assert_eq!(a.timeout_ms.load(Ordering::Relaxed), u64::MAX);
        assert_eq!(a.header_timeout_ms, u64::MAX);
    }

    #[test]
    fn head_ends_at_the_blank_line_across_reads() {
        let mut s = HeadScan::default();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\nHost: x\r"), None);
        assert_eq!(s.seen(), 24);
        assert_eq!(s.feed(b"\n\r"), None);
        assert_eq!(s.feed(b"\nBODY"), Some(1));
        assert_eq!(s.seen(), 0);
        assert_eq!(HeadScan::default().feed(b"GET / HTTP/1.1\n\nX"), Some(16));
        // A lone line feed between header lines does not end the head.
        let mut s = HeadScan::default();
        assert_eq!(s.feed(b"a\r\nb\r\nc"), None);
        assert_eq!(s.feed(b"\r\n\r\n"), Some(4));
    }

    /// A head that starts and stalls closes the connection at the header
    /// deadline; a head that completes does not; bytes past the limit
    /// fail the read.
    #[tokio::test]
    async fn head_deadline_and_size() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let a = Arc::new(Activity::new(
            Duration::from_secs(60),
            Duration::from_millis(300),
        ));
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut io = ActivityIo::new(server, a.clone());
        client
            .write_all(b"GET /images/x HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0);
        let expired = tokio::time::timeout(Duration::from_secs(5), a.idle_expired())
            .await
            .expect("the head deadline fires");
        assert_eq!(expired, Expired::HeadDeadline);

        // A complete head: the request is handled, no deadline runs.
        let a = Arc::new(Activity::new(
            Duration::from_secs(60),
            Duration::from_millis(300),
        ));
        let mut io = ActivityIo::new(io.inner, a.clone());
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(n, 18, "the whole head in one read");
        assert_eq!(a.head_start_ms.load(Ordering::Relaxed), NO_HEAD);
        let guard = a.busy();
        client.write_all(&[b'x'; 100]).await.unwrap();
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0);
        assert_eq!(
            a.head_start_ms.load(Ordering::Relaxed),
            NO_HEAD,
            "a body is no head"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(600), a.idle_expired())
                .await
                .is_err()
        );
        drop(guard);

        // The next head may not grow past the limit.
        let big = vec![b'h'; MAX_HEAD_READ + 1];
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&big).await;
            client
        });
        let mut sink = vec![0u8; 64 * 1024];
        let err = loop {
            match io.read(&mut sink).await {
                Ok(0) => panic!("EOF before the limit"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(io);
        let _ = writer.await;
    }

    #[tokio::test]
    async fn idle_after_timeout_unless_busy() {
        let a = Arc::new(Activity::new(
            Duration::from_millis(200),
            Duration::from_secs(30),
        ));
        let busy = a.busy();
        // Busy: not idle, long after the timeout.
        assert!(
            tokio::time::timeout(Duration::from_millis(800), a.idle_expired())
                .await
                .is_err()
        );
        drop(busy);
        let start = Instant::now();
        let expired = tokio::time::timeout(Duration::from_secs(5), a.idle_expired())
            .await
            .unwrap();
        assert_eq!(expired, Expired::Idle);
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
