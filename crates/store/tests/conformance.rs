//! The store conformance suite: the same cases, through the `TaskStore` and `SessionStore`
//! traits only, against both backends: the embedded SQLite store (`embedded::*`) and
//! PostgreSQL (`postgres::*`, a fresh database per test on one PostgreSQL cluster this test
//! binary starts). Both backends must answer every case identically. Every expected answer is
//! computed here from the seeded data, never read back from the SQL the store builds.
//!
//! Two handles on one store stand for two gateway replicas (`replicas_*` cases): two separate
//! `PostgresStore`s (pools) on one database; for the embedded store, which serves one process,
//! two clones of one handle.
//!
//! A few tests concern one backend only (`embedded_only::*`, `postgres_only::*`): opening
//! storage, schema versions, a PostgreSQL outage (on a cluster of its own), several sites in
//! one database. `postgres_linguistic_collation::*` reruns the sort cases in a database whose
//! default collation is linguistic (ICU `en-US`), as deployments often have.
//!
//! Every PostgreSQL server this binary starts is stopped when it exits, however it exits
//! (see [`stop_at_exit`]).

#![allow(clippy::unwrap_used)]

use std::cmp::Ordering;
use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use sitegate_model::query::{SortField, SortKey, TaskQuery};
use sitegate_model::session::{RemoteSession, Role};
use sitegate_model::task::{NewTask, Task, TaskPatch, TaskState, ValidPatch, WorkflowInfo};
use sitegate_model::{ErrorEnvelope, NOT_YET};
use sitegate_store::{
    now_millis, CreateOutcome, EmbeddedStore, PostgresStore, PurgeOutcome, SessionRecord, Store,
    StoreError, TaskStore, TokenHash,
};
use sitegate_testkit::PgCluster;
use tempfile::TempDir;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// The schema the PostgreSQL cases use (one fresh database per case).
const SCHEMA: &str = "sitegate_test";
/// The PostgreSQL pool size of each handle.
const POOL: usize = 8;
/// No case may take longer than this (2 shared cores: generous).
const CASE_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Embedded,
    Postgres,
}

/// The concrete store behind a case's `Arc<dyn Store>`.
#[derive(Clone)]
enum Handle {
    Embedded(EmbeddedStore),
    Postgres(PostgresStore),
}

impl Handle {
    /// A clone of this handle (sharing its threads or its pool) as a trait object.
    fn shared(&self) -> Arc<dyn Store> {
        match self {
            Handle::Embedded(s) => Arc::new(s.clone()),
            Handle::Postgres(s) => Arc::new(s.clone()),
        }
    }
}

/// Where a case's data lives; outlives every handle.
enum Place {
    Dir(TempDir),
    Database { url: String },
}

/// What a case gets: a store and the means to open more handles on the same data.
struct Ctx {
    backend: Backend,
    store: Arc<dyn Store>,
    handle: Handle,
    place: Place,
}

impl Ctx {
    fn new(backend: Backend, handle: Handle, place: Place) -> Ctx {
        Ctx {
            backend,
            store: handle.shared(),
            handle,
            place,
        }
    }

    /// Another handle on the same data, as a second gateway replica holds it. PostgreSQL: a
    /// separate `PostgresStore` with a pool and connections of its own. Embedded: an embedded
    /// store serves one process (its directory lock makes sure), so the replicas of that
    /// deployment are handles of the same store.
    async fn replica(&self) -> Arc<dyn Store> {
        match (&self.handle, &self.place) {
            (Handle::Embedded(s), _) => Arc::new(s.clone()),
            (Handle::Postgres(_), Place::Database { url }) => {
                Arc::new(PostgresStore::connect(url, SCHEMA, POOL).await.unwrap())
            }
            (Handle::Postgres(_), Place::Dir(_)) => unreachable!("a database has a URL"),
        }
    }

    /// Drops every handle and opens the same data again (the caller has dropped its clones):
    /// the embedded store reopens its directory, PostgreSQL connects a new store to the URL.
    async fn reopen(self) -> Ctx {
        let Ctx {
            backend,
            store,
            handle,
            place,
        } = self;
        drop(store);
        drop(handle);
        let handle = match &place {
            Place::Dir(dir) => Handle::Embedded(reopen(dir.path()).await),
            Place::Database { url } => {
                Handle::Postgres(PostgresStore::connect(url, SCHEMA, POOL).await.unwrap())
            }
        };
        Ctx::new(backend, handle, place)
    }
}

/// A fresh, empty store of `backend`.
async fn open(backend: Backend) -> Ctx {
    match backend {
        Backend::Embedded => {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(dir.path()).unwrap();
            Ctx::new(backend, Handle::Embedded(store), Place::Dir(dir))
        }
        Backend::Postgres => {
            let url = new_database().await;
            let store = PostgresStore::connect(&url, SCHEMA, POOL).await.unwrap();
            Ctx::new(backend, Handle::Postgres(store), Place::Database { url })
        }
    }
}

/// Runs one case on a fresh store of `backend`, within [`CASE_DEADLINE`].
async fn run_case<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let ctx = open(backend).await;
    assert_eq!(ctx.backend, backend);
    if tokio::time::timeout(CASE_DEADLINE, case(ctx))
        .await
        .is_err()
    {
        panic!("the case did not finish within {CASE_DEADLINE:?} on {backend:?}");
    }
}

/// The PostgreSQL cluster every PostgreSQL case of this test binary shares (each case gets a
/// database of its own). Statics are never dropped, so [`stop_at_exit`] stops it.
static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

fn shared_cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(|| {
        let cluster = PgCluster::start();
        stop_at_exit(&cluster);
        cluster
    })
}

/// A fresh database on the shared cluster (started on first use).
async fn new_database() -> String {
    tokio::task::spawn_blocking(|| shared_cluster().create_database())
        .await
        .unwrap()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Makes sure `cluster`'s server does not outlive this test process, however it ends: a
/// detached shell waits for the process to go, then stops the server (immediate) and removes
/// its directory. (`pg_ctl` daemonizes the server, so it would not die with us; a static
/// `PgCluster` is never dropped, and a killed process drops nothing.) For a cluster that was
/// dropped already, the stop and the removal find nothing to do.
fn stop_at_exit(cluster: &PgCluster) {
    let run_as = if running_as_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    // `$1` the test process, `$2` the cluster directory, `$3` the server binaries. A
    // background job of a non-interactive shell ignores SIGINT, so ^C does not skip it.
    let script = format!(
        r#"(while kill -0 "$1" 2>/dev/null; do sleep 1; done
            {run_as}"$3/pg_ctl" -D "$2/data" -m immediate -w stop
            rm -rf "$2") </dev/null >/dev/null 2>&1 &"#
    );
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sitegate-pg-watchdog")
        .arg(std::process::id().to_string())
        .arg(cluster.dir())
        .arg(sitegate_testkit::pg_bindir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "cannot start the cluster's watchdog");
}

/// Generates, for every case, `embedded::<case>` and `postgres::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    super::run_case(super::Backend::Embedded, super::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    super::run_case(super::Backend::Postgres, super::$case).await;
                }
            )*
        }
    };
}

conformance!(
    create_task_starts_running_and_reads_back,
    create_without_id_gives_distinct_ids,
    create_with_existing_id_is_idempotent_or_rejected,
    update_task_progress_warnings_and_success,
    update_task_failure_keeps_error,
    update_task_success_without_result_and_with_progress,
    update_unknown_task_is_not_found,
    warnings_are_capped_per_task_atomically,
    tasks_are_bounded_by_their_encoded_size,
    query_filters_match_an_independent_filter,
    query_sorts_with_id_tiebreak,
    query_paging_concatenates_to_the_full_list,
    query_every_sort_pages_with_total,
    query_text_sorts_bytewise_and_filters_exactly,
    query_unstorable_filter_values_match_nothing,
    query_list_filters_are_the_union_of_single_filters,
    query_org_filters_match_exactly_and_round_trip,
    completion_values_round_trip_exactly,
    query_total_and_items_agree_under_writes,
    query_owner_restricts_to_one_user,
    get_tasks_keeps_order_and_drops_missing_and_foreign,
    sessions_round_trip,
    touch_session_only_moves_forward,
    delete_session_reports_whether_it_deleted,
    purge_sessions_removes_idle_and_old_only,
    session_extensions_put_replace_remove,
    concurrent_extension_puts_lose_no_site,
    concurrent_creates_and_patches_all_land,
    concurrent_patches_of_one_task_lose_no_update,
    concurrent_completions_only_one_wins,
    concurrent_creates_with_one_id,
    failed_writes_do_not_spoil_their_batch,
    replicas_patch_one_task_lose_no_update,
    replicas_race_to_complete_only_one_wins,
    replicas_create_one_id_idempotently,
    replicas_parallel_writers_all_land,
    replicas_share_sessions,
    data_survives_reopening,
    instance_id_is_made_once_and_kept,
    store_handles_are_shared_clones,
    purge_removes_old_finished_tasks_only,
);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SITE: &str = "site1";

/// Opens the store in `dir`, retrying for a short while: a dropped store's threads close their
/// connections in the background, and SQLite may briefly hold a lock while they do.
async fn reopen(dir: &Path) -> EmbeddedStore {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match EmbeddedStore::open(dir) {
            Ok(store) => return store,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reopen: retrying after {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot reopen the store: {e}"),
        }
    }
}

fn wf(ty: &str, rtype: Option<&str>, rid: Option<&str>, rname: Option<&str>) -> WorkflowInfo {
    WorkflowInfo {
        workflow_type: ty.to_owned(),
        resource_type: rtype.map(str::to_owned),
        resource_id: rid.map(str::to_owned),
        resource_name: rname.map(str::to_owned),
    }
}

fn new_task(id: Option<Uuid>, user: &str, info: WorkflowInfo) -> NewTask {
    NewTask {
        id,
        user: user.to_owned(),
        workflow_info: info,
        source_org: None,
        destination_org: None,
    }
}

fn envelope(code: &str, msg: &str) -> ErrorEnvelope {
    ErrorEnvelope {
        code: code.to_owned(),
        msg: msg.to_owned(),
        args: vec![msg.to_owned()],
        stacktrace: String::new(),
    }
}

fn progress(p: i64) -> ValidPatch {
    TaskPatch {
        progress: Some(p),
        ..Default::default()
    }
    .validate()
    .unwrap()
}

fn warnings(ws: Vec<ErrorEnvelope>) -> ValidPatch {
    TaskPatch {
        warnings: Some(ws),
        ..Default::default()
    }
    .validate()
    .unwrap()
}

fn succeed(result_type: Option<&str>, result: Option<serde_json::Value>) -> ValidPatch {
    TaskPatch {
        state: Some(TaskState::Succeeded),
        result_type: result_type.map(str::to_owned),
        result,
        ..Default::default()
    }
    .validate()
    .unwrap()
}

fn fail(error: ErrorEnvelope) -> ValidPatch {
    TaskPatch {
        state: Some(TaskState::Failed),
        error: Some(error),
        ..Default::default()
    }
    .validate()
    .unwrap()
}

