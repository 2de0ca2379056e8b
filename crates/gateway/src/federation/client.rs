//! The peer client: how this site talks to its peers over the mutual-TLS peer link.
//!
//! Two transports (`peering.transport`). HTTP/1.1, the default: kept-alive connections, one
//! request at a time each, taken from an idle list or opened, and put back after a whole
//! answer; at most `peering.http1_max_requests_per_peer` requests at once, not counting
//! blocking reads the peer holds (capped by the held-request limits, and never a reason for a
//! quick read to wait). HTTP/2: a few connections (`peering.connections_per_peer`, round
//! robin) multiplexing every request. Either way a connection is opened on first use and
//! replaced after it breaks; measured on one core, HTTP/1.1 forwarded about a third more
//! reads per second (lighter framing at both ends: no HPACK, no stream state).
//!
//! Every request has a deadline (the configured peer timeout, shortened to what is left of the
//! caller's own), sent along so the peer gives up when the answer could no longer be used.
//! Each peer's link health is tracked: consecutive transport
//! failures open a circuit (requests then fail fast with `Retry-After`), and a background probe
//! (`GET /healthz` over the link) closes it again as soon as the peer answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use sitegate_model::config::{PeerConfig, PeerTransport, PeeringConfig};
use sitegate_model::site::{LinkInfo, SiteInfo, SiteName, SiteState};
use sitegate_model::{ErrorCode, ErrorEnvelope};
use sitegate_store::now_millis;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::breaker::{BreakerRules, LinkHealth};
use super::cache::RemoteReads;
use super::error::{refused, transport_error, PeerError};
use super::io::Heard;
use crate::tls::{handshake_refusal, HandshakeObserver, HandshakeRefusal, PeerAnchor, PeerTls};

/// The header carrying the milliseconds left before the caller's deadline.
pub(crate) const DEADLINE_HEADER: &str = "x-sitegate-deadline-ms";
/// How long an idle HTTP/1.1 connection is used again. A peer closes a connection idle for
/// its `limits.header_read_timeout_secs` (10 by default); a request sent just as it does
/// would fail, so connections are let go well before.
const IDLE_KEEP: Duration = Duration::from_secs(4);
/// The largest answer accepted from a peer.
const MAX_PEER_BODY: usize = 32 * 1024 * 1024;

/// A request to send to a peer.
pub(super) struct Forward {
    /// What the request is, as its client span is named: method and route template
    /// (`GET /tasks/{task_id}`), never the path itself, which would make a span name per task.
    pub(super) route: &'static str,
    pub(super) method: Method,
    pub(super) path_and_query: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// How long the peer may hold the request on purpose (a blocking read's wait): added to
    /// the usual time budget, or every long wait would count as a timeout.
    pub(super) held: Duration,
}

/// A peer's answer, whole.
pub(super) struct PeerResponse {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

/// How requests go over an open connection.
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// An open connection to a peer.
struct Connection {
    sender: Sender,
    refusal: Arc<std::sync::OnceLock<HandshakeRefusal>>,
    /// Set once the peer has sent any data after the handshake, which it does only after
    /// accepting this site's certificate (a refusal is an alert, never data).
    heard: Arc<AtomicBool>,
}

impl Connection {
    fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    /// Another handle on an HTTP/2 connection, which any number of requests share.
    fn share(&self) -> Option<Connection> {
        match &self.sender {
            Sender::Http2(s) => Some(Connection {
                sender: Sender::Http2(s.clone()),
                refusal: self.refusal.clone(),
                heard: self.heard.clone(),
            }),
            Sender::Http1(_) => None,
        }
    }

