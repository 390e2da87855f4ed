//! The phase-aware transfer session: talks to the engine (ours or real)
//! to create or attach an image transfer, waits out `initializing`, and
//! carries out what the phase rules ([`crate::phases`]) decide from what
//! the NBD clients do (finalize, pause, resume). [`backup`] does the same
//! for every disk of a VM backup, around the backup's own steps.

pub mod backup;
pub mod driver;
pub mod engine_client;
pub mod error;
pub mod transfer;

pub use crate::ovirt::{Action, Direction, Phase};
pub use engine_client::{EngineClient, EngineConfig, Transfer};
pub use error::{Error, Result};
pub use transfer::{Target, TransferSession};