async fn create(store: &Arc<dyn Store>, user: &str, info: WorkflowInfo) -> Task {
    match store
        .create_task(new_task(None, user, info), SITE)
        .await
        .unwrap()
    {
        CreateOutcome::Created(t) => t,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn token(seed: u8) -> TokenHash {
    let mut t = [0u8; 32];
    for (i, b) in t.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    t
}

fn session(seed: u8, user: &str, roles: Vec<Role>, created: i64, last_seen: i64) -> SessionRecord {
    SessionRecord {
        token_hash: token(seed),
        user: user.to_owned(),
        roles,
        created,
        last_seen,
        extensions: Vec::new(),
        // Kept with the session: some are issued to a peer site.
        bound_peer: seed.is_multiple_of(3).then(|| "site9".to_owned()),
    }
}

fn remote(site: &str, user: &str, tok: &str) -> RemoteSession {
    RemoteSession {
        site: site.to_owned(),
        user: user.to_owned(),
        token: tok.to_owned(),
        // Kept with the session (sessions stored before it existed read it as absent).
        org: site
            .len()
            .is_multiple_of(2)
            .then(|| format!("org of {site}")),
    }
}

fn ids_of(tasks: &[Task]) -> Vec<Uuid> {
    tasks.iter().map(|t| t.id).collect()
}

fn query(raw: &str) -> TaskQuery {
    TaskQuery::parse(Some(raw)).unwrap_or_else(|e| panic!("bad test query {raw:?}: {e}"))
}

/// The store's ordering, computed independently: the keys in turn, then id ascending.
/// SQLite sorts NULL before any text, as `Option`'s `None < Some` does.
fn compare(a: &Task, b: &Task, keys: &[SortKey]) -> Ordering {
    for key in keys {
        let o = match key.field {
            SortField::StartTime => a.start_time.cmp(&b.start_time),
            SortField::LastUpdated => a.last_updated.cmp(&b.last_updated),
            SortField::EndTime => a.end_time.cmp(&b.end_time),
            SortField::Progress => a.progress.cmp(&b.progress),
            SortField::State => a.state.as_str().cmp(b.state.as_str()),
            SortField::User => a.user.cmp(&b.user),
            SortField::Id => a.id.to_string().cmp(&b.id.to_string()),
            SortField::Type => a
                .workflow_info
                .workflow_type
                .cmp(&b.workflow_info.workflow_type),
            SortField::ResourceType => a
                .workflow_info
                .resource_type
                .cmp(&b.workflow_info.resource_type),
            SortField::ResourceId => a
                .workflow_info
                .resource_id
                .cmp(&b.workflow_info.resource_id),
            SortField::ResourceName => a
                .workflow_info
                .resource_name
                .cmp(&b.workflow_info.resource_name),
            SortField::SourceOrg => a.source_org.cmp(&b.source_org),
            SortField::DestinationOrg => a.destination_org.cmp(&b.destination_org),
        };
        let o = if key.descending { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.id.to_string().cmp(&b.id.to_string())
}

fn sorted(tasks: impl IntoIterator<Item = Task>, keys: &[SortKey]) -> Vec<Task> {
    let mut v: Vec<Task> = tasks.into_iter().collect();
    v.sort_by(|a, b| compare(a, b, keys));
    v
}

// ---------------------------------------------------------------------------------------------
// The seeded data set for the query tests
// ---------------------------------------------------------------------------------------------

const SEEDED: usize = 30;
const TYPES: [&str; 3] = ["sync", "backup", "migrate"];
const RTYPES: [Option<&str>; 5] = [Some("vm"), Some("disk"), None, Some("net"), Some("vm")];

struct Seeded {
    _ctx: Ctx,
    store: Arc<dyn Store>,
    /// Every task as the store last returned it, in creation order.
    tasks: Vec<Task>,
}

/// 30 tasks: users alice (i even) and bob (i odd); three types; resource fields with NULLs;
/// i%5==2 SUCCEEDED, i%5==3 FAILED, the rest RUNNING (i%5==4 with progress and a warning).
/// Creates sleep 2 ms after every odd index, so start times spread out yet pairs may tie;
/// tasks finish in reverse creation order so endTime order differs from startTime order.
async fn seed(ctx: Ctx) -> Seeded {
    let store = ctx.store.clone();
    let mut tasks: Vec<Task> = Vec::with_capacity(SEEDED);
    for i in 0..SEEDED {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        let rid = (i % 7 != 0).then(|| format!("r{}", i % 4));
        let rname = (i % 6 != 5).then(|| format!("res {}", i % 4));
        let info = wf(
            TYPES[i % 3],
            RTYPES[i % 5],
            rid.as_deref(),
            rname.as_deref(),
        );
        tasks.push(create(&store, user, info).await);
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for (i, task) in tasks.iter_mut().enumerate() {
        if i % 5 == 4 || i % 5 == 3 {
            let p = ((i * 7) % 90) as i64 + 1;
            *task = store.update_task(task.id, progress(p)).await.unwrap();
        }
        if i % 5 == 4 {
            let w = warnings(vec![envelope("W", &format!("w{i}"))]);
            *task = store.update_task(task.id, w).await.unwrap();
        }
    }
    for i in (0..SEEDED).rev() {
        let patch = match i % 5 {
            2 => succeed(Some("string"), Some(json!({ "n": i }))),
            3 => fail(envelope("GeneralServerFailure", &format!("boom {i}"))),
            _ => continue,
        };
        tasks[i] = store.update_task(tasks[i].id, patch).await.unwrap();
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // The store answers exactly what it returned from the writes.
    let stored = store.get_tasks(&ids_of(&tasks), None).await.unwrap();
    assert_eq!(stored, tasks);
    Seeded {
        _ctx: ctx,
        store,
        tasks,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. create_task / get_task
// ---------------------------------------------------------------------------------------------

async fn create_task_starts_running_and_reads_back(ctx: Ctx) {
    let store = ctx.store.clone();
    store.ping().await.unwrap();
    let cases = [
        ("alice", wf("sync", None, None, None)),
        (
            "bob",
            wf("backup", Some("vm"), Some("vm-42"), Some("my vm")),
        ),
        ("svc.writer@x", wf("migrate", Some("disk"), None, Some("d"))),
    ];
    for (user, info) in cases {
        let before = now_millis();
        let outcome = store
            .create_task(new_task(None, user, info.clone()), SITE)
            .await
            .unwrap();
        let after = now_millis();
        let CreateOutcome::Created(task) = outcome else {
            panic!("expected Created for {user}, got {outcome:?}");
        };
        assert_eq!(task.user, user);
        assert_eq!(task.site, SITE);
        assert_eq!(task.state, TaskState::Running);
        assert_eq!(task.progress, 0);
        assert_eq!(task.end_time, NOT_YET);
        assert_eq!(task.end_time, -1);
        assert!(task.start_time > 0);
        assert!(
            (before..=after).contains(&task.start_time),
            "{before} <= {} <= {after}",
            task.start_time
        );
        assert_eq!(task.start_time, task.last_updated);
        assert_eq!(task.workflow_info, info);
        assert_eq!(task.result_type, None);
        assert_eq!(task.result, None);
        assert_eq!(task.error, None);
        assert!(task.warnings.is_empty());
        assert_eq!(task.id.get_version_num(), 4, "a generated id is a v4 UUID");

        let got = store.get_task(task.id).await.unwrap();
        assert_eq!(got.as_ref(), Some(&task));
    }

    // A caller-chosen id is kept.
    let id = Uuid::new_v4();
    let t = store
        .create_task(
            new_task(Some(id), "alice", wf("sync", None, None, None)),
            "site9",
        )
        .await
        .unwrap();
    assert_eq!(t.task().id, id);
    assert_eq!(t.task().site, "site9");
    assert_eq!(store.get_task(id).await.unwrap().as_ref(), Some(t.task()));

    for unknown in [Uuid::new_v4(), Uuid::nil(), Uuid::max()] {
        assert_eq!(store.get_task(unknown).await.unwrap(), None, "{unknown}");
    }
}

async fn create_without_id_gives_distinct_ids(ctx: Ctx) {
    let store = ctx.store.clone();
    let info = wf("sync", None, None, None);
    let a = create(&store, "alice", info.clone()).await;
    let b = create(&store, "alice", info).await;
    assert_ne!(a.id, b.id, "two creates without an id are two tasks");
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 2);
}

// ---------------------------------------------------------------------------------------------
// 2. Idempotent create
// ---------------------------------------------------------------------------------------------

async fn create_with_existing_id_is_idempotent_or_rejected(ctx: Ctx) {
    let store = ctx.store.clone();
    let id = Uuid::new_v4();
    let info = wf("sync", Some("vm"), Some("vm-1"), Some("first vm"));
    let original = match store
        .create_task(new_task(Some(id), "alice", info.clone()), SITE)
        .await
        .unwrap()
    {
        CreateOutcome::Created(t) => t,
        other => panic!("expected Created, got {other:?}"),
    };
    // Make sure a re-create would get a different clock reading if it (wrongly) re-inserted.
    tokio::time::sleep(Duration::from_millis(3)).await;

    enum Expect {
        Existed,
        Rejected,
    }
    let mut other_type = info.clone();
    other_type.workflow_type = "backup".into();
    let mut other_rtype = info.clone();
    other_rtype.resource_type = Some("disk".into());
    let mut other_rid = info.clone();
    other_rid.resource_id = None;
    let mut other_rname = info.clone();
    other_rname.resource_name = Some("second vm".into());
    let cases: Vec<(&str, NewTask, &str, Expect)> = vec![
        (
            "identical",
            new_task(Some(id), "alice", info.clone()),
            SITE,
            Expect::Existed,
        ),
        // Only user and workflow info are compared; the existing task (and its site) wins.
        (
            "other site",
            new_task(Some(id), "alice", info.clone()),
            "site2",
            Expect::Existed,
        ),
        (
            "other user",
            new_task(Some(id), "bob", info.clone()),
            SITE,
            Expect::Rejected,
        ),
        (
            "other type",
            new_task(Some(id), "alice", other_type),
            SITE,
            Expect::Rejected,
        ),
        (
            "other resourceType",
            new_task(Some(id), "alice", other_rtype),
            SITE,
            Expect::Rejected,
        ),
        (
            "resourceId dropped",
            new_task(Some(id), "alice", other_rid),
            SITE,
            Expect::Rejected,
        ),
        (
            "other resourceName",
            new_task(Some(id), "alice", other_rname),
            SITE,
            Expect::Rejected,
        ),
    ];
    for (name, new, site, expect) in cases {
        let got = store.create_task(new, site).await;
        match expect {
            Expect::Existed => {
                assert_eq!(
                    got,
                    Ok(CreateOutcome::AlreadyExisted(original.clone())),
                    "{name}"
                );
            }
            Expect::Rejected => {
                assert!(
                    matches!(got, Err(StoreError::Rejected(_))),
                    "{name}: {got:?}"
                );
            }
        }
        assert_eq!(
            store.get_task(id).await.unwrap().as_ref(),
            Some(&original),
            "{name}: the stored task is unchanged"
        );
    }

    // Idempotence holds after the task changed, too: the current task is returned.
    let patched = store.update_task(id, progress(55)).await.unwrap();
    let again = store
        .create_task(new_task(Some(id), "alice", info), SITE)
        .await
        .unwrap();
    assert_eq!(again, CreateOutcome::AlreadyExisted(patched));
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 1);
}

// ---------------------------------------------------------------------------------------------
// 3. update_task
// ---------------------------------------------------------------------------------------------

/// Every kind of patch, for trying against tasks that must refuse them.
fn all_patch_kinds() -> Vec<(&'static str, ValidPatch)> {
    vec![
        ("empty", TaskPatch::default().validate().unwrap()),
        ("progress", progress(10)),
        ("progress 100", progress(100)),
        ("warning", warnings(vec![envelope("W", "late")])),
        ("succeed", succeed(Some("t"), Some(json!("late")))),
        ("succeed bare", succeed(None, None)),
        ("fail", fail(envelope("X", "late"))),
        (
            "explicit RUNNING",
            TaskPatch {
                state: Some(TaskState::Running),
                progress: Some(3),
                ..Default::default()
            }
            .validate()
            .unwrap(),
        ),
    ]
}

async fn update_task_progress_warnings_and_success(ctx: Ctx) {
    let store = ctx.store.clone();
    let t0 = create(&store, "alice", wf("sync", Some("vm"), None, None)).await;
    let (w1, w2, w3) = (
        envelope("W1", "first"),
        envelope("W2", "second"),
        envelope("W3", "third"),
    );

    let t1 = store
        .update_task(
            t0.id,
            TaskPatch {
                progress: Some(30),
                warnings: Some(vec![w1.clone()]),
                ..Default::default()
            }
            .validate()
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(t1.progress, 30);
    assert_eq!(t1.warnings, vec![w1.clone()]);
    assert_eq!(t1.state, TaskState::Running);
    assert_eq!(t1.end_time, -1);
    assert_eq!(t1.start_time, t0.start_time);
    assert!(
        t1.last_updated > t0.last_updated,
        "every change moves lastUpdated"
    );
    assert_eq!(store.get_task(t0.id).await.unwrap().as_ref(), Some(&t1));

    let t2 = store
        .update_task(
            t0.id,
            TaskPatch {
                progress: Some(60),
                warnings: Some(vec![w2.clone(), w3.clone()]),
                ..Default::default()
            }
            .validate()
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(t2.progress, 60);
    assert_eq!(t2.warnings, vec![w1.clone(), w2.clone(), w3.clone()]);
    assert!(
        t2.last_updated > t1.last_updated,
        "every change moves lastUpdated"
    );
    assert_eq!(store.get_task(t0.id).await.unwrap().as_ref(), Some(&t2));

    // A warnings-only patch leaves progress alone; progress may also go down.
    let t3 = store.update_task(t0.id, progress(20)).await.unwrap();
    assert_eq!(t3.progress, 20);
    assert_eq!(t3.warnings.len(), 3);

    let result = json!({"vm": {"id": "vm-1", "disks": [1, 2, 3]}, "ok": true});
    tokio::time::sleep(Duration::from_millis(2)).await;
    let done = store
        .update_task(t0.id, succeed(Some("VmResult"), Some(result.clone())))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.progress, 100, "SUCCEEDED sets progress to 100");
    assert!(done.end_time >= done.start_time);
    assert!(done.end_time > t0.start_time, "slept 2 ms since the start");
    assert_eq!(done.end_time, done.last_updated);
    assert_eq!(done.result_type.as_deref(), Some("VmResult"));
    assert_eq!(done.result.as_ref(), Some(&result));
    assert_eq!(done.error, None);
    assert_eq!(
        done.warnings,
        vec![w1, w2, w3],
        "warnings survive completion"
    );
    assert_eq!(done.workflow_info, t0.workflow_info);
    assert_eq!(done.user, t0.user);
    assert_eq!(done.site, t0.site);
    assert_eq!(store.get_task(t0.id).await.unwrap().as_ref(), Some(&done));

    for (name, patch) in all_patch_kinds() {
        let got = store.update_task(t0.id, patch).await;
        assert_eq!(got, Err(StoreError::TaskAlreadyFinal(t0.id)), "{name}");
        assert_eq!(
            store.get_task(t0.id).await.unwrap().as_ref(),
            Some(&done),
            "{name}: a final task is unchanged"
        );
    }
}

async fn update_task_failure_keeps_error(ctx: Ctx) {
    let store = ctx.store.clone();
    let t0 = create(&store, "bob", wf("backup", None, None, None)).await;
    store.update_task(t0.id, progress(40)).await.unwrap();
    let err = ErrorEnvelope {
        code: "Forbidden".into(),
        msg: "Permission denied.".into(),
        args: vec!["a".into(), "b".into()],
        stacktrace: "trace".into(),
    };
    let failed = store.update_task(t0.id, fail(err.clone())).await.unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(failed.error.as_ref(), Some(&err));
    assert_eq!(failed.progress, 40, "FAILED keeps the progress reached");
    assert_eq!(failed.result_type, None);
    assert_eq!(failed.result, None);
    assert!(failed.end_time >= failed.start_time);
    assert_eq!(failed.end_time, failed.last_updated);
    assert_eq!(store.get_task(t0.id).await.unwrap().as_ref(), Some(&failed));

    for (name, patch) in all_patch_kinds() {
        assert_eq!(
            store.update_task(t0.id, patch).await,
            Err(StoreError::TaskAlreadyFinal(t0.id)),
            "{name}"
        );
        assert_eq!(store.get_task(t0.id).await.unwrap().as_ref(), Some(&failed));
    }
}

async fn update_task_success_without_result_and_with_progress(ctx: Ctx) {
    let store = ctx.store.clone();
    let t = create(&store, "alice", wf("sync", None, None, None)).await;
    let patch = TaskPatch {
        progress: Some(7),
        state: Some(TaskState::Succeeded),
        warnings: Some(vec![envelope("W", "at the end")]),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let done = store.update_task(t.id, patch).await.unwrap();
    assert_eq!(
        done.progress, 100,
        "SUCCEEDED wins over a progress in the same patch"
    );
    assert_eq!(done.result, None);
    assert_eq!(done.result_type, None);
    assert_eq!(done.warnings.len(), 1);

    // A JSON null result is a result, and round-trips.
    let t = create(&store, "alice", wf("sync", None, None, None)).await;
    let done = store
        .update_task(
            t.id,
            succeed(Some("Nothing"), Some(serde_json::Value::Null)),
        )
        .await
        .unwrap();
    let got = store.get_task(t.id).await.unwrap().unwrap();
    assert_eq!(got, done);
}

async fn update_unknown_task_is_not_found(ctx: Ctx) {
    let store = ctx.store.clone();
    let existing = create(&store, "alice", wf("sync", None, None, None)).await;
    for (name, patch) in all_patch_kinds() {
        let id = Uuid::new_v4();
        assert_eq!(
            store.update_task(id, patch).await,
            Err(StoreError::TaskNotFound(id)),
            "{name}"
        );
        assert_eq!(
            store.get_task(id).await.unwrap(),
            None,
            "{name}: not created"
        );
    }
    assert_eq!(
        store.get_task(existing.id).await.unwrap().as_ref(),
        Some(&existing)
    );
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 1);
}

async fn warnings_are_capped_per_task_atomically(ctx: Ctx) {
    use sitegate_model::task::{MAX_WARNINGS_PER_PATCH, MAX_WARNINGS_PER_TASK};
    let store = ctx.store.clone();
    let t = create(&store, "alice", wf("sync", None, None, None)).await;
    let rounds = MAX_WARNINGS_PER_TASK / MAX_WARNINGS_PER_PATCH;
    let mut last = t.clone();
    for r in 0..rounds {
        let batch = (0..MAX_WARNINGS_PER_PATCH)
            .map(|k| envelope("W", &format!("{r}-{k}")))
            .collect();
        last = store.update_task(t.id, warnings(batch)).await.unwrap();
    }
    assert_eq!(last.warnings.len(), MAX_WARNINGS_PER_TASK);

    // One warning too many: refused, and the progress in the same patch is not applied either.
    let over = TaskPatch {
        progress: Some(99),
        warnings: Some(vec![envelope("W", "one too many")]),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let got = store.update_task(t.id, over).await;
    assert!(matches!(got, Err(StoreError::Rejected(_))), "{got:?}");
    assert_eq!(store.get_task(t.id).await.unwrap().as_ref(), Some(&last));

    // Patches without warnings, including completion, still work.
    let done = store.update_task(t.id, succeed(None, None)).await.unwrap();
    assert_eq!(done.warnings.len(), MAX_WARNINGS_PER_TASK);
    assert_eq!(done.state, TaskState::Succeeded);
}

// ---------------------------------------------------------------------------------------------
// 4. query_tasks
// ---------------------------------------------------------------------------------------------

type Pred = Box<dyn Fn(&Task) -> bool>;

/// A write that would make a task larger than `MAX_TASK_BYTES` as JSON is refused and changes
/// nothing; the writes before it stand.
async fn tasks_are_bounded_by_their_encoded_size(ctx: Ctx) {
    use sitegate_model::task::MAX_TASK_BYTES;
    let store = ctx.store.clone();
    let task = create(&store, "alice", wf("sync", None, None, None)).await;
    let big = json!("x".repeat(MAX_TASK_BYTES));
    let refused = store
        .update_task(task.id, succeed(Some("string"), Some(big)))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Rejected(_))),
        "{refused:?}"
    );
    assert_eq!(store.get_task(task.id).await.unwrap().as_ref(), Some(&task));
    // Warnings that add up: each patch is small, the one that crosses the bound is refused.
    let batch = |i: usize| {
        warnings(
            (0..50)
                .map(|j| envelope("W", &format!("{i}-{j}-{}", "m".repeat(1500))))
                .collect(),
        )
    };
    let mut last = task.clone();
    let mut refused_at = None;
    for i in 0..10 {
        match store.update_task(task.id, batch(i)).await {
            Ok(t) => {
                assert!(serde_json::to_vec(&t).unwrap().len() <= MAX_TASK_BYTES);
                last = t;
            }
            Err(StoreError::Rejected(_)) => {
                refused_at = Some(i);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused_at.is_some_and(|i| i > 0), "{refused_at:?}");
    assert_eq!(store.get_task(task.id).await.unwrap().as_ref(), Some(&last));
}

async fn query_filters_match_an_independent_filter(ctx: Ctx) {
    let s = seed(ctx).await;
    let all = &s.tasks;
    let default_sort = TaskQuery::default().sort;

    // Thresholds taken from the data, so each time filter cuts the set somewhere inside it.
    let mut starts: Vec<i64> = all.iter().map(|t| t.start_time).collect();
    starts.sort_unstable();
    let (s_lo, s_mid, s_hi) = (starts[5], starts[15], starts[25]);
    let mut ends: Vec<i64> = all
        .iter()
        .filter(|t| t.state.is_final())
        .map(|t| t.end_time)
        .collect();
    ends.sort_unstable();
    assert_eq!(ends.len(), 12);
    let e_mid = ends[6];
    let far_future = now_millis() + 1_000_000;

    let some_ids = [all[0].id, all[3].id, all[17].id, Uuid::new_v4()];
    let id_set: HashSet<Uuid> = some_ids.iter().copied().collect();
    let id_set2 = id_set.clone();
    let ids_param = some_ids
        .iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(",");

    let rt = |t: &Task, v: &str| t.workflow_info.resource_type.as_deref() == Some(v);
    // (query, may the answer be empty, expected predicate)
    let cases: Vec<(String, bool, Pred)> = vec![
        (String::new(), false, Box::new(|_| true)),
        (
            format!("ids={ids_param}"),
            false,
            Box::new(move |t| id_set.contains(&t.id)),
        ),
        (format!("ids={}", Uuid::new_v4()), true, Box::new(|_| false)),
        ("user=alice".into(), false, Box::new(|t| t.user == "alice")),
        ("user=bob".into(), false, Box::new(|t| t.user == "bob")),
        ("user=carol".into(), true, Box::new(|_| false)),
        (
            "state=RUNNING".into(),
            false,
            Box::new(|t| t.state == TaskState::Running),
        ),
        (
            "state=SUCCEEDED".into(),
            false,
            Box::new(|t| t.state == TaskState::Succeeded),
        ),
        (
            "state=FAILED".into(),
            false,
            Box::new(|t| t.state == TaskState::Failed),
        ),
        (
            "state=SUCCEEDED,FAILED".into(),
            false,
            Box::new(|t| t.state.is_final()),
        ),
        (
            "state=RUNNING,FAILED".into(),
            false,
            Box::new(|t| t.state != TaskState::Succeeded),
        ),
        (
            "state=RUNNING,SUCCEEDED,FAILED".into(),
            false,
            Box::new(|_| true),
        ),
        (
            "type=sync".into(),
            false,
            Box::new(|t| t.workflow_info.workflow_type == "sync"),
        ),
        (
            "type=backup".into(),
            false,
            Box::new(|t| t.workflow_info.workflow_type == "backup"),
        ),
        ("type=SYNC".into(), true, Box::new(|_| false)),
        (
            "resourceType=vm".into(),
            false,
            Box::new(move |t| rt(t, "vm")),
        ),
        (
            "resourceType=disk".into(),
            false,
            Box::new(move |t| rt(t, "disk")),
        ),
        (
            "resourceId=r1".into(),
            false,
            Box::new(|t| t.workflow_info.resource_id.as_deref() == Some("r1")),
        ),
        (
            "resourceName=res%202".into(),
            false,
            Box::new(|t| t.workflow_info.resource_name.as_deref() == Some("res 2")),
        ),
        (
            "resourceName=res+0".into(),
            false,
            Box::new(|t| t.workflow_info.resource_name.as_deref() == Some("res 0")),
        ),
        (
            format!("startTimeBefore={s_mid}"),
            false,
            Box::new(move |t| t.start_time < s_mid),
        ),
        (
            format!("startTimeAfter={s_mid}"),
            false,
            Box::new(move |t| t.start_time > s_mid),
        ),
        (
            format!("startTimeAfter={s_lo}&startTimeBefore={s_hi}"),
            false,
            Box::new(move |t| t.start_time > s_lo && t.start_time < s_hi),
        ),
        (
            format!("endTimeBefore={e_mid}"),
            false,
            Box::new(move |t| t.state.is_final() && t.end_time < e_mid),
        ),
        (
            format!("endTimeAfter={e_mid}"),
            false,
            Box::new(move |t| t.state.is_final() && t.end_time > e_mid),
        ),
        // Running tasks (endTime -1) have neither ended before nor after anything.
        (
            format!("endTimeBefore={far_future}"),
            false,
            Box::new(|t| t.state.is_final()),
        ),
        (
            "endTimeAfter=0".into(),
            false,
            Box::new(|t| t.state.is_final()),
        ),
        ("endTimeBefore=0".into(), true, Box::new(|_| false)),
        (
            "user=alice&state=RUNNING&type=sync".into(),
            false,
            Box::new(|t| {
                t.user == "alice"
                    && t.state == TaskState::Running
                    && t.workflow_info.workflow_type == "sync"
            }),
        ),
        (
            "resourceType=vm&resourceId=r0".into(),
            false,
            Box::new(move |t| rt(t, "vm") && t.workflow_info.resource_id.as_deref() == Some("r0")),
        ),
        (
            format!("user=bob&state=SUCCEEDED,FAILED&endTimeAfter={}", ends[0]),
            false,
            Box::new(move |t| t.user == "bob" && t.state.is_final() && t.end_time > ends[0]),
        ),
        (
            format!("ids={ids_param}&user=alice"),
            false,
            Box::new(move |t| id_set2.contains(&t.id) && t.user == "alice"),
        ),
    ];

    for (raw, may_be_empty, pred) in cases {
        let q = query(&raw);
        let expected = sorted(all.iter().filter(|t| pred(t)).cloned(), &default_sort);
        assert!(
            may_be_empty || !expected.is_empty(),
            "{raw}: the test data should match something"
        );
        if !raw.is_empty() && !raw.starts_with("state=RUNNING,SUCCEEDED") {
            assert!(
                expected.len() < all.len(),
                "{raw}: the filter should cut something"
            );
        }
        let page = s.store.query_tasks(&q, None).await.unwrap();
        assert_eq!(page.total, expected.len() as u64, "{raw}: total");
        assert_eq!(ids_of(&page.items), ids_of(&expected), "{raw}: items");
        assert_eq!(page.items, expected, "{raw}: whole tasks");
        if raw.contains("endTime") {
            assert!(
                page.items.iter().all(|t| t.end_time >= 0),
                "{raw}: a running task matched an endTime filter"
            );
        }
    }
}

async fn query_sorts_with_id_tiebreak(ctx: Ctx) {
    let s = seed(ctx).await;
    let sorts = [
        "startTime",
        "-startTime",
        "startTime-",
        "lastUpdated",
        "-lastUpdated",
        "endTime",
        "-endTime",
        "progress",
        "-progress",
        "state",
        "-state",
        "user",
        "-user",
        "id",
        "-id",
        "type",
        "-type",
        "resourceType",
        "-resourceType",
        "resourceId",
        "-resourceId",
        "resourceName",
        "-resourceName",
        "user,-progress",
        "state,user,-startTime",
        "-type,resourceType,endTime",
        "resourceName,-id",
        "-user,state-",
    ];
    for sort in sorts {
        let raw = format!("sort={sort}");
        let q = query(&raw);
        let expected = sorted(s.tasks.iter().cloned(), &q.sort);
        let page = s.store.query_tasks(&q, None).await.unwrap();
        assert_eq!(page.total, SEEDED as u64, "{raw}");
        assert_eq!(ids_of(&page.items), ids_of(&expected), "{raw}");

        // The same sort restricted by a filter.
        let raw = format!("sort={sort}&user=bob&state=RUNNING,SUCCEEDED");
        let q = query(&raw);
        let expected = sorted(
            s.tasks
                .iter()
                .filter(|t| t.user == "bob" && t.state != TaskState::Failed)
                .cloned(),
            &q.sort,
        );
        let page = s.store.query_tasks(&q, None).await.unwrap();
        assert_eq!(page.total, expected.len() as u64, "{raw}");
        assert_eq!(ids_of(&page.items), ids_of(&expected), "{raw}");
    }

    // The default sort is newest first, ties by id ascending.
    let page = s.store.query_tasks(&query(""), None).await.unwrap();
    let expected = sorted(
        s.tasks.iter().cloned(),
        &[SortKey {
            field: SortField::StartTime,
            descending: true,
        }],
    );
    assert_eq!(ids_of(&page.items), ids_of(&expected));
}

async fn query_paging_concatenates_to_the_full_list(ctx: Ctx) {
    let s = seed(ctx).await;
    let cases = [
        ("", 7),
        ("sort=startTime", 1),
        ("sort=user,-progress", 4),
        ("sort=state", 30),
        ("sort=-resourceName", 31),
        ("sort=endTime&user=alice", 3),
        ("state=RUNNING&sort=type", 5),
    ];
    for (base, limit) in cases {
        let q_full = query(&format!(
            "{base}{}limit=1000",
            if base.is_empty() { "" } else { "&" }
        ));
        let full = s.store.query_tasks(&q_full, None).await.unwrap();
        assert_eq!(full.total as usize, full.items.len(), "{base}");
        assert!(!full.items.is_empty(), "{base}");

        let mut seen: Vec<Task> = Vec::new();
        let mut offset = 0u64;
        loop {
            let sep = if base.is_empty() { "" } else { "&" };
            let raw = format!("{base}{sep}limit={limit}&offset={offset}");
            let page = s.store.query_tasks(&query(&raw), None).await.unwrap();
            assert_eq!(page.total, full.total, "{raw}: total ignores paging");
            assert!(page.items.len() <= limit, "{raw}");
            if page.items.is_empty() {
                break;
            }
            seen.extend(page.items);
            offset += limit as u64;
            assert!(offset <= 100, "{raw}: paging does not end");
        }
        let unique: HashSet<Uuid> = seen.iter().map(|t| t.id).collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "{base}: a task appeared on two pages"
        );
        assert_eq!(
            seen, full.items,
            "{base}: pages concatenate to the full list"
        );
    }

    // limit=0 answers no items but the full count; an offset past the end answers none.
    for raw in [
        "limit=0",
        "offset=30",
        "offset=1000&limit=5",
        "user=bob&limit=0&offset=3",
    ] {
        let page = s.store.query_tasks(&query(raw), None).await.unwrap();
        let expected_total = if raw.contains("user=bob") {
            15
        } else {
            SEEDED as u64
        };
        assert!(page.items.is_empty(), "{raw}");
        assert_eq!(page.total, expected_total, "{raw}");
    }
    // A limit larger than the data is fine; the last partial page is short.
    let page = s
        .store
        .query_tasks(&query("limit=8&offset=24"), None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 6);
    assert_eq!(page.total, SEEDED as u64);
}

/// Every sort field, in both directions, with and without filters, paged with a small limit:
/// every page reports the full total and holds exactly its slice of the independently sorted
/// list (ties broken by id, NULLs first ascending and last descending).
async fn query_every_sort_pages_with_total(ctx: Ctx) {
    const FIELDS: [&str; 11] = [
        "startTime",
        "lastUpdated",
        "endTime",
        "progress",
        "state",
        "user",
        "id",
        "type",
        "resourceType",
        "resourceId",
        "resourceName",
    ];
    const LIMIT: usize = 7;
    let s = seed(ctx).await;
    let filters: Vec<(&str, Pred)> = vec![
        ("", Box::new(|_| true)),
        (
            "&state=RUNNING,FAILED",
            Box::new(|t| t.state != TaskState::Succeeded),
        ),
        (
            "&resourceType=vm&user=alice",
            Box::new(|t| {
                t.user == "alice" && t.workflow_info.resource_type.as_deref() == Some("vm")
            }),
        ),
    ];
    for field in FIELDS {
        for descending in [false, true] {
            let sort = format!("sort={}{field}", if descending { "-" } else { "" });
            for (filter, pred) in &filters {
                let keys = query(&sort).sort;
                let expected = sorted(s.tasks.iter().filter(|t| pred(t)).cloned(), &keys);
                assert!(!expected.is_empty(), "{sort}{filter}: matches nothing");
                let mut offset = 0;
                loop {
                    let raw = format!("{sort}{filter}&limit={LIMIT}&offset={offset}");
                    let page = s.store.query_tasks(&query(&raw), None).await.unwrap();
                    assert_eq!(page.total, expected.len() as u64, "{raw}: total");
                    let slice: Vec<Task> =
                        expected.iter().skip(offset).take(LIMIT).cloned().collect();
                    assert_eq!(ids_of(&page.items), ids_of(&slice), "{raw}: order");
                    assert_eq!(page.items, slice, "{raw}: whole tasks");
                    if page.items.len() < LIMIT {
                        break;
                    }
                    offset += LIMIT;
                }
                assert!(offset <= expected.len(), "{sort}{filter}");
            }
        }
    }
}

/// Text sorts by its bytes (UTF-8), in both backends: upper case before lower case,
/// punctuation by its code, non-ASCII after ASCII; and filters match exactly (case, accents,
/// LIKE wildcards are plain characters).
async fn query_text_sorts_bytewise_and_filters_exactly(ctx: Ctx) {
    let store = ctx.store.clone();
    let users = [
        "alice", "Alice", "ALICE", "Zed", "zed", "_x", "a.b", "a-b", "a_b", "a@b", "0day", "9",
        "ab", "aB",
    ];
    let texts = [
        "sync", "Sync", "SYNC", "sync_", "sy%c", "Émile", "émile", "emile", "zebra", "Zebra",
        "a b", "a-b", "ab", "日本", "ß", "ss", "~", "",
    ];
    let mut tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for k in 0..2 {
            let j = (i * 2 + k) % texts.len();
            let ty = if texts[j].is_empty() { "t" } else { texts[j] };
            let info = wf(
                ty,
                [false, true, true][j % 3].then_some(texts[(j + 5) % texts.len()]),
                (j % 4 != 1).then_some(texts[(j + 7) % texts.len()]),
                Some(texts[(j + 11) % texts.len()]),
            );
            tasks.push(create(&store, user, info).await);
        }
    }
    for sort in [
        "user",
        "-user",
        "type",
        "-type",
        "resourceType",
        "-resourceType",
        "resourceId",
        "-resourceId",
        "resourceName",
        "-resourceName",
        "user,-type",
        "resourceType,resourceName-",
    ] {
        let raw = format!("sort={sort}&limit=1000");
        let q = query(&raw);
        let expected = sorted(tasks.iter().cloned(), &q.sort);
        let page = store.query_tasks(&q, None).await.unwrap();
        assert_eq!(page.total, tasks.len() as u64, "{raw}");
        let got: Vec<(&str, &str)> = page
            .items
            .iter()
            .map(|t| (t.user.as_str(), t.workflow_info.workflow_type.as_str()))
            .collect();
        let want: Vec<(&str, &str)> = expected
            .iter()
            .map(|t| (t.user.as_str(), t.workflow_info.workflow_type.as_str()))
            .collect();
        assert_eq!(got, want, "{raw}: not in byte order");
        assert_eq!(ids_of(&page.items), ids_of(&expected), "{raw}");
    }
    let filters: Vec<(&str, Pred)> = vec![
        ("user=Alice", Box::new(|t| t.user == "Alice")),
        ("user=a_b", Box::new(|t| t.user == "a_b")),
        (
            "type=sync",
            Box::new(|t| t.workflow_info.workflow_type == "sync"),
        ),
        (
            "type=SYNC",
            Box::new(|t| t.workflow_info.workflow_type == "SYNC"),
        ),
        (
            "type=sy%25c",
            Box::new(|t| t.workflow_info.workflow_type == "sy%c"),
        ),
        ("type=sy_c", Box::new(|_| false)),
        ("type=sync%25", Box::new(|_| false)),
        (
            "type=%C3%A9mile",
            Box::new(|t| t.workflow_info.workflow_type == "émile"),
        ),
        (
            "type=ss",
            Box::new(|t| t.workflow_info.workflow_type == "ss"),
        ),
        (
            "resourceName=%E6%97%A5%E6%9C%AC",
            Box::new(|t| t.workflow_info.resource_name.as_deref() == Some("日本")),
        ),
        (
            "resourceType=a+b",
            Box::new(|t| t.workflow_info.resource_type.as_deref() == Some("a b")),
        ),
        (
            "resourceId=",
            Box::new(|t| t.workflow_info.resource_id.as_deref() == Some("")),
        ),
    ];
    for (raw, pred) in filters {
        let q = query(raw);
        let expected = sorted(tasks.iter().filter(|t| pred(t)).cloned(), &q.sort);
        let page = store.query_tasks(&q, None).await.unwrap();
        assert_eq!(page.total, expected.len() as u64, "{raw}: total");
        assert_eq!(page.items, expected, "{raw}: items");
    }
}

/// A filter value that no stored task can hold (a control character, which task creation
/// refuses, even NUL) simply matches nothing, if the query is accepted at all: an empty page
/// and a total of 0, not a database error.
/// `resourceType=a,b` (a list, as the original API's clients send it) answers exactly the
/// tasks that `resourceType=a` and `resourceType=b` answer together, with the same total.
async fn query_list_filters_are_the_union_of_single_filters(ctx: Ctx) {
    let s = seed(ctx).await;
    let ids = |q: &str| {
        let store = s.store.clone();
        let q = query(q);
        async move {
            let page = store.query_tasks(&q, None).await.unwrap();
            let set: HashSet<Uuid> = ids_of(&page.items).into_iter().collect();
            assert_eq!(set.len(), page.items.len());
            (set, page.total)
        }
    };
    let lists: [&[&str]; 4] = [
        &["vm", "disk"],
        &["vm", "disk", "a b"],
        &["disk", "no-such-type"],
        &["no-such-type", "nor-this"],
    ];
    for list in lists {
        let mut union = HashSet::new();
        let mut sum = 0;
        for value in list {
            let (set, total) = ids(&format!(
                "resourceType={}&limit=1000",
                value.replace(' ', "+")
            ))
            .await;
            sum += total;
            union.extend(set);
        }
        let raw = list.join(",").replace(' ', "+");
        for spelled in [
            format!("resourceType={raw}&limit=1000"),
            format!("resourceType={}&limit=1000", raw.replace(',', "%2C")),
            format!(
                "{}&limit=1000",
                list.iter()
                    .map(|v| format!("resourceType={}", v.replace(' ', "+")))
                    .collect::<Vec<_>>()
                    .join("&")
            ),
        ] {
            let (set, total) = ids(&spelled).await;
            assert_eq!(set, union, "{spelled}");
            assert_eq!(
                total, sum,
                "{spelled}: the values are disjoint, so totals add up"
            );
        }
    }
    // Combined with another filter, the list still means "any of these".
    let (both, _) = ids("resourceType=vm,disk&state=RUNNING&limit=1000").await;
    let expected: HashSet<Uuid> = s
        .tasks
        .iter()
        .filter(|t| {
            matches!(
                t.workflow_info.resource_type.as_deref(),
                Some("vm" | "disk")
            ) && t.state == TaskState::Running
        })
        .map(|t| t.id)
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(both, expected);
}

/// Tasks keep the organisations their writer named; `sourceOrg` and `destinationOrg` filter
/// on them exactly (case-sensitive, as the original), and sort by them.
async fn query_org_filters_match_exactly_and_round_trip(ctx: Ctx) {
    let store = ctx.store.clone();
    let mut made = Vec::new();
    for (i, (source, destination)) in [
        (Some("Org1"), Some("Org2")),
        (Some("org1"), None),
        (None, Some("Org2")),
        (Some("Org1"), Some("Org3")),
        (None, None),
    ]
    .into_iter()
    .enumerate()
    {
        let new = NewTask {
            source_org: source.map(str::to_owned),
            destination_org: destination.map(str::to_owned),
            ..new_task(None, "alice", wf("replication", Some("vm"), None, None))
        };
        let task = match store.create_task(new.clone(), SITE).await.unwrap() {
            CreateOutcome::Created(t) => t,
            other => panic!("expected Created, got {other:?}"),
        };
        assert_eq!(task.source_org.as_deref(), source, "task {i}");
        assert_eq!(task.destination_org.as_deref(), destination, "task {i}");
        assert_eq!(store.get_task(task.id).await.unwrap().as_ref(), Some(&task));
        // The same create again is idempotent; with other orgs it contradicts the first.
        let again = store
            .create_task(
                NewTask {
                    id: Some(task.id),
                    ..new.clone()
                },
                SITE,
            )
            .await
            .unwrap();
        assert!(
            matches!(again, CreateOutcome::AlreadyExisted(_)),
            "{again:?}"
        );
        let other = NewTask {
            id: Some(task.id),
            source_org: Some("Elsewhere".into()),
            ..new
        };
        assert!(matches!(
            store.create_task(other, SITE).await,
            Err(StoreError::Rejected(_))
        ));
        made.push(task);
    }
    let found = |raw: &str| {
        let store = store.clone();
        let q = query(raw);
        async move {
            let page = store.query_tasks(&q, None).await.unwrap();
            assert_eq!(page.total as usize, page.items.len());
            let mut ids = ids_of(&page.items);
            ids.sort();
            ids
        }
    };
    let expect = |pred: &dyn Fn(&Task) -> bool| {
        let mut ids: Vec<Uuid> = made.iter().filter(|t| pred(t)).map(|t| t.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        found("sourceOrg=Org1").await,
        expect(&|t| t.source_org.as_deref() == Some("Org1"))
    );
    assert_eq!(found("sourceOrg=Org1").await.len(), 2);
    assert_eq!(found("sourceOrg=org1").await.len(), 1, "case-sensitive");
    assert_eq!(
        found("destinationOrg=Org2").await,
        expect(&|t| t.destination_org.as_deref() == Some("Org2"))
    );
    assert_eq!(
        found("sourceOrg=Org1&destinationOrg=Org3").await,
        expect(&|t| t.source_org.as_deref() == Some("Org1")
            && t.destination_org.as_deref() == Some("Org3"))
    );
    assert!(found("sourceOrg=Nobody").await.is_empty());
    let sorted_by_source = store
        .query_tasks(&query("sort=sourceOrg,startTime"), None)
        .await
        .unwrap();
    let keys = query("sort=sourceOrg,startTime").sort;
    assert_eq!(sorted_by_source.items, sorted(made.clone(), &keys));
}

async fn query_unstorable_filter_values_match_nothing(ctx: Ctx) {
    let store = ctx.store.clone();
    create(
        &store,
        "alice",
        wf("sync", Some("vm"), Some("1"), Some("n")),
    )
    .await;
    for raw in [
        "type=sync%00",
        "type=%00",
        "resourceType=vm%00x",
        "resourceId=%001",
        "resourceName=n%00",
        "type=sync%01",
        "resourceName=%1B%5B0m",
    ] {
        // The model may refuse these one day; what it accepts, the store must answer.
        let Ok(q) = TaskQuery::parse(Some(raw)) else {
            continue;
        };
        let got = store.query_tasks(&q, None).await;
        assert!(
            matches!(&got, Ok(page) if page.total == 0 && page.items.is_empty()),
            "{raw}: expected an empty page, got {got:?}"
        );
    }
}

/// Whatever a validated completion or warning carries is stored faithfully and read back
/// equal: any Unicode, control characters (even NUL) in `resultType`, in the result's JSON,
/// in error and warning envelopes.
async fn completion_values_round_trip_exactly(ctx: Ctx) {
    let store = ctx.store.clone();
    let odd = "nul\u{0} bell\u{7} tab\t nl\n quote\" backslash\\ é 日本 🦀 \u{202e}";
    let result_types = [
        "plain",
        "",
        "日本 🦀",
        "tab\tnewline\n",
        "nul\u{0}inside",
        "\u{0}",
        odd,
    ];
    for rt in result_types {
        let t = create(&store, "alice", wf("sync", None, None, None)).await;
        let patch = TaskPatch {
            state: Some(TaskState::Succeeded),
            result_type: Some(rt.to_owned()),
            result: Some(json!({ "s": odd, "n": [1, -2.5, 1e300, null], "k\u{0}": true })),
            warnings: Some(vec![envelope(odd, odd)]),
            ..Default::default()
        };
        // The model may refuse some of these one day; what it accepts, the store keeps.
        let Ok(patch) = patch.validate() else {
            continue;
        };
        let done = store.update_task(t.id, patch).await;
        let done = done.unwrap_or_else(|e| panic!("resultType {rt:?}: {e:?}"));
        assert_eq!(done.result_type.as_deref(), Some(rt));
        assert_eq!(
            store.get_task(t.id).await.unwrap().as_ref(),
            Some(&done),
            "resultType {rt:?}"
        );
    }
    let t = create(&store, "bob", wf("sync", None, None, None)).await;
    let failed = store
        .update_task(
            t.id,
            fail(ErrorEnvelope {
                code: odd.to_owned(),
                msg: odd.to_owned(),
                args: vec![odd.to_owned(), String::new()],
                stacktrace: odd.repeat(100),
            }),
        )
        .await
        .unwrap();
    assert_eq!(store.get_task(t.id).await.unwrap(), Some(failed));
}

/// `total` and `items` describe one snapshot even while tasks are being created: a page that
/// holds every match has exactly `total` items, and totals never go back.
async fn query_total_and_items_agree_under_writes(ctx: Ctx) {
    const CREATES: usize = 120;
    let store = ctx.store.clone();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for j in 0..CREATES {
                let t = create(&store, "alice", wf(TYPES[j % 3], None, None, None)).await;
                if j % 2 == 0 {
                    store.update_task(t.id, succeed(None, None)).await.unwrap();
                }
            }
        })
    };
    let mut last_total = 0;
    let mut rounds = 0;
    while !writer.is_finished() || rounds == 0 {
        rounds += 1;
        for raw in ["limit=1000", "state=SUCCEEDED&limit=1000&sort=-endTime"] {
            let page = store.query_tasks(&query(raw), None).await.unwrap();
            assert_eq!(
                page.items.len() as u64,
                page.total,
                "{raw}: items and total disagree"
            );
            if raw == "limit=1000" {
                assert!(page.total >= last_total, "the total went back");
                last_total = page.total;
            }
        }
    }
    writer.await.unwrap();
    let page = store.query_tasks(&query("limit=0"), None).await.unwrap();
    assert_eq!(page.total, CREATES as u64);
    eprintln!("{rounds} rounds of queries overlapped the writes");
}

async fn query_owner_restricts_to_one_user(ctx: Ctx) {
    let s = seed(ctx).await;
    let cases: Vec<(&str, Option<&str>, Pred)> = vec![
        ("", Some("alice"), Box::new(|t| t.user == "alice")),
        ("", Some("bob"), Box::new(|t| t.user == "bob")),
        ("", Some("carol"), Box::new(|_| false)),
        ("", None, Box::new(|_| true)),
        ("user=alice", Some("alice"), Box::new(|t| t.user == "alice")),
        ("user=bob", Some("alice"), Box::new(|_| false)),
        (
            "state=RUNNING",
            Some("bob"),
            Box::new(|t| t.user == "bob" && t.state == TaskState::Running),
        ),
        (
            "type=migrate&sort=progress",
            Some("alice"),
            Box::new(|t| t.user == "alice" && t.workflow_info.workflow_type == "migrate"),
        ),
        (
            "state=SUCCEEDED,FAILED&sort=-endTime&limit=3",
            Some("bob"),
            Box::new(|t| t.user == "bob" && t.state.is_final()),
        ),
    ];
    for (raw, owner, pred) in cases {
        let q = query(raw);
        let matching = sorted(s.tasks.iter().filter(|t| pred(t)).cloned(), &q.sort);
        let page = s.store.query_tasks(&q, owner).await.unwrap();
        assert_eq!(page.total, matching.len() as u64, "{raw} owner={owner:?}");
        let shown: Vec<Task> = matching.into_iter().take(q.limit as usize).collect();
        assert_eq!(page.items, shown, "{raw} owner={owner:?}");
        if let Some(o) = owner {
            assert!(page.items.iter().all(|t| t.user == o), "{raw}");
        }
    }

    // With an ids filter naming other users' tasks, the owner still restricts.
    let bob_task = s.tasks.iter().find(|t| t.user == "bob").unwrap();
    let alice_task = s.tasks.iter().find(|t| t.user == "alice").unwrap();
    let raw = format!("ids={},{}", bob_task.id, alice_task.id);
    let page = s
        .store
        .query_tasks(&query(&raw), Some("alice"))
        .await
        .unwrap();
    assert_eq!(page.items, vec![alice_task.clone()]);
    assert_eq!(page.total, 1);
}

// ---------------------------------------------------------------------------------------------
// 5. get_tasks
// ---------------------------------------------------------------------------------------------

async fn get_tasks_keeps_order_and_drops_missing_and_foreign(ctx: Ctx) {
    let store = ctx.store.clone();
    let a1 = create(&store, "alice", wf("sync", None, None, None)).await;
    let b1 = create(&store, "bob", wf("sync", None, None, None)).await;
    let a2 = create(&store, "alice", wf("backup", None, None, None)).await;
    let a3 = store
        .update_task(
            create(&store, "alice", wf("migrate", None, None, None))
                .await
                .id,
            fail(envelope("E", "x")),
        )
        .await
        .unwrap();
    let missing = Uuid::new_v4();

    let ask = vec![a3.id, missing, b1.id, a1.id, a2.id];
    let cases: Vec<(Option<&str>, Vec<&Task>)> = vec![
        (None, vec![&a3, &b1, &a1, &a2]),
        (Some("alice"), vec![&a3, &a1, &a2]),
        (Some("bob"), vec![&b1]),
        (Some("carol"), vec![]),
    ];
    for (owner, expected) in cases {
        let got = store.get_tasks(&ask, owner).await.unwrap();
        let expected: Vec<Task> = expected.into_iter().cloned().collect();
        assert_eq!(got, expected, "owner={owner:?}");
    }

    // Reversed request order, reversed answer.
    let mut rev = ask.clone();
    rev.reverse();
    let got = store.get_tasks(&rev, None).await.unwrap();
    assert_eq!(ids_of(&got), vec![a2.id, a1.id, b1.id, a3.id]);

    assert!(store.get_tasks(&[], None).await.unwrap().is_empty());
    assert!(store.get_tasks(&[missing], None).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 6. Sessions
// ---------------------------------------------------------------------------------------------

async fn sessions_round_trip(ctx: Ctx) {
    let store = ctx.store.clone();
    assert_eq!(store.count_sessions().await.unwrap(), 0);
    let cases = [
        session(1, "alice", vec![Role::User], 1_000, 1_000),
        session(
            2,
            "root",
            vec![Role::Admin, Role::User, Role::Writer],
            2_000,
            2_500,
        ),
        session(3, "svc", vec![Role::Writer, Role::User], 3_000, 3_000),
        session(4, "nobody", vec![], 4_000, 4_001),
        session(
            5,
            "a.b@c_d-e",
            vec![Role::Admin],
            1_700_000_000_000,
            1_700_000_060_000,
        ),
    ];
    for (i, s) in cases.iter().enumerate() {
        store.create_session(s.clone()).await.unwrap();
        assert_eq!(store.count_sessions().await.unwrap(), i as u64 + 1);
    }
    for s in &cases {
        let got = store.get_session(s.token_hash).await.unwrap();
        assert_eq!(got.as_ref(), Some(s), "{}", s.user);
    }
    assert_eq!(store.get_session(token(99)).await.unwrap(), None);
    assert_eq!(store.get_session([0u8; 32]).await.unwrap(), None);

    // The same token twice is refused and the first session stays.
    let dup = session(1, "mallory", vec![Role::Admin], 9, 9);
    assert!(store.create_session(dup).await.is_err());
    assert_eq!(
        store.get_session(token(1)).await.unwrap().as_ref(),
        Some(&cases[0])
    );
    assert_eq!(store.count_sessions().await.unwrap(), cases.len() as u64);
}

async fn touch_session_only_moves_forward(ctx: Ctx) {
    let store = ctx.store.clone();
    let s = session(7, "alice", vec![Role::User], 1_000, 5_000);
    store.create_session(s.clone()).await.unwrap();
    // (touch time, last_seen afterwards)
    let steps = [
        (6_000, 6_000),
        (3_000, 6_000),
        (6_000, 6_000),
        (0, 6_000),
        (6_001, 6_001),
        (90_000, 90_000),
        (89_999, 90_000),
    ];
    for (now, expect) in steps {
        store.touch_session(s.token_hash, now).await.unwrap();
        let got = store.get_session(s.token_hash).await.unwrap().unwrap();
        assert_eq!(got.last_seen, expect, "after touch({now})");
        assert_eq!(got.created, s.created, "touch never changes created");
        assert_eq!(got.user, s.user);
        assert_eq!(got.roles, s.roles);
    }
    // Touching an unknown session neither fails nor creates it.
    store.touch_session(token(8), 10).await.unwrap();
    assert_eq!(store.get_session(token(8)).await.unwrap(), None);
    assert_eq!(store.count_sessions().await.unwrap(), 1);
}

async fn delete_session_reports_whether_it_deleted(ctx: Ctx) {
    let store = ctx.store.clone();
    let a = session(1, "alice", vec![Role::User], 1, 1);
    let b = session(2, "bob", vec![Role::User], 1, 1);
    store.create_session(a.clone()).await.unwrap();
    store.create_session(b.clone()).await.unwrap();

    assert!(store.delete_session(a.token_hash).await.unwrap());
    assert_eq!(store.get_session(a.token_hash).await.unwrap(), None);
    assert_eq!(store.count_sessions().await.unwrap(), 1);
    assert!(!store.delete_session(a.token_hash).await.unwrap());
    assert!(!store.delete_session(token(42)).await.unwrap());
    assert_eq!(
        store.get_session(b.token_hash).await.unwrap().as_ref(),
        Some(&b)
    );
    // A touch after delete does not resurrect it.
    store.touch_session(a.token_hash, 100).await.unwrap();
    assert_eq!(store.get_session(a.token_hash).await.unwrap(), None);
    // The token can be used again after a delete.
    store.create_session(a.clone()).await.unwrap();
    assert_eq!(
        store.get_session(a.token_hash).await.unwrap().as_ref(),
        Some(&a)
    );
    assert_eq!(store.count_sessions().await.unwrap(), 2);
}

async fn purge_sessions_removes_idle_and_old_only(ctx: Ctx) {
    let store = ctx.store.clone();
    let idle_before = 500;
    let created_before = 300;
    // (seed, created, last_seen, purged?)
    let table = [
        (1, 900, 990, false), // fresh
        (2, 900, 100, true),  // idle
        (3, 10, 995, true),   // too old
        (4, 10, 10, true),    // both
        (5, 900, 500, false), // idle exactly at the bound: kept
        (6, 300, 999, false), // created exactly at the bound: kept
        (7, 299, 999, true),  // created 1 ms before the bound
        (8, 900, 499, true),  // idle 1 ms before the bound
        (9, 301, 501, false), // just inside both
    ];
    for (seed, created, last_seen, _) in table {
        store
            .create_session(session(seed, "u", vec![Role::User], created, last_seen))
            .await
            .unwrap();
    }
    let purged_expected = table.iter().filter(|r| r.3).count() as u64;
    let purged = store
        .purge_sessions(idle_before, created_before)
        .await
        .unwrap();
    assert_eq!(purged, purged_expected);
    assert_eq!(
        store.count_sessions().await.unwrap(),
        table.len() as u64 - purged_expected
    );
    for (seed, created, last_seen, gone) in table {
        let got = store.get_session(token(seed)).await.unwrap();
        if gone {
            assert_eq!(got, None, "session {seed} should be purged");
        } else {
            let got = got.unwrap_or_else(|| panic!("session {seed} should be kept"));
            assert_eq!((got.created, got.last_seen), (created, last_seen));
        }
    }
    assert_eq!(
        store
            .purge_sessions(idle_before, created_before)
            .await
            .unwrap(),
        0
    );

    // A touch rescues an idle session from the next purge.
    store.touch_session(token(1), 2_000).await.unwrap();
    let purged = store.purge_sessions(1_000, 0).await.unwrap();
    assert_eq!(purged, 3, "sessions 5, 6 and 9 were idle since before 1000");
    assert!(store.get_session(token(1)).await.unwrap().is_some());
    assert_eq!(store.count_sessions().await.unwrap(), 1);
}

async fn session_extensions_put_replace_remove(ctx: Ctx) {
    let store = ctx.store.clone();
    let mut s = session(1, "alice", vec![Role::User], 10, 10);
    s.extensions = vec![remote("site2", "alice", "t2")];
    store.create_session(s.clone()).await.unwrap();
    assert_eq!(
        store.get_session(s.token_hash).await.unwrap().as_ref(),
        Some(&s)
    );

    // (operation, extensions afterwards)
    assert!(store
        .put_extension(s.token_hash, remote("site3", "al", "t3"))
        .await
        .unwrap());
    let after = store.get_session(s.token_hash).await.unwrap().unwrap();
    assert_eq!(
        after.extensions,
        vec![remote("site2", "alice", "t2"), remote("site3", "al", "t3")]
    );
    // One per site: a second put for site2 replaces the first.
    assert!(store
        .put_extension(s.token_hash, remote("site2", "alice", "t2b"))
        .await
        .unwrap());
    let after = store.get_session(s.token_hash).await.unwrap().unwrap();
    assert_eq!(after.extensions.len(), 2);
    assert!(after.extensions.contains(&remote("site2", "alice", "t2b")));
    assert!(after.extensions.contains(&remote("site3", "al", "t3")));
    // The rest of the session is untouched.
    assert_eq!(
        (after.user.as_str(), after.created, after.last_seen),
        ("alice", 10, 10)
    );
    assert_eq!(after.roles, s.roles);

    assert_eq!(
        store.remove_extension(s.token_hash, "site2").await.unwrap(),
        Some(remote("site2", "alice", "t2b"))
    );
    assert_eq!(
        store.remove_extension(s.token_hash, "site2").await.unwrap(),
        None
    );
    assert_eq!(
        store.remove_extension(s.token_hash, "site9").await.unwrap(),
        None
    );
    let after = store.get_session(s.token_hash).await.unwrap().unwrap();
    assert_eq!(after.extensions, vec![remote("site3", "al", "t3")]);

    // Unknown sessions: put reports false and creates nothing; remove finds nothing.
    assert!(!store
        .put_extension(token(2), remote("site2", "x", "y"))
        .await
        .unwrap());
    assert_eq!(store.get_session(token(2)).await.unwrap(), None);
    assert_eq!(
        store.remove_extension(token(2), "site2").await.unwrap(),
        None
    );
    assert_eq!(store.count_sessions().await.unwrap(), 1);

    // A touch leaves extensions alone; a delete takes them along.
    store.touch_session(s.token_hash, 50).await.unwrap();
    let after = store.get_session(s.token_hash).await.unwrap().unwrap();
    assert_eq!(after.extensions, vec![remote("site3", "al", "t3")]);
    assert!(store.delete_session(s.token_hash).await.unwrap());
    assert!(!store
        .put_extension(s.token_hash, remote("site4", "a", "b"))
        .await
        .unwrap());
}

async fn concurrent_extension_puts_lose_no_site(ctx: Ctx) {
    const SITES: usize = 16;
    let store = ctx.store.clone();
    store
        .create_session(session(1, "alice", vec![Role::User], 1, 1))
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..SITES {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store
                .put_extension(
                    token(1),
                    remote(&format!("site{i}"), "alice", &i.to_string()),
                )
                .await
        }));
    }
    for h in handles {
        assert!(h.await.unwrap().unwrap());
    }
    let got = store.get_session(token(1)).await.unwrap().unwrap();
    let sites: HashSet<String> = got.extensions.iter().map(|e| e.site.clone()).collect();
    assert_eq!(got.extensions.len(), SITES);
    assert_eq!(sites.len(), SITES);
}

// ---------------------------------------------------------------------------------------------
// 7. Concurrency
// ---------------------------------------------------------------------------------------------

async fn concurrent_creates_and_patches_all_land(ctx: Ctx) {
    const WORKERS: usize = 8;
    const PER_WORKER: usize = 50;
    let store = ctx.store.clone();
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(PER_WORKER);
            for j in 0..PER_WORKER {
                let user = format!("user{w}");
                let info = wf(TYPES[j % 3], Some("vm"), Some(&format!("{w}-{j}")), None);
                let t = create(&store, &user, info).await;
                let p = (j % 100) as i64;
                let t = store.update_task(t.id, progress(p)).await.unwrap();
                assert_eq!(t.progress as i64, p);
                let t = match j % 3 {
                    0 => {
                        store
                            .update_task(t.id, succeed(Some("r"), Some(json!(j))))
                            .await
                    }
                    1 => {
                        store
                            .update_task(t.id, fail(envelope("E", &j.to_string())))
                            .await
                    }
                    _ => {
                        store
                            .update_task(t.id, warnings(vec![envelope("W", "w")]))
                            .await
                    }
                }
                .unwrap();
                mine.push(t);
            }
            mine
        }));
    }
    let mut all: Vec<Task> = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    assert_eq!(all.len(), WORKERS * PER_WORKER);
    let unique: HashSet<Uuid> = all.iter().map(|t| t.id).collect();
    assert_eq!(unique.len(), all.len());

    // Everything is stored exactly as the writes answered.
    let stored = store.get_tasks(&ids_of(&all), None).await.unwrap();
    assert_eq!(stored, all);
    let page = store.query_tasks(&query("limit=1000"), None).await.unwrap();
    assert_eq!(page.total, (WORKERS * PER_WORKER) as u64);
    assert_eq!(page.items.len(), WORKERS * PER_WORKER);
    let per_state = |s: &str| {
        let store = store.clone();
        let q = query(&format!("state={s}&limit=0"));
        async move { store.query_tasks(&q, None).await.unwrap().total }
    };
    let n = |r: usize| (WORKERS * (0..PER_WORKER).filter(|j| j % 3 == r).count()) as u64;
    assert_eq!(per_state("SUCCEEDED").await, n(0));
    assert_eq!(per_state("FAILED").await, n(1));
    assert_eq!(per_state("RUNNING").await, n(2));
    for w in 0..WORKERS {
        let page = store
            .query_tasks(&query(&format!("user=user{w}&limit=0")), None)
            .await
            .unwrap();
        assert_eq!(page.total, PER_WORKER as u64, "user{w}");
    }
}

