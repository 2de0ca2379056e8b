//! The embedded backend: SQLite in WAL mode.
//!
//! Why SQLite: the list endpoint needs filters, multi-key sorts, paging and counts over indexes,
//! which SQL gives for free where a key-value store (redb, fjall) would need hand-built
//! secondary indexes; WAL with `synchronous=FULL` fsyncs every commit and survives `kill -9`.
//!
//! Threads: one writer owns the only writing connection. It takes every write waiting in its
//! queue, applies each inside its own savepoint (one bad write does not undo the others),
//! commits them together with one fsync, and only then answers each caller: a write is
//! acknowledged only once durable, and concurrent writers share fsyncs (group commit). Readers
//! are a few threads with their own connections; WAL lets them read while the writer writes.
//! No SQLite call ever runs on the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use async_trait::async_trait;
use crossbeam_channel::{Receiver, Sender};
use dashmap::DashMap;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use sitegate_model::query::TaskQuery;
use sitegate_model::session::RemoteSession;
use sitegate_model::task::{NewTask, Task, TaskState, ValidPatch, WorkflowInfo};
use sitegate_model::ErrorEnvelope;
use tokio::sync::oneshot;
use tracing::Instrument;
use uuid::Uuid;

use crate::sql::{self, Dialect, SqlValue};
use crate::task_cache::{TaskCache, DEFAULT_CAPACITY_BYTES};
use crate::{
    json_text, parse_roles, roles_text, CreateOutcome, PurgeOutcome, SessionRecord, SessionStore,
    StoreError, TaskPage, TaskStore, TokenHash,
};

/// The most writes committed together; bounds the latency one batch adds to its first write.
const MAX_BATCH: usize = 512;
const READER_THREADS: usize = 4;
/// The database file inside the store's directory.
pub const DB_FILE: &str = "sitegate.db";
/// SQLite's `auto_vacuum` value for INCREMENTAL: freed pages stay in the file until
/// `PRAGMA incremental_vacuum` gives them back, a few at a time, on the writer thread.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;

/// Runs on the writer thread inside a savepoint; returns whether to keep its changes, and what
/// to tell the caller once the batch's commit has succeeded or failed.
/// When the batch's transaction could not even begin, the job gets that error instead of a
/// connection and changes nothing.
type WriteJob = Box<dyn FnOnce(Result<&Connection, StoreError>) -> (bool, Completion_) + Send>;
type Completion_ = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// A handle to the embedded store; cheap to clone, all clones share the threads.
#[derive(Clone)]
pub struct EmbeddedStore {
    writes: Sender<WriteJob>,
    reads: Sender<ReadJob>,
    path: PathBuf,
    /// Every session, mirrored in memory so authenticating a request costs no database read.
    /// Exact, not a cache: this process is the store's only writer (the directory lock makes
    /// sure), and the writer thread applies each change right after its commit, in commit order.
    sessions: Arc<DashMap<TokenHash, SessionRecord>>,
    /// Recently read and written tasks; never stale, for the same reason (see `task_cache`).
    tasks: Arc<TaskCache>,
    /// An exclusive lock on `<dir>/LOCK`, held while any handle lives.
    _lock: Arc<std::fs::File>,
}

/// A change to the session mirror, applied once the commit that made it succeeded.
enum MirrorChange {
    Upsert(SessionRecord),
    Touch(TokenHash, i64),
    SetExtensions(TokenHash, Vec<RemoteSession>),
    Remove(TokenHash),
    Purge {
        idle_before: i64,
        created_before: i64,
    },
}

