//! The load generator: a pooled HTTP/1.1 client on hyper's connection API, and the two ways
//! of driving it.
//!
//! - [`closed_loop`]: N workers, each sending its next request as soon as the previous answer
//!   is read. This finds the throughput at N connections; its latencies are those of a
//!   saturated server, and a slow answer delays the requests behind it (coordinated omission).
//! - [`open_loop`]: requests are scheduled at a fixed rate whatever the server does; a request
//!   that could not be sent on time because every connection was waiting for an answer has its
//!   latency measured from the time it was *scheduled*, so the wait behind a slow answer counts
//!   (no coordinated omission, as in wrk2).
//!
//! Requests are built from [`RequestTemplate`]s: a [`Workload::Cycle`] goes round a fixed list
//! of them; a [`Workload::TaskLifecycle`] makes each worker create a task, patch it and finish
//! it, taking the new task's ID from the create answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::error::BenchError;
use crate::histogram::Histogram;

type Sender = SendRequest<Full<Bytes>>;

/// How long a request may take before the load generator gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One request to send, again and again.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    pub method: Method,
    /// Origin-form target: path and query.
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The status of a successful answer; any other counts as an error.
    pub expect: StatusCode,
}

impl RequestTemplate {
    pub fn get(path: impl Into<String>) -> RequestTemplate {
        RequestTemplate {
            method: Method::GET,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
            expect: StatusCode::OK,
        }
    }

    /// A request with a JSON body.
    pub fn json(
        method: Method,
        path: impl Into<String>,
        body: impl Into<Bytes>,
        expect: StatusCode,
    ) -> RequestTemplate {
        RequestTemplate {
            method,
            path: path.into(),
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body: body.into(),
            expect,
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> RequestTemplate {
        self.headers.push((name, value));
        self
    }

    fn build(&self, host: &HeaderValue) -> Result<Request<Full<Bytes>>, BenchError> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header(HOST, host.clone());
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(self.body.clone()))
            .map_err(|e| BenchError::Setup(format!("bad request {}: {e}", self.path)))
    }
}

/// An answer, read to the end.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Opens one HTTP/1.1 connection (TCP_NODELAY, as servers and real clients set it).
pub async fn connect(addr: SocketAddr) -> Result<Sender, BenchError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| BenchError::Transport(format!("connect {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BenchError::Transport(format!("handshake {addr}: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A client keeping at most `max_connections` keep-alive connections to one address. A request
/// takes an idle connection (or opens one while under the cap, or waits for one), and gives it
/// back once its answer is read.
pub struct PooledClient {
    addr: SocketAddr,
    /// The `Host` header every request carries.
    host: HeaderValue,
    /// Connections with no request in flight, ready for the next one.
    idle: Mutex<Vec<Sender>>,
    /// One permit per connection a request may use at once.
    slots: Semaphore,
    /// Connections opened so far, for the report (reconnects show up here).
    connects: AtomicU64,
    /// The most connections at once.
    capacity: usize,
}

impl PooledClient {
    pub fn new(addr: SocketAddr, max_connections: usize) -> Result<Arc<PooledClient>, BenchError> {
        let host = HeaderValue::try_from(addr.to_string())
            .map_err(|e| BenchError::Setup(format!("bad address {addr}: {e}")))?;
        Ok(Arc::new(PooledClient {
            addr,
            host,
            idle: Mutex::new(Vec::with_capacity(max_connections)),
            slots: Semaphore::new(max_connections.max(1)),
            connects: AtomicU64::new(0),
            capacity: max_connections.max(1),
        }))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The most connections it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn connections_opened(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Opens connections until `count` are idle, so a measurement does not time connects.
    pub async fn prewarm(self: &Arc<Self>, count: usize) -> Result<(), BenchError> {
        let missing = count.saturating_sub(self.idle_count());
        let mut opened = tokio::task::JoinSet::new();
        for _ in 0..missing {
            let addr = self.addr;
            opened.spawn(async move { connect(addr).await });
        }
        while let Some(joined) = opened.join_next().await {
            let sender = joined.map_err(|e| BenchError::Transport(e.to_string()))??;
            self.connects.fetch_add(1, Ordering::Relaxed);
            self.lock_idle().push(sender);
        }
        Ok(())
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle_count(&self) -> usize {
        self.lock_idle().len()
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&self, template: &RequestTemplate) -> Result<Answer, BenchError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| BenchError::Transport(e.to_string()))?;
        let pooled = self.lock_idle().pop();
        let mut sender = match pooled {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                self.connects.fetch_add(1, Ordering::Relaxed);
                connect(self.addr).await?
            }
        };
        if sender.ready().await.is_err() {
            // The server closed an idle connection (keep-alive timeout): open a new one.
            self.connects.fetch_add(1, Ordering::Relaxed);
            sender = connect(self.addr).await?;
            sender
                .ready()
                .await
                .map_err(|e| BenchError::Transport(format!("connection not ready: {e}")))?;
        }
        let request = template.build(&self.host)?;
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| BenchError::Transport(format!("send: {e}")))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| BenchError::Transport(format!("read body: {e}")))?
                .to_bytes();
            Ok::<_, BenchError>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| BenchError::Transport(format!("no answer in {REQUEST_TIMEOUT:?}")))??;
        if !sender.is_closed() {
            self.lock_idle().push(sender);
        }
        Ok(answer)
    }
}

