//! The ImageTransfer phases, exactly as the API spells them.

use std::fmt;

/// An image transfer phase (`ImageTransferPhase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `unknown`
    Unknown,
    /// `initializing`
    Initializing,
    /// `transferring`
    Transferring,
    /// `resuming`
    Resuming,
    /// `paused_system`
    PausedSystem,
    /// `paused_user`
    PausedUser,
    /// `cancelled`
    Cancelled,
    /// `cancelled_system`
    CancelledSystem,
    /// `cancelled_user`
    CancelledUser,
    /// `finalizing_success`
    FinalizingSuccess,
    /// `finalizing_failure`
    FinalizingFailure,
    /// `finalizing_cleanup`
    FinalizingCleanup,
    /// `finished_success`
    FinishedSuccess,
    /// `finished_failure`
    FinishedFailure,
    /// `finished_cleanup`
    FinishedCleanup,
}

const ALL: [(Phase, &str); 15] = [
    (Phase::Unknown, "unknown"),
    (Phase::Initializing, "initializing"),
    (Phase::Transferring, "transferring"),
    (Phase::Resuming, "resuming"),
    (Phase::PausedSystem, "paused_system"),
    (Phase::PausedUser, "paused_user"),
    (Phase::Cancelled, "cancelled"),
    (Phase::CancelledSystem, "cancelled_system"),
    (Phase::CancelledUser, "cancelled_user"),
    (Phase::FinalizingSuccess, "finalizing_success"),
    (Phase::FinalizingFailure, "finalizing_failure"),
    (Phase::FinalizingCleanup, "finalizing_cleanup"),
    (Phase::FinishedSuccess, "finished_success"),
    (Phase::FinishedFailure, "finished_failure"),
    (Phase::FinishedCleanup, "finished_cleanup"),
];

impl Phase {
    /// Parse the wire name (exact, lower case, as the SDK does).
    pub fn parse(s: &str) -> Option<Phase> {
        ALL.iter().find(|(_, n)| *n == s).map(|(p, _)| *p)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        ALL.iter()
            .find(|(p, _)| *p == self)
            .map_or("unknown", |(_, n)| n)
    }

    /// The transfer is over for good (success or not).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Phase::FinishedSuccess | Phase::FinishedFailure | Phase::FinishedCleanup
        )
    }

    /// The transfer is on its way to failure: it will not serve again.
    pub fn is_failing(self) -> bool {
        matches!(
            self,
            Phase::Cancelled
                | Phase::CancelledSystem
                | Phase::CancelledUser
                | Phase::FinalizingFailure
                | Phase::FinalizingCleanup
                | Phase::FinishedFailure
                | Phase::FinishedCleanup
        )
    }

    /// A paused phase (`paused_user`, `paused_system`).
    pub fn is_paused(self) -> bool {
        matches!(self, Phase::PausedUser | Phase::PausedSystem)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_exact() {
        for (p, n) in ALL {
            assert_eq!(Phase::parse(n), Some(p));
            assert_eq!(p.as_str(), n);
        }
        assert_eq!(Phase::parse("TRANSFERRING"), None);
        assert_eq!(Phase::parse(" transferring"), None);
        assert!(Phase::FinishedCleanup.is_finished() && Phase::CancelledUser.is_failing());
        assert!(!Phase::PausedSystem.is_failing() && Phase::PausedSystem.is_paused());
    }
}
