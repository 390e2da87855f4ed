//! The oVirt API's vocabulary, shared by the engine (which serves it) and
//! the transfer session (which reads it from any engine): the enums with
//! their exact lower-case wire names (ENGINE-API.md section 9).

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// The wire (and database) name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            /// Parse a wire name (exact, lower case).
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// ImageTransferPhase (ENGINE-API.md section 9).
    Phase {
        /// Not a phase any current engine reports (read from odd answers).
        Unknown = "unknown",
        /// The 4.1 name of a cancel; current engines never send it.
        Cancelled = "cancelled",
        /// Just added; the ticket is not installed yet.
        Initializing = "initializing",
        /// The ticket is installed; data may move.
        Transferring = "transferring",
        /// Resumed by the client; the ticket is being renewed.
        Resuming = "resuming",
        /// Stopped by the engine (host unreachable, inactivity).
        PausedSystem = "paused_system",
        /// Paused by the client.
        PausedUser = "paused_user",
        /// Cancelled by the engine.
        CancelledSystem = "cancelled_system",
        /// Cancelled by the client.
        CancelledUser = "cancelled_user",
        /// Finalize asked for; verifying.
        FinalizingSuccess = "finalizing_success",
        /// Failed; cleaning up.
        FinalizingFailure = "finalizing_failure",
        /// Cancelled; cleaning up.
        FinalizingCleanup = "finalizing_cleanup",
        /// Cleanup after cancel done.
        FinishedCleanup = "finished_cleanup",
        /// Terminal: success.
        FinishedSuccess = "finished_success",
        /// Terminal: failure.
        FinishedFailure = "finished_failure",
    }
}

impl Phase {
    /// The two end phases: nothing changes any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::FinishedSuccess | Phase::FinishedFailure)
    }

    /// Engine's `canBePaused`.
    pub fn can_be_paused(self) -> bool {
        matches!(
            self,
            Phase::Initializing | Phase::Resuming | Phase::Transferring
        )
    }

    /// Engine's `canBeCancelled`.
    pub fn can_be_cancelled(self) -> bool {
        self.can_be_paused() || self.is_paused()
    }

    /// paused_user or paused_system.
    pub fn is_paused(self) -> bool {
        matches!(self, Phase::PausedUser | Phase::PausedSystem)
    }

    /// On the way to (or at) a failure: the transfer will not serve again.
    pub fn is_failing(self) -> bool {
        matches!(
            self,
            Phase::Cancelled
                | Phase::CancelledSystem
                | Phase::CancelledUser
                | Phase::FinalizingFailure
                | Phase::FinalizingCleanup
                | Phase::FinishedCleanup
                | Phase::FinishedFailure
        )
    }
}

wire_enum! {
    /// The actions of an image transfer (`POST .../imagetransfers/ID/NAME`).
    Action {
        /// End the transfer, remove an uploaded image.
        Cancel = "cancel",
        /// Keep the session alive.
        Extend = "extend",
        /// Data is complete: verify and finish.
        Finalize = "finalize",
        /// Pause (uploads only).
        Pause = "pause",
        /// Resume a paused transfer.
        Resume = "resume",
    }
}

wire_enum! {
    /// ImageTransferDirection.
    Direction {
        /// Client to disk.
        Upload = "upload",
        /// Disk to client.
        Download = "download",
    }
}

wire_enum! {
    /// DiskFormat.
    Format {
        /// Raw image.
        Raw = "raw",
        /// QCOW2 image.
        Cow = "cow",
    }
}

wire_enum! {
    /// ImageTransferTimeoutPolicy.
    TimeoutPolicy {
        /// Uploads pause, downloads are cancelled.
        Legacy = "legacy",
        /// Pause (paused_system).
        Pause = "pause",
        /// Cancel (cancelled_system).
        Cancel = "cancel",
    }
}

wire_enum! {
    /// DiskStatus.
    DiskStatus {
        /// Usable.
        Ok = "ok",
        /// Held by a transfer.
        Locked = "locked",
        /// Content not trusted (failed or cancelled upload).
        Illegal = "illegal",
    }
}

wire_enum! {
    /// DiskBackup: whether a disk takes part in incremental backups.
    DiskBackup {
        /// Full backups only.
        None = "none",
        /// Checkpoints keep a dirty bitmap on the disk (QCOW2 only).
        Incremental = "incremental",
    }
}

wire_enum! {
    /// DiskBackupMode: how a disk is backed up in one backup.
    DiskBackupMode {
        /// All data.
        Full = "full",
        /// Only what changed since the backup's `from_checkpoint_id`.
        Incremental = "incremental",
    }
}

wire_enum! {
    /// BackupPhase.
    BackupPhase {
        /// Just added.
        Initializing = "initializing",
        /// Preparing the disks (checkpoint bitmaps).
        Starting = "starting",
        /// Disks may be downloaded.
        Ready = "ready",
        /// Finalize asked for; releasing the disks.
        Finalizing = "finalizing",
        /// Terminal: done.
        Succeeded = "succeeded",
        /// Terminal: failed.
        Failed = "failed",
    }
}

impl BackupPhase {
    /// Whether the backup ended.
    pub fn is_finished(self) -> bool {
        matches!(self, BackupPhase::Succeeded | BackupPhase::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_are_exact() {
        for name in [
            "unknown",
            "cancelled",
            "initializing",
            "transferring",
            "resuming",
            "paused_system",
            "paused_user",
            "cancelled_system",
            "cancelled_user",
            "finalizing_success",
            "finalizing_failure",
            "finalizing_cleanup",
            "finished_cleanup",
            "finished_success",
            "finished_failure",
        ] {
            assert_eq!(Phase::parse(name).map(Phase::as_str), Some(name));
        }
        assert_eq!(Phase::parse("TRANSFERRING"), None);
        assert_eq!(Phase::parse(" transferring"), None);
        assert!(Phase::CancelledUser.is_failing() && !Phase::PausedSystem.is_failing());
        assert!(Phase::FinishedFailure.is_finished() && !Phase::FinishedCleanup.is_finished());
        assert_eq!(Direction::parse("download"), Some(Direction::Download));
    }
}