fn apply_mirror(mirror: &DashMap<TokenHash, SessionRecord>, changes: Vec<MirrorChange>) {
    for change in changes {
        match change {
            MirrorChange::Upsert(record) => {
                mirror.insert(record.token_hash, record);
            }
            MirrorChange::Touch(hash, now) => {
                if let Some(mut r) = mirror.get_mut(&hash) {
                    r.last_seen = r.last_seen.max(now);
                }
            }
            MirrorChange::SetExtensions(hash, extensions) => {
                if let Some(mut r) = mirror.get_mut(&hash) {
                    r.extensions = extensions;
                }
            }
            MirrorChange::Remove(hash) => {
                mirror.remove(&hash);
            }
            MirrorChange::Purge {
                idle_before,
                created_before,
            } => mirror.retain(|_, r| r.last_seen >= idle_before && r.created >= created_before),
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Schema versions, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tasks (
    id            TEXT PRIMARY KEY,
    user          TEXT NOT NULL,
    site          TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('RUNNING','SUCCEEDED','FAILED')),
    progress      INTEGER NOT NULL CHECK (progress BETWEEN 0 AND 100),
    start_time    INTEGER NOT NULL,
    last_updated  INTEGER NOT NULL,
    end_time      INTEGER NOT NULL,
    wf_type       TEXT NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    resource_name TEXT,
    result_type   TEXT,
    result        TEXT,
    error         TEXT,
    warnings      TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
CREATE INDEX tasks_start       ON tasks (start_time, id);
CREATE INDEX tasks_user_start  ON tasks (user, start_time, id);
CREATE INDEX tasks_state_start ON tasks (state, start_time);
CREATE INDEX tasks_type_start  ON tasks (wf_type, start_time);
CREATE INDEX tasks_resource    ON tasks (resource_type, resource_id);
CREATE INDEX tasks_res_name    ON tasks (resource_name);
CREATE INDEX tasks_end         ON tasks (end_time);
CREATE INDEX tasks_updated     ON tasks (last_updated);
-- The store's central invariant, kept by the database itself as well as by the code.
CREATE TRIGGER tasks_final_is_final BEFORE UPDATE ON tasks
    WHEN OLD.state <> 'RUNNING'
    BEGIN SELECT RAISE(ABORT, 'task is in a final state'); END;

CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY,
    user       TEXT NOT NULL,
    roles      TEXT NOT NULL,
    created    INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_last_seen ON sessions (last_seen);
"#,
    // Sessions held at peers on the user's behalf (a JSON array of RemoteSession).
    r#"ALTER TABLE sessions ADD COLUMN extensions TEXT NOT NULL DEFAULT '[]';"#,
    // Covering indexes for the common list filters: every non-admin query filters by user,
    // most by state and type; counts (`total`) are then answered from the index alone.
    // ANALYZE gives the planner the statistics to pick them (without them it chose the
    // type index, which matches half the table).
    r#"
CREATE INDEX tasks_user_state_type_start ON tasks (user, state, wf_type, start_time);
CREATE INDEX tasks_user_type_start       ON tasks (user, wf_type, start_time);
CREATE INDEX tasks_state_type_start      ON tasks (state, wf_type, start_time);
ANALYZE;
"#,
    // The organisations a task concerns (the original's sourceOrg/destinationOrg filters).
    r#"
ALTER TABLE tasks ADD COLUMN source_org TEXT;
ALTER TABLE tasks ADD COLUMN destination_org TEXT;
CREATE INDEX tasks_source_org      ON tasks (source_org, start_time);
CREATE INDEX tasks_destination_org ON tasks (destination_org, start_time);
"#,
    // Facts about the site itself; the instance ID is a random (version 4) UUID made here.
    r#"
CREATE TABLE site_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO site_meta (key, value) VALUES ('instance_id',
    lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' ||
    substr(lower(hex(randomblob(2))), 2) || '-' ||
    substr('89ab', 1 + (abs(random()) % 4), 1) || substr(lower(hex(randomblob(2))), 2) || '-' ||
    lower(hex(randomblob(6))));
"#,
    // Sessions issued to a peer site, usable only by it (see SessionRecord::bound_peer).
    r#"ALTER TABLE sessions ADD COLUMN bound_peer TEXT;"#,
];

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // FULL makes every WAL commit fsync, which is what "acknowledged means durable" needs.
    // The size limit truncates the log after a checkpoint, so a burst of writes (a purge)
    // does not leave a large log file behind for good.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 5000;
         PRAGMA foreign_keys = ON;
         PRAGMA journal_size_limit = 67108864;",
    )?;
    Ok(conn)
}

/// Makes the file able to shrink: a new store is created in incremental auto-vacuum mode; an
/// older one (created before retention existed) is rewritten into it once, by `VACUUM`, which
/// takes a while for a large store and is logged.
fn enable_incremental_vacuum(conn: &Connection) -> Result<(), StoreError> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == AUTO_VACUUM_INCREMENTAL {
        return Ok(());
    }
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
    // The mode takes effect by VACUUM (instant on a new, empty file).
    let started = std::time::Instant::now();
    if tables > 0 {
        tracing::info!("rewriting the store once so that it can give space back (VACUUM)");
    }
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
    if tables > 0 {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the store can now give space back"
        );
    }
    Ok(())
}

