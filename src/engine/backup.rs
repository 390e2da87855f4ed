//! VM backups (oVirt 4.4+ model), done as oVirt does a backup of a VM
//! that is down (a cold backup on a host with qemu-nbd):
//!
//! - a **checkpoint** is a persistent, enabled QCOW2 dirty bitmap named
//!   after it, added to every disk of the backup that is enabled for
//!   incremental backup (`qemu-img bitmap --add`); every later write
//!   through qemu-nbd (uploads of guest data to a `cow` disk) marks it, so
//!   the bitmap of checkpoint C holds every change since C;
//! - a **backup** locks its disks, creates its checkpoint (`starting`),
//!   then is `ready`: each disk is downloaded by an image transfer with
//!   `<backup id>` (`format=raw`), served by a read-only qemu-nbd that
//!   exports the bitmap of `from_checkpoint_id` (`qemu-nbd -B`), behind a
//!   ticket with `"dirty": true`; `finalize` ends it and unlocks the disks.
//!
//! Phases: `initializing → starting → ready → finalizing → succeeded`
//! (`failed` when the checkpoint cannot be created). A driver task per
//! backup makes the system moves; all state is in the database, so an
//! engine restarted mid-backup picks it up where it was.

use super::error::{Error, Result};
use super::model::{
    Backup, BackupPhase, Checkpoint, Disk, DiskBackup, DiskBackupMode, DiskStatus, Format, new_id,
    now,
};
use super::qemu;
use super::xml::BackupIn;
use super::{State, Turn, spawn_driver_loop};
use std::sync::Arc;

/// `POST /vms/ID/backups`: validate, store (locking the disks), start the
/// driver. The new backup is `initializing`.
///
/// Holds the VM's lock from the checks until the backup is stored with its
/// disks locked, so the checkpoint it starts from cannot be removed
/// meanwhile (see [`remove_checkpoint`]).
///
/// # Errors
/// 404 unknown VM; 400 a disk that is not the VM's, an unknown (or
/// removed) `from_checkpoint_id` or one whose bitmap is missing or
/// inconsistent on a disk, a bad id; 409 a backup of the VM is running or
/// a disk is locked.
pub async fn add(state: &Arc<State>, vm_id: &str, req: BackupIn) -> Result<Backup> {
    let vm = state
        .db
        .vm(vm_id)?
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {vm_id}")))?;
    let _vm_lock = state.lock_vm(&vm.id).await;
    let attached = state.db.vm_disks(&vm.id)?;
    let wanted: Vec<String> = match &req.disks {
        Some(list) if !list.disk.is_empty() => {
            let mut ids = Vec::new();
            for d in &list.disk {
                let id = d.id.clone().ok_or_else(|| {
                    Error::BadRequest("Cannot backup VM. A disk has no id.".into())
                })?;
                if !attached.iter().any(|a| a.id == id) {
                    return Err(Error::BadRequest(format!(
                        "Cannot backup VM. Disk {id} is not attached to VM {}.",
                        vm.name
                    )));
                }
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            ids
        }
        _ => attached.iter().map(|d| d.id.clone()).collect(),
    };
    if wanted.is_empty() {
        return Err(Error::BadRequest(format!(
            "Cannot backup VM. VM {} has no disks.",
            vm.name
        )));
    }
    let from = match req.from_checkpoint_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(c) => {
            let found = state.db.checkpoint(c)?.filter(|cp| cp.vm_id == vm.id);
            let Some(cp) = found else {
                return Err(Error::BadRequest(format!(
                    "Cannot backup VM. Checkpoint {c} does not exist (it was never created \
                     or was removed); start a full backup without from_checkpoint_id."
                )));
            };
            Some(cp)
        }
    };
    let id = match req.id.as_deref() {
        None => new_id(),
        Some(v) => {
            let id = parse_uuid("id", v)?;
            if state.db.backup(&id)?.is_some() {
                return Err(Error::Conflict(format!(
                    "Cannot backup VM. A backup with id {id} exists."
                )));
            }
            id
        }
    };
    let incremental = attached
        .iter()
        .any(|d| wanted.contains(&d.id) && d.backup == DiskBackup::Incremental);
    let t = now();
    let backup = Backup {
        id,
        vm_id: vm.id.clone(),
        phase: BackupPhase::Initializing,
        from_checkpoint_id: from.as_ref().map(|cp| cp.id.clone()),
        to_checkpoint_id: incremental.then(new_id),
        description: req.description.unwrap_or_default(),
        disks: wanted,
        created: t,
        updated: t,
        message: String::new(),
    };
    if backup.description.len() > 4096 {
        return Err(Error::BadRequest(
            "The backup description is longer than 4096 characters".into(),
        ));
    }
    if let Some(cp) = &from {
        let disks: Vec<&Disk> = attached
            .iter()
            .filter(|d| backup.disks.contains(&d.id))
            .collect();
        check_bitmaps(state, cp, &disks).await?;
    }
    state.db.insert_backup_locking_disks(&backup)?;
    tracing::info!(backup = %backup.id, vm = %vm.id, from = ?backup.from_checkpoint_id,
        to = ?backup.to_checkpoint_id, "backup added");
    spawn_driver(state.clone(), backup.id.clone());
    Ok(backup)
}

