//! `/sessions`: log in, see the session, log out, and extend it to peers.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use sitegate_model::session::{
    AuthenticatedSite, ExtendRequest, LoginRequest, MultisiteSessionRequest, RemoteSession,
    SessionDetails,
};

use super::AppState;
use crate::auth::{Caller, AUTH_HEADER};
use crate::error::ApiError;
use crate::extract::{JsonBody, Origin, RequestMeta, SitePath};
use crate::federation::{Route, SessionAsk};
use crate::layers::ClientAddr;
use crate::throttle::AddressKey;

fn details(state: &AppState, caller: &Caller) -> SessionDetails {
    let org = state.sessions.org_of(&caller.user);
    let mut sites = vec![AuthenticatedSite {
        site: state.federation.local_name().to_string(),
        org: org.clone(),
    }];
    sites.extend(caller.extensions.iter().map(|e| AuthenticatedSite {
        site: e.site.clone(),
        org: e.org.clone().unwrap_or_else(|| org.clone()),
    }));
    SessionDetails {
        user: caller.user.clone(),
        roles: caller.roles.clone(),
        authenticated_sites: sites,
    }
}

/// Session details with the token in the `X-VCAV-Auth` header.
fn issued(state: &AppState, token: &str, caller: &Caller) -> Result<Response, ApiError> {
    let mut response = Json(details(state, caller)).into_response();
    let value = HeaderValue::from_str(token)
        .map_err(|_| ApiError::Internal("token is not a valid header value".into()))?;
    response.headers_mut().insert(AUTH_HEADER, value);
    Ok(response)
}

