//! The ticket control API client: PUT / GET / PATCH / DELETE
//! `/tickets/<id>` on a data server's unix socket (IMAGEIO-API.md section 2).
//! The same calls drive the real ovirt-imageio daemon and our own data
//! server.

use super::error::{Error, Result};
use super::model::Host;
use crate::telemetry::redact;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long one control call may take. DELETE waits up to the daemon's
/// `remove_timeout` (60 s) for in-flight requests, so it gets more.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const DELETE_TIMEOUT: Duration = Duration::from_secs(75);
/// Largest control reply we read.
const MAX_REPLY: usize = 64 * 1024;

/// A ticket as the control API takes it (`Debug` cuts the id short).
#[derive(Clone, Serialize)]
pub struct TicketSpec {
    /// The ticket id (a secret: never log it in full).
    pub uuid: String,
    /// Bytes the ticket covers.
    pub size: u64,
    /// `file:///abs/path`.
    pub url: String,
    /// Seconds until expiry after the last request.
    pub timeout: u64,
    /// `["write"]` (implies read) or `["read"]`.
    pub ops: Vec<&'static str>,
    /// Socket idle timeout; omitted to take the daemon default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inactivity_timeout: Option<u64>,
    /// Zero punches holes.
    pub sparse: bool,
    /// Dirty extents (backups only).
    pub dirty: bool,
    /// Label in the daemon's logs.
    pub transfer_id: String,
    /// Download file name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

impl std::fmt::Debug for TicketSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSpec")
            .field("uuid", &redact(&self.uuid))
            .field("size", &self.size)
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("ops", &self.ops)
            .field("transfer_id", &self.transfer_id)
            .finish_non_exhaustive()
    }
}

/// What we read from `GET /tickets/<id>`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TicketStatus {
    /// A request is in flight.
    #[serde(default)]
    pub active: bool,
    /// Seconds since the last request ended (imageio >= 1.3; older data
    /// servers leave it out).
    #[serde(default)]
    pub idle_time: Option<f64>,
    /// Bytes moved (single-op tickets only).
    #[serde(default)]
    pub transferred: Option<u64>,
    /// HTTP connections bound to the ticket.
    #[serde(default)]
    pub connections: u64,
}

/// How long a health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The ticket id probes ask for: any answer, even 404, means the control
/// API is up.
pub(crate) const PROBE_TICKET: &str = "00000000-0000-4000-8000-000000000000";

/// A host's status as the API shows it (oVirt's HostStatus values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStatus {
    /// Its control API answers.
    Up,
    /// Its control API did not answer the last check.
    NonResponsive,
}

impl HostStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Up => "up",
            HostStatus::NonResponsive => "non_responsive",
        }
    }
}

/// The status of each host, kept by a periodic check of its control API
/// ([`check_hosts`]). A host never checked is `non_responsive`.
#[derive(Debug, Default)]
pub struct HostStatuses {
    map: std::sync::Mutex<std::collections::HashMap<String, HostStatus>>,
}

impl HostStatuses {
    /// The status of host `id`.
    pub fn get(&self, id: &str) -> HostStatus {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).copied().unwrap_or(HostStatus::NonResponsive)
    }

    fn set(&self, id: &str, status: HostStatus) -> Option<HostStatus> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(id.to_string(), status)
    }
}

/// Probe every host's control API (at once) and record its status; a
/// change is logged.
pub async fn check_hosts(hosts: &[Host], statuses: &HostStatuses) {
    let mut probes = tokio::task::JoinSet::new();
    for h in hosts {
        let h = h.clone();
        probes.spawn(async move {
            let up = Control::new(h.clone()).probe().await;
            (h, up)
        });
    }
    while let Some(done) = probes.join_next().await {
        let Ok((h, up)) = done else { continue };
        let status = if up {
            HostStatus::Up
        } else {
            HostStatus::NonResponsive
        };
        if statuses.set(&h.id, status) != Some(status) {
            tracing::info!(host = %h.name, status = status.as_str(), "host status");
        }
    }
}

/// A control API client for one host.
#[derive(Debug, Clone)]
pub struct Control {
    host: Host,
}

impl Control {
    /// A client for `host`.
    pub fn new(host: Host) -> Self {
        Control { host }
    }

    fn fail(&self, message: impl Into<String>) -> Error {
        Error::Host {
            host: self.host.name.clone(),
            message: message.into(),
        }
    }

    async fn call(
        &self,
        method: Method,
        ticket: &str,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes)> {
        let what = format!("{method} /tickets/{}", redact(ticket));
        let fut = self.call_inner(method, ticket, body);
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(self.fail(format!("{what}: {e}"))),
            Err(_) => Err(self.fail(format!("{what}: no reply within {limit:?}"))),
        }
    }

    async fn call_inner(
        &self,
        method: Method,
        ticket: &str,
        body: Option<Vec<u8>>,
    ) -> std::result::Result<(StatusCode, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        let stream = tokio::net::UnixStream::connect(&self.host.control_socket).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/tickets/{ticket}"))
            .header(header::HOST, "localhost");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    fn check(&self, op: &str, status: StatusCode, body: &Bytes) -> Result<()> {
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(body);
        Err(self.fail(format!("{op}: {status} {}", text.trim())))
    }

    /// Whether the control API answers at all (any HTTP status).
    pub async fn probe(&self) -> bool {
        self.call(Method::GET, PROBE_TICKET, None, PROBE_TIMEOUT)
            .await
            .is_ok()
    }

    /// Install (or replace) a ticket.
    pub async fn put(&self, spec: &TicketSpec) -> Result<()> {
        let body = serde_json::to_vec(spec).map_err(|e| self.fail(format!("ticket JSON: {e}")))?;
        let (status, reply) = self
            .call(Method::PUT, &spec.uuid, Some(body), CALL_TIMEOUT)
            .await?;
        self.check("PUT ticket", status, &reply)
    }

    /// Read a ticket's status; `Ok(None)` if the data server does not know it.
    pub async fn get(&self, ticket: &str) -> Result<Option<TicketStatus>> {
        let (status, reply) = self.call(Method::GET, ticket, None, CALL_TIMEOUT).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.check("GET ticket", status, &reply)?;
        serde_json::from_slice(&reply)
            .map(Some)
            .map_err(|e| self.fail(format!("GET ticket: bad JSON: {e}")))
    }

    /// Set the ticket's expiry to now + `timeout` seconds.
    pub async fn extend(&self, ticket: &str, timeout: u64) -> Result<()> {
        let body = serde_json::json!({ "timeout": timeout })
            .to_string()
            .into_bytes();
        let (status, reply) = self
            .call(Method::PATCH, ticket, Some(body), CALL_TIMEOUT)
            .await?;
        self.check("PATCH ticket", status, &reply)
    }

    /// Remove a ticket (idempotent on the data server).
    pub async fn delete(&self, ticket: &str) -> Result<()> {
        let (status, reply) = self
            .call(Method::DELETE, ticket, None, DELETE_TIMEOUT)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.check("DELETE ticket", status, &reply)
    }
}
