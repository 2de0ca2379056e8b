//! `/sites`: the local site and its peers, with link health.

use axum::extract::State;
use axum::Json;
use sitegate_model::site::SiteInfo;

use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::SitePath;

pub async fn list(State(state): State<AppState>, _caller: Caller) -> Json<Vec<SiteInfo>> {
    Json(state.resolver.sites())
}

pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    SitePath(site): SitePath,
) -> Result<Json<SiteInfo>, ApiError> {
    Ok(Json(state.resolver.site(&site)?))
}