async fn concurrent_patches_of_one_task_lose_no_update(ctx: Ctx) {
    const WORKERS: usize = 2;
    const PATCHES: usize = 20;
    let store = ctx.store.clone();
    let task = create(&store, "alice", wf("sync", None, None, None)).await;
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for j in 0..PATCHES {
                let patch = TaskPatch {
                    progress: Some((w * PATCHES + j) as i64),
                    warnings: Some(vec![envelope(&format!("W{w}"), &j.to_string())]),
                    ..Default::default()
                }
                .validate()
                .unwrap();
                store.update_task(task.id, patch).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let got = store.get_task(task.id).await.unwrap().unwrap();
    assert_eq!(
        got.warnings.len(),
        WORKERS * PATCHES,
        "a concurrent patch was lost"
    );
    for w in 0..WORKERS {
        let code = format!("W{w}");
        let msgs: Vec<String> = got
            .warnings
            .iter()
            .filter(|x| x.code == code)
            .map(|x| x.msg.clone())
            .collect();
        let expected: Vec<String> = (0..PATCHES).map(|j| j.to_string()).collect();
        assert_eq!(msgs, expected, "worker {w}'s warnings, in its order");
    }
    assert_eq!(got.state, TaskState::Running);
}

async fn concurrent_completions_only_one_wins(ctx: Ctx) {
    const RACERS: usize = 8;
    let store = ctx.store.clone();
    let task = create(&store, "alice", wf("sync", None, None, None)).await;
    let mut handles = Vec::new();
    for r in 0..RACERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let patch = if r % 2 == 0 {
                succeed(Some("racer"), Some(json!(r)))
            } else {
                fail(envelope("Racer", &r.to_string()))
            };
            store.update_task(task.id, patch).await
        }));
    }
    let mut winners = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(t) => winners.push(t),
            Err(e) => assert_eq!(e, StoreError::TaskAlreadyFinal(task.id)),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one completion wins");
    let stored = store.get_task(task.id).await.unwrap().unwrap();
    assert_eq!(stored, winners[0]);
    assert!(stored.state.is_final());
}

