//! A bounded soak: a two-site federation of real processes serves mixed local and remote
//! traffic at a steady rate for `SITEGATE_SOAK_SECS` seconds (default 90). Every answer must
//! be the expected success, and neither site may grow: resident memory (`VmRSS` in
//! `/proc/<pid>/status`) and open file descriptors (`/proc/<pid>/fd`) at the end are compared
//! with a sample taken after the warm-up, when every cache, pool and connection the traffic
//! needs exists.
//!
//! The traffic keeps its working set nearly constant, so that growth in memory or descriptors
//! can only be a leak (connections, sessions, tasks or cache entries never let go), not data:
//! most writes move the progress of a fixed set of running tasks round, and tasks are created
//! and finished only once a second at each site (each new task is a few KiB in the stores'
//! caches, which are bounded but large); reads go to the running tasks and the latest finished
//! ones.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::site as support;
use support::{id_of, new_task, Federation};

/// How long the traffic runs unless `SITEGATE_SOAK_SECS` says otherwise.
const DEFAULT_SOAK_SECS: u64 = 90;
/// Requests started per second, whatever the answers' latency (open loop).
const RATE_PER_SEC: u64 = 100;
/// Requests in flight at most; past it the schedule waits (and the achieved rate shows it).
const MAX_IN_FLIGHT: usize = 32;
/// Share of the run that is warm-up: the baseline sample is taken at its end.
const WARM_UP_SHARE: f64 = 0.3;
/// The shortest warm-up: logins hash passwords with argon2 (tens of MiB) on tokio's blocking
/// threads, and that memory goes back to the system only when such a thread has been idle for
/// its keep-alive (10 s) and exits; a baseline taken before that would hide growth.
const MIN_WARM_UP: Duration = Duration::from_secs(15);
/// The shortest run that leaves a measured part after the warm-up.
const MIN_SOAK_SECS: u64 = 30;
/// Memory may grow by this share of the baseline plus [`RSS_SLACK_KIB`]: allocators keep
/// freed pages for a while and caches settle, but a leak of even a few hundred bytes per
/// request (thousands of requests after the warm-up) exceeds it.
const RSS_GROWTH_SHARE: f64 = 0.20;
const RSS_SLACK_KIB: u64 = 4 * 1024;
/// Open descriptors may differ by this much (a pooled connection opened or closed).
const FD_SLACK: usize = 12;
/// Running tasks kept at each site: once there are more, each creation is matched by a
/// completion.
const RUNNING_TASKS: usize = 20;
/// Finished tasks made before the run, so reads of finished tasks happen from the start.
const SEEDED_FINISHED: usize = 10;
/// Finished tasks remembered for reads.
const FINISHED_TASKS: usize = 50;

fn soak_duration() -> Duration {
    let secs = match std::env::var("SITEGATE_SOAK_SECS") {
        Ok(v) => v.trim().parse().ok().filter(|s| *s >= MIN_SOAK_SECS).unwrap_or_else(|| {
            panic!("SITEGATE_SOAK_SECS must be a whole number of seconds, at least {MIN_SOAK_SECS}, not {v:?}")
        }),
        Err(_) => DEFAULT_SOAK_SECS,
    };
    Duration::from_secs(secs)
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} KiB, {} fds at {}s",
            self.rss_kib,
            self.fds,
            self.at.as_secs()
        )
    }
}

fn sample(pid: u32, at: Duration) -> Sample {
    Sample {
        at,
        rss_kib: rss_kib(pid),
        fds: fd_count(pid),
    }
}

/// One site's tasks as the traffic knows them: running ones (with their progress) and
/// recently finished ones. A running task is taken out while a write to it is in flight, so
/// no two writes race on one task (which would be a legitimate 409).
#[derive(Default)]
struct Tasks {
    running: VecDeque<(String, i64)>,
    finished: VecDeque<String>,
    created: usize,
}

