//! One benchmark run from start to end: set the topology up, run the baselines and scenarios
//! the plan asks for, judge them, and hand back the report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::seq::SliceRandom;
use uuid::Uuid;

use crate::cli::Plan;
use crate::error::BenchError;
use crate::load::{self, LoadResult, PooledClient, RequestTemplate, Workload};
use crate::process::{self, Pinning, Supervised};
use crate::report::{self, Report};
use crate::scenario::{better_baseline, judge, shown_name, Evidence, Row, Scenario, Verdict};
use crate::seed::{self, READER};
use crate::topology::{self, Federation, ProxyBaseline, ProxyKind};

/// Tasks the Get One scenarios go round.
const GET_ONE_SAMPLE: usize = 1_000;
/// IDs in one Bulk Poll.
const POLL_IDS: usize = 100;
/// Different Bulk Poll bodies the scenario goes round.
const POLL_BODIES: usize = 10;

/// Connections of the query scenario: the embedded store reads on 4 threads, so more
/// connections only queue, and with queries of a second each they would queue past the
/// request timeout and measure timeouts instead of queries.
const QUERY_CONNECTIONS: usize = 4;

/// How fast an open loop sends.
#[derive(Clone, Copy, Debug)]
enum Rate {
    /// The plan's fraction of this measurement's own closed-loop throughput.
    FractionOfOwn,
    /// Exactly this many requests per second.
    Fixed(f64),
    /// No open loop.
    ClosedOnly,
}

/// A process whose peak RSS a measurement reports.
#[derive(Clone, Debug)]
struct Watched {
    name: String,
    pid: u32,
}

/// The running topology and what has been measured so far.
struct Bench {
    plan: Plan,
    pinning: Pinning,
    sitegate: PathBuf,
    work: PathBuf,
    fed: Federation,
    site1: Supervised,
    site2: Supervised,
    limit: Option<Supervised>,
    /// nginx and HAProxy, each running or the reason it is not.
    proxies: Vec<(ProxyKind, Result<ProxyBaseline, String>)>,
    rows: Vec<Row>,
    notes: Vec<String>,
}

/// Runs the plan; `sitegate` is the release binary to serve the sites with.
pub async fn run(
    plan: Plan,
    pinning: Pinning,
    sitegate: PathBuf,
    keep: bool,
) -> Result<Report, BenchError> {
    let temp = tempfile::Builder::new()
        .prefix("sitegate-bench-")
        .tempdir()
        .map_err(BenchError::io("create a temporary directory"))?;
    let work = temp.path().to_owned();
    if keep {
        let kept = temp.keep();
        eprintln!("keeping {}", kept.display());
        run_in(plan, pinning, sitegate, kept).await
    } else {
        let result = run_in(plan, pinning, sitegate, work).await;
        drop(temp);
        result
    }
}

