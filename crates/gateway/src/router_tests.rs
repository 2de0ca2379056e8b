//! The routers and their layers, built in-process and driven with `oneshot` (axum's pattern):
//! routing on each listener, the error envelope, operation IDs, authentication, site
//! resolution, the target site on the response, and the peer link's routes. No socket is
//! opened for a request (the listeners are bound to port 0 and never accept); what needs real
//! sockets, TLS handshakes and processes is in `crates/sitegate/tests/`.

use std::net::SocketAddr;
use std::path::Path;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use sitegate_model::config::{
    AuthConfig, LimitsConfig, ListenConfig, LogConfig, PeerConfig, PeeringConfig, SiteConfig,
    SiteSection, StoreConfig, TelemetryConfig,
};
use sitegate_model::session::{Role, UserEntry, UsersFile};
use sitegate_model::site::SiteName;
use tower::ServiceExt;

use crate::app::{api, Listener};
use crate::auth::AUTH_HEADER;
use crate::federation::TargetSite;
use crate::layers::{ClientAddr, PeerOrigin, OPERATION_ID_HEADER};
use crate::Application;

const PASSWORD: &str = "router-test-password";

/// A site with users alice (user), svc (writer) and root (admin), and optionally one peer
/// `site2` (at an address nothing listens on) with certificates from a CA made here.
struct TestSite {
    _dir: tempfile::TempDir,
    client: Router,
    peer: Router,
}

fn write_users(dir: &Path) -> std::path::PathBuf {
    let hash = crate::auth::hash_password(PASSWORD).unwrap();
    let user = |name: &str, role: Role| UserEntry {
        name: name.into(),
        roles: vec![role],
        password_hash: hash.clone(),
        org: None,
    };
    let file = UsersFile {
        users: vec![
            user("alice", Role::User),
            user("svc", Role::Writer),
            user("root", Role::Admin),
        ],
    };
    let path = dir.join("users.toml");
    std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
    path
}

