//! Several replicas of one site on one PostgreSQL, for real: a PostgreSQL cluster of the test's
//! own (testkit's `PgCluster`), two `sitegate serve` processes of the same site configuration
//! (written by `sitegate init --postgres`), and a real HAProxy in front of them, configured like
//! `deploy/haproxy.cfg`.
//!
//! - sessions and tasks are shared by the replicas: nothing shared is cached in a process;
//! - a rolling restart behind HAProxy fails no request and loses no acknowledged write;
//! - a PostgreSQL outage makes `/readyz` and requests fail fast, and the replica recovers by
//!   itself once PostgreSQL is back.
//!
//! Nothing sleeps for a fixed time: every wait polls a condition against a deadline.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::site as support;
use sitegate_testkit::PgCluster;
use support::{
    assert_envelope, free_base_port, id_of, new_task, wait_for, Federation, PostgresFederation,
    Proc, Site, PASSWORD, POLL_INTERVAL,
};

/// The replicas' `limits.drain_delay_ms`: well above HAProxy's `inter x fall` (200 ms x 2).
const DRAIN_DELAY_MS: u64 = 1500;
/// The replicas' `limits.shutdown_grace_secs`.
const SHUTDOWN_GRACE_SECS: u64 = 10;
/// HAProxy's health-check interval and the fall/rise counts: `deploy/haproxy.cfg` uses
/// 300 ms x 3 with a 2000 ms drain delay; the same shape, faster, keeps the test short.
const CHECK_INTER_MS: u64 = 200;
const CHECK_FALL: u64 = 2;
const CHECK_RISE: u64 = 2;
/// How long HAProxy may take to see a replica change state (generous: 2 shared cores).
const HAPROXY_STATE_DEADLINE: Duration = Duration::from_secs(15);

/// The three tests share two cores with each other and with PostgreSQL, HAProxy and four
/// `sitegate` processes; the rolling restart depends on 200 ms health checks being answered in
/// time, so the tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Harness: a site on PostgreSQL, its replicas, HAProxy.
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL cluster with a fresh database, and one site written by
/// `sitegate init --sites site1 --postgres <url>` into a temporary directory.
struct SiteOnPostgres {
    /// The replicas' working directory is the federation's (their logs are written there).
    fed: Federation,
    pg: PgCluster,
}

