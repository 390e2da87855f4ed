//! The image transfer phase machine (ENGINE-API.md section 13): client
//! actions ([`add`], [`act`]) and the per-transfer driver that makes the
//! system moves (install the ticket, watch it, renew it, apply the
//! inactivity policy, verify, clean up).
//!
//! Client actions change the phase in the database under its lock and wake
//! the driver. The driver reads the row, talks to the host's data server
//! without any lock, then writes its move only if the phase is still the
//! one it saw, so a client action that came in between wins.

use super::error::{Error, Result};
use super::host::HostStatus;
use super::host::{Control, TicketSpec};
use super::model::{
    Backup, BackupPhase, Direction, Disk, DiskBackupMode, DiskStatus, Format, Phase, TimeoutPolicy,
    Transfer, new_id, now, parse_field,
};
use super::xml::{IdRef, ImageTransferIn};
use super::{State, Turn, spawn_driver_loop};
use crate::telemetry::redact;
use std::sync::Arc;

pub use crate::ovirt::Action;

/// Largest inactivity timeout a client may ask for (one day).
const MAX_INACTIVITY_TIMEOUT: u64 = 86_400;

/// `POST /imagetransfers`: validate, store (locking the disk), start the
/// driver. The new transfer is `initializing`.
pub fn add(state: &Arc<State>, req: ImageTransferIn) -> Result<Transfer> {
    // Refused before anything else, so that no disk gets locked (a real
    // engine serves both).
    if let Some(snapshot) = &req.snapshot {
        return Err(Error::BadRequest(format!(
            "Cannot transfer Virtual Disk: transfers of disk snapshots are not supported \
             (snapshot {}); transfer the whole disk with <disk id=\"...\"/>",
            snapshot.id.as_deref().unwrap_or("without an id")
        )));
    }
    let disk_id = req
        .disk
        .as_ref()
        .and_then(|d| d.id.clone())
        .or_else(|| req.image.as_ref().and_then(|i| i.id.clone()))
        .ok_or_else(|| {
            Error::BadRequest("Cannot transfer Virtual Disk: the disk id is missing".into())
        })?;
    let disk = state
        .db
        .disk(&disk_id)?
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {disk_id}")))?;
    let direction = match req.direction.as_deref() {
        None => Direction::Upload,
        Some(v) => parse_field("direction", v, Direction::parse)?,
    };
    let format = match req.format.as_deref() {
        None => disk.format,
        Some(v) => parse_field("format", v, Format::parse)?,
    };
    if format == Format::Cow && disk.format == Format::Raw {
        return Err(Error::BadRequest(format!(
            "Cannot transfer Virtual Disk: format cow does not apply to the raw disk {}",
            disk.id
        )));
    }
    let backup = match &req.backup {
        None => None,
        Some(r) => Some(backup_of_transfer(state, r, &disk, direction, format)?),
    };
    let inactivity_timeout = match req.inactivity_timeout.as_deref() {
        None => state.config.inactivity_timeout,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= MAX_INACTIVITY_TIMEOUT)
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "Invalid value '{v}' for 'inactivity_timeout': expecting 0..{MAX_INACTIVITY_TIMEOUT}"
                ))
            })?,
    };
    let timeout_policy = match req.timeout_policy.as_deref() {
        None => TimeoutPolicy::Legacy,
        Some(v) => parse_field("timeout_policy", v, TimeoutPolicy::parse)?,
    };
    let shallow = match req.shallow.as_deref() {
        None => false,
        Some(v) => parse_bool(v)
            .ok_or_else(|| Error::BadRequest(format!("Invalid value '{v}' for 'shallow'")))?,
    };
    let host = match &req.host {
        Some(r) => {
            let found = state.hosts.iter().find(|h| {
                r.id.as_deref() == Some(h.id.as_str()) || r.name.as_deref() == Some(h.name.as_str())
            });
            let what = r.id.clone().or_else(|| r.name.clone()).unwrap_or_default();
            found.ok_or_else(|| Error::NotFound(format!("Entity not found: host {what}")))?
        }
        // As oVirt, only a host that is up: the first one whose control
        // API answered its last check.
        None => state
            .hosts
            .iter()
            .find(|h| state.host_status.get(&h.id) == HostStatus::Up)
            .ok_or_else(|| {
                Error::Conflict(
                    "Cannot transfer Virtual Disk: no host is up (no data server answers)".into(),
                )
            })?,
    };
    let upload = direction == Direction::Upload;
    let t = Transfer {
        id: new_id(),
        disk_id: disk.id.clone(),
        host_id: host.id.clone(),
        direction,
        format,
        phase: Phase::Initializing,
        ticket_id: new_id(),
        ticket_size: state.images.ticket_size(&disk, upload, format),
        ticket_installed: false,
        ticket_expires: 0,
        inactivity_timeout,
        timeout_policy,
        transferred: 0,
        active: false,
        shallow,
        updated: now(),
        finished_at: 0,
        failures: 0,
        message: String::new(),
        backup_id: backup.map(|b| b.id).unwrap_or_default(),
    };
    if t.backup_id.is_empty() {
        let removing = state
            .removing_bitmaps
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if removing.contains(&t.disk_id) {
            return Err(Error::Conflict(format!(
                "Cannot transfer Virtual Disk: Disk {} is locked (a checkpoint of its VM is being removed). Please try again in a few minutes.",
                t.disk_id
            )));
        }
        state.db.insert_transfer_locking_disk(&t)?;
    } else {
        // The backup holds the disk's lock.
        state.db.insert_backup_transfer(&t)?;
    }
    tracing::info!(transfer = %t.id, disk = %t.disk_id, host = %host.name, %direction, "transfer added");
    spawn_driver(state.clone(), t.id.clone());
    Ok(t)
}

