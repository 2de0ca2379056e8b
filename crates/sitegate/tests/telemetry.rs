//! Telemetry of real `sitegate serve` processes, checked from the outside.
//!
//! Traces go to OTLP receivers written here: an HTTP/protobuf one (hyper + prost) and a gRPC
//! one (the `TraceService` of `opentelemetry-proto`, served by hyper). Covered: one operation
//! has one trace across sites, with the trace ID derived from its operation ID (a UUID as is,
//! anything else hashed), and server -> client -> peer server -> store spans chained; a
//! caller's `traceparent` is continued on every site; export over gRPC; spans still queued
//! are flushed on SIGTERM; an absent or silent collector does not slow requests (nor, in an
//! ignored test of a known bug, hold up shutdown); JSON log lines of a request carry its
//! operation and trace IDs on both sites, with one access-log line each; `/metrics` is valid
//! Prometheus text with request, store, peer and session metrics that move as requests are
//! made.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::prometheus::{metric, Sample};
use sitegate_testkit::site as support;
use support::{env_vars, json_lines, send, wait_for, Federation, Reply, Site};

/// How long spans may take to reach a receiver (the batch delay is 0.5 s).
const SPAN_DEADLINE: Duration = Duration::from_secs(20);
/// How long a request's log lines may take to appear in the site's log file.
const LOG_DEADLINE: Duration = Duration::from_secs(10);
/// The server span name of Get One, on both sites.
const GET_ONE_ROUTE: &str = "GET /tasks/{task_id}";

// ---------------------------------------------------------------------------------------------
// OTLP receivers
// ---------------------------------------------------------------------------------------------

/// One span as a receiver got it, with its resource's attributes flattened in.
#[derive(Clone, Debug)]
struct SpanRecord {
    /// `sitegate.site` of the resource.
    site: String,
    /// `service.name` of the resource.
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

impl SpanRecord {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    fn is_server(&self) -> bool {
        self.kind == SpanKind::Server as i32
    }

    fn is_client(&self) -> bool {
        self.kind == SpanKind::Client as i32
    }

