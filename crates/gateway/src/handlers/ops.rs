//! Operations endpoints: no session needed, meant for load balancers and orchestrators.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::error::ApiError;

/// Alive: the process answers HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: not draining and the store answers.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.readiness.is_draining() {
        return Err(ApiError::NotReady("draining for shutdown"));
    }
    if let Err(e) = state.store.ping().await {
        tracing::warn!(error = %e, "readiness check: store unreachable");
        return Err(ApiError::NotReady("store unreachable"));
    }
    Ok(Json(json!({"status": "ready"})))
}
