//! Micro-benchmarks of session lookup, the one store access every authenticated request makes
//! before its handler runs: the token's SHA-256 alone, the embedded store's lookup by that hash,
//! and the whole auth layer (`auth::authenticate` and the `Caller` extractor) for a valid and an
//! unknown token, against a store holding 10,000 sessions.
//!
//! The store keeps every session in memory precisely so this path costs no database read; these
//! figures show that it stays in the microsecond range and catch a change that puts I/O or a
//! lock back on it. The layer is private, so it is measured through the small router
//! `bench_support::auth_router` builds, beside a request without a token that gives the router's own cost.
//! Run with `cargo bench -p sitegate-gateway --bench gateway`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use rand::RngCore;
use sitegate_gateway::auth::hash_password;
use sitegate_gateway::bench_support::{self as auth, AUTH_HEADER};
use sitegate_model::session::{Role, UserEntry, UsersFile};
use sitegate_store::{now_millis, EmbeddedStore, SessionRecord, SessionStore, Store};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// A site with many logged-in users; the in-memory session map is sized by it.
const SESSIONS: usize = 10_000;

/// A token as `SessionManager` issues them: 256 random bits, URL-safe base64, 43 characters.
fn new_token() -> String {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// Everything the benchmarks share; the temporary directory lives as long as the store.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    router: Router,
    valid_token: String,
    unknown_token: String,
}

fn fixture(runtime: &Runtime) -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("the embedded store opens"));

    // Inserted concurrently so the writer's group commit makes seeding take seconds, not one
    // fsync per session.
    let tokens: Vec<String> = (0..SESSIONS).map(|_| new_token()).collect();
    runtime.block_on(async {
        let now = now_millis();
        let mut inserts = JoinSet::new();
        for (i, token) in tokens.iter().enumerate() {
            let store = store.clone();
            let record = SessionRecord {
                token_hash: auth::token_hash(token),
                user: format!("user{:04}", i % 500),
                roles: vec![Role::User],
                created: now,
                last_seen: now,
                extensions: Vec::new(),
                bound_peer: None,
            };
            inserts.spawn(async move { store.create_session(record).await });
        }
        while let Some(done) = inserts.join_next().await {
            done.expect("the insert task ran")
                .expect("the session is stored");
        }
        let count = store.count_sessions().await.expect("sessions are counted");
        assert_eq!(count, SESSIONS as u64, "every session was stored");
    });

    let users = UsersFile {
        users: vec![UserEntry {
            name: "alice".to_owned(),
            roles: vec![Role::User],
            password_hash: hash_password("bench-password").expect("a password hashes"),
            org: None,
        }],
    };
    // Long enough that no session expires, and none is due a `last_seen` touch, while the
    // benchmarks run: the hit path measured is the common one, a pure read.
    let router = auth::auth_router(
        store.clone() as Arc<dyn Store>,
        users,
        Duration::from_secs(8 * 3600),
        Duration::from_secs(24 * 3600),
    )
    .expect("the users file is valid");

    Fixture {
        _dir: dir,
        store,
        router,
        valid_token: tokens[SESSIONS / 2].clone(),
        unknown_token: new_token(),
    }
}

fn request(path: &str, token: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(path);
    if let Some(token) = token {
        builder = builder.header(AUTH_HEADER, token);
    }
    builder.body(Body::empty()).expect("a valid request")
}

fn session_lookup(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let fx = fixture(&runtime);
    let mut group = c.benchmark_group("session_lookup");

    group.bench_function("token_hash", |b| {
        b.iter(|| auth::token_hash(black_box(&fx.valid_token)))
    });

    group.bench_function("store_get_session_hit", |b| {
        b.to_async(&runtime).iter(|| async {
            let hash = auth::token_hash(black_box(&fx.valid_token));
            let found = fx.store.get_session(hash).await.expect("the store answers");
            assert!(found.is_some());
        })
    });
    group.bench_function("store_get_session_miss", |b| {
        b.to_async(&runtime).iter(|| async {
            let hash = auth::token_hash(black_box(&fx.unknown_token));
            let found = fx.store.get_session(hash).await.expect("the store answers");
            assert!(found.is_none());
        })
    });

    // The router's own cost, to subtract from the two below.
    group.bench_function("auth_layer_no_token", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = fx
                .router
                .clone()
                .oneshot(request("/open", None))
                .await
                .expect("the router answers");
            assert_eq!(response.status(), StatusCode::OK);
        })
    });
    group.bench_function("auth_layer_hit", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = fx
                .router
                .clone()
                .oneshot(request("/whoami", Some(&fx.valid_token)))
                .await
                .expect("the router answers");
            assert_eq!(response.status(), StatusCode::OK);
        })
    });
    group.bench_function("auth_layer_miss", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = fx
                .router
                .clone()
                .oneshot(request("/whoami", Some(&fx.unknown_token)))
                .await
                .expect("the router answers");
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        })
    });
    group.finish();
}

criterion_group!(benches, session_lookup);
criterion_main!(benches);
