//! The task that sends coalesced writes: NBD writes come in over a
//! channel, a [`Gatherer`] batches them, each batch goes out as one PUT
//! (at most `max_inflight` at once), and every write of a batch gets that
//! PUT's result.
//!
//! The PUTs run in tasks of their own, so an NBD write whose future is
//! dropped leaves neither its batch nor the other writes of it stranded.

use super::Http;
use super::coalesce::{Batch, Gatherer, Limits};
use crate::backend::{Error, ErrorKind, Result};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// What to do after a batch reached the server, before its writes are
/// answered (keep the extent map and the read-ahead cache coherent).
pub type AfterWrite = Arc<dyn Fn(u64, u64) + Send + Sync>;

struct Job {
    offset: u64,
    data: Bytes,
    fua: bool,
    reply: oneshot::Sender<Result<()>>,
}

/// The handle writes go through; the task ends when it is dropped and the
/// last batch was answered.
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Start the task (inside a tokio runtime).
    pub fn spawn(http: Arc<Http>, limits: Limits, after: AfterWrite) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, http, limits, after));
        Writer { tx }
    }

    /// Write `data` at `offset` through a batch; answered with the result
    /// of the PUT that carried it.
    ///
    /// # Errors
    /// That PUT failed, or the writer is gone.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                offset,
                data,
                fua,
                reply,
            })
            .map_err(|_| Error::new(ErrorKind::Shutdown, "the writer has stopped"))?;
        answer
            .await
            .map_err(|_| Error::new(ErrorKind::Io, "the write was abandoned before it was sent"))?
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Job>,
    http: Arc<Http>,
    limits: Limits,
    after: AfterWrite,
) {
    let mut g: Gatherer<oneshot::Sender<Result<()>>> = Gatherer::new(limits);
    let mut puts = JoinSet::new();
    let mut closed = false;
    loop {
        // Take every write already waiting before deciding what to send,
        // so they gather.
        while !closed && g.can_take() {
            match rx.try_recv() {
                Ok(job) => g.add(job.offset, job.data, job.fua, job.reply),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        while let Some(batch) = g.next_batch() {
            puts.spawn(send(http.clone(), batch, after.clone()));
        }
        if closed && g.is_idle() && puts.is_empty() {
            return;
        }
        tokio::select! {
            job = rx.recv(), if !closed && g.can_take() => match job {
                Some(job) => g.add(job.offset, job.data, job.fua, job.reply),
                None => closed = true,
            },
            Some(_) = puts.join_next(), if !puts.is_empty() => g.done(),
            else => {
                // Unreachable by the gatherer's rules; the waiters still
                // get an error (their senders drop), never a success.
                tracing::error!("coalescing writer stalled");
                return;
            }
        }
    }
}

/// One PUT for a batch, then every write in it answered with its result.
async fn send(http: Arc<Http>, batch: Batch<oneshot::Sender<Result<()>>>, after: AfterWrite) {
    let result = super::retry(|| http.put_once(batch.offset, &batch.parts, batch.fua)).await;
    if result.is_ok() {
        after(batch.offset, batch.len);
    } else {
        tracing::debug!(
            offset = batch.offset,
            len = batch.len,
            writes = batch.waiters.len(),
            "coalesced PUT failed; failing every write it carried"
        );
    }
    for waiter in batch.waiters {
        let answer = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::new(e.kind(), e.message())),
        };
        // A waiter that went away needs no answer.
        let _ = waiter.send(answer);
    }
}
