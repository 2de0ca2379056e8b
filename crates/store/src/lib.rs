//! `sitegate-store` keeps a site's tasks and sessions. It defines the [`TaskStore`] and
//! [`SessionStore`] traits the gateway programs against, a PostgreSQL backend for sites with
//! several gateway replicas, and the embedded backend,
//! [`EmbeddedStore`]: SQLite in WAL mode with `synchronous=FULL`, one writer thread that
//! commits many writes with one fsync (group commit), and a small pool of reader threads.
//!
//! It is not an HTTP or site-aware component: it knows nothing of requests, roles, peers or
//! status codes. The gateway decides who may see what and passes that in as plain filters
//! (an owner name); the store enforces only data rules, chief among them that a task in a final
//! state never changes.
//!
//! Modules:
//! - [`error`]: [`StoreError`], the one error type of this crate.
//! - [`embedded`]: the SQLite backend: schema and migrations, the writer and reader threads.
//! - [`backup`]: online backup of a running embedded store, and restore into a stopped one.
//! - [`postgres`]: [`PostgresStore`], the PostgreSQL backend for sites with several replicas.
//! - [`sql`]: building the `GET /tasks` query (filters, sort, paging) for either SQL dialect.

pub mod backup;
pub mod embedded;
pub mod error;
pub mod postgres;
pub mod sql;
mod task_cache;

use async_trait::async_trait;
use sitegate_model::query::TaskQuery;
use sitegate_model::session::{RemoteSession, Role};
use sitegate_model::task::{NewTask, Task, ValidPatch};
use sitegate_model::EpochMillis;
use uuid::Uuid;

pub use embedded::EmbeddedStore;
pub use error::StoreError;
pub use postgres::PostgresStore;

/// The SHA-256 of a session token. Only this is stored, so a copy of the database does not
/// hold usable tokens.
pub type TokenHash = [u8; 32];

/// What `create_task` did.
#[derive(Clone, Debug, PartialEq)]
pub enum CreateOutcome {
    Created(Task),
    /// A task with that ID and the same user and workflow info existed already.
    AlreadyExisted(Task),
}

impl CreateOutcome {
    pub fn task(&self) -> &Task {
        match self {
            CreateOutcome::Created(t) | CreateOutcome::AlreadyExisted(t) => t,
        }
    }
}

/// One page of a task query.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskPage {
    pub items: Vec<Task>,
    /// How many tasks match, ignoring limit and offset.
    pub total: u64,
}

/// A logged-in session as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRecord {
    pub token_hash: TokenHash,
    pub user: String,
    pub roles: Vec<Role>,
    /// Login time; the session ends at `created + max age`.
    pub created: EpochMillis,
    /// Last use, kept coarsely (the gateway touches it at most once a minute); the session
    /// ends at `last_seen + idle timeout`.
    pub last_seen: EpochMillis,
    /// Sessions held at peers on this user's behalf, at most one per site.
    pub extensions: Vec<RemoteSession>,
    /// For a session issued to a peer site (`multisite`): that site. Such a session is usable
    /// only over the peer link, by the site whose certificate it was issued to, so its token
    /// alone (a copy of that site's database) opens nothing.
    pub bound_peer: Option<String>,
}

/// The tasks of one site.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Creates a RUNNING task at `site`, or returns the existing one if `new.id` names a task
    /// with the same user and workflow info. Durable when it returns.
    async fn create_task(&self, new: NewTask, site: &str) -> Result<CreateOutcome, StoreError>;

    async fn get_task(&self, id: Uuid) -> Result<Option<Task>, StoreError>;

    /// The tasks among `ids` that exist and belong to `owner` (any owner when `None`), in the
    /// order of `ids`, each at most once (a repeated ID is answered once).
    async fn get_tasks(&self, ids: &[Uuid], owner: Option<&str>) -> Result<Vec<Task>, StoreError>;

    /// Applies a validated patch in one transaction; refuses tasks in a final state. Durable
    /// when it returns.
    async fn update_task(&self, id: Uuid, patch: ValidPatch) -> Result<Task, StoreError>;

    /// Filters, sorts and pages in the database. `owner`, when set, restricts the answer to
    /// that user's tasks (on top of any `user` filter in the query).
    async fn query_tasks(
        &self,
        query: &TaskQuery,
        owner: Option<&str>,
    ) -> Result<TaskPage, StoreError>;

    /// Succeeds when the store can serve reads and writes.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The site's instance ID: made once, when the store is created, and the same for every
    /// replica sharing the store and across restarts and upgrades (`/diagnostics/about`).
    async fn instance_id(&self) -> Result<Uuid, StoreError>;

    /// Removes up to `limit` finished tasks whose `endTime` is before `ended_before`, oldest
    /// first, in one short transaction. RUNNING tasks are never removed. On PostgreSQL only
    /// one replica of a site purges at a time; the others get
    /// [`PurgeOutcome::OtherReplicaPurging`] and do nothing.
    async fn purge_finished(
        &self,
        ended_before: EpochMillis,
        limit: u32,
    ) -> Result<PurgeOutcome, StoreError>;

    /// Gives up to `max_pages` pages freed by removals back to the file system, where the
    /// backend keeps its own file (embedded: incremental vacuum; PostgreSQL's autovacuum does
    /// this itself). Returns how many free pages are left to give back.
    async fn reclaim_space(&self, max_pages: u32) -> Result<u64, StoreError>;

    /// Bytes the store takes on disk (embedded: the database and its write-ahead log;
    /// PostgreSQL: the site schema's tables and indexes).
    async fn size_bytes(&self) -> Result<u64, StoreError>;
}

