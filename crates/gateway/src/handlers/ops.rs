//! Operations endpoints: no session needed, meant for load balancers and orchestrators.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::error::ApiError;

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "Alive: `{\"status\":\"ok\"}`.", body = crate::openapi::ProbeStatus))
)]
/// Alive: the process answers HTTP.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Metrics in the Prometheus text format (version 0.0.4).", body = String, content_type = "text/plain"))
)]
/// Prometheus text format. Session count is read at scrape time, so it is right on every
/// replica sharing the store.
pub(crate) async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match state.store.count_sessions().await {
        Ok(n) => metrics::gauge!("sitegate_sessions_active").set(n as f64),
        Err(e) => tracing::warn!(error = %e, "metrics: could not count sessions"),
    }
    let body = crate::telemetry::metrics()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: `{\"status\":\"ready\"}`.", body = crate::openapi::ProbeStatus),
        (status = 503, description = "GeneralServerFailure: draining for shutdown, or the store is unreachable.", body = sitegate_model::ErrorEnvelope),
    )
)]
/// Ready: not draining and the store answers.
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.readiness.is_draining() {
        return Err(ApiError::NotReady("draining for shutdown"));
    }
    if let Err(e) = state.store.ping().await {
        tracing::warn!(error = %e, "readiness check: store unreachable");
        return Err(ApiError::NotReady("store unreachable"));
    }
    Ok(Json(json!({"status": "ready"})))
}