    /// Whether the span carries `op` as its operation ID attribute.
    fn has_operation(&self, op: &str) -> bool {
        self.attr("operation_id") == Some(op) || self.attr("sitegate.operation_id") == Some(op)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute_map(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValueKind::StringValue(s)) => s.clone(),
                Some(AnyValueKind::IntValue(i)) => i.to_string(),
                Some(AnyValueKind::BoolValue(b)) => b.to_string(),
                Some(AnyValueKind::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// What a receiver has been sent so far.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    exports: Arc<AtomicUsize>,
}

impl Received {
    fn record(&self, request: ExportTraceServiceRequest) {
        let mut got = Vec::new();
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attribute_map(&r.attributes))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    got.push(SpanRecord {
                        site: resource.get("sitegate.site").cloned().unwrap_or_default(),
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: attribute_map(&span.attributes),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(got);
        self.exports.fetch_add(1, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Vec<SpanRecord> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A receiver listening on 127.0.0.1; stops accepting when dropped.
struct Collector {
    port: u16,
    received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Accepts connections on an OS-chosen port and serves each with `serve`.
async fn listen<F, Fut>(serve: F) -> (u16, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a receiver port");
    let port = listener.local_addr().expect("receiver address").port();
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    (port, task)
}

/// An OTLP/HTTP receiver: protobuf `ExportTraceServiceRequest` bodies on `POST /v1/traces`.
async fn http_collector() -> Collector {
    let received = Received::default();
    let r = received.clone();
    let (port, task) = listen(move |stream| {
        let r = r.clone();
        async move {
            let service = service_fn(move |req| otlp_http(req, r.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
    Collector {
        port,
        received,
        task,
    }
}

async fn otlp_http(
    req: hyper::Request<Incoming>,
    received: Received,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let is_export = req.method() == hyper::Method::POST && req.uri().path() == "/v1/traces";
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let status = if !is_export {
        404
    } else if content_type != "application/x-protobuf" {
        415
    } else {
        match ExportTraceServiceRequest::decode(body) {
            Ok(request) => {
                received.record(request);
                200
            }
            Err(_) => 400,
        }
    };
    let response = hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        )))
        .expect("build the receiver's response");
    Ok(response)
}

/// The gRPC `TraceService`, recording what it is sent.
struct GrpcSink(Received);

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver (HTTP/2 cleartext).
async fn grpc_collector() -> Collector {
    let received = Received::default();
    let server = TraceServiceServer::new(GrpcSink(received.clone()));
    let (port, task) = listen(move |stream| {
        let service = TowerToHyperService::new(server.clone());
        async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
    Collector {
        port,
        received,
        task,
    }
}

/// A collector that accepts connections and never answers or reads.
async fn silent_collector() -> (u16, tokio::task::JoinHandle<()>) {
    let held = Arc::new(Mutex::new(Vec::new()));
    listen(move |stream| {
        let held = held.clone();
        async move {
            held.lock().unwrap_or_else(|e| e.into_inner()).push(stream);
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// A two-site federation with a task at site2 that alice reads from site1
// ---------------------------------------------------------------------------------------------

struct Pair {
    // Sites first: they are killed before the federation's directory goes.
    site1: Site,
    site2: Site,
    /// alice's session at site1, extended to site2.
    alice: String,
    /// alice's task at site2.
    task_id: String,
    _fed: Federation,
}

/// Starts site1 and site2 with the given extra environment, creates a task for alice at
/// site2 (as svc), logs alice in at site1 and extends her session to site2.
async fn pair(env1: &[(&str, String)], env2: &[(&str, String)]) -> Pair {
    let fed = Federation::init(&["site1", "site2"]);
    let mut site1 = fed.site("site1");
    let mut site2 = fed.site("site2");
    site1.env = env_vars(env1);
    site2.env = env_vars(env2);
    tokio::join!(site1.start(), site2.start());
    let svc = site2.login("svc").await;
    let task = site2
        .create_task(
            &svc,
            &json!({"user": "alice", "workflowInfo": {"type": "sync"}}),
        )
        .await;
    let task_id = support::id_of(&task);
    let alice = site1.login("alice").await;
    site1
        .extend_multisite(&alice, "site2")
        .await
        .expect(200, None);
    Pair {
        site1,
        site2,
        alice,
        task_id,
        _fed: fed,
    }
}

impl Pair {
    /// alice's Get One of her task at site2, sent to site1, with extra headers; must be 200.
    async fn remote_get(&self, headers: &[(&str, &str)]) -> Reply {
        let mut rb = self
            .site1
            .request(Method::GET, &format!("/tasks/{}?site=site2", self.task_id))
            .header("X-VCAV-Auth", &self.alice);
        for (name, value) in headers {
            rb = rb.header(*name, *value);
        }
        let reply = send(rb).await;
        reply.expect(200, None);
        assert_eq!(reply.body["id"], json!(self.task_id), "{reply:?}");
        assert_eq!(reply.body["site"], json!("site2"), "{reply:?}");
        reply
    }

    /// Both sites export to `endpoint` over `protocol`.
    async fn exporting(endpoint: &str, protocol: &str) -> Pair {
        let env = [
            ("SITEGATE_TELEMETRY__OTLP_ENDPOINT", endpoint.to_owned()),
            ("SITEGATE_TELEMETRY__OTLP_PROTOCOL", protocol.to_owned()),
        ];
        pair(&env, &env).await
    }
}

/// Every span of a trace, one per line, for failure messages.
fn describe(spans: &[SpanRecord]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  [{}] {:?} kind={} trace={} span={} parent={} attrs={:?}",
                s.site, s.name, s.kind, s.trace_id, s.span_id, s.parent_span_id, s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The spans of one cross-site Get One, found by their links.
struct Chain {
    site1_server: SpanRecord,
    site1_client: SpanRecord,
    site2_server: SpanRecord,
    site2_store: SpanRecord,
}

/// Finds, within `trace_id`, the chain site1 server span -> its client span -> site2's server
/// span -> site2's `get_task` store span, each the direct child of the one before.
fn find_chain(spans: &[SpanRecord], trace_id: &str) -> Option<Chain> {
    let trace: Vec<&SpanRecord> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let site1_server = trace
        .iter()
        .find(|s| s.site == "site1" && s.is_server() && s.name == GET_ONE_ROUTE)?;
    let site1_client = trace
        .iter()
        .find(|s| s.site == "site1" && s.is_client() && s.parent_span_id == site1_server.span_id)?;
    let site2_server = trace.iter().find(|s| {
        s.site == "site2"
            && s.is_server()
            && s.name == GET_ONE_ROUTE
            && s.parent_span_id == site1_client.span_id
    })?;
    let site2_store = trace.iter().find(|s| {
        s.site == "site2" && s.name == "get_task" && s.parent_span_id == site2_server.span_id
    })?;
    Some(Chain {
        site1_server: (*site1_server).clone(),
        site1_client: (*site1_client).clone(),
        site2_server: (*site2_server).clone(),
        site2_store: (*site2_store).clone(),
    })
}

/// Waits for the whole chain of a cross-site Get One in `trace_id` and returns it.
async fn wait_for_chain(collector: &Collector, trace_id: &str) -> Chain {
    let what = format!("the spans of trace {trace_id} from both sites");
    let deadline = Instant::now() + SPAN_DEADLINE;
    loop {
        let spans = collector.received.snapshot();
        if let Some(chain) = find_chain(&spans, trace_id) {
            return chain;
        }
        if Instant::now() > deadline {
            let trace: Vec<SpanRecord> = spans
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            panic!(
                "timed out waiting for {what}: want site1 server -> site1 client -> site2 \
                 server -> site2 get_task, each a direct child; spans of the trace ({} of {} \
                 received):\n{}",
                trace.len(),
                spans.len(),
                describe(&trace)
            );
        }
        tokio::time::sleep(support::POLL_INTERVAL).await;
    }
}

/// Checks what every link of the chain must be: names, kinds, resources, operation ID.
fn check_chain(chain: &Chain, task_id: &str, op: &str) {
    let Chain {
        site1_server,
        site1_client,
        site2_server,
        site2_store,
    } = chain;
    for span in [site1_server, site1_client, site2_server, site2_store] {
        assert_eq!(span.service, "sitegate", "service.name of {span:?}");
    }
    assert_eq!(site1_server.site, "site1");
    assert_eq!(site1_client.site, "site1");
    assert_eq!(site2_server.site, "site2");
    assert_eq!(site2_store.site, "site2");
    // Named by the route template, like the server spans: a name per task would make the
    // tracing backend's span-name index grow with every task.
    assert_eq!(site1_client.name, GET_ONE_ROUTE, "client span name");
    assert!(!site1_client.name.contains(task_id));
    for server in [site1_server, site2_server] {
        assert!(
            server.has_operation(op),
            "the server span does not carry operation ID {op}: {server:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Traces
// ---------------------------------------------------------------------------------------------

/// A UUID operation ID is the trace ID on both sites, and the spans of one cross-site Get One
/// form one chain from site1's server span down to site2's store call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_operation_id_is_the_trace_id_on_both_sites() {
    let collector = http_collector().await;
    let p = Pair::exporting(&collector.endpoint(), "http").await;
    let op = uuid::Uuid::new_v4();
    let op_text = op.to_string();
    let reply = p.remote_get(&[("operationID", &op_text)]).await;
    assert_eq!(reply.operation_id(), op_text);
    let trace_id = op.simple().to_string();

    let chain = wait_for_chain(&collector, &trace_id).await;
    check_chain(&chain, &p.task_id, &op_text);
    assert_eq!(
        chain.site1_server.parent_span_id, "",
        "without traceparent the site1 server span is a root: {:?}",
        chain.site1_server
    );

    // Every span carrying this operation ID, on either site, is in this one trace.
    let spans = collector.received.snapshot();
    let with_op: Vec<&SpanRecord> = spans.iter().filter(|s| s.has_operation(&op_text)).collect();
    assert!(with_op.len() >= 2, "{}", describe(&spans));
    for span in with_op {
        assert_eq!(span.trace_id, trace_id, "span of the operation: {span:?}");
    }
    let sites: std::collections::BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .map(|s| s.site.as_str())
        .collect();
    assert_eq!(sites.into_iter().collect::<Vec<_>>(), ["site1", "site2"]);
}

/// Any other operation ID is hashed: the trace ID is the first 16 bytes of its SHA-256, and
/// the same on both sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_operation_ids_are_hashed_to_the_trace_id() {
    use sha2::Digest;
    let collector = http_collector().await;
    let p = Pair::exporting(&collector.endpoint(), "http").await;
    let op = "my-op-42";
    let reply = p.remote_get(&[("operationID", op)]).await;
    assert_eq!(reply.operation_id(), op);
    let digest = sha2::Sha256::digest(op.as_bytes());
    let trace_id = hex(&digest[..16]);

    let chain = wait_for_chain(&collector, &trace_id).await;
    check_chain(&chain, &p.task_id, op);
    let spans = collector.received.snapshot();
    for site in ["site1", "site2"] {
        let servers: Vec<&SpanRecord> = spans
            .iter()
            .filter(|s| s.site == site && s.is_server() && s.has_operation(op))
            .collect();
        assert!(!servers.is_empty(), "no server span of {op} at {site}");
        for span in servers {
            assert_eq!(span.trace_id, trace_id, "{site}: {span:?}");
        }
    }
}

/// A caller's `traceparent` is continued on both sites; the operation ID stays an attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_traceparent_is_continued_across_sites() {
    let collector = http_collector().await;
    let p = Pair::exporting(&collector.endpoint(), "http").await;
    let op = uuid::Uuid::new_v4().to_string();
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    let reply = p
        .remote_get(&[
            ("operationID", &op),
            ("traceparent", &traceparent),
            ("baggage", "caller.key=caller-value"),
        ])
        .await;
    assert_eq!(reply.operation_id(), op);

    let chain = wait_for_chain(&collector, &trace_id).await;
    check_chain(&chain, &p.task_id, &op);
    assert_eq!(
        chain.site1_server.parent_span_id, parent_id,
        "site1's server span is the child of the caller's span: {:?}",
        chain.site1_server
    );

    // The operation's spans are all in the caller's trace, none in the derived one.
    let derived = op.replace('-', "");
    let spans = collector.received.snapshot();
    assert!(
        !spans.iter().any(|s| s.trace_id == derived),
        "a span in the trace derived from the operation ID although a traceparent was sent:\n{}",
        describe(&spans)
    );
    for span in spans.iter().filter(|s| s.has_operation(&op)) {
        assert_eq!(span.trace_id, trace_id, "{span:?}");
    }
}

/// Export over OTLP/gRPC reaches a gRPC `TraceService`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_grpc() {
    let collector = grpc_collector().await;
    let p = Pair::exporting(&collector.endpoint(), "grpc").await;
    let op = uuid::Uuid::new_v4();
    let op_text = op.to_string();
    p.remote_get(&[("operationID", &op_text)]).await;
    let trace_id = op.simple().to_string();

    let chain = wait_for_chain(&collector, &trace_id).await;
    check_chain(&chain, &p.task_id, &op_text);
    assert!(collector.received.exports.load(Ordering::SeqCst) >= 2);
}

/// Spans still queued when a site is stopped (SIGTERM right after the request, well before
/// the next scheduled export) are flushed before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_flushed_on_sigterm() {
    let collector = http_collector().await;
    let mut p = Pair::exporting(&collector.endpoint(), "http").await;
    let op = uuid::Uuid::new_v4();
    let op_text = op.to_string();
    p.remote_get(&[("operationID", &op_text)]).await;
    let (status1, status2) = tokio::join!(p.site1.terminate(), p.site2.terminate());
    assert!(status1.success(), "site1 exited with {status1}");
    assert!(status2.success(), "site2 exited with {status2}");
    // Both processes are gone: whatever arrives now was sent before they exited.
    let chain = wait_for_chain(&collector, &op.simple().to_string()).await;
    check_chain(&chain, &p.task_id, &op_text);
}

/// A collector that is not there (site1: connection refused over HTTP) or never answers
/// (site2: accepts, then silence, over gRPC) neither fails nor slows requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_slow_requests() {
    let closed = support::free_base_port(1);
    let (silent, _silent_task) = silent_collector().await;
    let p = pair(
        &[
            (
                "SITEGATE_TELEMETRY__OTLP_ENDPOINT",
                format!("http://127.0.0.1:{closed}"),
            ),
            ("SITEGATE_TELEMETRY__OTLP_PROTOCOL", "http".to_owned()),
        ],
        &[
            (
                "SITEGATE_TELEMETRY__OTLP_ENDPOINT",
                format!("http://127.0.0.1:{silent}"),
            ),
            ("SITEGATE_TELEMETRY__OTLP_PROTOCOL", "grpc".to_owned()),
        ],
    )
    .await;
    // At least 50 requests, and for long enough that several exports were tried and failed
    // (the batch delay is 0.5 s, the export timeout 3 s).
    let started = Instant::now();
    let mut latencies = Vec::new();
    while latencies.len() < 50 || started.elapsed() < Duration::from_secs(4) {
        assert!(latencies.len() < 5000, "runaway loop");
        let t = Instant::now();
        p.remote_get(&[]).await;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let slowest = latencies[latencies.len() - 1];
    let median = latencies[latencies.len() / 2];
    assert!(
        slowest < Duration::from_secs(1),
        "slowest of {} requests took {slowest:?} (median {median:?})",
        latencies.len()
    );
    assert!(
        median < Duration::from_millis(250),
        "median of {} requests is {median:?}",
        latencies.len()
    );
    // Both sites still answer their operations endpoints promptly.
    for site in [&p.site1, &p.site2] {
        let t = Instant::now();
        site.get("/healthz", None).await.expect(200, None);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}

/// Sends `count` `GET /healthz` to `site` from 8 concurrent tasks (one span each).
async fn traced_burst(site: &Site, count: usize) {
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let client = site.client.clone();
            // A traced request (health checks are not traced): refused for want of a session.
            let url = site.url("/sites");
            tokio::spawn(async move {
                for _ in (i..count).step_by(8) {
                    let r = client.get(&url).send().await.expect("GET /sites");
                    assert_eq!(r.status().as_u16(), 401);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("burst task");
    }
}

/// A graceful stop is not held up for long by the final flush to a collector that accepts
/// connections and never answers, even with several batches of spans still queued.
///
/// The batch processor works through every queued batch on shutdown, each export waiting out
/// the exporter's timeout, and ignores shutdown timeouts; `Telemetry::shutdown` bounds the
/// wait itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_collector_does_not_hold_up_a_graceful_stop() {
    let (silent, _silent_task) = silent_collector().await;
    let endpoint = format!("http://127.0.0.1:{silent}");
    let mut p = pair(
        &[
            ("SITEGATE_TELEMETRY__OTLP_ENDPOINT", endpoint.clone()),
            ("SITEGATE_TELEMETRY__OTLP_PROTOCOL", "http".to_owned()),
        ],
        &[
            ("SITEGATE_TELEMETRY__OTLP_ENDPOINT", endpoint),
            ("SITEGATE_TELEMETRY__OTLP_PROTOCOL", "grpc".to_owned()),
        ],
    )
    .await;
    // Several batches' worth of spans at each site (a batch is 512 spans).
    tokio::join!(traced_burst(&p.site1, 2500), traced_burst(&p.site2, 2500));
    let t = Instant::now();
    let (status1, status2) = tokio::join!(
        async {
            let status = p.site1.terminate().await;
            (status, t.elapsed())
        },
        async {
            let status = p.site2.terminate().await;
            (status, t.elapsed())
        }
    );
    for (name, (status, took)) in [("site1", status1), ("site2", status2)] {
        assert!(status.success(), "{name} exited with {status}");
        assert!(
            took < Duration::from_secs(10),
            "{name} took {took:?} to stop"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

fn access_line<'a>(lines: &'a [Value], op: &str) -> Option<&'a Value> {
    lines
        .iter()
        .find(|l| l["target"] == json!("sitegate::access") && l["operation_id"] == json!(op))
}

/// With JSON logs, every line of a request on every site it crossed carries its operation ID
/// and trace ID, and each site writes one access-log line for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_operation_and_trace_ids_on_both_sites() {
    let env = [("SITEGATE_LOG__FORMAT", "json".to_owned())];
    let p = pair(&env, &env).await;
    let op = uuid::Uuid::new_v4();
    let op_text = op.to_string();
    p.remote_get(&[("operationID", &op_text)]).await;
    let trace_id = op.simple().to_string();

    for site in [&p.site1, &p.site2] {
        let what = format!("the access-log line of {op_text} at {}", site.name);
        wait_for(&what, LOG_DEADLINE, || {
            let found = access_line(&json_lines(&site.stderr()), &op_text).is_some();
            async move { found.then_some(()) }
        })
        .await;
    }

    for site in [&p.site1, &p.site2] {
        let log = site.stderr();
        let mentioning: Vec<&str> = log.lines().filter(|l| l.contains(&op_text)).collect();
        assert!(
            !mentioning.is_empty(),
            "{}: no line of {op_text}",
            site.name
        );
        for line in &mentioning {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "{}: a line of the request is not JSON ({e}): {line}",
                    site.name
                )
            });
            assert_eq!(
                value["operation_id"],
                json!(op_text),
                "{}: {line}",
                site.name
            );
            assert_eq!(value["trace_id"], json!(trace_id), "{}: {line}", site.name);
            assert_eq!(value["site"], json!(site.name), "{}: {line}", site.name);
            assert!(
                value["span_id"].as_str().is_some_and(|s| s.len() == 16),
                "{}: span_id in {line}",
                site.name
            );
        }

        let lines = json_lines(&site.stderr());
        let accesses: Vec<&Value> = lines
            .iter()
            .filter(|l| {
                l["target"] == json!("sitegate::access") && l["operation_id"] == json!(op_text)
            })
            .collect();
        assert_eq!(
            accesses.len(),
            1,
            "{}: access-log lines of {op_text}: {accesses:?}",
            site.name
        );
        let access = accesses[0];
        assert_eq!(access["status"], json!(200), "{}: {access}", site.name);
        assert_eq!(
            access["target_site"],
            json!("site2"),
            "{}: {access}",
            site.name
        );
        assert!(
            access["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{}: latency_ms in {access}",
            site.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics (parsed, strictly, by `sitegate_testkit::prometheus`)
// ---------------------------------------------------------------------------------------------

/// `/metrics` is valid Prometheus text, and its request, store, peer and session metrics follow
/// the requests made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_requests_on_both_sites() {
    let p = pair(&[], &[]).await;
    // Logins: alice (in `pair`) and bob at site1; svc and alice's multisite session at site2.
    p.site1.login("bob").await;

    let route = [
        ("route", "/tasks/{task_id}"),
        ("method", "GET"),
        ("status", "200"),
    ];
    let count =
        |samples: &[Sample]| metric(samples, "sitegate_requests_total", &route).unwrap_or_default();
    let before1 = count(&p.site1.scrape().await);
    let before2 = count(&p.site2.scrape().await);
    const N: usize = 7;
    for _ in 0..N {
        p.remote_get(&[]).await;
    }
    let site1 = p.site1.scrape().await;
    let site2 = p.site2.scrape().await;

    for (name, samples, before) in [("site1", &site1, before1), ("site2", &site2, before2)] {
        assert_eq!(
            count(samples) - before,
            N as f64,
            "{name}: sitegate_requests_total of Get One grew by the requests made"
        );
        let with_target = metric(
            samples,
            "sitegate_requests_total",
            &[("route", "/tasks/{task_id}"), ("target_site", "site2")],
        );
        assert!(
            with_target.is_some_and(|n| n >= N as f64),
            "{name}: Get One requests answered by site2: {with_target:?}"
        );
        let buckets: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.name == "sitegate_request_duration_seconds_bucket"
                    && s.labels
                        .iter()
                        .any(|(k, v)| k == "route" && v == "/tasks/{task_id}")
            })
            .collect();
        assert!(
            buckets
                .iter()
                .any(|s| s.labels.iter().any(|(k, _)| k == "le")),
            "{name}: no sitegate_request_duration_seconds_bucket of Get One"
        );
        let inf = metric(
            samples,
            "sitegate_request_duration_seconds_bucket",
            &[("route", "/tasks/{task_id}"), ("le", "+Inf")],
        );
        let total = metric(
            samples,
            "sitegate_request_duration_seconds_count",
            &[("route", "/tasks/{task_id}")],
        );
        assert!(
            inf.is_some() && inf == total,
            "{name}: +Inf bucket {inf:?} != count {total:?}"
        );
        let sessions = metric(samples, "sitegate_sessions_active", &[]);
        assert!(
            sessions.is_some_and(|n| n >= 2.0),
            "{name}: sitegate_sessions_active = {sessions:?}, want >= 2"
        );
    }

    let peer_up = metric(&site1, "sitegate_peer_up", &[("peer", "site2")]);
    assert_eq!(
        peer_up,
        Some(1.0),
        "site1: sitegate_peer_up{{peer=\"site2\"}}"
    );
    let store_reads = metric(
        &site2,
        "sitegate_store_operation_duration_seconds_count",
        &[("op", "get_task")],
    );
    assert!(
        store_reads.is_some_and(|n| n >= N as f64),
        "site2: get_task store operations counted: {store_reads:?}"
    );
}
