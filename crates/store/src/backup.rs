//! Online backup and restore of the embedded store.
//!
//! Backup runs beside a live site: it opens the database with a connection of its own (the
//! site's directory lock is for writers; WAL lets any number of readers in) and `VACUUM INTO`
//! copies one read snapshot, so the copy holds every write committed before the snapshot began
//! and nothing half-written, while the site goes on writing. The copy is written under a
//! temporary name, stripped of sessions, checked, fsynced and only then renamed into place:
//! a crash leaves either no backup or a whole one.
//!
//! Restore is for a stopped site: it takes the store's directory lock (so it cannot pull a
//! file from under a running site), refuses a store that holds tasks unless forced, checks the
//! backup (integrity, and a schema this release knows; a newer one is refused as a downgrade)
//! and renames a checked copy into place. Sessions are never restored: users log in again.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::embedded::{schema_version_known, DB_FILE};
use crate::StoreError;

/// What a backup or restore copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReport {
    /// Tasks in the copy.
    pub tasks: u64,
    /// The copy's schema version (`PRAGMA user_version`).
    pub schema_version: i64,
    /// The copy's size in bytes.
    pub bytes: u64,
}

/// Copies the embedded store in `store_dir` (running or not) to a new file `out`.
pub fn backup(store_dir: &Path, out: &Path) -> Result<CopyReport, StoreError> {
    let db = store_dir.join(DB_FILE);
    if !db.is_file() {
        return Err(StoreError::Database(format!(
            "there is no store at {} (no {DB_FILE}); is store.path right?",
            store_dir.display()
        )));
    }
    if out.exists() {
        return Err(StoreError::Database(format!(
            "{} exists; a backup never overwrites a file: choose a new path",
            out.display()
        )));
    }
    let partial = sibling(out, ".partial");
    let _ = std::fs::remove_file(&partial);
    let result = (|| {
        let source = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        source.busy_timeout(std::time::Duration::from_secs(30))?;
        let target = path_text(&partial)?;
        source.execute("VACUUM INTO ?1", [target])?;
        drop(source);
        let report = finish_copy(&partial, Check::Integrity)?;
        std::fs::rename(&partial, out).map_err(|e| io("rename the backup into place", out, e))?;
        sync_parent(out)?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Puts the backup `from` in place as the store in `store_dir`, for a stopped site. Refuses
/// a store that holds tasks unless `force`.
pub fn restore(store_dir: &Path, from: &Path, force: bool) -> Result<CopyReport, StoreError> {
    if !from.is_file() {
        return Err(StoreError::Database(format!(
            "{} is not a file",
            from.display()
        )));
    }
    // Check the backup before touching anything of the site's.
    let checked = check_copy(from, Check::Integrity)?;
    std::fs::create_dir_all(store_dir)
        .map_err(|e| io("create the store directory", store_dir, e))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(store_dir.join("LOCK"))
        .map_err(|e| io("open", &store_dir.join("LOCK"), e))?;
    lock.try_lock().map_err(|_| {
        StoreError::Database(format!(
            "{} is in use by a running sitegate; stop the site before restoring",
            store_dir.display()
        ))
    })?;
    let db = store_dir.join(DB_FILE);
    if db.exists() && !force {
        let tasks = count_tasks_in(&db)?;
        if tasks > 0 {
            return Err(StoreError::Database(format!(
                "the store in {} holds {tasks} tasks; restoring would replace them: pass --force \
                 to replace it (back it up first if it may be needed)",
                store_dir.display()
            )));
        }
    }
    let incoming = sibling(&db, ".restoring");
    let _ = std::fs::remove_file(&incoming);
    let result = (|| {
        std::fs::copy(from, &incoming).map_err(|e| io("copy the backup", &incoming, e))?;
        // The source passed the full check above; this copy of it needs only the quick one.
        let report = finish_copy(&incoming, Check::Quick)?;
        debug_assert_eq!(report.tasks, checked.tasks);
        // The old store's write-ahead log belongs to the old file: left beside the new one,
        // SQLite would replay it into it. It goes first, then the new file takes the name.
        for suffix in ["-wal", "-shm"] {
            let stale = sibling(&db, suffix);
            match std::fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &stale, e)),
            }
        }
        std::fs::rename(&incoming, &db).map_err(|e| io("rename the restored store", &db, e))?;
        sync_parent(&db)?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&incoming);
    }
    drop(lock);
    result
}

/// Makes the copy at `path` a self-contained store without sessions, checks it and fsyncs it.
fn finish_copy(path: &Path, check: Check) -> Result<CopyReport, StoreError> {
    {
        let conn = Connection::open(path)?;
        // One file, no log beside it; removed sessions are overwritten, not left in free pages.
        conn.execute_batch(
            "PRAGMA journal_mode = DELETE;
             PRAGMA secure_delete = ON;
             DELETE FROM sessions;",
        )?;
    }
    let report = check_copy(path, check)?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("fsync", path, e))?;
    Ok(report)
}

/// How thoroughly a copy is checked: `integrity_check` reads every page and index entry;
/// `quick_check` skips matching indexes to rows (several times faster).
#[derive(Clone, Copy)]
enum Check {
    Integrity,
    Quick,
}

/// Checks that `path` is a whole sitegate store of a schema this release can open.
fn check_copy(path: &Path, check: Check) -> Result<CopyReport, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| not_a_store(path, &e.to_string()))?;
    let pragma = match check {
        Check::Integrity => "PRAGMA integrity_check",
        Check::Quick => "PRAGMA quick_check",
    };
    let integrity: String = conn
        .query_row(pragma, [], |r| r.get(0))
        .map_err(|e| not_a_store(path, &e.to_string()))?;
    if integrity != "ok" {
        return Err(not_a_store(path, &format!("integrity check: {integrity}")));
    }
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    schema_version_known(schema_version)?;
    let tasks: i64 = conn
        .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
        .map_err(|e| not_a_store(path, &e.to_string()))?;
    drop(conn);
    let bytes = std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| io("stat", path, e))?;
    Ok(CopyReport {
        tasks: u64::try_from(tasks).unwrap_or(0),
        schema_version,
        bytes,
    })
}

fn count_tasks_in(db: &Path) -> Result<i64, StoreError> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    // A store created but never migrated has no tasks table: it holds nothing.
    let has_tasks: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'tasks'",
        [],
        |r| r.get(0),
    )?;
    if !has_tasks {
        return Ok(0);
    }
    Ok(conn.query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))?)
}

fn not_a_store(path: &Path, why: &str) -> StoreError {
    StoreError::Database(format!(
        "{} is not a usable sitegate store: {why}",
        path.display()
    ))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Database(format!("cannot {what} {}: {e}", path.display()))
}

fn path_text(path: &Path) -> Result<&str, StoreError> {
    path.to_str()
        .ok_or_else(|| StoreError::Database(format!("{} is not a UTF-8 path", path.display())))
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync the directory", parent, e))
}