async fn concurrent_creates_with_one_id(ctx: Ctx) {
    const RACERS: usize = 8;
    let store = ctx.store.clone();

    // Same body: one Created, the rest AlreadyExisted with the same task.
    let id = Uuid::new_v4();
    let mut handles = Vec::new();
    for _ in 0..RACERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store
                .create_task(
                    new_task(Some(id), "alice", wf("sync", None, None, None)),
                    SITE,
                )
                .await
                .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap());
    }
    let created: Vec<&Task> = outcomes
        .iter()
        .filter_map(|o| match o {
            CreateOutcome::Created(t) => Some(t),
            CreateOutcome::AlreadyExisted(_) => None,
        })
        .collect();
    assert_eq!(created.len(), 1);
    assert!(outcomes.iter().all(|o| o.task() == created[0]));

    // Different bodies: one wins, the rest are rejected.
    let id = Uuid::new_v4();
    let mut handles = Vec::new();
    for r in 0..RACERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let info = wf(&format!("type{r}"), None, None, None);
            store
                .create_task(new_task(Some(id), "alice", info), SITE)
                .await
        }));
    }
    let mut ok = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(CreateOutcome::Created(t)) => ok.push(t),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => assert!(matches!(e, StoreError::Rejected(_)), "{e:?}"),
        }
    }
    assert_eq!(ok.len(), 1);
    assert_eq!(store.get_task(id).await.unwrap().as_ref(), Some(&ok[0]));
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 2);
}

