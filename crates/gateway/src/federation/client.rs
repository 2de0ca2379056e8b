//! The peer client: how this site talks to its peers over the mutual-TLS peer link.
//!
//! Each peer has a few HTTP/2 connections (`peering.connections_per_peer`, round robin),
//! multiplexing every forwarded request, each opened on first use and re-opened after it
//! breaks. Every request has a deadline (the configured peer timeout,
//! shortened to what is left of the caller's own), sent along so the peer gives up when the
//! answer could no longer be used. Each peer's link health is tracked: consecutive transport
//! failures open a circuit (requests then fail fast with `Retry-After`), and a background probe
//! (`GET /healthz` over the link) closes it again as soon as the peer answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use sitegate_model::config::{PeerConfig, PeeringConfig};
use sitegate_model::site::{LinkInfo, SiteInfo, SiteName, SiteState};
use sitegate_model::{ErrorCode, ErrorEnvelope};
use sitegate_store::now_millis;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::breaker::{BreakerRules, LinkHealth};
use super::cache::RemoteReads;
use super::error::{refused, transport_error, PeerError};
use super::io::Heard;
use crate::tls::{handshake_refusal, HandshakeObserver, HandshakeRefusal, PeerTls};

/// The header carrying the milliseconds left before the caller's deadline.
pub(crate) const DEADLINE_HEADER: &str = "x-sitegate-deadline-ms";
/// The largest answer accepted from a peer.
const MAX_PEER_BODY: usize = 32 * 1024 * 1024;

/// A request to send to a peer.
pub(super) struct Forward {
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

/// An open HTTP/2 connection to a peer.
#[derive(Clone)]
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    refusal: Arc<std::sync::OnceLock<HandshakeRefusal>>,
    /// Set once the peer has sent any data after the handshake, which it does only after
    /// accepting this site's certificate (a refusal is an alert, never data).
    heard: Arc<AtomicBool>,
}

impl Connection {
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
    /// The multiplexed connection, if open, with the TLS refusal its stream saw, if any. The
    /// async mutex makes concurrent requests wait for one connection attempt instead of each
    /// opening their own.
    connections: Vec<tokio::sync::Mutex<Option<Connection>>>,
    /// Round-robin position over `connections`: one HTTP/2 connection is served by one task
    /// at each end, so a few of them spread the work over the cores.
    next_connection: std::sync::atomic::AtomicUsize,
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

    /// How many requests have taken a connection slot (round robin position).
    #[cfg(test)]
    pub(super) fn slots_used(&self) -> usize {
        self.next_connection.load(Ordering::Relaxed)
    }

    /// How many of the pool's connections are open.
    #[cfg(test)]
    pub(super) async fn open_connections(&self) -> usize {
        let mut open = 0;
        for slot in &self.connections {
            if slot.lock().await.is_some() {
                open += 1;
            }
        }
        open
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
    /// `pool_size` HTTP/2 connections are kept to each peer.
    pub(crate) fn new(configs: &[PeerConfig], pool_size: usize) -> Result<Self, String> {
        let mut peers = Vec::with_capacity(configs.len());
        for config in configs {
            let address = config.address().map_err(|e| e.to_string())?;
            let server_name = ServerName::try_from(config.name.to_string())
                .map_err(|e| format!("peer '{}': {e}", config.name))?;
            peers.push(Arc::new(Peer {
                config: config.clone(),
                address,
                server_name,
                connections: (0..pool_size.max(1))
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                next_connection: std::sync::atomic::AtomicUsize::new(0),
                health: Mutex::new(LinkHealth::default()),
                metrics: PeerMetrics::new(&config.name),
            }));
        }
        Ok(PeerSet { peers })
    }

    pub(super) fn get(&self, name: &str) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.config.name.as_str() == name)
    }

    pub(super) fn all(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    pub(crate) fn names(&self) -> Vec<SiteName> {
        self.peers.iter().map(|p| p.config.name.clone()).collect()
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
            otel.name = %format!("{} {}", request.method, request.path_and_query.split('?').next().unwrap_or("")),
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
        let slot = peer
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % peer.connections.len();
        let outcome = if budget.is_zero() {
            Err(PeerError::Timeout { site })
        } else {
            match tokio::time::timeout(budget, self.attempt(peer, slot, request, started + budget))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(PeerError::Timeout { site }),
            }
        };
        match &outcome {
            Ok(_) => peer.record_success(started.elapsed()),
            Err(e) => {
                if !matches!(e, PeerError::Timeout { .. }) {
                    // A broken connection is not reused; the next request opens a new one.
                    *peer.connections[slot].lock().await = None;
                }
                peer.record_failure(e, self.rules(), started.elapsed());
            }
        }
        outcome
    }

    async fn attempt(
        &self,
        peer: &Peer,
        slot: usize,
        request: Forward,
        deadline: Instant,
    ) -> Result<PeerResponse, PeerError> {
        let (connection, fresh) = self.connection(peer, slot).await?;
        let result = self.exchange_on(&connection, peer, request, deadline).await;
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
                .connector()
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

    async fn exchange_on(
        &self,
        connection: &Connection,
        peer: &Peer,
        request: Forward,
        deadline: Instant,
    ) -> Result<PeerResponse, PeerError> {
        let mut sender = connection.sender.clone();
        let site = peer.name().to_string();
        let mut builder = Request::builder().method(request.method).uri(format!(
            "https://{}{}",
            peer.name(),
            request.path_and_query
        ));
        if let Some(headers) = builder.headers_mut() {
            *headers = request.headers;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis();
            if let Ok(v) = HeaderValue::from_str(&left.to_string()) {
                headers.insert(DEADLINE_HEADER, v);
            }
        }
        let req = builder
            .body(Full::new(request.body))
            .map_err(|e| PeerError::BadAnswer {
                site: site.clone(),
                detail: format!("could not build the request: {e}"),
            })?;
        sender
            .ready()
            .await
            .map_err(|e| connection.error(&site, &e))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| connection.error(&site, &e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_PEER_BODY)
            .collect()
            .await
            .map_err(|e| PeerError::BadAnswer {
                site: site.clone(),
                detail: format!("reading the answer: {e}"),
            })?
            .to_bytes();
        Ok(PeerResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The open connection to `peer`, or a new one.
    /// The open connection to `peer` (`false`), or a new one (`true`).
    async fn connection(&self, peer: &Peer, slot: usize) -> Result<(Connection, bool), PeerError> {
        let mut slot = peer.connections[slot].lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.sender.is_closed() {
                return Ok((connection.clone(), false));
            }
        }
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
            self.tls.connector().connect(peer.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| transport_error(&site, &e))?;
        if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            peer.health().peer_cert_expiry = crate::tls::not_after_millis(cert);
        }
        let (tls, refusal) = crate::tls::RefusalWatch::new(tls);
        let heard = Arc::new(AtomicBool::new(false));
        let tls = Heard {
            inner: tls,
            heard: heard.clone(),
        };
        let (sender, driver) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Pings find a peer that vanished without closing the connection.
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| transport_error(&site, &e))?;
        let name = site.clone();
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(peer = %name, error = %e, "peer connection closed");
            }
        });
        let connection = Connection {
            sender,
            refusal,
            heard,
        };
        *slot = Some(connection.clone());
        Ok((connection, true))
    }
}
