//! Traces, logs and metrics; the only module that touches OpenTelemetry.
//!
//! - Trace context: a request's server span continues the caller's W3C `traceparent` (with its
//!   `tracestate` and `baggage`); without one, its trace ID is derived from the operation ID
//!   (`sitegate_model::operation::derive_trace_id`), so the same operation has the same trace
//!   ID on every site it crosses. The operation ID is a span attribute and a baggage entry.
//! - Export: OTLP over HTTP/protobuf or gRPC with a batch processor on the tokio runtime; off
//!   when no endpoint is configured. A slow or absent collector costs dropped spans, never
//!   request latency: the queue is bounded and exports run in the background.
//! - Logs: JSON lines (or text on a terminal) where every line logged inside a request carries
//!   `operation_id`, `trace_id`, `span_id` and `site` at the top level.
//! - Metrics: a Prometheus recorder behind `GET /metrics`.

use std::cell::Cell;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::HeaderMap;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{global, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, IdGenerator, RandomIdGenerator, Sampler, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use sitegate_model::config::{LogConfig, LogFormat, OtlpProtocol, TelemetryConfig};
use sitegate_model::operation::{derive_trace_id, OperationId};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The baggage key that carries the operation ID across sites.
pub const OPERATION_ID_BAGGAGE: &str = "sitegate.operation_id";

thread_local! {
    /// The trace ID the next root span built on this thread must have. Set only around the
    /// synchronous construction of a request span.
    static NEXT_TRACE_ID: Cell<Option<[u8; 16]>> = const { Cell::new(None) };
}

/// Random IDs, except for a root request span, whose trace ID comes from its operation ID.
#[derive(Debug, Default)]
struct OperationTraceIds {
    random: RandomIdGenerator,
}

impl IdGenerator for OperationTraceIds {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_TRACE_ID.with(Cell::take) {
            Some(bytes) => TraceId::from_bytes(bytes),
            None => self.random.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        self.random.new_span_id()
    }
}

/// Keeps the tracer provider and the log writer alive; `shutdown` flushes spans still queued,
/// and dropping it flushes log lines still queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
}

/// The longest a stop waits for queued spans to reach the collector.
const FLUSH_LIMIT: Duration = Duration::from_secs(3);

/// Log targets never logged below info, because below it they log secrets.
const SECRET_BEARING_TARGETS: &[&str] = &["tokio_postgres"];

impl Telemetry {
    /// Flushes queued spans, waiting at most [`FLUSH_LIMIT`]: a collector that accepts
    /// connections but never answers must not hold up a stop past an orchestrator's grace
    /// period (the batch processor itself ignores shutdown timeouts). Spans not sent by then
    /// are dropped.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(FLUSH_LIMIT, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "trace provider shutdown"),
            Ok(Err(e)) => tracing::debug!(error = %e, "trace provider shutdown task"),
            Err(_) => tracing::warn!("trace export did not finish in time; queued spans dropped"),
        }
    }
}

fn otlp_exporter(
    endpoint: &str,
    protocol: OtlpProtocol,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let timeout = Duration::from_secs(3);
    let exporter = match protocol {
        OtlpProtocol::Http => {
            let base = endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") {
                base.to_owned()
            } else {
                format!("{base}/v1/traces")
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_timeout(timeout)
                .build()
        }
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build(),
    };
    exporter.map_err(|e| format!("OTLP exporter: {e}"))
}

/// Sets up tracing, logging and the propagators for this process. Must run inside the tokio
/// runtime (the batch exporter lives on it). `site` becomes the `sitegate.site` resource
/// attribute.
pub fn init(log: &LogConfig, config: &TelemetryConfig, site: &str) -> Result<Telemetry, String> {
    let terminal = std::io::stderr().is_terminal();
    init_with_writer(log, config, site, std::io::stderr(), terminal)
}

