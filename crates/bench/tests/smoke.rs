//! A quick run of the tool's core pieces, so `cargo test --workspace` exercises them without a
//! full benchmark: the load generator, closed and open loop, against the in-process limit
//! server, and the table those numbers make.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use sitegate_bench::limit::{self, FixedAnswer};
use sitegate_bench::load::{self, PooledClient, RequestTemplate, Workload};
use sitegate_bench::report;
use sitegate_bench::scenario::Row;

const BODY: &str =
    r#"{"id":"6f1d2d3e-0000-4000-8000-000000000001","user":"alice","state":"RUNNING"}"#;

async fn limit_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(limit::serve(
        listener,
        FixedAnswer {
            body: Bytes::from_static(BODY.as_bytes()),
            content_type: HeaderValue::from_static("application/json"),
        },
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_measures_the_limit_server() {
    let addr = limit_server().await;
    let client = PooledClient::new(addr, 8).expect("client");
    let answer = client
        .send(&RequestTemplate::get("/tasks/x"))
        .await
        .expect("one request");
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_eq!(answer.body, BODY.as_bytes());

    let workload = Workload::Cycle(Arc::from(vec![RequestTemplate::get("/tasks/x")]));
    client.prewarm(8).await.expect("prewarm");
    let closed = load::closed_loop(
        &client,
        &workload,
        8,
        Duration::from_millis(200),
        Duration::from_millis(800),
    )
    .await;
    assert_eq!(closed.errors, 0, "{:?}", closed.first_error);
    assert!(closed.ok > 100, "only {} requests in 0.8 s", closed.ok);
    assert_eq!(closed.latency.count(), closed.ok);
    let (p50, p99, p999) = (
        closed.latency.quantile(0.5),
        closed.latency.quantile(0.99),
        closed.latency.quantile(0.999),
    );
    assert!(
        p50 > Duration::ZERO && p50 <= p99 && p99 <= p999,
        "{p50:?} {p99:?} {p999:?}"
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(
        client.connections_opened() <= 9,
        "{}",
        client.connections_opened()
    );

    // An open loop at a modest rate gets about that rate, with sane latencies.
    let open = load::open_loop(
        &client,
        &workload,
        2_000.0,
        Duration::from_millis(100),
        Duration::from_millis(500),
    )
    .await
    .expect("open loop");
    assert_eq!(open.errors, 0, "{:?}", open.first_error);
    assert!(
        (700..=1_300).contains(&open.ok),
        "{} answers at 2,000/s over 0.5 s",
        open.ok
    );
    assert!(open.latency.quantile(0.5) < Duration::from_secs(2));

    let mut row = Row::new("limit", "limit: bare hyper", 8);
    row.closed = Some(closed);
    row.open = Some(open);
    let table = report::table(&[row]);
    assert!(table.contains("limit: bare hyper"), "{table}");
    assert!(table.contains("2,000 req/s"), "{table}");
}

#[tokio::test]
async fn failures_are_counted_not_hidden() {
    // A port nothing listens on: every request fails in transport.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    let client = PooledClient::new(addr, 2).expect("client");
    let workload = Workload::Cycle(Arc::from(vec![RequestTemplate::get("/")]));
    let result = load::closed_loop(
        &client,
        &workload,
        2,
        Duration::ZERO,
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(result.ok, 0);
    assert!(result.errors > 0);
    assert!(result.first_error.is_some());
}
