//! The configuration of one site: plain data read from TOML (and environment overrides by the
//! binary), validated before any port is bound. Every field's default is written beside it;
//! `config/sitegate.example.toml` shows them all.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::site::SiteName;
use crate::ModelError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: SiteSection,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub store: StoreConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The federation CA and this site's certificate; required once peers are configured.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Trace export (OpenTelemetry). Off unless an endpoint is set.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// How the peer link behaves: timeouts, circuit breaker, certificate reloads.
    #[serde(default)]
    pub peering: PeeringConfig,
    /// The sites this one is paired with.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`<endpoint>/v1/traces`).
    Http,
    /// OTLP/gRPC.
    Grpc,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where to send traces, e.g. `http://127.0.0.1:4318` (HTTP) or `http://127.0.0.1:4317`
    /// (gRPC). Default: none (no export; trace IDs still appear in logs).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `http` or `grpc`. Default: `http`.
    #[serde(default = "default_otlp_protocol")]
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces recorded, 0.0 to 1.0; a caller's sampled flag is followed
    /// (parent-based). Default: 1.0.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: default_otlp_protocol(),
            sampling_ratio: default_sampling_ratio(),
        }
    }
}

fn default_otlp_protocol() -> OtlpProtocol {
    OtlpProtocol::Http
}
fn default_sampling_ratio() -> f64 {
    1.0
}

/// How requests travel over the peer link (mutual TLS either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerTransport {
    /// Kept-alive HTTP/1.1 connections, one request at a time each. The cheaper framing at
    /// both ends: measured against `http2` on one core, about a third more forwarded reads
    /// per second.
    Http1,
    /// A few HTTP/2 connections multiplexing every request (`connections_per_peer`).
    Http2,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeeringConfig {
    /// `"http1"` (default) or `"http2"`; see [`PeerTransport`].
    #[serde(default = "default_peer_transport")]
    pub transport: PeerTransport,
    /// HTTP/1.1: the most requests sent to one peer at once (each on its own connection,
    /// kept open for the next); more wait for one to finish. Blocking reads held by the peer
    /// do not count here (they are capped by `limits.max_held_*`), so they never make other
    /// reads wait. Default: 64.
    #[serde(default = "default_http1_max_requests")]
    pub http1_max_requests_per_peer: usize,
    /// Longest wait for a TCP connection and TLS handshake to a peer. Default: 2000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for a peer's answer (shortened by the caller's own deadline). Default: 5000.
    #[serde(default = "default_peer_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Consecutive failures that open a peer's circuit. Default: 3.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long an open circuit fails requests fast before a trial. Default: 5.
    #[serde(default = "default_open_secs")]
    pub circuit_open_secs: u64,
    /// How often each peer is probed (`GET /healthz` over the link). Default: 2000.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// How often certificate files are checked for changes (SIGHUP reloads at once). Default: 5.
    #[serde(default = "default_tls_reload_secs")]
    pub tls_reload_interval_secs: u64,
    /// HTTP/2 (`transport = "http2"`): connections kept to each peer, used in turn: one
    /// connection is one task at each end, so a few spread the load over the cores. Default: 4.
    #[serde(default = "default_connections_per_peer")]
    pub connections_per_peer: usize,
    /// How long a peer's answer about a running task is shared with the same user's later
    /// polls, in ms; 0 shares only concurrent identical reads (single flight). Raising it to a
    /// poll interval turns many pollers into about one peer request per interval, at the cost
    /// of answers that old. Default: 0.
    #[serde(default = "default_running_cache_ms")]
    pub running_task_cache_ms: u64,
    /// How long a peer's answer about a finished task (which never changes) is kept, in
    /// seconds. Default: 600.
    #[serde(default = "default_final_cache_secs")]
    pub final_task_cache_secs: u64,
}

fn default_connections_per_peer() -> usize {
    4
}
fn default_peer_transport() -> PeerTransport {
    PeerTransport::Http1
}
fn default_http1_max_requests() -> usize {
    64
}
fn default_running_cache_ms() -> u64 {
    0
}
fn default_final_cache_secs() -> u64 {
    600
}