/// Writes that fail share group commits with writes that succeed; each failure is undone
/// alone and every success stays.
async fn failed_writes_do_not_spoil_their_batch(ctx: Ctx) {
    const N: usize = 60;
    let store = ctx.store.clone();
    let finished = create(&store, "alice", wf("sync", None, None, None)).await;
    store
        .update_task(finished.id, succeed(None, None))
        .await
        .unwrap();
    let finished = store.get_task(finished.id).await.unwrap().unwrap();
    let taken = create(&store, "alice", wf("sync", None, None, None)).await;

    let mut handles = Vec::new();
    for i in 0..N {
        let store = store.clone();
        let (fin, taken_id) = (finished.id, taken.id);
        handles.push(tokio::spawn(async move {
            match i % 4 {
                0 => {
                    let t = create(&store, "bob", wf("ok", None, None, Some(&i.to_string()))).await;
                    (i, Ok(t.id))
                }
                1 => {
                    let id = Uuid::new_v4();
                    let r = store.update_task(id, progress(5)).await;
                    assert_eq!(r, Err(StoreError::TaskNotFound(id)));
                    (i, Err(()))
                }
                2 => {
                    let r = store.update_task(fin, progress(5)).await;
                    assert_eq!(r, Err(StoreError::TaskAlreadyFinal(fin)));
                    (i, Err(()))
                }
                _ => {
                    let r = store
                        .create_task(
                            new_task(Some(taken_id), "bob", wf("x", None, None, None)),
                            SITE,
                        )
                        .await;
                    assert!(matches!(r, Err(StoreError::Rejected(_))), "{r:?}");
                    (i, Err(()))
                }
            }
        }));
    }
    let mut created = Vec::new();
    for h in handles {
        if let (_, Ok(id)) = h.await.unwrap() {
            created.push(id);
        }
    }
    assert_eq!(created.len(), N / 4);
    let got = store.get_tasks(&created, None).await.unwrap();
    assert_eq!(ids_of(&got), created, "every successful create is stored");
    assert_eq!(
        store
            .query_tasks(&query("user=bob&limit=0"), None)
            .await
            .unwrap()
            .total,
        (N / 4) as u64
    );
    assert_eq!(
        store.get_task(finished.id).await.unwrap().as_ref(),
        Some(&finished)
    );
    assert_eq!(
        store.get_task(taken.id).await.unwrap().as_ref(),
        Some(&taken)
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Replicas: two handles on one store, as two gateway replicas hold them
// ---------------------------------------------------------------------------------------------

/// Two replicas patch one task at once, two writers each: no patch is lost, every answer is a
/// state the task really went through (each patch applied on top of the one before), times
/// never go back, and both replicas read the same task.
async fn replicas_patch_one_task_lose_no_update(ctx: Ctx) {
    const WRITERS_PER_REPLICA: usize = 2;
    const PATCHES: usize = 15;
    let replicas = [ctx.store.clone(), ctx.replica().await];
    let task = create(&replicas[0], "alice", wf("sync", None, None, None)).await;
    assert_eq!(
        replicas[1].get_task(task.id).await.unwrap().as_ref(),
        Some(&task),
        "a create acknowledged by one replica is seen by the other"
    );
    let mut handles = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for w in 0..WRITERS_PER_REPLICA {
            let store = replica.clone();
            let code = format!("R{r}W{w}");
            handles.push(tokio::spawn(async move {
                let mut answers = Vec::with_capacity(PATCHES);
                for j in 0..PATCHES {
                    let patch = TaskPatch {
                        progress: Some(j as i64),
                        warnings: Some(vec![envelope(&code, &j.to_string())]),
                        ..Default::default()
                    }
                    .validate()
                    .unwrap();
                    answers.push(store.update_task(task.id, patch).await.unwrap());
                }
                answers
            }));
        }
    }
    let mut answers: Vec<Task> = Vec::new();
    for h in handles {
        answers.extend(h.await.unwrap());
    }
    let total = replicas.len() * WRITERS_PER_REPLICA * PATCHES;
    let got = replicas[0].get_task(task.id).await.unwrap().unwrap();
    assert_eq!(
        replicas[1].get_task(task.id).await.unwrap().as_ref(),
        Some(&got),
        "both replicas read the same task"
    );
    assert_eq!(got.warnings.len(), total, "a concurrent patch was lost");
    assert_eq!(got.state, TaskState::Running);
    for r in 0..replicas.len() {
        for w in 0..WRITERS_PER_REPLICA {
            let code = format!("R{r}W{w}");
            let msgs: Vec<String> = got
                .warnings
                .iter()
                .filter(|x| x.code == code)
                .map(|x| x.msg.clone())
                .collect();
            let expected: Vec<String> = (0..PATCHES).map(|j| j.to_string()).collect();
            assert_eq!(msgs, expected, "{code}'s warnings, in its order");
        }
    }
    // Each answer saw a different number of warnings, and each is a prefix of the final list.
    let mut lens: Vec<usize> = answers.iter().map(|t| t.warnings.len()).collect();
    lens.sort_unstable();
    assert_eq!(
        lens,
        (1..=total).collect::<Vec<_>>(),
        "two patches saw one state"
    );
    for t in &answers {
        assert_eq!(
            t.warnings[..],
            got.warnings[..t.warnings.len()],
            "an answer is not a state the task went through"
        );
    }
    answers.sort_by_key(|t| t.warnings.len());
    for pair in answers.windows(2) {
        // Strictly: a waiter holding one state's lastUpdated must see the next as newer.
        assert!(
            pair[0].last_updated < pair[1].last_updated,
            "two states share a lastUpdated, or it went back"
        );
    }
    assert_eq!(answers.last(), Some(&got));
}

/// Completions raced through two replicas, with progress patches among them: exactly one
/// completion wins; afterwards the task is final through either replica.
async fn replicas_race_to_complete_only_one_wins(ctx: Ctx) {
    const RACERS_PER_REPLICA: usize = 4;
    let replicas = [ctx.store.clone(), ctx.replica().await];
    let task = create(&replicas[1], "alice", wf("sync", None, None, None)).await;
    replicas[0]
        .update_task(task.id, progress(10))
        .await
        .unwrap();
    let before = replicas[1]
        .update_task(task.id, warnings(vec![envelope("W", "before")]))
        .await
        .unwrap();
    assert_eq!(
        before.progress, 10,
        "a patch through one replica builds on the other's"
    );

    let mut handles = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for k in 0..RACERS_PER_REPLICA {
            let store = replica.clone();
            handles.push(tokio::spawn(async move {
                let (completes, patch) = match k % 4 {
                    0 => (true, succeed(Some("racer"), Some(json!([r, k])))),
                    1 => (true, fail(envelope("Racer", &format!("{r}/{k}")))),
                    2 => (false, progress(50 + k as i64)),
                    _ => (
                        false,
                        warnings(vec![envelope("Racer", &format!("{r}/{k}"))]),
                    ),
                };
                (completes, store.update_task(task.id, patch).await)
            }));
        }
    }
    let mut winners = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            (true, Ok(t)) => winners.push(t),
            (false, Ok(t)) => assert_eq!(t.state, TaskState::Running),
            (_, Err(e)) => assert_eq!(e, StoreError::TaskAlreadyFinal(task.id)),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one completion wins");
    let done = winners.pop().unwrap();
    assert!(done.state.is_final());
    assert!(done.end_time >= before.last_updated);
    assert_eq!(done.warnings[0], before.warnings[0]);
    for replica in &replicas {
        assert_eq!(
            replica.get_task(task.id).await.unwrap().as_ref(),
            Some(&done)
        );
    }
    // The final-state rule, through either replica.
    for (name, patch) in all_patch_kinds() {
        for (r, replica) in replicas.iter().enumerate() {
            assert_eq!(
                replica.update_task(task.id, patch.clone()).await,
                Err(StoreError::TaskAlreadyFinal(task.id)),
                "{name} through replica {r}"
            );
        }
        for replica in &replicas {
            assert_eq!(
                replica.get_task(task.id).await.unwrap().as_ref(),
                Some(&done),
                "{name}: a final task is unchanged"
            );
        }
    }
}

