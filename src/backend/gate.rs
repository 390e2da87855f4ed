//! A backend wrapper that holds requests while the transfer is paused or
//! resuming, and fails them once it has ended. While the gate is closed the
//! backend behind it can be swapped: after a resume the transfer may be
//! served by another data server (real oVirt may pick another host).

use crate::backend::{
    Backend, Capabilities, Error, ErrorKind, Extent, ExtentContext, ReadChunk, Result, ZeroFlags,
};
use bytes::Bytes;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// How long a request waits for a paused transfer to come back.
const HOLD_DEADLINE: Duration = Duration::from_secs(300);

/// Whether requests may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// The transfer is `transferring`: pass.
    Open,
    /// Paused or resuming: wait.
    Closed,
    /// Over: fail with ESHUTDOWN.
    Ended,
}

/// The switch the session holds.
#[derive(Debug, Clone)]
pub struct Gate {
    tx: Arc<watch::Sender<GateState>>,
}

impl Gate {
    /// A gate in `state`.
    pub fn new(state: GateState) -> Self {
        Gate {
            tx: Arc::new(watch::channel(state).0),
        }
    }

    /// Move the gate.
    pub fn set(&self, state: GateState) {
        self.tx.send_replace(state);
    }

    /// The gate's state.
    pub fn state(&self) -> GateState {
        *self.tx.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<GateState> {
        self.tx.subscribe()
    }
}

/// `inner`, behind a [`Gate`].
///
/// Size and capabilities are the first backend's: the NBD clients were told
/// them at the handshake, and a backend swapped in must serve the same
/// image.
#[derive(Debug)]
pub struct GatedBackend<B> {
    inner: RwLock<Arc<B>>,
    size: u64,
    caps: Capabilities,
    gate: Gate,
}

impl<B: Backend> GatedBackend<B> {
    /// Wrap `inner`.
    pub fn new(inner: Arc<B>, gate: Gate) -> Self {
        GatedBackend {
            size: inner.size(),
            caps: inner.capabilities(),
            inner: RwLock::new(inner),
            gate,
        }
    }

    /// The wrapped backend (the current one).
    pub fn inner(&self) -> Arc<B> {
        match self.inner.read() {
            Ok(b) => Arc::clone(&b),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Put `next` in place of the current backend; the old one is returned.
    /// Requests that already passed the gate finish on the old one, so swap
    /// while the gate is closed.
    ///
    /// # Errors
    /// `next` serves an image of another size (nothing is swapped).
    pub fn swap(&self, next: Arc<B>) -> Result<Arc<B>> {
        if next.size() != self.size {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "the new data server has an image of {} bytes, not {}",
                    next.size(),
                    self.size
                ),
            ));
        }
        let mut slot = match self.inner.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        Ok(std::mem::replace(&mut *slot, next))
    }

    /// Wait at the gate, then the backend to use.
    async fn pass(&self) -> Result<Arc<B>> {
        let mut rx = self.gate.subscribe();
        let wait = rx.wait_for(|s| *s != GateState::Closed);
        match tokio::time::timeout(HOLD_DEADLINE, wait).await {
            Ok(Ok(state)) if *state == GateState::Open => Ok(self.inner()),
            Ok(_) => Err(Error::new(ErrorKind::Shutdown, "the transfer has ended")),
            Err(_) => Err(Error::new(
                ErrorKind::Io,
                "the transfer did not resume in time",
            )),
        }
    }
}

impl<B: Backend> Backend for GatedBackend<B> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.pass().await?.read(offset, len).await
    }

    async fn read_parts(&self, offset: u64, len: usize) -> Result<Vec<Bytes>> {
        self.pass().await?.read_parts(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.pass().await?.read_sparse(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.pass().await?.write(offset, data, fua).await
    }

    async fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.pass().await?.zero(offset, len, flags).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.pass().await?.trim(offset, len, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.pass().await?.flush().await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.pass().await?.cache(offset, len).await
    }

    async fn extents(
        &self,
        context: ExtentContext,
        offset: u64,
        len: u64,
        max_count: usize,
    ) -> Result<Vec<Extent>> {
        self.pass()
            .await?
            .extents(context, offset, len, max_count)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;

    #[tokio::test]
    async fn requests_wait_for_the_gate() {
        let gate = Gate::new(GateState::Closed);
        let b = Arc::new(GatedBackend::new(
            Arc::new(MemoryBackend::new(4096, false)),
            gate.clone(),
        ));
        let b2 = Arc::clone(&b);
        let pending = tokio::spawn(async move { b2.read(0, 10).await });
        tokio::task::yield_now().await;
        assert!(!pending.is_finished(), "a closed gate holds requests");
        gate.set(GateState::Open);
        assert_eq!(pending.await.unwrap().unwrap().len(), 10);
        gate.set(GateState::Ended);
        let err = b.read(0, 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Shutdown);
    }

    #[tokio::test]
    async fn a_swapped_backend_serves_the_requests_held_at_the_gate() {
        let gate = Gate::new(GateState::Open);
        let first = Arc::new(MemoryBackend::new(4096, false));
        first
            .write(0, Bytes::from_static(b"old"), false)
            .await
            .unwrap();
        let b = Arc::new(GatedBackend::new(Arc::clone(&first), gate.clone()));
        assert_eq!(&b.read(0, 3).await.unwrap()[..], b"old");

        gate.set(GateState::Closed);
        let b2 = Arc::clone(&b);
        let held = tokio::spawn(async move { b2.read(0, 3).await });
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        let second = Arc::new(MemoryBackend::new(4096, false));
        second
            .write(0, Bytes::from_static(b"new"), false)
            .await
            .unwrap();
        let old = b.swap(Arc::clone(&second)).unwrap();
        assert!(Arc::ptr_eq(&old, &first));
        gate.set(GateState::Open);
        assert_eq!(&held.await.unwrap().unwrap()[..], b"new");
        b.write(3, Bytes::from_static(b"!"), false).await.unwrap();
        assert_eq!(&second.read(0, 4).await.unwrap()[..], b"new!");
        assert_eq!(&first.read(0, 4).await.unwrap()[..], b"old\0");

        let other_size = Arc::new(MemoryBackend::new(8192, false));
        let err = b.swap(other_size).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(
            Arc::ptr_eq(&b.inner(), &second),
            "a refused swap keeps the backend"
        );
    }
}