/// Sends one request on a fresh connection: for setting things up, not for measuring.
pub async fn one_request(
    addr: SocketAddr,
    template: &RequestTemplate,
) -> Result<Answer, BenchError> {
    PooledClient::new(addr, 1)?.send(template).await
}

/// What a worker sends.
#[derive(Clone, Debug)]
pub enum Workload {
    /// Go round these requests, the workers spread evenly over them.
    Cycle(Arc<[RequestTemplate]>),
    /// Each worker repeats: create a task, patch its progress, finish it.
    TaskLifecycle(Arc<Lifecycle>),
}

/// A task's life as the task-writer API sees it.
#[derive(Debug)]
pub struct Lifecycle {
    /// `X-VCAV-Auth` of a writer's session.
    pub auth: HeaderValue,
    /// The `POST /tasks` body.
    pub create_body: Bytes,
    /// Progress patches between create and finish.
    pub patches: u32,
}

/// The requests of one worker, in order.
enum Script {
    Cycle {
        templates: Arc<[RequestTemplate]>,
        next: usize,
    },
    Lifecycle {
        spec: Arc<Lifecycle>,
        /// The task being written, once its create was answered.
        task: Option<String>,
        /// Patches sent for it so far.
        patched: u32,
    },
}

impl Workload {
    /// The script of worker `worker` of `workers`. Cycling workers start evenly spread over
    /// the list, so two of them rarely ask for the same thing at the same time (a server may
    /// share concurrent identical reads, which would flatter it).
    fn script(&self, worker: usize, workers: usize) -> Script {
        match self {
            Workload::Cycle(templates) => Script::Cycle {
                templates: templates.clone(),
                next: worker * templates.len() / workers.max(1),
            },
            Workload::TaskLifecycle(spec) => Script::Lifecycle {
                spec: spec.clone(),
                task: None,
                patched: 0,
            },
        }
    }
}

impl Script {
    fn next_request(&mut self) -> RequestTemplate {
        match self {
            Script::Cycle { templates, next } => {
                let t = templates[*next % templates.len()].clone();
                *next = next.wrapping_add(1);
                t
            }
            Script::Lifecycle {
                spec, task: None, ..
            } => RequestTemplate::json(
                Method::POST,
                "/tasks",
                spec.create_body.clone(),
                StatusCode::CREATED,
            )
            .header(HeaderName::from_static("x-vcav-auth"), spec.auth.clone()),
            Script::Lifecycle {
                spec,
                task: Some(id),
                patched,
            } => {
                let body = if *patched < spec.patches {
                    format!(
                        "{{\"progress\":{}}}",
                        (*patched + 1) * 100 / (spec.patches + 1)
                    )
                } else {
                    r#"{"state":"SUCCEEDED","resultType":"string","result":"ok"}"#.to_owned()
                };
                RequestTemplate::json(Method::PATCH, format!("/tasks/{id}"), body, StatusCode::OK)
                    .header(HeaderName::from_static("x-vcav-auth"), spec.auth.clone())
            }
        }
    }

    /// Moves the script on after an answer (`None`: the request failed).
    fn observe(&mut self, answer: Option<&Answer>) {
        if let Script::Lifecycle {
            spec,
            task,
            patched,
        } = self
        {
            match (answer, task.is_some()) {
                (Some(a), false) => {
                    *task = serde_json::from_slice::<serde_json::Value>(&a.body)
                        .ok()
                        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned));
                    *patched = 0;
                }
                (Some(_), true) if *patched < spec.patches => *patched += 1,
                // Finished, or failed: start the next task.
                _ => {
                    *task = None;
                    *patched = 0;
                }
            }
        }
    }

    fn is_lifecycle(&self) -> bool {
        matches!(self, Script::Lifecycle { .. })
    }
}