    /// A failed exchange on this connection, told apart by what its TLS stream saw.
    fn error(&self, site: &str, e: &(dyn std::error::Error + 'static)) -> PeerError {
        let error = transport_error(site, e);
        match (self.refusal.get(), error) {
            (Some(refusal), PeerError::Unreachable { site, detail }) => {
                refused(*refusal, site, detail)
            }
            (_, error) => error,
        }
    }
}

/// One configured peer and the state of the link to it.
pub(super) struct Peer {
    pub(super) config: PeerConfig,
    address: String,
    server_name: ServerName<'static>,
    /// The `Host` of HTTP/1.1 requests: the peer's site name, as in its certificate.
    host: HeaderValue,
    /// HTTP/2: the multiplexed connections, if open, with the TLS refusal their streams saw,
    /// if any. The async mutex makes concurrent requests wait for one connection attempt
    /// instead of each opening their own.
    connections: Vec<tokio::sync::Mutex<Option<Connection>>>,
    /// Round-robin position over `connections`: one HTTP/2 connection is served by one task
    /// at each end, so a few of them spread the work over the cores.
    next_connection: std::sync::atomic::AtomicUsize,
    /// HTTP/1.1: open connections between requests, with when each went idle, most recently
    /// used last.
    idle: Mutex<Vec<(Connection, Instant)>>,
    /// HTTP/1.1: turns for requests that are not held, one per connection in use.
    turns: tokio::sync::Semaphore,
    /// HTTP/1.1: the most connections kept idle (the most turns).
    max_idle: usize,
    health: Mutex<LinkHealth>,
    /// This peer's metric series, registered once: a request does not build label sets.
    metrics: PeerMetrics,
}

/// The per-peer metric handles the request path updates.
struct PeerMetrics {
    label: String,
    up: metrics::Gauge,
    circuit_open: metrics::Gauge,
    round_trip_ok: metrics::Histogram,
}

impl PeerMetrics {
    fn new(peer: &SiteName) -> Self {
        let label = peer.to_string();
        PeerMetrics {
            up: metrics::gauge!("sitegate_peer_up", "peer" => label.clone()),
            circuit_open: metrics::gauge!("sitegate_peer_circuit_open", "peer" => label.clone()),
            round_trip_ok: metrics::histogram!(
                "sitegate_peer_request_duration_seconds",
                "peer" => label.clone(),
                "outcome" => "ok"
            ),
            label,
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Peer {
    pub(super) fn name(&self) -> &SiteName {
        &self.config.name
    }

    pub(super) fn health(&self) -> std::sync::MutexGuard<'_, LinkHealth> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_success(&self, round_trip: Duration) {
        self.metrics.up.set(1.0);
        self.metrics.circuit_open.set(0.0);
        self.metrics.round_trip_ok.record(round_trip.as_secs_f64());
        self.health().succeeded(now_millis(), round_trip);
    }

    fn record_failure(&self, error: &PeerError, rules: BreakerRules, took: Duration) {
        self.metrics.up.set(0.0);
        metrics::histogram!(
            "sitegate_peer_request_duration_seconds",
            "peer" => self.metrics.label.clone(),
            "outcome" => error.code().as_str()
        )
        .record(took.as_secs_f64());
        let opened = self
            .health()
            .failed(error, rules, Instant::now(), now_millis());
        if self.health().circuit_wait(Instant::now()).is_some() {
            self.metrics.circuit_open.set(1.0);
        }
        if opened {
            tracing::warn!(peer = %self.config.name, "circuit opened: peer link marked down");
        }
    }

    /// How many requests have taken an HTTP/2 connection slot (round robin position).
    #[cfg(test)]
    pub(super) fn slots_used(&self) -> usize {
        self.next_connection.load(Ordering::Relaxed)
    }

    /// How many connections are kept: HTTP/2 slots holding one, and idle HTTP/1.1 ones.
    #[cfg(test)]
    pub(super) async fn open_connections(&self) -> usize {
        let mut open = self.idle_connections().len();
        for slot in &self.connections {
            if slot.lock().await.is_some() {
                open += 1;
            }
        }
        open
    }

    fn idle_connections(&self) -> std::sync::MutexGuard<'_, Vec<(Connection, Instant)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle HTTP/1.1 connection still open and idle for less than [`IDLE_KEEP`], if any.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle_connections();
        // The oldest are at the front: past the limit, they all go.
        let now = Instant::now();
        idle.retain(|(c, since)| now.duration_since(*since) < IDLE_KEEP && !c.is_closed());
        idle.pop().map(|(connection, _)| connection)
    }

    /// Keeps an HTTP/1.1 connection that answered in full for the next request.
    fn put_back(&self, connection: Connection) {
        let mut idle = self.idle_connections();
        if !connection.is_closed() && idle.len() < self.max_idle {
            idle.push((connection, Instant::now()));
        }
    }

    /// `Some(wait)` while the circuit is open.
    pub(super) fn circuit_wait(&self) -> Option<Duration> {
        self.health().circuit_wait(Instant::now())
    }

    /// The `/sites` entry for this peer.
    pub(super) fn site_info(&self) -> SiteInfo {
        let h = self.health();
        let now = Instant::now();
        let circuit = h.circuit(now);
        let failing = h.failing(now);
        let incoming_error = h
            .incoming_error
            .as_ref()
            .filter(|(at, _)| Some(*at) > h.last_incoming)
            .map(|(_, e)| e.clone());
        SiteInfo {
            site: self.config.name.to_string(),
            description: self.config.description.clone(),
            is_local: false,
            state: SiteState {
                incoming_comm_error: incoming_error,
                outgoing_comm_error: if failing { h.last_error.clone() } else { None },
            },
            link: Some(LinkInfo {
                url: self.config.url.clone(),
                circuit,
                consecutive_failures: h.consecutive_failures,
                last_success: h.last_success,
                last_failure: h.last_failure,
                round_trip_ms: h.round_trip_ms,
                peer_certificate_expiry: h.peer_cert_expiry,
                last_incoming: h.last_incoming,
                // The TLS configuration knows it; `PeerHandle::site_info` adds it.
                trust_anchor: None,
            }),
            certificate_expiry: None,
            certificate_error: None,
        }
    }

    /// Records that this peer reached us over the peer link.
    fn record_incoming(&self) {
        self.health().last_incoming = Some(now_millis());
    }
}

/// The configured peers; also told about incoming handshakes by the TLS layer.
#[derive(Debug)]
pub(crate) struct PeerSet {
    peers: Vec<Arc<Peer>>,
}

impl PeerSet {
    /// Each peer's connections are kept as `peering` says (transport and pool sizes).
    pub(crate) fn new(configs: &[PeerConfig], peering: &PeeringConfig) -> Result<Self, String> {
        let pool_size = match peering.transport {
            PeerTransport::Http2 => peering.connections_per_peer.max(1),
            PeerTransport::Http1 => 0,
        };
        let max_requests = peering.http1_max_requests_per_peer.max(1);
        let mut peers = Vec::with_capacity(configs.len());
        for config in configs {
            let address = config.address().map_err(|e| e.to_string())?;
            let server_name = ServerName::try_from(config.name.to_string())
                .map_err(|e| format!("peer '{}': {e}", config.name))?;
            let host = HeaderValue::from_str(config.name.as_str())
                .map_err(|e| format!("peer '{}': {e}", config.name))?;
            peers.push(Arc::new(Peer {
                config: config.clone(),
                address,
                server_name,
                host,
                connections: (0..pool_size)
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                next_connection: std::sync::atomic::AtomicUsize::new(0),
                idle: Mutex::new(Vec::new()),
                turns: tokio::sync::Semaphore::new(max_requests),
                max_idle: max_requests,
                health: Mutex::new(LinkHealth::default()),
                metrics: PeerMetrics::new(&config.name),
            }));
        }
        Ok(PeerSet { peers })
    }

