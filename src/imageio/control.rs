//! The ticket control API on its unix socket: PUT / GET / PATCH / DELETE
//! `/tickets/<id>` and DELETE `/tickets/`, compatible with ovirt-imageio's.

use super::body::{self, Body};
use super::error::ApiError;
use super::handlers::{json_response, not_allowed};
use super::ticket::{TicketSpec, py_repr};
use super::{Failure, RequestBody, Shared};
use crate::telemetry::redact;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

/// Largest ticket or patch JSON read.
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// Serve one control request; `id` is the path after `/tickets/`.
pub async fn tickets(
    shared: &Shared,
    req: Request<RequestBody>,
    id: &str,
) -> Result<Response<Body>, Failure> {
    let method = req.method().clone();
    tracing::debug!(%method, ticket = %redact(id), "control request");
    match method {
        Method::GET => {
            require_id(id)?;
            let ticket = shared
                .tickets
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("No such ticket '{id}'")))?;
            Ok(json_response(&ticket.info()))
        }
        Method::PUT => {
            require_id(id).map_err(Failure::closing)?;
            let data = super::read_body(req.into_body(), MAX_CONTROL_BODY).await?;
            let value: Value = serde_json::from_slice(&data).map_err(|e| {
                ApiError::BadRequest(format!("Ticket is not in a json format: {e}"))
            })?;
            let spec = TicketSpec::parse(&value, shared.tickets.default_inactivity())?;
            shared.tickets.add(spec);
            Ok(Response::new(body::empty()))
        }
        Method::PATCH => {
            require_id(id).map_err(Failure::closing)?;
            let data = super::read_body(req.into_body(), MAX_CONTROL_BODY).await?;
            let value: Value = serde_json::from_slice(&data)
                .map_err(|e| ApiError::BadRequest(format!("Invalid patch: {e}")))?;
            let Some(obj) = value.as_object() else {
                return Err(
                    ApiError::BadRequest("Invalid patch: expecting a JSON object".into()).into(),
                );
            };
            let timeout = match obj.get("timeout") {
                None => {
                    return Err(ApiError::BadRequest(
                        "Missing required value for 'timeout'".into(),
                    )
                    .into());
                }
                Some(Value::Number(n)) if n.is_u64() => n.as_u64().unwrap_or(0),
                Some(Value::Number(n)) if n.is_i64() => {
                    return Err(ApiError::BadRequest(format!("Invalid value {n} < 0")).into());
                }
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "Integer required {}",
                        py_repr(other)
                    ))
                    .into());
                }
            };
            let ticket = shared
                .tickets
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("No such ticket: {id}")))?;
            tracing::info!(ticket = %redact(id), timeout, "ticket extended");
            ticket.extend(timeout);
            Ok(Response::new(body::empty()))
        }
        Method::DELETE => {
            if id.is_empty() {
                shared.tickets.clear();
            } else {
                shared.tickets.remove(id).await?;
            }
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        _ => Err(Failure::closing(not_allowed(&method, req.uri().path()).err)),
    }
}

fn require_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        Err(ApiError::BadRequest("Ticket id is required".into()))
    } else {
        Ok(())
    }
}
