//! The PostgreSQL backend, for sites whose gateway runs as several replicas sharing one
//! database (or a PostgreSQL-compatible distributed one).
//!
//! Every write is one transaction; PostgreSQL's own commit (with `synchronous_commit` on, its
//! default) makes it durable before we answer. Read-modify-write paths (`update_task`,
//! extensions) lock the row (`SELECT ... FOR UPDATE`), so two replicas patching one task never
//! lose an update. Each site lives in its own schema, so several sites can share a database.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sitegate_model::query::TaskQuery;
use sitegate_model::session::RemoteSession;
use sitegate_model::task::{NewTask, Task, TaskState, ValidPatch, WorkflowInfo};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tracing::Instrument;
use uuid::Uuid;

use crate::sql::{self, Dialect, SqlValue};
use crate::{
    json_text, parse_roles, roles_text, CreateOutcome, PurgeOutcome, SessionRecord, SessionStore,
    StoreError, TaskPage, TaskStore, TokenHash,
};

/// Schema versions, applied in order under an advisory lock so replicas starting together do
/// not race. Text columns use the "C" collation so sorting matches the embedded backend.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tasks (
    id            UUID PRIMARY KEY,
    user_name     TEXT COLLATE "C" NOT NULL,
    site          TEXT COLLATE "C" NOT NULL,
    state         TEXT COLLATE "C" NOT NULL CHECK (state IN ('RUNNING','SUCCEEDED','FAILED')),
    progress      SMALLINT NOT NULL CHECK (progress BETWEEN 0 AND 100),
    start_time    BIGINT NOT NULL,
    last_updated  BIGINT NOT NULL,
    end_time      BIGINT NOT NULL,
    wf_type       TEXT COLLATE "C" NOT NULL,
    resource_type TEXT COLLATE "C",
    resource_id   TEXT COLLATE "C",
    resource_name TEXT COLLATE "C",
    result_type   TEXT,
    result        TEXT,
    error         TEXT,
    warnings      TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX tasks_start       ON tasks (start_time, id);
CREATE INDEX tasks_user_start  ON tasks (user_name, start_time, id);
CREATE INDEX tasks_state_start ON tasks (state, start_time);
CREATE INDEX tasks_type_start  ON tasks (wf_type, start_time);
CREATE INDEX tasks_resource    ON tasks (resource_type, resource_id);
CREATE INDEX tasks_res_name    ON tasks (resource_name);
CREATE INDEX tasks_end         ON tasks (end_time);
CREATE INDEX tasks_updated     ON tasks (last_updated);
CREATE INDEX tasks_progress    ON tasks (progress);
-- The store's central invariant, kept by the database itself as well as by the code.
CREATE FUNCTION tasks_final_is_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state <> 'RUNNING' THEN
        RAISE EXCEPTION 'task % is in a final state', OLD.id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER tasks_final_is_final BEFORE UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_final_is_final();

CREATE TABLE sessions (
    token_hash BYTEA PRIMARY KEY,
    user_name  TEXT NOT NULL,
    roles      TEXT NOT NULL,
    created    BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    extensions TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX sessions_last_seen ON sessions (last_seen);
"#,
    // Covering indexes for the common list filters (see the embedded store's migration 3).
    r#"
CREATE INDEX tasks_user_state_type_start ON tasks (user_name, state, wf_type, start_time);
CREATE INDEX tasks_user_type_start       ON tasks (user_name, wf_type, start_time);
CREATE INDEX tasks_state_type_start      ON tasks (state, wf_type, start_time);
ANALYZE tasks;
"#,
    // The organisations a task concerns (see the embedded store's migration 4).
    r#"
ALTER TABLE tasks ADD COLUMN source_org TEXT;
ALTER TABLE tasks ADD COLUMN destination_org TEXT;
CREATE INDEX tasks_source_org      ON tasks (source_org, start_time);
CREATE INDEX tasks_destination_org ON tasks (destination_org, start_time);
"#,
    // Facts about the site itself (see the embedded store's migration 5).
    r#"
CREATE TABLE site_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO site_meta (key, value) VALUES ('instance_id', gen_random_uuid()::text);
"#,
    // Sessions issued to a peer site (see the embedded store's migration 6).
    r#"ALTER TABLE sessions ADD COLUMN bound_peer TEXT;"#,
];