/// [`init`], with log lines going to `writer` (the demo's log file). `terminal` says whether a
/// person reads it live: it picks text for `format = "auto"` and allows colours.
pub fn init_with_writer<W: std::io::Write + Send + 'static>(
    log: &LogConfig,
    config: &TelemetryConfig,
    site: &str,
    writer: W,
    terminal: bool,
) -> Result<Telemetry, String> {
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let resource = Resource::builder()
        .with_service_name("sitegate")
        .with_attributes([KeyValue::new("sitegate.site", site.to_owned())])
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_id_generator(OperationTraceIds::default())
        // Parent-based even without export, so the sampled flag passed to peers is the
        // caller's decision, not an accident of this site's configuration.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = otlp_exporter(endpoint, config.otlp_protocol)?;
        // Large, infrequent batches: per-export overhead is what costs throughput.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(16384)
            .with_max_export_batch_size(2048)
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(batch)
            .build();
        builder = builder.with_span_processor(processor);
    }
    let provider = builder.build();
    let tracer = provider.tracer("sitegate");

    let filter = || {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&log.level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        // Whatever level is asked for, these targets stay at info: below it they print the
        // data they handle, and that holds secrets (tokio-postgres logs every bound query
        // parameter at debug, among them the session tokens this site holds at peers). The
        // more specific directive wins over a general `debug`.
        SECRET_BEARING_TARGETS
            .iter()
            .filter_map(|target| format!("{target}=info").parse().ok())
            .fold(filter, EnvFilter::add_directive)
    };
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    // Lines are written by a background thread, so request handling never waits on a
    // write(2) or on a lock around stderr. Not lossy: a full queue makes logging wait rather
    // than drop lines. 8k lines (a few MiB) absorb bursts; a deeper queue only held up to
    // tens of MiB of lines when the writer fell behind under load, with no gain in speed.
    //
    // The writer thread writes through a buffer that it flushes whenever its queue is empty:
    // under load many lines go out in one write(2) instead of one each (stderr itself is
    // unbuffered), and when quiet every line is still written as soon as it is logged.
    let (writer, log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(8_192)
        .finish(std::io::BufWriter::with_capacity(64 * 1024, writer));
    let fmt_layer = if json {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .event_format(JsonLines)
            // JSON lines take the request's IDs from `RequestIds`; the text formatter's copy
            // of every span's fields (formatted into a string per span) would go unused.
            .fmt_fields(NoSpanFields)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(terminal)
            .boxed()
    };
    // Spans reach the tracer whatever the log level: a quiet log must not mean no traces.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        // A plain level, not an EnvFilter: it is consulted on every enter and exit of every
        // span, and a static level check costs next to nothing.
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(RequestIdsLayer)
        .with(otel_layer)
        .with(fmt_layer.with_filter(filter()))
        .try_init()
        .map_err(|e| format!("logging was already set up: {e}"))?;
    Ok(Telemetry {
        provider,
        _log_writer: log_guard,
    })
}

/// Opens the server span of one request: continues the caller's trace, or starts one whose
/// trace ID is derived from the operation ID; keeps the IDs for the request's log lines.
/// A `quiet` request (health checks, metrics scrapes) gets a debug-level span: neither
/// exported nor logged at the default level, so probes every few hundred milliseconds do not
/// drown real operations.
pub fn request_span(
    headers: &HeaderMap,
    operation_id: &OperationId,
    site: &str,
    name: &str,
    from_peer: &str,
    quiet: bool,
) -> Span {
    macro_rules! request_span_at {
        ($level:expr) => {
            tracing::span!(
                $level,
                "request",
                otel.name = %name,
                otel.kind = "server",
                operation_id = %operation_id,
                site = %site,
                from_peer,
                target_site = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            )
        };
    }
    let span = if quiet {
        request_span_at!(tracing::Level::DEBUG)
    } else {
        request_span_at!(tracing::Level::INFO)
    };
    let extracted = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let continues = extracted.span().span_context().is_valid();
    let mut baggage: Vec<KeyValue> = extracted
        .baggage()
        .iter()
        .filter(|(key, _)| key.as_str() != OPERATION_ID_BAGGAGE)
        .map(|(key, (value, _))| KeyValue::new(key.clone(), value.clone()))
        .collect();
    baggage.push(KeyValue::new(
        OPERATION_ID_BAGGAGE,
        operation_id.as_str().to_owned(),
    ));
    let parent = extracted.with_baggage(baggage);
    if span.set_parent(parent).is_err() {
        // No OpenTelemetry layer (tools, unit tests): the request still works, untraced.
        return span;
    }
    let cx = if continues {
        span.context()
    } else {
        // Building the span now, on this thread, is what lets the ID generator see the
        // derived trace ID; it is cleared right after so no other span can take it.
        NEXT_TRACE_ID.with(|next| next.set(Some(derive_trace_id(operation_id.as_str()))));
        let cx = span.context();
        NEXT_TRACE_ID.with(|next| next.set(None));
        cx
    };
    let span_context = cx.span().span_context().clone();
    if span_context.is_valid() {
        // Kept beside the span for the log formatter rather than as span fields, which would
        // be exported again as attributes duplicating the span's own IDs.
        span.with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>();
            if let Some(span) = registry.and_then(|r| r.span(id)) {
                if let Some(ids) = span.extensions_mut().get_mut::<RequestIds>() {
                    ids.trace_id = span_context.trace_id().to_string();
                    ids.span_id = span_context.span_id().to_string();
                }
            }
        });
    }
    span
}