impl Default for PeeringConfig {
    fn default() -> Self {
        PeeringConfig {
            transport: default_peer_transport(),
            http1_max_requests_per_peer: default_http1_max_requests(),
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_peer_request_timeout_ms(),
            failure_threshold: default_failure_threshold(),
            circuit_open_secs: default_open_secs(),
            probe_interval_ms: default_probe_interval_ms(),
            tls_reload_interval_secs: default_tls_reload_secs(),
            connections_per_peer: default_connections_per_peer(),
            running_task_cache_ms: default_running_cache_ms(),
            final_task_cache_secs: default_final_cache_secs(),
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_peer_request_timeout_ms() -> u64 {
    5000
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_open_secs() -> u64 {
    5
}
fn default_probe_interval_ms() -> u64 {
    2000
}
fn default_tls_reload_secs() -> u64 {
    5
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// This site's unique name (`site1`); also the DNS SAN of its certificate.
    pub name: SiteName,
    /// Free text shown by `GET /sites`. Default: empty.
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// The client API. Default: 127.0.0.1:8046.
    #[serde(default = "default_client_addr")]
    pub client: SocketAddr,
    /// The mutual-TLS peer link. Default: none (no peer link).
    #[serde(default)]
    pub peer: Option<SocketAddr>,
    /// A certificate chain (PEM) for the client API: when set (with `tls_key`), the client API
    /// speaks HTTPS only (TLS 1.2 or 1.3, HTTP/1.1: see ARCHITECTURE.md). Reloaded when the file
    /// changes, like the peer link's. Default: none (plain HTTP, for TLS terminated in front).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Load balancers in front of the client API (addresses or CIDR blocks, `10.0.0.0/8`):
    /// for a connection from one of them, the client is the right-most address of
    /// `X-Forwarded-For` that is not itself one of them (HAProxy's `option forwardfor`). Login
    /// throttling and the access log use that address. From anyone else the header is
    /// ignored. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

impl ListenConfig {
    /// `trusted_proxies` parsed; an address stands for its single-address block.
    pub fn trusted_proxy_nets(&self) -> Result<Vec<ipnet::IpNet>, ModelError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ModelError::invalid(format!(
                            "listen.trusted_proxies: '{p}' is neither an address nor a CIDR block"
                        ))
                    })
            })
            .collect()
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            client: default_client_addr(),
            peer: None,
            tls_cert: None,
            tls_key: None,
            trusted_proxies: Vec::new(),
        }
    }
}

fn default_client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8046))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// SQLite in WAL mode in a directory of this machine.
    Embedded,
    /// PostgreSQL (or a compatible database), shared by all replicas of a site.
    Postgres,
}

/// A secret from the configuration (a database URL with its password): never printed by
/// `Debug`, so a logged config cannot leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Default: `embedded`.
    #[serde(default = "default_backend")]
    pub backend: StoreBackend,
    /// Directory of the embedded store. Default: `data`, relative to the config file.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// PostgreSQL URL (`postgres://user:password@host:5432/db`); required for `postgres`.
    #[serde(default)]
    pub url: Option<Secret>,
    /// PostgreSQL schema holding this site's tables, so sites can share a database.
    /// Default: `public`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Most PostgreSQL connections this process opens. Default: 16.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long a finished task is kept after its `endTime`, e.g. `"30d"`; `"0"` keeps every
    /// task. Default: `"0"`, so upgrading never removes tasks unasked (`init` writes `"30d"`).
    #[serde(default)]
    pub task_retention: Retention,
}

/// How long finished tasks are kept: a duration (`"30d"`, `"12h"`, `"90s"`) or `"0"`
/// (forever).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention(Option<std::time::Duration>);

impl Retention {
    /// Keeps finished tasks for `d`; a zero duration keeps them forever.
    pub fn keep_for(d: std::time::Duration) -> Self {
        Retention((!d.is_zero()).then_some(d))
    }

    /// The duration finished tasks are kept; `None` for forever.
    pub fn duration(&self) -> Option<std::time::Duration> {
        self.0
    }
}

impl std::str::FromStr for Retention {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" {
            return Ok(Retention(None));
        }
        humantime::parse_duration(s)
            .map(Retention::keep_for)
            .map_err(|e| {
                format!(
                    "task_retention \"{s}\" is not a duration ({e}); write e.g. \"30d\", \"12h\", \
                     or \"0\" to keep every task"
                )
            })
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("0"),
            Some(d) => write!(f, "{}", humantime::format_duration(d)),
        }
    }
}