/// A handle to a site's PostgreSQL store; cheap to clone (a connection pool).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The site's schema (checked by [`valid_schema`]); names the site's purge lock.
    schema: String,
}

impl std::fmt::Debug for PostgresStore {
    // The URL may hold a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

fn db(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => StoreError::Database(format!("{}: {}", d.code().code(), d.message())),
        None => StoreError::Database(e.to_string()),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Database(format!("connection pool: {e}"))
}

/// A schema name that needs no quoting: it is spliced into SQL.
pub fn valid_schema(schema: &str) -> bool {
    let mut bytes = schema.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && schema.len() <= 63
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

impl PostgresStore {
    /// Connects, creates the schema if needed and migrates it. `pool_size` bounds the
    /// connections this process opens.
    pub async fn connect(url: &str, schema: &str, pool_size: usize) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::Database(format!(
                "schema '{schema}' must be lower-case letters, digits and _"
            )));
        }
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Database(format!("invalid PostgreSQL URL: {e}")))?;
        config.connect_timeout(Duration::from_secs(5));
        config.options(format!("-c search_path={schema}"));
        config.application_name("sitegate");
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Database(format!("connection pool: {e}")))?;
        let store = PostgresStore {
            pool,
            schema: schema.to_owned(),
        };
        store.migrate(schema).await?;
        Ok(store)
    }

    async fn migrate(&self, schema: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('sitegate migrations ' || $1))",
            &[&schema],
        )
        .await
        .map_err(db)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (version INTEGER PRIMARY KEY);"
        ))
        .await
        .map_err(db)?;
        let applied: i32 = tx
            .query_one(
                &format!("SELECT COALESCE(MAX(version), 0) FROM {schema}.schema_migrations"),
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        let known = MIGRATIONS.len() as i32;
        if applied > known {
            return Err(StoreError::Database(format!(
                "the store has schema version {applied}, written by a later sitegate; this is \
                 sitegate {} with schema version {known}, and a downgrade is refused: run the \
                 later release, or restore a backup this one wrote",
                env!("CARGO_PKG_VERSION")
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            tx.batch_execute(migration).await.map_err(db)?;
            tx.execute(
                &format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"),
                &[&(i as i32 + 1)],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// A span and a latency sample per store call, as the embedded backend records them.
async fn timed<R>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<R, StoreError>>,
) -> Result<R, StoreError> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "store",
        otel.name = op,
        db.system = "postgresql",
        db.operation = op
    );
    let result = fut.instrument(span).await;
    metrics::histogram!("sitegate_store_operation_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    result
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn task_from_row(row: &Row) -> Result<Task, StoreError> {
    let state: String = row.get(3);
    let progress: i16 = row.get(4);
    let result: Option<String> = row.get(13);
    let error: Option<String> = row.get(14);
    let warnings: String = row.get(15);
    Ok(Task {
        id: row.get(0),
        user: row.get(1),
        site: row.get(2),
        state: TaskState::parse(&state)
            .map_err(|_| StoreError::Corrupt(format!("state {state}")))?,
        progress: u8::try_from(progress)
            .map_err(|_| StoreError::Corrupt(format!("progress {progress}")))?,
        start_time: row.get(5),
        last_updated: row.get(6),
        end_time: row.get(7),
        workflow_info: WorkflowInfo {
            workflow_type: row.get(8),
            resource_type: row.get(9),
            resource_id: row.get(10),
            resource_name: row.get(11),
        },
        result_type: row.get(12),
        result: result.as_deref().map(parse_json).transpose()?,
        error: error.as_deref().map(parse_json).transpose()?,
        warnings: parse_json(&warnings)?,
        source_org: row.get(16),
        destination_org: row.get(17),
    })
}

async fn select_task(
    client: &impl GenericClient,
    id: Uuid,
    for_update: bool,
) -> Result<Option<Task>, StoreError> {
    let sql = format!(
        "SELECT {} FROM tasks WHERE id = $1{}",
        Dialect::Postgres.task_columns(),
        if for_update { " FOR UPDATE" } else { "" }
    );
    let stmt = client.prepare_cached(&sql).await.map_err(db)?;
    client
        .query_opt(&stmt, &[&id])
        .await
        .map_err(db)?
        .map(|row| task_from_row(&row))
        .transpose()
}

fn pg_params(values: &[SqlValue]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    values
        .iter()
        .map(|v| -> Box<dyn ToSql + Sync + Send> {
            match v {
                SqlValue::Text(t) => Box::new(t.clone()),
                SqlValue::Int(i) => Box::new(*i),
                SqlValue::Uuid(u) => Box::new(*u),
            }
        })
        .collect()
}

#[async_trait]
impl TaskStore for PostgresStore {
    async fn create_task(&self, new: NewTask, site: &str) -> Result<CreateOutcome, StoreError> {
        timed("create_task", async {
            let task = crate::new_running_task(new.clone(), site);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "INSERT INTO tasks ({}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)
                     ON CONFLICT (id) DO NOTHING",
                    Dialect::Postgres.task_columns()
                ))
                .await
                .map_err(db)?;
            let inserted = client
                .execute(
                    &stmt,
                    &[
                        &task.id,
                        &task.user,
                        &task.site,
                        &task.state.as_str(),
                        &i16::from(task.progress),
                        &task.start_time,
                        &task.last_updated,
                        &task.end_time,
                        &task.workflow_info.workflow_type,
                        &task.workflow_info.resource_type,
                        &task.workflow_info.resource_id,
                        &task.workflow_info.resource_name,
                        &task.result_type,
                        &task.result.as_ref().map(json_text).transpose()?,
                        &task.error.as_ref().map(json_text).transpose()?,
                        &json_text(&task.warnings)?,
                        &task.source_org,
                        &task.destination_org,
                    ],
                )
                .await
                .map_err(db)?;
            if inserted == 1 {
                return Ok(CreateOutcome::Created(task));
            }
            let existing = select_task(&client, task.id, false)
                .await?
                .ok_or_else(|| StoreError::Database("a conflicting task vanished".into()))?;
            if crate::same_creation(&existing, &new) {
                Ok(CreateOutcome::AlreadyExisted(existing))
            } else {
                Err(StoreError::Rejected(format!(
                    "task {} already exists with a different user or workflowInfo",
                    task.id
                )))
            }
        })
        .await
    }

    async fn get_task(&self, id: Uuid) -> Result<Option<Task>, StoreError> {
        timed("get_task", async {
            let client = self.client().await?;
            select_task(&client, id, false).await
        })
        .await
    }

    async fn get_tasks(&self, ids: &[Uuid], owner: Option<&str>) -> Result<Vec<Task>, StoreError> {
        timed("get_tasks", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {} FROM tasks WHERE id = ANY($1) AND ($2::TEXT IS NULL OR user_name = $2)",
                    Dialect::Postgres.task_columns()
                ))
                .await
                .map_err(db)?;
            let rows = client
                .query(&stmt, &[&ids, &owner])
                .await
                .map_err(db)?;
            let mut found = rows.iter().map(task_from_row).collect::<Result<Vec<_>, _>>()?;
            // The answer follows the order asked.
            let mut ordered = Vec::with_capacity(found.len());
            for id in ids {
                if let Some(pos) = found.iter().position(|t| t.id == *id) {
                    ordered.push(found.swap_remove(pos));
                }
            }
            Ok(ordered)
        })
        .await
    }

    async fn update_task(&self, id: Uuid, patch: ValidPatch) -> Result<Task, StoreError> {
        timed("update_task", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let task = select_task(&tx, id, true)
                .await?
                .ok_or(StoreError::TaskNotFound(id))?;
            let task = crate::patched(task, patch)?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET state = $2, progress = $3, last_updated = $4, end_time = $5,
                         result_type = $6, result = $7, error = $8, warnings = $9
                     WHERE id = $1",
                )
                .await
                .map_err(db)?;
            tx.execute(
                &stmt,
                &[
                    &id,
                    &task.state.as_str(),
                    &i16::from(task.progress),
                    &task.last_updated,
                    &task.end_time,
                    &task.result_type,
                    &task.result.as_ref().map(json_text).transpose()?,
                    &task.error.as_ref().map(json_text).transpose()?,
                    &json_text(&task.warnings)?,
                ],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(task)
        })
        .await
    }

    async fn query_tasks(
        &self,
        query: &TaskQuery,
        owner: Option<&str>,
    ) -> Result<TaskPage, StoreError> {
        timed("query_tasks", async {
            let list = sql::list_query(query, owner, Dialect::Postgres);
            let params = pg_params(&list.params);
            let (select, count, filter_len) = (list.select, list.count, list.count_params);
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let mut client = self.client().await?;
            // One snapshot, so `total` and `items` agree.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(db)?;
            let total: i64 = tx
                .query_one(&count, &refs[..filter_len])
                .await
                .map_err(db)?
                .get(0);
            let rows = tx.query(&select, &refs).await.map_err(db)?;
            let items = rows
                .iter()
                .map(task_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().await.map_err(db)?;
            Ok(TaskPage {
                items,
                total: total as u64,
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", async {
            let client = self.client().await?;
            client.simple_query("SELECT 1").await.map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn instance_id(&self) -> Result<Uuid, StoreError> {
        timed("instance_id", async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT value FROM site_meta WHERE key = 'instance_id'", &[])
                .await
                .map_err(db)?;
            let text: String = row.get(0);
            Uuid::parse_str(&text).map_err(|_| StoreError::Corrupt(format!("instance id {text}")))
        })
        .await
    }

    async fn purge_finished(
        &self,
        ended_before: i64,
        limit: u32,
    ) -> Result<PurgeOutcome, StoreError> {
        timed("purge_finished", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            // One replica of a site purges at a time: a transaction-scoped advisory lock,
            // named by the site's schema, taken without waiting. A replica that does not get
            // it leaves the batch to the one that did (and no two replicas delete the same
            // rows at once, which would only make them wait on each other's row locks).
            let got: bool = tx
                .query_one(
                    "SELECT pg_try_advisory_xact_lock(hashtext('sitegate purge ' || $1))",
                    &[&self.schema],
                )
                .await
                .map_err(db)?
                .get(0);
            if !got {
                return Ok(PurgeOutcome::OtherReplicaPurging);
            }
            let removed = tx
                .execute(
                    "DELETE FROM tasks WHERE id IN (
                         SELECT id FROM tasks
                         WHERE end_time >= 0 AND end_time < $1 AND state <> 'RUNNING'
                         ORDER BY end_time LIMIT $2)",
                    &[&ended_before, &i64::from(limit)],
                )
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(PurgeOutcome::Removed(removed))
        })
        .await
    }

    async fn reclaim_space(&self, _max_pages: u32) -> Result<u64, StoreError> {
        // PostgreSQL's autovacuum makes removed rows' space reusable; nothing to do here.
        Ok(0)
    }

    async fn size_bytes(&self) -> Result<u64, StoreError> {
        timed("size_bytes", async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relkind = 'r'",
                    &[&self.schema],
                )
                .await
                .map_err(db)?;
            let bytes: i64 = row.get(0);
            Ok(u64::try_from(bytes).unwrap_or(0))
        })
        .await
    }
}

