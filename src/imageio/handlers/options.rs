//! OPTIONS `/images/<ticket>`: the features the ticket allows.

use super::*;

pub(super) async fn options(
    shared: &Shared,
    conn: &Conn,
    id: &str,
) -> Result<Response<Body>, Failure> {
    let mut options = Map::new();
    if let Some(sock) = &shared.local_socket {
        options.insert("unix_socket".into(), json!(sock));
    }
    let allow = if id == "*" {
        options.insert("features".into(), json!(ALL_FEATURES));
        "OPTIONS,GET,PUT,PATCH"
    } else {
        let ticket = authorize(shared, conn, id, Access::Read)?;
        // Like imageio: OPTIONS opens the backend, so an unreachable NBD
        // server or a missing file is a 500 here already.
        open_storage(&ticket).await?;
        ticket.touch();
        options.insert("max_readers".into(), json!(shared.max_readers));
        options.insert("max_writers".into(), json!(shared.max_writers));
        if ticket.spec().may(Access::Write) {
            options.insert("features".into(), json!(ALL_FEATURES));
            "OPTIONS,GET,PUT,PATCH"
        } else {
            options.insert("features".into(), json!(READ_FEATURES));
            "OPTIONS,GET"
        }
    };
    let mut resp = json_response(&Value::Object(options));
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    Ok(resp)
}
