//! The request-wide middleware of the client API, in the order `app::client_api` stacks them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sitegate_model::operation::OperationId;
use tracing::Instrument;

use crate::error::ApiError;

/// The header that carries the operation ID, as the original API spells it.
pub(crate) const OPERATION_ID_HEADER: &str = "operationID";

/// The address a request came from, put in its extensions by the accept loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// Set on every request that arrived over the peer link: the site whose certificate the
/// connection presented.
#[derive(Clone, Debug)]
pub(crate) struct PeerOrigin(pub(crate) sitegate_model::site::SiteName);

/// When the request's answer stops being useful; forwarded requests inherit it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline(pub(crate) Instant);

/// The load balancers whose `X-Forwarded-For` is believed (`listen.trusted_proxies`).
#[derive(Clone, Debug, Default)]
pub(crate) struct TrustedProxies(pub(crate) std::sync::Arc<Vec<ipnet::IpNet>>);

impl TrustedProxies {
    fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind a trusted proxy: walking `X-Forwarded-For` from the right (the
    /// entries the proxies appended), the first address that is not a trusted proxy. `None`
    /// when the connection is not from a trusted proxy, or the header says nothing usable;
    /// entries further left than that address are the client's own claims and never used.
    pub(crate) fn client_behind(
        &self,
        peer: std::net::IpAddr,
        headers: &axum::http::HeaderMap,
    ) -> Option<std::net::IpAddr> {
        if !self.contains(peer) {
            return None;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            let ip = hop.parse::<std::net::IpAddr>().ok()?;
            if !self.contains(ip) {
                return Some(ip);
            }
        }
        None
    }
}

/// Outermost on the client API when `listen.trusted_proxies` is set: a request that came
/// through a trusted load balancer gets the client's address (from `X-Forwarded-For`) as its
/// [`ClientAddr`], for login throttling and the access log.
pub(crate) async fn forwarded_client(
    State(proxies): State<TrustedProxies>,
    mut req: Request,
    next: Next,
) -> Response {
    if req.extensions().get::<PeerOrigin>().is_none() {
        if let Some(ClientAddr(peer)) = req.extensions().get::<ClientAddr>().copied() {
            if let Some(client) = proxies.client_behind(peer.ip(), req.headers()) {
                req.extensions_mut()
                    .insert(ClientAddr(SocketAddr::new(client, 0)));
            }
        }
    }
    next.run(req).await
}

/// What the operation-ID layer knows about the site, for its span and access log.
#[derive(Clone)]
pub(crate) struct RequestContext {
    pub(crate) site: String,
}

/// Outermost layer: gives every request an operation ID (the caller's, or a new UUID), opens
/// the request's span carrying it, echoes it on the response, and writes one access-log line.
///
/// It is outermost so that every response, including errors produced by inner layers, carries
/// the header and is logged. A malformed operation ID is refused here, and the response carries
/// a fresh one instead: the raw value is never reflected.
pub(crate) async fn operation_id(
    State(ctx): State<RequestContext>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let supplied = req.headers().get(OPERATION_ID_HEADER).map(|v| {
        v.to_str()
            .map_err(|_| sitegate_model::ModelError::invalid("operationID must be visible ASCII"))
            .and_then(OperationId::parse)
    });
    let (op, refusal) = match supplied {
        None => (OperationId::generate(), None),
        Some(Ok(op)) => (op, None),
        Some(Err(e)) => (OperationId::generate(), Some(ApiError::from(e))),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The router's pattern (an `Arc<str>` inside): cloned, not copied.
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let from_peer = req
        .extensions()
        .get::<PeerOrigin>()
        .map(|p| p.0.to_string())
        .unwrap_or_default();
    // Probes and scrapes arrive every few hundred milliseconds from every balancer.
    let quiet = matches!(route, "/healthz" | "/readyz" | "/metrics");
    let span = crate::telemetry::request_span(
        req.headers(),
        &op,
        &ctx.site,
        &format!("{method} {route}"),
        &from_peer,
        quiet,
    );
    req.extensions_mut().insert(op.clone());
    let mut response = match refusal {
        Some(err) => span.in_scope(|| err.into_response()),
        None => next.run(req).instrument(span.clone()).await,
    };
    // The site the handler answered for, if it resolved one (a response extension: resolving
    // a site records nothing by itself).
    let target_site = response
        .extensions()
        .get::<crate::federation::TargetSite>()
        .map(|t| t.0.clone());
    if let Some(site) = &target_site {
        span.record("target_site", &**site);
    }
    if let Ok(value) = HeaderValue::from_str(op.as_str()) {
        response.headers_mut().insert(OPERATION_ID_HEADER, value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let target_site: &str = target_site.as_deref().unwrap_or_default();
    span.record("http.response.status_code", status);
    request_series(route, method_label(&method), status, target_site).record(elapsed.as_secs_f64());
    span.in_scope(|| {
        macro_rules! access_log_at {
            ($level:expr) => {
                tracing::event!(
                    target: "sitegate::access",
                    $level,
                    status,
                    latency_ms = elapsed.as_secs_f64() * 1000.0,
                    client = tracing::field::display(ShownAddr(client)),
                    target_site,
                    "{method} {path}",
                )
            };
        }
        if quiet {
            access_log_at!(tracing::Level::DEBUG);
        } else {
            access_log_at!(tracing::Level::INFO);
        }
    });
    response
}

/// A client address as the access log shows it; empty when unknown.
struct ShownAddr(Option<SocketAddr>);

impl std::fmt::Display for ShownAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// One label set's request metrics (`sitegate_requests_total` and
/// `sitegate_request_duration_seconds`).
#[derive(Clone)]
struct RequestSeries {
    count: metrics::Counter,
    duration: metrics::Histogram,
}

impl RequestSeries {
    fn record(&self, seconds: f64) {
        self.count.increment(1);
        self.duration.record(seconds);
    }
}

/// The series of each label set seen, registered once. Building the label set per request
/// (four owned strings, the recorder's key and its lookup) was a measurable part of a
/// request's CPU; here a request writes the labels into a reused buffer and looks them up.
/// Bounded like the labels themselves: routes from the router, a fixed set of methods, the
/// statuses this site answers with, and its configured sites.
fn request_series(route: &str, method: &'static str, status: u16, target: &str) -> RequestSeries {
    use std::fmt::Write as _;
    static SERIES: std::sync::OnceLock<dashmap::DashMap<Box<str>, RequestSeries>> =
        std::sync::OnceLock::new();
    thread_local! {
        static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    let series = SERIES.get_or_init(dashmap::DashMap::new);
    KEY.with_borrow_mut(|key| {
        key.clear();
        let _ = write!(key, "{route}\u{0}{method}\u{0}{status}\u{0}{target}");
        if let Some(found) = series.get(key.as_str()) {
            return found.clone();
        }
        let labels = [
            ("route", route.to_owned()),
            ("method", method.to_owned()),
            ("status", status.to_string()),
            ("target_site", target.to_owned()),
        ];
        let made = RequestSeries {
            count: metrics::counter!("sitegate_requests_total", &labels),
            duration: metrics::histogram!("sitegate_request_duration_seconds", &labels),
        };
        series.insert(key.as_str().into(), made.clone());
        made
    })
}

/// The `method` label of the request metrics: the methods HTTP defines, and `other` for any
/// a client makes up, so a client cannot add series (each costs memory until scraped and
/// time on every scrape).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Answers JSON with the vendor media type (`application/vnd.vmware.h4-v<ver>+json;charset=UTF-8`) when the
/// caller asked for it, as the original API does; plain `application/json` otherwise.
pub(crate) async fn negotiate_media_type(req: Request, next: Next) -> Response {
    let vendor = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(vendor_media_type)
        // With the charset, as the original's answers carry it.
        .and_then(|t| HeaderValue::from_str(&format!("{t};charset=UTF-8")).ok());
    let mut response = next.run(req).await;
    if let Some(vendor) = vendor {
        let is_json = response
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/json"));
        if is_json {
            response.headers_mut().insert(CONTENT_TYPE, vendor);
        }
    }
    response
}

/// The first vendor type in an `Accept` header, if any: `application/vnd.vmware.h4-v4+json`.
pub(crate) fn vendor_media_type(accept: &str) -> Option<String> {
    accept.split(',').find_map(|range| {
        let media = range.split(';').next()?.trim().to_ascii_lowercase();
        let version = media
            .strip_prefix("application/vnd.vmware.h4-v")?
            .strip_suffix("+json")?;
        let valid = !version.is_empty()
            && version.len() <= 16
            && version.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        valid.then_some(media)
    })
}

/// Fails a request that has not been answered within the server's deadline, so a stuck store
/// or peer cannot hold a client (or a concurrency slot) forever. A request from a peer brings
/// the time its caller has left, and gets no more than that.
///
/// A blocking read (`waitForChange=true`) gets its wait on top: holding it is the point.
pub(crate) async fn deadline(
    State(limit): State<Duration>,
    mut req: Request,
    next: Next,
) -> Response {
    let mut limit = limit + sitegate_model::watch::requested_wait(req.uri().query());
    if req.extensions().get::<PeerOrigin>().is_some() {
        let left = req
            .headers()
            .get(crate::federation::DEADLINE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(ms) = left {
            limit = limit.min(Duration::from_millis(ms));
        }
    }
    req.extensions_mut()
        .insert(Deadline(Instant::now() + limit));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_behind_a_trusted_proxy_is_the_right_most_untrusted_hop() {
        let proxies = TrustedProxies(std::sync::Arc::new(vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]));
        let headers = |values: &[&str]| {
            let mut h = axum::http::HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            h
        };
        let proxy = "127.0.0.1".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        // The client spoofs an address; HAProxy appends the real one.
        assert_eq!(
            proxies.client_behind(proxy, &headers(&["192.0.2.66, 127.0.0.3"])),
            ip("127.0.0.3")
        );
        assert_eq!(
            proxies.client_behind(proxy, &headers(&["192.0.2.66", "127.0.0.3"])),
            ip("127.0.0.3")
        );
        // A chain of trusted proxies is walked through.
        assert_eq!(
            proxies.client_behind(proxy, &headers(&["198.51.100.7, 10.1.2.3"])),
            ip("198.51.100.7")
        );
        // Not from a proxy: the header is the client's claim, ignored.
        assert_eq!(
            proxies.client_behind("192.0.2.1".parse().unwrap(), &headers(&["198.51.100.7"])),
            None
        );
        assert_eq!(proxies.client_behind(proxy, &headers(&["garbage"])), None);
        assert_eq!(proxies.client_behind(proxy, &headers(&[])), None);
    }

    #[test]
    fn method_labels_are_a_fixed_set() {
        for (method, label) in [
            ("GET", "GET"),
            ("PATCH", "PATCH"),
            ("QWERTYUIOPAS", "other"),
            ("get", "other"),
        ] {
            let m = axum::http::Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(method_label(&m), label);
        }
    }

    #[test]
    fn vendor_types() {
        let cases = [
            ("application/json", None),
            (
                "application/vnd.vmware.h4-v4+json",
                Some("application/vnd.vmware.h4-v4+json"),
            ),
            (
                "text/html, application/vnd.vmware.h4-v4.1+json;q=0.9",
                Some("application/vnd.vmware.h4-v4.1+json"),
            ),
            ("application/vnd.vmware.h4-v+json", None),
            ("application/vnd.vmware.h4-vX+json", None),
            ("*/*", None),
        ];
        for (accept, want) in cases {
            assert_eq!(vendor_media_type(accept).as_deref(), want, "{accept}");
        }
    }
}