async fn site(with_peer: bool) -> TestSite {
    // Quiet: the metrics recorder is process-wide and shared by every test here.
    let dir = tempfile::tempdir().unwrap();
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let unused = {
        let l = std::net::TcpListener::bind(loopback(0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let (tls, peers, peer_listen) = if with_peer {
        let peer = PeerConfig {
            name: SiteName::parse("site2").unwrap(),
            url: format!("https://127.0.0.1:{unused}"),
            trust_multisite: true,
            trust_multisite_admin: false,
            description: String::new(),
            ca: None,
        };
        (
            Some(crate::test_certificates::write(dir.path(), "site1")),
            vec![peer],
            Some(loopback(0)),
        )
    } else {
        (None, vec![], None)
    };
    let config = SiteConfig {
        site: SiteSection {
            name: SiteName::parse("site1").unwrap(),
            description: "the site under test".into(),
        },
        listen: ListenConfig {
            client: loopback(0),
            peer: peer_listen,
            ..ListenConfig::default()
        },
        store: StoreConfig {
            path: dir.path().join("data"),
            ..StoreConfig::default()
        },
        auth: AuthConfig::new(write_users(dir.path())),
        limits: LimitsConfig::default(),
        log: LogConfig::default(),
        tls,
        telemetry: TelemetryConfig::default(),
        peering: PeeringConfig::default(),
        peers,
    };
    let app = Application::build(config.clone()).await.unwrap();
    let state = app.state_for_tests();
    let budget = |what| crate::budget::RequestBudget::new(64, what);
    TestSite {
        client: api(
            Listener::ClientApi,
            state.clone(),
            &config,
            budget("client"),
        ),
        peer: api(Listener::PeerLink, state, &config, budget("peer")),
        _dir: dir,
    }
}

/// A request as the server hands it on: with the client's address, and, on the peer link,
/// the peer its certificate named.
fn request(
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
    from_peer: Option<&str>,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        builder = builder.header(AUTH_HEADER, token);
    }
    let body = match body {
        Some(v) => {
            builder = builder.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let mut req = builder.body(body).unwrap();
    req.extensions_mut()
        .insert(ClientAddr(SocketAddr::from(([127, 0, 0, 9], 40000))));
    if let Some(peer) = from_peer {
        req.extensions_mut()
            .insert(PeerOrigin(SiteName::parse(peer).unwrap()));
    }
    req
}

async fn send(router: &Router, req: Request<Body>) -> (Response, Value) {
    let response = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (Response::from_parts(parts, Body::empty()), value)
}

fn assert_envelope(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["code"], json!(code), "{body}");
    assert_eq!(body["stacktrace"], json!(""), "{body}");
    assert!(
        body["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn target(response: &Response) -> Option<String> {
    response
        .extensions()
        .get::<TargetSite>()
        .map(|t| t.0.to_string())
}

async fn login(router: &Router, user: &str) -> String {
    let (r, body) = send(
        router,
        request(
            Method::POST,
            "/sessions",
            None,
            Some(json!({"type": "localUser", "localUser": user, "localPassword": PASSWORD})),
            None,
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    r.headers()
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn unknown_routes_and_methods_get_the_envelope_and_an_operation_id() {
    let site = site(false).await;
    let (r, body) = send(
        &site.client,
        request(Method::GET, "/nowhere", None, None, None),
    )
    .await;
    assert_envelope(r.status(), &body, StatusCode::NOT_FOUND, "NotFound");
    assert!(r.headers().get(OPERATION_ID_HEADER).is_some());
    let (r, body) = send(
        &site.client,
        request(Method::PUT, "/tasks", None, None, None),
    )
    .await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(body["stacktrace"], json!(""));
}

#[tokio::test]
async fn an_operation_id_is_echoed_and_a_bad_one_is_refused_not_reflected() {
    let site = site(false).await;
    let mut req = request(Method::GET, "/healthz", None, None, None);
    req.headers_mut()
        .insert(OPERATION_ID_HEADER, "my-op-42".parse().unwrap());
    let (r, _) = send(&site.client, req).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get(OPERATION_ID_HEADER).unwrap(), "my-op-42");
    let too_long = "x".repeat(1000);
    let mut req = request(Method::GET, "/healthz", None, None, None);
    req.headers_mut()
        .insert(OPERATION_ID_HEADER, too_long.parse().unwrap());
    let (r, body) = send(&site.client, req).await;
    assert_envelope(r.status(), &body, StatusCode::BAD_REQUEST, "BadUserInput");
    let echoed = r.headers().get(OPERATION_ID_HEADER).unwrap();
    assert_ne!(echoed, too_long.as_str(), "a fresh ID, never the raw value");
    assert_eq!(echoed.len(), 36, "a UUID");
}

#[tokio::test]
async fn tasks_need_a_session_and_the_local_site_answers_with_its_name_as_target() {
    let site = site(false).await;
    let (r, body) = send(
        &site.client,
        request(Method::GET, "/tasks", None, None, None),
    )
    .await;
    assert_envelope(
        r.status(),
        &body,
        StatusCode::UNAUTHORIZED,
        "NotAuthenticated",
    );
    assert_eq!(target(&r), None, "refused before any site was resolved");

    let svc = login(&site.client, "svc").await;
    let (r, created) = send(
        &site.client,
        request(
            Method::POST,
            "/tasks",
            Some(&svc),
            Some(json!({"user": "alice", "workflowInfo": {"type": "sync"}})),
            None,
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let alice = login(&site.client, "alice").await;
    for uri in [
        format!("/tasks/{id}"),
        format!("/tasks/{id}?site=site1"),
        format!("/tasks/{id}?site="),
    ] {
        let (r, body) = send(
            &site.client,
            request(Method::GET, &uri, Some(&alice), None, None),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{uri}: {body}");
        assert_eq!(body["id"], json!(id));
        assert_eq!(target(&r).as_deref(), Some("site1"), "{uri}");
    }
    let (r, list) = send(
        &site.client,
        request(Method::GET, "/tasks?limit=5", Some(&alice), None, None),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(list["total"], json!(1));
    assert_eq!(target(&r).as_deref(), Some("site1"));
    // A task that is not there: the error answer still names the site it was looked for at.
    let (r, body) = send(
        &site.client,
        request(
            Method::GET,
            "/tasks/00000000-0000-4000-8000-000000000000",
            Some(&alice),
            None,
            None,
        ),
    )
    .await;
    assert_envelope(r.status(), &body, StatusCode::NOT_FOUND, "TaskNotFound");
    assert_eq!(target(&r).as_deref(), Some("site1"));
}

#[tokio::test]
async fn unknown_sites_and_site_star_on_one_task_are_site_not_found() {
    let site = site(false).await;
    let alice = login(&site.client, "alice").await;
    let id = "00000000-0000-4000-8000-000000000001";
    for uri in [
        format!("/tasks/{id}?site=site9"),
        format!("/tasks/{id}?site=*"),
        format!("/tasks/{id}?site=SITE1"),
        "/tasks?site=site9".to_owned(),
    ] {
        let (r, body) = send(
            &site.client,
            request(Method::GET, &uri, Some(&alice), None, None),
        )
        .await;
        assert_envelope(r.status(), &body, StatusCode::NOT_FOUND, "SiteNotFound");
        assert_eq!(target(&r), None, "{uri}");
    }
    // `site=*` is a route for lists: with no peers, the local site alone.
    let (r, body) = send(
        &site.client,
        request(Method::GET, "/tasks?site=*", Some(&alice), None, None),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    assert_eq!(body["siteErrors"], json!([]));
    assert_eq!(target(&r).as_deref(), Some("*"));
}

#[tokio::test]
async fn a_peer_route_names_the_peer_and_needs_an_extended_session() {
    let site = site(true).await;
    let alice = login(&site.client, "alice").await;
    let id = "00000000-0000-4000-8000-000000000002";
    for (method, uri, body) in [
        (Method::GET, format!("/tasks/{id}?site=site2"), None),
        (Method::GET, "/tasks?site=site2".to_owned(), None),
        (
            Method::POST,
            "/tasks/poll?site=site2".to_owned(),
            Some(json!([id])),
        ),
    ] {
        let (r, answer) = send(
            &site.client,
            request(method, &uri, Some(&alice), body, None),
        )
        .await;
        assert_envelope(
            r.status(),
            &answer,
            StatusCode::UNAUTHORIZED,
            "RemoteAuthenticationFailure",
        );
        assert_eq!(target(&r).as_deref(), Some("site2"), "{uri}");
    }
    // Writes are never forwarded.
    let svc = login(&site.client, "svc").await;
    let (r, body) = send(
        &site.client,
        request(
            Method::POST,
            "/tasks?site=site2",
            Some(&svc),
            Some(json!({"user": "alice", "workflowInfo": {"type": "sync"}})),
            None,
        ),
    )
    .await;
    assert_envelope(r.status(), &body, StatusCode::BAD_REQUEST, "BadUserInput");
    // `/sites` lists the peer.
    let (r, sites) = send(
        &site.client,
        request(Method::GET, "/sites", Some(&alice), None, None),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let names: Vec<&str> = sites
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["site"].as_str())
        .collect();
    assert_eq!(names, ["site1", "site2"]);
}

#[tokio::test]
async fn the_peer_link_routes_only_what_a_peer_calls() {
    let site = site(true).await;
    // A multisite session for a user the peer vouches for: peer link only.
    let ask = json!({"user": "alice"});
    let (r, body) = send(
        &site.client,
        request(
            Method::POST,
            "/peer/sessions",
            None,
            Some(ask.clone()),
            None,
        ),
    )
    .await;
    assert_envelope(r.status(), &body, StatusCode::NOT_FOUND, "NotFound");
    let (r, body) = send(
        &site.peer,
        request(
            Method::POST,
            "/peer/sessions",
            None,
            Some(ask),
            Some("site2"),
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    assert_eq!(target(&r), None, "answered here, for the calling peer");
    let token = r
        .headers()
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_owned();
    // Reads work over the link with that session; a site other than this one is never
    // forwarded again (the loop guard).
    let (r, body) = send(
        &site.peer,
        request(Method::GET, "/tasks", Some(&token), None, Some("site2")),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    let (r, body) = send(
        &site.peer,
        request(
            Method::GET,
            "/tasks?site=site2",
            Some(&token),
            None,
            Some("site2"),
        ),
    )
    .await;
    assert_envelope(r.status(), &body, StatusCode::NOT_FOUND, "SiteNotFound");
    // Nothing else is routed on the peer link: no writes, no extension, no documents.
    for (method, uri) in [
        (Method::POST, "/tasks"),
        (Method::PATCH, "/tasks/00000000-0000-4000-8000-000000000003"),
    ] {
        let (r, body) = send(
            &site.peer,
            request(method, uri, Some(&token), Some(json!({})), Some("site2")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{uri}: {body}");
    }
    for uri in [
        "/sessions/extend",
        "/ui",
        "/openapi.json",
        "/sites",
        "/metrics",
        "/diagnostics/about",
    ] {
        let method = if uri == "/sessions/extend" {
            Method::POST
        } else {
            Method::GET
        };
        let (r, body) = send(
            &site.peer,
            request(method, uri, Some(&token), Some(json!({})), Some("site2")),
        )
        .await;
        assert_envelope(r.status(), &body, StatusCode::NOT_FOUND, "NotFound");
    }
    let (r, _) = send(
        &site.peer,
        request(Method::GET, "/healthz", None, None, Some("site2")),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK, "the probe's route");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_in_the_envelope() {
    let site = site(false).await;
    let svc = login(&site.client, "svc").await;
    let big = "x".repeat(LimitsConfig::default().max_body_bytes + 1);
    let (r, body) = send(
        &site.client,
        request(
            Method::POST,
            "/tasks",
            Some(&svc),
            Some(json!({"user": "alice", "workflowInfo": {"type": big}})),
            None,
        ),
    )
    .await;
    assert_envelope(
        r.status(),
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "BadUserInput",
    );
}
