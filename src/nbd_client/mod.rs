//! An async NBD client for the embedded data server's `nbd:unix:` tickets.
//!
//! It speaks what qemu-nbd serves: the fixed newstyle handshake with
//! NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT (`base:allocation`,
//! `qemu:allocation-depth`, and on request the export's dirty bitmap,
//! found with NBD_OPT_LIST_META_CONTEXT like imageio does, or any other
//! named context: see [`ConnectOptions`]) and NBD_OPT_GO, then READ, WRITE
//! (FUA), WRITE_ZEROES (NO_HOLE), FLUSH, BLOCK_STATUS and DISC. Requests are
//! pipelined: any number of tasks share one [`NbdClient`], each request is
//! matched to its reply by cookie, and one reader task dispatches replies.
//!
//! Everything the server sends is bounded (option replies, chunk lengths,
//! extents per reply, data only inside the requested range): a broken or
//! hostile server gives an [`Error`], never a panic or an unbounded
//! allocation. A protocol error fails every request in flight and marks
//! the client [broken](NbdClient::is_broken); the owner opens a new one.
//!
//! # Layout
//! - `client`: [`NbdClient`] (connect, commands, the reply reader task);
//! - `handshake`: option negotiation, [`ExportInfo`];
//! - `reply`: pure parsing and checks of reply headers and chunks;
//! - `extents`: imageio's zero and dirty extents from block status
//!   replies.

mod client;
mod extents;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod reply;

pub use client::NbdClient;
pub use extents::{DirtyExtent, ZeroExtent};
pub use handshake::{ConnectOptions, ExportInfo, MetaContext};

use std::path::PathBuf;

/// Largest READ or WRITE sent in one request (bigger calls are split).
pub const MAX_IO: u32 = 32 * 1024 * 1024;
/// Largest WRITE_ZEROES sent in one request (qemu-nbd's limit is just
/// under 2 GiB; imageio uses 1 GiB).
pub const MAX_ZERO: u32 = 1 << 30;
/// Largest BLOCK_STATUS range asked at once (like imageio).
pub const MAX_STATUS: u32 = 1 << 31;
/// Most extents accepted in one block status chunk.
pub const MAX_CHUNK_EXTENTS: usize = 1 << 20;
/// Longest error message accepted in an error chunk or option reply.
pub const MAX_MESSAGE: usize = 4096;
/// Largest option reply payload accepted during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most meta contexts a caller may ask for besides `base:allocation`,
/// `qemu:allocation-depth` and the dirty bitmap ([`ConnectOptions`]).
pub const MAX_EXTRA_CONTEXTS: usize = 8;
/// Longest meta context name sent or accepted (the NBD string limit).
pub const MAX_CONTEXT_NAME: usize = 4096;

/// Where an NBD export lives: `nbd:unix:/path.sock[:exportname=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    /// The server's unix socket.
    pub socket: PathBuf,
    /// The export name ("" is the default export).
    pub export: String,
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nbd:unix:{}", self.socket.display())?;
        if !self.export.is_empty() {
            write!(f, ":exportname={}", self.export)?;
        }
        Ok(())
    }
}

/// A failed NBD operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected.
    #[error("cannot connect to NBD server {address}: {source}")]
    Connect {
        /// What we tried to reach.
        address: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("NBD connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol; the connection is unusable.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during the handshake.
    #[error("NBD server refused {option}: {reason}{}", message_suffix(.message))]
    OptionRefused {
        /// The option (spec name).
        option: &'static str,
        /// The error reply (spec name).
        reason: &'static str,
        /// The server's message, if any.
        message: String,
    },
    /// The server failed one request (the connection stays usable).
    #[error("NBD {command} at offset {offset} length {len} failed: {errno}{}", message_suffix(.message))]
    Request {
        /// The command (spec name).
        command: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// The NBD error, with its errno name.
        errno: String,
        /// The server's message, if any.
        message: String,
    },
    /// The connection failed earlier (or was closed) and the request could
    /// not complete.
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    /// The export does not allow this (read-only, no WRITE_ZEROES, ...).
    #[error("NBD export does not support {0}")]
    Unsupported(&'static str),
    /// The handshake did not finish in time.
    #[error("NBD handshake with {0} timed out")]
    Timeout(String),
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// The errno name of an NBD error code, for messages.
pub fn errno_name(code: u32) -> String {
    use crate::nbd::consts::*;
    let name = match code {
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => return format!("error {code}"),
    };
    name.to_string()
}
