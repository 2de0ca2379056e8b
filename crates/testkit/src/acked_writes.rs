//! "A write that the server acknowledged is durable (survives kill -9)", whatever the store:
//! writers drive tasks from creation through progress to SUCCEEDED and record every step the
//! server acknowledged in a [`Ledger`]; [`write_until_killed`] kills the site with SIGKILL
//! while their writes are in flight; after the restart [`verify`] finds every acknowledged
//! step there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::site::{http_client, id_of, Site, POLL_INTERVAL};

/// Concurrent writers in a round.
pub const WRITERS: usize = 8;
/// Rounds of writes and kills in a test.
pub const KILL_ROUNDS: usize = 2;
/// How long the writers run before the kill, at least, and how many acknowledged writes they
/// must have made by then.
pub const MIN_RUN: Duration = Duration::from_millis(1500);
pub const MIN_ACKED_WRITES: usize = 40;
/// The longest the writers run before the kill, whatever they achieved.
pub const MAX_RUN: Duration = Duration::from_secs(30);

/// The most advanced state of one task that the server acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Ack {
    pub progress: i64,
    pub succeeded: bool,
}

/// What the server acknowledged, over every round of a test.
#[derive(Default)]
pub struct Ledger {
    /// Task ID -> its most advanced acknowledged state.
    pub acks: Mutex<HashMap<String, Ack>>,
    /// Acknowledged writes of every kind, for the progress of a round.
    pub acked_writes: AtomicUsize,
    /// Creates sent but not acknowledged: they may or may not exist.
    pub uncertain_creates: AtomicUsize,
    /// HTTP answers that were not a success: none are expected.
    pub refusals: Mutex<Vec<String>>,
}

impl Ledger {
    /// Records an acknowledged write to task `id`.
    pub fn record(&self, id: &str, f: impl FnOnce(&mut Ack)) {
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        f(acks.entry(id.to_owned()).or_default());
        self.acked_writes.fetch_add(1, Ordering::SeqCst);
    }

