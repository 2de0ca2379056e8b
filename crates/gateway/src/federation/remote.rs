//! What handlers ask of a peer, typed: reads made as the caller's session held there, and
//! sessions at the peer. A [`PeerHandle`] is a peer together with the client that reaches
//! it, so a route to a peer can always be sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sitegate_model::query::TaskQuery;
use sitegate_model::session::{MultisiteSessionRequest, RemoteSession, SessionDetails};
use sitegate_model::site::SiteName;
use sitegate_model::task::{Task, TaskList};
use sitegate_model::watch::{GetOneQuery, Wait};
use sitegate_model::{ErrorCode, ErrorEnvelope};
use uuid::Uuid;

use super::cache::ReadKey;
use super::client::{Forward, Peer, PeerClient, PeerResponse};
use super::error::PeerError;
use crate::auth::{Caller, AUTH_HEADER};
use crate::error::ApiError;
use crate::extract::RequestMeta;
use crate::layers::OPERATION_ID_HEADER;

/// A peer and the client that reaches it.
#[derive(Clone)]
pub(crate) struct PeerHandle {
    peer: Arc<Peer>,
    client: Arc<PeerClient>,
}

impl std::fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PeerHandle").field(self.peer.name()).finish()
    }
}

/// A read of a peer's tasks, as typed as the handler had it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PeerRead<'a> {
    /// `GET /tasks/{id}`, a blocking read with `wait`.
    Task { id: Uuid, wait: Option<Wait> },
    /// `GET /tasks?...` (never `site=*`: the peer answers for itself).
    List(&'a TaskQuery),
    /// `POST /tasks/poll` with the validated, de-duplicated IDs.
    Poll(&'a [Uuid]),
}

impl PeerRead<'_> {
    /// The route template, which names the client span.
    fn route(&self) -> &'static str {
        match self {
            PeerRead::Task { .. } => "GET /tasks/{task_id}",
            PeerRead::List(_) => "GET /tasks",
            PeerRead::Poll(_) => "POST /tasks/poll",
        }
    }

    fn method(&self) -> Method {
        match self {
            PeerRead::Task { .. } | PeerRead::List(_) => Method::GET,
            PeerRead::Poll(_) => Method::POST,
        }
    }

    /// The path and query at the peer: the same read, without `site`.
    fn path_and_query(&self) -> String {
        match self {
            PeerRead::Task { id, wait } => {
                let query = GetOneQuery {
                    site: None,
                    wait: *wait,
                    ignored: Vec::new(),
                }
                .to_query_string_without_site();
                if query.is_empty() {
                    format!("/tasks/{id}")
                } else {
                    format!("/tasks/{id}?{query}")
                }
            }
            PeerRead::List(q) => format!("/tasks?{}", q.to_query_string_without_site()),
            PeerRead::Poll(_) => "/tasks/poll".to_owned(),
        }
    }

    fn body(&self) -> Result<Option<Bytes>, ApiError> {
        match self {
            PeerRead::Poll(ids) => serde_json::to_vec(ids)
                .map(|b| Some(b.into()))
                .map_err(|e| ApiError::Internal(format!("encoding poll IDs: {e}"))),
            PeerRead::Task { .. } | PeerRead::List(_) => Ok(None),
        }
    }

    /// How long the peer holds the read on purpose: a blocking read's wait.
    fn held(&self) -> Duration {
        match self {
            PeerRead::Task { wait: Some(w), .. } => w.timeout,
            _ => Duration::ZERO,
        }
    }

    /// Whether identical concurrent reads may share one answer (and a final task's answer be
    /// kept): a Get One. Lists and polls are answered per request.
    fn shareable(&self) -> bool {
        matches!(self, PeerRead::Task { .. })
    }
}

/// How to obtain a session at a peer.
pub(crate) enum SessionAsk {
    /// The user's credentials for the peer (`POST /sessions` there).
    Credentials { user: String, password: String },
    /// A session for the same user, vouched for by this site (`POST /peer/sessions` there).
    Multisite { user: String },
}