/// Refuse an incremental backup from checkpoint `cp` when a disk that it
/// would back up incrementally has lost the checkpoint's bitmap, or has it
/// flagged `in-use` (the image was not closed cleanly, e.g. a qemu-nbd was
/// killed, so the bitmap may miss changes). A locked disk is skipped: the
/// backup is refused for it anyway (409), and a writable qemu-nbd serving
/// it flags its bitmaps in-use while it runs.
async fn check_bitmaps(state: &State, cp: &Checkpoint, disks: &[&Disk]) -> Result<()> {
    let todo: Vec<(String, std::path::PathBuf)> = disks
        .iter()
        .filter(|d| d.status != DiskStatus::Locked && has_bitmap(cp, d))
        .map(|d| (d.id.clone(), state.images.path(&d.id)))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let name = cp.id.clone();
    let states = tokio::task::spawn_blocking(move || {
        todo.into_iter()
            .map(|(id, path)| qemu::bitmap_state(&path, &name).map(|s| (id, s)))
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| Error::io("check bitmaps", std::io::Error::other(e.to_string())))??;
    let bad = states.into_iter().find_map(|(disk, s)| match s {
        qemu::BitmapState::Usable => None,
        qemu::BitmapState::Missing => Some((disk, "missing")),
        qemu::BitmapState::InUse => Some((disk, "inconsistent (the disk was not closed cleanly)")),
    });
    if let Some((disk, what)) = bad {
        return Err(Error::BadRequest(format!(
            "Cannot backup VM. Checkpoint {} cannot be used for disk {disk}: its bitmap is \
             {what}; start a full backup without from_checkpoint_id.",
            cp.id
        )));
    }
    Ok(())
}

/// Whether checkpoint `cp` has a bitmap on `disk` that an incremental
/// backup uses: the disk is a QCOW2 one enabled for incremental backup and
/// was in the checkpoint.
fn has_bitmap(cp: &Checkpoint, disk: &Disk) -> bool {
    disk.backup == DiskBackup::Incremental
        && disk.format == Format::Cow
        && cp.disks.contains(&disk.id)
}

/// A UUID in canonical form, or a 400 naming the field.
pub fn parse_uuid(field: &str, v: &str) -> Result<String> {
    uuid::Uuid::parse_str(v)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            Error::BadRequest(format!(
                "Invalid value '{v}' for '{field}': expecting a UUID"
            ))
        })
}

/// The backup `id` of VM `vm_id`, or 404.
pub fn find(state: &State, vm_id: &str, id: &str) -> Result<Backup> {
    state
        .db
        .backup(id)?
        .filter(|b| b.vm_id == vm_id)
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))
}

/// How `disk` is backed up by `backup`: incremental when the backup starts
/// from a checkpoint that has the disk's bitmap and the disk is enabled for
/// incremental backup; full otherwise (a disk added to the VM after the
/// checkpoint, or a disk whose backup is `none`), as oVirt's mixed backups.
pub fn disk_mode(state: &State, backup: &Backup, disk: &Disk) -> Result<DiskBackupMode> {
    let Some(from) = &backup.from_checkpoint_id else {
        return Ok(DiskBackupMode::Full);
    };
    if disk.backup != DiskBackup::Incremental || disk.format != Format::Cow {
        return Ok(DiskBackupMode::Full);
    }
    let incremental = state
        .db
        .checkpoint(from)?
        .is_some_and(|c| has_bitmap(&c, disk));
    Ok(if incremental {
        DiskBackupMode::Incremental
    } else {
        DiskBackupMode::Full
    })
}

