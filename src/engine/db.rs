//! The engine's state in SQLite: disks, hosts, transfers and SSO tokens;
//! VMs, backups and checkpoints in `db/backup.rs`.
//!
//! One connection behind a `std::sync::Mutex`: every query is short and
//! none is held across an `.await`. Changes of a transfer go through
//! [`Db::update_transfer`], which re-reads the row under the lock, checks
//! that its phase is still the one the caller saw, and writes the change
//! (compare and set), so a client action and the monitor never overwrite
//! each other.
//!
//! WAL with `synchronous=NORMAL`: a commit is atomic but the last ones may
//! be lost on power loss. The transfer driver commits on every watch tick,
//! so that is the common case; the rare changes whose loss would mislead a
//! client (a transfer created or moved to another phase, a disk's status,
//! a disk deleted) are written with `synchronous=FULL` ([`durably`]): when
//! the API has answered `finished_success`, a power cut cannot bring back
//! `finalizing_success` or a locked disk.

use super::error::{Error, Result};
use super::model::{
    Direction, Disk, DiskBackup, DiskStatus, Format, Host, Phase, TimeoutPolicy, Transfer,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

mod backup;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS disks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    format TEXT NOT NULL,
    provisioned_size INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    control_socket TEXT NOT NULL,
    data_url TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    disk_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    direction TEXT NOT NULL,
    format TEXT NOT NULL,
    phase TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    ticket_size INTEGER NOT NULL,
    ticket_installed INTEGER NOT NULL,
    ticket_expires INTEGER NOT NULL,
    inactivity_timeout INTEGER NOT NULL,
    timeout_policy TEXT NOT NULL,
    transferred INTEGER NOT NULL,
    active INTEGER NOT NULL,
    shallow INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    expires INTEGER NOT NULL
);
";

/// Schema changes after [`SCHEMA`], in order: migration `i` brings a
/// database from `user_version` i to i + 1. A database of any version is
/// brought to the last one at open, in one transaction per step.
///
/// [`SCHEMA`] stays as it was before migrations existed (`user_version`
/// 0, which every database written by an earlier version has): a new
/// database is created by it and then migrated like an old one, so both
/// take the same path. Never edit a table in [`SCHEMA`]; add a step here.
const MIGRATIONS: &[&str] = &[
    // 1: VM backups (issue 11): VMs and their disks, backups, checkpoints.
    "
    ALTER TABLE disks ADD COLUMN backup TEXT NOT NULL DEFAULT 'none';
    ALTER TABLE transfers ADD COLUMN backup_id TEXT NOT NULL DEFAULT '';
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL
    );
    CREATE TABLE disk_attachments (
        vm_id TEXT NOT NULL,
        disk_id TEXT NOT NULL UNIQUE,
        PRIMARY KEY (vm_id, disk_id)
    );
    CREATE TABLE backups (
        id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL,
        phase TEXT NOT NULL,
        from_checkpoint_id TEXT,
        to_checkpoint_id TEXT,
        description TEXT NOT NULL,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        message TEXT NOT NULL
    );
    CREATE TABLE backup_disks (
        backup_id TEXT NOT NULL,
        disk_id TEXT NOT NULL,
        PRIMARY KEY (backup_id, disk_id)
    );
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL,
        parent_id TEXT,
        created INTEGER NOT NULL,
        description TEXT NOT NULL
    );
    CREATE TABLE checkpoint_disks (
        checkpoint_id TEXT NOT NULL,
        disk_id TEXT NOT NULL,
        PRIMARY KEY (checkpoint_id, disk_id)
    );
    ",
];

/// Refuse a database written by a newer nbdbridge: its `user_version` is
/// past the last of [`MIGRATIONS`], so its schema has changes this code
/// does not know (and would silently misread or damage). Checked before
/// anything is written to it.
fn check_schema_version(conn: &Connection, path: &Path) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(Error::Config(format!(
            "the database {} has schema version {version}, but this nbdbridge knows \
             versions up to {known} only: this nbdbridge is older than the one that last \
             wrote the data dir; run that newer nbdbridge (the database was not changed)",
            path.display()
        )));
    }
    Ok(())
}

/// Bring the schema to the last version (see [`MIGRATIONS`]).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}

/// The database handle.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

/// Hex blake2b-256 of a token.
fn token_digest(token: &str) -> String {
    use blake2::Digest;
    let digest = blake2::Blake2b::<blake2::digest::consts::U32>::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn bad_column(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, format!("{what}={value}"), rusqlite::types::Type::Text)
}

