//! Tables of VM backups: VMs and their disk attachments, backups and the
//! disks they hold, checkpoints and the disks carrying their bitmaps.
//!
//! As for transfers, the changes a client must not see undone by a power
//! cut are committed with `synchronous=FULL` ([`durably`]): a backup
//! created (its disks locked), a backup's phase change (the end unlocks
//! its disks), a backup's transfer created, and a checkpoint created or
//! removed (its bitmaps are already on, or gone from, the disk images).

use super::{Db, durably, enum_col, read_disk, read_transfer, write_transfer};
use crate::engine::error::{Error, Result};
use crate::engine::model::{Backup, BackupPhase, Checkpoint, Disk, DiskStatus, Transfer, Vm};
use rusqlite::{Connection, OptionalExtension, Row, params};

const VM_COLS: &str = "id, name, description";
const BACKUP_COLS: &str = "id, vm_id, phase, from_checkpoint_id, to_checkpoint_id, description, \
    created, updated, message";
const CHECKPOINT_COLS: &str = "id, vm_id, parent_id, created, description";

fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<Vm> {
    Ok(Vm {
        id: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
    })
}

fn backup_from_row(row: &Row<'_>) -> rusqlite::Result<Backup> {
    Ok(Backup {
        id: row.get(0)?,
        vm_id: row.get(1)?,
        phase: enum_col(row, 2, "phase", BackupPhase::parse)?,
        from_checkpoint_id: row.get(3)?,
        to_checkpoint_id: row.get(4)?,
        description: row.get(5)?,
        created: row.get(6)?,
        updated: row.get(7)?,
        message: row.get(8)?,
        disks: Vec::new(),
    })
}

fn checkpoint_from_row(row: &Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        id: row.get(0)?,
        vm_id: row.get(1)?,
        parent_id: row.get(2)?,
        created: row.get(3)?,
        description: row.get(4)?,
        disks: Vec::new(),
    })
}

fn ids(conn: &Connection, sql: &str, key: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(params![key], |r| r.get(0))?;
    rows.collect()
}

fn read_backup(conn: &Connection, id: &str) -> rusqlite::Result<Option<Backup>> {
    let found = conn
        .query_row(
            &format!("SELECT {BACKUP_COLS} FROM backups WHERE id = ?1"),
            params![id],
            backup_from_row,
        )
        .optional()?;
    match found {
        None => Ok(None),
        Some(mut b) => {
            b.disks = ids(
                conn,
                "SELECT disk_id FROM backup_disks WHERE backup_id = ?1 ORDER BY rowid",
                &b.id,
            )?;
            Ok(Some(b))
        }
    }
}

/// Insert or update a backup row. An update keeps the row (and its rowid,
/// which orders a VM's backups oldest first): `INSERT OR REPLACE` would
/// delete it and insert it again at the end.
fn write_backup(conn: &Connection, b: &Backup) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO backups ({BACKUP_COLS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (id) DO UPDATE SET vm_id = excluded.vm_id, \
             phase = excluded.phase, from_checkpoint_id = excluded.from_checkpoint_id, \
             to_checkpoint_id = excluded.to_checkpoint_id, \
             description = excluded.description, created = excluded.created, \
             updated = excluded.updated, message = excluded.message"
        ),
        params![
            b.id,
            b.vm_id,
            b.phase.as_str(),
            b.from_checkpoint_id,
            b.to_checkpoint_id,
            b.description,
            b.created,
            b.updated,
            b.message,
        ],
    )?;
    Ok(())
}

fn read_checkpoint(conn: &Connection, id: &str) -> rusqlite::Result<Option<Checkpoint>> {
    let found = conn
        .query_row(
            &format!("SELECT {CHECKPOINT_COLS} FROM checkpoints WHERE id = ?1"),
            params![id],
            checkpoint_from_row,
        )
        .optional()?;
    match found {
        None => Ok(None),
        Some(mut c) => {
            c.disks = ids(
                conn,
                "SELECT disk_id FROM checkpoint_disks WHERE checkpoint_id = ?1 ORDER BY rowid",
                &c.id,
            )?;
            Ok(Some(c))
        }
    }
}