    /// One peer, `site2` at `url`, for tests that need a peer set and nothing more.
    #[cfg(test)]
    pub(super) fn site2_at(url: String, peering: &PeeringConfig) -> Self {
        let config = PeerConfig {
            name: SiteName::parse("site2").unwrap(),
            url,
            trust_multisite: false,
            trust_multisite_admin: false,
            description: String::new(),
            ca: None,
        };
        PeerSet::new(&[config], peering).unwrap()
    }

    pub(super) fn get(&self, name: &str) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.config.name.as_str() == name)
    }

    pub(super) fn all(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    /// Each peer with the CA its certificates chain to.
    pub(crate) fn anchors(&self) -> Vec<PeerAnchor> {
        self.peers
            .iter()
            .map(|p| PeerAnchor {
                site: p.config.name.clone(),
                ca: p.config.ca.clone(),
            })
            .collect()
    }
}

impl HandshakeObserver for PeerSet {
    fn incoming_handshake(&self, site: &SiteName, outcome: Result<(), String>) {
        let Some(peer) = self.get(site.as_str()) else {
            return;
        };
        match outcome {
            Ok(()) => peer.record_incoming(),
            Err(reason) => {
                tracing::warn!(peer = %site, reason, "refused a peer-link certificate naming this peer");
                peer.health().incoming_error = Some((
                    now_millis(),
                    ErrorEnvelope::new(
                        ErrorCode::RemoteAuthenticationFailure,
                        format!("This site refused the certificate presented by site '{site}'."),
                        vec![],
                    ),
                ));
            }
        }
    }
}

/// Sends requests to peers and keeps their links healthy.
pub(crate) struct PeerClient {
    pub(super) peers: Arc<PeerSet>,
    tls: Arc<PeerTls>,
    pub(super) config: PeeringConfig,
    /// Remote Get One answers shared between callers.
    pub(super) reads: RemoteReads,
}

impl PeerClient {
    /// The CA `peer`'s certificates must chain to.
    pub(super) fn trust_anchor(&self, peer: &SiteName) -> sitegate_model::site::TrustAnchor {
        self.tls.trust_anchor(peer)
    }