impl Serialize for Retention {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Retention {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// A duration as text; or a whole number of seconds, which is how an environment
        /// override (`SITEGATE_STORE__TASK_RETENTION=0`) arrives.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Seconds(u64),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Raw::Seconds(secs) => Ok(Retention::keep_for(std::time::Duration::from_secs(secs))),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: default_backend(),
            path: default_store_path(),
            url: None,
            schema: default_schema(),
            pool_size: default_pool_size(),
            task_retention: Retention::default(),
        }
    }
}

fn default_schema() -> String {
    "public".to_owned()
}
fn default_pool_size() -> usize {
    16
}

fn default_backend() -> StoreBackend {
    StoreBackend::Embedded
}

fn default_store_path() -> PathBuf {
    PathBuf::from("data")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The users file (`[[user]]` with name, roles, argon2 password_hash).
    pub users_file: PathBuf,
    /// A session unused this long ends. Default: 1800 (30 min).
    #[serde(default = "default_idle_timeout")]
    pub session_idle_timeout_secs: u64,
    /// A session ends this long after login, used or not. Default: 86400 (24 h).
    #[serde(default = "default_max_age")]
    pub session_max_age_secs: u64,
    /// Failed logins for one user name within `login_failure_window_secs` that lock the name
    /// out (429 with `Retry-After`, password not checked) for `login_lockout_secs`. Unknown
    /// names count too, so a lockout says nothing about which names exist. 0 turns it off.
    /// Default: 5.
    #[serde(default = "default_login_failures_per_user")]
    pub login_failures_per_user: u32,
    /// Failed logins from one client address (an IPv4 address or an IPv6 /64) within the window
    /// that lock the address out. Behind a load balancer every client has the balancer's
    /// address: set 0 (off) there and throttle at the balancer. Default: 20.
    #[serde(default = "default_login_failures_per_address")]
    pub login_failures_per_address: u32,
    /// The sliding window in which failed logins are counted, in seconds. Default: 300.
    #[serde(default = "default_login_failure_window")]
    pub login_failure_window_secs: u64,
    /// The first lockout, in seconds; each further lockout of the same name or address doubles
    /// it, up to `login_lockout_max_secs`. Default: 30.
    #[serde(default = "default_login_lockout")]
    pub login_lockout_secs: u64,
    /// The longest lockout, in seconds. Default: 900 (15 min).
    #[serde(default = "default_login_lockout_max")]
    pub login_lockout_max_secs: u64,
}

impl AuthConfig {
    /// The users file and every other setting at its default.
    pub fn new(users_file: PathBuf) -> Self {
        AuthConfig {
            users_file,
            session_idle_timeout_secs: default_idle_timeout(),
            session_max_age_secs: default_max_age(),
            login_failures_per_user: default_login_failures_per_user(),
            login_failures_per_address: default_login_failures_per_address(),
            login_failure_window_secs: default_login_failure_window(),
            login_lockout_secs: default_login_lockout(),
            login_lockout_max_secs: default_login_lockout_max(),
        }
    }
}

fn default_idle_timeout() -> u64 {
    1800
}