async fn run_in(
    plan: Plan,
    pinning: Pinning,
    sitegate: PathBuf,
    work: PathBuf,
) -> Result<Report, BenchError> {
    let mut report = Report {
        started: utc_now(),
        machine: process::machine_description(),
        pinning: pinning.describe(),
        load_before: process::load_average(),
        warmup: plan.warmup,
        duration: plan.duration,
        connections: plan.connections,
        many_clients: plan.many_clients,
        rate_fraction: plan.rate_fraction,
        small_tasks: plan.small_tasks,
        large_tasks: plan.large_tasks,
        quick: plan.quick,
        ..Report::default()
    };
    let base_port = topology::free_ports(7)?;
    let fed = Federation::init(&sitegate, &work.join("fed"), base_port)?;
    let mut notes = vec![format!(
        "sitegate: `{}`{}",
        report::shown_path(&sitegate),
        source_revision().map_or(String::new(), |r| format!(", built from {r}"))
    )];
    let written = fed.written_log_config("site1")?;
    report.configuration = topology::configuration_label(&written.level, plan.log_level.as_deref());
    notes.push(match &plan.log_level {
        None => format!(
            "Sites configured as `sitegate init` wrote them, nothing overridden: `[log] level = \
             \"{}\"`, `format = \"{}\"` (JSON lines, as standard error is a file), so every \
             request writes an access-log line; the logs go to `site1.log` and `site2.log` in \
             the run's work directory",
            written.level, written.format
        ),
        Some(level) => format!(
            "Tuned run: sites started with `SITEGATE_LOG__LEVEL={level}` over `init`'s \
             `[log] level = \"{}\"` (access log {}); otherwise as `init` wrote them. Logs go to \
             `site1.log` and `site2.log` in the run's work directory",
            written.level,
            topology::access_log_state(level)
        ),
    });

    // Seed both stores before the sites start: the embedded store serves one process.
    eprintln!(
        "seeding site1 and site2 with {} tasks each",
        report::thousands(plan.small_tasks as f64)
    );
    pinning.set_self_spread(true);
    let seeded1 = seed::seed(&fed.store_dir("site1"), "site1", 0, plan.small_tasks).await?;
    let seeded2 = seed::seed(&fed.store_dir("site2"), "site2", 0, plan.small_tasks).await?;
    // RUNNING tasks of alice at site2 for the remote Get One: enough that concurrent reads
    // rarely ask for the same one (site1 would share those), so every read crosses the link.
    let remote_running = seed::tasks_of(
        &fed.store_dir("site2"),
        "site2",
        READER,
        GET_ONE_SAMPLE,
        false,
    )
    .await?;
    let finished = seed::tasks_of(&fed.store_dir("site2"), "site2", READER, 1, true).await?;
    let (Some(&running), Some(&finished)) = (remote_running.first(), finished.first()) else {
        return Err(BenchError::Setup("seeding site2's polled tasks".into()));
    };
    pinning.set_self_spread(false);
    for (site, s) in [("site1", &seeded1), ("site2", &seeded2)] {
        notes.push(format!(
            "Seeded {site} with {} tasks in {:.1} s ({} tasks/s through `sitegate-store`, \
             each finished task a create and a patch)",
            report::thousands(s.created as f64),
            s.elapsed.as_secs_f64(),
            report::thousands(s.rate())
        ));
    }

    eprintln!(
        "starting site2 and site1 ({}; logs in {})",
        report.configuration,
        fed.dir.display()
    );
    let log_level = plan.log_level.as_deref();
    let site2 = fed
        .start_site(&sitegate, &pinning, "site2", 1, log_level)
        .await?;
    let site1 = fed
        .start_site(&sitegate, &pinning, "site1", 0, log_level)
        .await?;
    let mut proxies = Vec::new();
    for (n, kind) in (0u16..).zip(ProxyKind::ALL) {
        let proxy = match kind.find() {
            Ok(path) if plan.scenarios.iter().any(|s| s.is_remote()) => {
                let version = kind.version(&path).unwrap_or_default();
                let upstream = match kind {
                    ProxyKind::Nginx => "HTTP/1.1 to the peer link".to_owned(),
                    ProxyKind::Haproxy => {
                        format!("`alpn {}` to the peer link", plan.haproxy_upstream.alpn())
                    }
                };
                notes.push(format!(
                    "{}: `{}` ({version}), {upstream}",
                    kind.name(),
                    path.display()
                ));
                let listen = SocketAddr::from(([127, 0, 0, 1], base_port + 5 + n));
                ProxyBaseline::start(
                    kind,
                    &path,
                    &pinning,
                    &fed,
                    &work,
                    listen,
                    plan.haproxy_upstream,
                )
                .await
                .map_err(|e| format!("{} did not start: {e}", kind.name()))
            }
            Ok(_) => Err("no remote scenario asked for".into()),
            Err(message) => {
                eprintln!("{message}");
                Err(message)
            }
        };
        proxies.push((kind, proxy));
    }

    let mut bench = Bench {
        plan,
        pinning,
        sitegate,
        work,
        fed,
        site1,
        site2,
        limit: None,
        proxies,
        rows: Vec::new(),
        notes,
    };
    let outcome = bench
        .run_scenarios(
            &seeded1.reader_tasks,
            &seeded2,
            &remote_running,
            running,
            finished,
        )
        .await;
    report.load_after = process::load_average();
    bench.stop_all();
    outcome?;
    bench.notes.push(log_volume(&bench.fed));
    report.rows = bench.rows;
    report.setup_notes = bench.notes;
    Ok(report)
}

