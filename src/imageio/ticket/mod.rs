//! Tickets: the unit of authorization (ops, size, expiry) and accounting
//! (in-flight operations, transferred bytes, connections).
//!
//! A [`Ticket`] is shared by every connection that uses it. Each data
//! request runs as an [`Op`] registered on the ticket; the op's guard
//! updates accounting and slides the expiry when it ends. [`TicketStore::remove`]
//! cancels a ticket and waits (bounded) for its ops to finish.
//!
//! # Layout
//! - `spec`: the ticket JSON, validated ([`TicketSpec`], [`Access`]).
//! - `url`: the storage a ticket URL names ([`BackendUrl`]).
//! - `progress`: bytes moved, per op and merged ([`OpProgress`]).
//! - this module: one installed [`Ticket`] and its op guard.
//! - `store`: every ticket by id ([`TicketStore`]).

mod progress;
mod spec;
mod store;
mod url;

pub use progress::OpProgress;
pub use spec::{Access, TicketSpec, py_repr, validate_id};
pub use store::TicketStore;
pub use url::{BackendUrl, parse_url};

use super::error::ApiError;
use super::storage::Storage;
use progress::RangeList;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::watch;

#[derive(Debug, Default)]
struct TicketState {
    /// Expiry in store-clock seconds.
    expires: u64,
    access_time: u64,
    canceled: bool,
    ongoing: HashMap<u64, Arc<OpProgress>>,
    next_op: u64,
    completed: RangeList,
    connections: HashSet<u64>,
}

/// One installed ticket.
#[derive(Debug)]
pub struct Ticket {
    spec: TicketSpec,
    clock: Clock,
    state: Mutex<TicketState>,
    /// Number of ops in flight; `remove` waits for 0.
    ongoing_tx: watch::Sender<usize>,
    /// Becomes true when the ticket is cancelled.
    canceled_tx: watch::Sender<bool>,
    /// The open storage, opened on first use; an NBD connection that
    /// failed is reopened by the next request.
    storage: tokio::sync::Mutex<Option<Storage>>,
}

/// Seconds since the store was made: the clock of `expires`.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
    fn now_secs(&self) -> u64 {
        self.0.elapsed().as_secs()
    }
}

impl Ticket {
    fn new(spec: TicketSpec, clock: Clock) -> Self {
        let now = clock.now_secs();
        let state = TicketState {
            expires: now.saturating_add(spec.timeout),
            access_time: now,
            ..TicketState::default()
        };
        Ticket {
            spec,
            clock,
            state: Mutex::new(state),
            ongoing_tx: watch::channel(0).0,
            canceled_tx: watch::channel(false).0,
            storage: tokio::sync::Mutex::new(None),
        }
    }

    /// The ticket as installed.
    pub fn spec(&self) -> &TicketSpec {
        &self.spec
    }

    fn state(&self) -> MutexGuard<'_, TicketState> {
        // A panic while holding this lock leaves plain counters behind:
        // keep serving with them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether DELETE has cancelled the ticket.
    pub fn canceled(&self) -> bool {
        self.state().canceled
    }

    /// Slide the expiry: `timeout` seconds from now.
    pub fn touch(&self) {
        let now = self.clock.now_secs();
        let mut st = self.state();
        st.expires = now.saturating_add(self.spec.timeout);
        st.access_time = now;
    }

    /// Control `PATCH {"timeout": n}`: expire `n` seconds from now, once.
    pub fn extend(&self, timeout: u64) {
        let now = self.clock.now_secs();
        self.state().expires = now.saturating_add(timeout);
    }

    /// Bind a connection to the ticket (counted in `connections`).
    pub fn add_connection(&self, conn: u64) {
        self.state().connections.insert(conn);
    }

    /// Unbind a closed connection.
    pub fn remove_connection(&self, conn: u64) {
        self.state().connections.remove(&conn);
    }