/// What one [`TaskStore::purge_finished`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurgeOutcome {
    /// This many tasks were removed; fewer than the limit means none older are left.
    Removed(u64),
    /// Another replica of the site holds the purge; this one removed nothing.
    OtherReplicaPurging,
}

/// The sessions of one site, shared by all its gateway replicas.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn create_session(&self, session: SessionRecord) -> Result<(), StoreError>;
    async fn get_session(&self, token_hash: TokenHash)
        -> Result<Option<SessionRecord>, StoreError>;
    async fn touch_session(
        &self,
        token_hash: TokenHash,
        now: EpochMillis,
    ) -> Result<(), StoreError>;
    /// Adds or replaces (per site) a remote session held by this session. Returns false when
    /// the session no longer exists.
    async fn put_extension(
        &self,
        token_hash: TokenHash,
        remote: RemoteSession,
    ) -> Result<bool, StoreError>;
    /// Drops the remote session held for `site`; returns the one dropped, if any.
    async fn remove_extension(
        &self,
        token_hash: TokenHash,
        site: &str,
    ) -> Result<Option<RemoteSession>, StoreError>;
    /// Returns whether a session was deleted.
    async fn delete_session(&self, token_hash: TokenHash) -> Result<bool, StoreError>;
    /// Deletes sessions idle since before `idle_before` or created before `created_before`.
    async fn purge_sessions(
        &self,
        idle_before: EpochMillis,
        created_before: EpochMillis,
    ) -> Result<u64, StoreError>;
    async fn count_sessions(&self) -> Result<u64, StoreError>;
}

/// Everything a site needs from its storage.
pub trait Store: TaskStore + SessionStore {}
impl<T: TaskStore + SessionStore> Store for T {}

/// A task after `patch`, by the rules both backends share: a final task never changes, the
/// warnings cap holds, times never go back, and finishing sets `endTime` (and progress 100 on
/// success). The caller stores the result in the same transaction it read `task` in.
pub fn patched(mut task: Task, patch: ValidPatch) -> Result<Task, StoreError> {
    use sitegate_model::task::{Completion, TaskState, MAX_TASK_BYTES, MAX_WARNINGS_PER_TASK};
    if task.state.is_final() {
        return Err(StoreError::TaskAlreadyFinal(task.id));
    }
    if task.warnings.len() + patch.warnings.len() > MAX_WARNINGS_PER_TASK {
        return Err(StoreError::Rejected(format!(
            "a task holds at most {MAX_WARNINGS_PER_TASK} warnings"
        )));
    }
    // Clocks can step back; a task's times never do. And every change gets a lastUpdated of
    // its own, even two within one millisecond: a blocking read or an event stream holding
    // the first must see the second as newer.
    let now = now_millis().max(task.last_updated.saturating_add(1));
    if let Some(p) = patch.progress {
        task.progress = p;
    }
    task.warnings.extend(patch.warnings);
    match patch.completion {
        None => {}
        Some(Completion::Succeeded {
            result_type,
            result,
        }) => {
            task.state = TaskState::Succeeded;
            task.progress = 100;
            task.result_type = result_type;
            task.result = result;
            task.end_time = now;
        }
        Some(Completion::Failed { error }) => {
            task.state = TaskState::Failed;
            task.error = Some(error);
            task.end_time = now;
        }
    }
    task.last_updated = now;
    // A task is bounded by its encoded size, not only by its count of warnings: a page of
    // tasks is held in memory whole, so every task must stay small.
    let size = serde_json::to_vec(&task).map_or(usize::MAX, |v| v.len());
    if size > MAX_TASK_BYTES {
        return Err(StoreError::Rejected(format!(
            "a task may be at most {MAX_TASK_BYTES} bytes as JSON; this write would make it {size}"
        )));
    }
    Ok(task)
}

/// A new RUNNING task at `site`, as both backends create it.
pub fn new_running_task(new: NewTask, site: &str) -> Task {
    let now = now_millis();
    Task {
        id: new.id.unwrap_or_else(Uuid::new_v4),
        user: new.user,
        site: site.to_owned(),
        state: sitegate_model::task::TaskState::Running,
        progress: 0,
        start_time: now,
        last_updated: now,
        end_time: sitegate_model::NOT_YET,
        result_type: None,
        result: None,
        error: None,
        warnings: Vec::new(),
        workflow_info: new.workflow_info,
        source_org: new.source_org,
        destination_org: new.destination_org,
    }
}

/// Whether a repeated create with `new` matches the stored `existing` task (idempotent) or
/// contradicts it.
pub fn same_creation(existing: &Task, new: &NewTask) -> bool {
    existing.user == new.user
        && existing.workflow_info == new.workflow_info
        && existing.source_org == new.source_org
        && existing.destination_org == new.destination_org
}

/// Roles as stored: a comma list.
pub(crate) fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Roles from their stored form; unknown names (from a newer version) are left out.
pub(crate) fn parse_roles(text: &str) -> Vec<Role> {
    text.split(',')
        .filter_map(|r| match r {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            "writer" => Some(Role::Writer),
            _ => None,
        })
        .collect()
}

/// A value as the JSON text both backends store.
pub(crate) fn json_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Now, in the API's unit.
pub fn now_millis() -> EpochMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as EpochMillis)
        .unwrap_or(0)
}