/// How much the sites logged: with the access log on, one line per request.
fn log_volume(fed: &Federation) -> String {
    let sizes: Vec<String> = ["site1", "site2"]
        .iter()
        .map(|site| {
            let bytes = std::fs::metadata(fed.log_file(site)).map_or(0, |m| m.len());
            format!("{site} {}", report::mib(bytes))
        })
        .collect();
    format!("The sites logged {} during the run", sizes.join(", "))
}

fn sample(ids: &[Uuid], n: usize) -> Vec<Uuid> {
    let mut rng = rand::thread_rng();
    ids.choose_multiple(&mut rng, n.min(ids.len()))
        .copied()
        .collect()
}

/// The git commit of the working tree this tool runs in, marked when it has changes.
fn source_revision() -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(format!(
        "commit {commit}{}",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    ))
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

impl Bench {
    fn site1_addr(&self) -> SocketAddr {
        self.fed.client_addr(0)
    }

    fn site2_addr(&self) -> SocketAddr {
        self.fed.client_addr(1)
    }

    fn site1_watch(&self) -> Vec<Watched> {
        vec![Watched {
            name: "site1".into(),
            pid: self.site1.pid(),
        }]
    }

    fn sites_watch(&self) -> Vec<Watched> {
        let mut w = self.site1_watch();
        w.push(Watched {
            name: "site2".into(),
            pid: self.site2.pid(),
        });
        w
    }

    /// A proxy baseline's processes (nginx's master and worker, HAProxy's one) and site2.
    fn proxy_watch(&self, proxy: &ProxyBaseline) -> Vec<Watched> {
        let mut w: Vec<Watched> = proxy
            .pids()
            .into_iter()
            .map(|pid| Watched {
                name: proxy.kind.key().into(),
                pid,
            })
            .collect();
        w.push(Watched {
            name: "site2".into(),
            pid: self.site2.pid(),
        });
        w
    }

    fn stop_all(&mut self) {
        let grace = Duration::from_secs(10);
        for (_, proxy) in &mut self.proxies {
            if let Ok(proxy) = proxy {
                proxy.process.stop(grace);
            }
        }
        if let Some(limit) = &mut self.limit {
            limit.stop(grace);
        }
        self.site1.stop(grace);
        self.site2.stop(grace);
    }

    fn check_sites(&mut self) -> Result<(), BenchError> {
        self.site1.check_alive()?;
        self.site2.check_alive()
    }

