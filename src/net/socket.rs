//! Options of our connected sockets, accepted or opened: TCP keepalive
//! and `TCP_NODELAY`, and a send buffer that holds a whole reply on unix
//! sockets. A failure is logged and otherwise ignored: the connection
//! still works.

use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};

/// Send buffer asked for on unix stream sockets that carry data.
pub const UNIX_SEND_BUFFER: usize = 1 << 20;

/// A larger send buffer on a unix stream socket: the default (about
/// 208 KiB) is smaller than one 256 KiB NBD reply or a PUT's body piece,
/// so every such write would stop half-way and wait for the peer. The
/// kernel caps the size at `net.core.wmem_max`; a failure is logged and
/// otherwise ignored.
pub fn prepare_unix(stream: &UnixStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(UNIX_SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot set SO_SNDBUF");
    }
}

/// Turn on `TCP_NODELAY` and TCP keepalive (first probe after `time` idle,
/// then every `interval`, dropped after `retries` unanswered) on a
/// connected socket. A failure is logged and otherwise ignored.
pub fn tune_tcp(stream: &TcpStream, time: Duration, interval: Duration, retries: u32) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(retries);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}
