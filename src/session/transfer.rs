//! One image transfer, seen from the bridge: create or attach it, wait for
//! the phases the engine moves through, and ask for the ones we need.

use super::engine_client::{EngineClient, Transfer};
use super::error::{Error, Result};
use crate::ovirt::{Action, Direction, DiskStatus, Format, Phase};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long the engine may take to leave `initializing` / `resuming`, or to
/// finish a finalize or a cancel.
pub const PHASE_DEADLINE: Duration = Duration::from_secs(300);
/// First and longest pause between two polls.
const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(2);

/// Which transfer to serve.
#[derive(Debug, Clone)]
pub enum Target {
    /// Create a transfer of this disk.
    Disk {
        /// Disk id.
        disk_id: String,
        /// Pin the host.
        host_id: Option<String>,
        /// Upload or download.
        direction: Direction,
    },
    /// Attach to this existing transfer.
    Transfer(String),
}

/// A transfer the bridge serves.
#[derive(Debug)]
pub struct TransferSession {
    client: Arc<EngineClient>,
    current: Transfer,
    phase: watch::Sender<Phase>,
}

impl TransferSession {
    /// Create or attach the transfer, and wait until it is `transferring`
    /// (resuming it when it was paused by a user).
    ///
    /// A transfer whose format is `cow` moves the QCOW2 file's own bytes: an
    /// NBD client writing guest data into it would corrupt the disk, so it
    /// is refused unless `allow_cow` (the user wants the container bytes,
    /// e.g. to copy a QCOW2 file as is). Transfers created here always ask
    /// for `raw`.
    ///
    /// # Errors
    /// The engine refused, the transfer is `cow` and not allowed, or it
    /// cannot reach `transferring`.
    pub async fn open(client: Arc<EngineClient>, target: &Target, allow_cow: bool) -> Result<Self> {
        let current = match target {
            Target::Disk {
                disk_id,
                host_id,
                direction,
            } => {
                client
                    .add_transfer(disk_id, host_id.as_deref(), *direction)
                    .await?
            }
            Target::Transfer(id) => client.transfer(id).await?,
        };
        tracing::info!(
            transfer = %current.id,
            phase = %current.phase,
            format = current.format.map_or("?", Format::as_str),
            "transfer {}", current.phase
        );
        let phase = watch::channel(current.phase).0;
        let mut session = TransferSession {
            client,
            current,
            phase,
        };
        if session.current.format == Some(Format::Cow) && !allow_cow {
            let id = session.current.id.clone();
            if matches!(target, Target::Disk { .. }) {
                // We created it: do not leave it behind.
                let _ = session.act(Action::Cancel).await;
            }
            return Err(Error::Config(format!(
                "transfer {id} has format cow: NBD clients would see the QCOW2 file's own \
                 bytes, not the guest data; start a transfer with format raw (serve --disk \
                 does) or pass --allow-cow if the container bytes are really what you want"
            )));
        }
        if session.current.phase.is_paused() {
            session.resume().await?;
        } else {
            session
                .wait_while(&[Phase::Initializing, Phase::Resuming])
                .await?;
        }
        session.expect(Phase::Transferring)?;
        Ok(session)
    }

    /// The transfer as last read.
    pub fn transfer(&self) -> &Transfer {
        &self.current
    }

    /// The phase as last read, as it changes (for the progress display).
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// The engine client.
    pub fn client(&self) -> &Arc<EngineClient> {
        &self.client
    }

    /// Read the transfer again; logs phase changes.
    ///
    /// # Errors
    /// The engine failed.
    pub async fn refresh(&mut self) -> Result<Phase> {
        let t = self.client.transfer(&self.current.id).await?;
        if t.phase != self.current.phase {
            tracing::info!(transfer = %t.id, phase = %t.phase, "transfer {}", t.phase);
        }
        self.phase.send_replace(t.phase);
        self.current = t;
        Ok(self.current.phase)
    }