fn default_max_age() -> u64 {
    86_400
}
fn default_login_failures_per_user() -> u32 {
    5
}
fn default_login_failures_per_address() -> u32 {
    20
}
fn default_login_failure_window() -> u64 {
    300
}
fn default_login_lockout() -> u64 {
    30
}
fn default_login_lockout_max() -> u64 {
    900
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted. Default: 1048576 (1 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest total size of a request's headers (names, values and their separators; the
    /// request line is bounded on its own); larger ones get 431 BadUserInput. The HTTP parser
    /// keeps a hard limit above this one, which it answers with a bare 431. Default: 16384
    /// (16 KiB).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// A request not answered in this time fails. Default: 30.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// A client that has not sent its whole request head in this time is answered 408 (when
    /// it had sent part of one) and disconnected; a new connection must bring its first
    /// request within it too. It also bounds how long an idle connection stays open between
    /// requests (HTTP/1: no new request head; HTTP/2: no request in flight and no traffic);
    /// keep balancers' idle connection timeouts below it. Default: 10.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_secs: u64,
    /// Client API requests handled at once; more wait, within the request timeout, then get
    /// 503 ServerBusy with `Retry-After`. Held requests (blocking reads, event streams) and
    /// `/healthz`, `/readyz`, `/metrics` are outside this budget. Default: 1024.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// The same for requests arriving over the peer link: a budget of its own, so neither
    /// side can starve the other. Default: 256.
    #[serde(default = "default_peer_max_concurrent")]
    pub peer_max_concurrent_requests: usize,
    /// Held requests (a `waitForChange` blocking read or a `/events` stream) one user may
    /// have open at once; more get 429 TooManyRequests with `Retry-After`. Default: 32.
    #[serde(default = "default_max_held_per_user")]
    pub max_held_per_user: usize,
    /// Held requests open at once on this site, all users together; more get 503
    /// ServerBusy. Default: 1024.
    #[serde(default = "default_max_held_total")]
    pub max_held_total: usize,
    /// An event stream ends after this long (the client reconnects), so no stream holds its
    /// slot for ever. Default: 3600.
    #[serde(default = "default_max_stream_secs")]
    pub max_stream_secs: u64,
    /// Open client connections at once; more wait in the accept queue. Default: 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest draining on shutdown before open connections are dropped. Default: 20.
    #[serde(default = "default_drain")]
    pub shutdown_grace_secs: u64,
    /// On shutdown, how long `/readyz` answers 503 while the listener still serves, so a load
    /// balancer's health check takes the replica out before it stops accepting. Set it above
    /// the balancer's check interval times its fall count. Default: 0.
    #[serde(default)]
    pub drain_delay_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_max_body(),
            max_header_bytes: default_max_header_bytes(),
            request_timeout_secs: default_request_timeout(),
            header_read_timeout_secs: default_header_timeout(),
            max_concurrent_requests: default_max_concurrent(),
            peer_max_concurrent_requests: default_peer_max_concurrent(),
            max_held_per_user: default_max_held_per_user(),
            max_held_total: default_max_held_total(),
            max_stream_secs: default_max_stream_secs(),
            max_connections: default_max_connections(),
            shutdown_grace_secs: default_drain(),
            drain_delay_ms: 0,
        }
    }
}

fn default_max_body() -> usize {
    1 << 20
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_request_timeout() -> u64 {
    30
}
fn default_header_timeout() -> u64 {
    10
}
fn default_max_concurrent() -> usize {
    1024
}
fn default_max_connections() -> usize {
    4096
}
fn default_peer_max_concurrent() -> usize {
    256
}
fn default_max_held_per_user() -> usize {
    32
}
fn default_max_held_total() -> usize {
    1024
}
fn default_max_stream_secs() -> u64 {
    3600
}
fn default_drain() -> u64 {
    20
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines when standard error is not a terminal, readable text when it is.
    Auto,
    Json,
    Text,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Default: `auto`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A tracing filter (`info`, `sitegate_gateway=debug`). Default: `info`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Auto
}
fn default_log_level() -> String {
    "info".to_owned()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The federation CA certificate (PEM).
    pub ca: PathBuf,
    /// This site's certificate chain (PEM); its DNS SAN is the site name.
    pub cert: PathBuf,
    /// This site's private key (PEM).
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's site name; its certificate must carry it as a DNS SAN.
    pub name: SiteName,
    /// The peer link's address, `https://host:port`; the host need not match the name.
    pub url: String,
    /// Whether this site accepts `multisite` session requests from that peer: the peer
    /// vouches for a user's identity and gets a session for the user of the same name here,
    /// usable only by that peer over the peer link. Such a session has role `user` at most
    /// (an administrator's too) and never `writer`. Default: false.
    #[serde(default)]
    pub trust_multisite: bool,
    /// Whether a `multisite` session from that peer keeps the `admin` role of an
    /// administrator (every task of this site, the `user` filter). Default: false.
    #[serde(default)]
    pub trust_multisite_admin: bool,
    /// Free text shown by `GET /sites`. Default: empty.
    #[serde(default)]
    pub description: String,
    /// The peer's trust anchor, when it is run by another organisation with a CA of its own:
    /// a PEM file of the CA certificate(s) the peer's certificates chain to. Only this peer is
    /// checked against it, in both directions: its client certificate on this site's peer
    /// link, and its server certificate when this site connects to it. Default: the
    /// federation CA of `[tls] ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
}

impl PeerConfig {
    /// `host:port` of the peer link, from `url` (`https://host:port`, port required; the host
    /// may be a name, an IPv4 address or a bracketed IPv6 address).
    pub fn address(&self) -> Result<String, ModelError> {
        let bad = |why: &str| {
            ModelError::invalid(format!("peer '{}': url '{}' {why}", self.name, self.url))
        };
        let rest = self
            .url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https:// (the peer link is always TLS)"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad("must be https://host:port with no path"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("needs a port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("needs a host and a port from 1 to 65535"));
        }
        Ok(authority.to_owned())
    }
}

