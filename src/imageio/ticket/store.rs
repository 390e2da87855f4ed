//! The ticket store: every installed ticket by id; authorization
//! (exists, not expired, allows the op) and removal (cancel, then wait,
//! bounded, for the ops in flight).

use super::{Access, Clock, Ticket, TicketSpec};
use crate::imageio::error::ApiError;
use crate::telemetry::redact;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Every installed ticket, by id.
#[derive(Debug)]
pub struct TicketStore {
    tickets: Mutex<HashMap<String, Arc<Ticket>>>,
    clock: Clock,
    default_inactivity: u64,
    remove_timeout: Duration,
}

impl TicketStore {
    /// An empty store. `default_inactivity` fills a ticket's missing
    /// `inactivity_timeout`; `remove_timeout` bounds DELETE's wait.
    pub fn new(default_inactivity: u64, remove_timeout: Duration) -> Self {
        TicketStore {
            tickets: Mutex::new(HashMap::new()),
            clock: Clock(Instant::now()),
            default_inactivity,
            remove_timeout,
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Ticket>>> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Default `inactivity_timeout` for tickets that do not set one.
    pub fn default_inactivity(&self) -> u64 {
        self.default_inactivity
    }

    /// Install (or replace) a ticket.
    pub fn add(&self, spec: TicketSpec) {
        tracing::info!(
            ticket = %redact(&spec.uuid),
            transfer = %spec.log_label(),
            size = spec.size,
            ops = ?spec.ops,
            "ticket added"
        );
        let ticket = Arc::new(Ticket::new(spec, self.clock));
        // Like imageio, a re-PUT replaces the ticket; ops running on the old
        // one finish on it.
        self.map().insert(ticket.spec.uuid.clone(), ticket);
    }

    /// The ticket `id`, if installed.
    pub fn get(&self, id: &str) -> Option<Arc<Ticket>> {
        self.map().get(id).cloned()
    }

    /// Check that `id` may do `access` now.
    ///
    /// # Errors
    /// 403 with imageio's reasons: no such ticket, canceled, expired, forbids.
    pub fn authorize(&self, id: &str, access: Access) -> Result<Arc<Ticket>, ApiError> {
        let Some(ticket) = self.get(id) else {
            return Err(ApiError::Forbidden(format!("No such ticket {id}")));
        };
        let tid = &ticket.spec.transfer_id;
        let (canceled, expires) = {
            let st = ticket.state();
            (st.canceled, st.expires)
        };
        if canceled {
            return Err(ApiError::Forbidden(format!("Transfer={tid} was canceled")));
        }
        if (expires as f64) <= self.clock.now() {
            return Err(ApiError::Forbidden(format!("Transfer={tid} expired")));
        }
        if !ticket.spec.may(access) {
            return Err(ApiError::Forbidden(format!(
                "Transfer={tid} forbids {}",
                access.name()
            )));
        }
        Ok(ticket)
    }

    /// Cancel ticket `id`, wait (bounded) for its ops to end, then remove it.
    /// Unknown ids are fine (DELETE is idempotent).
    ///
    /// # Errors
    /// 409 when ops are still running after the remove timeout; the ticket
    /// stays, cancelled, and a later DELETE may succeed.
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        let Some(ticket) = self.get(id) else {
            return Ok(());
        };
        ticket.cancel();
        let mut rx = ticket.ongoing_tx.subscribe();
        let idle = matches!(
            tokio::time::timeout(self.remove_timeout, rx.wait_for(|n| *n == 0)).await,
            Ok(Ok(_))
        );
        if !idle {
            return Err(ApiError::Conflict(format!(
                "Timeout cancelling transfer {}",
                ticket.spec.transfer_id
            )));
        }
        {
            let mut map = self.map();
            if map.get(id).is_some_and(|t| Arc::ptr_eq(t, &ticket)) {
                map.remove(id);
            }
        }
        ticket.close_storage().await;
        tracing::info!(ticket = %redact(id), transfer = %ticket.spec.log_label(), "ticket removed");
        Ok(())
    }

    /// Remove every ticket (cancelling running ops, not waiting).
    pub fn clear(&self) {
        let mut map = self.map();
        for t in map.values() {
            t.cancel();
        }
        map.clear();
        tracing::info!("all tickets removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imageio::ticket::spec::tests::spec;
    use serde_json::json;

    #[tokio::test]
    async fn ops_and_cancel() {
        let store = TicketStore::new(60, Duration::from_secs(5));
        store.add(spec(json!({"ops": ["write"]})).unwrap());
        let t = store.authorize("abc", Access::Write).unwrap();
        assert!(store.authorize("abc", Access::Read).is_ok());
        let op = t.start_op(10).unwrap();
        op.progress().add(5);
        assert_eq!(t.transferred(), Some(5));
        assert_eq!(t.info()["active"], json!(true));
        let remove = store.remove("abc");
        tokio::pin!(remove);
        // DELETE waits while the op runs.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut remove)
                .await
                .is_err()
        );
        assert!(store.authorize("abc", Access::Read).is_err());
        drop(op);
        remove.await.unwrap();
        assert!(store.get("abc").is_none());
    }

    #[test]
    fn timeouts_near_u64_max_do_not_overflow() {
        let store = TicketStore::new(60, Duration::from_secs(1));
        store.add(spec(json!({"timeout": u64::MAX})).unwrap());
        let ticket = store.authorize("abc", Access::Read).unwrap();
        ticket.touch();
        ticket.extend(u64::MAX);
        assert_eq!(ticket.info()["expires"], json!(u64::MAX));
        assert!(store.authorize("abc", Access::Read).is_ok());
    }

    #[tokio::test]
    async fn expiry_and_forbid() {
        let store = TicketStore::new(60, Duration::from_secs(1));
        store.add(spec(json!({})).unwrap());
        let e = store
            .authorize("abc", Access::Write)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("Transfer=(ticket/abc) forbids write"), "{e}");
        store.get("abc").unwrap().extend(0);
        let e = store
            .authorize("abc", Access::Read)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("expired"), "{e}");
        let e = store
            .authorize("nope", Access::Read)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "You are not allowed to access this resource: No such ticket nope"
        );
    }
}
