//! `sitegate-gateway` is the HTTP face of one site: it binds the client API listener, wraps the
//! router in the tower layers every request passes (operation ID, media type, deadline,
//! concurrency limit, authentication), routes to the handlers, and resolves each request's
//! `site` to where it is answered.
//!
//! It is not a storage engine (that is `sitegate-store`) nor the place for wire types and input
//! rules (that is `sitegate-model`); it turns HTTP into calls on those and their results back
//! into HTTP, and [`error::ApiError`] is the one place where a failure becomes a status and an
//! envelope.
//!
//! Its public face is small: [`Application`] (build from config, run until shutdown),
//! [`telemetry::init`], [`auth::hash_password`] (and the session types its micro-benchmark
//! measures), and the error types. Every other module is `pub(crate)`, so the compiler finds
//! what nothing uses.
//!
//! Modules, in the order a request meets them:
//! - `server`: the accept loop (connection limit, header read timeout, graceful drain).
//! - `http1_wire`: HTTP/1.1 response heads spelled as the original API's clients expect
//!   (`X-VCAV-Auth`, `operationID`), hyper's own bare errors given the envelope, and a
//!   doubled CR before a header line's end read as a space.
//! - [`app`]: [`Application`], the layer stack (one commented function), and the two
//!   routers: the client API's and the peer link's (only what a peer may call).
//! - `layers`: operation ID and access log, media-type negotiation, request deadline.
//! - `limits`: the header size limit, and the client API's first-request, idle and
//!   slow-head limits on connections (408 with the envelope).
//! - [`auth`]: users, password checks, sessions and the [`auth::Caller`] extractor.
//! - `budget`: requests in progress per listener, held requests (blocking reads, event
//!   streams) per user and in total; refusals instead of queues that never end.
//! - `throttle`: failed logins counted per user name and per address; lockouts.
//! - `extract`: body and path extractors that fail with the API's envelope.
//! - `handlers`: one module per resource: sessions, tasks, sites, operations.
//! - `federation`: where a `site` is answered (`Federation::resolve` gives a `Route`: the
//!   local store or a `PeerHandle`), and everything that crosses the peer link: typed peer
//!   reads, the peer client, circuit breaker, probe, shared remote reads. Nothing outside it
//!   touches a peer's internals.
//! - `watch`: waiting for a task to change (blocking reads, the event stream).
//! - `retention`: removing finished tasks past `[store] task_retention`, paced so users'
//!   reads and writes stay fast; the store's size on `/metrics`.
//! - `tls`: the peer link's (and the optional HTTPS client API's) rustls configuration,
//!   reloadable; the only rustls user.
//! - [`telemetry`]: trace context, OTLP export, JSON logs, metrics; the only OpenTelemetry user.
//! - `ui`: the dashboard at `/ui` (embedded HTML, JavaScript and CSS).
//! - [`error`]: [`error::ApiError`] and [`error::GatewayError`].
//! - `openapi`: the OpenAPI 3.1 document of the client API, generated from the wire types
//!   and the handlers' annotations, served at `GET /openapi.json`.

pub mod app;
pub mod auth;
pub(crate) mod budget;
pub mod error;
pub(crate) mod extract;
pub(crate) mod federation;
pub(crate) mod handlers;
mod http1_wire;
pub(crate) mod layers;
pub(crate) mod limits;
pub(crate) mod openapi;
mod retention;
#[cfg(test)]
mod router_tests;
pub(crate) mod server;
pub mod telemetry;
#[cfg(test)]
mod test_certificates;
pub(crate) mod throttle;
pub(crate) mod tls;
pub(crate) mod ui;
pub(crate) mod watch;

pub use app::Application;
pub use error::GatewayError;

/// What the `gateway` micro-benchmark (a separate target, outside this crate) needs: the
/// authentication layer in front of two routes, and the token hash. Not an API.
#[doc(hidden)]
pub mod bench_support {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::routing::get;
    use axum::{middleware, Router};
    use sitegate_model::session::UsersFile;
    use sitegate_store::Store;

    pub use crate::auth::{token_hash, AUTH_HEADER};

    /// `/whoami` (the caller's user name; needs a session) and `/open` (no session), behind
    /// the authentication layer, with sessions in `store` and users from `users`.
    pub fn auth_router(
        store: Arc<dyn Store>,
        users: UsersFile,
        idle: Duration,
        max_age: Duration,
    ) -> Result<Router, String> {
        let users = crate::auth::Users::from_file(users)?;
        let sessions = Arc::new(crate::auth::SessionManager::new(
            store, users, idle, max_age,
        ));
        Ok(Router::new()
            .route(
                "/whoami",
                get(|caller: crate::auth::Caller| async move { caller.user }),
            )
            .route("/open", get(|| async { "" }))
            .layer(middleware::from_fn_with_state(
                sessions,
                crate::auth::authenticate,
            )))
    }
}
