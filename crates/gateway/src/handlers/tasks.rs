//! `/tasks`: reads for every user (their own tasks; admins all), writes for the site's own
//! services (`writer` or `admin`).

use axum::extract::{RawQuery, State};
use axum::http::{header::LOCATION, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sitegate_model::query::{parse_site_only, TaskQuery};
use sitegate_model::task::{parse_poll_ids, NewTask, PollResponse, Task, TaskList, TaskPatch};

use super::forward::forward_read;
use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{JsonBody, Origin, RequestMeta, TaskIdPath};
use crate::sites::Route;

/// `GET /tasks/{taskId}`. Another user's task is reported exactly like a missing one.
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    TaskIdPath(id): TaskIdPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let site = parse_site_only(query.as_deref())?;
    match state.resolver.resolve(site.as_deref(), origin.as_ref())? {
        Route::Local => {
            let task = state
                .store
                .get_task(id)
                .await?
                .filter(|t| caller.visibility().is_none_or(|owner| owner == t.user))
                .ok_or(ApiError::TaskNotFound(id))?;
            Ok(Json(task).into_response())
        }
        Route::Peer(peer) => {
            let path = format!("/tasks/{id}");
            forward_read(&state, &caller, &peer, Method::GET, path, None, &meta).await
        }
    }
}

/// `GET /tasks`: filters, sort and paging run in the store.
pub async fn query(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let q = TaskQuery::parse(query.as_deref())?;
    if q.user.is_some() && !caller.is_admin() {
        return Err(ApiError::Forbidden(
            "Only administrators may filter tasks by user.",
        ));
    }
    match state.resolver.resolve(q.site.as_deref(), origin.as_ref())? {
        Route::Local => {
            let page = state.store.query_tasks(&q, caller.visibility()).await?;
            Ok(Json(TaskList {
                items: page.items,
                total: page.total,
            })
            .into_response())
        }
        Route::Peer(peer) => {
            let path = format!("/tasks?{}", q.to_query_string_without_site());
            forward_read(&state, &caller, &peer, Method::GET, path, None, &meta).await
        }
    }
}

/// `POST /tasks/poll`: one row per visible task, in the order asked.
pub async fn poll(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    RawQuery(query): RawQuery,
    JsonBody(ids): JsonBody<Vec<String>>,
) -> Result<Response, ApiError> {
    let site = parse_site_only(query.as_deref())?;
    let ids = parse_poll_ids(&ids)?;
    match state.resolver.resolve(site.as_deref(), origin.as_ref())? {
        Route::Local => {
            let tasks = state.store.get_tasks(&ids, caller.visibility()).await?;
            Ok(Json(PollResponse::from_tasks(&tasks)).into_response())
        }
        Route::Peer(peer) => {
            // Forward the validated, de-duplicated IDs, not the caller's raw body.
            let body = serde_json::to_vec(&ids)
                .map_err(|e| ApiError::Internal(format!("encoding poll IDs: {e}")))?;
            let path = "/tasks/poll".to_owned();
            forward_read(
                &state,
                &caller,
                &peer,
                Method::POST,
                path,
                Some(body.into()),
                &meta,
            )
            .await
        }
    }
}

fn require_writer(caller: &Caller) -> Result<(), ApiError> {
    if caller.can_write_tasks() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "Only the site's services (role writer) and administrators may write tasks.",
        ))
    }
}

/// Tasks are written only where they run, by that site's own services: a write naming
/// another site is refused, never forwarded.
fn require_local(state: &AppState, query: Option<&str>) -> Result<(), ApiError> {
    let site = parse_site_only(query)?;
    match state.resolver.resolve(site.as_deref(), None)? {
        Route::Local => Ok(()),
        Route::Peer(peer) => Err(ApiError::BadInput(format!(
            "Tasks are written only at the site they run on; write to site '{}' there.",
            peer.name()
        ))),
    }
}

/// `POST /tasks`: 201 with `Location`; repeating a create with the same ID and body is
/// idempotent.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
    JsonBody(new): JsonBody<NewTask>,
) -> Result<Response, ApiError> {
    require_writer(&caller)?;
    require_local(&state, query.as_deref())?;
    new.validate()?;
    let outcome = state
        .store
        .create_task(new, state.resolver.local_name().as_str())
        .await?;
    let task = outcome.task();
    let location = HeaderValue::from_str(&format!("/tasks/{}", task.id))
        .map_err(|_| ApiError::Internal("location header".into()))?;
    let mut response = (StatusCode::CREATED, Json(task)).into_response();
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

/// `PATCH /tasks/{taskId}`: progress, warnings, or the final state; never after the final state.
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    TaskIdPath(id): TaskIdPath,
    RawQuery(query): RawQuery,
    JsonBody(patch): JsonBody<TaskPatch>,
) -> Result<Json<Task>, ApiError> {
    require_writer(&caller)?;
    require_local(&state, query.as_deref())?;
    let patch = patch.validate()?;
    Ok(Json(state.store.update_task(id, patch).await?))
}