/// What a measurement counted inside its window.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Answers with the expected status.
    pub ok: u64,
    /// Transport failures and unexpected statuses.
    pub errors: u64,
    /// The measured window (after warm-up).
    pub window: Duration,
    /// Latencies of the successful requests.
    pub latency: Histogram,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
    /// For an open loop: the rate asked for, requests per second.
    pub offered_rate: Option<f64>,
}

impl LoadResult {
    /// Successful requests per second over the window.
    pub fn throughput(&self) -> f64 {
        if self.window.is_zero() {
            0.0
        } else {
            self.ok as f64 / self.window.as_secs_f64()
        }
    }

    fn absorb(&mut self, other: Tally) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    latency: Histogram,
    first_error: Option<String>,
}

impl Tally {
    fn count(
        &mut self,
        template: &RequestTemplate,
        outcome: &Result<Answer, BenchError>,
        latency: Duration,
    ) {
        match outcome {
            Ok(answer) if answer.status == template.expect => {
                self.ok += 1;
                self.latency.record(latency);
            }
            Ok(answer) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    let body = String::from_utf8_lossy(&answer.body);
                    self.first_error = Some(format!(
                        "{} {} -> {} {}",
                        template.method,
                        template.path,
                        answer.status,
                        body.chars().take(200).collect::<String>()
                    ));
                }
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error =
                        Some(format!("{} {} -> {e}", template.method, template.path));
                }
            }
        }
    }
}

/// Runs `workers` closed-loop workers for `warmup` and then `measure`; counts the requests
/// answered inside the measured window (a slow scenario's requests may have been sent before
/// it), with their full latencies.
pub async fn closed_loop(
    client: &Arc<PooledClient>,
    workload: &Workload,
    workers: usize,
    warmup: Duration,
    measure: Duration,
) -> LoadResult {
    let start = Instant::now();
    let window_start = start + warmup;
    let window_end = window_start + measure;
    let mut running = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = client.clone();
        let mut script = workload.script(w, workers);
        running.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < window_end {
                let template = script.next_request();
                let sent = Instant::now();
                let outcome = client.send(&template).await;
                let done = Instant::now();
                let good = matches!(&outcome, Ok(a) if a.status == template.expect);
                if done >= window_start && done <= window_end {
                    tally.count(&template, &outcome, done - sent);
                }
                script.observe(if good { outcome.as_ref().ok() } else { None });
                if outcome.is_err() {
                    // A refused connection fails at once: do not spin on it.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tally
        });
    }
    let mut result = LoadResult {
        window: measure,
        ..LoadResult::default()
    };
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(tally) => result.absorb(tally),
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    result
}

/// Schedules requests at `rate` per second for `warmup` and then `measure`, sent by one worker
/// per connection of the client, as wrk2 does: a free worker takes the next slot of the
/// timetable. A slot whose time has passed (every worker was busy: the server is behind) is
/// sent at once and its latency counts from the slot's time, so the wait caused by slow
/// answers is measured, not omitted. A slot still ahead is waited for, and its latency counts
/// from when it was actually sent: the timer's millisecond granularity is the generator's
/// delay, not the server's. Every slot inside the window is sent and waited for. Only
/// [`Workload::Cycle`] can run open-loop: a task's life is sequential.
pub async fn open_loop(
    client: &Arc<PooledClient>,
    workload: &Workload,
    rate: f64,
    warmup: Duration,
    measure: Duration,
) -> Result<LoadResult, BenchError> {
    let Workload::Cycle(templates) = workload else {
        return Err(BenchError::Setup(
            "an open loop needs independent requests".into(),
        ));
    };
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::Setup(format!("bad open-loop rate {rate}")));
    }
    let start = Instant::now() + Duration::from_millis(5);
    let window_start = start + warmup;
    let window_end = window_start + measure;
    let next_slot = Arc::new(AtomicU64::new(0));
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..client.capacity() {
        let client = client.clone();
        let templates = templates.clone();
        let next_slot = next_slot.clone();
        running.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                let intended = start + Duration::from_secs_f64(slot as f64 / rate);
                if intended >= window_end {
                    return tally;
                }
                let from = if intended > Instant::now() {
                    tokio::time::sleep_until(intended.into()).await;
                    Instant::now()
                } else {
                    intended
                };
                let template = &templates[slot as usize % templates.len()];
                let outcome = client.send(template).await;
                if intended >= window_start {
                    tally.count(template, &outcome, from.elapsed());
                }
                if outcome.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    let mut result = LoadResult {
        window: measure,
        offered_rate: Some(rate),
        ..LoadResult::default()
    };
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(tally) => result.absorb(tally),
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Ok(result)
}

/// Whether a workload can run open-loop.
pub fn supports_open_loop(workload: &Workload) -> bool {
    !workload.script(0, 1).is_lifecycle()
}
