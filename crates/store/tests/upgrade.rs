//! Upgrades of the embedded store: a store written by an earlier release (a fixture under
//! `tests/fixtures/`, never edited) opens with this one, migrates, and answers exactly what it
//! answered when written; a store written by a later release is refused, naming both versions.
//!
//! Each schema version adds a fixture: `store_written_now_reopens_the_same` writes one from
//! this release into a temporary directory every run (and checks it), and with
//! `SITEGATE_WRITE_STORE_FIXTURE=1` also keeps it as `tests/fixtures/embedded-schema-<N>`.
//! Commit the new directory with the schema change; every later release is then checked
//! against it.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sitegate_model::query::TaskQuery;
use sitegate_model::task::{NewTask, TaskPatch, TaskState, WorkflowInfo};
use sitegate_model::ErrorEnvelope;
use sitegate_store::{EmbeddedStore, Store, StoreError, TaskStore};

const DB_FILE: &str = "sitegate.db";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn schema_version(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).expect("open the file");
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version")
}

fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("store directory");
    std::fs::copy(from.join(DB_FILE), to.join(DB_FILE)).expect("copy the store");
}

fn queries() -> Vec<&'static str> {
    vec![
        "sort=startTime",
        "state=RUNNING&sort=startTime",
        "user=bob&sort=-startTime",
        "resourceType=vm,disk&sort=id",
        "sourceOrg=Org1&sort=id",
    ]
}

/// What the store answers: every task by ID, each query's page, the instance ID.
async fn answers(store: &dyn Store, ids: &[uuid::Uuid]) -> Value {
    let tasks = store.get_tasks(ids, None).await.expect("tasks");
    let mut pages = serde_json::Map::new();
    for q in queries() {
        let page = store
            .query_tasks(&TaskQuery::parse(Some(q)).expect("query"), None)
            .await
            .expect("page");
        let page_ids: Vec<String> = page.items.iter().map(|t| t.id.to_string()).collect();
        pages.insert(q.to_owned(), json!({"ids": page_ids, "total": page.total}));
    }
    json!({
        "tasks": tasks,
        "pages": pages,
        "instanceId": store.instance_id().await.expect("instance id"),
    })
}

/// A store with tasks in every state, of two users, with warnings, results, errors and orgs.
async fn write_store(dir: &Path) -> Vec<uuid::Uuid> {
    let store = EmbeddedStore::open(dir).expect("open");
    let mut ids = Vec::new();
    let kinds = [
        ("alice", "vm", None),
        ("bob", "disk", Some("Org1")),
        ("alice", "net", Some("Org2")),
        ("bob", "vm", None),
    ];
    for (i, (user, rtype, org)) in kinds.into_iter().enumerate() {
        let created = store
            .create_task(
                NewTask {
                    id: None,
                    user: user.into(),
                    workflow_info: WorkflowInfo {
                        workflow_type: "replication-sync".into(),
                        resource_type: Some(rtype.into()),
                        resource_id: Some(format!("res-{i}")),
                        resource_name: Some(format!("name {i}")),
                    },
                    source_org: org.map(str::to_owned),
                    destination_org: org.map(|o| format!("{o}-dr")),
                },
                "site1",
            )
            .await
            .expect("create");
        ids.push(created.task().id);
    }
    let envelope = |code: &str| ErrorEnvelope {
        code: code.into(),
        msg: format!("{code} happened"),
        args: vec!["a".into()],
        stacktrace: String::new(),
    };
    let patches = [
        TaskPatch {
            progress: Some(40),
            warnings: Some(vec![envelope("SlowLink")]),
            ..TaskPatch::default()
        },
        TaskPatch {
            state: Some(TaskState::Succeeded),
            result_type: Some("Obj".into()),
            result: Some(json!({"k": [1, 2.5, "three", null]})),
            ..TaskPatch::default()
        },
        TaskPatch {
            state: Some(TaskState::Failed),
            error: Some(envelope("ReplicationError")),
            ..TaskPatch::default()
        },
    ];
    for (id, patch) in ids.iter().zip(patches) {
        store
            .update_task(*id, patch.validate().expect("valid patch"))
            .await
            .expect("patch");
    }
    drop(store);
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn store_written_now_reopens_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = write_store(dir.path()).await;
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    let written = answers(&store, &ids).await;
    drop(store);
    assert_eq!(written["tasks"].as_array().map(Vec::len), Some(4));
    assert_eq!(written["pages"]["state=RUNNING&sort=startTime"]["total"], 2);
    let again = EmbeddedStore::open(dir.path()).expect("reopen");
    assert_eq!(answers(&again, &ids).await, written);
    drop(again);

    if std::env::var_os("SITEGATE_WRITE_STORE_FIXTURE").is_some() {
        let version = schema_version(dir.path());
        let keep = fixtures().join(format!("embedded-schema-{version}"));
        std::fs::create_dir_all(&keep).expect("fixture directory");
        // One self-contained file: a consistent copy with the log folded in.
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).expect("open the file");
        conn.execute("VACUUM INTO ?1", [keep.join(DB_FILE).display().to_string()])
            .expect("VACUUM INTO the fixture");
        let expected = json!({"ids": ids, "answers": written});
        std::fs::write(
            keep.join("expected.json"),
            serde_json::to_string_pretty(&expected).expect("json"),
        )
        .expect("write expected.json");
        assert!(!keep.join(format!("{DB_FILE}-wal")).exists());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stores_written_by_earlier_releases_open_and_answer_the_same() {
    let mut checked = 0;
    let current = {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(EmbeddedStore::open(dir.path()).expect("open"));
        schema_version(dir.path())
    };
    for entry in std::fs::read_dir(fixtures()).expect("tests/fixtures") {
        let fixture = entry.expect("entry").path();
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture.join("expected.json")).expect("expected.json"),
        )
        .expect("expected.json parses");
        let ids: Vec<uuid::Uuid> =
            serde_json::from_value(expected["ids"].clone()).expect("the fixture's ids");
        let dir = tempfile::tempdir().expect("tempdir");
        copy_store(&fixture, dir.path());
        assert!(
            schema_version(dir.path()) <= current,
            "{}",
            fixture.display()
        );
        let store = EmbeddedStore::open(dir.path())
            .unwrap_or_else(|e| panic!("{} does not open: {e}", fixture.display()));
        assert_eq!(
            answers(&store, &ids).await,
            expected["answers"],
            "{} answers differently",
            fixture.display()
        );
        drop(store);
        assert_eq!(
            schema_version(dir.path()),
            current,
            "migrated to this schema"
        );
        checked += 1;
    }
    assert!(checked >= 1, "no fixture in {}", fixtures().display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_from_a_later_release_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(EmbeddedStore::open(dir.path()).expect("open"));
    let current = schema_version(dir.path());
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).expect("open the file");
    conn.pragma_update(None, "user_version", current + 3)
        .expect("set user_version");
    drop(conn);
    let Err(StoreError::Database(msg)) = EmbeddedStore::open(dir.path()) else {
        panic!("a store from a later release was not refused as such");
    };
    assert!(
        msg.contains(&format!("schema version {}", current + 3))
            && msg.contains(&format!("schema version {current}"))
            && msg.contains(env!("CARGO_PKG_VERSION"))
            && msg.contains("downgrade is refused"),
        "{msg}"
    );
}
