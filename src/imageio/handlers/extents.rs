//! GET `/images/<ticket>/extents`: zero and dirty extents.
//!
//! Like ovirt-imageio's `handlers/extents.py` and its nbd backend: `zero`
//! gives `{start, length, zero, hole}`, `dirty` (tickets with
//! `"dirty": true` only) gives `{start, length, dirty, zero}` from
//! `base:allocation` merged with the export's dirty bitmap; an export
//! without exactly one bitmap is 404.

use super::*;
use crate::imageio::ticket::{BackendUrl, py_repr};
use crate::nbd_client::{DirtyExtent, ZeroExtent};

/// Which extents the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Zero,
    Dirty,
}

/// `context=zero|dirty` (default `zero`), with imageio's 400 text.
fn parse_context(query: &Query) -> Result<Context, ApiError> {
    match query.get("context").unwrap_or("zero") {
        "zero" => Ok(Context::Zero),
        "dirty" => Ok(Context::Dirty),
        other => Err(ApiError::BadRequest(format!(
            "Unsupported value {} for 'context', expecting one of ['dirty', 'zero']",
            py_repr(&Value::String(other.to_string()))
        ))),
    }
}

pub(super) async fn extents(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    // Parse and authorize (imageio authorizes before it looks at the
    // query, so a bad ticket wins over a bad context).
    let ticket = authorize(shared, conn, id, Access::Read)?;
    let context = parse_context(query)?;
    if context == Context::Dirty && !ticket.spec().dirty {
        return Err(ApiError::NotFound("Ticket does not support dirty extents".into()).into());
    }

    // Operation.
    let store = open_storage(&ticket).await?;
    let size = store.size();
    let list = match context {
        Context::Zero => {
            let found = store
                .zero_extents(MAX_EXTENTS)
                .await
                .map_err(ApiError::from)?;
            zero_json(&found, size)
        }
        Context::Dirty => {
            let found = store
                .dirty_extents(MAX_EXTENTS)
                .await
                .map_err(ApiError::from)?;
            let Some(found) = found else {
                return Err(no_bitmap(&ticket.spec().backend).into());
            };
            dirty_json(&found, size)
        }
    };

    // Respond.
    Ok(json_response(&list))
}

/// imageio's 404 for an NBD export without (exactly one) dirty bitmap:
/// its nbd backend raises `UnsupportedOperation("NBD export
/// {export_name!r} does not support dirty extents")`, whose text starts
/// with `Operation not supported: `.
fn no_bitmap(backend: &BackendUrl) -> ApiError {
    let name = match backend {
        BackendUrl::Nbd(a) => a.export.clone(),
        BackendUrl::File(_) => String::new(),
    };
    ApiError::NotFound(format!(
        "Operation not supported: NBD export {} does not support dirty extents",
        py_repr(&Value::String(name))
    ))
}

/// Zero extents as imageio's JSON; past the extent cap, the rest is data.
fn zero_json(found: &[ZeroExtent], size: u64) -> Value {
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
    Value::Array(list)
}

/// Dirty extents as imageio's JSON; past the extent cap, the rest is
/// dirty data (a backup copies it).
fn dirty_json(found: &[DirtyExtent], size: u64) -> Value {
    let mut list: Vec<Value> = found
        .iter()
        .map(|e| json!({"start": e.start, "length": e.length, "dirty": e.dirty, "zero": e.zero}))
        .collect();
    let covered = found.last().map(|e| e.start + e.length).unwrap_or(0);
    if covered < size {
        list.push(
            json!({"start": covered, "length": size - covered, "dirty": true, "zero": false}),
        );
    }
    Value::Array(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd_client::NbdAddress;

    #[test]
    fn dirty_json_is_imageios_shape() {
        let found = [
            DirtyExtent {
                start: 0,
                length: 65536,
                dirty: true,
                zero: false,
            },
            DirtyExtent {
                start: 65536,
                length: 4096,
                dirty: false,
                zero: true,
            },
        ];
        assert_eq!(
            dirty_json(&found, 65536 + 4096),
            json!([
                {"start": 0, "length": 65536, "dirty": true, "zero": false},
                {"start": 65536, "length": 4096, "dirty": false, "zero": true},
            ])
        );
        // Capped: the rest is reported dirty data.
        assert_eq!(
            dirty_json(&found[..1], 1 << 20),
            json!([
                {"start": 0, "length": 65536, "dirty": true, "zero": false},
                {"start": 65536, "length": (1 << 20) - 65536, "dirty": true, "zero": false},
            ])
        );
        assert_eq!(dirty_json(&[], 0), json!([]));
    }

    #[test]
    fn no_bitmap_names_the_export_like_python() {
        let nbd = |export: &str| {
            BackendUrl::Nbd(NbdAddress {
                socket: "/run/x.sock".into(),
                export: export.into(),
            })
        };
        assert_eq!(
            no_bitmap(&nbd("")).to_string(),
            "Operation not supported: NBD export '' does not support dirty extents"
        );
        assert_eq!(
            no_bitmap(&nbd("sda")).to_string(),
            "Operation not supported: NBD export 'sda' does not support dirty extents"
        );
    }
}
