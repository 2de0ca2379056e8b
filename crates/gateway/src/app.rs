//! Building a site from its configuration, and the client API's layer stack.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::{middleware, Extension, Router};
use sitegate_model::config::{SiteConfig, StoreBackend};
use sitegate_store::{EmbeddedStore, PostgresStore, Store};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

use crate::auth::{self, SessionManager, Users};
use crate::error::{ApiError, GatewayError};
use crate::extract::BodyLimit;
use crate::federation::Federation;
use crate::handlers::{diagnostics, ops, sessions, sites, tasks, AppState, Readiness, Shared};
use crate::layers::{self, RequestContext};
use crate::limits::HeaderLimit;
use crate::server::{self, Transport};
use crate::throttle::LoginThrottle;
use crate::tls::{ClientApiTls, PeerTls, ReloadableCertificates};

/// How often expired sessions are deleted.
const SESSION_PURGE_INTERVAL: Duration = Duration::from_secs(300);

/// The routes of the client API.
fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/sessions",
            post(sessions::login)
                .get(sessions::get)
                .delete(sessions::logout),
        )
        .route("/sessions/extend", post(sessions::extend))
        .route("/sessions/{site}", delete(sessions::drop_extension))
        .route("/tasks", get(tasks::query).post(tasks::create))
        .route("/tasks/poll", post(tasks::poll))
        .route("/tasks/{task_id}", get(tasks::get_one).patch(tasks::patch))
        .route("/tasks/{task_id}/events", get(tasks::events))
        .route("/sites", get(sites::list))
        .route("/sites/{site}", get(sites::get))
        .route("/diagnostics/about", get(diagnostics::about))
        .route(
            "/diagnostics/health",
            get(diagnostics::health).post(diagnostics::health_task),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        // The dashboard: static files, no session needed (the page logs in itself).
        .route("/ui", get(crate::ui::index))
        .route("/ui/", get(crate::ui::index))
        .route("/ui/{asset}", get(crate::ui::file))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// The routes of the peer link: only what a peer calls. Sessions (a user's credentials, a
/// multisite session for a user the peer vouches for, a logout), the reads a peer forwards
/// for its callers, and the probe. No writes, no extension (a peer request is never
/// forwarded again), no dashboard or documents: anything else is an unknown route.
fn peer_routes() -> Router<AppState> {
    Router::new()
        .route("/sessions", post(sessions::login).delete(sessions::logout))
        .route("/peer/sessions", post(sessions::issue_for_peer))
        .route("/tasks", get(tasks::query))
        .route("/tasks/poll", post(tasks::poll))
        .route("/tasks/{task_id}", get(tasks::get_one))
        .route("/healthz", get(ops::healthz))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// Which listener a stack is for: its routes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listener {
    ClientApi,
    PeerLink,
}

/// The API: a listener's routes wrapped in the layers every request passes, outermost first.
/// Each listener gets its own (`budget`: the client API's or the peer link's request slots).
pub(crate) fn api(
    listener: Listener,
    state: AppState,
    config: &SiteConfig,
    budget: Arc<crate::budget::RequestBudget>,
) -> Router {
    let limits = &config.limits;
    let proxies = layers::TrustedProxies(Arc::new(
        config.listen.trusted_proxy_nets().unwrap_or_default(),
    ));
    let stack = ServiceBuilder::new()
        // 0. The client's address behind a trusted load balancer (`listen.trusted_proxies`),
        //    before anything logs or counts by address.
        .layer(middleware::from_fn_with_state(
            proxies,
            layers::forwarded_client,
        ))
        // 1. Media type: rewrites JSON answers to the vendor type when asked. Outermost, so
        //    every answer gets it, even one refused by the operation-ID layer.
        .layer(middleware::from_fn(layers::negotiate_media_type))
        // 2. Operation ID, request span, metrics and access log: every response below it
        //    carries `operationID` and is logged under it.
        .layer(middleware::from_fn_with_state(
            RequestContext {
                site: config.site.name.to_string(),
            },
            layers::operation_id,
        ))
        // 2a. Header size: headers over `limits.max_header_bytes` get 431 in the envelope.
        //     Inside the operation-ID layer so the refusal carries an operation ID (a huge
        //     `operationID` itself is refused there first, and never echoed); before
        //     everything that reads headers at length (auth, handlers).
        .layer(middleware::from_fn_with_state(
            HeaderLimit(limits.max_header_bytes),
            crate::limits::header_size,
        ))
        // 3. Deadline: a request not answered in time becomes an envelope error and frees
        //    its concurrency slot.
        .layer(middleware::from_fn_with_state(
            Duration::from_secs(limits.request_timeout_secs),
            layers::deadline,
        ))
        // 4. Request slots of this listener, shared by its connections: excess requests wait
        //    here rather than pile onto the store, but only as long as their deadline allows
        //    (then 503 ServerBusy). Held requests and the operations endpoints are outside it;
        //    held requests are counted per user by their handlers (`budget::HeldBudget`).
        .layer(middleware::from_fn_with_state(
            budget,
            crate::budget::limit_requests,
        ))
        // 5. Authentication: resolves the session token once, before routing; handlers opt
        //    in to requiring it with the `Caller` extractor.
        .layer(middleware::from_fn_with_state(
            state.sessions.clone(),
            auth::authenticate,
        ))
        // 6. Body limit: read by the `JsonBody` extractor, which answers 413 in the envelope.
        .layer(Extension(BodyLimit(limits.max_body_bytes)))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let routes = match listener {
        Listener::ClientApi => routes(),
        Listener::PeerLink => peer_routes(),
    };
    routes.with_state(state).layer(stack)
}

/// A site ready to serve: its store is open and its listeners bound.
pub struct Application {
    config: SiteConfig,
    state: AppState,
    client_listener: TcpListener,
    /// The client API's HTTPS, when `listen.tls_cert` is set; plain HTTP otherwise.
    client_tls: Option<Arc<ClientApiTls>>,
    /// The peer link's listener and certificates, when peers are configured.
    peer_link: Option<(TcpListener, Arc<PeerTls>)>,
}

impl Application {
    /// Opens the store, loads the users and binds the client listener. The config must
    /// already be validated and its paths resolved.
    pub async fn build(config: SiteConfig) -> Result<Self, GatewayError> {
        config
            .validate()
            .map_err(|e| GatewayError::Config(e.to_string()))?;
        // Loaded first, so a bad certificate stops the start with a clear message before the
        // store is opened or a port bound.
        let client_tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                ClientApiTls::load(cert.clone(), key.clone())
                    .map_err(|e| GatewayError::Config(format!("listen.tls_cert/tls_key: {e}")))?,
            )),
            _ => None,
        };
        let store: Arc<dyn Store> = match config.store.backend {
            StoreBackend::Embedded => Arc::new(EmbeddedStore::open(&config.store.path)?),
            StoreBackend::Postgres => {
                let url = config.store.url.as_ref().ok_or_else(|| {
                    GatewayError::Config("store.url is required for postgres".into())
                })?;
                Arc::new(
                    PostgresStore::connect(
                        url.expose(),
                        &config.store.schema,
                        config.store.pool_size,
                    )
                    .await?,
                )
            }
        };
        let users = Users::load(&config.auth.users_file)?;
        // Installed before anything records, so early metrics are not lost.
        crate::telemetry::metrics();
        let sessions = Arc::new(
            SessionManager::new(
                store.clone(),
                users,
                Duration::from_secs(config.auth.session_idle_timeout_secs),
                Duration::from_secs(config.auth.session_max_age_secs),
            )
            .with_login_throttle(LoginThrottle::from_config(&config.auth)),
        );
        let federation = Arc::new(Federation::from_config(&config)?);
        let client_listener = bind(config.listen.client).await?;
        let client_addr = client_listener
            .local_addr()
            .map_err(|source| GatewayError::Bind {
                addr: config.listen.client,
                source,
            })?;
        let build = Arc::new(diagnostics::BuildFacts::new(
            store.instance_id().await?,
            client_addr.to_string(),
        ));
        let peer_link = match (federation.peer_tls(), config.listen.peer) {
            (Some(tls), Some(addr)) => Some((bind(addr).await?, tls)),
            _ => None,
        };
        Ok(Application {
            peer_link,
            state: AppState::new(Shared {
                store,
                sessions,
                federation,
                readiness: Arc::new(Readiness::default()),
                watch: Arc::default(),
                build,
                held: crate::budget::HeldBudget::new(
                    config.limits.max_held_per_user,
                    config.limits.max_held_total,
                    Duration::from_secs(config.limits.max_stream_secs),
                ),
            }),
            client_listener,
            client_tls,
            config,
        })
    }

    /// Where the client API listens (the real port when the config said port 0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_listener
            .local_addr()
            .unwrap_or(self.config.listen.client)
    }

    /// Where the peer link listens, if there is one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_link
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// What the handlers share, for the in-process router tests.
    #[cfg(test)]
    pub(crate) fn state_for_tests(&self) -> AppState {
        self.state.clone()
    }

    /// The site's store, for in-process services such as the demo's task simulator.
    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    pub fn site_name(&self) -> &str {
        self.config.site.name.as_str()
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` turns 503, the listener
    /// closes, and in-flight requests get up to `limits.shutdown_grace_secs` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), GatewayError> {
        let app = api(
            Listener::ClientApi,
            self.state.clone(),
            &self.config,
            crate::budget::RequestBudget::new(
                self.config.limits.max_concurrent_requests,
                "requests on the client API",
            ),
        );
        let peer_app = api(
            Listener::PeerLink,
            self.state.clone(),
            &self.config,
            crate::budget::RequestBudget::new(
                self.config.limits.peer_max_concurrent_requests,
                "requests on the peer link",
            ),
        );
        let limits = server::ServeLimits::from(&self.config.limits);
        let mut background = vec![
            tokio::spawn(purge_sessions_periodically(self.state.sessions.clone())),
            tokio::spawn(crate::telemetry::metrics_upkeep()),
            tokio::spawn(crate::retention::keep_store(
                self.state.store.clone(),
                self.config.store.task_retention.duration(),
            )),
        ];
        // What a SIGHUP (or a changed file) reloads: always the users file, and each
        // listener's certificates where there are some. Installed whatever the site's shape,
        // so SIGHUP never stops a site.
        let mut certificates: Vec<(&'static str, Arc<dyn ReloadableCertificates>)> = Vec::new();
        if let Some((_, tls)) = &self.peer_link {
            certificates.push(("peer link", tls.clone()));
        }
        if let Some(tls) = &self.client_tls {
            certificates.push(("client API", tls.clone()));
        }
        background.push(tokio::spawn(reload_on_change(
            certificates,
            self.state.sessions.clone(),
            self.config.auth.users_file.clone(),
            Duration::from_secs(self.config.peering.tls_reload_interval_secs),
        )));
        let readiness = self.state.readiness.clone();
        // Both listeners stop on the same signal.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let peer_server = match self.peer_link {
            Some((listener, tls)) => {
                let federation = self.state.federation.clone();
                background.push(tokio::spawn(
                    async move { federation.probe_forever().await },
                ));
                tracing::info!(peer_link = ?listener.local_addr().ok(), "peer link listening");
                Some(tokio::spawn(server::serve(
                    listener,
                    peer_app,
                    limits,
                    Transport::PeerLink(tls),
                    stopped(stop_rx.clone()),
                )))
            }
            None => None,
        };
        if self.client_tls.is_some() {
            tracing::info!("client API serves HTTPS only (TLS 1.2 and 1.3)");
        }
        let client_server = server::serve(
            self.client_listener,
            app,
            limits,
            match &self.client_tls {
                Some(tls) => Transport::ClientTls(tls.clone()),
                None => Transport::Plain,
            },
            stopped(stop_rx),
        );
        let drain_delay = Duration::from_millis(self.config.limits.drain_delay_ms);
        let signal = async move {
            shutdown.await;
            readiness.start_draining();
            if !drain_delay.is_zero() {
                // Still serving, but /readyz says 503: balancers stop sending new requests.
                tracing::info!(
                    delay_ms = drain_delay.as_millis() as u64,
                    "shutting down: draining from balancers"
                );
                tokio::time::sleep(drain_delay).await;
            }
            tracing::info!("shutting down: closing listeners, finishing requests");
            let _ = stop_tx.send(true);
        };
        tokio::join!(client_server, signal);
        if let Some(peer_server) = peer_server {
            let _ = peer_server.await;
        }
        for task in background {
            task.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Reloads what can change under a running site, on SIGHUP and whenever a file changes: the
/// users file (sessions follow it from the next request) and each listener's certificates
/// (`what` names the listener). A failed reload keeps what is in force and says so.
async fn reload_on_change(
    certificates: Vec<(&'static str, Arc<dyn ReloadableCertificates>)>,
    sessions: Arc<SessionManager>,
    users_file: std::path::PathBuf,
    every: Duration,
) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut users_stamp = modified(&users_file);
    let mut tick = tokio::time::interval(every);
    loop {
        #[cfg(unix)]
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        if forced {
            tracing::info!("SIGHUP: reloading the users file and certificates");
        }
        let stamp = modified(&users_file);
        if forced || stamp != users_stamp {
            users_stamp = stamp;
            match Users::load(&users_file) {
                Ok(users) => {
                    tracing::info!(users = users.len(), path = %users_file.display(), "users file reloaded");
                    sessions.replace_users(users);
                }
                Err(e) => {
                    tracing::error!(error = %e, "users file not reloaded; keeping the users in force")
                }
            }
        }
        for (what, tls) in &certificates {
            let result = if forced {
                tls.reload().map(|()| true)
            } else {
                tls.reload_if_changed()
            };
            match result {
                Ok(true) => {
                    tracing::info!(listener = what, "certificates reloaded");
                    metrics::counter!("sitegate_certificate_reloads_total", "listener" => *what, "outcome" => "reloaded").increment(1);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(listener = what, error = %e, "certificates not reloaded; keeping the old ones");
                    metrics::counter!("sitegate_certificate_reloads_total", "listener" => *what, "outcome" => "refused").increment(1);
                }
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { addr, source })
}

async fn purge_sessions_periodically(sessions: Arc<SessionManager>) {
    let mut tick = tokio::time::interval(SESSION_PURGE_INTERVAL);
    loop {
        tick.tick().await;
        match sessions.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "purged expired sessions"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired sessions"),
        }
    }
}
