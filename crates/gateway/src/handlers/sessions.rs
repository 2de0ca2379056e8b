//! `/sessions`: log in, see the session, log out.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sitegate_model::session::{AuthenticatedSite, LoginRequest, SessionDetails};

use super::AppState;
use crate::auth::{Caller, AUTH_HEADER};
use crate::error::ApiError;
use crate::extract::JsonBody;

fn details(state: &AppState, caller: &Caller) -> SessionDetails {
    SessionDetails {
        user: caller.user.clone(),
        roles: caller.roles.clone(),
        authenticated_sites: vec![AuthenticatedSite {
            site: state.resolver.local_name().to_string(),
        }],
    }
}

/// `POST /sessions`: the token travels back in the `X-VCAV-Auth` header.
pub async fn login(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Result<Response, ApiError> {
    let LoginRequest::LocalUser {
        local_user,
        local_password,
    } = body;
    let (token, caller) = state.sessions.login(&local_user, &local_password).await?;
    tracing::info!(user = %caller.user, "logged in");
    let mut response = Json(details(&state, &caller)).into_response();
    let value = HeaderValue::from_str(&token)
        .map_err(|_| ApiError::Internal("token is not a valid header value".into()))?;
    response.headers_mut().insert(AUTH_HEADER, value);
    Ok(response)
}

/// `GET /sessions`.
pub async fn get(State(state): State<AppState>, caller: Caller) -> Json<SessionDetails> {
    Json(details(&state, &caller))
}

/// `DELETE /sessions`: the token is dead at once, for every replica sharing the store.
pub async fn logout(State(state): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    state.sessions.logout(&caller).await?;
    tracing::info!(user = %caller.user, "logged out");
    Ok(StatusCode::NO_CONTENT)
}
