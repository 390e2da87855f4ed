//! The negotiated reply style: one ordered enum, compared with `>=`.

/// How replies are framed on a connection. Ordered: each mode includes the
/// features of the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ReplyMode {
    /// Simple replies only (16-byte header).
    #[default]
    Simple,
    /// Structured replies (20-byte chunk headers) for READ and BLOCK_STATUS.
    Structured,
    /// Extended headers: 32-byte requests and 32-byte reply chunks for all.
    Extended,
}