struct Soak {
    client: reqwest::Client,
    site1: String,
    site2: String,
    /// svc at each site, alice at site1 (extended to site2).
    svc1: String,
    svc2: String,
    alice: String,
    local: Mutex<Tasks>,
    remote: Mutex<Tasks>,
    requests: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Soak {
    /// One request that must answer `want`; its body when it did.
    async fn call(
        &self,
        method: Method,
        url: String,
        token: &str,
        body: Option<Value>,
        want: u16,
    ) -> Option<Value> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut rb = self
            .client
            .request(method.clone(), &url)
            .header("X-VCAV-Auth", token);
        if let Some(b) = &body {
            rb = rb.json(b);
        }
        let outcome = match rb.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.text().await {
                    Ok(text) if status == want => {
                        return Some(serde_json::from_str(&text).unwrap_or(Value::Null))
                    }
                    Ok(text) => format!("status {status}: {text}"),
                    Err(e) => format!("reading the body: {e:?}"),
                }
            }
            Err(e) => format!("{e:?}"),
        };
        lock(&self.failures).push(format!("{method} {url}: {outcome}"));
        None
    }

    fn tasks(&self, remote: bool) -> &Mutex<Tasks> {
        if remote {
            &self.remote
        } else {
            &self.local
        }
    }

    fn site(&self, remote: bool) -> (&str, &str) {
        if remote {
            (&self.site2, &self.svc2)
        } else {
            (&self.site1, &self.svc1)
        }
    }

    /// Creates a RUNNING task at site1 or (`remote`) site2, by that site's own service.
    async fn create(&self, remote: bool) {
        let (base, svc) = self.site(remote);
        let body = new_task("alice", "soak", "vm", "vm-soak", "soak");
        let url = format!("{base}/tasks");
        if let Some(task) = self.call(Method::POST, url, svc, Some(body), 201).await {
            let mut tasks = lock(self.tasks(remote));
            tasks.running.push_back((id_of(&task), 0));
            tasks.created += 1;
        }
    }

    /// Finishes the oldest running task of the site.
    async fn finish_oldest(&self, remote: bool) {
        let (base, svc) = self.site(remote);
        let Some((id, _)) = lock(self.tasks(remote)).running.pop_front() else {
            return;
        };
        let done = json!({"state": "SUCCEEDED", "resultType": "string", "result": "ok"});
        let url = format!("{base}/tasks/{id}");
        if self
            .call(Method::PATCH, url, svc, Some(done), 200)
            .await
            .is_some()
        {
            let mut tasks = lock(self.tasks(remote));
            tasks.finished.push_back(id);
            if tasks.finished.len() > FINISHED_TASKS {
                tasks.finished.pop_front();
            }
        }
    }

    /// A new task or, when enough are running, the oldest finished: the number of running
    /// tasks stays about [`RUNNING_TASKS`].
    async fn create_or_finish(&self, remote: bool) {
        if lock(self.tasks(remote)).running.len() > RUNNING_TASKS {
            self.finish_oldest(remote).await
        } else {
            self.create(remote).await
        }
    }

    /// Moves the progress of the site's next running task round (10, 20, ..., 90, 0, ...).
    async fn progress(&self, remote: bool) {
        let (base, svc) = self.site(remote);
        let Some((id, progress)) = lock(self.tasks(remote)).running.pop_front() else {
            return;
        };
        let next = (progress + 10) % 100;
        let url = format!("{base}/tasks/{id}");
        let ok = self
            .call(
                Method::PATCH,
                url,
                svc,
                Some(json!({"progress": next})),
                200,
            )
            .await
            .is_some();
        lock(self.tasks(remote))
            .running
            .push_back((id, if ok { next } else { progress }));
    }

    /// A task ID of the site to read: the `n`-th known one, running or finished.
    fn some_task(&self, remote: bool, n: usize) -> Option<String> {
        let tasks = lock(self.tasks(remote));
        let known = tasks.running.len() + tasks.finished.len();
        if known == 0 {
            return None;
        }
        let i = n % known;
        Some(match tasks.running.get(i) {
            Some((id, _)) => id.clone(),
            None => tasks.finished[i - tasks.running.len()].clone(),
        })
    }

    /// The `n`-th request of the schedule. Of every ten: a write at each site (a progress
    /// update; once in ten, a creation or a completion), and at site1 four reads of its own
    /// tasks and four of site2's (Get One twice, Query, Poll each).
    async fn step(&self, n: usize) {
        match n % 10 {
            0 | 5 => {
                let remote = n.is_multiple_of(10);
                if n % 100 < 10 {
                    self.create_or_finish(remote).await
                } else {
                    self.progress(remote).await
                }
            }
            1 | 9 => self.get_one(false, n / 10).await,
            2 | 6 => self.get_one(true, n / 10).await,
            3 | 4 => self.query(n % 10 == 4).await,
            _ => self.poll(n % 10 == 8, n).await,
        }
    }

    /// A Query at site1 of site1's or (`remote`) site2's running tasks, the latest first.
    async fn query(&self, remote: bool) {
        let site = if remote { "site2" } else { "site1" };
        let url = format!(
            "{}/tasks?site={site}&state=RUNNING&limit=20&sort=-lastUpdated",
            self.site1
        );
        self.call(Method::GET, url, &self.alice, None, 200).await;
    }

    /// A Poll at site1 of five known tasks of site1 or (`remote`) site2.
    async fn poll(&self, remote: bool, n: usize) {
        let site = if remote { "site2" } else { "site1" };
        let ids: Vec<String> = (0..5)
            .filter_map(|k| self.some_task(remote, n + k * 7))
            .collect();
        let url = format!("{}/tasks/poll?site={site}", self.site1);
        self.call(Method::POST, url, &self.alice, Some(json!(ids)), 200)
            .await;
    }

    /// A Get One at site1 of a task of site1 or (`remote`) of site2.
    async fn get_one(&self, remote: bool, n: usize) {
        let Some(id) = self.some_task(remote, n) else {
            return;
        };
        let site = if remote { "site2" } else { "site1" };
        let url = format!("{}/tasks/{id}?site={site}", self.site1);
        self.call(Method::GET, url, &self.alice, None, 200).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_for_a_while_grows_neither_memory_nor_descriptors() {
    let duration = soak_duration();
    let warm_up = duration.mul_f64(WARM_UP_SHARE).max(MIN_WARM_UP);
    let fed = Federation::init(&["site1", "site2"]);
    let mut site1 = fed.site("site1");
    let mut site2 = fed.site("site2");
    tokio::join!(site1.start(), site2.start());
    let alice = site1.login("alice").await;
    site1
        .extend_multisite(&alice, "site2")
        .await
        .expect(200, None);
    let soak = Arc::new(Soak {
        client: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build()
            .expect("reqwest client"),
        site1: site1.url(""),
        site2: site2.url(""),
        svc1: site1.login("svc").await,
        svc2: site2.login("svc").await,
        alice,
        local: Mutex::new(Tasks::default()),
        remote: Mutex::new(Tasks::default()),
        requests: AtomicUsize::new(0),
        failures: Mutex::new(Vec::new()),
    });
    // The working set the traffic cycles through: running tasks and finished ones, at each
    // site.
    for remote in [false, true] {
        for _ in 0..=RUNNING_TASKS {
            soak.create(remote).await;
        }
        for _ in 0..SEEDED_FINISHED {
            soak.finish_oldest(remote).await;
            soak.create(remote).await;
        }
    }
    let seeded = lock(&soak.local).created;
    soak.requests.store(0, Ordering::SeqCst);
    let pids = [("site1", site1.pid()), ("site2", site2.pid())];

    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples: Vec<(usize, Sample)> = Vec::new();
    let mut baseline: Option<Vec<Sample>> = None;
    let mut next_sample = Duration::ZERO;
    let started = Instant::now();
    let mut scheduled = 0;
    while started.elapsed() < duration {
        tick.tick().await;
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let soak = soak.clone();
        let n = scheduled;
        tokio::spawn(async move {
            soak.step(n).await;
            drop(permit);
        });
        scheduled += 1;
        let elapsed = started.elapsed();
        if baseline.is_none() && elapsed >= warm_up {
            baseline = Some(pids.iter().map(|(_, pid)| sample(*pid, elapsed)).collect());
        }
        if elapsed >= next_sample {
            for (i, (_, pid)) in pids.iter().enumerate() {
                samples.push((i, sample(*pid, elapsed)));
            }
            next_sample += Duration::from_secs(5);
        }
    }
    // Every request scheduled has been answered.
    let _all = permits
        .acquire_many(MAX_IN_FLIGHT as u32)
        .await
        .expect("the semaphore is never closed");
    let ran = started.elapsed();
    let end: Vec<Sample> = pids.iter().map(|(_, pid)| sample(*pid, ran)).collect();
    let baseline = baseline.expect("the warm-up ended before the run did");

    let requests = soak.requests.load(Ordering::SeqCst);
    let failures = lock(&soak.failures).clone();
    let mut lines = vec![format!(
        "{requests} requests in {ran:?} ({:.1}/s, {scheduled} scheduled at {RATE_PER_SEC}/s), \
         {} failed",
        requests as f64 / ran.as_secs_f64(),
        failures.len()
    )];
    for (i, (name, pid)) in pids.iter().enumerate() {
        let series: Vec<String> = samples
            .iter()
            .filter(|(site, _)| *site == i)
            .map(|(_, s)| format!("{}s:{}KiB/{}fd", s.at.as_secs(), s.rss_kib, s.fds))
            .collect();
        lines.push(format!(
            "{name} (pid {pid}): after warm-up {}, at the end {}; series {}",
            baseline[i],
            end[i],
            series.join(" ")
        ));
    }
    let report = lines.join("\n  ");
    eprintln!("soak:\n  {report}");

    assert!(
        failures.is_empty(),
        "{} requests failed:\n  {}\n{report}",
        failures.len(),
        failures
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    // The schedule was kept: an overloaded site would have made it wait.
    let expected = ran.as_secs_f64() * RATE_PER_SEC as f64;
    assert!(
        scheduled as f64 >= 0.8 * expected,
        "only {scheduled} requests could be scheduled of {expected:.0}: {report}"
    );
    // Tasks were created and finished all along, at both sites (half the writes that are
    // not progress updates are creations).
    let least = duration.as_secs() as usize / 4;
    for (name, tasks) in [("site1", &soak.local), ("site2", &soak.remote)] {
        let created = lock(tasks).created - seeded;
        assert!(
            created >= least,
            "only {created} tasks created at {name} during the run: {report}"
        );
    }
    for (i, (name, _)) in pids.iter().enumerate() {
        let allowed = baseline[i].rss_kib
            + (baseline[i].rss_kib as f64 * RSS_GROWTH_SHARE) as u64
            + RSS_SLACK_KIB;
        assert!(
            end[i].rss_kib <= allowed,
            "{name}'s memory grew from {} KiB after the warm-up to {} KiB (allowed {allowed} \
             KiB):\n  {report}",
            baseline[i].rss_kib,
            end[i].rss_kib
        );
        assert!(
            end[i].fds <= baseline[i].fds + FD_SLACK,
            "{name}'s open descriptors grew from {} after the warm-up to {}:\n  {report}",
            baseline[i].fds,
            end[i].fds
        );
    }
    // The stores agree with what was acknowledged: nothing was lost or made twice.
    for (site, tasks) in [(&site1, &soak.local), (&site2, &soak.remote)] {
        let created = lock(tasks).created as u64;
        let admin = site.login("admin").await;
        let r = site.get("/tasks?limit=0&type=soak", Some(&admin)).await;
        let total = r.expect(200, None)["total"].as_u64().expect("total");
        assert_eq!(total, created, "{}: soak tasks in the store", site.name);
    }
}
