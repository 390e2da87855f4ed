//! Plumbing shared by every listener: the NBD server, the data server's
//! three listeners and the engine's API.
//!
//! - [`accept`]: one accept loop (connection cap, backoff on accept
//!   errors, TCP keepalive and `TCP_NODELAY`, one task per connection, an
//!   orderly stop).
//! - [`socket`]: options of connected sockets, accepted or opened (TCP
//!   keepalive and `TCP_NODELAY`, the unix send buffer).

pub mod accept;
pub mod socket;