impl SiteConfig {
    /// Checks what serde cannot: cross-field rules and sane ranges.
    pub fn validate(&self) -> Result<(), ModelError> {
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            return Err(ModelError::invalid(
                "limits.max_body_bytes must be at least 1024",
            ));
        }
        // Below 1 KiB ordinary clients fail; above 1 MiB one request head could hold that much
        // memory per connection.
        if !(1024..=1 << 20).contains(&l.max_header_bytes) {
            return Err(ModelError::invalid(
                "limits.max_header_bytes must be from 1024 to 1048576",
            ));
        }
        for (name, v) in [
            ("limits.request_timeout_secs", l.request_timeout_secs),
            (
                "limits.header_read_timeout_secs",
                l.header_read_timeout_secs,
            ),
            (
                "auth.session_idle_timeout_secs",
                self.auth.session_idle_timeout_secs,
            ),
            ("auth.session_max_age_secs", self.auth.session_max_age_secs),
            (
                "auth.login_failure_window_secs",
                self.auth.login_failure_window_secs,
            ),
            ("auth.login_lockout_secs", self.auth.login_lockout_secs),
        ] {
            if v == 0 {
                return Err(ModelError::invalid(format!(
                    "{name} must be greater than 0"
                )));
            }
        }
        if self.listen.tls_cert.is_some() != self.listen.tls_key.is_some() {
            return Err(ModelError::invalid(
                "listen.tls_cert and listen.tls_key go together: set both or neither",
            ));
        }
        if self.auth.login_lockout_max_secs < self.auth.login_lockout_secs {
            return Err(ModelError::invalid(
                "auth.login_lockout_max_secs must be at least auth.login_lockout_secs",
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(ModelError::invalid(
                "telemetry.sampling_ratio must be between 0.0 and 1.0",
            ));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ModelError::invalid(
                    "telemetry.otlp_endpoint must start with http:// or https://",
                ));
            }
        }
        if self.store.backend == StoreBackend::Postgres && self.store.url.is_none() {
            return Err(ModelError::invalid(
                "store.backend = \"postgres\" needs store.url",
            ));
        }
        if self.store.pool_size == 0 {
            return Err(ModelError::invalid(
                "store.pool_size must be greater than 0",
            ));
        }
        let p = &self.peering;
        if p.connect_timeout_ms == 0
            || p.request_timeout_ms == 0
            || p.failure_threshold == 0
            || p.circuit_open_secs == 0
            || p.probe_interval_ms == 0
            || p.tls_reload_interval_secs == 0
            || p.connections_per_peer == 0
            || p.http1_max_requests_per_peer == 0
        {
            return Err(ModelError::invalid(
                "every [peering] value must be greater than 0",
            ));
        }
        self.listen.trusted_proxy_nets()?;
        if l.max_concurrent_requests == 0
            || l.peer_max_concurrent_requests == 0
            || l.max_connections == 0
            || l.max_held_per_user == 0
            || l.max_held_total == 0
            || l.max_stream_secs == 0
        {
            return Err(ModelError::invalid(
                "limits.max_concurrent_requests, peer_max_concurrent_requests, max_connections, \
                 max_held_per_user, max_held_total and max_stream_secs must be greater than 0",
            ));
        }
        let mut names = vec![&self.site.name];
        for p in &self.peers {
            if names.contains(&&p.name) {
                return Err(ModelError::invalid(format!(
                    "site name '{}' is configured twice",
                    p.name
                )));
            }
            names.push(&p.name);
            p.address()?;
        }
        if !self.peers.is_empty() && (self.tls.is_none() || self.listen.peer.is_none()) {
            return Err(ModelError::invalid(
                "peers are configured, so [tls] and listen.peer are required",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> SiteConfig {
        SiteConfig {
            site: SiteSection {
                name: SiteName::parse("site1").unwrap(),
                description: String::new(),
            },
            listen: ListenConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::new("users.toml".into()),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            tls: None,
            telemetry: TelemetryConfig::default(),
            peering: PeeringConfig::default(),
            peers: vec![],
        }
    }

    #[test]
    fn task_retention_reads_durations_and_zero() {
        let parse = |s: &str| s.parse::<Retention>();
        assert_eq!(parse("0").unwrap().duration(), None);
        assert_eq!(
            parse("30d").unwrap().duration(),
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            parse("2s").unwrap().duration(),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(
            parse("0s").unwrap().duration(),
            None,
            "zero keeps everything"
        );
        let err = parse("thirty days").unwrap_err();
        assert!(
            err.contains("task_retention") && err.contains("30d"),
            "{err}"
        );
        // Written back as read.
        assert_eq!(parse("30d").unwrap().to_string(), "30days");
        assert_eq!(parse("30days").unwrap(), parse("30d").unwrap());
        let store: StoreConfig = toml::from_str("task_retention = \"12h\"").unwrap();
        assert_eq!(
            store.task_retention.duration(),
            Some(std::time::Duration::from_secs(12 * 3600))
        );
        assert!(toml::from_str::<StoreConfig>("task_retention = \"12 parsecs\"").is_err());
        let zero: StoreConfig = toml::from_str("task_retention = 0").unwrap();
        assert_eq!(zero.task_retention.duration(), None);
        assert_eq!(StoreConfig::default().task_retention.duration(), None);
    }

    #[test]
    fn secrets_are_not_printed() {
        let mut c = minimal();
        c.store.backend = StoreBackend::Postgres;
        assert!(c.validate().is_err(), "postgres needs a url");
        c.store.url = Some(Secret::new("postgres://u:hunter2@h/db"));
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            c.store.url.as_ref().unwrap().expose(),
            "postgres://u:hunter2@h/db"
        );
    }

    #[test]
    fn minimal_is_valid() {
        assert!(minimal().validate().is_ok());
    }

    #[test]
    fn peer_addresses() {
        let peer = |url: &str| PeerConfig {
            name: SiteName::parse("site2").unwrap(),
            url: url.into(),
            trust_multisite: false,
            trust_multisite_admin: false,
            description: String::new(),
            ca: None,
        };
        for (url, want) in [
            ("https://127.0.0.1:8049", Some("127.0.0.1:8049")),
            ("https://peer.example:443/", Some("peer.example:443")),
            ("https://[::1]:8049", Some("[::1]:8049")),
            ("http://127.0.0.1:8049", None),
            ("https://127.0.0.1", None),
            ("https://127.0.0.1:0", None),
            ("https://127.0.0.1:99999", None),
            ("https://a:1/path", None),
            ("https://user@a:1", None),
        ] {
            assert_eq!(peer(url).address().ok().as_deref(), want, "{url}");
        }
    }

    #[test]
    fn invalid_configs() {
        let mut c = minimal();
        c.limits.max_body_bytes = 10;
        assert!(c.validate().is_err());

        for bytes in [0, 1023, (1 << 20) + 1] {
            let mut c = minimal();
            c.limits.max_header_bytes = bytes;
            assert!(c.validate().is_err(), "max_header_bytes {bytes}");
        }

        let mut c = minimal();
        c.auth.session_idle_timeout_secs = 0;
        assert!(c.validate().is_err());

        let mut c = minimal();
        c.listen.tls_cert = Some("client.pem".into());
        assert!(c.validate().is_err(), "a certificate without its key");
        c.listen.tls_key = Some("client.key".into());
        assert!(c.validate().is_ok());

        let mut c = minimal();
        c.auth.login_lockout_secs = 0;
        assert!(c.validate().is_err(), "a zero lockout would not lock");
        let mut c = minimal();
        c.auth.login_lockout_max_secs = c.auth.login_lockout_secs - 1;
        assert!(c.validate().is_err(), "max lockout below the first");
        let mut c = minimal();
        c.auth.login_failures_per_user = 0;
        c.auth.login_failures_per_address = 0;
        assert!(c.validate().is_ok(), "0 turns throttling off");

        let mut c = minimal();
        c.peers.push(PeerConfig {
            name: SiteName::parse("site2").unwrap(),
            url: "https://127.0.0.1:1".into(),
            trust_multisite: false,
            trust_multisite_admin: false,
            description: String::new(),
            ca: None,
        });
        assert!(c.validate().is_err(), "peers need tls");

        let mut c = minimal();
        c.peers.push(PeerConfig {
            name: SiteName::parse("site1").unwrap(),
            url: "https://127.0.0.1:1".into(),
            trust_multisite: false,
            trust_multisite_admin: false,
            description: String::new(),
            ca: None,
        });
        assert!(c.validate().is_err(), "a peer may not share the local name");
    }
}
