//! `/sites`: the local site and its peers, with link health.

use axum::extract::State;
use axum::Json;
use sitegate_model::site::SiteInfo;

use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::SitePath;

/// `GET /sites`: the local site and each peer.
#[utoipa::path(
    get,
    path = "/sites",
    operation_id = "listSites",
    tag = "sites",
    responses(
        (status = 200, description = "Every site: the local one (`isLocal`) and each peer, with link health.", body = Vec<SiteInfo>),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = sitegate_model::ErrorEnvelope),
    ),
    security(("session" = []))
)]
pub(crate) async fn list(State(state): State<AppState>, _caller: Caller) -> Json<Vec<SiteInfo>> {
    Json(state.federation.sites())
}

/// `GET /sites/{site}`: one of the sites `GET /sites` lists.
#[utoipa::path(
    get,
    path = "/sites/{site}",
    operation_id = "getSite",
    tag = "sites",
    params(("site" = String, Path, description = "The site's name.")),
    responses(
        (status = 200, description = "The site.", body = SiteInfo),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = sitegate_model::ErrorEnvelope),
        (status = 404, description = "SiteNotFound.", body = sitegate_model::ErrorEnvelope),
    ),
    security(("session" = []))
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    SitePath(site): SitePath,
) -> Result<Json<SiteInfo>, ApiError> {
    Ok(Json(state.federation.site(&site)?))
}
