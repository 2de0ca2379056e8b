//! Running a site for years, with real `sitegate` processes: task retention removes finished
//! tasks while clients read and write (their p99 stays within 2x, RUNNING tasks all stay, the
//! file shrinks), and `sitegate backup` copies a store under eight concurrent writers into a
//! file that `sitegate restore` puts in place for a new site, which then holds every write
//! acknowledged before the backup began.
//!
//! The tens of thousands of finished tasks are written straight into the site's store (the
//! `sitegate-store` crate, with the site stopped), which takes seconds where the API would
//! take minutes; everything measured goes through the API of a running site.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sitegate_model::query::TaskQuery;
use sitegate_model::task::{NewTask, TaskPatch, TaskState, WorkflowInfo};
use sitegate_store::{EmbeddedStore, TaskStore};
use sitegate_testkit::site as support;
use support::{Federation, Site};
use uuid::Uuid;

/// Finished tasks the purge removes.
const FINISHED: usize = 20_000;
/// RUNNING tasks, which must all survive.
const RUNNING: usize = 300;
/// Client loops during each measured phase: half read, half write.
const CLIENTS: usize = 4;

/// The two tests measure latency and load the machine: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn store_dir(fed: &Federation, site: &str) -> PathBuf {
    fed.fed_dir().join("data").join(site)
}