    pub(crate) fn new(peers: Arc<PeerSet>, tls: Arc<PeerTls>, config: PeeringConfig) -> Self {
        let reads = RemoteReads::new(
            Duration::from_millis(config.running_task_cache_ms),
            Duration::from_secs(config.final_task_cache_secs),
        );
        PeerClient {
            peers,
            tls,
            config,
            reads,
        }
    }

    pub(crate) fn tls(&self) -> &Arc<PeerTls> {
        &self.tls
    }

    fn rules(&self) -> BreakerRules {
        BreakerRules {
            failure_threshold: self.config.failure_threshold,
            open_for: Duration::from_secs(self.config.circuit_open_secs),
        }
    }

    /// Sends `request` to `peer`, failing fast while its circuit is open. `deadline` is the
    /// caller's: the peer's answer is waited for no longer than that.
    pub(super) async fn send(
        &self,
        peer: &Peer,
        request: Forward,
        deadline: Option<Instant>,
    ) -> Result<PeerResponse, PeerError> {
        if let Some(wait) = peer.circuit_wait() {
            return Err(PeerError::CircuitOpen {
                site: peer.name().to_string(),
                retry_after: wait,
            });
        }
        self.exchange(peer, request, deadline).await
    }

    async fn exchange(
        &self,
        peer: &Peer,
        mut request: Forward,
        deadline: Option<Instant>,
    ) -> Result<PeerResponse, PeerError> {
        // The client span is the parent of the peer's server span: its context goes along.
        let span = tracing::info_span!(
            "peer.request",
            otel.name = request.route,
            otel.kind = "client",
            peer = %peer.name(),
        );
        crate::telemetry::inject(&span, &mut request.headers);
        self.exchange_in(peer, request, deadline)
            .instrument(span)
            .await
    }