/// Writes `span`'s trace context (`traceparent`, `tracestate`, `baggage`) into `headers`.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once); later calls return the same handle.
pub fn metrics() -> Option<&'static PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

/// Drains the recorder's histogram samples into their buckets every few seconds. Without it
/// the samples of every request wait for the next `/metrics` scrape, and a site nobody
/// scrapes grows by about 19 bytes a request (measured); the exporter's own upkeep task runs
/// only with its HTTP listener, which we do not use.
pub async fn metrics_upkeep() {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        if let Some(handle) = metrics() {
            handle.run_upkeep();
        }
    }
}

/// The IDs every log line of a request carries, kept on the request span.
#[derive(Default, Clone)]
struct RequestIds {
    operation_id: String,
    trace_id: String,
    span_id: String,
    site: String,
    target_site: String,
    from_peer: String,
}

impl Visit for RequestIds {
    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "operation_id" => &mut self.operation_id,
            "trace_id" => &mut self.trace_id,
            "span_id" => &mut self.span_id,
            "site" => &mut self.site,
            "target_site" => &mut self.target_site,
            "from_peer" => &mut self.from_peer,
            _ => return,
        };
        *slot = value.to_owned();
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// Captures [`RequestIds`] from request spans as they are created and recorded.
struct RequestIdsLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RequestIdsLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "request" {
            return;
        }
        let mut ids = RequestIds::default();
        attrs.record(&mut ids);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(ids) = span.extensions_mut().get_mut::<RequestIds>() {
                values.record(ids);
            }
        }
    }
}

/// One JSON object per line: time, level, target, message and fields, and the request's IDs
/// at the top level so `grep '"operation_id":"X"'` finds every line of an operation.
///
/// Written straight into the formatter's line buffer (which the fmt layer keeps per thread
/// and reuses): no map, no per-field allocation. The access log writes a line per request,
/// so this is on every request's path; building a `serde_json::Map` per line cost about a
/// tenth of a proxied read's CPU (measured with `perf`). A field of the event wins over a
/// span's ID of the same name, and over the fixed keys, as before.
struct JsonLines;

/// Formats no span fields: see where the JSON layer is built.
struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _writer: Writer<'writer>,
        _fields: R,
    ) -> std::fmt::Result {
        Ok(())
    }
}

/// The names of an event's fields, gathered first so that no key is written twice.
#[derive(Default)]
struct FieldNames {
    names: [&'static str; 32],
    len: usize,
}

impl FieldNames {
    fn contains(&self, name: &str) -> bool {
        self.names[..self.len].contains(&name)
    }
}

impl Visit for FieldNames {
    fn record_debug(&mut self, field: &Field, _value: &dyn std::fmt::Debug) {
        if self.len < self.names.len() {
            self.names[self.len] = field.name();
            self.len += 1;
        }
    }
}

/// Writes what it is given as the inside of a JSON string: quotes, backslashes and control
/// characters escaped.
struct Escaped<'a, W: std::fmt::Write>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// One `"key":value` after another, commas between.
struct JsonObject<'a, W: std::fmt::Write> {
    out: &'a mut W,
    empty: bool,
    result: std::fmt::Result,
}

impl<'a, W: std::fmt::Write> JsonObject<'a, W> {
    fn open(out: &'a mut W) -> Self {
        let result = out.write_char('{');
        JsonObject {
            out,
            empty: true,
            result,
        }
    }

    fn key(&mut self, key: &str) -> std::fmt::Result {
        use std::fmt::Write as _;
        if !std::mem::take(&mut self.empty) {
            self.out.write_char(',')?;
        }
        self.out.write_char('"')?;
        Escaped(&mut *self.out).write_str(key)?;
        self.out.write_str("\":")
    }

    fn string(&mut self, key: &str, value: &str) {
        use std::fmt::Write as _;
        if self.result.is_ok() {
            self.result = self
                .key(key)
                .and_then(|()| self.out.write_char('"'))
                .and_then(|()| Escaped(&mut *self.out).write_str(value))
                .and_then(|()| self.out.write_char('"'));
        }
    }

