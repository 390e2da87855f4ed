//! The engine's entities (disks, hosts, transfers, VMs, backups,
//! checkpoints) and their enums, with the exact lower-case wire names the
//! SDK expects.

use super::error::{Error, Result};

pub use crate::ovirt::{
    BackupPhase, Direction, DiskBackup, DiskBackupMode, DiskStatus, Format, Phase, TimeoutPolicy,
};

/// Parse a wire enum from a request, or a 400 naming the field.
pub fn parse_field<T>(field: &str, value: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    parse(value).ok_or_else(|| Error::BadRequest(format!("Invalid value '{value}' for '{field}'")))
}

/// A disk: one file in the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// UUID.
    pub id: String,
    /// Display name (also sent as alias).
    pub name: String,
    /// Free text.
    pub description: String,
    /// raw or cow.
    pub format: Format,
    /// Virtual size in bytes.
    pub provisioned_size: u64,
    /// ok, locked or illegal.
    pub status: DiskStatus,
    /// Whether checkpoints track its changes (`incremental`: QCOW2 only).
    pub backup: DiskBackup,
}

/// A data server registered as a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// UUID, stable across restarts (kept by name in the database).
    pub id: String,
    /// Name given on the command line.
    pub name: String,
    /// The unix socket of its ticket control API.
    pub control_socket: std::path::PathBuf,
    /// Base URL of its data API (`http://HOST:PORT`), `/images/<ticket>` is
    /// appended.
    pub data_url: String,
}

impl Host {
    /// The transfer URL of `ticket` on this host.
    pub fn transfer_url(&self, ticket: &str) -> String {
        let base = self.data_url.trim_end_matches('/');
        let base = base.strip_suffix("/images").unwrap_or(base);
        format!("{base}/images/{ticket}")
    }
}

/// An image transfer as stored (`Debug` cuts the ticket id short).
#[derive(Clone, PartialEq, Eq)]
pub struct Transfer {
    /// UUID.
    pub id: String,
    /// The disk it holds.
    pub disk_id: String,
    /// The host whose data server carries the ticket.
    pub host_id: String,
    /// upload or download.
    pub direction: Direction,
    /// The format of the transferred bytes (the disk's format).
    pub format: Format,
    /// Current phase.
    pub phase: Phase,
    /// The data server ticket id (a secret).
    pub ticket_id: String,
    /// Bytes the ticket covers.
    pub ticket_size: u64,
    /// Whether the ticket is installed on the host.
    pub ticket_installed: bool,
    /// Unix time when the ticket expires unless renewed (0: unknown).
    pub ticket_expires: i64,
    /// Client inactivity timeout in seconds (0 disables).
    pub inactivity_timeout: u64,
    /// What inactivity does.
    pub timeout_policy: TimeoutPolicy,
    /// Bytes moved, as the data server reports.
    pub transferred: u64,
    /// A request is in flight on the data server.
    pub active: bool,
    /// Client asked for a shallow transfer (recorded only).
    pub shallow: bool,
    /// Unix time of the last change or keep-alive.
    pub updated: i64,
    /// Unix time when it reached an end phase (0: not yet).
    pub finished_at: i64,
    /// Consecutive control API failures while transferring.
    pub failures: u32,
    /// Why it failed, if it did (logged and kept for the operator).
    pub message: String,
    /// The backup it downloads a disk of (empty: none).
    pub backup_id: String,
}

/// A virtual machine: a name and its disks (it never runs here, so every
/// backup of it is a cold backup, as oVirt does for a VM that is down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// UUID.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
}

/// A VM backup (`/vms/ID/backups/ID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// UUID.
    pub id: String,
    /// The VM.
    pub vm_id: String,
    /// Current phase.
    pub phase: BackupPhase,
    /// Incremental from this checkpoint (none: full).
    pub from_checkpoint_id: Option<String>,
    /// The checkpoint this backup creates (none when no disk of it is
    /// enabled for incremental backup).
    pub to_checkpoint_id: Option<String>,
    /// Free text.
    pub description: String,
    /// The disks backed up.
    pub disks: Vec<String>,
    /// Unix time of creation.
    pub created: i64,
    /// Unix time of the last change.
    pub updated: i64,
    /// Why it failed, if it did.
    pub message: String,
}

/// A VM checkpoint: a persistent dirty bitmap named after it on each of
/// its disks (enabled, so every later write through qemu marks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// UUID, also the bitmap name.
    pub id: String,
    /// The VM.
    pub vm_id: String,
    /// The previous checkpoint of the VM, if any.
    pub parent_id: Option<String>,
    /// Unix time of creation.
    pub created: i64,
    /// Free text (the backup's description).
    pub description: String,
    /// The disks that carry its bitmap.
    pub disks: Vec<String>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("id", &self.id)
            .field("disk_id", &self.disk_id)
            .field("host_id", &self.host_id)
            .field("direction", &self.direction)
            .field("phase", &self.phase)
            .field("ticket_id", &crate::telemetry::redact(&self.ticket_id))
            .field("ticket_installed", &self.ticket_installed)
            .field("transferred", &self.transferred)
            .field("message", &self.message)
            .field("backup_id", &self.backup_id)
            .finish_non_exhaustive()
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A new random UUID (v4) as text.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for p in [
            Phase::Initializing,
            Phase::PausedSystem,
            Phase::FinalizingCleanup,
            Phase::FinishedFailure,
        ] {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("TRANSFERRING"), None);
        assert_eq!(Format::parse("cow"), Some(Format::Cow));
    }

    #[test]
    fn transfer_url_joins() {
        let mut h = Host {
            id: "i".into(),
            name: "n".into(),
            control_socket: "/s".into(),
            data_url: "http://h:1".into(),
        };
        assert_eq!(h.transfer_url("t"), "http://h:1/images/t");
        h.data_url = "http://h:1/images/".into();
        assert_eq!(h.transfer_url("t"), "http://h:1/images/t");
    }
}