/// `POST /vms/ID/backups/ID/finalize`: `ready → finalizing`; again on a
/// backup that is finalizing or succeeded changes nothing (the SDK example
/// may stop a backup twice).
///
/// # Errors
/// 409 before the backup is ready, after it failed, or while a transfer of
/// it is not finished (finalize the transfers first).
pub fn finalize(state: &Arc<State>, vm_id: &str, id: &str) -> Result<()> {
    find(state, vm_id, id)?;
    let open: Vec<String> = state
        .db
        .transfers()?
        .into_iter()
        .filter(|t| t.backup_id == id && !t.phase.is_finished())
        .map(|t| t.id)
        .collect();
    let b = state.db.update_backup(id, |b| match b.phase {
        BackupPhase::Ready if !open.is_empty() => Err(Error::Conflict(format!(
            "Cannot stop VM backup {}: image transfers {} are in progress; finalize them first.",
            b.id,
            open.join(", ")
        ))),
        BackupPhase::Ready => {
            b.phase = BackupPhase::Finalizing;
            b.updated = now();
            Ok(())
        }
        BackupPhase::Finalizing | BackupPhase::Succeeded => Ok(()),
        phase => Err(Error::Conflict(format!(
            "Cannot stop VM backup {} in phase {phase}.",
            b.id
        ))),
    })?;
    tracing::info!(backup = %b.id, phase = %b.phase, "backup finalize");
    state.wake(id);
    Ok(())
}

/// `DELETE /vms/ID/checkpoints/ID`: remove the VM's oldest (root)
/// checkpoint and its bitmaps, as oVirt allows only that one.
///
/// Holds the VM's lock from the checks until the bitmaps and the row are
/// gone, so no backup starts from the checkpoint meanwhile (see [`add`]).
///
/// # Errors
/// 404 unknown; 400 not the root; 409 a backup of the VM is running, or a
/// disk of the VM (or of the checkpoint) is locked.
pub async fn remove_checkpoint(state: &Arc<State>, vm_id: &str, id: &str) -> Result<()> {
    let _vm_lock = state.lock_vm(vm_id).await;
    let all = state.db.checkpoints(vm_id)?;
    let Some(pos) = all.iter().position(|c| c.id == id) else {
        return Err(Error::NotFound(format!("Entity not found: {id}")));
    };
    if pos != 0 {
        return Err(Error::BadRequest(format!(
            "Cannot remove checkpoint {id}: only the VM's root checkpoint ({}) can be removed.",
            all[0].id
        )));
    }
    if let Some(b) = state
        .db
        .backups(Some(vm_id))?
        .into_iter()
        .find(|b| !b.phase.is_finished())
    {
        return Err(Error::Conflict(format!(
            "Cannot remove checkpoint {id}: backup {} of the VM is in progress.",
            b.id
        )));
    }
    let cp = all[0].clone();
    let mut ids: Vec<String> = state
        .db
        .vm_disks(vm_id)?
        .into_iter()
        .map(|d| d.id)
        .collect();
    for d in &cp.disks {
        if !ids.contains(d) {
            ids.push(d.clone());
        }
    }
    let mut paths = Vec::new();
    let _removing = {
        // Checked and claimed at once against transfers (see
        // `removing_bitmaps`).
        let mut removing = state
            .removing_bitmaps
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for d in &ids {
            match state.db.disk(d)? {
                None => {}
                Some(disk) if disk.status == DiskStatus::Locked || removing.contains(d) => {
                    return Err(Error::Conflict(format!(
                        "Cannot remove checkpoint {id}: disk {d} is locked. Please try again in a few minutes."
                    )));
                }
                Some(_) if cp.disks.contains(d) => paths.push(state.images.path(d)),
                Some(_) => {}
            }
        }
        removing.extend(cp.disks.iter().cloned());
        RemovingBitmaps {
            state: state.as_ref(),
            disks: cp.disks.clone(),
        }
    };
    let name = cp.id.clone();
    tokio::task::spawn_blocking(move || {
        for p in paths {
            qemu::remove_bitmap(&p, &name)?;
        }
        Ok::<_, Error>(())
    })
    .await
    .map_err(|e| Error::io("remove bitmaps", std::io::Error::other(e.to_string())))??;
    state.db.delete_checkpoint(&cp.id)?;
    tracing::info!(checkpoint = %cp.id, vm = %vm_id, "checkpoint removed");
    Ok(())
}