    async fn run_scenarios(
        &mut self,
        site1_tasks: &[Uuid],
        site2: &seed::Seeded,
        site2_running: &[Uuid],
        running: Uuid,
        finished: Uuid,
    ) -> Result<(), BenchError> {
        let plan = self.plan.clone();
        let s1 = self.site1_addr();
        let token1 = topology::login(s1, READER).await?;
        topology::extend(s1, &token1, "site2").await?;
        let token2 = topology::login(self.site2_addr(), READER).await?;

        let local_sample = sample(site1_tasks, GET_ONE_SAMPLE);
        let first = local_sample
            .first()
            .ok_or_else(|| BenchError::Setup("site1 has no task of alice".into()))?;
        let captured = topology::get_ok(s1, &token1, &format!("/tasks/{first}")).await?;
        let answer = topology::fixed_answer(&captured);
        self.notes.push(format!(
            "The limit server repeats the {} bytes of a real `GET /tasks/{{id}}` answer of site1 \
             (`{}`)",
            answer.body.len(),
            answer.content_type.to_str().unwrap_or("?")
        ));
        for (kind, proxy) in &self.proxies {
            if let Err(why) = proxy {
                self.notes
                    .push(format!("{} baseline not run: {why}", kind.name()));
            }
        }

        // The limit baseline.
        let mut limit_row = None;
        if plan.scenarios.iter().any(|s| s.uses_limit()) {
            let addr = SocketAddr::from(([127, 0, 0, 1], self.fed.base_port + 4));
            let process =
                topology::start_limit_server(&self.pinning, &self.work, addr, &answer).await?;
            let watch = vec![Watched {
                name: "limit".into(),
                pid: process.pid(),
            }];
            self.limit = Some(process);
            let workload = Workload::Cycle(Arc::from(vec![RequestTemplate::get(format!(
                "/tasks/{first}"
            ))]));
            let row = self
                .single(
                    "limit",
                    "limit: bare hyper, same bytes",
                    addr,
                    &workload,
                    plan.connections,
                    &watch,
                    Rate::FractionOfOwn,
                )
                .await?;
            limit_row = Some(self.push(row, None));
        }

        let get_one = Workload::Cycle(
            local_sample
                .iter()
                .map(|id| topology::authed_get(format!("/tasks/{id}"), &token1))
                .collect(),
        );
        let mut get_one_row = None;
        if plan.runs(Scenario::GetOne) {
            let title = format!(
                "local Get One ({} tasks)",
                report::thousands(plan.small_tasks as f64)
            );
            let row = self
                .single(
                    "get-one",
                    &title,
                    s1,
                    &get_one,
                    plan.connections,
                    &self.site1_watch(),
                    Rate::FractionOfOwn,
                )
                .await?;
            get_one_row = Some(self.push(row, Some((Scenario::GetOne, limit_row, None))));
        }

        if plan.runs(Scenario::Poll100) {
            let mut rng = rand::thread_rng();
            let bodies: Vec<RequestTemplate> = (0..POLL_BODIES)
                .map(|_| {
                    let ids: Vec<Uuid> = site1_tasks
                        .choose_multiple(&mut rng, POLL_IDS)
                        .copied()
                        .collect();
                    topology::authed_poll("/tasks/poll", &ids, &token1)
                })
                .collect();
            let row = self
                .single(
                    "poll-100",
                    "Bulk Poll of 100 IDs",
                    s1,
                    &Workload::Cycle(Arc::from(bodies)),
                    plan.connections,
                    &self.site1_watch(),
                    Rate::FractionOfOwn,
                )
                .await?;
            self.push(row, Some((Scenario::Poll100, limit_row, None)));
        }

        // Writes before the many-clients scenarios: memory the allocator keeps after 1,000
        // connections would otherwise count as the writes' peak.
        if plan.runs(Scenario::Writes) {
            let writer = topology::login(s1, "svc").await?;
            let create = serde_json::json!({
                "user": "bob",
                "workflowInfo": {"type": "sync", "resourceType": "vm", "resourceId": "vm-1",
                                 "resourceName": "web"}
            })
            .to_string();
            let workload = Workload::TaskLifecycle(Arc::new(load::Lifecycle {
                auth: writer,
                create_body: Bytes::from(create),
                patches: 5,
            }));
            let row = self
                .single(
                    "writes",
                    "task writes: create + 5 patches + finish (durable)",
                    s1,
                    &workload,
                    plan.connections,
                    &self.site1_watch(),
                    Rate::ClosedOnly,
                )
                .await?;
            self.push(row, Some((Scenario::Writes, None, None)));
        }

        // Every read of a RUNNING task crosses the link (site1 shares only concurrent identical
        // reads of one); the mixed sample is mostly finished tasks, which site1 keeps.
        let remote_running = sample(site2_running, GET_ONE_SAMPLE);
        let remote_mixed = sample(&site2.reader_tasks, GET_ONE_SAMPLE);
        let remote = |ids: &[Uuid]| -> (Workload, Workload) {
            (
                Workload::Cycle(
                    ids.iter()
                        .map(|id| topology::authed_get(format!("/tasks/{id}?site=site2"), &token1))
                        .collect(),
                ),
                Workload::Cycle(
                    ids.iter()
                        .map(|id| topology::authed_get(format!("/tasks/{id}"), &token2))
                        .collect(),
                ),
            )
        };
        for (scenario, ids, title, connections) in [
            (
                Scenario::RemoteGetOne,
                remote_running,
                "remote Get One, RUNNING tasks".to_owned(),
                plan.connections,
            ),
            (
                Scenario::RemoteGetOneMixed,
                remote_mixed,
                "remote Get One, mixed history".to_owned(),
                plan.connections,
            ),
            (
                Scenario::RemoteRunning1000,
                vec![running],
                format!("remote, {} clients, one RUNNING task", plan.many_clients),
                plan.many_clients,
            ),
            (
                Scenario::RemoteFinished1000,
                vec![finished],
                format!("remote, {} clients, one finished task", plan.many_clients),
                plan.many_clients,
            ),
        ] {
            if !plan.runs(scenario) {
                continue;
            }
            let (through_site1, through_proxy) = remote(&ids);
            self.paired(
                scenario,
                &title,
                connections,
                &through_site1,
                &through_proxy,
            )
            .await?;
        }

        if plan.runs(Scenario::GetOneLarge) || plan.runs(Scenario::Query) {
            let large_tasks = self.reseed_site1(site1_tasks).await?;
            let token1 = topology::login(s1, READER).await?;
            let large_title = report::thousands(plan.large_tasks as f64);
            if plan.runs(Scenario::GetOneLarge) {
                let large_sample = sample(&large_tasks, GET_ONE_SAMPLE);
                let workload = Workload::Cycle(
                    large_sample
                        .iter()
                        .map(|id| topology::authed_get(format!("/tasks/{id}"), &token1))
                        .collect(),
                );
                let rate = get_one_row
                    .and_then(|i: usize| self.rows[i].open.as_ref())
                    .and_then(|o| o.offered_rate)
                    .map_or(Rate::FractionOfOwn, Rate::Fixed);
                let row = self
                    .single(
                        "get-one-large",
                        &format!("local Get One ({large_title} tasks)"),
                        s1,
                        &workload,
                        plan.connections,
                        &self.site1_watch(),
                        rate,
                    )
                    .await?;
                self.push(row, Some((Scenario::GetOneLarge, limit_row, get_one_row)));
            }
            if plan.runs(Scenario::Query) {
                let workload = Workload::Cycle(Arc::from(vec![topology::authed_get(
                    "/tasks?state=RUNNING&type=sync&limit=100",
                    &token1,
                )]));
                let row = self
                    .single(
                        "query",
                        &format!("Query state+type, limit=100 ({large_title} tasks)"),
                        s1,
                        &workload,
                        plan.connections.min(QUERY_CONNECTIONS),
                        &self.site1_watch(),
                        Rate::FractionOfOwn,
                    )
                    .await?;
                self.push(row, Some((Scenario::Query, limit_row, None)));
            }
        }
        Ok(())
    }