async fn site_on_postgres() -> SiteOnPostgres {
    let PostgresFederation { fed, pg, .. } = support::postgres_federation(&["site1"]).await;
    let text = std::fs::read_to_string(fed.config_path("site1")).expect("read the site's config");
    assert!(
        text.contains(r#"schema = "sitegate_site1""#),
        "init --postgres wrote no schema of the site:\n{text}"
    );
    SiteOnPostgres { fed, pg }
}

impl SiteOnPostgres {
    /// A replica of the site (not started): the same config file, its own client port (and
    /// peer port, though one site has no peer link), and the drain settings, all passed as
    /// `SITEGATE_<SECTION>__<KEY>` environment overrides as a deployment would.
    fn replica(&self, name: &str) -> Site {
        let base = free_base_port(2);
        let mut site = Site::new(
            name,
            self.fed.config_path("site1"),
            base,
            self.fed.dir.path(),
        );
        site.env = vec![
            (
                "SITEGATE_LISTEN__CLIENT".into(),
                format!("127.0.0.1:{base}"),
            ),
            (
                "SITEGATE_LISTEN__PEER".into(),
                format!("127.0.0.1:{}", base + 1),
            ),
            (
                "SITEGATE_LIMITS__DRAIN_DELAY_MS".into(),
                DRAIN_DELAY_MS.to_string(),
            ),
            (
                "SITEGATE_LIMITS__SHUTDOWN_GRACE_SECS".into(),
                SHUTDOWN_GRACE_SECS.to_string(),
            ),
        ];
        site
    }
}

/// The HAProxy configuration: `deploy/haproxy.cfg`'s shape on free ports, with the health
/// checks of this test (`inter 200ms fall 2 rise 2`), a stats listener (to see what HAProxy
/// thinks of each replica) and logs on stderr of abnormal requests only (errors, retries,
/// redispatches) and of health-check state changes: the evidence when a request fails.
fn haproxy_config(front: u16, stats: u16, servers: &[(&str, u16)]) -> String {
    let mut cfg = format!(
        "global
    maxconn 2000
    log stderr format raw local0

defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    option log-health-checks
    timeout connect 2s
    timeout client  60s
    timeout server  60s
    # A connection refused by a replica that is just stopping is retried on the other one.
    retries 3
    option redispatch
    retry-on conn-failure empty-response
    option http-server-close

frontend site1
    bind 127.0.0.1:{front}
    default_backend site1_replicas

backend site1_replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    # inter x fall ({inter} ms x {fall}) is well below the replicas' drain_delay_ms ({drain}).
    default-server inter {inter}ms fall {fall} rise {rise}
",
        inter = CHECK_INTER_MS,
        fall = CHECK_FALL,
        rise = CHECK_RISE,
        drain = DRAIN_DELAY_MS,
    );
    for (name, port) in servers {
        cfg.push_str(&format!("    server {name} 127.0.0.1:{port} check\n"));
    }
    cfg.push_str(&format!(
        "
listen stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
    stats refresh 0
"
    ));
    cfg
}

/// A real HAProxy (`haproxy -f cfg -db`, in the foreground), killed on drop.
struct Haproxy {
    proc: Proc,
    port: u16,
    stats_port: u16,
    client: reqwest::Client,
}

/// What HAProxy's stats say about one server.
#[derive(Debug)]
struct ServerStats {
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (going up), `MAINT`, ...
    status: String,
    /// Sessions (here: requests, with `http-server-close`) it was given.
    sessions: u64,
}

impl Haproxy {
    async fn start(dir: &Path, servers: &[(&str, u16)]) -> Haproxy {
        let base = free_base_port(2);
        let (port, stats_port) = (base, base + 1);
        let config = haproxy_config(port, stats_port, servers);
        let mut haproxy = Haproxy {
            proc: tokio::task::block_in_place(|| support::start_haproxy(dir, &config)),
            port,
            stats_port,
            client: support::http_client(),
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = haproxy.proc.exited() {
                panic!(
                    "haproxy exited at start with {status}:\n{}",
                    haproxy.proc.stderr()
                );
            }
            if haproxy.stats().await.is_some() {
                break;
            }
            assert!(Instant::now() < until, "haproxy's stats did not answer");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        haproxy
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every server of the backend, from the stats page in CSV.
    async fn stats(&self) -> Option<HashMap<String, ServerStats>> {
        let url = format!("http://127.0.0.1:{}/stats;csv", self.stats_port);
        let r = self.client.get(url).send().await.ok()?;
        if r.status().as_u16() != 200 {
            return None;
        }
        let text = r.text().await.ok()?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, status, stot) = (col("pxname")?, col("svname")?, col("status")?, col("stot")?);
        let mut servers = HashMap::new();
        for line in lines {
            let fields: Vec<&str> = line.split(',').collect();
            if fields.get(px) != Some(&"site1_replicas") {
                continue;
            }
            let name = fields.get(sv)?.to_string();
            if name == "BACKEND" || name == "FRONTEND" {
                continue;
            }
            servers.insert(
                name,
                ServerStats {
                    status: fields.get(status)?.to_string(),
                    sessions: fields.get(stot)?.parse().unwrap_or_default(),
                },
            );
        }
        Some(servers)
    }

    /// Waits until HAProxy reports `server` exactly as `want` (`UP` or `DOWN`).
    async fn wait_server(&self, server: &str, want: &str) {
        wait_for(
            &format!("HAProxy to report {server} {want}"),
            HAPROXY_STATE_DEADLINE,
            || async {
                let stats = self.stats().await?;
                (stats.get(server)?.status == want).then_some(())
            },
        )
        .await
    }
}

/// One request without panicking: the status and the body (JSON, or the text as a JSON
/// string), or the transport error with its whole cause chain.
async fn try_call(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut rb = client.request(method, url);
    if let Some(t) = token {
        rb = rb.header("X-VCAV-Auth", t);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let r = rb.send().await.map_err(|e| format!("send: {e:?}"))?;
    let status = r.status().as_u16();
    let text = r
        .text()
        .await
        .map_err(|e| format!("reading the body: {e:?}"))?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, body))
}

/// A client of HAProxy: keep-alive to HAProxy is fine (HAProxy closes the connection to the
/// replica after each response, `option http-server-close`).
fn balancer_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// Logs in through a base URL; the token.
async fn login_at(client: &reqwest::Client, base: &str, user: &str) -> String {
    let r = client
        .post(format!("{base}/sessions"))
        .json(&json!({"type": "localUser", "localUser": user, "localPassword": PASSWORD}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("login of {user} at {base}: {e:?}"));
    assert_eq!(r.status().as_u16(), 200, "login of {user} at {base}");
    r.headers()
        .get("X-VCAV-Auth")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("login of {user} at {base}: no X-VCAV-Auth"))
}

// ---------------------------------------------------------------------------------------------
// 1. Shared sessions and tasks.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_sessions_and_tasks() {
    let _serial = SERIAL.lock().await;
    let env = site_on_postgres().await;
    let mut a = env.replica("replicaA");
    let mut b = env.replica("replicaB");
    tokio::join!(a.start(), b.start());
    a.wait_ready(Duration::from_secs(30)).await;
    b.wait_ready(Duration::from_secs(30)).await;

    // A login on A is a session on B.
    let alice = a.login("alice").await;
    let on_b = b.get("/sessions", Some(&alice)).await;
    assert_eq!(on_b.expect(200, None)["user"], json!("alice"), "{on_b:?}");

    // A task created through A is read through B, exactly as A answered it.
    let svc = a.login("svc").await;
    let created = a
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let path = format!("/tasks/{}", id_of(&created));
    let read = b.get(&path, Some(&alice)).await;
    assert_eq!(*read.expect(200, None), created);
    let listed = b.get("/tasks", Some(&alice)).await;
    let items = listed.expect(200, None)["items"].clone();
    assert_eq!(items, json!([created]), "{listed:?}");

    // And the other way round: a patch through B is seen through A at once.
    let patched = b.patch(&path, Some(&svc), &json!({"progress": 40})).await;
    let patched = patched.expect(200, None).clone();
    assert_eq!(patched["progress"], json!(40));
    assert_eq!(*a.get(&path, Some(&alice)).await.expect(200, None), patched);

    // A logout on B ends the session on A at once: no polling, the very next request.
    b.delete("/sessions", Some(&alice)).await.expect(204, None);
    a.get("/tasks", Some(&alice))
        .await
        .expect(401, Some("NotAuthenticated"));
    a.get("/sessions", Some(&alice))
        .await
        .expect(401, Some("NotAuthenticated"));
    b.get(&path, Some(&alice))
        .await
        .expect(401, Some("NotAuthenticated"));
    // Only alice's session ended.
    let still = a.get("/sessions", Some(&svc)).await;
    assert_eq!(still.expect(200, None)["user"], json!("svc"), "{still:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Rolling restart behind HAProxy.
// ---------------------------------------------------------------------------------------------

const WORKERS: usize = 4;
/// The load runs at least this long, and at least a second past the last restart.
const MIN_LOAD: Duration = Duration::from_secs(9);
const AFTER_RESTARTS: Duration = Duration::from_secs(1);
/// The load starts this long before the first SIGTERM.
const BEFORE_RESTARTS: Duration = Duration::from_secs(1);

/// The most advanced state of a task that the gateway acknowledged.
#[derive(Clone, Debug)]
struct Ack {
    progress: i64,
    state: &'static str,
    result: Option<String>,
    /// A write to it failed (so it may be more advanced than acknowledged).
    uncertain: bool,
}

struct Load {
    client: reqwest::Client,
    base: String,
    svc: String,
    alice: String,
    stop: AtomicBool,
    started: Instant,
    requests: AtomicUsize,
    failures: Mutex<Vec<String>>,
    acks: Mutex<HashMap<String, Ack>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }

    fn ack(&self, id: &str, f: impl FnOnce(&mut Ack)) {
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        f(acks.entry(id.to_owned()).or_insert(Ack {
            progress: 0,
            state: "RUNNING",
            result: None,
            uncertain: false,
        }));
    }

    /// One request that must answer `want`: the body, or `None` with the failure recorded
    /// (status and body, or transport error, and when it happened).
    async fn expect(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        want: u16,
    ) -> Option<Value> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let sent = Instant::now();
        let url = format!("{}{path}", self.base);
        let outcome = try_call(&self.client, method.clone(), &url, Some(token), body).await;
        let at = format!(
            "at +{:?} (took {:?})",
            sent.duration_since(self.started),
            sent.elapsed()
        );
        match outcome {
            Ok((status, body)) if status == want => Some(body),
            Ok((status, body)) => {
                self.fail(format!("{method} {path} {at}: status {status}: {body}"));
                None
            }
            Err(e) => {
                self.fail(format!("{method} {path} {at}: {e}"));
                None
            }
        }
    }

    /// A read as alice must show exactly the acknowledged progress and state.
    async fn check_read(&self, path: &str, progress: i64, state: &str) -> bool {
        let Some(task) = self.expect(Method::GET, path, &self.alice, None, 200).await else {
            return false;
        };
        if task["progress"] != json!(progress) || task["state"] != json!(state) {
            self.fail(format!(
                "GET {path}: read after write shows {task}, acknowledged progress {progress}, \
                 state {state}"
            ));
            return false;
        }
        true
    }
}