    /// Poll (with backoff, bounded) while the phase is one of `phases`.
    ///
    /// # Errors
    /// The deadline passed or the engine failed.
    pub async fn wait_while(&mut self, phases: &[Phase]) -> Result<Phase> {
        let end = Instant::now() + PHASE_DEADLINE;
        let mut pause = POLL_MIN;
        while phases.contains(&self.current.phase) {
            if Instant::now() > end {
                return Err(Error::Phase {
                    id: self.current.id.clone(),
                    phase: self.current.phase,
                    why: format!("still there after {PHASE_DEADLINE:?}"),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
            self.refresh().await?;
        }
        Ok(self.current.phase)
    }

    fn expect(&self, phase: Phase) -> Result<()> {
        if self.current.phase == phase {
            return Ok(());
        }
        let why = match self.current.phase {
            Phase::PausedSystem => {
                "the engine could not set up the session (is imageio running on the host?)"
            }
            p if p.is_failing() => "the transfer was cancelled or failed",
            p if p.is_finished() => "the transfer is over; start a new one with --disk",
            _ => "",
        };
        Err(Error::Phase {
            id: self.current.id.clone(),
            phase: self.current.phase,
            why: why.to_string(),
        })
    }

    /// Run `action` and log it.
    ///
    /// # Errors
    /// The engine refused.
    pub async fn act(&self, action: Action) -> Result<()> {
        tracing::debug!(transfer = %self.current.id, ?action, "action");
        self.client.action(&self.current.id, action).await
    }

    /// Pause (uploads): `paused_user`; nothing when already paused.
    ///
    /// # Errors
    /// The engine refused.
    pub async fn pause(&mut self) -> Result<()> {
        if self.current.phase.is_paused() {
            return Ok(());
        }
        self.act(Action::Pause).await?;
        self.refresh().await?;
        Ok(())
    }

    /// Resume, wait out `resuming`, be `transferring`.
    ///
    /// # Errors
    /// The engine refused or the transfer did not come back.
    pub async fn resume(&mut self) -> Result<()> {
        self.act(Action::Resume).await?;
        self.refresh().await?;
        self.wait_while(&[Phase::Resuming, Phase::PausedUser, Phase::PausedSystem])
            .await?;
        self.expect(Phase::Transferring)
    }

    /// Finalize and wait for the end phase (`finished_success` or a
    /// failure). A transfer that disappears after finalize counts as done
    /// when its disk is `ok` (older engines delete finished transfers).
    ///
    /// # Errors
    /// The engine refused or did not finish in time.
    pub async fn finalize(&mut self) -> Result<Phase> {
        self.act(Action::Finalize).await?;
        self.wait_end().await
    }

    /// Cancel and wait for the end phase.
    ///
    /// # Errors
    /// The engine refused or did not finish in time.
    pub async fn cancel(&mut self) -> Result<Phase> {
        self.act(Action::Cancel).await?;
        self.wait_end().await
    }

    async fn wait_end(&mut self) -> Result<Phase> {
        let end = Instant::now() + PHASE_DEADLINE;
        let mut pause = POLL_MIN;
        loop {
            match self.refresh().await {
                Ok(p) if p.is_finished() => return Ok(p),
                Ok(_) => {}
                Err(e) if e.is_not_found() => return self.phase_from_disk().await,
                Err(e) => return Err(e),
            }
            if Instant::now() > end {
                return Err(Error::Phase {
                    id: self.current.id.clone(),
                    phase: self.current.phase,
                    why: format!("not finished after {PHASE_DEADLINE:?}"),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    async fn phase_from_disk(&self) -> Result<Phase> {
        let Some(disk_id) = &self.current.disk_id else {
            return Ok(Phase::FinishedSuccess);
        };
        match self.client.disk(disk_id).await {
            Ok(d) if d.status == Some(DiskStatus::Ok) => Ok(Phase::FinishedSuccess),
            Ok(_) => Ok(Phase::FinishedFailure),
            Err(e) if e.is_not_found() => Ok(Phase::FinishedFailure),
            Err(e) => Err(e),
        }
    }
}