    /// Adds a row, judging it against the rows at the given indices; returns its index.
    fn push(
        &mut self,
        mut row: Row,
        judged: Option<(Scenario, Option<usize>, Option<usize>)>,
    ) -> usize {
        if let Some((scenario, baseline, small)) = judged {
            let evidence = Evidence {
                baseline: baseline.map(|i| &self.rows[i]),
                small_store: small.map(|i| &self.rows[i]),
            };
            judge(scenario, &mut row, &evidence);
        }
        eprintln!(
            "  -> {}: {} req/s{}{}",
            row.key,
            row.throughput().map_or("—".into(), report::rate),
            row.latency_source()
                .map(|l| format!(
                    ", p50 {}, p99 {}",
                    report::latency(l.latency.quantile(0.5)),
                    report::latency(l.latency.quantile(0.99))
                ))
                .unwrap_or_default(),
            match &row.verdict {
                Verdict::Baseline => String::new(),
                v => format!(" [{}]", v.label()),
            }
        );
        self.rows.push(row);
        self.rows.len() - 1
    }

    /// Stops site1, adds tasks to its store up to the large size, starts it again; returns
    /// the IDs of all of alice's tasks in it.
    async fn reseed_site1(&mut self, small_reader_tasks: &[Uuid]) -> Result<Vec<Uuid>, BenchError> {
        let more = self.plan.large_tasks.saturating_sub(self.plan.small_tasks);
        eprintln!(
            "reseeding site1: adding {} tasks (site1 stopped meanwhile)",
            report::thousands(more as f64)
        );
        self.site1.stop(Duration::from_secs(30));
        self.pinning.set_self_spread(true);
        let seeded = seed::seed(
            &self.fed.store_dir("site1"),
            "site1",
            self.plan.small_tasks,
            more,
        )
        .await;
        self.pinning.set_self_spread(false);
        let seeded = seeded?;
        self.notes.push(format!(
            "Reseeded site1 to {} tasks: {} more in {:.1} s ({} tasks/s)",
            report::thousands(self.plan.large_tasks as f64),
            report::thousands(seeded.created as f64),
            seeded.elapsed.as_secs_f64(),
            report::thousands(seeded.rate())
        ));
        self.site1 = self
            .fed
            .start_site(
                &self.sitegate,
                &self.pinning,
                "site1",
                0,
                self.plan.log_level.as_deref(),
            )
            .await?;
        let mut all = small_reader_tasks.to_vec();
        all.extend(seeded.reader_tasks);
        Ok(all)
    }