/// One caller-chosen id created through both replicas at once: one Created, every other answer
/// AlreadyExisted with the same task; a contradicting body is refused through either replica.
async fn replicas_create_one_id_idempotently(ctx: Ctx) {
    const RACERS_PER_REPLICA: usize = 4;
    let replicas = [ctx.store.clone(), ctx.replica().await];
    let id = Uuid::new_v4();
    let info = wf("backup", Some("vm"), Some("vm-7"), None);
    let mut handles = Vec::new();
    for replica in &replicas {
        for _ in 0..RACERS_PER_REPLICA {
            let store = replica.clone();
            let new = new_task(Some(id), "alice", info.clone());
            handles.push(tokio::spawn(async move {
                store.create_task(new, SITE).await.unwrap()
            }));
        }
    }
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap());
    }
    let created: Vec<&Task> = outcomes
        .iter()
        .filter_map(|o| match o {
            CreateOutcome::Created(t) => Some(t),
            CreateOutcome::AlreadyExisted(_) => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "exactly one create inserts");
    let original = created[0].clone();
    assert!(outcomes.iter().all(|o| o.task() == &original));
    for replica in &replicas {
        assert_eq!(
            replica.get_task(id).await.unwrap().as_ref(),
            Some(&original)
        );
        let got = replica
            .create_task(new_task(Some(id), "bob", info.clone()), SITE)
            .await;
        assert!(matches!(got, Err(StoreError::Rejected(_))), "{got:?}");
        assert_eq!(
            replica.get_task(id).await.unwrap().as_ref(),
            Some(&original)
        );
    }
    // After a patch through one replica, a repeated create through the other answers the
    // current task.
    let patched = replicas[0].update_task(id, progress(42)).await.unwrap();
    assert_eq!(
        replicas[1]
            .create_task(new_task(Some(id), "alice", info), "site2")
            .await
            .unwrap(),
        CreateOutcome::AlreadyExisted(patched)
    );
    for replica in &replicas {
        assert_eq!(
            replica.query_tasks(&query(""), None).await.unwrap().total,
            1
        );
    }
}

/// Writers on two replicas at once, each creating through one replica and patching through
/// the other: every write lands, and both replicas answer the same.
async fn replicas_parallel_writers_all_land(ctx: Ctx) {
    const WRITERS_PER_REPLICA: usize = 3;
    const PER_WRITER: usize = 20;
    let replicas = [ctx.store.clone(), ctx.replica().await];
    let mut handles = Vec::new();
    for r in 0..replicas.len() {
        for w in 0..WRITERS_PER_REPLICA {
            let creator = replicas[r].clone();
            let patcher = replicas[1 - r].clone();
            handles.push(tokio::spawn(async move {
                let user = format!("r{r}w{w}");
                let mut mine = Vec::with_capacity(PER_WRITER);
                for j in 0..PER_WRITER {
                    let t = create(&creator, &user, wf(TYPES[j % 3], None, None, None)).await;
                    let patch = if j % 4 == 0 {
                        succeed(None, Some(json!(j)))
                    } else {
                        progress(j as i64)
                    };
                    mine.push(patcher.update_task(t.id, patch).await.unwrap());
                }
                mine
            }));
        }
    }
    let mut all: Vec<Task> = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let n = replicas.len() * WRITERS_PER_REPLICA * PER_WRITER;
    assert_eq!(all.len(), n);
    assert_eq!(all.iter().map(|t| t.id).collect::<HashSet<_>>().len(), n);
    let succeeded = (replicas.len() * WRITERS_PER_REPLICA * PER_WRITER.div_ceil(4)) as u64;
    for replica in &replicas {
        assert_eq!(replica.get_tasks(&ids_of(&all), None).await.unwrap(), all);
        let page = replica
            .query_tasks(&query("limit=1000&sort=user,startTime"), None)
            .await
            .unwrap();
        assert_eq!(page.total, n as u64);
        assert_eq!(
            page.items,
            sorted(all.clone(), &query("sort=user,startTime").sort)
        );
        let done = replica
            .query_tasks(&query("state=SUCCEEDED&limit=0"), None)
            .await
            .unwrap();
        assert_eq!(done.total, succeeded);
        for r in 0..replicas.len() {
            for w in 0..WRITERS_PER_REPLICA {
                let page = replica
                    .query_tasks(&query("limit=0"), Some(&format!("r{r}w{w}")))
                    .await
                    .unwrap();
                assert_eq!(page.total, PER_WRITER as u64);
            }
        }
    }
}

