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
//! Modules, in the order a request meets them:
//! - [`server`]: the accept loop (connection limit, header read timeout, graceful drain).
//! - `http1_wire`: HTTP/1.1 response heads spelled as the original API's clients expect
//!   (`X-VCAV-Auth`, `operationID`), hyper's own bare errors given the envelope, and a
//!   doubled CR before a header line's end read as a space.
//! - [`app`]: [`Application`] (build from config, run until shutdown) and the layer stack.
//! - [`layers`]: operation ID and access log, media-type negotiation, request deadline.
//! - [`limits`]: the header size limit, and the client API's first-request, idle and
//!   slow-head limits on connections (408 with the envelope).
//! - [`auth`]: users, password checks, sessions and the [`auth::Caller`] extractor.
//! - `budget`: requests in progress per listener, held requests (blocking reads, event
//!   streams) per user and in total; refusals instead of queues that never end.
//! - [`throttle`]: failed logins counted per user name and per address; lockouts.
//! - [`extract`]: body and path extractors that fail with the API's envelope.
//! - [`handlers`]: one module per resource: sessions, tasks, sites, operations.
//! - [`sites`]: [`sites::SiteResolver`], which decides where a `site` is answered.
//! - [`peer`]: [`peer::PeerClient`], requests over the peer link, circuit breaker, probes.
//! - [`watch`]: waiting for a task to change (blocking reads, the event stream).
//! - [`remote_reads`]: remote Get One answers shared between callers (final tasks kept,
//!   single flight for running ones).
//! - `retention`: removing finished tasks past `[store] task_retention`, paced so users'
//!   reads and writes stay fast; the store's size on `/metrics`.
//! - [`tls`]: the peer link's (and the optional HTTPS client API's) rustls configuration,
//!   reloadable; the only rustls user.
//! - [`telemetry`]: trace context, OTLP export, JSON logs, metrics; the only OpenTelemetry user.
//! - [`ui`]: the dashboard at `/ui` (embedded HTML, JavaScript and CSS).
//! - [`error`]: [`error::ApiError`] and [`error::GatewayError`].
//! - [`openapi`]: the OpenAPI 3.1 document of the client API, generated from the wire types
//!   and the handlers' annotations, served at `GET /openapi.json`.

pub mod app;
pub mod auth;
pub(crate) mod budget;
pub mod error;
pub mod extract;
pub mod handlers;
mod http1_wire;
pub mod layers;
pub mod limits;
pub mod openapi;
pub mod peer;
pub mod remote_reads;
mod retention;
pub mod server;
pub mod sites;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod ui;
pub mod watch;

pub use app::Application;
pub use error::{ApiError, GatewayError};