fn enum_col<T>(
    row: &Row<'_>,
    idx: usize,
    what: &str,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    parse(&s).ok_or_else(|| bad_column(what, &s))
}

fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    Ok(v.max(0) as u64)
}

fn disk_from_row(row: &Row<'_>) -> rusqlite::Result<Disk> {
    Ok(Disk {
        id: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        format: enum_col(row, 3, "format", Format::parse)?,
        provisioned_size: u64_col(row, 4)?,
        status: enum_col(row, 5, "status", DiskStatus::parse)?,
        backup: enum_col(row, 6, "backup", DiskBackup::parse)?,
    })
}

const DISK_COLS: &str = "id, name, description, format, provisioned_size, status, backup";

const TRANSFER_COLS: &str = "id, disk_id, host_id, direction, format, phase, ticket_id, \
    ticket_size, ticket_installed, ticket_expires, inactivity_timeout, timeout_policy, \
    transferred, active, shallow, updated, finished_at, failures, message, backup_id";

fn transfer_from_row(row: &Row<'_>) -> rusqlite::Result<Transfer> {
    Ok(Transfer {
        id: row.get(0)?,
        disk_id: row.get(1)?,
        host_id: row.get(2)?,
        direction: enum_col(row, 3, "direction", Direction::parse)?,
        format: enum_col(row, 4, "format", Format::parse)?,
        phase: enum_col(row, 5, "phase", Phase::parse)?,
        ticket_id: row.get(6)?,
        ticket_size: u64_col(row, 7)?,
        ticket_installed: row.get(8)?,
        ticket_expires: row.get(9)?,
        inactivity_timeout: u64_col(row, 10)?,
        timeout_policy: enum_col(row, 11, "timeout_policy", TimeoutPolicy::parse)?,
        transferred: u64_col(row, 12)?,
        active: row.get(13)?,
        shallow: row.get(14)?,
        updated: row.get(15)?,
        finished_at: row.get(16)?,
        failures: row.get(17)?,
        message: row.get(18)?,
        backup_id: row.get(19)?,
    })
}

/// The body of [`Db::insert_transfer_locking_disk`], in one transaction.
fn insert_locking_disk(conn: &mut Connection, t: &Transfer) -> Result<()> {
    let tx = conn.transaction()?;
    let disk = read_disk(&tx, &t.disk_id)?
        .ok_or_else(|| Error::NotFound(format!("Entity not found: {}", t.disk_id)))?;
    match disk.status {
        DiskStatus::Ok => {}
        DiskStatus::Locked => {
            return Err(Error::Conflict(format!(
                "Cannot transfer Virtual Disk: Disk {} is locked. Please try again in a few minutes.",
                disk.id
            )));
        }
        DiskStatus::Illegal => {
            return Err(Error::Conflict(format!(
                "Cannot transfer Virtual Disk: Disk {} is illegal.",
                disk.id
            )));
        }
    }
    tx.execute(
        "UPDATE disks SET status = ?2 WHERE id = ?1",
        params![t.disk_id, DiskStatus::Locked.as_str()],
    )?;
    write_transfer(&tx, t)?;
    tx.commit()?;
    Ok(())
}

/// Run `f` with `synchronous=FULL`, so its commit is on disk when it
/// returns, then go back to NORMAL (also when `f` fails).
fn durably<T>(conn: &mut Connection, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("PRAGMA synchronous = FULL")?;
    let out = f(conn);
    let back = conn.execute_batch("PRAGMA synchronous = NORMAL");
    let out = out?;
    back?;
    Ok(out)
}

fn write_transfer(conn: &Connection, t: &Transfer) -> rusqlite::Result<()> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO transfers ({TRANSFER_COLS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
        ),
        params![
            t.id,
            t.disk_id,
            t.host_id,
            t.direction.as_str(),
            t.format.as_str(),
            t.phase.as_str(),
            t.ticket_id,
            t.ticket_size as i64,
            t.ticket_installed,
            t.ticket_expires,
            t.inactivity_timeout as i64,
            t.timeout_policy.as_str(),
            t.transferred as i64,
            t.active,
            t.shallow,
            t.updated,
            t.finished_at,
            t.failures,
            t.message,
            t.backup_id,
        ],
    )?;
    Ok(())
}

/// Delete a disk row and its attachment to a VM, in one transaction.
fn remove_disk_row(conn: &mut Connection, id: &str) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM disks WHERE id = ?1", params![id])?;
    tx.execute(
        "DELETE FROM disk_attachments WHERE disk_id = ?1",
        params![id],
    )?;
    tx.commit()
}