/// Refreshes planner statistics where the data changed a lot since the last ANALYZE (bounded
/// work: each index is sampled, not read whole).
fn refresh_statistics(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("PRAGMA analysis_limit = 1000; PRAGMA optimize = 0x10002;")?;
    Ok(())
}

/// Refuses a schema written by a later release (a downgrade), naming both versions.
pub(crate) fn schema_version_known(version: i64) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Database(format!(
            "the store has schema version {version}, written by a later sitegate; this is \
             sitegate {} with schema version {known}, and a downgrade is refused: run the later \
             release, or restore a backup this one wrote",
            env!("CARGO_PKG_VERSION")
        )));
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    schema_version_known(version)?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in directory `dir` and starts its threads.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", dir.display())))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| {
                StoreError::Database(format!("cannot open {}/LOCK: {e}", dir.display()))
            })?;
        lock.try_lock().map_err(|_| {
            StoreError::Database(format!(
                "{} is in use by another sitegate process (an embedded store serves one process; \
                 use the postgres backend for replicas)",
                dir.display()
            ))
        })?;
        let path = dir.join(DB_FILE);
        let mut writer = open_connection(&path)?;
        enable_incremental_vacuum(&writer)?;
        migrate(&mut writer)?;
        refresh_statistics(&writer)?;
        let sessions = Arc::new(load_sessions(&writer)?);
        let tasks = Arc::new(TaskCache::new(DEFAULT_CAPACITY_BYTES));
        let writer_tasks = tasks.clone();

        let (write_tx, write_rx) = crossbeam_channel::unbounded::<WriteJob>();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer, write_rx, &writer_tasks))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;

        let (read_tx, read_rx) = crossbeam_channel::unbounded::<ReadJob>();
        for i in 0..READER_THREADS {
            let conn = open_connection(&path)?;
            let rx = read_rx.clone();
            thread::Builder::new()
                .name(format!("store-reader-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job(&conn);
                    }
                })
                .map_err(|e| StoreError::Database(format!("cannot start a reader thread: {e}")))?;
        }
        Ok(EmbeddedStore {
            writes: write_tx,
            reads: read_tx,
            path,
            sessions,
            tasks,
            _lock: Arc::new(lock),
        })
    }

    /// A session write: `f` returns its answer and the mirror changes it made, which are
    /// applied on the writer thread right after the commit succeeds.
    async fn write_session<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> Result<(R, Vec<MirrorChange>), StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let mirror = self.sessions.clone();
        self.write_and(op, f, move |(_, changes), _| {
            apply_mirror(&mirror, std::mem::take(changes));
        })
        .await
        .map(|(answer, _)| answer)
    }

    /// Runs `f` on the writer thread inside the next group commit; answers once it is durable.
    /// `written` names the task the write left behind, which goes into the task
    /// cache once the commit succeeded (on the writer thread, so in commit order).
    async fn write_then<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        written: fn(&R) -> Option<&Task>,
    ) -> Result<R, StoreError> {
        self.write_and(op, f, move |result, tasks| {
            if let Some(task) = written(&*result) {
                tasks.committed(task);
            }
        })
        .await
    }

    /// Runs `f` on the writer thread inside the next group commit, then, once the commit
    /// succeeded and still on the writer thread, `committed` with its answer.
    async fn write_and<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        committed: impl FnOnce(&mut R, &TaskCache) + Send + 'static,
    ) -> Result<R, StoreError> {
        let started = std::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        let tasks = self.tasks.clone();
        let job: WriteJob = Box::new(move |conn| {
            let result = conn.and_then(f);
            let keep = result.is_ok();
            let complete: Completion_ = Box::new(move |commit| {
                let answer = match commit {
                    Ok(()) => {
                        let mut result = result;
                        if let Ok(r) = &mut result {
                            committed(r, &tasks);
                        }
                        result
                    }
                    Err(e) => Err(e),
                };
                // The caller may have gone away (request cancelled); the write stands anyway.
                let _ = tx.send(answer);
            });
            (keep, complete)
        });
        let result = async {
            self.writes.send(job).map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        }
        .instrument(store_span(op))
        .await;
        record_latency(op, started);
        result
    }

    /// Runs `f` on a reader thread.
    async fn read<R: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let started = std::time::Instant::now();
        let result = self.read_inner(f).instrument(store_span(op)).await;
        record_latency(op, started);
        result
    }

    async fn read_inner<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.reads.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// A span per store call, a child of whatever request made it.
