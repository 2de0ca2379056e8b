//! Filling a site's embedded store with tasks before its process starts, through
//! `sitegate-store` itself (`EmbeddedStore::open` + `TaskStore::create_task`/`update_task`) from
//! many concurrent tasks, so its writer thread group-commits them.
//!
//! The tasks look like a site's history: one in ten belongs to `alice` (the user the read
//! scenarios log in as), the rest to forty other users; one in ten is still RUNNING, the rest
//! finished (eight SUCCEEDED to one FAILED); half are of type `sync`, the rest `failover`,
//! `test-failover` or `pairing`. Which is which follows from the task's index through a fixed
//! hash, so runs are comparable.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sitegate_model::task::{Completion, NewTask, ValidPatch, WorkflowInfo};
use sitegate_model::{ErrorCode, ErrorEnvelope};
use sitegate_store::{EmbeddedStore, TaskStore};
use uuid::Uuid;

use crate::error::BenchError;

/// The user the read scenarios log in as.
pub const READER: &str = "alice";
/// Tasks written at once; above the writer's batch size, so every commit is full.
const CONCURRENCY: u64 = 1024;

/// What seeding did.
#[derive(Clone, Debug, Default)]
pub struct Seeded {
    /// Tasks created.
    pub created: u64,
    /// IDs of the tasks of [`READER`] created, RUNNING or not.
    pub reader_tasks: Vec<Uuid>,
    /// The RUNNING ones among them.
    pub reader_running: Vec<Uuid>,
    pub elapsed: Duration,
}

impl Seeded {
    pub fn rate(&self) -> f64 {
        self.created as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser: a fixed, well-spread hash of the index.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The task number `index` of the seeded history: its creation and, for a finished one, the
/// patch that finishes it.
pub fn seeded_task(index: u64) -> (NewTask, Option<ValidPatch>) {
    let h = mix(index);
    let user = match index % 10 {
        0 => READER.to_owned(),
        _ => format!("user{:02}", h % 40),
    };
    let workflow_type = match (h >> 8) % 6 {
        0..=2 => "sync",
        3 => "failover",
        4 => "test-failover",
        _ => "pairing",
    };
    let new = NewTask {
        id: Some(Uuid::new_v4()),
        user,
        workflow_info: WorkflowInfo {
            workflow_type: workflow_type.to_owned(),
            resource_type: Some("vm".into()),
            resource_id: Some(format!("vm-{index}")),
            resource_name: Some(format!("web-{}", index % 5000)),
        },
        source_org: None,
        destination_org: None,
    };
    let finish = match (h >> 16) % 10 {
        0 => None,
        9 => Some(ValidPatch {
            completion: Some(Completion::Failed {
                error: ErrorEnvelope::new(
                    ErrorCode::GeneralServerFailure,
                    "replication target unreachable",
                    Vec::new(),
                ),
            }),
            ..ValidPatch::default()
        }),
        _ => Some(succeeded()),
    };
    (new, finish)
}

fn succeeded() -> ValidPatch {
    ValidPatch {
        progress: Some(100),
        completion: Some(Completion::Succeeded {
            result_type: Some("string".into()),
            result: Some(serde_json::Value::String("ok".into())),
        }),
        ..ValidPatch::default()
    }
}

/// Creates tasks `first..first + count` of the seeded history in the store in `dir` for
/// `site`, printing progress to stderr every few seconds.
pub async fn seed(dir: &Path, site: &str, first: u64, count: u64) -> Result<Seeded, BenchError> {
    let store = EmbeddedStore::open(dir)?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(first));
    let done = Arc::new(AtomicU64::new(0));
    let end = first + count;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY.min(count.max(1)) {
        let store = store.clone();
        let next = next.clone();
        let done = done.clone();
        let site = site.to_owned();
        workers.spawn(async move {
            let (mut mine, mut running) = (Vec::new(), Vec::new());
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= end {
                    return Ok::<_, BenchError>((mine, running));
                }
                let (new, finish) = seeded_task(index);
                let owner_is_reader = new.user == READER;
                let task = store.create_task(new, &site).await?;
                let id = task.task().id;
                let still_running = finish.is_none();
                if let Some(patch) = finish {
                    store.update_task(id, patch).await?;
                }
                if owner_is_reader {
                    mine.push(id);
                    if still_running {
                        running.push(id);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut seeded = Seeded::default();
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(Ok(Ok((ids, running)))) => {
                    seeded.reader_tasks.extend(ids);
                    seeded.reader_running.extend(running);
                }
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(BenchError::Setup(format!("seeding task: {e}"))),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let n = done.load(Ordering::Relaxed);
            eprintln!(
                "  seeding {site}: {n}/{count} tasks, {:.0}/s",
                n as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    seeded.created = done.load(Ordering::Relaxed);
    seeded.elapsed = started.elapsed();
    Ok(seeded)
}

/// Creates `count` tasks of `user` at `site`, all finished or all still RUNNING (at 42 %);
/// for the scenarios that read tasks in a known state.
pub async fn tasks_of(
    dir: &Path,
    site: &str,
    user: &str,
    count: usize,
    finished: bool,
) -> Result<Vec<Uuid>, BenchError> {
    let store = EmbeddedStore::open(dir)?;
    let mut writes = tokio::task::JoinSet::new();
    for k in 0..count {
        let store = store.clone();
        let site = site.to_owned();
        let (mut new, _) = seeded_task(k as u64);
        new.user = user.to_owned();
        new.workflow_info.resource_name = Some(format!("polled-{k}"));
        writes.spawn(async move {
            let id = store.create_task(new, &site).await?.task().id;
            let patch = if finished {
                succeeded()
            } else {
                ValidPatch {
                    progress: Some(42),
                    ..ValidPatch::default()
                }
            };
            store.update_task(id, patch).await?;
            Ok::<_, BenchError>(id)
        });
    }
    let mut ids = Vec::with_capacity(count);
    while let Some(joined) = writes.join_next().await {
        ids.push(joined.map_err(|e| BenchError::Setup(format!("seeding task: {e}")))??);
    }
    Ok(ids)
}