/// The body of [`Db::insert_backup_locking_disks`], in one transaction.
fn insert_locking_disks(conn: &mut Connection, b: &Backup) -> Result<()> {
    let tx = conn.transaction()?;
    let running: Option<String> = tx
        .query_row(
            "SELECT id FROM backups WHERE vm_id = ?1 AND phase NOT IN ('succeeded', 'failed')",
            params![b.vm_id],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(other) = running {
        return Err(Error::Conflict(format!(
            "Cannot backup VM. Backup {other} of the VM is in progress."
        )));
    }
    for id in &b.disks {
        let disk = read_disk(&tx, id)?.ok_or_else(|| not_found(id))?;
        if disk.status != DiskStatus::Ok {
            return Err(Error::Conflict(format!(
                "Cannot backup VM. Disk {id} is {}.",
                disk.status
            )));
        }
        tx.execute(
            "UPDATE disks SET status = 'locked' WHERE id = ?1",
            params![id],
        )?;
        tx.execute(
            "INSERT INTO backup_disks (backup_id, disk_id) VALUES (?1, ?2)",
            params![b.id, id],
        )?;
    }
    write_backup(&tx, b)?;
    tx.commit()?;
    Ok(())
}

/// The body of [`Db::insert_backup_transfer`], in one transaction.
fn insert_transfer(conn: &mut Connection, t: &Transfer) -> Result<()> {
    let tx = conn.transaction()?;
    let mut stmt = tx.prepare("SELECT id FROM transfers WHERE disk_id = ?1")?;
    let others = stmt
        .query_map(params![t.disk_id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(stmt);
    for other in others {
        if let Some(o) = read_transfer(&tx, &other)? {
            if !o.phase.is_finished() {
                return Err(Error::Conflict(format!(
                    "Cannot transfer Virtual Disk: transfer {} of disk {} is in progress.",
                    o.id, t.disk_id
                )));
            }
        }
    }
    write_transfer(&tx, t)?;
    tx.commit()?;
    Ok(())
}

/// Write backup `b` after a phase change; `unlock`: it ended, so its
/// disks are unlocked in the same transaction.
fn write_phase_change(conn: &mut Connection, b: &Backup, unlock: bool) -> Result<()> {
    let tx = conn.transaction()?;
    write_backup(&tx, b)?;
    if unlock {
        for disk in &b.disks {
            tx.execute(
                "UPDATE disks SET status = 'ok' WHERE id = ?1 AND status = 'locked'",
                params![disk],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("Entity not found: {id}"))
}

impl Db {
    // ---- VMs ----

    /// Store a new VM; Conflict if the name is taken.
    pub fn insert_vm(&self, vm: &Vm) -> Result<()> {
        let conn = self.lock();
        let taken: Option<String> = conn
            .query_row(
                "SELECT id FROM vms WHERE name = ?1",
                params![vm.name],
                |r| r.get(0),
            )
            .optional()?;
        if taken.is_some() {
            return Err(Error::Conflict(format!(
                "Cannot add VM. The VM name '{}' is already in use, please choose a unique name and try again.",
                vm.name
            )));
        }
        conn.execute(
            &format!("INSERT INTO vms ({VM_COLS}) VALUES (?1, ?2, ?3)"),
            params![vm.id, vm.name, vm.description],
        )?;
        Ok(())
    }

    /// One VM.
    pub fn vm(&self, id: &str) -> Result<Option<Vm>> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {VM_COLS} FROM vms WHERE id = ?1"),
                params![id],
                vm_from_row,
            )
            .optional()?)
    }

    /// All VMs, by name.
    pub fn vms(&self) -> Result<Vec<Vm>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT {VM_COLS} FROM vms ORDER BY name"))?;
        let rows = stmt.query_map([], vm_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Attach disk `disk_id` to VM `vm_id`. A disk belongs to one VM.
    pub fn attach_disk(&self, vm_id: &str, disk_id: &str) -> Result<Disk> {
        let conn = self.lock();
        let disk = read_disk(&conn, disk_id)?.ok_or_else(|| not_found(disk_id))?;
        let owner: Option<String> = conn
            .query_row(
                "SELECT vm_id FROM disk_attachments WHERE disk_id = ?1",
                params![disk_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(owner) = owner {
            return Err(Error::Conflict(format!(
                "Cannot attach Virtual Disk: disk {disk_id} is already attached to VM {owner}."
            )));
        }
        conn.execute(
            "INSERT INTO disk_attachments (vm_id, disk_id) VALUES (?1, ?2)",
            params![vm_id, disk_id],
        )?;
        Ok(disk)
    }

    /// The disks attached to a VM, in attachment order.
    pub fn vm_disks(&self, vm_id: &str) -> Result<Vec<Disk>> {
        let conn = self.lock();
        let mut out = Vec::new();
        for id in ids(
            &conn,
            "SELECT disk_id FROM disk_attachments WHERE vm_id = ?1 ORDER BY rowid",
            vm_id,
        )? {
            if let Some(d) = read_disk(&conn, &id)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    // ---- backups ----

    /// Store a new backup and lock its disks, atomically. Conflict if the
    /// VM has a backup that has not ended or a disk is not `ok`.
    pub fn insert_backup_locking_disks(&self, b: &Backup) -> Result<()> {
        durably(&mut self.lock(), |conn| insert_locking_disks(conn, b))
    }

    /// One backup with its disks.
    pub fn backup(&self, id: &str) -> Result<Option<Backup>> {
        Ok(read_backup(&self.lock(), id)?)
    }

    /// The backups of a VM (all VMs: `None`), oldest first.
    pub fn backups(&self, vm_id: Option<&str>) -> Result<Vec<Backup>> {
        let conn = self.lock();
        let all = match vm_id {
            Some(vm) => ids(
                &conn,
                "SELECT id FROM backups WHERE vm_id = ?1 ORDER BY rowid",
                vm,
            )?,
            None => {
                let mut stmt = conn.prepare("SELECT id FROM backups ORDER BY rowid")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<Vec<String>>>()?
            }
        };
        let mut out = Vec::new();
        for id in all {
            if let Some(b) = read_backup(&conn, &id)? {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Change a backup under the lock (see [`Db::update_transfer`]); when
    /// the change ends it, its disks are unlocked in the same transaction.
    /// A phase change is committed with `synchronous=FULL`.
    pub fn update_backup(
        &self,
        id: &str,
        change: impl FnOnce(&mut Backup) -> Result<()>,
    ) -> Result<Backup> {
        let mut conn = self.lock();
        let mut b = read_backup(&conn, id)?.ok_or_else(|| not_found(id))?;
        let before = b.phase;
        change(&mut b)?;
        if b.phase != before {
            let unlock = b.phase.is_finished() && !before.is_finished();
            durably(&mut conn, |conn| write_phase_change(conn, &b, unlock))?;
        } else {
            write_backup(&conn, &b)?;
        }
        Ok(b)
    }

    /// Store a download transfer of a backup's disk. The disk stays locked
    /// by the backup; Conflict if another transfer of it is not finished.
    pub fn insert_backup_transfer(&self, t: &Transfer) -> Result<()> {
        durably(&mut self.lock(), |conn| insert_transfer(conn, t))
    }

    // ---- checkpoints ----

    /// Store a checkpoint, or update it in place (its rowid orders the
    /// VM's checkpoints); `synchronous=FULL`: its bitmaps are on the disks
    /// already.
    pub fn insert_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        durably(&mut self.lock(), |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                &format!(
                    "INSERT INTO checkpoints ({CHECKPOINT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (id) DO UPDATE SET vm_id = excluded.vm_id, \
                     parent_id = excluded.parent_id, created = excluded.created, \
                     description = excluded.description"
                ),
                params![c.id, c.vm_id, c.parent_id, c.created, c.description],
            )?;
            tx.execute(
                "DELETE FROM checkpoint_disks WHERE checkpoint_id = ?1",
                params![c.id],
            )?;
            for d in &c.disks {
                tx.execute(
                    "INSERT INTO checkpoint_disks (checkpoint_id, disk_id) VALUES (?1, ?2)",
                    params![c.id, d],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// One checkpoint with its disks.
    pub fn checkpoint(&self, id: &str) -> Result<Option<Checkpoint>> {
        Ok(read_checkpoint(&self.lock(), id)?)
    }

    /// The checkpoints of a VM, oldest (the root) first.
    pub fn checkpoints(&self, vm_id: &str) -> Result<Vec<Checkpoint>> {
        let conn = self.lock();
        let mut out = Vec::new();
        for id in ids(
            &conn,
            "SELECT id FROM checkpoints WHERE vm_id = ?1 ORDER BY rowid",
            vm_id,
        )? {
            if let Some(c) = read_checkpoint(&conn, &id)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Forget a checkpoint; the next one becomes the root
    /// (`synchronous=FULL`: its bitmaps are gone from the disks already).
    pub fn delete_checkpoint(&self, id: &str) -> Result<()> {
        durably(&mut self.lock(), |conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM checkpoints WHERE id = ?1", params![id])?;
            tx.execute(
                "DELETE FROM checkpoint_disks WHERE checkpoint_id = ?1",
                params![id],
            )?;
            tx.execute(
                "UPDATE checkpoints SET parent_id = NULL WHERE parent_id = ?1",
                params![id],
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{DiskBackup, Format};
    use std::path::Path;

    fn disk(id: &str) -> Disk {
        Disk {
            id: id.into(),
            name: id.into(),
            description: String::new(),
            format: Format::Cow,
            provisioned_size: 1 << 20,
            status: DiskStatus::Ok,
            backup: DiskBackup::Incremental,
        }
    }

    fn backup(id: &str, disks: &[&str]) -> Backup {
        Backup {
            id: id.into(),
            vm_id: "vm".into(),
            phase: BackupPhase::Initializing,
            from_checkpoint_id: None,
            to_checkpoint_id: Some(format!("cp-{id}")),
            description: String::new(),
            disks: disks.iter().map(|d| d.to_string()).collect(),
            created: 1,
            updated: 1,
            message: String::new(),
        }
    }

    #[test]
    fn backups_lock_their_disks_one_at_a_time_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.db");
        {
            let db = Db::open(&path).unwrap();
            db.insert_disk(&disk("d1")).unwrap();
            db.insert_vm(&Vm {
                id: "vm".into(),
                name: "v".into(),
                description: String::new(),
            })
            .unwrap();
            db.attach_disk("vm", "d1").unwrap();
            assert!(matches!(
                db.attach_disk("vm", "d1"),
                Err(Error::Conflict(_))
            ));
            assert!(matches!(
                db.attach_disk("vm", "nope"),
                Err(Error::NotFound(_))
            ));
            db.insert_backup_locking_disks(&backup("b1", &["d1"]))
                .unwrap();
            assert_eq!(db.disk("d1").unwrap().unwrap().status, DiskStatus::Locked);
            assert!(matches!(
                db.insert_backup_locking_disks(&backup("b2", &["d1"])),
                Err(Error::Conflict(_))
            ));
            db.update_backup("b1", |b| {
                b.phase = BackupPhase::Ready;
                Ok(())
            })
            .unwrap();
            // Written with FULL, then back to NORMAL.
            assert_eq!(db.synchronous(), 1);
        }
        let db = Db::open(&path).unwrap();
        let b = db.backup("b1").unwrap().unwrap();
        assert_eq!(b.phase, BackupPhase::Ready);
        assert_eq!(b.disks, ["d1"]);
        assert_eq!(db.disk("d1").unwrap().unwrap().status, DiskStatus::Locked);
        assert_eq!(db.vm_disks("vm").unwrap().len(), 1);
        db.update_backup("b1", |b| {
            b.phase = BackupPhase::Succeeded;
            Ok(())
        })
        .unwrap();
        assert_eq!(db.disk("d1").unwrap().unwrap().status, DiskStatus::Ok);
        assert!(
            db.insert_backup_locking_disks(&backup("b2", &["d1"]))
                .is_ok()
        );
        // An update keeps a backup in its place: oldest first.
        db.update_backup("b1", |b| {
            b.message = "again".into();
            Ok(())
        })
        .unwrap();
        let order: Vec<String> = db
            .backups(Some("vm"))
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(order, ["b1", "b2"]);
    }

    #[test]
    fn checkpoints_keep_their_order_and_parents() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("e.db")).unwrap();
        for (id, parent) in [("c1", None), ("c2", Some("c1")), ("c3", Some("c2"))] {
            db.insert_checkpoint(&Checkpoint {
                id: id.into(),
                vm_id: "vm".into(),
                parent_id: parent.map(str::to_string),
                created: 5,
                description: String::new(),
                disks: vec!["d1".into(), "d2".into()],
            })
            .unwrap();
        }
        let ids = |db: &Db| -> Vec<String> {
            db.checkpoints("vm")
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect()
        };
        assert_eq!(ids(&db), ["c1", "c2", "c3"]);
        assert_eq!(db.checkpoint("c2").unwrap().unwrap().disks, ["d1", "d2"]);
        db.delete_checkpoint("c1").unwrap();
        assert_eq!(db.synchronous(), 1);
        assert_eq!(ids(&db), ["c2", "c3"]);
        assert_eq!(db.checkpoint("c2").unwrap().unwrap().parent_id, None);
        assert!(db.checkpoint("c1").unwrap().is_none());
    }

    #[test]
    fn a_database_of_the_first_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(super::super::SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO disks (id, name, description, format, provisioned_size, status) \
                 VALUES ('old', 'o', '', 'raw', 1024, 'ok')",
                [],
            )
            .unwrap();
        }
        let db = Db::open(Path::new(&path)).unwrap();
        let d = db.disk("old").unwrap().unwrap();
        assert_eq!(d.backup, DiskBackup::None);
        assert!(db.vms().unwrap().is_empty());
        drop(db);
        // Opening again runs no migration twice.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.disk("old").unwrap().unwrap().provisioned_size, 1024);
    }
}