/// Creates tasks with explicit IDs (as svc), drives them through progress to SUCCEEDED, and
/// reads each step back (as alice), until told to stop.
async fn load_worker(load: Arc<Load>, worker: usize) {
    let mut round = 0;
    while !load.stop.load(Ordering::SeqCst) {
        round += 1;
        let id = uuid::Uuid::new_v4().to_string();
        let path = format!("/tasks/{id}");
        let mut body = new_task("alice", "rolling", "vm", &format!("vm-{worker}"), "web");
        body["id"] = json!(id);
        // Not acknowledged yet, but it may exist if the answer was lost.
        load.ack(&id, |a| a.uncertain = true);
        let Some(created) = load
            .expect(Method::POST, "/tasks", &load.svc, Some(&body), 201)
            .await
        else {
            continue;
        };
        if created["id"] != json!(id) {
            load.fail(format!("POST /tasks: asked for id {id}, got {created}"));
            continue;
        }
        load.ack(&id, |a| a.uncertain = false);
        if !load.check_read(&path, 0, "RUNNING").await {
            continue;
        }
        let mut ok = true;
        for progress in [25, 50, 75] {
            let patch = json!({ "progress": progress });
            let Some(task) = load
                .expect(Method::PATCH, &path, &load.svc, Some(&patch), 200)
                .await
            else {
                load.ack(&id, |a| a.uncertain = true);
                ok = false;
                break;
            };
            if task["progress"] != json!(progress) {
                load.fail(format!("PATCH {path} progress {progress}: answered {task}"));
            }
            load.ack(&id, |a| a.progress = progress);
            if !load.check_read(&path, progress, "RUNNING").await {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        let result = format!("done-{worker}-{round}");
        let done = json!({"state": "SUCCEEDED", "resultType": "string", "result": result});
        let Some(task) = load
            .expect(Method::PATCH, &path, &load.svc, Some(&done), 200)
            .await
        else {
            load.ack(&id, |a| a.uncertain = true);
            continue;
        };
        if task["state"] != json!("SUCCEEDED") {
            load.fail(format!("PATCH {path} SUCCEEDED: answered {task}"));
        }
        load.ack(&id, |a| {
            a.progress = 100;
            a.state = "SUCCEEDED";
            a.result = Some(result.clone());
        });
        load.check_read(&path, 100, "SUCCEEDED").await;
    }
}

/// SIGTERM to a replica behind HAProxy while the load runs: HAProxy must take it out before
/// it stops (drain delay), it must exit 0, and once restarted HAProxy must take it back.
async fn rolling_step(haproxy: &Haproxy, replica: &mut Site, timeline: &Mutex<Vec<String>>) {
    let t0 = Instant::now();
    let name = replica.name.clone();
    let log = |what: String| {
        timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{name}: {what}"));
    };
    let pid = replica.pid();
    let (status, down_after) = tokio::join!(replica.terminate(), async {
        haproxy.wait_server(&name, "DOWN").await;
        t0.elapsed()
    });
    let exited_after = t0.elapsed();
    log(format!(
        "pid {pid}: SIGTERM; HAProxy saw it DOWN after {down_after:?}; exited with {status} \
         after {exited_after:?}"
    ));
    assert!(
        status.success(),
        "{name} exited with {status} after SIGTERM"
    );
    assert!(
        down_after < Duration::from_millis(DRAIN_DELAY_MS),
        "HAProxy took {name} out only after {down_after:?}, not within the drain delay \
         ({DRAIN_DELAY_MS} ms)"
    );
    assert!(
        exited_after >= Duration::from_millis(DRAIN_DELAY_MS),
        "{name} exited after {exited_after:?}, before its drain delay ({DRAIN_DELAY_MS} ms)"
    );
    let t1 = Instant::now();
    replica.start().await;
    replica.wait_ready(Duration::from_secs(30)).await;
    haproxy.wait_server(&name, "UP").await;
    log(format!(
        "pid {}: restarted, ready and UP in HAProxy after {:?}",
        replica.pid(),
        t1.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_haproxy_loses_no_request() {
    let _serial = SERIAL.lock().await;
    let env = site_on_postgres().await;
    let mut a = env.replica("replicaA");
    let mut b = env.replica("replicaB");
    tokio::join!(a.start(), b.start());
    a.wait_ready(Duration::from_secs(30)).await;
    b.wait_ready(Duration::from_secs(30)).await;
    let haproxy = Haproxy::start(
        env.fed.dir.path(),
        &[(a.name.as_str(), a.port), (b.name.as_str(), b.port)],
    )
    .await;
    haproxy.wait_server(&a.name, "UP").await;
    haproxy.wait_server(&b.name, "UP").await;

    let client = balancer_client();
    let base = haproxy.url("");
    let svc = login_at(&client, &base, "svc").await;
    let alice = login_at(&client, &base, "alice").await;
    let load = Arc::new(Load {
        client,
        base,
        svc,
        alice,
        stop: AtomicBool::new(false),
        started: Instant::now(),
        requests: AtomicUsize::new(0),
        failures: Mutex::new(Vec::new()),
        acks: Mutex::new(HashMap::new()),
    });
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(load_worker(load.clone(), w)))
        .collect();

    // The load is under way before the first SIGTERM.
    wait_for("the load to start", Duration::from_secs(30), || async {
        (load.started.elapsed() >= BEFORE_RESTARTS && load.requests.load(Ordering::SeqCst) > 20)
            .then_some(())
    })
    .await;
    let timeline = Mutex::new(Vec::new());
    rolling_step(&haproxy, &mut a, &timeline).await;
    rolling_step(&haproxy, &mut b, &timeline).await;
    let restarts_done = Instant::now();
    wait_for(
        "the load's minimum duration",
        Duration::from_secs(60),
        || async {
            (load.started.elapsed() >= MIN_LOAD && restarts_done.elapsed() >= AFTER_RESTARTS)
                .then_some(())
        },
    )
    .await;
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("load worker");
    }
    let ran_for = load.started.elapsed();
    let requests = load.requests.load(Ordering::SeqCst);

    // Every task is readable with its last acknowledged state.
    let acks: Vec<(String, Ack)> = load
        .acks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut lost = Vec::new();
    for (id, ack) in &acks {
        let url = load.base.clone() + &format!("/tasks/{id}");
        let read = try_call(&load.client, Method::GET, &url, Some(&load.alice), None).await;
        let ok = match &read {
            Ok((200, task)) if ack.uncertain => {
                task["progress"].as_i64().unwrap_or(-1) >= ack.progress
            }
            // An uncertain create may never have happened.
            Ok((404, _)) if ack.uncertain && ack.progress == 0 => true,
            Ok((200, task)) => {
                task["progress"] == json!(ack.progress)
                    && task["state"] == json!(ack.state)
                    && ack
                        .result
                        .as_ref()
                        .is_none_or(|r| task["result"] == json!(r))
            }
            _ => false,
        };
        if !ok {
            lost.push(format!("task {id}: acknowledged {ack:?}, read {read:?}"));
        }
    }
    let stats = haproxy.stats().await.expect("HAProxy stats");
    let failures = load
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let timeline = timeline.into_inner().unwrap_or_else(|e| e.into_inner());
    let report = format!(
        "{requests} requests by {WORKERS} workers in {ran_for:?} on {} tasks; HAProxy: {stats:?}\n\
         timeline:\n  {}\nfailed requests ({}):\n  {}\nlost or wrong tasks ({}):\n  {}\n\
         HAProxy's log of abnormal requests and health changes:\n{}",
        acks.len(),
        timeline.join("\n  "),
        failures.len(),
        failures.join("\n  "),
        lost.len(),
        lost.join("\n  "),
        haproxy.proc.stderr()
    );
    eprintln!("{report}");
    assert!(
        failures.is_empty() && lost.is_empty(),
        "the rolling restart failed requests or lost writes:\n{report}"
    );
    // With `dontlog-normal`, HAProxy logs a request only when something went wrong with it,
    // retries and redispatches included. The drain takes a replica out of the pool before it
    // closes its listener, so no request may even need HAProxy's retries: without the drain
    // delay, `retry-on conn-failure` + `redispatch` hide the refused connections and the
    // assertions above pass, but these log lines appear.
    let retried: Vec<String> = haproxy
        .proc
        .stderr()
        .lines()
        .filter(|l| l.contains(" site1 site1_replicas/") || l.contains(" site1/<NOSRV>"))
        .map(str::to_owned)
        .collect();
    assert!(
        retried.is_empty(),
        "HAProxy had to retry or redispatch {} request(s): a replica closed its listener \
         while HAProxy still sent it requests:\n  {}",
        retried.len(),
        retried.join("\n  ")
    );
    assert!(
        requests >= 200,
        "too little load to prove anything:\n{report}"
    );
    for replica in [&a.name, &b.name] {
        assert!(
            stats.get(replica).is_some_and(|s| s.sessions > 0),
            "HAProxy sent {replica} no request:\n{report}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL outage.
// ---------------------------------------------------------------------------------------------

/// How fast a replica must answer while its store is down.
const FAIL_FAST: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_fails_fast_and_recovers() {
    let _serial = SERIAL.lock().await;
    let env = site_on_postgres().await;
    let mut a = env.replica("replicaA");
    a.start().await;
    a.wait_ready(Duration::from_secs(30)).await;
    let pid = a.pid();
    let svc = a.login("svc").await;
    let alice = a.login("alice").await;
    let before = a
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let path = format!("/tasks/{}", id_of(&before));

    tokio::task::block_in_place(|| env.pg.stop());
    let stopped = Instant::now();

    // Not ready, within a few seconds, and the answer says why in the envelope.
    let not_ready = wait_for("/readyz 503", Duration::from_secs(20), || async {
        let r = a.get("/readyz", None).await;
        (r.status == 503).then_some(r)
    })
    .await;
    let readyz_after = stopped.elapsed();
    assert_envelope(&not_ready.body, "GeneralServerFailure");
    assert!(
        readyz_after < FAIL_FAST,
        "/readyz turned 503 only {readyz_after:?} after PostgreSQL stopped"
    );
    // Alive all the same: liveness does not depend on the store.
    a.get("/healthz", None).await.expect(200, None);

    // Requests fail fast with the envelope; sessions live in PostgreSQL too, so even
    // authentication fails, as a server failure (never as 401: the token is still good).
    let requests: [(Method, &str, &str, Option<Value>); 4] = [
        (Method::GET, "/tasks", &alice, None),
        (Method::GET, &path, &alice, None),
        (
            Method::POST,
            "/tasks",
            &svc,
            Some(new_task("alice", "sync", "vm", "vm-2", "web")),
        ),
        (Method::PATCH, &path, &svc, Some(json!({"progress": 10}))),
    ];
    for (method, p, token, body) in &requests {
        let sent = Instant::now();
        let r = a.call(method.clone(), p, Some(token), body.as_ref()).await;
        let took = sent.elapsed();
        assert!(
            took < FAIL_FAST,
            "{method} {p} took {took:?} with PostgreSQL down: {r:?}"
        );
        r.expect(500, Some("GeneralServerFailure"));
        eprintln!("store outage: {method} {p} answered 500 in {took:?}");
    }

    tokio::task::block_in_place(|| env.pg.restart());
    let restarted = Instant::now();
    a.wait_ready(Duration::from_secs(30)).await;
    let ready_after = restarted.elapsed();
    eprintln!(
        "store outage: /readyz 503 after {readyz_after:?}; ready again {ready_after:?} after \
         PostgreSQL restarted"
    );

    // The same process, the same sessions, the same tasks; writes work again.
    assert_eq!(a.pid(), pid, "the replica was not restarted");
    let tasks = a.get("/tasks", Some(&alice)).await;
    assert_eq!(tasks.expect(200, None)["items"], json!([before]));
    let later = a
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-3", "web"))
        .await;
    a.patch(&path, Some(&svc), &json!({"progress": 10}))
        .await
        .expect(200, None);
    a.get(&format!("/tasks/{}", id_of(&later)), Some(&alice))
        .await
        .expect(200, None);
    assert!(a.is_running(), "the replica must have survived the outage");
}
