//! `/diagnostics`: what this site is (`about`) and how it is (`health`), in the original
//! API's shapes. Clients of the original call `about` right after logging in to check the
//! connection, and monitoring checks read `health`'s error fields (`null` when healthy).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use sitegate_model::diagnostics::{AboutInfo, HealthInfo, PeerHealth, PRODUCT_NAME, SERVICE_TYPE};
use sitegate_model::task::{NewTask, TaskPatch, TaskState, WorkflowInfo};
use sitegate_model::{ErrorCode, ErrorEnvelope};

use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// What `about` and `health` say of the build and the process, fixed at start.
#[derive(Clone, Debug)]
pub(crate) struct BuildFacts {
    /// The store's instance ID: the site's, the same on every replica and across restarts.
    pub(crate) instance_id: uuid::Uuid,
    /// This process's: new on every start.
    pub(crate) runtime_id: uuid::Uuid,
    pub(crate) boot_time: i64,
    /// The client API's address as bound.
    pub(crate) address: String,
}

impl BuildFacts {
    pub(crate) fn new(instance_id: uuid::Uuid, address: String) -> Self {
        BuildFacts {
            instance_id,
            runtime_id: uuid::Uuid::new_v4(),
            boot_time: sitegate_store::now_millis(),
            address,
        }
    }
}

/// `<version>-<commit>`, as the original's `4.5.0.5431581-59ae61a850` pairs a version and a
/// build.
fn build_version() -> String {
    format!(
        "{}-{}",
        env!("CARGO_PKG_VERSION"),
        env!("SITEGATE_BUILD_COMMIT")
    )
}

fn build_date() -> i64 {
    env!("SITEGATE_BUILD_DATE").parse().unwrap_or(0)
}

/// A certificate this close to its end is reported in `certificateError`.
const CERTIFICATE_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

#[utoipa::path(
    get,
    path = "/diagnostics/about",
    operation_id = "about",
    tag = "diagnostics",
    responses(
        (status = 200, description = "The product, its build and this site's instance ID.", body = AboutInfo),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `GET /diagnostics/about`.
pub(crate) async fn about(State(state): State<AppState>, _caller: Caller) -> Json<AboutInfo> {
    Json(AboutInfo {
        product_name: PRODUCT_NAME.to_owned(),
        build_version: build_version(),
        build_date: build_date(),
        instance_id: state.build.instance_id,
        service_type: SERVICE_TYPE.to_owned(),
    })
}

/// The site's health now: the store answers, each peer link, the certificate's expiry.
async fn health_now(state: &AppState) -> HealthInfo {
    let now = sitegate_store::now_millis();
    let db_error = match state.store.ping().await {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(error = %e, "health: store unreachable");
            Some(ErrorEnvelope::new(
                ErrorCode::GeneralServerFailure,
                "The site's task store does not answer.",
                vec![],
            ))
        }
    };
    let sites = state.federation.sites();
    let mut peers = Vec::new();
    let mut certificate_expiry = None;
    let mut reload_error = None;
    for site in sites {
        if site.is_local {
            certificate_expiry = site.certificate_expiry;
            reload_error = site.certificate_error;
            continue;
        }
        peers.push(PeerHealth {
            error: site
                .state
                .outgoing_comm_error
                .or(site.state.incoming_comm_error),
            site: site.site,
        });
    }
    let failing: Vec<String> = peers
        .iter()
        .filter(|p| p.error.is_some())
        .map(|p| p.site.clone())
        .collect();
    let peers_error = (!failing.is_empty()).then(|| {
        ErrorEnvelope::new(
            ErrorCode::RemoteSiteUnavailable,
            format!("The link to {} is failing.", failing.join(", ")),
            failing,
        )
    });
    let warn_after = now + CERTIFICATE_WARNING.as_millis() as i64;
    let certificate_error = reload_error.or_else(|| {
        certificate_expiry
            .filter(|expiry| *expiry < warn_after)
            .map(|expiry| {
                let msg = if expiry <= now {
                    "This site's peer-link certificate has expired."
                } else {
                    "This site's peer-link certificate expires within 14 days."
                };
                ErrorEnvelope::new(
                    ErrorCode::GeneralServerFailure,
                    msg,
                    vec![expiry.to_string()],
                )
            })
    });
    HealthInfo {
        product_name: PRODUCT_NAME.to_owned(),
        build_version: build_version(),
        build_date: build_date(),
        instance_id: state.build.instance_id,
        runtime_id: state.build.runtime_id,
        current_time: now,
        address: state.build.address.clone(),
        service_boot_timestamp: state.build.boot_time,
        db_error,
        peers_error,
        certificate_error,
        certificate_expiry,
        peers,
    }
}

#[utoipa::path(
    get,
    path = "/diagnostics/health",
    operation_id = "health",
    tag = "diagnostics",
    responses(
        (status = 200, description = "The site's health; every `*Error` field is `null` when healthy.", body = HealthInfo),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `GET /diagnostics/health`: the health object itself, as the original's 3.x answers it
/// (what monitoring checks read).
pub(crate) async fn health(State(state): State<AppState>, _caller: Caller) -> Json<HealthInfo> {
    Json(health_now(&state).await)
}

#[utoipa::path(
    post,
    path = "/diagnostics/health",
    operation_id = "healthTask",
    tag = "diagnostics",
    responses(
        (status = 202, description = "A task of the caller's, already SUCCEEDED, whose `result` is the health object (`resultType` `HealthInfo`), as the original's 4.x answers.", body = sitegate_model::task::Task),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `POST /diagnostics/health`: the original's 4.x form, a task to poll. The check takes
/// milliseconds, so the task is final before it is answered; polling it works as clients
/// expect.
pub(crate) async fn health_task(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let health = health_now(&state).await;
    let result: Value =
        serde_json::to_value(&health).map_err(|e| ApiError::Internal(e.to_string()))?;
    let new = NewTask {
        id: None,
        user: caller.user.clone(),
        workflow_info: WorkflowInfo {
            workflow_type: "health".into(),
            resource_type: Some(SERVICE_TYPE.into()),
            resource_id: None,
            resource_name: None,
        },
        source_org: None,
        destination_org: None,
    };
    let site = state.federation.local_name().to_string();
    let created = state.store.create_task(new, &site).await?;
    let done = TaskPatch {
        progress: Some(100),
        state: Some(TaskState::Succeeded),
        result_type: Some("HealthInfo".into()),
        result: Some(result),
        ..TaskPatch::default()
    }
    .validate()?;
    let task = state.store.update_task(created.task().id, done).await?;
    state.watch.changed(task.id);
    Ok((StatusCode::ACCEPTED, Json(task)).into_response())
}
