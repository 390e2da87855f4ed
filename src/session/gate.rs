//! A backend wrapper that holds requests while the transfer is paused or
//! resuming, and fails them once it has ended.

use crate::backend::{
    Backend, Capabilities, Error, ErrorKind, Extent, ExtentContext, ReadChunk, Result, ZeroFlags,
};
use bytes::Bytes;
use std::sync::Arc;
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
#[derive(Debug)]
pub struct GatedBackend<B> {
    inner: Arc<B>,
    gate: Gate,
}

impl<B: Backend> GatedBackend<B> {
    /// Wrap `inner`.
    pub fn new(inner: Arc<B>, gate: Gate) -> Self {
        GatedBackend { inner, gate }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<B> {
        &self.inner
    }

    async fn pass(&self) -> Result<()> {
        let mut rx = self.gate.subscribe();
        let wait = rx.wait_for(|s| *s != GateState::Closed);
        match tokio::time::timeout(HOLD_DEADLINE, wait).await {
            Ok(Ok(state)) if *state == GateState::Open => Ok(()),
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
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.pass().await?;
        self.inner.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.pass().await?;
        self.inner.read_sparse(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.pass().await?;
        self.inner.write(offset, data, fua).await
    }

    async fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.pass().await?;
        self.inner.zero(offset, len, flags).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.pass().await?;
        self.inner.trim(offset, len, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.pass().await?;
        self.inner.flush().await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.pass().await?;
        self.inner.cache(offset, len).await
    }

    async fn extents(
        &self,
        context: ExtentContext,
        offset: u64,
        len: u64,
        max_count: usize,
    ) -> Result<Vec<Extent>> {
        self.pass().await?;
        self.inner.extents(context, offset, len, max_count).await
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
}