    /// A copy of every task's acknowledged state.
    pub fn acks(&self) -> Vec<(String, Ack)> {
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        acks.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// A copy of the refusals so far.
    pub fn refusals(&self) -> Vec<String> {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Sends one write; `Some(body)` when acknowledged with `want`, `None` when the server is gone.
async fn write(rb: reqwest::RequestBuilder, want: u16, ledger: &Ledger) -> Option<Value> {
    let response = rb.send().await.ok()?;
    let status = response.status().as_u16();
    let text = response.text().await.ok()?;
    if status == want {
        serde_json::from_str(&text).ok()
    } else {
        ledger
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{status}: {text}"));
        None
    }
}

/// Creates tasks of `svc` (whose session `token` is) at the site at `base` and drives each
/// through progress to SUCCEEDED until `stop` or until the server stops answering, recording
/// every acknowledged step.
pub async fn writer(base: String, token: String, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
    let client = http_client();
    while !stop.load(Ordering::SeqCst) {
        let id = uuid::Uuid::new_v4().to_string();
        let create = client
            .post(format!("{base}/tasks"))
            .header("X-VCAV-Auth", &token)
            .json(&json!({
                "id": id,
                "user": "svc",
                "workflowInfo": {"type": "sync", "resourceType": "vm", "resourceId": id}
            }));
        ledger.uncertain_creates.fetch_add(1, Ordering::SeqCst);
        let Some(task) = write(create, 201, &ledger).await else {
            return;
        };
        ledger.uncertain_creates.fetch_sub(1, Ordering::SeqCst);
        assert_eq!(task["id"], json!(id));
        ledger.record(&id, |_| {});
        for p in [25, 50, 75] {
            let patch = client
                .patch(format!("{base}/tasks/{id}"))
                .header("X-VCAV-Auth", &token)
                .json(&json!({"progress": p}));
            let Some(task) = write(patch, 200, &ledger).await else {
                return;
            };
            assert_eq!(task["progress"], json!(p));
            ledger.record(&id, |a| a.progress = a.progress.max(p));
        }
        let done = client
            .patch(format!("{base}/tasks/{id}"))
            .header("X-VCAV-Auth", &token)
            .json(&json!({"state": "SUCCEEDED", "resultType": "string", "result": "ok"}));
        let Some(task) = write(done, 200, &ledger).await else {
            return;
        };
        assert_eq!(task["state"], json!("SUCCEEDED"));
        ledger.record(&id, |a| {
            a.succeeded = true;
            a.progress = 100;
        });
    }
}

/// One round: [`WRITERS`] writers as `svc` (whose session `token` is) write to `site` until
/// [`MIN_RUN`] has passed and [`MIN_ACKED_WRITES`] writes were acknowledged (or [`MAX_RUN`]
/// passed), then the site gets SIGKILL with writes in flight. Asserts that enough writes were
/// acknowledged and none refused. Returns the round's acknowledged writes and how long the
/// writers ran before the kill. The site is left stopped.
pub async fn write_until_killed(
    site: &mut Site,
    token: &str,
    ledger: &Arc<Ledger>,
    round: usize,
) -> (usize, Duration) {
    let before = ledger.acked_writes.load(Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WRITERS)
        .map(|_| {
            tokio::spawn(writer(
                site.url(""),
                token.to_owned(),
                ledger.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    loop {
        let acked = ledger.acked_writes.load(Ordering::SeqCst) - before;
        let elapsed = started.elapsed();
        if (elapsed >= MIN_RUN && acked >= MIN_ACKED_WRITES) || elapsed >= MAX_RUN {
            break;
        }
        assert!(
            !workers.iter().all(|w| w.is_finished()),
            "round {round}: every writer stopped before the kill; refusals: {:?}",
            ledger.refusals()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    // Writes are in flight: kill -9.
    site.kill9();
    let killed_after = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("a writer did not stop after the kill")
            .expect("a writer panicked");
    }
    let acked = ledger.acked_writes.load(Ordering::SeqCst) - before;
    assert!(
        acked >= MIN_ACKED_WRITES,
        "round {round}: only {acked} writes were acknowledged in {MAX_RUN:?}"
    );
    let refusals = ledger.refusals();
    assert!(refusals.is_empty(), "writes were refused: {refusals:?}");
    (acked, killed_after)
}

/// Every acknowledged task is at `site` (read with `svc`'s session `token`) and at least as
/// advanced as acknowledged, and the task list counts at least as many; returns how many
/// tasks were checked.
pub async fn verify(site: &Site, token: &str, ledger: &Ledger) -> usize {
    let acks = ledger.acks();
    let mut found: HashMap<String, Value> = HashMap::new();
    for chunk in acks.chunks(1000) {
        let asked: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let r = site.post("/tasks/poll", Some(token), &json!(asked)).await;
        let body = r.expect(200, None);
        let names: Vec<&str> = body["propertyNames"]
            .as_array()
            .expect("propertyNames")
            .iter()
            .map(|n| n.as_str().expect("name"))
            .collect();
        for row in body["values"].as_array().expect("values") {
            let obj: serde_json::Map<String, Value> = names
                .iter()
                .map(|n| (*n).to_owned())
                .zip(row.as_array().expect("row").iter().cloned())
                .collect();
            found.insert(id_of(&Value::Object(obj.clone())), Value::Object(obj));
        }
    }
    let mut lost = Vec::new();
    for (id, ack) in &acks {
        let Some(task) = found.get(id) else {
            lost.push(format!("{id}: acknowledged {ack:?} but missing"));
            continue;
        };
        let state = task["state"].as_str().unwrap_or("?");
        let progress = task["progress"].as_i64().unwrap_or(-1);
        if ack.succeeded && state != "SUCCEEDED" {
            lost.push(format!("{id}: acknowledged SUCCEEDED but is {state}"));
        }
        if progress < ack.progress {
            lost.push(format!(
                "{id}: acknowledged progress {} but has {progress}",
                ack.progress
            ));
        }
        if !["RUNNING", "SUCCEEDED"].contains(&state) {
            lost.push(format!("{id}: unexpected state {state}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged tasks lost writes:\n{}",
        lost.len(),
        acks.len(),
        lost.join("\n")
    );
    // Nothing else is lost either: the list agrees with the poll.
    let r = site.get("/tasks?limit=0", Some(token)).await;
    let total = r.expect(200, None)["total"].as_u64().expect("total") as usize;
    assert!(
        total >= acks.len(),
        "total {total} < acknowledged {}",
        acks.len()
    );
    acks.len()
}