/// The backup a download names, checked as the engine does: it exists
/// (400), is ready (409), holds the disk (400); the transfer is a download
/// (400) of guest data (`format=raw`, 400).
fn backup_of_transfer(
    state: &State,
    r: &IdRef,
    disk: &Disk,
    direction: Direction,
    format: Format,
) -> Result<Backup> {
    let id = r.id.as_deref().unwrap_or("");
    let backup = state.db.backup(id)?.ok_or_else(|| {
        Error::BadRequest(format!(
            "Cannot transfer Virtual Disk: backup {id} does not exist."
        ))
    })?;
    if backup.phase != BackupPhase::Ready {
        return Err(Error::Conflict(format!(
            "Cannot transfer Virtual Disk: backup {id} is not ready (phase {}).",
            backup.phase
        )));
    }
    if !backup.disks.contains(&disk.id) {
        return Err(Error::BadRequest(format!(
            "Cannot transfer Virtual Disk: disk {} is not part of backup {id}.",
            disk.id
        )));
    }
    if direction != Direction::Download {
        return Err(Error::BadRequest(format!(
            "Cannot transfer Virtual Disk: backup {id} can only be downloaded."
        )));
    }
    if format != Format::Raw {
        return Err(Error::BadRequest(format!(
            "Cannot transfer Virtual Disk: format {format} is not applicable for backup; use raw."
        )));
    }
    Ok(backup)
}

