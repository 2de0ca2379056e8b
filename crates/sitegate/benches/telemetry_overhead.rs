//! What trace export costs: the same closed-loop load on two single sites, one exporting every
//! span over OTLP/HTTP to a local sink and one not exporting, alternated A/B/A/B over three
//! rounds so that drift of the machine hits both alike. The goal is that export keeps at least
//! 90% of the throughput (ratio on/off >= 0.90).
//!
//! Run: `cargo bench -p sitegate --bench telemetry_overhead`. `SITEGATE_BENCH_QUICK=1` makes
//! it a ~10 s smoke run (short phases), e.g. in CI. `SITEGATE_BENCH_SECS` sets the length of
//! one measured phase and `SITEGATE_BENCH_CONNECTIONS` the number of connections (32).
//!
//! The load generator and the sink run in this process, on the same machine as the site: the
//! numbers are relative, not absolute. The sink only counts requests and bytes (it does not
//! decode), standing in for a collector on another machine.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

const PASSWORD: &str = "bench-Passw0rd";
const GOAL: f64 = 0.90;
const ROUNDS: usize = 3;

type BenchResult<T> = Result<T, String>;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("telemetry_overhead: {e}");
        std::process::exit(1);
    }
}

/// Lengths of the phases of one run.
struct Plan {
    warmup: Duration,
    measure: Duration,
    connections: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let quick = std::env::var("SITEGATE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let secs = std::env::var("SITEGATE_BENCH_SECS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0);
        let connections = std::env::var("SITEGATE_BENCH_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(32);
        let (warmup, measure) = if quick { (0.5, 1.2) } else { (2.0, 8.0) };
        Plan {
            warmup: Duration::from_secs_f64(warmup),
            measure: Duration::from_secs_f64(secs.unwrap_or(measure)),
            connections,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The OTLP sink
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SinkCounts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An HTTP server answering 200 (an empty protobuf message) to everything, counting what it
/// is sent. Stops when the runtime does.
async fn start_sink() -> BenchResult<(u16, Arc<SinkCounts>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind the sink: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("sink address: {e}"))?
        .port();
    let counts = Arc::new(SinkCounts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let c = c.clone();
                    async move {
                        let n = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        c.requests.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        hyper::Response::builder()
                            .status(200)
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(Bytes::new()))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((port, counts))
}

// ---------------------------------------------------------------------------------------------
// Sites
// ---------------------------------------------------------------------------------------------

/// One `sitegate serve` of a single-site federation; killed when dropped.
struct Site {
    label: &'static str,
    port: u16,
    child: Child,
    log: PathBuf,
    /// alice's session token.
    token: String,
    /// The path of alice's task.
    path: String,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn random_u64() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// A base port P with P and P+1 free on 127.0.0.1, below the ephemeral range.
fn free_base_port(taken: &[u16]) -> BenchResult<u16> {
    for _ in 0..500 {
        let base = (20_000 + random_u64() % 12_000) as u16;
        if taken.iter().any(|t| t.abs_diff(base) < 4) {
            continue;
        }
        if (base..base + 2).all(|p| StdListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(base);
        }
    }
    Err("no free ports".into())
}

fn sitegate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sitegate"));
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    // `SITEGATE_<SECTION>__<KEY>` variables are config overrides and unknown ones are
    // refused, so this benchmark's own `SITEGATE_BENCH_*` settings must not reach the site.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SITEGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn http_client() -> BenchResult<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

async fn call(
    client: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: &Value,
) -> BenchResult<(u16, Option<String>, Value)> {
    let mut rb = client.post(&url).json(body);
    if let Some(t) = token {
        rb = rb.header("X-VCAV-Auth", t);
    }
    let r = rb.send().await.map_err(|e| format!("POST {url}: {e}"))?;
    let status = r.status().as_u16();
    let token = r
        .headers()
        .get("X-VCAV-Auth")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, token, body))
}

async fn login(client: &reqwest::Client, port: u16, user: &str) -> BenchResult<String> {
    let (status, token, body) = call(
        client,
        format!("http://127.0.0.1:{port}/sessions"),
        None,
        &json!({"type": "localUser", "localUser": user, "localPassword": PASSWORD}),
    )
    .await?;
    match (status, token) {
        (200, Some(token)) => Ok(token),
        _ => Err(format!("login of {user}: {status} {body}")),
    }
}

/// Writes a one-site federation into `dir`, starts it with `env`, creates alice's task and
/// logs her in.
async fn start_site(
    label: &'static str,
    dir: &Path,
    taken: &[u16],
    env: &[(&str, String)],
) -> BenchResult<Site> {
    let port = free_base_port(taken)?;
    let fed = dir.join(label);
    let out = sitegate()
        .arg("init")
        .arg("--dir")
        .arg(&fed)
        .arg("--sites")
        .arg(label)
        .arg("--base-port")
        .arg(port.to_string())
        .arg("--dev-password")
        .arg(PASSWORD)
        .output()
        .map_err(|e| format!("sitegate init: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sitegate init: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let log = dir.join(format!("{label}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
    let log_out = log_file.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut cmd = sitegate();
    cmd.current_dir(dir)
        .arg("serve")
        .arg("--config")
        .arg(fed.join(format!("{label}.toml")))
        .env("SITEGATE_LOG__LEVEL", "warn")
        .stdout(log_out)
        .stderr(log_file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|e| format!("sitegate serve: {e}"))?;
    let mut site = Site {
        label,
        port,
        child,
        log,
        token: String::new(),
        path: String::new(),
    };
    let client = http_client()?;
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = site.child.try_wait() {
            return Err(format!(
                "site {label} exited with {status}: {}",
                std::fs::read_to_string(&site.log).unwrap_or_default()
            ));
        }
        if let Ok(r) = client.get(&healthz).send().await {
            if r.status().as_u16() == 200 {
                break;
            }
        }
        if Instant::now() > until {
            return Err(format!("site {label} did not start"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let svc = login(&client, port, "svc").await?;
    let (status, _, task) = call(
        &client,
        format!("http://127.0.0.1:{port}/tasks"),
        Some(&svc),
        &json!({"user": "alice", "workflowInfo": {"type": "sync"}}),
    )
    .await?;
    let id = task["id"].as_str().unwrap_or_default();
    if status != 201 || id.is_empty() {
        return Err(format!("create task at {label}: {status} {task}"));
    }
    site.path = format!("/tasks/{id}");
    site.token = login(&client, port, "alice").await?;
    Ok(site)
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// What one phase of load measured.
#[derive(Default)]
struct Phase {
    /// Latencies of the successful requests, microseconds.
    latencies: Vec<u32>,
    errors: u64,
    elapsed: Duration,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// One keep-alive HTTP/1.1 connection sending Get One back to back until `until`.
async fn connection(
    port: u16,
    path: Arc<str>,
    token: Arc<str>,
    until: Instant,
) -> BenchResult<(Vec<u32>, u64)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut latencies = Vec::with_capacity(1 << 14);
    let mut errors = 0;
    while Instant::now() < until {
        let request = hyper::Request::get(&*path)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
            .header("X-VCAV-Auth", &*token)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let started = Instant::now();
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let ok = response.status() == 200;
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        if ok {
            latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
        } else {
            errors += 1;
        }
    }
    Ok((latencies, errors))
}

/// Closed-loop load on `site` from `connections` connections for `length`.
async fn load(site: &Site, connections: usize, length: Duration) -> BenchResult<Phase> {
    let path: Arc<str> = site.path.as_str().into();
    let token: Arc<str> = site.token.as_str().into();
    let started = Instant::now();
    let until = started + length;
    let workers: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(site.port, path.clone(), token.clone(), until)))
        .collect();
    let mut phase = Phase::default();
    for worker in workers {
        let (latencies, errors) = worker.await.map_err(|e| format!("load worker: {e}"))??;
        phase.latencies.extend(latencies);
        phase.errors += errors;
    }
    phase.elapsed = started.elapsed();
    Ok(phase)
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)]) / 1000.0
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

async fn run() -> BenchResult<()> {
    let plan = Plan::from_env();
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let (sink_port, sink) = start_sink().await?;

    let off = start_site("off", dir.path(), &[], &[]).await?;
    let on = start_site(
        "on",
        dir.path(),
        &[off.port],
        &[
            (
                "SITEGATE_TELEMETRY__OTLP_ENDPOINT",
                format!("http://127.0.0.1:{sink_port}"),
            ),
            ("SITEGATE_TELEMETRY__OTLP_PROTOCOL", "http".to_owned()),
        ],
    )
    .await?;

    println!(
        "telemetry_overhead: {} connections, closed loop GET /tasks/{{id}}, {:.1} s per phase \
         after {:.1} s warm-up, {ROUNDS} rounds alternating export off/on",
        plan.connections,
        plan.measure.as_secs_f64(),
        plan.warmup.as_secs_f64()
    );
    for site in [&off, &on] {
        load(site, plan.connections, plan.warmup).await?;
    }
    let sink_before = sink.requests.load(Ordering::Relaxed);

    let mut phases: [Vec<Phase>; 2] = [Vec::new(), Vec::new()];
    println!();
    println!(
        "{:<7} {:<6} {:>10} {:>9} {:>9} {:>7}",
        "round", "export", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for round in 1..=ROUNDS {
        for (i, site) in [&off, &on].into_iter().enumerate() {
            let mut phase = load(site, plan.connections, plan.measure).await?;
            phase.latencies.sort_unstable();
            println!(
                "{:<7} {:<6} {:>10.0} {:>9.2} {:>9.2} {:>7}",
                round,
                site.label,
                phase.rate(),
                percentile_ms(&phase.latencies, 0.50),
                percentile_ms(&phase.latencies, 0.99),
                phase.errors
            );
            phases[i].push(phase);
        }
    }

    // Let the last batches leave, so the sink's count covers the measured requests.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && sink.requests.load(Ordering::Relaxed) == sink_before {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exports = sink.requests.load(Ordering::Relaxed);
    let export_bytes = sink.bytes.load(Ordering::Relaxed);

    let summary = |phases: &[Phase]| {
        let rate = phases.iter().map(Phase::rate).sum::<f64>() / phases.len() as f64;
        let mut all: Vec<u32> = phases
            .iter()
            .flat_map(|p| p.latencies.iter().copied())
            .collect();
        all.sort_unstable();
        let errors: u64 = phases.iter().map(|p| p.errors).sum();
        (
            rate,
            percentile_ms(&all, 0.50),
            percentile_ms(&all, 0.99),
            errors,
        )
    };
    let (off_rate, off_p50, off_p99, off_errors) = summary(&phases[0]);
    let (on_rate, on_p50, on_p99, on_errors) = summary(&phases[1]);
    let ratio = on_rate / off_rate;
    println!();
    println!(
        "{:<12} {:>10} {:>9} {:>9} {:>7}",
        "export", "req/s", "p50 ms", "p99 ms", "errors"
    );
    println!(
        "{:<12} {:>10.0} {:>9.2} {:>9.2} {:>7}",
        "off", off_rate, off_p50, off_p99, off_errors
    );
    println!(
        "{:<12} {:>10.0} {:>9.2} {:>9.2} {:>7}",
        "on (OTLP)", on_rate, on_p50, on_p99, on_errors
    );
    println!("ratio on/off: {ratio:.3} (goal >= {GOAL:.2})");
    println!(
        "sink: {exports} export requests, {:.1} MiB",
        export_bytes as f64 / (1024.0 * 1024.0)
    );
    if exports == 0 {
        println!("FAIL: the exporting site sent nothing to the sink; the comparison is void");
    } else if off_errors + on_errors > 0 {
        println!("FAIL: {} requests failed", off_errors + on_errors);
    } else if ratio >= GOAL {
        println!("PASS: export keeps {:.1}% of the throughput", ratio * 100.0);
    } else {
        println!(
            "FAIL: export keeps only {:.1}% of the throughput (goal {:.0}%)",
            ratio * 100.0,
            GOAL * 100.0
        );
    }
    drop(on);
    drop(off);
    Ok(())
}