/// Disks whose bitmaps a checkpoint removal is removing; released when
/// it ends, however it ends.
struct RemovingBitmaps<'a> {
    state: &'a State,
    disks: Vec<String>,
}

impl Drop for RemovingBitmaps<'_> {
    fn drop(&mut self) {
        let mut removing = self
            .state
            .removing_bitmaps
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for d in &self.disks {
            removing.remove(d);
        }
    }
}

/// Start the driver of backup `id` (at add, and at engine start for every
/// backup that has not ended).
pub fn spawn_driver(state: Arc<State>, id: String) {
    let span = tracing::info_span!(parent: None, "backup", backup = %id);
    spawn_driver_loop(state, id, span, |state, id| async move {
        match state.db.backup(&id) {
            Ok(Some(b)) if b.phase.is_finished() => Turn::Ended,
            Ok(Some(b)) => {
                if let Err(e) = step(&state, b).await {
                    tracing::warn!(error = %e, "backup step failed; retrying");
                }
                Turn::Again
            }
            Ok(None) => Turn::Ended,
            Err(e) => {
                tracing::error!(error = %e, "cannot read backup");
                Turn::Again
            }
        }
    });
}

/// Move backup `b` on if its phase is still `seen`.
fn enter(state: &State, b: &Backup, to: BackupPhase, message: Option<String>) -> Result<()> {
    let seen = b.phase;
    let moved = state.db.update_backup(&b.id, |n| {
        if n.phase != seen {
            return Err(Error::Conflict(String::new()));
        }
        n.phase = to;
        n.updated = now();
        if let Some(m) = message {
            n.message = m;
        }
        Ok(())
    });
    match moved {
        Ok(_) => {
            tracing::info!(from = %seen, to = %to, "backup phase");
            Ok(())
        }
        Err(Error::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One system move from the current phase, if any is due.
async fn step(state: &Arc<State>, b: Backup) -> Result<()> {
    match b.phase {
        BackupPhase::Initializing => enter(state, &b, BackupPhase::Starting, None),
        BackupPhase::Starting => match create_checkpoint(state, &b).await {
            Ok(()) => enter(state, &b, BackupPhase::Ready, None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the checkpoint");
                enter(state, &b, BackupPhase::Failed, Some(e.to_string()))
            }
        },
        BackupPhase::Finalizing => enter(state, &b, BackupPhase::Succeeded, None),
        BackupPhase::Ready | BackupPhase::Succeeded | BackupPhase::Failed => Ok(()),
    }
}

/// Add the bitmap of the backup's new checkpoint to each of its disks that
/// is enabled for incremental backup, and record the checkpoint. Idempotent
/// (an engine restarted in `starting` does it again: the disks were locked
/// all along, so a fresh bitmap is exact).
async fn create_checkpoint(state: &Arc<State>, b: &Backup) -> Result<()> {
    let Some(to) = b.to_checkpoint_id.clone() else {
        return Ok(());
    };
    let mut disks = Vec::new();
    for id in &b.disks {
        if let Some(d) = state.db.disk(id)? {
            if d.backup == DiskBackup::Incremental && d.format == Format::Cow {
                disks.push(d.id);
            }
        }
    }
    let paths: Vec<_> = disks.iter().map(|d| state.images.path(d)).collect();
    let name = to.clone();
    let added = tokio::task::spawn_blocking(move || {
        for (i, p) in paths.iter().enumerate() {
            if let Err(e) = qemu::add_bitmap(p, &name) {
                // Leave no half checkpoint behind.
                for done in &paths[..i] {
                    let _ = qemu::remove_bitmap(done, &name);
                }
                return Err(e);
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::io("add bitmaps", std::io::Error::other(e.to_string())))?;
    added?;
    let parent = state
        .db
        .checkpoints(&b.vm_id)?
        .into_iter()
        .rfind(|c| c.id != to)
        .map(|c| c.id);
    state.db.insert_checkpoint(&Checkpoint {
        id: to.clone(),
        vm_id: b.vm_id.clone(),
        parent_id: parent,
        created: now(),
        description: b.description.clone(),
        disks,
    })?;
    tracing::info!(checkpoint = %to, "checkpoint created");
    Ok(())
}