impl PeerHandle {
    pub(super) fn new(peer: Arc<Peer>, client: Arc<PeerClient>) -> Self {
        PeerHandle { peer, client }
    }

    pub(crate) fn name(&self) -> &SiteName {
        self.peer.name()
    }

    /// The `/sites` entry for this peer.
    pub(super) fn site_info(&self) -> sitegate_model::site::SiteInfo {
        let mut info = self.peer.site_info();
        if let Some(link) = info.link.as_mut() {
            link.trust_anchor = Some(self.client.trust_anchor(self.name()));
        }
        info
    }

    /// Whether this site lets the peer assert identities (`trust_multisite`), and whether
    /// such sessions keep the admin role (`trust_multisite_admin`).
    pub(crate) fn trust(&self) -> (bool, bool) {
        (
            self.peer.config.trust_multisite,
            self.peer.config.trust_multisite_admin,
        )
    }

    /// Sends `read` as the caller's session held at this peer and returns the peer's answer
    /// as it came, except that the peer refusing that session becomes
    /// `RemoteAuthenticationFailure` (the caller's own session is fine; the one held there
    /// is not).
    ///
    /// Boxed because the peer call's future is large: inlined, every local read would carry it
    /// too and pay for moving it (measured: about 5 % of a local Get One's CPU time).
    pub(crate) fn read<'a>(
        &'a self,
        caller: &'a Caller,
        read: PeerRead<'a>,
        meta: &'a RequestMeta,
    ) -> Pin<Box<dyn Future<Output = Result<Response, ApiError>> + Send + 'a>> {
        Box::pin(async move { self.read_unboxed(caller, read, meta).await.map(pass_back) })
    }

    async fn read_unboxed(
        &self,
        caller: &Caller,
        read: PeerRead<'_>,
        meta: &RequestMeta,
    ) -> Result<PeerResponse, ApiError> {
        let site = self.peer.name().as_str();
        let remote = caller.remote_session(site).ok_or_else(|| {
            ApiError::RemoteAuth(format!(
                "This session is not extended to site '{site}'. Extend it first: POST /sessions/extend."
            ))
        })?;
        let body = read.body()?;
        let path_and_query = read.path_and_query();
        let request = Forward {
            route: read.route(),
            method: read.method(),
            path_and_query: path_and_query.clone(),
            headers: forward_headers(meta, Some(&remote.token), body.is_some()),
            body: body.unwrap_or_default(),
            held: read.held(),
        };
        let response = if read.shareable() {
            let key = ReadKey {
                peer: site.to_owned(),
                path: path_and_query,
                remote_user: remote.user.clone(),
            };
            self.client
                .reads
                .get_or_fetch(key, || self.client.send(&self.peer, request, meta.deadline))
                .await?
                .to_response()
        } else {
            // Boxed: most reads take the shared path, and would otherwise reserve room for
            // this one too.
            Box::pin(self.client.send(&self.peer, request, meta.deadline)).await?
        };
        if response.status.as_u16() == 401
            && peer_error_code(&response).as_deref() == Some(ErrorCode::NotAuthenticated.as_str())
        {
            return Err(ApiError::RemoteAuth(format!(
                "Site '{site}' did not accept the session held there for this user (it may have \
                 expired or been logged out). Extend the session again."
            )));
        }
        Ok(response)
    }

    /// A task read for an event stream: the task, or the peer's refusal as its answer, to be
    /// passed on unchanged.
    pub(crate) async fn task(
        &self,
        caller: &Caller,
        id: Uuid,
        wait: Option<Wait>,
        meta: &RequestMeta,
    ) -> Result<Result<Task, Response>, ApiError> {
        let response =
            Box::pin(self.read_unboxed(caller, PeerRead::Task { id, wait }, meta)).await?;
        if !response.status.is_success() {
            return Ok(Err(pass_back(response)));
        }
        serde_json::from_slice(&response.body)
            .map(Ok)
            .map_err(|e| ApiError::Internal(format!("a peer's task did not parse: {e}")))
    }

    /// This peer's page for `site=*`, or the envelope of why not (the peer's own, passed on).
    pub(crate) async fn list(
        &self,
        caller: &Caller,
        query: &TaskQuery,
        meta: &RequestMeta,
    ) -> Result<TaskList, ErrorEnvelope> {
        let response = Box::pin(self.read_unboxed(caller, PeerRead::List(query), meta))
            .await
            .map_err(|e| e.envelope())?;
        let status = response.status;
        if status.is_success() {
            serde_json::from_slice(&response.body).map_err(|e| {
                ApiError::Internal(format!("a peer's task list did not parse: {e}")).envelope()
            })
        } else {
            Err(serde_json::from_slice(&response.body).unwrap_or_else(|_| {
                ApiError::Internal(format!("a peer answered {status} without an envelope"))
                    .envelope()
            }))
        }
    }

    /// Obtains a session at this peer. `refused` ends the message a refusal gets ("Site
    /// 'site2' refused the credentials.").
    pub(crate) async fn obtain_session(
        &self,
        ask: SessionAsk,
        meta: &RequestMeta,
    ) -> Result<RemoteSession, ApiError> {
        let site = self.peer.name().to_string();
        let (route, path, payload, refused) = match ask {
            SessionAsk::Credentials { user, password } => (
                "POST /sessions",
                "/sessions",
                serde_json::json!({"type": "localUser", "localUser": user, "localPassword": password}),
                "refused the credentials",
            ),
            SessionAsk::Multisite { user } => (
                "POST /peer/sessions",
                "/peer/sessions",
                serde_json::to_value(MultisiteSessionRequest { user })
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
                "does not grant multisite sessions to this site for this user",
            ),
        };
        let body = serde_json::to_vec(&payload).map_err(|e| ApiError::Internal(e.to_string()))?;
        let request = Forward {
            route,
            method: Method::POST,
            path_and_query: path.to_owned(),
            headers: forward_headers(meta, None, true),
            body: body.into(),
            held: Duration::ZERO,
        };
        let response = self.client.send(&self.peer, request, meta.deadline).await?;
        match response.status.as_u16() {
            200 => {}
            // The peer throttles failed logins: its refusal is passed on as a 429 with its
            // time to wait, not turned into a wrong-password answer (which invites another
            // guess).
            429 => {
                let secs = response
                    .headers
                    .get(axum::http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(30);
                tracing::info!(peer = %site, "peer refused a session: too many failed logins");
                return Err(ApiError::TooManyAttempts {
                    retry_after: Duration::from_secs(secs),
                });
            }
            401 | 403 => {
                tracing::info!(peer = %site, code = ?peer_error_code(&response), "peer refused a session");
                return Err(ApiError::RemoteAuth(format!("Site '{site}' {refused}.")));
            }
            status => {
                return Err(ApiError::Peer(PeerError::BadAnswer {
                    site,
                    detail: format!("unexpected status {status} to {path}"),
                }))
            }
        }
        let token = response
            .headers
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let details: Option<SessionDetails> = serde_json::from_slice(&response.body).ok();
        match (token, details) {
            (Some(token), Some(details)) => Ok(RemoteSession {
                site,
                // The peer's own entry comes first in its details.
                org: details
                    .authenticated_sites
                    .first()
                    .map(|s| s.org.clone())
                    .filter(|o| !o.is_empty()),
                user: details.user,
                token,
            }),
            _ => Err(ApiError::Peer(PeerError::BadAnswer {
                site,
                detail: "a session answer without a token or details".into(),
            })),
        }
    }

    /// Ends a session held at this peer, in the background: a local logout never waits for a
    /// peer.
    pub(crate) fn end_session(&self, remote: RemoteSession, meta: &RequestMeta) {
        let handle = self.clone();
        let headers = forward_headers(meta, Some(&remote.token), false);
        tokio::spawn(async move {
            let request = Forward {
                route: "DELETE /sessions",
                method: Method::DELETE,
                path_and_query: "/sessions".into(),
                headers,
                body: Bytes::new(),
                held: Duration::ZERO,
            };
            if let Err(e) = handle.client.send(&handle.peer, request, None).await {
                tracing::info!(peer = %handle.name(), error = %e, "could not log out the session held at a peer");
            }
        });
    }
}

