//! nbdbridge: serve oVirt image transfers to any NBD client.
//!
//! # Layout
//! - [`nbd`]: a modern NBD server (fixed newstyle, structured replies,
//!   extended headers, meta contexts, many requests in flight). It knows
//!   nothing of HTTP or oVirt: it validates requests and calls a [`Backend`].
//! - [`backend`]: the [`Backend`] trait and its implementations (a local
//!   file; the imageio HTTP client).
//! - [`store`]: positional I/O on local image files, shared by the file
//!   backend and the embedded data server.
//! - [`imageio`]: the embedded imageio-compatible data server.
//! - [`nbd_client`]: an async NBD client (the data server's `nbd:` tickets).
//! - [`engine`]: the engine-compatible control plane (REST API v4, SSO,
//!   image transfer phases, state in SQLite).
//! - [`phases`]: the phase rules of `serve` (when a transfer is finalized,
//!   paused, resumed or left) as a pure state machine, with the download
//!   coverage it reads.
//! - [`session`]: the image transfer session (engine REST client, phases).
//! - [`net`]: the one accept loop every listener uses (connection cap,
//!   backoff, TCP keepalive, orderly stop).
//! - [`shutdown`] and [`telemetry`]: orderly stop and logging;
//!   [`progress`]: the progress line on a terminal.
//! - [`wire`]: big-endian fields read without panics (both NBD sides, the
//!   QCOW2 header check).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![deny(missing_docs)]

pub mod backend;
pub mod bufpool;
pub mod captive;
pub mod engine;
pub mod imageio;
pub mod nbd;
pub mod nbd_client;
pub mod net;
pub mod ovirt;
pub mod phases;
pub mod progress;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod wire;

pub use backend::Backend;