    /// A scenario and its proxy baselines (nginx, HAProxy) at the same connection count: the
    /// closed loops of all three, then their open loops at one rate, which none of them has
    /// fallen behind at. The scenario is judged against the better proxy.
    async fn paired(
        &mut self,
        scenario: Scenario,
        title: &str,
        connections: usize,
        through_site1: &Workload,
        through_proxy: &Workload,
    ) -> Result<(), BenchError> {
        let what = title
            .trim_start_matches("remote")
            .trim_start_matches([',', ' ']);
        // Each proxy's row, its client and what its processes are, when it runs.
        let mut bases = Vec::new();
        for (kind, proxy) in &self.proxies {
            let mut base = Row::new(
                kind.key(),
                format!("{} baseline: {what}", kind.name()),
                connections,
            );
            if *kind == ProxyKind::Nginx && connections > topology::NGINX_UPSTREAM_KEEPALIVE {
                base.notes.push(format!(
                    "nginx keeps at most {} idle upstream connections (`keepalive {}`), so with \
                     {} requests in flight it keeps opening and closing mTLS connections to \
                     site2: this baseline is bound by TLS handshakes",
                    topology::NGINX_UPSTREAM_KEEPALIVE,
                    topology::NGINX_UPSTREAM_KEEPALIVE,
                    connections
                ));
            }
            let running = match proxy {
                Ok(p) => Some((
                    PooledClient::new(p.listen, connections)?,
                    self.proxy_watch(p),
                )),
                Err(why) => {
                    base.notes.push(why.clone());
                    None
                }
            };
            bases.push((*kind, base, running));
        }
        let mut row = Row::new(scenario.name(), title, connections);
        let site1_client = PooledClient::new(self.site1_addr(), connections)?;
        // A first request through each path, so a broken setup fails clearly here.
        self.probe(&site1_client, through_site1, "site1").await?;
        for (kind, _, running) in &bases {
            if let Some((client, _)) = running {
                self.probe(client, through_proxy, kind.key()).await?;
            }
        }
        for (kind, base, running) in &mut bases {
            if let Some((client, watch)) = running {
                let (result, rss) = self
                    .measure(client, through_proxy, connections, None, watch, kind.key())
                    .await?;
                base.closed = Some(result);
                base.add_rss(&rss);
            }
        }
        let mut crossings = LinkCrossings::default();
        let (s1, s2) = (self.site1_addr(), self.site2_addr());
        let before = LinkCrossings::snapshot(s1, s2).await;
        let (result, rss) = self
            .measure(
                &site1_client,
                through_site1,
                connections,
                None,
                &self.sites_watch(),
                scenario.name(),
            )
            .await?;
        crossings.add_interval(before, LinkCrossings::snapshot(s1, s2).await);
        let own = result.throughput();
        row.closed = Some(result);
        row.add_rss(&rss);
        let slowest = bases
            .iter()
            .filter_map(|(_, base, _)| base.throughput())
            .fold(own, f64::min);
        let rate = (self.plan.rate_fraction * slowest).max(0.1);
        for (kind, base, running) in &mut bases {
            if let Some((client, watch)) = running {
                let (result, rss) = self
                    .measure(
                        client,
                        through_proxy,
                        connections,
                        Some(rate),
                        watch,
                        kind.key(),
                    )
                    .await?;
                base.open = Some(result);
                base.add_rss(&rss);
            }
        }
        let before = LinkCrossings::snapshot(s1, s2).await;
        let (result, rss) = self
            .measure(
                &site1_client,
                through_site1,
                connections,
                Some(rate),
                &self.sites_watch(),
                scenario.name(),
            )
            .await?;
        row.open = Some(result);
        row.add_rss(&rss);
        crossings.add_interval(before, LinkCrossings::snapshot(s1, s2).await);
        if crossings.at_site1 > 0.0 {
            let share = crossings.at_site2 / crossings.at_site1;
            row.notes.push(format!(
                "{:.1} % of these reads crossed the peer link (site2 answered {} Get Ones while \
                 site1 took {} for site2){}",
                100.0 * share,
                report::thousands(crossings.at_site2),
                report::thousands(crossings.at_site1),
                if share < 0.9995 {
                    "; the others were answered from site1's kept answers of finished tasks or \
                     shared a concurrent identical read (single flight)"
                } else {
                    ""
                }
            ));
        }
        self.check_sites()?;
        let mut indices = Vec::new();
        for (_, base, _) in bases {
            indices.push(self.push(base, None));
        }
        let better = better_baseline(&self.rows, &indices);
        if let Some(b) = better {
            let figures: Vec<String> = indices
                .iter()
                .filter_map(|&i| {
                    let r = &self.rows[i];
                    Some(format!(
                        "{} {} req/s",
                        shown_name(&r.key),
                        report::rate(r.throughput()?)
                    ))
                })
                .collect();
            row.notes.push(format!(
                "judged against {}, the better proxy baseline ({})",
                shown_name(&self.rows[b].key),
                figures.join(", ")
            ));
        }
        self.push(row, Some((scenario, better, None)));
        Ok(())
    }

