//! One export: a name, a backend, and what it can do, asked once.

use super::consts::*;
use super::mode::ReplyMode;
use super::stats::ExportStats;
use crate::backend::{Backend, Capabilities};
use std::sync::Arc;

/// A named export over a backend. The capabilities are read once here, so
/// request validation never deals with a failing capability query.
#[derive(Debug)]
pub struct Export<B> {
    name: String,
    description: Option<String>,
    backend: Arc<B>,
    caps: Capabilities,
    size: u64,
    stats: ExportStats,
}

impl<B: Backend> Export<B> {
    /// An export called `name` (may be empty: the default export).
    pub fn new(name: impl Into<String>, description: Option<String>, backend: Arc<B>) -> Self {
        let caps = backend.capabilities();
        let size = backend.size();
        Export {
            name: name.into(),
            description,
            backend,
            caps,
            size,
            stats: ExportStats::default(),
        }
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The backend's capabilities, as read at creation.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// What clients did to this export, over all connections.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// The export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Largest payload accepted: the backend's, within the protocol's
    /// interoperable 32 MiB.
    pub fn max_payload(&self) -> u32 {
        self.caps.max_payload.clamp(1 << 20, MAX_PAYLOAD)
    }

    /// Block size constraints (minimum, preferred, maximum payload).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.caps.min_block.clamp(1, 65536).next_power_of_two();
        let preferred = self
            .caps
            .preferred_block
            .max(min)
            .max(512)
            .next_power_of_two();
        (min, preferred, self.max_payload().max(preferred))
    }

    /// The transmission flags for a connection in `mode`: the only place
    /// they are built.
    pub fn transmission_flags(&self, mode: ReplyMode) -> u16 {
        let c = &self.caps;
        let mut flags = NBD_FLAG_HAS_FLAGS;
        if c.flush {
            flags |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        }
        if c.read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_WRITE_ZEROES;
            if c.trim {
                flags |= NBD_FLAG_SEND_TRIM;
            }
            if c.fast_zero {
                flags |= NBD_FLAG_SEND_FAST_ZERO;
            }
        }
        if mode >= ReplyMode::Structured {
            flags |= NBD_FLAG_SEND_DF;
        }
        if c.multi_conn {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        if c.cache {
            flags |= NBD_FLAG_SEND_CACHE;
        }
        flags
    }

    /// The metadata contexts this export offers.
    pub fn contexts(&self) -> Vec<String> {
        let mut out = vec![BASE_ALLOCATION.to_string()];
        if let Some(bitmap) = &self.caps.dirty_bitmap {
            out.push(format!("{QEMU_DIRTY_BITMAP}{bitmap}"));
        }
        out
    }
}

/// The protocol's interoperable payload limit (2^25).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// The exports a server offers; the first is the default (empty name).
#[derive(Debug)]
pub struct Exports<B> {
    list: Vec<Arc<Export<B>>>,
}

impl<B: Backend> Exports<B> {
    /// A set of exports; the first answers to the empty name too.
    pub fn new(list: Vec<Arc<Export<B>>>) -> Self {
        Exports { list }
    }

    /// One export, the default.
    pub fn single(export: Export<B>) -> Self {
        Exports {
            list: vec![Arc::new(export)],
        }
    }

    /// Find an export by name; the empty name is the default export.
    pub fn find(&self, name: &str) -> Option<&Arc<Export<B>>> {
        if name.is_empty() {
            return self.list.first();
        }
        self.list.iter().find(|e| e.name() == name)
    }

    /// All exports.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export<B>>> {
        self.list.iter()
    }
}