/// Sessions are shared by the replicas: a login, touch, extension, purge or logout through one
/// is seen through the other at once.
async fn replicas_share_sessions(ctx: Ctx) {
    const SITES_PER_REPLICA: usize = 8;
    let [a, b] = [ctx.store.clone(), ctx.replica().await];
    let s = session(1, "alice", vec![Role::User, Role::Writer], 1_000, 1_000);
    a.create_session(s.clone()).await.unwrap();
    assert_eq!(
        b.get_session(s.token_hash).await.unwrap().as_ref(),
        Some(&s)
    );
    assert_eq!(b.count_sessions().await.unwrap(), 1);
    // The same token through the other replica is refused; the first session stays.
    assert!(b
        .create_session(session(1, "mallory", vec![Role::Admin], 5, 5))
        .await
        .is_err());
    assert_eq!(
        a.get_session(s.token_hash).await.unwrap().as_ref(),
        Some(&s)
    );

    // Touches through either replica only move last_seen forward.
    b.touch_session(s.token_hash, 2_000).await.unwrap();
    assert_eq!(
        a.get_session(s.token_hash)
            .await
            .unwrap()
            .unwrap()
            .last_seen,
        2_000
    );
    a.touch_session(s.token_hash, 1_500).await.unwrap();
    assert_eq!(
        b.get_session(s.token_hash)
            .await
            .unwrap()
            .unwrap()
            .last_seen,
        2_000
    );

    // Extensions put through both replicas at once: none lost.
    let mut handles = Vec::new();
    for (r, replica) in [&a, &b].into_iter().enumerate() {
        for i in 0..SITES_PER_REPLICA {
            let store = replica.clone();
            handles.push(tokio::spawn(async move {
                store
                    .put_extension(
                        token(1),
                        remote(&format!("site{r}-{i}"), "alice", &format!("{r}{i}")),
                    )
                    .await
            }));
        }
    }
    for h in handles {
        assert!(h.await.unwrap().unwrap());
    }
    let seen_a = a.get_session(s.token_hash).await.unwrap().unwrap();
    let seen_b = b.get_session(s.token_hash).await.unwrap().unwrap();
    assert_eq!(seen_a, seen_b);
    let sites: HashSet<String> = seen_a.extensions.iter().map(|e| e.site.clone()).collect();
    assert_eq!(seen_a.extensions.len(), 2 * SITES_PER_REPLICA);
    assert_eq!(sites.len(), 2 * SITES_PER_REPLICA);
    assert_eq!(
        (seen_a.user.as_str(), seen_a.created, seen_a.last_seen),
        ("alice", 1_000, 2_000)
    );
    assert_eq!(
        b.remove_extension(s.token_hash, "site0-3").await.unwrap(),
        Some(remote("site0-3", "alice", "03"))
    );
    assert_eq!(
        a.remove_extension(s.token_hash, "site0-3").await.unwrap(),
        None
    );
    let seen_a = a.get_session(s.token_hash).await.unwrap().unwrap();
    assert_eq!(seen_a.extensions.len(), 2 * SITES_PER_REPLICA - 1);
    assert!(!seen_a.extensions.iter().any(|e| e.site == "site0-3"));

    // Expiry: a purge through one replica removes the idle session for both.
    b.create_session(session(2, "bob", vec![Role::User], 1_000, 1_100))
        .await
        .unwrap();
    assert_eq!(a.count_sessions().await.unwrap(), 2);
    assert_eq!(a.purge_sessions(1_500, 0).await.unwrap(), 1);
    assert_eq!(b.get_session(token(2)).await.unwrap(), None);
    assert_eq!(b.count_sessions().await.unwrap(), 1);

    // Logout through one replica ends the session for both.
    assert!(b.delete_session(s.token_hash).await.unwrap());
    assert_eq!(a.get_session(s.token_hash).await.unwrap(), None);
    assert!(!a.delete_session(s.token_hash).await.unwrap());
    assert!(!a
        .put_extension(s.token_hash, remote("site9", "alice", "x"))
        .await
        .unwrap());
    a.touch_session(s.token_hash, 9_000).await.unwrap();
    assert_eq!(b.get_session(s.token_hash).await.unwrap(), None);
    assert_eq!(a.count_sessions().await.unwrap(), 0);
    assert_eq!(b.count_sessions().await.unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// 9. Persistence
// ---------------------------------------------------------------------------------------------

/// The site's instance ID is a v4 UUID made with the store, the same from every handle
/// (replicas) and after reopening, and another store's is different.
async fn instance_id_is_made_once_and_kept(ctx: Ctx) {
    let backend = ctx.backend;
    let id = ctx.store.instance_id().await.unwrap();
    assert_eq!(id.get_version_num(), 4, "{id}");
    assert_eq!(ctx.store.instance_id().await.unwrap(), id);
    assert_eq!(ctx.replica().await.instance_id().await.unwrap(), id);
    let ctx = ctx.reopen().await;
    assert_eq!(ctx.store.instance_id().await.unwrap(), id);
    let other = open(backend).await;
    assert_ne!(other.store.instance_id().await.unwrap(), id);
}

async fn data_survives_reopening(ctx: Ctx) {
    let store = ctx.store.clone();

    let running = create(
        &store,
        "alice",
        wf("sync", Some("vm"), Some("v1"), Some("n")),
    )
    .await;
    let running = store
        .update_task(
            running.id,
            TaskPatch {
                progress: Some(33),
                warnings: Some(vec![envelope("W", "kept")]),
                ..Default::default()
            }
            .validate()
            .unwrap(),
        )
        .await
        .unwrap();
    let ok = create(&store, "bob", wf("backup", None, None, None)).await;
    let ok = store
        .update_task(
            ok.id,
            succeed(Some("Obj"), Some(json!({"k": [1, "two", null]}))),
        )
        .await
        .unwrap();
    let bad = create(&store, "alice", wf("migrate", None, None, None)).await;
    let bad = store
        .update_task(bad.id, fail(envelope("Forbidden", "no")))
        .await
        .unwrap();
    let tasks = vec![running.clone(), ok.clone(), bad.clone()];

    let sessions = vec![
        session(1, "alice", vec![Role::User], 1_000, 2_000),
        SessionRecord {
            extensions: vec![remote("site2", "root", "peer-token")],
            ..session(2, "root", vec![Role::Admin, Role::Writer], 3_000, 3_000)
        },
    ];
    for s in &sessions {
        store.create_session(s.clone()).await.unwrap();
    }
    store.touch_session(token(1), 2_500).await.unwrap();
    let mut sessions_after = sessions.clone();
    sessions_after[0].last_seen = 2_500;

    drop(store);
    let ctx = ctx.reopen().await;
    let store = ctx.store.clone();

    assert_eq!(store.get_tasks(&ids_of(&tasks), None).await.unwrap(), tasks);
    let page = store
        .query_tasks(&query("sort=startTime"), None)
        .await
        .unwrap();
    assert_eq!(page.total, 3);
    assert_eq!(
        page.items,
        sorted(tasks.clone(), &query("sort=startTime").sort)
    );
    assert_eq!(store.count_sessions().await.unwrap(), 2);
    for s in &sessions_after {
        assert_eq!(
            store.get_session(s.token_hash).await.unwrap().as_ref(),
            Some(s)
        );
    }

    // Rules still hold after reopening: final stays final, running can still change, an id
    // is still taken.
    assert_eq!(
        store.update_task(ok.id, progress(1)).await,
        Err(StoreError::TaskAlreadyFinal(ok.id))
    );
    assert_eq!(
        store.update_task(bad.id, progress(1)).await,
        Err(StoreError::TaskAlreadyFinal(bad.id))
    );
    let running2 = store.update_task(running.id, progress(77)).await.unwrap();
    assert_eq!(running2.progress, 77);
    assert_eq!(running2.warnings, running.warnings);
    assert_eq!(
        store
            .create_task(new_task(Some(ok.id), "bob", ok.workflow_info.clone()), SITE)
            .await
            .unwrap(),
        CreateOutcome::AlreadyExisted(ok.clone())
    );
    let late = create(&store, "carol", wf("sync", None, None, None)).await;

    // And a second reopen sees the writes of the second life.
    drop(store);
    let ctx = ctx.reopen().await;
    let store = ctx.store.clone();
    assert_eq!(store.get_task(running.id).await.unwrap(), Some(running2));
    assert_eq!(store.get_task(late.id).await.unwrap(), Some(late));
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 4);
    assert_eq!(store.count_sessions().await.unwrap(), 2);
}

async fn store_handles_are_shared_clones(ctx: Ctx) {
    let Ctx {
        store,
        handle,
        place: _place,
        ..
    } = ctx;
    // A clone of the concrete handle (`EmbeddedStore` or `PostgresStore`), not of the `Arc`.
    let other = handle.shared();
    let t = create(&store, "alice", wf("sync", None, None, None)).await;
    assert_eq!(other.get_task(t.id).await.unwrap(), Some(t.clone()));
    drop(store);
    drop(handle);
    // The clone keeps the threads (embedded) or the pool (PostgreSQL) alive.
    let t2 = other.update_task(t.id, progress(9)).await.unwrap();
    assert_eq!(t2.progress, 9);
    other.ping().await.unwrap();
}

/// Retention's store half: finished tasks that ended before the cutoff go, oldest first, at
/// most `limit` per call; RUNNING tasks and newer finished ones stay; a removed task is
/// unknown to every call afterwards.
async fn purge_removes_old_finished_tasks_only(ctx: Ctx) {
    let store = ctx.store.clone();
    let running = create(&store, "alice", wf("sync", None, None, None)).await;
    let first = create(&store, "alice", wf("sync", None, None, None)).await;
    let second = create(&store, "bob", wf("failover", None, None, None)).await;
    let first = store
        .update_task(first.id, succeed(Some("t"), Some(json!({"n": 1}))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    let second = store
        .update_task(second.id, fail(envelope("Boom", "it broke")))
        .await
        .unwrap();
    assert!(first.end_time < second.end_time);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = now_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let late = create(&store, "carol", wf("sync", None, None, None)).await;
    let late = store
        .update_task(late.id, succeed(None, None))
        .await
        .unwrap();
    assert!(late.end_time > cutoff);
    let size = store.size_bytes().await.unwrap();
    assert!(size > 0, "a store with tasks takes some space");

    // Oldest first, one at a time.
    assert_eq!(
        store.purge_finished(cutoff, 1).await.unwrap(),
        PurgeOutcome::Removed(1)
    );
    assert_eq!(
        store.get_task(first.id).await.unwrap(),
        None,
        "oldest first"
    );
    assert_eq!(
        store.get_task(second.id).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(
        store.purge_finished(cutoff, 10).await.unwrap(),
        PurgeOutcome::Removed(1)
    );
    assert_eq!(
        store.purge_finished(cutoff, 10).await.unwrap(),
        PurgeOutcome::Removed(0)
    );
    for gone in [&first, &second] {
        assert_eq!(store.get_task(gone.id).await.unwrap(), None);
        assert_eq!(
            store.update_task(gone.id, progress(5)).await,
            Err(StoreError::TaskNotFound(gone.id))
        );
    }
    assert_eq!(
        store
            .get_tasks(&[first.id, running.id, late.id], None)
            .await
            .unwrap(),
        vec![running.clone(), late.clone()]
    );
    // Even a cutoff in the far future never takes a RUNNING task.
    assert_eq!(
        store.purge_finished(i64::MAX, 100).await.unwrap(),
        PurgeOutcome::Removed(1)
    );
    let page = store.query_tasks(&query(""), None).await.unwrap();
    assert_eq!((page.total, ids_of(&page.items)), (1, vec![running.id]));
    assert_eq!(store.get_task(running.id).await.unwrap(), Some(running));
    // Space comes back where the backend keeps its own file; either way the call succeeds.
    let mut left = u64::MAX;
    for _ in 0..100 {
        left = store.reclaim_space(1000).await.unwrap();
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "every free page is given back");
}

// ---------------------------------------------------------------------------------------------
// 10. One backend only
// ---------------------------------------------------------------------------------------------

mod embedded_only {
    use super::*;
    use sitegate_store::backup;

    fn sql(dir: &Path) -> rusqlite::Connection {
        rusqlite::Connection::open(dir.join("sitegate.db")).unwrap()
    }

    /// The database file's size after the log is folded into it.
    fn file_size_after_checkpoint(dir: &Path) -> u64 {
        sql(dir)
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        std::fs::metadata(dir.join("sitegate.db")).unwrap().len()
    }

    /// Finished tasks with some bulk each, so that they fill many pages.
    async fn finished_tasks(store: &Arc<dyn Store>, n: usize) -> Vec<Uuid> {
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..n {
            let store = store.clone();
            writes.spawn(async move {
                let t = create(&store, "alice", wf("sync", None, None, None)).await;
                let blob = "x".repeat(2000 + i % 7);
                store
                    .update_task(t.id, succeed(Some("blob"), Some(json!({ "blob": blob }))))
                    .await
                    .unwrap();
                t.id
            });
        }
        writes.join_all().await
    }

    /// A new store can give space back; after a purge, the file shrinks to a fraction.
    #[tokio::test(flavor = "multi_thread")]
    async fn purged_space_goes_back_to_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let auto_vacuum: i64 = sql(dir.path())
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            auto_vacuum, 2,
            "a new store is in incremental auto-vacuum mode"
        );
        let running = create(&store, "alice", wf("sync", None, None, None)).await;
        let ids = finished_tasks(&store, 3000).await;
        let before = file_size_after_checkpoint(dir.path());
        assert!(before > 6_000_000, "3,000 tasks of 2 KB: {before} bytes");
        let mut removed = 0;
        loop {
            match store.purge_finished(i64::MAX, 500).await.unwrap() {
                PurgeOutcome::Removed(0) => break,
                PurgeOutcome::Removed(n) => removed += n,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(removed, ids.len() as u64);
        // Each call gives back up to 256 pages (not one page per call).
        let mut calls = 0;
        while store.reclaim_space(256).await.unwrap() > 0 {
            calls += 1;
        }
        assert!(calls < 40, "{calls} calls to give back about 4,000 pages");
        // The store folds its log back into the file itself once the space is back.
        let after = std::fs::metadata(dir.path().join("sitegate.db"))
            .unwrap()
            .len();
        eprintln!("file: {before} bytes with 3,000 finished tasks, {after} after the purge");
        assert!(after * 10 < before, "{before} -> {after}");
        assert_eq!(store.get_task(running.id).await.unwrap(), Some(running));
    }

    /// A store made before retention existed (no auto-vacuum) is rewritten once on open, with
    /// its data, into a store that can give space back.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_older_store_is_converted_to_incremental_vacuum_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let t = create(&store, "alice", wf("sync", None, None, None)).await;
        drop(store);
        let conn = sql(dir.path());
        conn.execute_batch("PRAGMA auto_vacuum = NONE; VACUUM;")
            .unwrap();
        let mode: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 0);
        drop(conn);
        let store: Arc<dyn Store> = Arc::new(reopen(dir.path()).await);
        let mode: i64 = sql(dir.path())
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 2);
        assert_eq!(store.get_task(t.id).await.unwrap(), Some(t));
    }

    /// A backup of an open store holds its tasks but no sessions, is one self-contained file,
    /// and never overwrites; restore refuses a running site and a store with tasks (unless
    /// forced), and puts the copy in place of whatever was there, old log included.
    #[tokio::test(flavor = "multi_thread")]
    async fn backup_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&site).unwrap());
        let kept = finished_tasks(&store, 50).await;
        store
            .create_session(session(
                1,
                "alice",
                vec![Role::User],
                now_millis(),
                now_millis(),
            ))
            .await
            .unwrap();
        let out = dir.path().join("backup.db");
        let report = backup::backup(&site, &out).unwrap();
        assert_eq!(report.tasks, 50);
        assert_eq!(report.schema_version, 6);
        assert_eq!(report.bytes, std::fs::metadata(&out).unwrap().len());
        assert!(!dir.path().join("backup.db-wal").exists());
        assert!(!dir.path().join("backup.db.partial").exists());
        let sessions: i64 = rusqlite::Connection::open(&out)
            .unwrap()
            .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sessions, 0, "sessions are not backed up");
        match backup::backup(&site, &out) {
            Err(StoreError::Database(msg)) => assert!(msg.contains("never overwrites"), "{msg}"),
            other => panic!("{other:?}"),
        }

        // Written after the backup: gone once it is restored.
        let later = create(&store, "bob", wf("sync", None, None, None)).await;
        match backup::restore(&site, &out, true) {
            Err(StoreError::Database(msg)) => assert!(msg.contains("stop the site"), "{msg}"),
            other => panic!("restore into a running site: {other:?}"),
        }
        drop(store);
        tokio::time::sleep(Duration::from_millis(100)).await;
        match backup::restore(&site, &out, false) {
            Err(StoreError::Database(msg)) => {
                assert!(msg.contains("51 tasks") && msg.contains("--force"), "{msg}")
            }
            other => panic!("restore over tasks without --force: {other:?}"),
        }
        let restored = backup::restore(&site, &out, true).unwrap();
        assert_eq!(restored.tasks, 50);
        let store: Arc<dyn Store> = Arc::new(reopen(&site).await);
        assert_eq!(store.get_task(later.id).await.unwrap(), None);
        assert_eq!(store.get_tasks(&kept, None).await.unwrap().len(), 50);
        assert_eq!(store.count_sessions().await.unwrap(), 0);
        drop(store);

        // Into an empty place, no --force needed.
        let fresh = dir.path().join("fresh");
        backup::restore(&fresh, &out, false).unwrap();
        let store: Arc<dyn Store> = Arc::new(reopen(&fresh).await);
        assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 50);
    }

    /// Restore refuses what is not a whole store of a schema this release knows, and leaves
    /// the site's store as it was.
    #[tokio::test(flavor = "multi_thread")]
    async fn restore_refuses_bad_backups_and_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        drop(EmbeddedStore::open(&site).unwrap());
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"not a database at all, just some bytes").unwrap();
        match backup::restore(&site, &junk, true) {
            Err(StoreError::Database(msg)) => assert!(msg.contains("not a usable"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let source = dir.path().join("source");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&source).unwrap());
        create(&store, "alice", wf("sync", None, None, None)).await;
        let newer = dir.path().join("newer.db");
        backup::backup(&source, &newer).unwrap();
        rusqlite::Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        match backup::restore(&site, &newer, true) {
            Err(StoreError::Database(msg)) => assert!(
                msg.contains("schema version 99") && msg.contains("downgrade is refused"),
                "{msg}"
            ),
            other => panic!("{other:?}"),
        }
        let store: Arc<dyn Store> = Arc::new(reopen(&site).await);
        assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn open_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a").join("b");
        let store = EmbeddedStore::open(&nested).unwrap();
        store.ping().await.unwrap();
        assert!(nested.join("sitegate.db").exists());
        assert!(store.get_task(Uuid::new_v4()).await.unwrap().is_none());
    }

    /// A database written by a newer sitegate is refused, not misread.
    #[tokio::test(flavor = "multi_thread")]
    async fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedStore::open(dir.path()).unwrap());
        let conn = rusqlite::Connection::open(dir.path().join("sitegate.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Database(msg)) => assert!(
                msg.contains("later sitegate") && msg.contains("downgrade is refused"),
                "{msg}"
            ),
            other => panic!("expected a schema version error, got {other:?}"),
        }
    }
}