    async fn probe(
        &self,
        client: &Arc<PooledClient>,
        workload: &Workload,
        what: &str,
    ) -> Result<(), BenchError> {
        if let Workload::Cycle(templates) = workload {
            if let Some(t) = templates.first() {
                let answer = client.send(t).await?;
                if answer.status != t.expect {
                    let mut message = format!(
                        "{} {} through {what} answered {}: {}",
                        t.method,
                        t.path,
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    );
                    for (kind, proxy) in &self.proxies {
                        if let (true, Ok(p)) = (kind.key() == what, proxy) {
                            message.push_str(&format!(
                                "\n{} log ({}):\n{}",
                                kind.name(),
                                p.error_log.display(),
                                p.error_log_tail()
                            ));
                        }
                    }
                    return Err(BenchError::Setup(message));
                }
            }
        }
        Ok(())
    }

    /// One row measured alone: a closed loop, then (unless `ClosedOnly`) an open loop.
    #[allow(clippy::too_many_arguments)]
    async fn single(
        &self,
        key: &str,
        title: &str,
        addr: SocketAddr,
        workload: &Workload,
        connections: usize,
        watch: &[Watched],
        rate: Rate,
    ) -> Result<Row, BenchError> {
        let mut row = Row::new(key, title, connections);
        let client = PooledClient::new(addr, connections)?;
        self.probe(&client, workload, key).await?;
        let (closed, rss) = self
            .measure(&client, workload, connections, None, watch, key)
            .await?;
        row.add_rss(&rss);
        let open_rate = match rate {
            // A floor only so that a scenario with no answer at all still gets a few requests.
            Rate::FractionOfOwn => Some((self.plan.rate_fraction * closed.throughput()).max(0.1)),
            Rate::Fixed(r) => Some(r),
            Rate::ClosedOnly => None,
        };
        row.closed = Some(closed);
        if let Some(r) = open_rate.filter(|_| load::supports_open_loop(workload)) {
            let (open, rss) = self
                .measure(&client, workload, connections, Some(r), watch, key)
                .await?;
            row.open = Some(open);
            row.add_rss(&rss);
        }
        Ok(row)
    }