/// Writes `finished` finished and `running` running tasks into the (stopped) site's store;
/// returns the running tasks' IDs (up to 1,000) and a few finished ones'.
async fn seed(dir: &Path, finished: usize, running: usize) -> (Vec<Uuid>, Vec<Uuid>) {
    let (finished_count, running_count) = (finished, running);
    let store = Arc::new(EmbeddedStore::open(dir).unwrap());
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..finished + running {
        let store = store.clone();
        writes.spawn(async move {
            let new = NewTask {
                id: None,
                user: "svc".into(),
                workflow_info: WorkflowInfo {
                    workflow_type: "sync".into(),
                    resource_type: Some("vm".into()),
                    resource_id: Some(format!("vm-{i}")),
                    resource_name: Some(format!("machine {i}")),
                },
                source_org: None,
                destination_org: None,
            };
            let task = store.create_task(new, "site1").await.unwrap();
            if i >= running {
                let id = task.task().id;
                let done = TaskPatch {
                    state: Some(TaskState::Succeeded),
                    result_type: Some("string".into()),
                    result: Some(json!("x".repeat(600))),
                    ..Default::default()
                }
                .validate()
                .unwrap();
                store.update_task(id, done).await.unwrap();
            }
        });
        // Bounded in flight: the writer thread batches them anyway.
        while writes.len() >= 256 {
            writes.join_next().await.unwrap().unwrap();
        }
    }
    writes.join_all().await;
    // The IDs are read back from the store: it is the one that made them.
    let page = store
        .query_tasks(
            &TaskQuery::parse(Some("limit=1000&state=RUNNING")).unwrap(),
            None,
        )
        .await
        .unwrap();
    let running: Vec<Uuid> = page.items.iter().map(|t| t.id).collect();
    let finished = store
        .query_tasks(
            &TaskQuery::parse(Some("limit=10&state=SUCCEEDED")).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(finished.total as usize, finished_count);
    assert_eq!(page.total as usize, running_count);
    (running, finished.items.iter().map(|t| t.id).collect())
}

/// Latencies of one kind of request, in microseconds.
#[derive(Default)]
struct Samples(Mutex<Vec<u64>>);

impl Samples {
    fn add(&self, d: Duration) {
        self.0.lock().unwrap().push(d.as_micros() as u64);
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn p99(&self) -> Duration {
        let mut v = self.0.lock().unwrap().clone();
        assert!(!v.is_empty());
        v.sort_unstable();
        Duration::from_micros(v[(v.len() * 99 / 100).min(v.len() - 1)])
    }
}

/// Reads (a RUNNING task, and a page of the list) and writes (create, then finish) until
/// `stop`; every answer must be a success.
async fn load(
    site: &Site,
    token: &str,
    running: &[Uuid],
    stop: Arc<AtomicBool>,
) -> (Samples, Samples) {
    let reads = Arc::new(Samples::default());
    let writes = Arc::new(Samples::default());
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let base = site.url("");
        let token = token.to_owned();
        let running = running.to_vec();
        let (reads, writes, stop) = (reads.clone(), writes.clone(), stop.clone());
        clients.spawn(async move {
            let http = support::http_client();
            let mut i = c;
            while !stop.load(Ordering::SeqCst) {
                i += CLIENTS;
                let started = Instant::now();
                if c % 2 == 0 {
                    let url = if i % 4 == 0 {
                        format!(
                            "{base}/tasks?state=RUNNING&limit=20&offset={}",
                            20 * (i % 10)
                        )
                    } else {
                        format!("{base}/tasks/{}", running[i % running.len()])
                    };
                    let r = http
                        .get(url)
                        .header("X-VCAV-Auth", &token)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                    reads.add(started.elapsed());
                } else {
                    let r = http
                        .post(format!("{base}/tasks"))
                        .header("X-VCAV-Auth", &token)
                        .json(&support::new_task("svc", "sync", "vm", "vm-x", "x"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                    let task: serde_json::Value = r.json().await.unwrap();
                    writes.add(started.elapsed());
                    let started = Instant::now();
                    let r = http
                        .patch(format!("{base}/tasks/{}", support::id_of(&task)))
                        .header("X-VCAV-Auth", &token)
                        .json(&json!({"state": "SUCCEEDED"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                    writes.add(started.elapsed());
                }
            }
        });
    }
    clients.join_all().await;
    (
        Arc::try_unwrap(reads).ok().unwrap(),
        Arc::try_unwrap(writes).ok().unwrap(),
    )
}

/// The database file's size (its write-ahead log is folded into it at a clean stop, and
/// is bounded by `journal_size_limit` while the site runs).
fn store_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("sitegate.db"))
        .map(|m| m.len())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_finished_tasks_while_clients_stay_fast() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let fed = Federation::init(&["site1"]);
    let dir = store_dir(&fed, "site1");
    let seeding = Instant::now();
    let (running, some_finished) = seed(&dir, FINISHED, RUNNING).await;
    eprintln!(
        "seeded {FINISHED} finished and {RUNNING} running tasks in {:?}",
        seeding.elapsed()
    );

    // Before: the same site, the same data, retention off.
    let mut site = fed.site("site1");
    site.env
        .push(("SITEGATE_STORE__TASK_RETENTION".into(), "0".into()));
    site.start().await;
    let token = site.login("svc").await;
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(6)).await;
            stop.store(true, Ordering::SeqCst);
        })
    };
    let (reads_before, writes_before) = load(&site, &token, &running, stop).await;
    stopper.await.unwrap();
    assert_eq!(
        site.metric("sitegate_tasks_purged_total", &[])
            .await
            .unwrap_or(0.0),
        0.0
    );
    let size_metric_before = site
        .metric("sitegate_store_size_bytes", &[])
        .await
        .unwrap_or(0.0);
    assert!(size_metric_before > 0.0, "the store's size is on /metrics");
    site.terminate().await;
    let bytes_before = store_bytes(&dir);

    // During: retention 2 s, so the purge starts as the site does.
    site.env = vec![("SITEGATE_STORE__TASK_RETENTION".into(), "2s".into())];
    site.start().await;
    let token = site.login("svc").await;
    let stop = Arc::new(AtomicBool::new(false));
    let purge_started = Instant::now();
    let watcher = {
        let stop = stop.clone();
        let site = fed.site("site1");
        tokio::spawn(async move {
            // Until every seeded finished task (and the phase before's) is gone.
            loop {
                let purged = site
                    .metric("sitegate_tasks_purged_total", &[])
                    .await
                    .unwrap_or(0.0);
                if purged >= FINISHED as f64 {
                    break;
                }
                assert!(
                    purge_started.elapsed() < Duration::from_secs(240),
                    "the purge did not finish in 4 minutes ({purged} removed)"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.store(true, Ordering::SeqCst);
            purge_started.elapsed()
        })
    };
    let (reads_during, writes_during) = load(&site, &token, &running, stop).await;
    let purge_took = watcher.await.unwrap();
    eprintln!(
        "purge of {FINISHED} tasks took {purge_took:?}; reads p99 {:?} before ({} samples), {:?} \
         during ({}); writes p99 {:?} before ({}), {:?} during ({})",
        reads_before.p99(),
        reads_before.len(),
        reads_during.p99(),
        reads_during.len(),
        writes_before.p99(),
        writes_before.len(),
        writes_during.p99(),
        writes_during.len(),
    );
    assert!(
        reads_during.len() >= 100 && writes_during.len() >= 100,
        "too few requests during the purge to measure"
    );
    assert!(
        reads_during.p99() <= reads_before.p99() * 2,
        "reads p99 {:?} during the purge vs {:?} before",
        reads_during.p99(),
        reads_before.p99()
    );
    assert!(
        writes_during.p99() <= writes_before.p99() * 2,
        "writes p99 {:?} during the purge vs {:?} before",
        writes_during.p99(),
        writes_before.p99()
    );

    // What stays and what goes.
    for id in &running {
        let r = site.get(&format!("/tasks/{id}"), Some(&token)).await;
        assert_eq!(r.body["state"], json!("RUNNING"), "{r:?}");
    }
    for id in &some_finished {
        site.get(&format!("/tasks/{id}"), Some(&token))
            .await
            .expect(404, Some("TaskNotFound"));
    }
    // Space back: the sweep gives pages back after its last batch.
    let bytes_after = support::wait_for("the store to shrink", Duration::from_secs(60), || {
        let dir = dir.clone();
        async move {
            let after = store_bytes(&dir);
            (after * 2 < bytes_before).then_some(after)
        }
    })
    .await;
    eprintln!(
        "store: {bytes_before} bytes before the purge, {bytes_after} after ({:.0}%)",
        bytes_after as f64 * 100.0 / bytes_before as f64
    );
    let size_metric = site
        .metric("sitegate_store_size_bytes", &[])
        .await
        .unwrap_or(0.0);
    assert!(size_metric > 0.0);
}

/// Eight writers create tasks while `sitegate backup` copies the store; the copy, restored
/// into a new site, holds every task acknowledged before the backup began, opens cleanly,
/// and holds no sessions. Restore refuses a running site, and a store with tasks unless
/// forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_eight_writers_restores_into_a_new_site() {
    const WRITERS: usize = 8;
    let _alone = ONE_AT_A_TIME.lock().await;
    let fed = Federation::init(&["site1"]);
    // Some bulk, so the copy takes a moment while the writers go on.
    seed(&store_dir(&fed, "site1"), 5_000, 100).await;
    let mut site = fed.start("site1").await;
    let token = site.login("svc").await;
    let acked: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (base, token) = (site.url(""), token.clone());
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.spawn(async move {
            let http = support::http_client();
            while !stop.load(Ordering::SeqCst) {
                let id = Uuid::new_v4();
                let r = http
                    .post(format!("{base}/tasks"))
                    .header("X-VCAV-Auth", &token)
                    .json(&json!({
                        "id": id,
                        "user": "svc",
                        "workflowInfo": {"type": "sync", "resourceType": "vm", "resourceId": "vm-1"}
                    }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                acked.lock().unwrap().push((id, Instant::now()));
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let out = fed.dir.path().join("site1.backup");
    let backup_started = Instant::now();
    let mut cmd = support::command(fed.dir.path());
    cmd.arg("backup")
        .arg("--config")
        .arg(fed.config_path("site1"))
        .arg("--out")
        .arg(&out);
    let output = tokio::task::spawn_blocking(move || {
        support::run_with_deadline(cmd, Duration::from_secs(120))
    })
    .await
    .unwrap();
    let backup_ended = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    writers.join_all().await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("backed up site1"), "{stdout}");
    let acked = acked.lock().unwrap().clone();
    let before: Vec<Uuid> = acked
        .iter()
        .filter(|(_, at)| *at < backup_started)
        .map(|(id, _)| *id)
        .collect();
    let during = acked
        .iter()
        .filter(|(_, at)| (backup_started..backup_ended).contains(at))
        .count();
    eprintln!(
        "backup took {:?}: {stdout}; {} writes acknowledged before it began, {during} during it",
        backup_ended - backup_started,
        before.len()
    );
    assert!(
        before.len() >= 50,
        "the writers wrote little: {}",
        before.len()
    );
    assert!(during > 0, "no write was acknowledged while the backup ran");

    // Not over a running site's store.
    let restore = |store_path: Option<&Path>, force: bool| {
        let mut cmd = support::command(fed.dir.path());
        cmd.arg("restore")
            .arg("--config")
            .arg(fed.config_path("site1"))
            .arg("--from")
            .arg(&out);
        if force {
            cmd.arg("--force");
        }
        if let Some(p) = store_path {
            cmd.env("SITEGATE_STORE__PATH", p);
        }
        support::run_with_deadline(cmd, Duration::from_secs(120))
    };
    let refused = restore(None, true);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("stop the site"), "{why}");
    site.terminate().await;
    let refused = restore(None, false);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--force"), "{why}");

    // A new site (a new machine, say): an empty store directory.
    let new_store = fed.dir.path().join("restored-store");
    let restored = restore(Some(&new_store), false);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let mut new_site = fed.site("site1");
    new_site.env.push((
        "SITEGATE_STORE__PATH".into(),
        new_store.display().to_string(),
    ));
    new_site.start().await;
    new_site
        .get("/tasks", Some(&token))
        .await
        .expect(401, Some("NotAuthenticated"));
    let token = new_site.login("svc").await;
    let mut missing = Vec::new();
    for id in &before {
        let r = new_site.get(&format!("/tasks/{id}"), Some(&token)).await;
        if r.status != 200 {
            missing.push(*id);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} writes acknowledged before the backup are not in it: {:?}",
        missing.len(),
        before.len(),
        &missing[..missing.len().min(5)]
    );
    let total = new_site.get("/tasks?limit=1", Some(&token)).await;
    let total = total.expect(200, None)["total"].as_u64().unwrap() as usize;
    assert!(total >= 5_100 + before.len(), "{total}");
    let all: HashSet<Uuid> = acked.iter().map(|(id, _)| *id).collect();
    assert!(total <= 5_100 + all.len(), "{total}");
}
