//! Integration tests of the embedded SQLite store, through the `TaskStore` and `SessionStore`
//! traits only. Every expected answer is computed here from the seeded data, never read back
//! from the SQL the store builds.

#![allow(clippy::unwrap_used)]

use std::cmp::Ordering;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sitegate_model::query::{SortField, SortKey, TaskQuery};
use sitegate_model::session::{RemoteSession, Role};
use sitegate_model::task::{NewTask, Task, TaskPatch, TaskState, ValidPatch, WorkflowInfo};
use sitegate_model::{ErrorEnvelope, NOT_YET};
use sitegate_store::{
    now_millis, CreateOutcome, EmbeddedStore, SessionRecord, SessionStore, StoreError, TaskStore,
    TokenHash,
};
use tempfile::TempDir;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SITE: &str = "site1";

fn open_new() -> (TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (dir, store)
}

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

async fn create(store: &EmbeddedStore, user: &str, info: WorkflowInfo) -> Task {
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
    }
}

fn remote(site: &str, user: &str, tok: &str) -> RemoteSession {
    RemoteSession {
        site: site.to_owned(),
        user: user.to_owned(),
        token: tok.to_owned(),
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
    _dir: TempDir,
    store: EmbeddedStore,
    /// Every task as the store last returned it, in creation order.
    tasks: Vec<Task>,
}

/// 30 tasks: users alice (i even) and bob (i odd); three types; resource fields with NULLs;
/// i%5==2 SUCCEEDED, i%5==3 FAILED, the rest RUNNING (i%5==4 with progress and a warning).
/// Creates sleep 2 ms after every odd index, so start times spread out yet pairs may tie;
/// tasks finish in reverse creation order so endTime order differs from startTime order.
async fn seed() -> Seeded {
    let (dir, store) = open_new();
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
        _dir: dir,
        store,
        tasks,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. create_task / get_task
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn create_task_starts_running_and_reads_back() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn create_without_id_gives_distinct_ids() {
    let (_dir, store) = open_new();
    let info = wf("sync", None, None, None);
    let a = create(&store, "alice", info.clone()).await;
    let b = create(&store, "alice", info).await;
    assert_ne!(a.id, b.id, "two creates without an id are two tasks");
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 2);
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

// ---------------------------------------------------------------------------------------------
// 2. Idempotent create
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn create_with_existing_id_is_idempotent_or_rejected() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn update_task_progress_warnings_and_success() {
    let (_dir, store) = open_new();
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
    assert!(t1.last_updated >= t0.last_updated);
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
    assert!(t2.last_updated >= t1.last_updated);
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

#[tokio::test(flavor = "multi_thread")]
async fn update_task_failure_keeps_error() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn update_task_success_without_result_and_with_progress() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn update_unknown_task_is_not_found() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn warnings_are_capped_per_task_atomically() {
    use sitegate_model::task::{MAX_WARNINGS_PER_PATCH, MAX_WARNINGS_PER_TASK};
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn query_filters_match_an_independent_filter() {
    let s = seed().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn query_sorts_with_id_tiebreak() {
    let s = seed().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn query_paging_concatenates_to_the_full_list() {
    let s = seed().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn query_owner_restricts_to_one_user() {
    let s = seed().await;
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

#[tokio::test(flavor = "multi_thread")]
async fn get_tasks_keeps_order_and_drops_missing_and_foreign() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn sessions_round_trip() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn touch_session_only_moves_forward() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn delete_session_reports_whether_it_deleted() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn purge_sessions_removes_idle_and_old_only() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn session_extensions_put_replace_remove() {
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_extension_puts_lose_no_site() {
    const SITES: usize = 16;
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_and_patches_all_land() {
    const WORKERS: usize = 8;
    const PER_WORKER: usize = 50;
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_patches_of_one_task_lose_no_update() {
    const WORKERS: usize = 2;
    const PATCHES: usize = 20;
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_completions_only_one_wins() {
    const RACERS: usize = 8;
    let (_dir, store) = open_new();
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

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_with_one_id() {
    const RACERS: usize = 8;
    let (_dir, store) = open_new();

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
#[tokio::test(flavor = "multi_thread")]
async fn failed_writes_do_not_spoil_their_batch() {
    const N: usize = 60;
    let (_dir, store) = open_new();
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
// 8. Persistence
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();

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
    let store = reopen(dir.path()).await;

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
    let store = reopen(dir.path()).await;
    assert_eq!(store.get_task(running.id).await.unwrap(), Some(running2));
    assert_eq!(store.get_task(late.id).await.unwrap(), Some(late));
    assert_eq!(store.query_tasks(&query(""), None).await.unwrap().total, 4);
    assert_eq!(store.count_sessions().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn store_handles_are_shared_clones() {
    let (_dir, store) = open_new();
    let other = store.clone();
    let t = create(&store, "alice", wf("sync", None, None, None)).await;
    assert_eq!(other.get_task(t.id).await.unwrap(), Some(t.clone()));
    drop(store);
    // The clone keeps the threads alive.
    let t2 = other.update_task(t.id, progress(9)).await.unwrap();
    assert_eq!(t2.progress, 9);
    other.ping().await.unwrap();
}