    fn raw(&mut self, key: &str, value: std::fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.key(key).and_then(|()| self.out.write_fmt(value));
        }
    }

    fn close(self) -> std::fmt::Result {
        self.result.and_then(|()| self.out.write_char('}'))
    }
}

impl<W: std::fmt::Write> Visit for JsonObject<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field.name(), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field.name(), format_args!("{value}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field.name(), format_args!("{value}"));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field.name(), format_args!("{value}"));
        } else {
            self.raw(field.name(), format_args!("null"));
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field.name(), format_args!("{value}"));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if self.result.is_ok() {
            self.result = self
                .key(field.name())
                .and_then(|()| self.out.write_char('"'))
                .and_then(|()| write!(Escaped(&mut *self.out), "{value:?}"))
                .and_then(|()| self.out.write_char('"'));
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut names = FieldNames::default();
        event.record(&mut names);
        let mut line = JsonObject::open(&mut writer);
        if !names.contains("timestamp") && line.result.is_ok() {
            line.result = line.key("timestamp").and_then(|()| {
                line.out.write_char('"')?;
                SystemTime.format_time(&mut Writer::new(&mut *line.out))?;
                line.out.write_char('"')
            });
        }
        if !names.contains("level") {
            line.string("level", event.metadata().level().as_str());
        }
        if !names.contains("target") {
            line.string("target", event.metadata().target());
        }
        event.record(&mut line);
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope {
                innermost.get_or_insert(span.name());
                if let Some(ids) = span.extensions().get::<RequestIds>() {
                    for (key, value) in [
                        ("operation_id", &ids.operation_id),
                        ("trace_id", &ids.trace_id),
                        ("span_id", &ids.span_id),
                        ("site", &ids.site),
                        ("target_site", &ids.target_site),
                        ("from_peer", &ids.from_peer),
                    ] {
                        if !value.is_empty() && !names.contains(key) {
                            line.string(key, value);
                        }
                    }
                    break;
                }
            }
            if let (Some(name), false) = (innermost, names.contains("span")) {
                line.string("span", name);
            }
        }
        line.close()?;
        writer.write_char('\n')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    #[test]
    fn json_strings_are_escaped_whole() {
        let mut out = String::new();
        Escaped(&mut out)
            .write_str("a \"quoted\" \\ path\nnext\tline\u{1}\u{7f} é")
            .unwrap();
        let parsed: String = serde_json::from_str(&format!("\"{out}\"")).unwrap();
        assert_eq!(parsed, "a \"quoted\" \\ path\nnext\tline\u{1}\u{7f} é");
    }

    /// Lines written by the subscriber as a site sets it up: valid JSON, the request's IDs at
    /// the top level, an event's own field winning over a span's of the same name.
    #[test]
    fn json_lines_are_objects_with_the_request_ids() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::registry().with(RequestIdsLayer).with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || sink.clone())
                .event_format(JsonLines),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                operation_id = "op-\"1\"",
                site = "site1",
                target_site = tracing::field::Empty,
            );
            let _entered = span.enter();
            span.record("target_site", "site2");
            tracing::info!(
                status = 200u64,
                latency_ms = 0.25,
                ok = true,
                "GET {}",
                "/tasks/x"
            );
            tracing::info!(target_site = "mine", n = -3i64, "own field");
            tracing::info!(ratio = f64::NAN, "not a number");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(parsed.len(), 3, "{text}");
        let first = &parsed[0];
        assert_eq!(first["message"], "GET /tasks/x");
        assert_eq!(first["status"], 200);
        assert_eq!(first["latency_ms"], 0.25);
        assert_eq!(first["ok"], true);
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["operation_id"], "op-\"1\"");
        assert_eq!(first["site"], "site1");
        assert_eq!(first["target_site"], "site2");
        assert_eq!(first["span"], "request");
        assert!(first["timestamp"].as_str().is_some_and(|t| t.len() > 10));
        assert_eq!(
            parsed[1]["target_site"], "mine",
            "the event's own field wins"
        );
        assert_eq!(parsed[1]["n"], -3);
        assert_eq!(
            text.lines().nth(1).unwrap().matches("target_site").count(),
            1
        );
        assert_eq!(parsed[2]["ratio"], serde_json::Value::Null);
    }
}