    pub(super) async fn exchange_in(
        &self,
        peer: &Peer,
        request: Forward,
        deadline: Option<Instant>,
    ) -> Result<PeerResponse, PeerError> {
        let started = Instant::now();
        let mut budget = Duration::from_millis(self.config.request_timeout_ms) + request.held;
        if let Some(deadline) = deadline {
            budget = budget.min(deadline.saturating_duration_since(started));
        }
        let site = peer.name().to_string();
        let outcome = if budget.is_zero() {
            Err(PeerError::Timeout { site })
        } else {
            let attempt = async {
                match self.config.transport {
                    PeerTransport::Http1 => {
                        self.attempt_http1(peer, request, started + budget).await
                    }
                    PeerTransport::Http2 => {
                        self.attempt_http2(peer, request, started + budget).await
                    }
                }
            };
            match tokio::time::timeout(budget, attempt).await {
                Ok(result) => result,
                Err(_) => Err(PeerError::Timeout { site }),
            }
        };
        match &outcome {
            Ok(_) => peer.record_success(started.elapsed()),
            Err(e) => peer.record_failure(e, self.rules(), started.elapsed()),
        }
        outcome
    }

    /// Sends `request` over one of the peer's multiplexed HTTP/2 connections.
    async fn attempt_http2(
        &self,
        peer: &Peer,
        request: Forward,
        deadline: Instant,
    ) -> Result<PeerResponse, PeerError> {
        let slot =
            peer.next_connection.fetch_add(1, Ordering::Relaxed) % peer.connections.len().max(1);
        let outcome = async {
            let (mut connection, fresh) = self.shared_connection(peer, slot).await?;
            let result = match self.build(peer, request, deadline) {
                Ok(req) => self
                    .send_on(&mut connection, peer, req)
                    .await
                    .map_err(|f| f.error),
                Err(e) => Err(e),
            };
            self.explain(peer, &connection, fresh, result).await
        }
        .await;
        if outcome.is_err() {
            // A broken connection is not reused; the next request opens a new one.
            *peer.connections[slot].lock().await = None;
        }
        outcome
    }

    /// Sends `request` over a kept-alive HTTP/1.1 connection of its own: an idle one, or a
    /// new one. An idle connection the peer closed meanwhile (the request never left) is
    /// replaced by a new one, once.
    async fn attempt_http1(
        &self,
        peer: &Peer,
        request: Forward,
        deadline: Instant,
    ) -> Result<PeerResponse, PeerError> {
        // Held reads take no turn: they are capped by the held-request limits, and a turn
        // held for a long wait would make quick reads wait behind it.
        let _turn = if request.held.is_zero() {
            Some(
                peer.turns
                    .acquire()
                    .await
                    .map_err(|_| PeerError::Unreachable {
                        site: peer.name().to_string(),
                        detail: "the peer's connections are closed".into(),
                    })?,
            )
        } else {
            None
        };
        let mut req = self.build(peer, request, deadline)?;
        if let Some(mut connection) = peer.take_idle() {
            match self.send_on(&mut connection, peer, req).await {
                Ok(answer) => {
                    peer.put_back(connection);
                    return Ok(answer);
                }
                Err(SendFailure {
                    unsent: Some(unsent),
                    ..
                }) => req = unsent,
                Err(failure) => return Err(failure.error),
            }
        }
        let mut connection = Box::pin(self.open(peer, PeerTransport::Http1)).await?;
        let result = self
            .send_on(&mut connection, peer, req)
            .await
            .map_err(|f| f.error);
        if result.is_ok() {
            peer.put_back(connection);
            return result;
        }
        self.explain(peer, &connection, true, result).await
    }

    /// A failed exchange explained: on a `fresh` connection the peer never answered on, the
    /// failure may be a refusal of this site's certificate whose alert was lost.
    async fn explain(
        &self,
        peer: &Peer,
        connection: &Connection,
        fresh: bool,
        result: Result<PeerResponse, PeerError>,
    ) -> Result<PeerResponse, PeerError> {
        match result {
            // A peer that already sent data accepted us: asking it again would only wait out
            // the connect timeout (a peer answering garbage says nothing until asked), and
            // could spend the caller's whole deadline on it.
            Err(PeerError::Unreachable { site, detail })
                if fresh && !connection.heard.load(Ordering::Relaxed) =>
            {
                // A connection that failed before any answer may have been refused in the
                // handshake, with the alert lost to a reset: ask again, quietly.
                match self.diagnose(peer).await {
                    Some(refusal) => Err(refused(refusal, site, detail)),
                    None => Err(PeerError::Unreachable { site, detail }),
                }
            }
            other => other,
        }
    }

