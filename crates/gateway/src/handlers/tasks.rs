//! `/tasks`: reads for every user (their own tasks; admins all), writes for the site's own
//! services (`writer` or `admin`).

use axum::extract::{RawQuery, State};
use axum::http::{header::LOCATION, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sitegate_model::fanout::{self, per_site_query, FanOutList, SiteError};
use sitegate_model::query::{parse_site_only, TaskQuery};
use sitegate_model::task::{
    parse_poll_ids, NewTask, PollResponse, Task, TaskList, TaskPatch, TaskState,
};
use sitegate_model::watch::{GetOneQuery, Wait, DEFAULT_WAIT};
use sitegate_model::ErrorEnvelope;
use uuid::Uuid;

use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{JsonBody, Origin, RequestMeta, TaskIdPath};
use crate::federation::{ListRoute, PeerHandle, PeerRead, Route};

#[utoipa::path(
    get,
    path = "/tasks/{task_id}",
    operation_id = "getTask",
    tag = "tasks",
    params(
        ("task_id" = Uuid, Path, description = "The task's ID, a UUID in its hyphenated form."),
        ("site" = Option<String>, Query, description = "Where the task is: omitted, empty or the local name for this site, or a peer's name."),
        ("wait" = inline(Option<crate::openapi::BlockingRead>), Query, style = Form, explode,
            description = "A blocking read: `waitForChange=true&lastUpdated=T[&timeout=30s]` answers once the task changed after `T` (or is final), or at the timeout with the task as it is."),
    ),
    responses(
        (status = 200, description = "The task.", body = Task),
        (status = 400, description = "BadUserInput: a malformed task ID or query.", body = ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token; or RemoteAuthenticationFailure: `site` names a peer the session is not extended to, or the peer refused it.", body = ErrorEnvelope),
        (status = 404, description = "TaskNotFound: no such task visible to this caller (another user's task is reported the same way); or SiteNotFound.", body = ErrorEnvelope),
        (status = 502, description = "RemoteSiteUnavailable: the peer `site` names could not be reached, or its link is marked down.", body = ErrorEnvelope),
        (status = 504, description = "RemoteSiteTimeout: the peer `site` names did not answer in time.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `GET /tasks/{taskId}`. Another user's task is reported exactly like a missing one. With
/// `waitForChange=true` it is a blocking read (see `crate::watch`); a remote one is held by
/// the peer, and identical concurrent ones share one peer request.
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    TaskIdPath(id): TaskIdPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let q = GetOneQuery::parse(query.as_deref())?;
    super::note_ignored_parameters(&q.ignored);
    let route = state
        .federation
        .resolve(q.site.as_deref(), origin.as_ref())?;
    let target = state.federation.target(&route);
    let answer = async {
        // A blocking read is held: it counts against the caller's held requests, and ends
        // when the session does.
        let _held = match q.wait {
            Some(_) => Some(state.held.hold(&caller.user)?),
            None => None,
        };
        let read = async {
            match &route {
                Route::Local => {
                    Ok(Json(read_local(&state, &caller, id, q.wait).await?).into_response())
                }
                Route::Peer(peer) => {
                    peer.read(&caller, PeerRead::Task { id, wait: q.wait }, &meta)
                        .await
                }
            }
        };
        match q.wait {
            Some(_) => while_session_lives(&state, &caller, read).await,
            None => read.await,
        }
    };
    Ok(target.answer(answer.await))
}

/// How often a held request checks that its session still stands.
const SESSION_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a held request's `work` while the caller's session stands; a logout, an expiry or the
/// user's removal from the users file ends it with `NotAuthenticated` within
/// [`SESSION_RECHECK`].
async fn while_session_lives<T>(
    state: &AppState,
    caller: &Caller,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(SESSION_RECHECK);
    tick.tick().await;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick() => {
                if !state.sessions.is_alive(caller).await {
                    return Err(ApiError::SessionRequired("The session has ended."));
                }
            }
        }
    }
}

/// The local task if this caller may see it (`TaskNotFound` otherwise, whichever the
/// reason), at once or, with `wait`, once it changed.
async fn read_local(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    wait: Option<Wait>,
) -> Result<Task, ApiError> {
    let read = move || async move {
        state
            .store
            .get_task(id)
            .await?
            .filter(|t| caller.visibility().is_none_or(|owner| owner == t.user))
            .ok_or(ApiError::TaskNotFound(id))
    };
    match wait {
        None => read().await,
        Some(wait) => state.watch.wait_for_change(id, wait, read).await,
    }
}

#[utoipa::path(
    get,
    path = "/tasks/{task_id}/events",
    operation_id = "taskEvents",
    tag = "tasks",
    params(
        ("task_id" = Uuid, Path, description = "The task's ID, a UUID in its hyphenated form."),
        ("site" = Option<String>, Query, description = "Where the task is: omitted, empty or the local name for this site, or a peer's name."),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: a `task` event with the whole task (JSON) now and each time it changes; the stream ends after the event of the final state.",
            body = crate::openapi::TaskEvent, content_type = "text/event-stream"),
        (status = 400, description = "BadUserInput: a malformed task ID or query.", body = ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token; or RemoteAuthenticationFailure: `site` names a peer the session is not extended to, or the peer refused it.", body = ErrorEnvelope),
        (status = 404, description = "TaskNotFound or SiteNotFound.", body = ErrorEnvelope),
        (status = 502, description = "RemoteSiteUnavailable: the peer `site` names could not be reached, or its link is marked down.", body = ErrorEnvelope),
        (status = 504, description = "RemoteSiteTimeout: the peer `site` names did not answer in time.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `GET /tasks/{taskId}/events`: Server-Sent Events, one `task` event with the whole task each
/// time it changes, from now until it is final; then the stream ends. Local or remote alike:
/// each event is a blocking read (`waitForChange`) through `get_one`'s path, so a remote
/// stream costs the peer one held request at a time.
pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    TaskIdPath(id): TaskIdPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let site = parse_site_only(query.as_deref())?;
    super::note_ignored_parameters(&site.ignored);
    let route = state
        .federation
        .resolve(site.site.as_deref(), origin.as_ref())?;
    let target = state.federation.target(&route);
    // The stream holds its place in the caller's held requests for as long as it lasts.
    let held = match state.held.hold(&caller.user) {
        Ok(held) => held,
        Err(e) => return Ok(target.answer(Err::<Response, _>(e))),
    };
    // The first read happens before the stream starts, so a missing task or a refused
    // remote session is a plain error answer, not an event.
    let meta = RequestMeta {
        // Each read of the stream gets the usual budget (plus its wait), not what is left of
        // the request that opened it.
        deadline: None,
        ..meta
    };
    let first = match read_for_events(&state, &caller, &route, id, None, &meta).await {
        Ok(Ok(task)) => task,
        Ok(Err(peer_answer)) => return Ok(target.answer(Ok::<_, ApiError>(peer_answer))),
        Err(e) => return Ok(target.answer(Err::<Response, _>(e))),
    };
    let stream = futures_util::stream::unfold(
        (EventStep::Send(first), state, caller, route, meta, held),
        move |(mut step, state, caller, route, meta, held)| async move {
            loop {
                step = match step {
                    EventStep::Done => return None,
                    // Sent before the next wait starts, so each state goes out as soon as it
                    // is known, not when the one after it is.
                    EventStep::Send(task) => {
                        let event = Event::default().event("task").json_data(&task);
                        let next = if task.state == TaskState::Running {
                            EventStep::After(task)
                        } else {
                            EventStep::Done
                        };
                        return Some((event, (next, state, caller, route, meta, held)));
                    }
                    EventStep::After(seen) => {
                        // A stream lasts at most `limits.max_stream_secs` (the client
                        // reconnects), and no longer than its session.
                        let left = state.held.max_stream.saturating_sub(held.since.elapsed());
                        if left.is_zero() {
                            tracing::info!(task = %id, "task event stream reached its longest life");
                            return None;
                        }
                        let wait = Wait {
                            last_updated: seen.last_updated,
                            timeout: DEFAULT_WAIT.min(left),
                        };
                        let read = read_for_events(&state, &caller, &route, id, Some(wait), &meta);
                        match while_session_lives(&state, &caller, read).await {
                            // The wait ended with no change: no event, wait again.
                            Ok(Ok(t))
                                if t.last_updated == seen.last_updated && t.state == seen.state =>
                            {
                                EventStep::After(t)
                            }
                            Ok(Ok(t)) => EventStep::Send(t),
                            Ok(Err(answer)) => {
                                // The stream cannot change its status any more: say why it ends.
                                tracing::info!(status = %answer.status(), task = %id, "task event stream ended by the peer's answer");
                                EventStep::Done
                            }
                            Err(e) => {
                                tracing::info!(error = %e, task = %id, "task event stream ended");
                                EventStep::Done
                            }
                        }
                    }
                };
            }
        },
    );
    Ok(target.answer(Ok::<_, ApiError>(
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )))
}

/// Where an event stream is: a task to send, a task sent and being waited on, or the end.
enum EventStep {
    Send(Task),
    After(Task),
    Done,
}

/// One read for the event stream: the task as it is (`wait` none) or once it changed. A
/// peer's refusal comes back as its answer, to be passed on unchanged.
async fn read_for_events(
    state: &AppState,
    caller: &Caller,
    route: &Route,
    id: Uuid,
    wait: Option<Wait>,
    meta: &RequestMeta,
) -> Result<Result<Task, Response>, ApiError> {
    match route {
        Route::Local => read_local(state, caller, id, wait).await.map(Ok),
        Route::Peer(peer) => peer.task(caller, id, wait, meta).await,
    }
}

#[utoipa::path(
    get,
    path = "/tasks",
    operation_id = "listTasks",
    tag = "tasks",
    params(
        ("site" = Option<String>, Query, description = "Where to list: omitted, empty or the local name for this site, a peer's name, or `*` for every site the session is extended to (answered as a `FanOutList`; there `offset + limit` may be at most 1000)."),
        ("ids" = inline(Option<crate::openapi::TaskIds>), Query, style = Form, explode = false, description = "Only these tasks (comma-separated, at most 1000)."),
        ("user" = Option<String>, Query, pattern = "^[A-Za-z0-9._@-]{1,64}$", description = "Only this user's tasks; administrators only (403 otherwise)."),
        ("state" = Option<Vec<TaskState>>, Query, style = Form, explode = false, min_items = 1, description = "Only tasks in these states (comma-separated)."),
        ("type" = Option<String>, Query, max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$", description = "Only tasks of this `workflowInfo.type`."),
        ("resourceType" = inline(Option<crate::openapi::ResourceTypes>), Query, style = Form, explode = false, description = "Only tasks with any of these `workflowInfo.resourceType`s (a comma list, or the parameter repeated), as the original API's clients send it: `replication,vmReplication,vappReplication`."),
        ("resourceId" = Option<String>, Query, max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$", description = "Only tasks with this `workflowInfo.resourceId`."),
        ("resourceName" = Option<String>, Query, max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$", description = "Only tasks with this `workflowInfo.resourceName`."),
        ("startTimeBefore" = Option<i64>, Query, minimum = 0, description = "Only tasks started before this time (epoch ms)."),
        ("startTimeAfter" = Option<i64>, Query, minimum = 0, description = "Only tasks started after this time (epoch ms)."),
        ("endTimeBefore" = Option<i64>, Query, minimum = 0, description = "Only tasks ended before this time (epoch ms)."),
        ("endTimeAfter" = Option<i64>, Query, minimum = 0, description = "Only tasks ended after this time (epoch ms)."),
        ("sourceOrg" = Option<String>, Query, max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$", description = "Only tasks whose `sourceOrg` is this organisation (case-sensitive)."),
        ("destinationOrg" = Option<String>, Query, max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$", description = "Only tasks whose `destinationOrg` is this organisation (case-sensitive); administrators only (403 otherwise), and not with `user` (400)."),
        ("sort" = inline(Option<crate::openapi::SortKeys>), Query, style = Form, explode = false, description = "Sort keys in order (comma-separated); `-` before or after a field means descending. Default `-startTime`; ties are broken by `id`."),
        ("limit" = Option<u64>, Query, format = "uint64", minimum = 0, maximum = 18446744073709551615usize, description = "The page size; default 100, larger values are clamped to 1000."),
        ("offset" = Option<i64>, Query, minimum = 0, maximum = 9223372036854775807usize, description = "Rows to skip; default 0."),
    ),
    responses(
        (status = 200, description = "A page of the tasks visible to the caller and their total; with `site=*`, the merged page and the sites that could not answer.", body = crate::openapi::TaskListAnswer),
        (status = 400, description = "BadUserInput: a malformed value of a known parameter, a single-valued parameter given twice, or `destinationOrg` with `user`. Unknown parameter names are ignored, as the original API ignores them.", body = ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token; or RemoteAuthenticationFailure: `site` names a peer the session is not extended to, or the peer refused it.", body = ErrorEnvelope),
        (status = 403, description = "Forbidden: filtering by `user` or `destinationOrg` without the admin role.", body = ErrorEnvelope),
        (status = 404, description = "SiteNotFound.", body = ErrorEnvelope),
        (status = 502, description = "RemoteSiteUnavailable: the peer `site` names could not be reached, or its link is marked down.", body = ErrorEnvelope),
        (status = 504, description = "RemoteSiteTimeout: the peer `site` names did not answer in time.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `GET /tasks`: filters, sort and paging run in the store.
pub(crate) async fn query(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let q = TaskQuery::parse(query.as_deref())?;
    super::note_ignored_parameters(&q.ignored);
    if q.user.is_some() && !caller.is_admin() {
        return Err(ApiError::Forbidden(
            "Only administrators may filter tasks by user.",
        ));
    }
    // As the original: `destinationOrg` is for administrators, and not with `user`.
    if q.destination_org.is_some() {
        if !caller.is_admin() {
            return Err(ApiError::Forbidden(
                "Only administrators may filter tasks by destinationOrg.",
            ));
        }
        if q.user.is_some() {
            return Err(ApiError::BadInput(
                "destinationOrg cannot be combined with user.".into(),
            ));
        }
    }
    let route = state
        .federation
        .resolve_list(q.site.as_deref(), origin.as_ref(), &caller)?;
    let target = state.federation.list_target(&route);
    let answer = match &route {
        ListRoute::All(peers) => all_sites(&state, &caller, peers, &q, &meta).await,
        ListRoute::One(Route::Local) => state
            .store
            .query_tasks(&q, caller.visibility())
            .await
            .map(|page| {
                Json(TaskList {
                    items: page.items,
                    total: page.total,
                    limit: q.limit,
                    offset: q.offset,
                })
                .into_response()
            })
            .map_err(ApiError::from),
        ListRoute::One(Route::Peer(peer)) => peer.read(&caller, PeerRead::List(&q), &meta).await,
    };
    Ok(target.answer(answer))
}

/// `GET /tasks?site=*`: every site asked at once for the rows the merged page can need; a
/// site that fails is named in `siteErrors` and the others still answer.
async fn all_sites(
    state: &AppState,
    caller: &Caller,
    peers: &[PeerHandle],
    q: &TaskQuery,
    meta: &RequestMeta,
) -> Result<Response, ApiError> {
    let each = per_site_query(q)?;
    let routes: Vec<Route> = std::iter::once(Route::Local)
        .chain(peers.iter().cloned().map(Route::Peer))
        .collect();
    let asks = routes.iter().map(|route| {
        let each = &each;
        async move {
            match route {
                Route::Local => (
                    state.federation.local_name().to_string(),
                    state
                        .store
                        .query_tasks(each, caller.visibility())
                        .await
                        .map(|page| TaskList {
                            items: page.items,
                            total: page.total,
                            limit: each.limit,
                            offset: each.offset,
                        })
                        .map_err(|e| ApiError::from(e).envelope()),
                ),
                Route::Peer(peer) => (peer.name().to_string(), peer.list(caller, each, meta).await),
            }
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut pages = Vec::with_capacity(answers.len());
    let mut total = 0;
    let mut site_errors = Vec::new();
    for (site, answer) in answers {
        match answer {
            Ok(list) => {
                total += list.total;
                pages.push(list.items);
            }
            Err(error) => {
                tracing::warn!(site = %site, code = %error.code, "site=*: a site did not answer");
                site_errors.push(SiteError { site, error });
            }
        }
    }
    Ok(Json(FanOutList {
        items: fanout::merge(q, pages),
        total,
        limit: q.limit,
        offset: q.offset,
        site_errors,
    })
    .into_response())
}

#[utoipa::path(
    post,
    path = "/tasks/poll",
    operation_id = "pollTasks",
    tag = "tasks",
    params(("site" = Option<String>, Query, description = "Where the task is: omitted, empty or the local name for this site, or a peer's name.")),
    request_body(content = crate::openapi::PollRequest, description = "The task IDs to read (at most 1000)."),
    responses(
        (status = 200, description = "One row per visible task, in the order asked; missing and invisible IDs are left out.", body = PollResponse),
        (status = 400, description = "BadUserInput: a malformed body, task ID or query.", body = ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token; or RemoteAuthenticationFailure: `site` names a peer the session is not extended to, or the peer refused it.", body = ErrorEnvelope),
        (status = 404, description = "SiteNotFound.", body = ErrorEnvelope),
        (status = 413, description = "BadUserInput: the body is larger than the site allows.", body = ErrorEnvelope),
        (status = 502, description = "RemoteSiteUnavailable: the peer `site` names could not be reached, or its link is marked down.", body = ErrorEnvelope),
        (status = 504, description = "RemoteSiteTimeout: the peer `site` names did not answer in time.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `POST /tasks/poll`: one row per visible task, in the order asked.
pub(crate) async fn poll(
    State(state): State<AppState>,
    caller: Caller,
    Origin(origin): Origin,
    meta: RequestMeta,
    RawQuery(query): RawQuery,
    JsonBody(ids): JsonBody<Vec<String>>,
) -> Result<Response, ApiError> {
    let site = parse_site_only(query.as_deref())?;
    super::note_ignored_parameters(&site.ignored);
    let ids = parse_poll_ids(&ids)?;
    let route = state
        .federation
        .resolve(site.site.as_deref(), origin.as_ref())?;
    let target = state.federation.target(&route);
    let answer = match &route {
        Route::Local => state
            .store
            .get_tasks(&ids, caller.visibility())
            .await
            .map(|tasks| Json(PollResponse::from_tasks(&tasks)).into_response())
            .map_err(ApiError::from),
        // The validated, de-duplicated IDs go on, not the caller's raw body.
        Route::Peer(peer) => peer.read(&caller, PeerRead::Poll(&ids), &meta).await,
    };
    Ok(target.answer(answer))
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
    super::note_ignored_parameters(&site.ignored);
    match state.federation.resolve(site.site.as_deref(), None)? {
        Route::Local => Ok(()),
        Route::Peer(peer) => Err(ApiError::BadInput(format!(
            "Tasks are written only at the site they run on; write to site '{}' there.",
            peer.name()
        ))),
    }
}

#[utoipa::path(
    post,
    path = "/tasks",
    operation_id = "createTask",
    tag = "tasks",
    params(("site" = Option<String>, Query, description = "Must be omitted, empty or the local site: tasks are written only where they run (a peer's name is BadUserInput).")),
    request_body(content = NewTask, description = "The new task; with `id`, repeating the same creation is idempotent."),
    responses(
        (status = 201, description = "The new RUNNING task (or the existing one, for a repeated identical creation).", body = Task,
            headers(("Location" = String, description = "`/tasks/{id}` of the task."))),
        (status = 400, description = "BadUserInput: a malformed body, a task with this `id` that was created differently, or `site` names a peer.", body = ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = ErrorEnvelope),
        (status = 403, description = "Forbidden: the caller has neither the writer nor the admin role.", body = ErrorEnvelope),
        (status = 404, description = "SiteNotFound.", body = ErrorEnvelope),
        (status = 413, description = "BadUserInput: the body is larger than the site allows.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `POST /tasks`: 201 with `Location`; repeating a create with the same ID and body is
/// idempotent.
pub(crate) async fn create(
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
        .create_task(new, state.federation.local_name().as_str())
        .await?;
    let task = outcome.task();
    let location = HeaderValue::from_str(&format!("/tasks/{}", task.id))
        .map_err(|_| ApiError::Internal("location header".into()))?;
    let mut response = (StatusCode::CREATED, Json(task)).into_response();
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

#[utoipa::path(
    patch,
    path = "/tasks/{task_id}",
    operation_id = "patchTask",
    tag = "tasks",
    params(
        ("task_id" = Uuid, Path, description = "The task's ID, a UUID in its hyphenated form."),
        ("site" = Option<String>, Query, description = "Must be omitted, empty or the local site: tasks are written only where they run (a peer's name is BadUserInput)."),
    ),
    request_body(content = crate::openapi::TaskPatchRequest, description = "Progress and warnings (appended), or the final state with its result or error. `lastUpdated` and `endTime` are the server's."),
    responses(
        (status = 200, description = "The task after the change.", body = Task),
        (status = 400, description = "BadUserInput: a malformed body or task ID, too many warnings for the task, or `site` names a peer.", body = ErrorEnvelope),
        (status = 401, description = "NotAuthenticated: no, unknown or expired session token.", body = ErrorEnvelope),
        (status = 403, description = "Forbidden: the caller has neither the writer nor the admin role.", body = ErrorEnvelope),
        (status = 404, description = "TaskNotFound or SiteNotFound.", body = ErrorEnvelope),
        (status = 409, description = "TaskAlreadyCompleted: the task is in a final state and never changes again.", body = ErrorEnvelope),
        (status = 413, description = "BadUserInput: the body is larger than the site allows.", body = ErrorEnvelope),
    ),
    security(("session" = []))
)]
/// `PATCH /tasks/{taskId}`: progress, warnings, or the final state; never after the final state.
pub(crate) async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    TaskIdPath(id): TaskIdPath,
    RawQuery(query): RawQuery,
    JsonBody(patch): JsonBody<TaskPatch>,
) -> Result<Json<Task>, ApiError> {
    require_writer(&caller)?;
    require_local(&state, query.as_deref())?;
    let patch = patch.validate()?;
    let task = state.store.update_task(id, patch).await?;
    state.watch.changed(id);
    Ok(Json(task))
}