fn store_span(op: &'static str) -> tracing::Span {
    tracing::info_span!(
        "store",
        otel.name = op,
        db.system = "sqlite",
        db.operation = op,
        db.cache_hit = tracing::field::Empty,
    )
}

/// A read the task cache answered still shows as a store operation, in traces and in the
/// latency histogram, so both look the same whichever way the answer came; `db.cache_hit`
/// tells them apart in a trace.
fn answered_from_cache(op: &'static str) {
    let started = std::time::Instant::now();
    store_span(op).record("db.cache_hit", true);
    record_latency(op, started);
}

fn record_latency(op: &'static str, started: std::time::Instant) {
    metrics::histogram!("sitegate_store_operation_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
}

fn writer_loop(conn: Connection, jobs: Receiver<WriteJob>, tasks: &TaskCache) {
    while let Ok(first) = jobs.recv() {
        tasks.batch_opened();
        write_batch(&conn, first, &jobs);
        tasks.batch_closed();
    }
}

/// One group commit: the first job and whatever else is waiting, up to `MAX_BATCH`.
fn write_batch(conn: &Connection, first: WriteJob, jobs: &Receiver<WriteJob>) {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = StoreError::from(e);
        for job in batch {
            let (_, complete) = job(Err(e.clone()));
            complete(Err(e.clone()));
        }
        return;
    }
    let mut completions = Vec::with_capacity(batch.len());
    for job in batch {
        // A savepoint per job: a write that fails is undone alone, the batch goes on.
        let savepoint = conn.execute_batch("SAVEPOINT job");
        let (keep, complete) = job(savepoint.map(|()| conn).map_err(StoreError::from));
        let end = if keep {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        let _ = conn.execute_batch(end);
        completions.push(complete);
    }
    let commit = conn.execute_batch("COMMIT").map_err(StoreError::from);
    if commit.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for complete in completions {
        complete(commit.clone());
    }
}

fn sqlite_value(value: SqlValue) -> rusqlite::types::Value {
    match value {
        SqlValue::Text(t) => rusqlite::types::Value::Text(t),
        SqlValue::Int(i) => rusqlite::types::Value::Integer(i),
        SqlValue::Uuid(u) => rusqlite::types::Value::Text(u.to_string()),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn task_from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    let id: String = row.get(0)?;
    let state: String = row.get(3)?;
    let result: Option<String> = row.get(13)?;
    let error: Option<String> = row.get(14)?;
    let warnings: String = row.get(15)?;
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            Box::new(StoreError::Corrupt(what)),
        )
    };
    Ok(Task {
        id: Uuid::parse_str(&id).map_err(|_| bad(format!("task id {id}")))?,
        user: row.get(1)?,
        site: row.get(2)?,
        state: TaskState::parse(&state).map_err(|_| bad(format!("state {state}")))?,
        progress: row.get(4)?,
        start_time: row.get(5)?,
        last_updated: row.get(6)?,
        end_time: row.get(7)?,
        workflow_info: WorkflowInfo {
            workflow_type: row.get(8)?,
            resource_type: row.get(9)?,
            resource_id: row.get(10)?,
            resource_name: row.get(11)?,
        },
        result_type: row.get(12)?,
        result: result.as_deref().map(parse_json).transpose()?,
        error: error.as_deref().map(parse_json).transpose()?,
        warnings: parse_json(&warnings)?,
        source_org: row.get(16)?,
        destination_org: row.get(17)?,
    })
}

fn select_task(conn: &Connection, id: Uuid) -> Result<Option<Task>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM tasks WHERE id = ?1",
        Dialect::Sqlite.task_columns()
    ))?;
    Ok(stmt.query_row([id.to_string()], task_from_row).optional()?)
}

fn insert_task(conn: &Connection, t: &Task) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO tasks ({}) \
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18)",
        Dialect::Sqlite.task_columns()
    ))?;
    stmt.execute(params![
        t.id.to_string(),
        t.user,
        t.site,
        t.state.as_str(),
        t.progress,
        t.start_time,
        t.last_updated,
        t.end_time,
        t.workflow_info.workflow_type,
        t.workflow_info.resource_type,
        t.workflow_info.resource_id,
        t.workflow_info.resource_name,
        t.result_type,
        t.result.as_ref().map(json_text).transpose()?,
        t.error.as_ref().map(json_text).transpose()?,
        json_text(&t.warnings)?,
        t.source_org,
        t.destination_org,
    ])?;
    Ok(())
}