mod postgres_only {
    use super::*;

    /// While another replica holds the site's purge, a purge does nothing; once it is done,
    /// the next one removes what is due.
    #[tokio::test(flavor = "multi_thread")]
    async fn only_one_replica_purges_at_a_time() {
        let url = new_database().await;
        let store = connect(&url, "site_purge").await;
        let t = create(&store, "alice", wf("sync", None, None, None)).await;
        store.update_task(t.id, succeed(None, None)).await.unwrap();
        let mut other = sql_client(&url).await;
        let held = other.transaction().await.unwrap();
        held.execute(
            "SELECT pg_advisory_xact_lock(hashtext('sitegate purge ' || 'site_purge'))",
            &[],
        )
        .await
        .unwrap();
        assert_eq!(
            store.purge_finished(i64::MAX, 100).await.unwrap(),
            PurgeOutcome::OtherReplicaPurging
        );
        assert!(store.get_task(t.id).await.unwrap().is_some());
        held.commit().await.unwrap();
        assert_eq!(
            store.purge_finished(i64::MAX, 100).await.unwrap(),
            PurgeOutcome::Removed(1)
        );
        assert!(store.size_bytes().await.unwrap() > 0);
    }

    /// How fast a call must fail while PostgreSQL is down.
    const FAIL_FAST: Duration = Duration::from_secs(6);

    async fn connect(url: &str, schema: &str) -> Arc<dyn Store> {
        Arc::new(PostgresStore::connect(url, schema, 2).await.unwrap())
    }

    /// Handles of several stores connecting at once.
    fn all_connected<const N: usize>(
        results: [Result<PostgresStore, StoreError>; N],
    ) -> [Arc<dyn Store>; N] {
        results.map(|r| Arc::new(r.unwrap()) as Arc<dyn Store>)
    }

    /// A plain client on `url`, for looking at what the store did.
    async fn sql_client(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    async fn fails_fast<T: std::fmt::Debug>(
        op: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) {
        let started = Instant::now();
        match tokio::time::timeout(FAIL_FAST, call).await {
            Ok(Err(StoreError::Database(msg))) => {
                eprintln!("{op} during the outage: {msg} ({:?})", started.elapsed());
            }
            Ok(other) => panic!("{op} during the outage: expected a database error, got {other:?}"),
            Err(_) => panic!("{op} during the outage did not fail within {FAIL_FAST:?}"),
        }
    }

    /// PostgreSQL goes away: every call fails fast with a database error, none hangs. It comes
    /// back: the same store handle serves again, with every acknowledged write intact.
    #[tokio::test(flavor = "multi_thread")]
    async fn store_unavailable_fails_fast_and_recovers() {
        // A cluster of its own: stopping the shared one would fail the other tests.
        let cluster = tokio::task::spawn_blocking(|| {
            let cluster = PgCluster::start();
            stop_at_exit(&cluster);
            Arc::new(cluster)
        })
        .await
        .unwrap();
        let pg = cluster.clone();
        let url = tokio::task::spawn_blocking(move || pg.create_database())
            .await
            .unwrap();
        let store: Arc<dyn Store> =
            Arc::new(PostgresStore::connect(&url, SCHEMA, POOL).await.unwrap());
        let task = create(&store, "alice", wf("sync", Some("vm"), None, None)).await;
        let task = store.update_task(task.id, progress(30)).await.unwrap();
        let s = session(1, "alice", vec![Role::User], 1_000, 1_000);
        store.create_session(s.clone()).await.unwrap();
        // Several connections in the pool, all of which the outage breaks.
        let mut reads = Vec::new();
        for _ in 0..POOL {
            let store = store.clone();
            reads.push(tokio::spawn(async move { store.get_task(task.id).await }));
        }
        for r in reads {
            assert_eq!(r.await.unwrap().unwrap().as_ref(), Some(&task));
        }
        store.ping().await.unwrap();

        let pg = cluster.clone();
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap();

        fails_fast("ping", store.ping()).await;
        fails_fast("get_task", store.get_task(task.id)).await;
        fails_fast("get_tasks", store.get_tasks(&[task.id], None)).await;
        fails_fast("query_tasks", store.query_tasks(&query(""), None)).await;
        fails_fast(
            "create_task",
            store.create_task(new_task(None, "bob", wf("sync", None, None, None)), SITE),
        )
        .await;
        fails_fast("update_task", store.update_task(task.id, progress(50))).await;
        fails_fast("get_session", store.get_session(s.token_hash)).await;
        fails_fast("touch_session", store.touch_session(s.token_hash, 5_000)).await;
        fails_fast("count_sessions", store.count_sessions()).await;
        // A burst larger than the pool: every call fails fast, none waits on the pool.
        let mut burst = Vec::new();
        for i in 0..2 * POOL {
            let store = store.clone();
            burst.push(tokio::spawn(async move {
                fails_fast(&format!("ping {i} of a burst"), store.ping()).await;
            }));
        }
        for b in burst {
            b.await.unwrap();
        }

        let pg = cluster.clone();
        tokio::task::spawn_blocking(move || pg.restart())
            .await
            .unwrap();

        // The same handle, no reconnect: it serves again at once.
        store.ping().await.unwrap();
        assert_eq!(store.get_task(task.id).await.unwrap().as_ref(), Some(&task));
        assert_eq!(
            store.get_session(s.token_hash).await.unwrap().as_ref(),
            Some(&s)
        );
        assert_eq!(store.count_sessions().await.unwrap(), 1);
        let page = store.query_tasks(&query(""), None).await.unwrap();
        assert_eq!((page.total, page.items), (1, vec![task.clone()]));
        let later = store.update_task(task.id, progress(60)).await.unwrap();
        assert_eq!(later.progress, 60);
        let bob = create(&store, "bob", wf("sync", None, None, None)).await;
        assert_eq!(store.get_task(bob.id).await.unwrap(), Some(bob));
        let mut reads = Vec::new();
        for _ in 0..2 * POOL {
            let store = store.clone();
            reads.push(tokio::spawn(async move { store.ping().await }));
        }
        for r in reads {
            r.await.unwrap().unwrap();
        }

        drop(store);
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .unwrap();
    }

    /// Connecting migrates once: again and again on one schema, and several replicas at once
    /// on a fresh schema (the advisory lock serialises them), all succeed and share the data.
    #[tokio::test(flavor = "multi_thread")]
    async fn migrations_are_idempotent_and_race_free() {
        let url = new_database().await;
        let first = connect(&url, "site_seq").await;
        let t = create(&first, "alice", wf("sync", None, None, None)).await;
        let second = connect(&url, "site_seq").await;
        assert_eq!(second.get_task(t.id).await.unwrap().as_ref(), Some(&t));
        drop(first);
        drop(second);
        let third = connect(&url, "site_seq").await;
        assert_eq!(third.get_task(t.id).await.unwrap().as_ref(), Some(&t));
        assert_eq!(third.query_tasks(&query(""), None).await.unwrap().total, 1);

        let mut schemas = vec!["site_seq".to_owned()];
        for round in 0..3 {
            let schema = format!("site_race{round}");
            let (a, b, c) = tokio::join!(
                PostgresStore::connect(&url, &schema, 2),
                PostgresStore::connect(&url, &schema, 2),
                PostgresStore::connect(&url, &schema, 2),
            );
            let [a, b, c] = all_connected([a, b, c]);
            let t = create(&a, "alice", wf("sync", None, None, None)).await;
            assert_eq!(
                b.get_task(t.id).await.unwrap().as_ref(),
                Some(&t),
                "{schema}"
            );
            assert_eq!(c.query_tasks(&query(""), None).await.unwrap().total, 1);
            schemas.push(schema);
        }

        // Each schema records each version once: 1, 2, ... n, the same n everywhere.
        let client = sql_client(&url).await;
        let mut first_versions: Option<Vec<i32>> = None;
        for schema in &schemas {
            let versions: Vec<i32> = client
                .query(
                    &format!("SELECT version FROM {schema}.schema_migrations ORDER BY version"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(!versions.is_empty(), "{schema}");
            assert_eq!(
                versions,
                (1..=versions.len() as i32).collect::<Vec<_>>(),
                "{schema}"
            );
            match &first_versions {
                None => first_versions = Some(versions),
                Some(v) => assert_eq!(&versions, v, "{schema}"),
            }
        }
    }

    /// Connecting creates a missing schema with the store's tables in it (not in `public`);
    /// schema names that would need quoting are refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn connect_creates_missing_schema() {
        let url = new_database().await;
        let client = sql_client(&url).await;
        let tables = |schema: &'static str| {
            let client = &client;
            async move {
                client
                    .query(
                        "SELECT table_name::TEXT FROM information_schema.tables
                         WHERE table_schema = $1 ORDER BY 1",
                        &[&schema],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<String>>()
            }
        };
        assert!(tables("brand_new").await.is_empty());
        let store = connect(&url, "brand_new").await;
        store.ping().await.unwrap();
        assert!(store.get_task(Uuid::new_v4()).await.unwrap().is_none());
        assert_eq!(store.count_sessions().await.unwrap(), 0);
        assert_eq!(
            tables("brand_new").await,
            vec!["schema_migrations", "sessions", "site_meta", "tasks"]
        );
        assert!(tables("public").await.is_empty());

        for bad in ["", "Site1", "1abc", "a-b", "a;drop table x", "a b"] {
            let got = PostgresStore::connect(&url, bad, 1).await;
            assert!(
                matches!(got, Err(StoreError::Database(_))),
                "{bad:?}: {got:?}"
            );
        }
    }

    /// A schema written by a newer sitegate is refused, not misread.
    #[tokio::test(flavor = "multi_thread")]
    async fn refuses_a_newer_schema() {
        let url = new_database().await;
        drop(connect(&url, "site_new").await);
        sql_client(&url)
            .await
            .execute(
                "INSERT INTO site_new.schema_migrations (version) VALUES (99)",
                &[],
            )
            .await
            .unwrap();
        match PostgresStore::connect(&url, "site_new", 2).await {
            Err(StoreError::Database(msg)) => assert!(
                msg.contains("later sitegate") && msg.contains("downgrade is refused"),
                "{msg}"
            ),
            other => panic!("expected a schema version error, got {other:?}"),
        }
    }

    /// Two sites in one database, each in its own schema, see nothing of each other: not
    /// tasks (even under one id), not sessions (even under one token).
    #[tokio::test(flavor = "multi_thread")]
    async fn sites_in_separate_schemas_are_isolated() {
        let url = new_database().await;
        let (site1, site2) = tokio::join!(
            PostgresStore::connect(&url, "sitegate_site1", POOL),
            PostgresStore::connect(&url, "sitegate_site2", POOL),
        );
        let [site1, site2] = all_connected([site1, site2]);

        // One caller-chosen id is a different task in each site.
        let id = Uuid::new_v4();
        let CreateOutcome::Created(t1) = site1
            .create_task(
                new_task(Some(id), "alice", wf("sync", None, None, None)),
                "site1",
            )
            .await
            .unwrap()
        else {
            panic!("site1 did not create its task");
        };
        let CreateOutcome::Created(t2) = site2
            .create_task(
                new_task(Some(id), "bob", wf("backup", Some("vm"), None, None)),
                "site2",
            )
            .await
            .unwrap()
        else {
            panic!("site2 found site1's task");
        };
        let carol = create(&site1, "carol", wf("sync", None, None, None)).await;
        let mut dave = Vec::new();
        for _ in 0..3 {
            dave.push(create(&site2, "dave", wf("migrate", None, None, None)).await);
        }

        let all1 = site1.query_tasks(&query("sort=user"), None).await.unwrap();
        assert_eq!(
            (all1.total, all1.items),
            (2, vec![t1.clone(), carol.clone()])
        );
        let all2 = site2
            .query_tasks(&query("sort=user,startTime"), None)
            .await
            .unwrap();
        let mut expected2 = vec![t2.clone()];
        expected2.extend(dave.iter().cloned());
        let expected2 = sorted(expected2, &query("sort=user,startTime").sort);
        assert_eq!((all2.total, all2.items), (4, expected2));
        assert_eq!(site2.get_task(carol.id).await.unwrap(), None);
        assert_eq!(site1.get_task(dave[0].id).await.unwrap(), None);
        assert_eq!(
            site2
                .get_tasks(&[carol.id, id, dave[1].id], None)
                .await
                .unwrap(),
            vec![t2.clone(), dave[1].clone()]
        );
        assert_eq!(
            site2
                .query_tasks(&query("user=carol"), None)
                .await
                .unwrap()
                .total,
            0
        );
        assert_eq!(
            site2.update_task(carol.id, progress(5)).await,
            Err(StoreError::TaskNotFound(carol.id))
        );

        // Finishing the task in one site leaves the other site's task of that id running.
        let done = site1.update_task(id, succeed(None, None)).await.unwrap();
        assert_eq!(site1.get_task(id).await.unwrap(), Some(done));
        assert_eq!(site2.get_task(id).await.unwrap().as_ref(), Some(&t2));
        let t2b = site2.update_task(id, progress(9)).await.unwrap();
        assert_eq!(t2b.progress, 9);

        // Sessions: one token, two sites, two sessions.
        let s1 = session(1, "alice", vec![Role::User], 1_000, 1_000);
        site1.create_session(s1.clone()).await.unwrap();
        assert_eq!(site2.get_session(s1.token_hash).await.unwrap(), None);
        assert_eq!(site2.count_sessions().await.unwrap(), 0);
        let s2 = session(1, "bob", vec![Role::Admin], 2_000, 2_000);
        site2.create_session(s2.clone()).await.unwrap();
        assert_eq!(
            site1.get_session(token(1)).await.unwrap().as_ref(),
            Some(&s1)
        );
        assert_eq!(
            site2.get_session(token(1)).await.unwrap().as_ref(),
            Some(&s2)
        );
        assert_eq!(site2.purge_sessions(i64::MAX, i64::MAX).await.unwrap(), 1);
        assert_eq!(
            site1.get_session(token(1)).await.unwrap().as_ref(),
            Some(&s1)
        );
        assert!(!site2.delete_session(token(1)).await.unwrap());
        assert_eq!(site1.count_sessions().await.unwrap(), 1);
    }
}

/// The PostgreSQL cases run in databases whose default collation is the cluster's (`C.UTF-8`
/// here, bytewise anyway). Deployments often default to a linguistic collation, where
/// "alice" < "Zed": the store's columns must still sort by bytes, as the embedded store does.
mod postgres_linguistic_collation {
    use super::*;

    /// A fresh database whose default collation is ICU `en-US`, and a store on it.
    async fn linguistic_ctx() -> Ctx {
        let admin = tokio::task::spawn_blocking(|| shared_cluster().admin_url())
            .await
            .unwrap();
        let name = format!("icu_{}", Uuid::new_v4().simple());
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8'
                 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            ))
            .await
            .unwrap();
        let url = tokio::task::spawn_blocking(move || shared_cluster().url(&name))
            .await
            .unwrap();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let linguistic: bool = client
            .query_one("SELECT 'alice' < 'Zed' AND 'ab' < 'aB'", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            linguistic,
            "the database's default collation is not linguistic"
        );
        let store = PostgresStore::connect(&url, SCHEMA, POOL).await.unwrap();
        Ctx::new(
            Backend::Postgres,
            Handle::Postgres(store),
            Place::Database { url },
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn query_text_sorts_bytewise_and_filters_exactly() {
        super::query_text_sorts_bytewise_and_filters_exactly(linguistic_ctx().await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn query_sorts_with_id_tiebreak() {
        super::query_sorts_with_id_tiebreak(linguistic_ctx().await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn query_every_sort_pages_with_total() {
        super::query_every_sort_pages_with_total(linguistic_ctx().await).await;
    }
}
