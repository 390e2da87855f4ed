//! GET `/images/<ticket>/extents`: zero (and dirty) extents.

use super::*;

pub(super) async fn extents(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let ticket = authorize(shared, conn, id, Access::Read)?;
    let context = query.get("context").unwrap_or("zero");
    if context != "zero" && context != "dirty" {
        return Err(ApiError::BadRequest(format!(
            "Unsupported value '{context}' for 'context', expecting one of ['dirty', 'zero']"
        ))
        .into());
    }
    if context == "dirty" && !ticket.spec().dirty {
        return Err(ApiError::NotFound("Ticket does not support dirty extents".into()).into());
    }
    let store = open_storage(&ticket).await?;
    let size = store.size();
    if context == "dirty" && store.is_nbd() {
        // We do not ask qemu-nbd for its dirty bitmap (imageio does, with
        // the same answer when the export has none).
        let name = match &ticket.spec().backend {
            crate::imageio::ticket::BackendUrl::Nbd(a) => a.export.clone(),
            crate::imageio::ticket::BackendUrl::File(_) => String::new(),
        };
        return Err(ApiError::NotFound(format!(
            "NBD export '{name}' does not support dirty extents"
        ))
        .into());
    }
    if context == "dirty" {
        // A plain file keeps no dirty bitmap: everything may have changed.
        let list = if size == 0 {
            json!([])
        } else {
            json!([{"start": 0, "length": size, "dirty": true, "zero": false}])
        };
        return Ok(json_response(&list));
    }
    let found = store
        .zero_extents(MAX_EXTENTS)
        .await
        .map_err(ApiError::from)?;
    let mut list: Vec<Value> = found
        .iter()
        .map(|e| json!({"start": e.start, "length": e.length, "zero": e.zero, "hole": e.hole}))
        .collect();
    let covered = found.last().map(|e| e.start + e.length).unwrap_or(0);
    if covered < size {
        list.push(
            json!({"start": covered, "length": size - covered, "zero": false, "hole": false}),
        );
    }
    Ok(json_response(&Value::Array(list)))
}
