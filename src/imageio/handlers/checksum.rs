//! GET `/images/<ticket>/checksum`: a checksum of the whole image.

use super::*;

pub(super) async fn checksum(
    shared: &Shared,
    conn: &Conn,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let algorithm = Algorithm::parse(query.get("algorithm").unwrap_or(sums::DEFAULT_ALGORITHM))?;
    let block_size = sums::parse_block_size(query.get("block_size"))?;
    let ticket = authorize(shared, conn, id, Access::Read)?;
    let store = open_storage(&ticket).await?;
    let op = ticket.start_op(0)?;
    let progress = op.progress().clone();
    let t = ticket.clone();
    let result = store
        .checksum(
            algorithm,
            block_size,
            move || t.canceled(),
            move |n| progress.add(n),
        )
        .await;
    let digest = match result {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            return Err(canceled_error(&ticket).into());
        }
        Err(e) => return Err(ApiError::Internal(e).into()),
    };
    drop(op);
    Ok(json_response(&json!({
        "algorithm": algorithm.name(),
        "block_size": block_size,
        "checksum": digest,
    })))
}