fn apply_patch(conn: &Connection, id: Uuid, patch: ValidPatch) -> Result<Task, StoreError> {
    let task = select_task(conn, id)?.ok_or(StoreError::TaskNotFound(id))?;
    let task = crate::patched(task, patch)?;
    let mut stmt = conn.prepare_cached(
        "UPDATE tasks SET state = ?2, progress = ?3, last_updated = ?4, end_time = ?5,
             result_type = ?6, result = ?7, error = ?8, warnings = ?9
         WHERE id = ?1",
    )?;
    stmt.execute(params![
        id.to_string(),
        task.state.as_str(),
        task.progress,
        task.last_updated,
        task.end_time,
        task.result_type,
        task.result.as_ref().map(json_text).transpose()?,
        task.error
            .as_ref()
            .map(json_text::<ErrorEnvelope>)
            .transpose()?,
        json_text(&task.warnings)?,
    ])?;
    Ok(task)
}

fn load_sessions(conn: &Connection) -> Result<DashMap<TokenHash, SessionRecord>, StoreError> {
    let map = DashMap::new();
    let mut stmt = conn.prepare(
        "SELECT token_hash, user, roles, created, last_seen, extensions, bound_peer FROM sessions",
    )?;
    let rows = stmt.query_map([], |r| {
        let hash: Vec<u8> = r.get(0)?;
        let roles: String = r.get(2)?;
        let extensions: String = r.get(5)?;
        Ok((
            hash,
            r.get::<_, String>(1)?,
            roles,
            r.get(3)?,
            r.get(4)?,
            extensions,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    for row in rows {
        let (hash, user, roles, created, last_seen, extensions, bound_peer) = row?;
        let token_hash: TokenHash = hash
            .try_into()
            .map_err(|_| StoreError::Corrupt("a session key is not 32 bytes".into()))?;
        let extensions = serde_json::from_str(&extensions)
            .map_err(|e| StoreError::Corrupt(format!("session extensions: {e}")))?;
        map.insert(
            token_hash,
            SessionRecord {
                token_hash,
                user,
                roles: parse_roles(&roles),
                created,
                last_seen,
                extensions,
                bound_peer,
            },
        );
    }
    Ok(map)
}

fn select_extensions(
    conn: &Connection,
    token_hash: TokenHash,
) -> Result<Option<Vec<RemoteSession>>, StoreError> {
    let text: Option<String> = conn
        .prepare_cached("SELECT extensions FROM sessions WHERE token_hash = ?1")?
        .query_row([&token_hash[..]], |r| r.get(0))
        .optional()?;
    Ok(text.as_deref().map(parse_json).transpose()?)
}

fn update_extensions(
    conn: &Connection,
    token_hash: TokenHash,
    extensions: &[RemoteSession],
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE sessions SET extensions = ?2 WHERE token_hash = ?1")?
        .execute(params![&token_hash[..], json_text(&extensions)?])?;
    Ok(())
}

#[async_trait]
impl TaskStore for EmbeddedStore {
    async fn create_task(&self, new: NewTask, site: &str) -> Result<CreateOutcome, StoreError> {
        let site = site.to_owned();
        self.write_then(
            "create_task",
            move |conn| {
                let task = crate::new_running_task(new.clone(), &site);
                if let Some(existing) = select_task(conn, task.id)? {
                    return if crate::same_creation(&existing, &new) {
                        Ok(CreateOutcome::AlreadyExisted(existing))
                    } else {
                        Err(StoreError::Rejected(format!(
                            "task {} already exists with a different user or workflowInfo",
                            task.id
                        )))
                    };
                }
                insert_task(conn, &task)?;
                Ok(CreateOutcome::Created(task))
            },
            |outcome| match outcome {
                CreateOutcome::Created(task) => Some(task),
                CreateOutcome::AlreadyExisted(_) => None,
            },
        )
        .await
    }

    async fn get_task(&self, id: Uuid) -> Result<Option<Task>, StoreError> {
        if let Some(task) = self.tasks.get(&id) {
            answered_from_cache("get_task");
            return Ok(Some(task));
        }
        let ticket = self.tasks.ticket();
        let task = self
            .read("get_task", move |conn| select_task(conn, id))
            .await?;
        if let Some(task) = &task {
            self.tasks.offer(ticket, task);
        }
        Ok(task)
    }

    async fn get_tasks(&self, ids: &[Uuid], owner: Option<&str>) -> Result<Vec<Task>, StoreError> {
        // One slot per distinct ID, in the order asked; the cache fills what it can.
        let mut slots: Vec<(Uuid, Option<Task>)> = Vec::with_capacity(ids.len());
        for &id in ids {
            if !slots.iter().any(|(seen, _)| *seen == id) {
                slots.push((id, self.tasks.get(&id)));
            }
        }
        let misses: Vec<Uuid> = slots
            .iter()
            .filter(|(_, t)| t.is_none())
            .map(|(id, _)| *id)
            .collect();
        if misses.is_empty() {
            answered_from_cache("get_tasks");
        } else {
            let ticket = self.tasks.ticket();
            let read = self
                .read("get_tasks", move |conn| {
                    let mut out = Vec::with_capacity(misses.len());
                    for id in misses {
                        out.extend(select_task(conn, id)?);
                    }
                    Ok(out)
                })
                .await?;
            for task in read {
                self.tasks.offer(ticket, &task);
                if let Some(slot) = slots.iter_mut().find(|(id, _)| *id == task.id) {
                    slot.1 = Some(task);
                }
            }
        }
        Ok(slots
            .into_iter()
            .filter_map(|(_, t)| t)
            .filter(|t| owner.is_none_or(|o| o == t.user))
            .collect())
    }

    async fn update_task(&self, id: Uuid, patch: ValidPatch) -> Result<Task, StoreError> {
        self.write_then(
            "update_task",
            move |conn| apply_patch(conn, id, patch),
            |task| Some(task),
        )
        .await
    }

    async fn query_tasks(
        &self,
        query: &TaskQuery,
        owner: Option<&str>,
    ) -> Result<TaskPage, StoreError> {
        let sql::ListQuery {
            select,
            count,
            params,
            count_params,
        } = sql::list_query(query, owner, Dialect::Sqlite);
        let params: Vec<rusqlite::types::Value> = params.into_iter().map(sqlite_value).collect();
        self.read("query_tasks", move |conn| {
            // One read transaction, so `total` and `items` describe the same snapshot.
            conn.execute_batch("BEGIN")?;
            let result = (|| {
                let total: i64 = conn
                    .prepare_cached(&count)?
                    .query_row(params_from_iter(params[..count_params].iter()), |r| {
                        r.get(0)
                    })?;
                let items = conn
                    .prepare_cached(&select)?
                    .query_map(params_from_iter(params.iter()), task_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(TaskPage {
                    items,
                    total: total as u64,
                })
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read("ping", |conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    async fn instance_id(&self) -> Result<Uuid, StoreError> {
        self.read("instance_id", |conn| {
            let text: String = conn.query_row(
                "SELECT value FROM site_meta WHERE key = 'instance_id'",
                [],
                |r| r.get(0),
            )?;
            Uuid::parse_str(&text).map_err(|_| StoreError::Corrupt(format!("instance id {text}")))
        })
        .await
    }

    async fn purge_finished(
        &self,
        ended_before: i64,
        limit: u32,
    ) -> Result<PurgeOutcome, StoreError> {
        // Oldest first by the endTime index; `end_time >= 0` leaves RUNNING tasks (NOT_YET)
        // out twice over, with the state test.
        let removed = self
            .write_and(
                "purge_finished",
                move |conn| {
                    let mut stmt = conn.prepare_cached(
                        "DELETE FROM tasks WHERE id IN (
                             SELECT id FROM tasks
                             WHERE end_time >= 0 AND end_time < ?1 AND state <> 'RUNNING'
                             ORDER BY end_time LIMIT ?2)
                         RETURNING id",
                    )?;
                    let ids = stmt
                        .query_map(params![ended_before, limit], |r| r.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(ids)
                },
                |ids, tasks| {
                    for id in ids {
                        if let Ok(id) = Uuid::parse_str(id) {
                            tasks.removed(&id);
                        }
                    }
                },
            )
            .await?;
        Ok(PurgeOutcome::Removed(removed.len() as u64))
    }

    async fn reclaim_space(&self, max_pages: u32) -> Result<u64, StoreError> {
        let left = self
            .write_and(
                "reclaim_space",
                move |conn| {
                    // Each step of this statement frees one page: run it to the end.
                    let mut stmt =
                        conn.prepare_cached(&format!("PRAGMA incremental_vacuum({max_pages})"))?;
                    let mut steps = stmt.query([])?;
                    while steps.next()?.is_some() {}
                    let left: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
                    Ok(u64::try_from(left).unwrap_or(0))
                },
                |_, _| {},
            )
            .await?;
        if left == 0 {
            // The file itself shrinks when the log is copied back into it; without this that
            // waits for the next automatic checkpoint, which a quiet site may not reach.
            // PASSIVE never waits for (or blocks) readers and writers.
            self.read("checkpoint", |conn| {
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
                Ok(())
            })
            .await?;
        }
        Ok(left)
    }

    async fn size_bytes(&self) -> Result<u64, StoreError> {
        Ok(file_size(&self.path) + file_size(&wal_path(&self.path)))
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn create_session(&self, s: SessionRecord) -> Result<(), StoreError> {
        self.write_session("create_session", move |conn| {
            conn.prepare_cached(
                "INSERT INTO sessions (token_hash, user, roles, created, last_seen, extensions, bound_peer)
                 VALUES (?1,?2,?3,?4,?5,?6,?7)",
            )?
            .execute(params![
                &s.token_hash[..],
                s.user,
                roles_text(&s.roles),
                s.created,
                s.last_seen,
                json_text(&s.extensions)?,
                s.bound_peer,
            ])?;
            Ok(((), vec![MirrorChange::Upsert(s)]))
        })
        .await
    }

    async fn get_session(
        &self,
        token_hash: TokenHash,
    ) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.sessions.get(&token_hash).map(|r| r.value().clone()))
    }

    async fn touch_session(&self, token_hash: TokenHash, now: i64) -> Result<(), StoreError> {
        self.write_session("touch_session", move |conn| {
            conn.prepare_cached(
                "UPDATE sessions SET last_seen = MAX(last_seen, ?2) WHERE token_hash = ?1",
            )?
            .execute(params![&token_hash[..], now])?;
            Ok(((), vec![MirrorChange::Touch(token_hash, now)]))
        })
        .await
    }

    async fn put_extension(
        &self,
        token_hash: TokenHash,
        remote: RemoteSession,
    ) -> Result<bool, StoreError> {
        self.write_session("put_extension", move |conn| {
            let Some(mut extensions) = select_extensions(conn, token_hash)? else {
                return Ok((false, vec![]));
            };
            extensions.retain(|e| e.site != remote.site);
            extensions.push(remote);
            update_extensions(conn, token_hash, &extensions)?;
            Ok((
                true,
                vec![MirrorChange::SetExtensions(token_hash, extensions)],
            ))
        })
        .await
    }

    async fn remove_extension(
        &self,
        token_hash: TokenHash,
        site: &str,
    ) -> Result<Option<RemoteSession>, StoreError> {
        let site = site.to_owned();
        self.write_session("remove_extension", move |conn| {
            let Some(mut extensions) = select_extensions(conn, token_hash)? else {
                return Ok((None, vec![]));
            };
            let Some(pos) = extensions.iter().position(|e| e.site == site) else {
                return Ok((None, vec![]));
            };
            let removed = extensions.remove(pos);
            update_extensions(conn, token_hash, &extensions)?;
            Ok((
                Some(removed),
                vec![MirrorChange::SetExtensions(token_hash, extensions)],
            ))
        })
        .await
    }

    async fn delete_session(&self, token_hash: TokenHash) -> Result<bool, StoreError> {
        self.write_session("delete_session", move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
                .execute([&token_hash[..]])?;
            Ok((n > 0, vec![MirrorChange::Remove(token_hash)]))
        })
        .await
    }

    async fn purge_sessions(
        &self,
        idle_before: i64,
        created_before: i64,
    ) -> Result<u64, StoreError> {
        self.write_session("purge_sessions", move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM sessions WHERE last_seen < ?1 OR created < ?2")?
                .execute(params![idle_before, created_before])?;
            Ok((
                n as u64,
                vec![MirrorChange::Purge {
                    idle_before,
                    created_before,
                }],
            ))
        })
        .await
    }

    async fn count_sessions(&self) -> Result<u64, StoreError> {
        Ok(self.sessions.len() as u64)
    }
}