fn read_transfer(conn: &Connection, id: &str) -> rusqlite::Result<Option<Transfer>> {
    conn.query_row(
        &format!("SELECT {TRANSFER_COLS} FROM transfers WHERE id = ?1"),
        params![id],
        transfer_from_row,
    )
    .optional()
}

fn read_disk(conn: &Connection, id: &str) -> rusqlite::Result<Option<Disk>> {
    conn.query_row(
        &format!("SELECT {DISK_COLS} FROM disks WHERE id = ?1"),
        params![id],
        disk_from_row,
    )
    .optional()
}

impl Db {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path) -> Result<Db> {
        // 0600 from the start: it holds ticket ids. SQLite gives the -wal
        // and -shm files the database file's mode; ones left by an older
        // version are narrowed.
        super::private::touch(path)?;
        for side in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(side);
            super::private::narrow_file(Path::new(&name))?;
        }
        let mut conn = Connection::open(path)?;
        check_schema_version(&conn, path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&mut conn)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    /// The `PRAGMA synchronous` level now (1 NORMAL, 2 FULL).
    #[cfg(test)]
    fn synchronous(&self) -> i64 {
        self.lock()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap_or(-1)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (each statement is atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- disks ----

    /// Store a new disk.
    pub fn insert_disk(&self, d: &Disk) -> Result<()> {
        self.lock().execute(
            &format!("INSERT INTO disks ({DISK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![
                d.id,
                d.name,
                d.description,
                d.format.as_str(),
                d.provisioned_size as i64,
                d.status.as_str(),
                d.backup.as_str()
            ],
        )?;
        Ok(())
    }

    /// One disk.
    pub fn disk(&self, id: &str) -> Result<Option<Disk>> {
        Ok(read_disk(&self.lock(), id)?)
    }

    /// All disks, by name.
    pub fn disks(&self) -> Result<Vec<Disk>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT {DISK_COLS} FROM disks ORDER BY name, id"))?;
        let rows = stmt.query_map([], disk_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Set a disk's status.
    pub fn set_disk_status(&self, id: &str, status: DiskStatus) -> Result<()> {
        durably(&mut self.lock(), |conn| {
            conn.execute(
                "UPDATE disks SET status = ?2 WHERE id = ?1",
                params![id, status.as_str()],
            )?;
            Ok(())
        })
    }

    /// Delete a disk row unless a transfer holds it; `Ok(false)` if it is held
    /// (the disk is locked), NotFound if unknown.
    pub fn delete_disk_if_free(&self, id: &str) -> Result<bool> {
        let mut conn = self.lock();
        let disk = read_disk(&conn, id)?
            .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))?;
        if disk.status == DiskStatus::Locked {
            return Ok(false);
        }
        remove_disk_row(&mut conn, id)?;
        Ok(true)
    }

    /// Delete a disk row unconditionally.
    pub fn delete_disk(&self, id: &str) -> Result<()> {
        durably(&mut self.lock(), |conn| Ok(remove_disk_row(conn, id)?))
    }

    // ---- hosts ----

    /// Register a host by name, keeping the id it had before; the stored
    /// host.
    pub fn upsert_host(&self, name: &str, control_socket: &Path, data_url: &str) -> Result<Host> {
        let conn = self.lock();
        let id: Option<String> = conn
            .query_row("SELECT id FROM hosts WHERE name = ?1", params![name], |r| {
                r.get(0)
            })
            .optional()?;
        let id = id.unwrap_or_else(super::model::new_id);
        let socket = control_socket.to_string_lossy().into_owned();
        conn.execute(
            "INSERT OR REPLACE INTO hosts (name, id, control_socket, data_url) VALUES (?1, ?2, ?3, ?4)",
            params![name, id, socket, data_url],
        )?;
        Ok(Host {
            id,
            name: name.to_string(),
            control_socket: control_socket.to_path_buf(),
            data_url: data_url.to_string(),
        })
    }

    // ---- transfers ----

    /// Store a new transfer and lock its disk, atomically: fails with
    /// Conflict if the disk is not `ok` (locked by another transfer or
    /// illegal), NotFound if the disk is gone.
    pub fn insert_transfer_locking_disk(&self, t: &Transfer) -> Result<()> {
        durably(&mut self.lock(), |conn| insert_locking_disk(conn, t))
    }

    /// One transfer.
    pub fn transfer(&self, id: &str) -> Result<Option<Transfer>> {
        Ok(read_transfer(&self.lock(), id)?)
    }

    /// All transfers.
    pub fn transfers(&self) -> Result<Vec<Transfer>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {TRANSFER_COLS} FROM transfers ORDER BY updated, id"
        ))?;
        let rows = stmt.query_map([], transfer_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Change a transfer under the lock: `change` sees the current row and
    /// either edits it (`Ok(())`, then it is written) or refuses (its error
    /// is returned, nothing is written). The updated row on success.
    pub fn update_transfer(
        &self,
        id: &str,
        change: impl FnOnce(&mut Transfer) -> Result<()>,
    ) -> Result<Transfer> {
        let mut conn = self.lock();
        let mut t = read_transfer(&conn, id)?
            .ok_or_else(|| Error::NotFound(format!("Entity not found: {id}")))?;
        let before = t.phase;
        change(&mut t)?;
        // A phase change reaches the disk before the API answers (a few
        // per transfer); the watch tick's bookkeeping need not.
        if t.phase != before {
            durably(&mut conn, |conn| Ok(write_transfer(conn, &t)?))?;
        } else {
            write_transfer(&conn, &t)?;
        }
        Ok(t)
    }

    /// Delete finished transfers: successful ones that ended before
    /// `success_before`, failed ones before `failure_before` (unix times).
    pub fn purge_transfers(&self, success_before: i64, failure_before: i64) -> Result<usize> {
        Ok(self.lock().execute(
            "DELETE FROM transfers WHERE finished_at > 0 AND \
             ((phase = 'finished_success' AND finished_at < ?1) OR \
              (phase <> 'finished_success' AND finished_at < ?2))",
            params![success_before, failure_before],
        )?)
    }

    // ---- tokens ----

    /// Store a token for `user` valid until `expires`. Only a digest of
    /// the token is stored: the database never holds a usable bearer secret.
    pub fn insert_token(&self, token: &str, user: &str, expires: i64) -> Result<()> {
        self.lock().execute(
            "INSERT OR REPLACE INTO tokens (token, user, expires) VALUES (?1, ?2, ?3)",
            params![token_digest(token), user, expires],
        )?;
        Ok(())
    }

    /// Whether `token` is known and not expired at `now`.
    pub fn token_valid(&self, token: &str, now: i64) -> Result<bool> {
        let expires: Option<i64> = self
            .lock()
            .query_row(
                "SELECT expires FROM tokens WHERE token = ?1",
                params![token_digest(token)],
                |r| r.get(0),
            )
            .optional()?;
        Ok(expires.is_some_and(|e| e > now))
    }

    /// Forget `token` (and every expired one).
    pub fn delete_token(&self, token: &str, now: i64) -> Result<()> {
        self.lock().execute(
            "DELETE FROM tokens WHERE token = ?1 OR expires <= ?2",
            params![token_digest(token), now],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::new_id;

    fn disk(id: &str) -> Disk {
        Disk {
            id: id.into(),
            name: "d".into(),
            description: String::new(),
            format: Format::Raw,
            provisioned_size: 1 << 20,
            status: DiskStatus::Ok,
            backup: DiskBackup::None,
        }
    }

    fn transfer(disk_id: &str) -> Transfer {
        Transfer {
            id: new_id(),
            disk_id: disk_id.into(),
            host_id: "h".into(),
            direction: Direction::Upload,
            format: Format::Raw,
            phase: Phase::Initializing,
            ticket_id: new_id(),
            ticket_size: 1 << 20,
            ticket_installed: false,
            ticket_expires: 0,
            inactivity_timeout: 60,
            timeout_policy: TimeoutPolicy::Legacy,
            transferred: 0,
            active: false,
            shallow: false,
            updated: 1,
            finished_at: 0,
            failures: 0,
            message: String::new(),
            backup_id: String::new(),
        }
    }

    #[test]
    fn one_transfer_per_disk_and_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.db");
        let t = {
            let db = Db::open(&path).unwrap();
            db.insert_disk(&disk("d1")).unwrap();
            let t = transfer("d1");
            db.insert_transfer_locking_disk(&t).unwrap();
            assert!(matches!(
                db.insert_transfer_locking_disk(&transfer("d1")),
                Err(Error::Conflict(_))
            ));
            assert!(matches!(
                db.insert_transfer_locking_disk(&transfer("nope")),
                Err(Error::NotFound(_))
            ));
            assert!(!db.delete_disk_if_free("d1").unwrap());
            db.update_transfer(&t.id, |t| {
                t.phase = Phase::Transferring;
                Ok(())
            })
            .unwrap()
        };
        let db = Db::open(&path).unwrap();
        assert_eq!(db.transfer(&t.id).unwrap(), Some(t.clone()));
        assert_eq!(db.disk("d1").unwrap().unwrap().status, DiskStatus::Locked);
        let refused = db.update_transfer(&t.id, |_| Err(Error::Conflict("no".into())));
        assert!(matches!(refused, Err(Error::Conflict(_))));
    }

    #[test]
    fn phase_changes_and_disk_changes_are_written_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.db");
        let db = Db::open(&path).unwrap();
        assert_eq!(db.synchronous(), 1);
        // Inside `durably` the connection is FULL; after it, NORMAL again,
        // whether `f` succeeded or failed.
        let seen = durably(&mut db.lock(), |conn| {
            Ok(conn.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))?)
        })
        .unwrap();
        assert_eq!(seen, 2);
        assert_eq!(db.synchronous(), 1);
        let failed: Result<()> = durably(&mut db.lock(), |_| Err(Error::Conflict("no".into())));
        assert!(matches!(failed, Err(Error::Conflict(_))));
        assert_eq!(db.synchronous(), 1);
        db.insert_disk(&disk("d1")).unwrap();
        let t = transfer("d1");
        db.insert_transfer_locking_disk(&t).unwrap();
        assert_eq!(db.synchronous(), 1);
        let done = db
            .update_transfer(&t.id, |t| {
                t.phase = Phase::FinishedSuccess;
                Ok(())
            })
            .unwrap();
        db.set_disk_status("d1", DiskStatus::Ok).unwrap();
        assert_eq!(db.synchronous(), 1);
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.transfer(&t.id).unwrap(), Some(done));
        assert_eq!(db.disk("d1").unwrap().unwrap().status, DiskStatus::Ok);
    }

    #[test]
    fn the_database_files_are_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.db");
        let mode = |suffix: &str| {
            let p = dir.path().join(format!("engine.db{suffix}"));
            std::fs::metadata(&p).map(|m| m.mode() & 0o777).unwrap()
        };
        {
            let db = Db::open(&path).unwrap();
            db.insert_disk(&disk(&new_id())).unwrap();
            assert_eq!(mode(""), 0o600);
            assert_eq!(mode("-wal"), 0o600);
            assert_eq!(mode("-shm"), 0o600);
        }
        // Files an older version left readable are narrowed at open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let db = Db::open(&path).unwrap();
        db.insert_disk(&disk(&new_id())).unwrap();
        assert_eq!(mode(""), 0o600);
        assert_eq!(mode("-wal"), 0o600);
    }

    #[test]
    fn a_database_of_a_newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.db");
        let known = MIGRATIONS.len() as i64;
        {
            let db = Db::open(&path).unwrap();
            db.insert_disk(&disk("d1")).unwrap();
        }
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version = {}", known + 1))
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        match Db::open(&path) {
            Err(Error::Config(m)) => {
                assert!(m.contains(&format!("schema version {}", known + 1)), "{m}");
                assert!(m.contains(&format!("up to {known}")), "{m}");
                assert!(m.contains("older than the one that last wrote"), "{m}");
            }
            other => panic!("expected a Config error, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, known + 1);
    }

    #[test]
    fn hosts_keep_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("e.db")).unwrap();
        let a = db.upsert_host("h1", Path::new("/a"), "http://x").unwrap();
        let b = db.upsert_host("h1", Path::new("/b"), "http://y").unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(b.data_url, "http://y");
    }

    #[test]
    fn finished_transfers_are_purged_after_their_keep_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("e.db")).unwrap();
        db.insert_disk(&disk("d1")).unwrap();
        db.insert_disk(&disk("d2")).unwrap();
        let ok = transfer("d1");
        let failed = transfer("d2");
        for (t, phase) in [
            (&ok, Phase::FinishedSuccess),
            (&failed, Phase::FinishedFailure),
        ] {
            db.insert_transfer_locking_disk(t).unwrap();
            db.update_transfer(&t.id, |t| {
                t.phase = phase;
                t.finished_at = 100;
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(db.purge_transfers(100, 100).unwrap(), 0);
        assert_eq!(db.purge_transfers(101, 50).unwrap(), 1);
        assert!(db.transfer(&ok.id).unwrap().is_none());
        assert!(db.transfer(&failed.id).unwrap().is_some());
        assert_eq!(db.purge_transfers(0, 101).unwrap(), 1);
    }

    #[test]
    fn tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("e.db")).unwrap();
        db.insert_token("t", "admin@internal", 100).unwrap();
        assert!(db.token_valid("t", 99).unwrap());
        let stored: String = db
            .lock()
            .query_row("SELECT token FROM tokens", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, "t");
        assert_eq!(stored.len(), 64);
        assert!(!db.token_valid("t", 100).unwrap());
        db.delete_token("t", 0).unwrap();
        assert!(!db.token_valid("t", 0).unwrap());
    }
}
