//! The gateway's errors. [`ApiError`] is what a request can fail with; its `IntoResponse` is
//! the one place that picks the status and envelope and logs the failure, once.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sitegate_model::error::echo;
use sitegate_model::{ErrorCode, ErrorEnvelope, ModelError};
use sitegate_store::StoreError;
use uuid::Uuid;

use crate::federation::PeerError;

/// Why a request failed, tagged by where the fault lies: the caller (4xx) or this site (5xx).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The caller sent something malformed or out of range.
    #[error("{0}")]
    BadInput(String),
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The request's headers together exceed `limits.max_header_bytes`.
    #[error("the request headers are larger than {0} bytes")]
    HeaderTooLarge(usize),
    /// The client was too slow sending its request: the named part (head or body) did not
    /// arrive in time. The client's fault, unlike [`ApiError::Timeout`].
    #[error("the request {0} did not arrive in time")]
    RequestTimeout(&'static str),
    #[error("no such endpoint")]
    NoRoute,
    #[error("this endpoint does not accept that method")]
    MethodNotAllowed,
    /// Wrong credentials at login.
    #[error("{0}")]
    NotAuthenticated(&'static str),
    /// No usable session token: none, unknown, expired or logged out. Answered with
    /// `WWW-Authenticate: Authentication Token Required`, which the original's clients read as
    /// "log in again".
    #[error("{0}")]
    SessionRequired(&'static str),
    /// Too many failed logins for the user name or from the address: refused, without
    /// checking the password, until `retry_after` has passed.
    #[error(
        "Too many failed logins for this user or from this address; try again in {} seconds.",
        retry_after_secs(.retry_after)
    )]
    TooManyAttempts { retry_after: std::time::Duration },
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("site '{0}' is not known here")]
    SiteNotFound(String),
    #[error("task {0} was not found")]
    TaskNotFound(Uuid),
    #[error("task {0} has already completed and cannot change")]
    TaskAlreadyCompleted(Uuid),
    /// The caller holds no usable session at the peer the request names.
    #[error("{0}")]
    RemoteAuth(String),
    /// The peer link failed: unreachable, marked down, too slow, or refused in the handshake.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The request did not finish within the server's deadline.
    #[error("the request did not complete in time")]
    Timeout,
    /// The caller already holds as many blocking reads and event streams as one user may.
    #[error(
        "You hold {limit} blocking reads and event streams already; close one or try again later."
    )]
    TooManyHeld { limit: usize },
    /// The site is at one of its limits of requests in progress (`what` names it).
    #[error("This site is at its limit of {0}; try again shortly.")]
    Busy(&'static str),
    /// The site is draining or its store is unreachable (`/readyz`).
    #[error("not ready: {0}")]
    NotReady(&'static str),
    /// The store failed; the detail is logged, never returned.
    #[error("store failure: {0}")]
    Store(#[source] StoreError),
    /// Anything else internal; the detail is logged, never returned.
    #[error("internal failure: {0}")]
    Internal(String),
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        ApiError::BadInput(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TaskNotFound(id) => ApiError::TaskNotFound(id),
            StoreError::TaskAlreadyFinal(id) => ApiError::TaskAlreadyCompleted(id),
            StoreError::Rejected(msg) => ApiError::BadInput(msg),
            other => ApiError::Store(other),
        }
    }
}

/// Whole seconds to wait, rounded up (never 0, which would invite an immediate retry).
fn retry_after_secs(d: &std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

const INTERNAL_MSG: &str =
    "The server could not complete the request. Its details are logged under this response's operationID.";

impl ApiError {
    /// Status, code, message and arguments as the caller sees them.
    fn parts(&self) -> (StatusCode, ErrorCode, String, Vec<String>) {
        use ApiError::*;
        let msg = self.to_string();
        match self {
            BadInput(_) => (
                StatusCode::BAD_REQUEST,
                ErrorCode::BadUserInput,
                msg,
                vec![],
            ),
            BodyTooLarge(n) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadUserInput,
                msg,
                vec![n.to_string()],
            ),
            HeaderTooLarge(n) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ErrorCode::BadUserInput,
                msg,
                vec![n.to_string()],
            ),
            RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadUserInput,
                msg,
                vec![],
            ),
            NoRoute => (StatusCode::NOT_FOUND, ErrorCode::NotFound, msg, vec![]),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::BadUserInput,
                msg,
                vec![],
            ),
            NotAuthenticated(_) | SessionRequired(_) => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::NotAuthenticated,
                msg,
                vec![],
            ),
            TooManyAttempts { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::NotAuthenticated,
                msg,
                vec![retry_after_secs(retry_after).to_string()],
            ),
            Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden, msg, vec![]),
            SiteNotFound(site) => (
                StatusCode::NOT_FOUND,
                ErrorCode::SiteNotFound,
                format!("Site '{}' is not known here.", echo(site)),
                vec![echo(site)],
            ),
            TaskNotFound(id) => (
                StatusCode::NOT_FOUND,
                ErrorCode::TaskNotFound,
                msg,
                vec![id.to_string()],
            ),
            TaskAlreadyCompleted(id) => (
                StatusCode::CONFLICT,
                ErrorCode::TaskAlreadyCompleted,
                msg,
                vec![id.to_string()],
            ),
            RemoteAuth(_) => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::RemoteAuthenticationFailure,
                msg,
                vec![],
            ),
            Peer(e) => {
                let code = e.code();
                let status =
                    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
                (status, code, e.message(), vec![])
            }
            TooManyHeld { limit } => (
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                msg,
                vec![limit.to_string()],
            ),
            Busy(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServerBusy,
                msg,
                vec![],
            ),
            NotReady(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::GeneralServerFailure,
                msg,
                vec![],
            ),
            Timeout => (
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::GeneralServerFailure,
                msg,
                vec![],
            ),
            Store(_) | Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::GeneralServerFailure,
                INTERNAL_MSG.to_owned(),
                vec![],
            ),
        }
    }

    /// The envelope as the caller sees it.
    pub fn envelope(&self) -> ErrorEnvelope {
        let (_, code, msg, args) = self.parts();
        ErrorEnvelope::new(code, msg, args)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, msg, args) = self.parts();
        // A peer marked down tells the caller when to come back.
        let retry_after = match &self {
            ApiError::Peer(PeerError::CircuitOpen { retry_after, .. }) => {
                Some(retry_after.as_secs().max(1))
            }
            ApiError::Peer(PeerError::Unreachable { .. } | PeerError::BadAnswer { .. }) => Some(1),
            ApiError::TooManyAttempts { retry_after } => Some(retry_after_secs(retry_after)),
            ApiError::TooManyHeld { .. } | ApiError::Busy(_) => Some(1),
            _ => None,
        };
        // Logged here and nowhere else, inside the request's span so the line carries the
        // operation ID; internal failures with their full cause chain.
        if let ApiError::Peer(e) = &self {
            tracing::warn!(code = code.as_str(), error = %e, detail = e.detail(), "peer request failed");
        } else if matches!(self, ApiError::Busy(_)) {
            // Expected under overload, and counted; one line each, not an error's.
            tracing::warn!(code = code.as_str(), error = %self, "request refused: busy");
        } else if status.is_server_error() {
            let cause = std::error::Error::source(&self)
                .map(|s| s.to_string())
                .unwrap_or_default();
            tracing::error!(code = code.as_str(), error = %self, cause, "request failed");
        } else {
            tracing::info!(code = code.as_str(), error = %self, "request refused");
        }
        let body = ErrorEnvelope::new(code, msg, args);
        let mut response = (status, axum::Json(body)).into_response();
        if matches!(
            self,
            ApiError::BodyTooLarge(_) | ApiError::RequestTimeout(_)
        ) {
            // The rest of the body is never read, so the connection cannot be reused: say so
            // rather than let a pooling client fail its next request on it.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if matches!(self, ApiError::SessionRequired(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Authentication Token Required"),
            );
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// Why the gateway could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("peer link: {0}")]
    PeerLink(String),
    #[error("users file {path}: {reason}")]
    Users { path: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_never_leak_detail() {
        for e in [
            ApiError::Store(StoreError::Database(
                "disk I/O error at /secret/path".into(),
            )),
            ApiError::Internal("panic in module x".into()),
        ] {
            let env = e.envelope();
            assert_eq!(env.code, "GeneralServerFailure");
            assert!(!env.msg.contains("secret") && !env.msg.contains("module x"));
            assert_eq!(env.stacktrace, "");
        }
    }

    #[test]
    fn store_errors_map_to_api_codes() {
        let id = Uuid::new_v4();
        let cases = [
            (StoreError::TaskNotFound(id), "TaskNotFound", 404),
            (
                StoreError::TaskAlreadyFinal(id),
                "TaskAlreadyCompleted",
                409,
            ),
            (StoreError::Rejected("x".into()), "BadUserInput", 400),
            (StoreError::Closed, "GeneralServerFailure", 500),
        ];
        for (e, code, status) in cases {
            let api = ApiError::from(e);
            let (s, c, _, _) = api.parts();
            assert_eq!((c.as_str(), s.as_u16()), (code, status));
        }
    }

    #[test]
    fn peer_errors_map_to_remote_codes() {
        let site = || "site2".to_string();
        let cases = [
            (
                PeerError::Unreachable {
                    site: site(),
                    detail: "refused".into(),
                },
                "RemoteSiteUnavailable",
                502,
            ),
            (
                PeerError::CircuitOpen {
                    site: site(),
                    retry_after: std::time::Duration::from_secs(3),
                },
                "RemoteSiteUnavailable",
                502,
            ),
            (
                PeerError::Timeout { site: site() },
                "RemoteSiteTimeout",
                504,
            ),
            (
                PeerError::RefusedOurCertificate {
                    site: site(),
                    detail: "x".into(),
                },
                "RemoteAuthenticationFailure",
                401,
            ),
            (
                PeerError::UntrustedPeerCertificate {
                    site: site(),
                    detail: "x".into(),
                },
                "RemoteAuthenticationFailure",
                401,
            ),
        ];
        for (e, code, status) in cases {
            let (s, c, msg, _) = ApiError::from(e).parts();
            assert_eq!((c.as_str(), s.as_u16()), (code, status));
            assert!(msg.contains("site2") && !msg.contains("refused:"), "{msg}");
        }
    }

    #[test]
    fn too_many_attempts_is_429_not_authenticated_with_retry_after() {
        let e = ApiError::TooManyAttempts {
            retry_after: std::time::Duration::from_millis(29_001),
        };
        let (status, code, msg, args) = e.parts();
        assert_eq!((status.as_u16(), code.as_str()), (429, "NotAuthenticated"));
        assert!(
            msg.contains("Too many failed logins") && msg.contains("30 seconds"),
            "{msg}"
        );
        assert_eq!(args, ["30"]);
        let response = e.into_response();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(
            response
                .headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("30")
        );
        assert_eq!(retry_after_secs(&std::time::Duration::ZERO), 1);
    }

    #[test]
    fn client_side_limits_are_bad_user_input_with_their_own_status() {
        let cases = [
            (ApiError::BodyTooLarge(1024), 413, true),
            (ApiError::HeaderTooLarge(16_384), 431, false),
            (ApiError::RequestTimeout("body"), 408, true),
            // The deadline of a stuck handler is ours, not the caller's.
            (ApiError::Timeout, 500, false),
        ];
        for (e, status, closes) in cases {
            let (s, code, _, _) = e.parts();
            let want = if status == 500 {
                "GeneralServerFailure"
            } else {
                "BadUserInput"
            };
            assert_eq!((s.as_u16(), code.as_str()), (status, want), "{e:?}");
            let response = e.into_response();
            let close = response
                .headers()
                .get(axum::http::header::CONNECTION)
                .is_some_and(|v| v == "close");
            assert_eq!(close, closes, "status {status}");
        }
    }

    #[test]
    fn hostile_site_names_are_bounded_in_the_envelope() {
        let env = ApiError::SiteNotFound("x".repeat(10_000)).envelope();
        assert!(env.msg.len() < 200);
        assert!(env.args[0].chars().count() <= 65);
    }
}