/// For a backup download: the checkpoint whose bitmap the export carries,
/// when the disk is backed up incrementally.
fn dirty_bitmap(state: &State, t: &Transfer) -> Result<Option<String>> {
    if t.backup_id.is_empty() {
        return Ok(None);
    }
    let (Some(b), Some(d)) = (state.db.backup(&t.backup_id)?, state.db.disk(&t.disk_id)?) else {
        return Ok(None);
    };
    if super::backup::disk_mode(state, &b, &d)? == DiskBackupMode::Incremental {
        Ok(b.from_checkpoint_id)
    } else {
        Ok(None)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn refuse(action: Action, t: &Transfer) -> Error {
    Error::Conflict(format!(
        "Cannot {} image transfer {} in phase {}.",
        action.as_str(),
        t.id,
        t.phase
    ))
}

/// A client action. Phases that do not allow it give 409; pausing a
/// download gives 400 (the engine's NOT_SUPPORTED).
pub async fn act(state: &Arc<State>, id: &str, action: Action) -> Result<()> {
    let t = state.db.update_transfer(id, |t| {
        match action {
            Action::Pause => {
                if t.direction == Direction::Download {
                    return Err(Error::BadRequest(format!(
                        "Cannot pause image transfer {}: downloads cannot be paused.",
                        t.id
                    )));
                }
                if !t.phase.can_be_paused() {
                    return Err(refuse(action, t));
                }
                t.phase = Phase::PausedUser;
            }
            Action::Resume => {
                if !t.phase.is_paused() {
                    return Err(refuse(action, t));
                }
                t.phase = Phase::Resuming;
            }
            Action::Finalize => {
                if t.phase != Phase::Transferring {
                    return Err(refuse(action, t));
                }
                t.phase = Phase::FinalizingSuccess;
            }
            Action::Cancel => {
                if !t.phase.can_be_cancelled() {
                    return Err(refuse(action, t));
                }
                t.phase = Phase::CancelledUser;
            }
            Action::Extend => {
                if !(t.phase.can_be_paused() || t.phase.is_paused()) {
                    return Err(refuse(action, t));
                }
            }
        }
        if action != Action::Extend {
            t.failures = 0;
        }
        t.updated = now();
        Ok(())
    })?;
    tracing::info!(transfer = %t.id, action = action.as_str(), phase = %t.phase, "client action");
    if action == Action::Extend && t.phase == Phase::Transferring && t.ticket_installed {
        // Extend refreshes the ticket's expiry too, so a client that keeps
        // a transfer alive never loses its ticket.
        let timeout = state.config.ticket_timeout;
        control(state, &t)?.extend(&t.ticket_id, timeout).await?;
        let seen = t.phase;
        cas(state, &t.id, seen, |t| {
            t.ticket_expires = now() + timeout as i64;
        })?;
    }
    state.wake(&t.id);
    Ok(())
}

fn control(state: &State, t: &Transfer) -> Result<Control> {
    let host = state
        .hosts
        .iter()
        .find(|h| h.id == t.host_id)
        .ok_or_else(|| Error::Host {
            host: t.host_id.clone(),
            message: "the host is not registered any more".into(),
        })?;
    Ok(Control::new(host.clone()))
}

/// Whether the transfer moves guest data of a QCOW2 disk, through a
/// qemu-nbd the engine runs.
fn nbd_backed(state: &State, t: &Transfer) -> Result<bool> {
    Ok(t.format == Format::Raw
        && state
            .db
            .disk(&t.disk_id)?
            .is_some_and(|d| d.format == Format::Cow))
}

/// Start qemu-nbd if the transfer needs one and it is not running.
async fn ensure_backend(state: &State, t: &Transfer) -> Result<()> {
    if nbd_backed(state, t)? {
        let read_only = t.direction == Direction::Download;
        let bitmap = dirty_bitmap(state, t)?;
        state
            .nbd
            .ensure(
                &t.id,
                &state.images.path(&t.disk_id),
                read_only,
                bitmap.as_deref(),
            )
            .await?;
    }
    Ok(())
}

/// Cleanup gives up deleting a ticket after this many failed tries: the
/// ticket then expires on the data server by itself.
const CLEANUP_TRIES: u32 = 3;

/// Remove the ticket from the data server, then stop qemu-nbd if any.
/// `give_up`: after [`CLEANUP_TRIES`] failed deletes, go on anyway (cancel
/// and failure cleanup); otherwise keep failing so the next poll retries
/// (finalize must not report success with the ticket still open).
async fn release(state: &State, t: &Transfer, give_up: bool) -> Result<()> {
    if t.ticket_installed {
        let ctl = control(state, t);
        // The last progress, for the record: a transfer that ended within
        // a tick was never polled (best effort: the removal goes on).
        if let Ok(ctl) = &ctl {
            if let Ok(Some(status)) = ctl.get(&t.ticket_id).await {
                if let Some(bytes) = status.transferred {
                    cas(state, &t.id, t.phase, |n| n.transferred = bytes)?;
                }
            }
        }
        let deleted = async { ctl?.delete(&t.ticket_id).await }.await;
        if let Err(e) = deleted {
            if !give_up || t.failures + 1 < CLEANUP_TRIES {
                cas(state, &t.id, t.phase, |n| n.failures += 1)?;
                return Err(e);
            }
            tracing::warn!(error = %e, "cannot remove the ticket; it will expire by itself");
        }
    }
    state.nbd.stop(&t.id).await;
    Ok(())
}

fn ticket_spec(state: &State, t: &Transfer) -> Result<TicketSpec> {
    let disk = state
        .db
        .disk(&t.disk_id)?
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {}", t.disk_id)))?;
    let upload = t.direction == Direction::Upload;
    let url = if t.format == Format::Raw && disk.format == Format::Cow {
        state.nbd.url(&t.id)
    } else {
        state.images.url(&disk.id)
    };
    let ext = match disk.format {
        Format::Raw => "raw",
        Format::Cow => "qcow2",
    };
    Ok(TicketSpec {
        uuid: t.ticket_id.clone(),
        size: t.ticket_size,
        url,
        timeout: state.config.ticket_timeout,
        ops: vec![if upload { "write" } else { "read" }],
        inactivity_timeout: (t.inactivity_timeout > 0).then_some(t.inactivity_timeout),
        sparse: true,
        dirty: dirty_bitmap(state, t)?.is_some(),
        transfer_id: t.id.clone(),
        filename: (!upload).then(|| format!("{}.{ext}", disk.name)),
    })
}

/// Write a driver move if the phase is still `seen`; `Ok(None)` if a client
/// action changed it first.
fn cas(
    state: &State,
    id: &str,
    seen: Phase,
    change: impl FnOnce(&mut Transfer),
) -> Result<Option<Transfer>> {
    match state.db.update_transfer(id, |t| {
        if t.phase != seen {
            return Err(Error::Conflict(String::new()));
        }
        change(t);
        Ok(())
    }) {
        Ok(t) => Ok(Some(t)),
        Err(Error::Conflict(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Move to `to`, logging it.
fn enter(state: &State, t: &Transfer, to: Phase, change: impl FnOnce(&mut Transfer)) -> Result<()> {
    if let Some(n) = cas(state, &t.id, t.phase, |n| {
        n.phase = to;
        n.updated = now();
        n.failures = 0;
        if to.is_finished() {
            n.finished_at = now();
            n.active = false;
        }
        change(n);
    })? {
        tracing::info!(from = %t.phase, to = %n.phase, "phase");
    }
    Ok(())
}

/// Where the engine puts a transfer it stops: uploads pause, downloads are
/// cancelled (`updateEntityPhaseToStoppedBySystem`).
fn stopped_by_system(t: &Transfer) -> Phase {
    match t.direction {
        Direction::Upload => Phase::PausedSystem,
        Direction::Download => Phase::CancelledSystem,
    }
}

/// Start the driver task of transfer `id` (at add, and at engine start for
/// every transfer not finished).
pub fn spawn_driver(state: Arc<State>, id: String) {
    let span = tracing::info_span!(parent: None, "transfer", transfer = %id);
    spawn_driver_loop(state, id, span, |state, id| async move {
        match state.db.transfer(&id) {
            Ok(Some(t)) if t.phase.is_finished() => Turn::Ended,
            Ok(Some(t)) => {
                if let Err(e) = step(&state, t).await {
                    tracing::warn!(error = %e, "transfer step failed; retrying");
                }
                Turn::Again
            }
            Ok(None) => Turn::Ended,
            Err(e) => {
                tracing::error!(error = %e, "cannot read transfer");
                Turn::Again
            }
        }
    });
}

/// One system move from the current phase, if any is due.
async fn step(state: &Arc<State>, t: Transfer) -> Result<()> {
    let ticket = redact(&t.ticket_id);
    match t.phase {
        Phase::Initializing | Phase::Resuming => {
            let installed = async {
                ensure_backend(state, &t).await?;
                control(state, &t)?.put(&ticket_spec(state, &t)?).await
            }
            .await;
            match installed {
                Ok(()) => {
                    tracing::info!(%ticket, "ticket installed");
                    let expires = now() + state.config.ticket_timeout as i64;
                    // Recorded whatever the phase is now: a client action
                    // that came in meanwhile (pause, cancel) must still
                    // find the ticket to remove it.
                    state.db.update_transfer(&t.id, |n| {
                        n.ticket_installed = true;
                        n.ticket_expires = expires;
                        Ok(())
                    })?;
                    enter(state, &t, Phase::Transferring, |_| {})
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the ticket");
                    let to = if t.phase == Phase::Resuming {
                        Phase::PausedSystem
                    } else {
                        stopped_by_system(&t)
                    };
                    enter(state, &t, to, |n| n.message = e.to_string())
                }
            }
        }
        Phase::Transferring => watch(state, t).await,
        Phase::PausedUser | Phase::PausedSystem => Ok(()),
        Phase::FinalizingSuccess => {
            release(state, &t, false).await?;
            let disk = state.db.disk(&t.disk_id)?;
            let verdict = match (&disk, t.direction) {
                (Some(d), Direction::Upload) => state.images.verify(d),
                (Some(_), Direction::Download) => Ok(()),
                (None, _) => Err("the disk is gone".to_string()),
            };
            match verdict {
                Ok(()) => {
                    if t.backup_id.is_empty() {
                        state.db.set_disk_status(&t.disk_id, DiskStatus::Ok)?;
                    }
                    enter(state, &t, Phase::FinishedSuccess, |n| {
                        n.ticket_installed = false
                    })
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "verification failed");
                    state.db.set_disk_status(&t.disk_id, DiskStatus::Illegal)?;
                    enter(state, &t, Phase::FinalizingFailure, |n| {
                        n.ticket_installed = false;
                        n.message = format!("verification failed: {why}");
                    })
                }
            }
        }
        Phase::CancelledUser => enter(state, &t, Phase::FinalizingCleanup, |_| {}),
        Phase::CancelledSystem => enter(state, &t, Phase::FinalizingFailure, |_| {}),
        Phase::FinalizingCleanup => {
            release(state, &t, true).await?;
            let status = match t.direction {
                Direction::Upload => DiskStatus::Illegal,
                Direction::Download => DiskStatus::Ok,
            };
            if t.backup_id.is_empty() {
                state.db.set_disk_status(&t.disk_id, status)?;
            }
            enter(state, &t, Phase::FinishedCleanup, |n| {
                n.ticket_installed = false
            })
        }
        Phase::FinishedCleanup | Phase::FinalizingFailure => {
            release(state, &t, true).await?;
            match t.direction {
                // endWithFailure: roll back the upload, removing the disk.
                Direction::Upload => {
                    state.images.remove(&t.disk_id)?;
                    state.db.delete_disk(&t.disk_id)?;
                    tracing::info!(disk = %t.disk_id, "uploaded disk removed");
                }
                Direction::Download if t.backup_id.is_empty() => {
                    state.db.set_disk_status(&t.disk_id, DiskStatus::Ok)?
                }
                Direction::Download => {}
            }
            enter(state, &t, Phase::FinishedFailure, |n| {
                n.ticket_installed = false
            })
        }
        Phase::FinishedSuccess | Phase::FinishedFailure => Ok(()),
        // Never entered by this engine (wire names kept for clients).
        Phase::Unknown | Phase::Cancelled => Ok(()),
    }
}

/// At engine start, before the API serves: one look at a transferring
/// transfer's ticket, so that a data server that restarted with the engine
/// (the embedded one) has the ticket again before a client continues.
pub async fn check_at_start(state: &Arc<State>, t: Transfer) {
    if t.phase == Phase::Transferring {
        if let Err(e) = watch(state, t).await {
            tracing::warn!(error = %e, "cannot check the ticket at start");
        }
    }
}

/// While transferring: read the ticket, apply the inactivity policy, renew
/// the ticket before it expires. Two control failures in a row stop the
/// transfer (the engine's retry flag).
async fn watch(state: &Arc<State>, t: Transfer) -> Result<()> {
    let ctl = control(state, &t)?;
    if let Err(e) = ensure_backend(state, &t).await {
        return control_failed(state, &t, e);
    }
    let status = match ctl.get(&t.ticket_id).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            // The data server lost the ticket (it restarted): reinstall it.
            tracing::warn!("the data server lost the ticket; installing it again");
            let spec = ticket_spec(state, &t)?;
            return match ctl.put(&spec).await {
                Ok(()) => {
                    let expires = now() + state.config.ticket_timeout as i64;
                    cas(state, &t.id, t.phase, |n| n.ticket_expires = expires).map(|_| ())
                }
                Err(e) => control_failed(state, &t, e),
            };
        }
        Err(e) => return control_failed(state, &t, e),
    };
    // Progress counts as activity for data servers that do not report
    // idle_time (the engine's fallback: time since the last update).
    let progressed = status.transferred.is_some_and(|b| b != t.transferred);
    let idle = match status.idle_time {
        Some(idle) => idle,
        None if progressed || status.active => 0.0,
        None => (now() - t.updated).max(0) as f64,
    };
    if t.inactivity_timeout > 0 && !status.active && idle > t.inactivity_timeout as f64 {
        let to = match t.timeout_policy {
            TimeoutPolicy::Legacy => stopped_by_system(&t),
            TimeoutPolicy::Pause => Phase::PausedSystem,
            TimeoutPolicy::Cancel => Phase::CancelledSystem,
        };
        tracing::info!(idle, timeout = t.inactivity_timeout, policy = %t.timeout_policy, "client inactive");
        return enter(state, &t, to, |n| {
            n.message = format!("client inactive for {idle:.0} s");
        });
    }
    let mut expires = t.ticket_expires;
    if now() >= t.ticket_expires - state.config.renew_margin() as i64 {
        match ctl.extend(&t.ticket_id, state.config.ticket_timeout).await {
            Ok(()) => {
                expires = now() + state.config.ticket_timeout as i64;
                tracing::debug!("ticket renewed");
            }
            Err(e) => return control_failed(state, &t, e),
        }
    }
    cas(state, &t.id, t.phase, |n| {
        if progressed || status.active {
            n.updated = now();
        }
        n.failures = 0;
        n.active = status.active || status.connections > 0;
        if let Some(bytes) = status.transferred {
            n.transferred = bytes;
        }
        n.ticket_expires = expires;
    })
    .map(|_| ())
}

fn control_failed(state: &State, t: &Transfer, e: Error) -> Result<()> {
    tracing::warn!(error = %e, failures = t.failures + 1, "control API call failed");
    if t.failures >= 1 {
        enter(state, t, stopped_by_system(t), |n| {
            n.message = e.to_string()
        })
    } else {
        cas(state, &t.id, t.phase, |n| n.failures += 1).map(|_| ())
    }
}