#[utoipa::path(
    post,
    path = "/sessions",
    operation_id = "login",
    tag = "sessions",
    request_body(content = LoginRequest, description = "A local user's credentials."),
    responses(
        (status = 200, description = "Logged in: the session's details; the token is in the `X-VCAV-Auth` header.", body = SessionDetails,
            headers(("X-VCAV-Auth" = String, description = "The session token, for the `X-VCAV-Auth` header of later requests."))),
        (status = 400, description = "BadUserInput: a malformed body.", body = sitegate_model::ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: wrong user name or password.", body = sitegate_model::ErrorEnvelope),
        (status = 413, description = "BadUserInput: the body is larger than the site allows.", body = sitegate_model::ErrorEnvelope),
        (status = 429, description = "NotAuthenticated: too many failed logins for this user name or from this address; `Retry-After` says when to try again.", body = sitegate_model::ErrorEnvelope),
    )
)]
/// `POST /sessions`: the token travels back in the `X-VCAV-Auth` header.
///
/// Failed logins are throttled per user name and per client address. A login arriving over
/// the peer link (a credentials extension) carries the peer site's address, which all of that
/// site's users share, so only its user name counts.
pub(crate) async fn login(
    State(state): State<AppState>,
    Origin(origin): Origin,
    client: Option<Extension<ClientAddr>>,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Response, ApiError> {
    let LoginRequest::LocalUser {
        local_user,
        local_password,
    } = body;
    // Where the attempt counts: the client's address, or for a login over the peer link
    // (a credentials extension) the calling site, so guesses relayed by a site are limited
    // like guesses from one address.
    let address = match (&origin, client) {
        (Some(site), _) => Some(AddressKey::Site(site.to_string())),
        (None, Some(Extension(ClientAddr(addr)))) => Some(AddressKey::from(addr.ip())),
        _ => None,
    };
    let (token, caller) = state
        .sessions
        .login(&local_user, &local_password, address)
        .await?;
    tracing::info!(user = %caller.user, "logged in");
    issued(&state, &token, &caller)
}

#[utoipa::path(
    get,
    path = "/sessions",
    operation_id = "getSession",
    tag = "sessions",
    responses(
        (status = 200, description = "The session's details.", body = SessionDetails),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = sitegate_model::ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `GET /sessions`.
pub(crate) async fn get(State(state): State<AppState>, caller: Caller) -> Json<SessionDetails> {
    Json(details(&state, &caller))
}

#[utoipa::path(
    delete,
    path = "/sessions",
    operation_id = "logout",
    tag = "sessions",
    responses(
        (status = 204, description = "Logged out: the token is dead on every replica; sessions held at peers are ended in the background."),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = sitegate_model::ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `DELETE /sessions`: the token is dead at once, for every replica sharing the store; the
/// sessions held at peers are logged out there too, as far as they can be reached.
pub(crate) async fn logout(
    State(state): State<AppState>,
    caller: Caller,
    meta: RequestMeta,
) -> Result<StatusCode, ApiError> {
    state.sessions.logout(&caller).await?;
    tracing::info!(user = %caller.user, "logged out");
    for remote in caller.extensions.clone() {
        logout_at_peer(&state, remote, &meta);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Ends a session held at a peer, in the background: the local logout never waits for a peer.
fn logout_at_peer(state: &AppState, remote: RemoteSession, meta: &RequestMeta) {
    if let Some(peer) = state.federation.peer(&remote.site) {
        let meta = RequestMeta {
            deadline: None,
            ..meta.clone()
        };
        peer.end_session(remote, &meta);
    }
}

#[utoipa::path(
    post,
    path = "/sessions/extend",
    operation_id = "extendSession",
    tag = "sessions",
    request_body(content = ExtendRequest, description = "The peer, and how to obtain a session there."),
    responses(
        (status = 200, description = "The session's details, now naming the peer.", body = SessionDetails),
        (status = 400, description = "BadUserInput: a malformed body, or `site` is the local site.", body = sitegate_model::ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token; or RemoteAuthenticationFailure: the peer refused the credentials or the multisite session, or the peer link's TLS authentication failed.", body = sitegate_model::ErrorEnvelope),
        (status = 404, description = "SiteNotFound: `site` is not a configured peer.", body = sitegate_model::ErrorEnvelope),
        (status = 413, description = "BadUserInput: the body is larger than the site allows.", body = sitegate_model::ErrorEnvelope),
        (status = 502, description = "RemoteSiteUnavailable: the peer could not be reached, or its link is marked down.", body = sitegate_model::ErrorEnvelope),
        (status = 504, description = "RemoteSiteTimeout: the peer did not answer in time.", body = sitegate_model::ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `POST /sessions/extend`: obtains a session at a peer and keeps it in this session.
pub(crate) async fn extend(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    JsonBody(body): JsonBody<ExtendRequest>,
) -> Result<Response, ApiError> {
    let (site, ask, org) = match &body {
        ExtendRequest::Credentials {
            site,
            vcd_username,
            vcd_password,
        } => (
            site,
            SessionAsk::Credentials {
                user: vcd_username.clone(),
                password: vcd_password.clone(),
            },
            None,
        ),
        ExtendRequest::Multisite { site, org } => (
            site,
            SessionAsk::Multisite {
                user: caller.user.clone(),
            },
            org.clone(),
        ),
        ExtendRequest::Cookie(_) | ExtendRequest::VcdAccessToken(_) => {
            return Err(ApiError::BadInput(
                "This site cannot extend a session with a vCloud Director cookie or access \
                 token; use {\"type\":\"credentials\",\"site\",\"vcdUsername\",\"vcdPassword\"} \
                 or {\"type\":\"multisite\",\"site\"}."
                    .into(),
            ))
        }
    };
    let peer = match state.federation.resolve(Some(site), origin.as_ref())? {
        Route::Peer(peer) => peer,
        Route::Local => {
            return Err(ApiError::BadInput(
                "The session is already valid at the local site; extend it to a peer.".into(),
            ))
        }
    };
    let target = state.federation.target(&Route::Peer(peer.clone()));
    let answer = extend_to(&state, caller, &peer, &body, ask, org, &meta).await;
    Ok(target.answer(answer))
}

/// `extend`, once the peer is known.
async fn extend_to(
    state: &AppState,
    mut caller: Caller,
    peer: &crate::federation::PeerHandle,
    body: &ExtendRequest,
    ask: SessionAsk,
    org: Option<String>,
    meta: &RequestMeta,
) -> Result<Json<SessionDetails>, ApiError> {
    // Guessing passwords through this site meets a throttle here (per user and peer), as
    // well as the peer's own (which counts this site as the address).
    let guessing = matches!(body, ExtendRequest::Credentials { .. });
    if guessing {
        state
            .sessions
            .check_extension(&caller.user, peer.name().as_str())?;
    }
    let obtained = peer.obtain_session(ask, meta).await;
    if guessing {
        match &obtained {
            Ok(_) => state
                .sessions
                .extension_succeeded(&caller.user, peer.name().as_str()),
            Err(ApiError::RemoteAuth(_)) => state
                .sessions
                .extension_failed(&caller.user, peer.name().as_str())?,
            Err(_) => {}
        }
    }
    let mut remote = obtained?;
    if org.is_some() {
        remote.org = org;
    }
    // The session this one held there before is ended there, not left to idle out.
    let replaced = caller.remote_session(peer.name().as_str()).cloned();
    tracing::info!(user = %caller.user, peer = %peer.name(), remote_user = %remote.user, "session extended");
    state.sessions.add_extension(&mut caller, remote).await?;
    if let Some(old) = replaced {
        logout_at_peer(state, old, meta);
    }
    Ok(Json(details(state, &caller)))
}

#[utoipa::path(
    delete,
    path = "/sessions/{site}",
    operation_id = "dropSessionExtension",
    tag = "sessions",
    params(("site" = String, Path, description = "The peer whose session to drop.")),
    responses(
        (status = 200, description = "The session's details without the peer (unchanged if it was not extended there).", body = SessionDetails),
        (status = 400, description = "BadUserInput: `site` is the local site (log out instead).", body = sitegate_model::ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = sitegate_model::ErrorEnvelope),
        (status = 404, description = "SiteNotFound: `site` is not a configured peer.", body = sitegate_model::ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `DELETE /sessions/{site}`: drops the session held at that peer (and ends it there).
pub(crate) async fn drop_extension(
    State(state): State<AppState>,
    mut caller: Caller,
    meta: RequestMeta,
    SitePath(site): SitePath,
) -> Result<Json<SessionDetails>, ApiError> {
    if site == state.federation.local_name().as_str() {
        return Err(ApiError::BadInput(
            "The local site cannot be dropped; log out with DELETE /sessions.".into(),
        ));
    }
    // Unknown sites are SiteNotFound, as everywhere; a known one not extended to is a no-op.
    state.federation.resolve(Some(&site), None)?;
    if let Some(remote) = state.sessions.remove_extension(&mut caller, &site).await? {
        logout_at_peer(&state, remote, &meta);
    }
    Ok(Json(details(&state, &caller)))
}

/// `POST /peer/sessions`, on the peer link only: a peer asks for a session for one of this
/// site's users, vouching for the user's identity. Granted only to peers configured with
/// `trust_multisite`.
pub(crate) async fn issue_for_peer(
    State(state): State<AppState>,
    Origin(origin): Origin,
    JsonBody(body): JsonBody<MultisiteSessionRequest>,
) -> Result<Response, ApiError> {
    // Routed on the peer link only, where every request has an origin; checked again so a
    // routing mistake could not turn it into a client API.
    let Some(from) = origin else {
        return Err(ApiError::NoRoute);
    };
    // A plain lookup of the calling peer: the request is answered here, for it.
    let (trusted, admin_trusted) = state
        .federation
        .peer(from.as_str())
        .map_or((false, false), |peer| peer.trust());
    if !trusted {
        tracing::warn!(peer = %from, user = %body.user, "refused a multisite session: peer not trusted");
        return Err(ApiError::Forbidden(
            "This site does not trust the calling site to assert identities.",
        ));
    }
    let (token, caller) = state
        .sessions
        .issue_for_trusted_peer(&body.user, &from, admin_trusted)
        .await?;
    tracing::info!(peer = %from, user = %caller.user, "issued a multisite session");
    issued(&state, &token, &caller)
}