    /// Register an op over `offset..` ; the returned guard ends it.
    ///
    /// # Errors
    /// 403 when the ticket was cancelled meanwhile.
    pub fn start_op(self: &Arc<Self>, offset: u64) -> Result<OpGuard, ApiError> {
        let progress = Arc::new(OpProgress {
            offset,
            done: AtomicU64::new(0),
        });
        let id = {
            let mut st = self.state();
            if st.canceled {
                return Err(ApiError::Forbidden(format!(
                    "Transfer {} was canceled",
                    self.spec.transfer_id
                )));
            }
            st.next_op += 1;
            let id = st.next_op;
            st.ongoing.insert(id, progress.clone());
            self.ongoing_tx.send_replace(st.ongoing.len());
            id
        };
        Ok(OpGuard {
            ticket: self.clone(),
            id,
            progress,
        })
    }

    /// The storage behind the ticket: opened once, shared by every
    /// request; a broken NBD connection is replaced.
    ///
    /// # Errors
    /// The file cannot be opened, or the NBD server cannot be reached.
    pub(crate) async fn storage(&self) -> std::io::Result<Storage> {
        let mut slot = self.storage.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_broken() {
                return Ok(s.clone());
            }
            tracing::info!(transfer = %self.spec.log_label(), "reconnecting to the NBD server");
        }
        let s = Storage::open(
            &self.spec.backend,
            self.spec.may(Access::Write),
            self.spec.dirty,
        )
        .await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Close the storage (NBD: disconnect); the next request reopens it.
    pub(crate) async fn close_storage(&self) {
        let taken = self.storage.lock().await.take();
        if let Some(s) = taken {
            s.close().await;
        }
    }

    /// Bytes moved so far (union of completed and running op ranges); only
    /// for tickets with exactly one op, like imageio.
    pub fn transferred(&self) -> Option<u64> {
        if self.spec.ops.len() != 1 {
            return None;
        }
        let st = self.state();
        let mut ranges = st.completed.clone();
        for op in st.ongoing.values() {
            ranges.add(op.offset, op.offset + op.done.load(Ordering::Relaxed));
        }
        Some(ranges.sum())
    }

    /// The status JSON of the control API's GET.
    pub fn info(&self) -> Value {
        let transferred = self.transferred();
        let now = self.clock.now_secs();
        let st = self.state();
        let active = !st.ongoing.is_empty();
        let mut info = json!({
            "active": active,
            "canceled": st.canceled,
            "connections": st.connections.len(),
            "expires": st.expires,
            "idle_time": if active { 0 } else { now.saturating_sub(st.access_time) },
            "inactivity_timeout": self.spec.inactivity_timeout,
            "ops": self.spec.ops,
            "size": self.spec.size,
            "sparse": self.spec.sparse,
            "dirty": self.spec.dirty,
            "timeout": self.spec.timeout,
            "url": self.spec.url,
            "uuid": self.spec.uuid,
            "transfer_id": self.spec.transfer_id,
        });
        if let Some(obj) = info.as_object_mut() {
            if let Some(name) = &self.spec.filename {
                obj.insert("filename".into(), json!(name));
            }
            if let Some(t) = transferred {
                obj.insert("transferred".into(), json!(t));
            }
        }
        info
    }

    fn cancel(&self) {
        self.state().canceled = true;
        self.canceled_tx.send_replace(true);
    }

    /// Resolves once the ticket is cancelled, so an op blocked on a slow
    /// peer can stop without waiting for the peer.
    pub async fn wait_canceled(&self) {
        let mut rx = self.canceled_tx.subscribe();
        // The sender lives as long as the ticket: an error cannot happen.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// A running op; dropping it ends the op: accounting, expiry slide, and a
/// wake-up for a waiting DELETE.
#[derive(Debug)]
pub struct OpGuard {
    ticket: Arc<Ticket>,
    id: u64,
    progress: Arc<OpProgress>,
}

impl OpGuard {
    /// Progress handle, to count bytes from another task.
    pub fn progress(&self) -> &Arc<OpProgress> {
        &self.progress
    }

    /// The ticket this op runs on.
    pub fn ticket(&self) -> &Arc<Ticket> {
        &self.ticket
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let t = &self.ticket;
        let canceled = {
            let mut st = t.state();
            st.ongoing.remove(&self.id);
            t.ongoing_tx.send_replace(st.ongoing.len());
            if !st.canceled && t.spec.ops.len() == 1 {
                let p = &self.progress;
                st.completed
                    .add(p.offset, p.offset + p.done.load(Ordering::Relaxed));
            }
            st.canceled
        };
        if !canceled {
            t.touch();
        }
    }
}
