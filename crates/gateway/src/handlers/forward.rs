//! Forwarding a caller's request to a peer with the session held there, and passing the
//! peer's answer back unchanged.

use std::future::Future;
use std::pin::Pin;

use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sitegate_model::{ErrorCode, ErrorEnvelope};

use super::AppState;
use crate::auth::{Caller, AUTH_HEADER};
use crate::error::ApiError;
use crate::extract::RequestMeta;
use crate::layers::OPERATION_ID_HEADER;
use crate::peer::{Forward, Peer, PeerClient, PeerResponse};
use crate::remote_reads::ReadKey;

/// The peer client; only present when peers are configured, and then every `Route::Peer`
/// came from it.
pub fn client(state: &AppState) -> Result<&PeerClient, ApiError> {
    state
        .resolver
        .peer_client()
        .map(|c| c.as_ref())
        .ok_or_else(|| ApiError::Internal("a peer route without a peer client".into()))
}

/// Headers every forwarded request carries: the operation ID and the caller's `Accept`.
pub fn forward_headers(meta: &RequestMeta, token: Option<&str>, json_body: bool) -> HeaderMap {
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
pub fn peer_error_code(response: &PeerResponse) -> Option<String> {
    serde_json::from_slice::<ErrorEnvelope>(&response.body)
        .ok()
        .map(|e| e.code)
}

/// Sends a read to `peer` as the caller's session held there and returns the peer's answer
/// as it came, except that the peer refusing that session becomes
/// `RemoteAuthenticationFailure` (the caller's own session is fine; the one held there is not).
///
/// Boxed because the peer call's future is large: inlined, every local read would carry it
/// too and pay for moving it (measured: about 5 % of a local Get One's CPU time).
pub fn forward_read<'a>(
    state: &'a AppState,
    caller: &'a Caller,
    peer: &'a Peer,
    method: Method,
    path_and_query: String,
    body: Option<Bytes>,
    meta: &'a RequestMeta,
) -> Pin<Box<dyn Future<Output = Result<Response, ApiError>> + Send + 'a>> {
    Box::pin(forward_read_unboxed(
        state,
        caller,
        peer,
        method,
        path_and_query,
        body,
        meta,
    ))
}

async fn forward_read_unboxed(
    state: &AppState,
    caller: &Caller,
    peer: &Peer,
    method: Method,
    path_and_query: String,
    body: Option<Bytes>,
    meta: &RequestMeta,
) -> Result<Response, ApiError> {
    let site = peer.name().as_str();
    let remote = caller.remote_session(site).ok_or_else(|| {
        ApiError::RemoteAuth(format!(
            "This session is not extended to site '{site}'. Extend it first: POST /sessions/extend."
        ))
    })?;
    let client = client(state)?;
    let shareable = method == Method::GET && path_and_query.starts_with("/tasks/");
    let request = Forward {
        method,
        path_and_query: path_and_query.clone(),
        headers: forward_headers(meta, Some(&remote.token), body.is_some()),
        body: body.unwrap_or_default(),
    };
    let response = if shareable {
        let key = ReadKey {
            peer: site.to_owned(),
            path: path_and_query,
            remote_user: remote.user.clone(),
        };
        client
            .reads
            .get_or_fetch(key, client.send(peer, request, meta.deadline))
            .await?
            .to_response()
    } else {
        client.send(peer, request, meta.deadline).await?
    };
    if response.status.as_u16() == 401
        && peer_error_code(&response).as_deref() == Some(ErrorCode::NotAuthenticated.as_str())
    {
        return Err(ApiError::RemoteAuth(format!(
            "Site '{site}' did not accept the session held there for this user (it may have \
             expired or been logged out). Extend the session again."
        )));
    }
    Ok(pass_back(response))
}

/// The peer's answer as our answer: status, content type and body unchanged.
pub fn pass_back(response: PeerResponse) -> Response {
    let mut out = (response.status, response.body).into_response();
    if let Some(ct) = response.headers.get(CONTENT_TYPE) {
        out.headers_mut().insert(CONTENT_TYPE, ct.clone());
    }
    out
}