    /// One loop (closed, or open at `rate`), with the peak RSS of `watch` during it.
    async fn measure(
        &self,
        client: &Arc<PooledClient>,
        workload: &Workload,
        connections: usize,
        rate: Option<f64>,
        watch: &[Watched],
        key: &str,
    ) -> Result<(LoadResult, Vec<(String, u64)>), BenchError> {
        client.prewarm(connections).await?;
        for w in watch {
            process::reset_peak_rss(w.pid);
        }
        match rate {
            None => eprintln!(
                "[{key}] closed loop, {connections} connections, {:.0} s",
                (self.plan.warmup + self.plan.duration).as_secs_f64()
            ),
            Some(r) => eprintln!(
                "[{key}] open loop at {} req/s, {:.0} s",
                report::rate(r),
                (self.plan.warmup + self.plan.duration).as_secs_f64()
            ),
        }
        let result = match rate {
            None => {
                load::closed_loop(
                    client,
                    workload,
                    connections,
                    self.plan.warmup,
                    self.plan.duration,
                )
                .await
            }
            Some(r) => {
                load::open_loop(client, workload, r, self.plan.warmup, self.plan.duration).await?
            }
        };
        let rss = watch
            .iter()
            .filter_map(|w| process::peak_rss(w.pid).map(|b| (w.name.clone(), b)))
            .collect();
        Ok((result, rss))
    }
}

/// Finds the sitegate binary: `--sitegate`, else `sitegate` beside this program.
pub fn locate_sitegate(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(format!("--sitegate {}: no such file", path.display()))
        };
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let beside = me.with_file_name("sitegate");
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(format!(
            "no sitegate binary at {}; build it with `cargo build --release -p sitegate -p \
             sitegate-bench` or pass --sitegate PATH",
            beside.display()
        ))
    }
}

/// Get One requests a site has counted (`sitegate_requests_total` for `GET /tasks/{task_id}`),
/// at site1 only those it sent on to site2; `None` if the metrics cannot be read.
async fn get_one_requests(addr: SocketAddr, forwarded_to: Option<&str>) -> Option<f64> {
    let answer = load::one_request(addr, &RequestTemplate::get("/metrics"))
        .await
        .ok()
        .filter(|a| a.status.is_success())?;
    let text = String::from_utf8_lossy(&answer.body);
    let target = forwarded_to.map(|site| format!("target_site=\"{site}\""));
    Some(
        text.lines()
            .filter(|l| {
                l.starts_with("sitegate_requests_total{")
                    && l.contains("route=\"/tasks/{task_id}\"")
                    && l.contains("method=\"GET\"")
                    && target.as_ref().is_none_or(|t| l.contains(t.as_str()))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Counts, at both sites, of the remote Get One reads site1 took and site2 answered.
#[derive(Clone, Copy, Debug, Default)]
struct LinkCrossings {
    at_site1: f64,
    at_site2: f64,
}

impl LinkCrossings {
    async fn snapshot(site1: SocketAddr, site2: SocketAddr) -> Option<LinkCrossings> {
        Some(LinkCrossings {
            at_site1: get_one_requests(site1, Some("site2")).await?,
            at_site2: get_one_requests(site2, None).await?,
        })
    }

    /// Adds what happened between two snapshots.
    fn add_interval(&mut self, before: Option<LinkCrossings>, after: Option<LinkCrossings>) {
        if let (Some(b), Some(a)) = (before, after) {
            self.at_site1 += a.at_site1 - b.at_site1;
            self.at_site2 += a.at_site2 - b.at_site2;
        }
    }
}