async fn select_extensions(
    client: &impl GenericClient,
    token_hash: &TokenHash,
) -> Result<Option<Vec<RemoteSession>>, StoreError> {
    let row = client
        .query_opt(
            "SELECT extensions FROM sessions WHERE token_hash = $1 FOR UPDATE",
            &[&&token_hash[..]],
        )
        .await
        .map_err(db)?;
    row.map(|r| parse_json(&r.get::<_, String>(0))).transpose()
}

async fn update_extensions(
    client: &impl GenericClient,
    token_hash: &TokenHash,
    extensions: &[RemoteSession],
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE sessions SET extensions = $2 WHERE token_hash = $1",
            &[&&token_hash[..], &json_text(&extensions)?],
        )
        .await
        .map_err(db)?;
    Ok(())
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn create_session(&self, s: SessionRecord) -> Result<(), StoreError> {
        timed("create_session", async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO sessions (token_hash, user_name, roles, created, last_seen, extensions, bound_peer)
                     VALUES ($1,$2,$3,$4,$5,$6,$7)",
                    &[
                        &&s.token_hash[..],
                        &s.user,
                        &roles_text(&s.roles),
                        &s.created,
                        &s.last_seen,
                        &json_text(&s.extensions)?,
                        &s.bound_peer,
                    ],
                )
                .await
                .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn get_session(
        &self,
        token_hash: TokenHash,
    ) -> Result<Option<SessionRecord>, StoreError> {
        timed("get_session", async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT user_name, roles, created, last_seen, extensions, bound_peer FROM sessions
                     WHERE token_hash = $1",
                )
                .await
                .map_err(db)?;
            let row = client
                .query_opt(&stmt, &[&&token_hash[..]])
                .await
                .map_err(db)?;
            row.map(|r| {
                Ok(SessionRecord {
                    token_hash,
                    user: r.get(0),
                    roles: parse_roles(&r.get::<_, String>(1)),
                    created: r.get(2),
                    last_seen: r.get(3),
                    extensions: parse_json(&r.get::<_, String>(4))?,
                    bound_peer: r.get(5),
                })
            })
            .transpose()
        })
        .await
    }

    async fn touch_session(&self, token_hash: TokenHash, now: i64) -> Result<(), StoreError> {
        timed("touch_session", async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE sessions SET last_seen = GREATEST(last_seen, $2) WHERE token_hash = $1",
                    &[&&token_hash[..], &now],
                )
                .await
                .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn put_extension(
        &self,
        token_hash: TokenHash,
        remote: RemoteSession,
    ) -> Result<bool, StoreError> {
        timed("put_extension", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let Some(mut extensions) = select_extensions(&tx, &token_hash).await? else {
                return Ok(false);
            };
            extensions.retain(|e| e.site != remote.site);
            extensions.push(remote);
            update_extensions(&tx, &token_hash, &extensions).await?;
            tx.commit().await.map_err(db)?;
            Ok(true)
        })
        .await
    }

    async fn remove_extension(
        &self,
        token_hash: TokenHash,
        site: &str,
    ) -> Result<Option<RemoteSession>, StoreError> {
        timed("remove_extension", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let Some(mut extensions) = select_extensions(&tx, &token_hash).await? else {
                return Ok(None);
            };
            let Some(pos) = extensions.iter().position(|e| e.site == site) else {
                return Ok(None);
            };
            let removed = extensions.remove(pos);
            update_extensions(&tx, &token_hash, &extensions).await?;
            tx.commit().await.map_err(db)?;
            Ok(Some(removed))
        })
        .await
    }

    async fn delete_session(&self, token_hash: TokenHash) -> Result<bool, StoreError> {
        timed("delete_session", async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "DELETE FROM sessions WHERE token_hash = $1",
                    &[&&token_hash[..]],
                )
                .await
                .map_err(db)?;
            Ok(n > 0)
        })
        .await
    }

    async fn purge_sessions(
        &self,
        idle_before: i64,
        created_before: i64,
    ) -> Result<u64, StoreError> {
        timed("purge_sessions", async {
            let client = self.client().await?;
            client
                .execute(
                    "DELETE FROM sessions WHERE last_seen < $1 OR created < $2",
                    &[&idle_before, &created_before],
                )
                .await
                .map_err(db)
        })
        .await
    }

    async fn count_sessions(&self) -> Result<u64, StoreError> {
        timed("count_sessions", async {
            let client = self.client().await?;
            let n: i64 = client
                .query_one("SELECT COUNT(*) FROM sessions", &[])
                .await
                .map_err(db)?
                .get(0);
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["public", "sitegate_site1", "_x"] {
            assert!(valid_schema(ok), "{ok}");
        }
        for bad in ["", "Site1", "1abc", "a-b", "a;drop", "a b", &"a".repeat(64)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }
}