/// Headers every forwarded request carries: the operation ID and the caller's `Accept`.
fn forward_headers(meta: &RequestMeta, token: Option<&str>, json_body: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(op) = &meta.operation_id {
        if let Ok(v) = HeaderValue::from_str(op.as_str()) {
            headers.insert(OPERATION_ID_HEADER, v);
        }
    }
    if let Some(accept) = &meta.accept {
        headers.insert(ACCEPT, accept.clone());
    }
    if let Some(token) = token.and_then(|t| HeaderValue::from_str(t).ok()) {
        headers.insert(AUTH_HEADER, token);
    }
    if json_body {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    headers
}

/// The error code in a peer's error envelope, if its body is one.
fn peer_error_code(response: &PeerResponse) -> Option<String> {
    serde_json::from_slice::<ErrorEnvelope>(&response.body)
        .ok()
        .map(|e| e.code)
}

/// The peer's answer as our answer: status, content type and body unchanged.
fn pass_back(response: PeerResponse) -> Response {
    let mut out = (response.status, response.body).into_response();
    if let Some(ct) = response.headers.get(CONTENT_TYPE) {
        out.headers_mut().insert(CONTENT_TYPE, ct.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_carry_their_path_method_wait_and_sharing() {
        let id = Uuid::from_u128(42);
        let plain = PeerRead::Task { id, wait: None };
        assert_eq!(plain.method(), Method::GET);
        assert_eq!(
            plain.path_and_query(),
            "/tasks/00000000-0000-0000-0000-00000000002a"
        );
        assert_eq!(plain.held(), Duration::ZERO);
        assert!(plain.shareable());

        let wait = Wait {
            last_updated: 1234,
            timeout: Duration::from_secs(20),
        };
        let blocking = PeerRead::Task {
            id,
            wait: Some(wait),
        };
        let path = blocking.path_and_query();
        assert!(path.contains("waitForChange=true"), "{path}");
        assert!(path.contains("lastUpdated=1234"), "{path}");
        assert!(!path.contains("site="), "{path}");
        assert_eq!(blocking.held(), Duration::from_secs(20));

        let q = TaskQuery::parse(Some("site=site2&state=RUNNING&limit=5")).unwrap();
        let list = PeerRead::List(&q);
        let path = list.path_and_query();
        assert!(
            path.starts_with("/tasks?") && path.contains("limit=5"),
            "{path}"
        );
        assert!(
            !path.contains("site="),
            "the peer answers for itself: {path}"
        );
        assert!(!list.shareable());
        assert_eq!(list.held(), Duration::ZERO);

        let ids = [id, Uuid::from_u128(7)];
        let poll = PeerRead::Poll(&ids);
        assert_eq!(poll.method(), Method::POST);
        assert_eq!(poll.path_and_query(), "/tasks/poll");
        let body = poll.body().ok().flatten().unwrap_or_default();
        let sent: Vec<Uuid> = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(sent, ids);
        assert!(!poll.shareable());
    }

    #[test]
    fn a_peers_answer_is_passed_back_unchanged() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.vmware.h4-v4+json;charset=UTF-8"),
        );
        let out = pass_back(PeerResponse {
            status: axum::http::StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(b"{\"code\":\"TaskNotFound\"}"),
        });
        assert_eq!(out.status(), 404);
        assert_eq!(
            out.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/vnd.vmware.h4-v4+json;charset=UTF-8"[..])
        );
    }
}