    /// Opens a TLS connection to `peer`, sends nothing after the handshake, and reads: a peer
    /// that refuses this site's certificate answers with an alert, which (nothing else being
    /// in flight) arrives intact. `None` when the peer did not refuse.
    async fn diagnose(&self, peer: &Peer) -> Option<HandshakeRefusal> {
        use tokio::io::AsyncReadExt;
        let limit = Duration::from_millis(self.config.connect_timeout_ms);
        let attempt = async {
            let tcp = TcpStream::connect(&peer.address).await.ok()?;
            let mut tls = match self
                .tls
                .connector(peer.name(), self.config.transport)
                .connect(peer.server_name.clone(), tcp)
                .await
            {
                Ok(tls) => tls,
                Err(e) => return handshake_refusal(&e),
            };
            let mut byte = [0u8; 1];
            match tls.read(&mut byte).await {
                Err(e) => handshake_refusal(&e),
                Ok(_) => None,
            }
        };
        tokio::time::timeout(limit, attempt).await.ok().flatten()
    }

    /// The HTTP request for `request`, carrying what is left of `deadline`.
    fn build(
        &self,
        peer: &Peer,
        request: Forward,
        deadline: Instant,
    ) -> Result<http::Request<Full<Bytes>>, PeerError> {
        let uri = match self.config.transport {
            // HTTP/2 sends the authority as a pseudo-header; HTTP/1.1 the path and `Host`.
            PeerTransport::Http2 => format!("https://{}{}", peer.name(), request.path_and_query),
            PeerTransport::Http1 => request.path_and_query,
        };
        let mut builder = Request::builder().method(request.method).uri(uri);
        if let Some(headers) = builder.headers_mut() {
            *headers = request.headers;
            if self.config.transport == PeerTransport::Http1 {
                headers.insert(http::header::HOST, peer.host.clone());
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis();
            if let Ok(v) = HeaderValue::from_str(&left.to_string()) {
                headers.insert(DEADLINE_HEADER, v);
            }
        }
        builder
            .body(Full::new(request.body))
            .map_err(|e| PeerError::BadAnswer {
                site: peer.name().to_string(),
                detail: format!("could not build the request: {e}"),
            })
    }

    /// Sends `req` on `connection` and reads the whole answer.
    async fn send_on(
        &self,
        connection: &mut Connection,
        peer: &Peer,
        req: http::Request<Full<Bytes>>,
    ) -> Result<PeerResponse, SendFailure> {
        let site = peer.name().as_str();
        let failed = |connection: &Connection, e: &hyper::Error| SendFailure {
            error: connection.error(site, e),
            unsent: None,
        };
        let response = match &mut connection.sender {
            Sender::Http2(sender) => {
                let mut sender = sender.clone();
                if let Err(e) = sender.ready().await {
                    return Err(failed(connection, &e));
                }
                match sender.send_request(req).await {
                    Ok(response) => response,
                    Err(e) => return Err(failed(connection, &e)),
                }
            }
            Sender::Http1(sender) => {
                let ready = sender.ready().await;
                let sent = match ready {
                    Ok(()) => sender.try_send_request(req).await,
                    Err(e) => {
                        return Err(SendFailure {
                            error: connection.error(site, &e),
                            unsent: Some(req),
                        })
                    }
                };
                match sent {
                    Ok(response) => response,
                    Err(mut e) => {
                        let unsent = e.take_message();
                        let error = connection.error(site, e.error());
                        return Err(SendFailure { error, unsent });
                    }
                }
            }
        };
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_PEER_BODY)
            .collect()
            .await
            .map_err(|e| SendFailure {
                error: PeerError::BadAnswer {
                    site: site.to_owned(),
                    detail: format!("reading the answer: {e}"),
                },
                unsent: None,
            })?
            .to_bytes();
        Ok(PeerResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The open HTTP/2 connection in `slot` (`false`), or a new one (`true`).
    async fn shared_connection(
        &self,
        peer: &Peer,
        slot: usize,
    ) -> Result<(Connection, bool), PeerError> {
        let Some(slot) = peer.connections.get(slot) else {
            return Err(PeerError::Unreachable {
                site: peer.name().to_string(),
                detail: "no HTTP/2 connection slots".into(),
            });
        };
        let mut slot = slot.lock().await;
        if let Some(shared) = slot
            .as_ref()
            .filter(|c| !c.is_closed())
            .and_then(Connection::share)
        {
            return Ok((shared, false));
        }
        // Boxed: opening (TCP, TLS, HTTP/2 handshakes) is a large future that most requests,
        // which find the connection open, would otherwise carry.
        let connection = Box::pin(self.open(peer, PeerTransport::Http2)).await?;
        let shared = connection.share();
        *slot = Some(connection);
        shared
            .map(|c| (c, true))
            .ok_or_else(|| PeerError::Unreachable {
                site: peer.name().to_string(),
                detail: "not an HTTP/2 connection".into(),
            })
    }

    /// Opens a connection to `peer` speaking `transport`.
    async fn open(&self, peer: &Peer, transport: PeerTransport) -> Result<Connection, PeerError> {
        let site = peer.name().to_string();
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let unreachable = |detail: String| PeerError::Unreachable {
            site: site.clone(),
            detail,
        };
        let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(&peer.address))
            .await
            .map_err(|_| unreachable(format!("connecting to {} timed out", peer.address)))?
            .map_err(|e| unreachable(format!("connecting to {}: {e}", peer.address)))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            connect_timeout,
            self.tls
                .connector(peer.name(), transport)
                .connect(peer.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| transport_error(&site, &e))?;
        if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            peer.health().peer_cert_expiry = crate::tls::not_after_millis(cert);
        }
        let (tls, refusal) = crate::tls::RefusalWatch::new(tls);
        let heard = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(Heard {
            inner: tls,
            heard: heard.clone(),
        });
        let name = site.clone();
        let sender = match transport {
            PeerTransport::Http2 => {
                let (sender, driver) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    // Pings find a peer that vanished without closing the connection.
                    .keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .handshake(io)
                    .await
                    .map_err(|e| transport_error(&site, &e))?;
                drive(name, driver);
                Sender::Http2(sender)
            }
            PeerTransport::Http1 => {
                // No pings in HTTP/1.1: a peer that vanished is found by the request's
                // deadline, and an idle connection it closed by the next request (which then
                // opens another).
                let (sender, driver) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|e| transport_error(&site, &e))?;
                drive(name, driver);
                Sender::Http1(sender)
            }
        };
        Ok(Connection {
            sender,
            refusal,
            heard,
        })
    }
}

/// Runs a connection's I/O in a task of its own until the connection ends.
fn drive<F>(peer: String, driver: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(peer = %peer, error = %e, "peer connection closed");
        }
    });
}

/// A request that failed on a connection; `unsent` is the request back when it never left
/// (the connection had closed), so it can go on another.
struct SendFailure {
    error: PeerError,
    unsent: Option<http::Request<Full<Bytes>>>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use hyper::service::service_fn;
    use sitegate_model::config::PeerTransport;

    use super::*;

    /// A peer link (site2's TLS, requiring site1's certificate) serving HTTP/1.1: `/held`
    /// answers after 400 ms, anything else at once. Counts the connections it accepted;
    /// `close_after_answer` makes it close each connection after one answer.
    struct PeerLink {
        address: String,
        accepted: Arc<AtomicUsize>,
    }

    async fn peer_link(dir: &std::path::Path, close_after_answer: bool) -> (PeerLink, PeerTls) {
        let files = crate::test_certificates::write_sites(dir, &["site1", "site2"]);
        let site1 = SiteName::parse("site1").unwrap();
        let site2 = SiteName::parse("site2").unwrap();
        let none: Arc<PeerSet> = Arc::new(PeerSet { peers: Vec::new() });
        let server_tls = PeerTls::load(
            files[1].clone(),
            site2.clone(),
            vec![PeerAnchor::federation(site1.clone())],
            none.clone(),
        )
        .unwrap();
        let client_tls = PeerTls::load(
            files[0].clone(),
            site1,
            vec![PeerAnchor::federation(site2)],
            none,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = server_tls.acceptor();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                            if req.uri().path() == "/held" {
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close_after_answer)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (PeerLink { address, accepted }, client_tls)
    }

    fn client(link: &PeerLink, tls: PeerTls, max_requests: usize) -> (PeerClient, Arc<Peer>) {
        let config = PeeringConfig {
            transport: PeerTransport::Http1,
            http1_max_requests_per_peer: max_requests,
            ..PeeringConfig::default()
        };
        let peers = Arc::new(PeerSet::site2_at(
            format!("https://{}", link.address),
            &config,
        ));
        let peer = peers.get("site2").unwrap().clone();
        (PeerClient::new(peers, Arc::new(tls), config), peer)
    }

    fn get(path: &str, held: Duration) -> Forward {
        Forward {
            route: "GET /test",
            method: Method::GET,
            path_and_query: path.into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            held,
        }
    }

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(5))
    }

    /// Requests one after another share one kept-alive connection.
    #[tokio::test]
    async fn http1_connections_are_kept_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (link, tls) = peer_link(dir.path(), false).await;
        let (client, peer) = client(&link, tls, 4);
        for _ in 0..5 {
            let answer = client.send(&peer, get("/a", Duration::ZERO), soon()).await;
            assert_eq!(answer.map(|a| a.body).ok(), Some(Bytes::from_static(b"ok")));
        }
        assert_eq!(link.accepted.load(Ordering::SeqCst), 1, "one connection");
        assert_eq!(
            peer.open_connections().await,
            1,
            "kept for the next request"
        );
    }

    /// A kept connection the peer closed meanwhile costs the caller nothing: the request,
    /// never sent, goes on a new connection.
    #[tokio::test]
    async fn http1_a_connection_the_peer_closed_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (link, tls) = peer_link(dir.path(), true).await;
        let (client, peer) = client(&link, tls, 4);
        for i in 0..4 {
            let answer = client.send(&peer, get("/a", Duration::ZERO), soon()).await;
            assert!(answer.is_ok(), "request {i}: {:?}", answer.err());
        }
        assert_eq!(link.accepted.load(Ordering::SeqCst), 4, "a connection each");
        assert_eq!(
            peer.site_info().link.unwrap().consecutive_failures,
            0,
            "no failure counted"
        );
    }

    /// At most `http1_max_requests_per_peer` quick requests at once (more wait their turn),
    /// while reads the peer holds take no turn: a quick read is never stuck behind them.
    #[tokio::test]
    async fn http1_turns_cap_quick_requests_and_held_reads_never_block_them() {
        let dir = tempfile::tempdir().unwrap();
        let (link, tls) = peer_link(dir.path(), false).await;
        let (client, peer) = client(&link, tls, 1);
        let client = Arc::new(client);
        let held: Vec<_> = (0..3)
            .map(|_| {
                let (client, peer) = (client.clone(), peer.clone());
                tokio::spawn(async move {
                    client
                        .send(&peer, get("/held", Duration::from_secs(1)), soon())
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let quick = client.send(&peer, get("/a", Duration::ZERO), soon()).await;
        assert!(quick.is_ok(), "{:?}", quick.err());
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "the quick read waited {:?} behind held ones",
            started.elapsed()
        );
        for h in held {
            assert!(h.await.unwrap().is_ok());
        }
        // Two quick reads of the slow path with one turn: the second waits for the first.
        let started = Instant::now();
        let (a, b) = tokio::join!(
            client.send(&peer, get("/held", Duration::ZERO), soon()),
            client.send(&peer, get("/held", Duration::ZERO), soon()),
        );
        assert!(a.is_ok() && b.is_ok());
        assert!(
            started.elapsed() >= Duration::from_millis(780),
            "one turn: one after the other ({:?})",
            started.elapsed()
        );
    }
}
