//! Hostile input and connection limits, against a real `sitegate serve` process over real
//! sockets: reqwest where a well-behaved client can say it, raw TCP where only a hostile one
//! would. Every malformed, oversized or too slow request is refused with the error envelope
//! (or, where hyper refuses it while parsing, with hyper's bare status), the server goes on
//! serving everyone else, nothing changes in the store, and nothing hostile is reflected.
//!
//! Each test runs its own site with short limits (1 s to send a request head, 2 s per
//! request), so the timing tests take about that long and no test sleeps for a fixed time
//! to wait for something.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::site as support;
use support::{assert_envelope, id_of, is_uuid, new_task, Federation, Reply, Site};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `limits.header_read_timeout_secs` of the test sites.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// `limits.request_timeout_secs` of the test sites.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// What a timed limit may overrun by on a loaded machine before the test calls it broken.
const SLACK: Duration = Duration::from_secs(3);
/// The default `limits.max_header_bytes`.
const MAX_HEADER_BYTES: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// Harness

/// A client that opens a new connection per request: the test sites close idle connections
/// after a second, and a pooled connection closing under a request would fail the test for
/// the wrong reason.
fn unpooled_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// One site named `site1` with short time limits and `extra` settings (`LIMITS__KEY`, value).
async fn hostile_site(extra: &[(&str, &str)]) -> (Federation, Site) {
    let fed = Federation::init(&["site1"]);
    let mut site = fed.site("site1");
    site.client = unpooled_client();
    let mut env = vec![
        (
            "LIMITS__HEADER_READ_TIMEOUT_SECS",
            HEAD_TIMEOUT.as_secs().to_string(),
        ),
        (
            "LIMITS__REQUEST_TIMEOUT_SECS",
            REQUEST_TIMEOUT.as_secs().to_string(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    for (key, value) in env {
        site.env.push((format!("SITEGATE_{key}"), value));
    }
    site.start().await;
    (fed, site)
}

/// The server still answers a new client, and still reads its store.
async fn assert_alive(site: &Site, token: &str) {
    site.get("/healthz", None).await.expect(200, None);
    site.get("/tasks?limit=1", Some(token))
        .await
        .expect(200, None);
}

/// Asserts an envelope answer: status, code, a fresh (generated) operation ID, and a body
/// that does not grow with the input.
fn assert_refused(r: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_envelope(&r.body, code);
    assert!(
        r.text.len() < 1500,
        "{what}: the answer echoes too much ({} bytes): {}",
        r.text.len(),
        r.text
    );
    let op = r.operation_id();
    assert!(is_uuid(&op), "{what}: operationID {op:?}");
}

async fn task_total(site: &Site, admin: &str) -> i64 {
    let r = site.get("/tasks?limit=0", Some(admin)).await;
    support::int(r.expect(200, None), "total")
}

/// An answer read off a raw socket.
#[derive(Debug)]
struct Raw {
    /// 0 when the connection ended without an answer.
    status: u16,
    head: String,
    body: String,
    /// How reading ended.
    ending: Ending,
    /// From the start of reading to its end.
    elapsed: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The server closed the connection.
    Closed,
    /// The connection was reset.
    Reset,
    /// Still open when the reader gave up.
    Open,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn envelope(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

/// Reads until the server closes the connection, resets it, or `limit` passes.
async fn read_to_end(stream: &mut TcpStream, limit: Duration) -> Raw {
    let started = Instant::now();
    let until = tokio::time::Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let ending = loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break Ending::Closed,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break Ending::Reset,
            Err(_) => break Ending::Open,
        }
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map_or((text.clone(), String::new()), |(h, b)| {
            (h.to_owned(), b.to_owned())
        });
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head,
        body,
        ending,
        elapsed: started.elapsed(),
    }
}

async fn connect(site: &Site) -> TcpStream {
    TcpStream::connect(("127.0.0.1", site.port))
        .await
        .expect("connect to the site")
}

/// Sends `request` on a new connection and reads everything the server says until it closes
/// the connection. A write error is ignored: the server may answer and close before it has
/// read everything, and the answer is what is tested.
async fn exchange(site: &Site, request: &[u8]) -> Raw {
    let mut stream = connect(site).await;
    let _ = stream.write_all(request).await;
    read_to_end(&mut stream, Duration::from_secs(10)).await
}

/// Sends `request` and reads exactly one answer (head and `Content-Length` body), leaving the
/// connection open.
async fn one_answer(stream: &mut TcpStream, request: &[u8]) -> (u16, String) {
    stream.write_all(request).await.expect("write the request");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                return (status, text);
            }
        }
        let n = tokio::time::timeout_at(until, stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read the answer");
        assert!(n > 0, "connection closed mid-answer: {text}");
        bytes.extend_from_slice(&buf[..n]);
    }
}

fn get_request(path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra_headers}Connection: close\r\n\r\n")
        .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Query strings

/// Every query parameter of the task reads, with wrong types, out-of-range and huge values,
/// unknown names and sort fields, and `site` values built to escape or confuse: each is
/// refused with the envelope and a bounded message, and never falls back to the local store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_query_parameters_are_refused_with_the_envelope() {
    let (_fed, site) = hostile_site(&[]).await;
    let svc = site.login("svc").await;
    let alice = site.login("alice").await;
    let admin = site.login("admin").await;
    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let id = id_of(&task);
    let long = "s".repeat(5000);
    let many_ids = vec![uuid::Uuid::new_v4().to_string(); 1001].join(",");

    let mut bad_input: Vec<String> = [
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=1e3",
        "limit=0x10",
        "limit=",
        "limit",
        "limit=%205",
        "limit=5%00",
        "limit=99999999999999999999999",
        "offset=-1",
        "offset=abc",
        "offset=9223372036854775808",
        "offset=18446744073709551616",
        "startTimeBefore=-1",
        "startTimeBefore=yesterday",
        "startTimeAfter=1e10",
        "endTimeBefore=9223372036854775808",
        "endTimeAfter=%00",
        "state=DONE",
        "state=running",
        "state=",
        "state=RUNNING,",
        "sort=bogus",
        "sort=",
        "sort=-",
        "sort=--startTime",
        "sort=startTime,startTime",
        "sort=id;DROP%20TABLE%20tasks",
        "sort=%00",
        "ids=not-a-uuid",
        "ids=zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
        "type=sync%00",
        "resourceId=a%0Ab",
        "resourceName=a%0D%0ASet-Cookie:%20x",
        "limit=1&limit=2",
        "site=site1&site=site1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    bad_input.push(format!("sort={long}"));
    bad_input.push(format!("type={}", "t".repeat(300)));
    bad_input.push(format!("ids={many_ids}"));
    for query in &bad_input {
        let r = site.get(&format!("/tasks?{query}"), Some(&alice)).await;
        assert_refused(&r, 400, "BadUserInput", &format!("GET /tasks?{query}"));
        assert!(!r.text.contains(&long), "{query}: echoed in full");
    }
    // Unknown names, however odd, are ignored as the original API ignores them: the answer
    // is the plain list, and nothing of the name comes back.
    let plain = site
        .get("/tasks", Some(&alice))
        .await
        .expect(200, None)
        .clone();
    for query in [
        "stat=RUNNING",
        "LIMIT=5",
        "=5",
        "%FF=1",
        &format!("{long}=1"),
    ] {
        let r = site.get(&format!("/tasks?{query}"), Some(&alice)).await;
        assert_eq!(r.status, 200, "GET /tasks?{query}: {}", r.text);
        assert_eq!(r.body, plain, "GET /tasks?{query}");
    }
    // A user filter is for administrators; a malformed one is malformed for them too.
    let r = site.get("/tasks?user=bob", Some(&alice)).await;
    assert_refused(&r, 403, "Forbidden", "user filter by a non-admin");
    let r = site.get("/tasks?user=bad%20name", Some(&admin)).await;
    assert_refused(&r, 400, "BadUserInput", "malformed user filter");

    // `site` values with path characters, NUL, other scripts, direction overrides, case or
    // whitespace variants of the local name, and thousands of characters: unknown sites, never
    // the local one.
    let mut sites: Vec<String> = [
        "..%2F..%2Fetc%2Fpasswd",
        "../",
        "/",
        "%2F",
        "%00",
        "site1%00",
        "site1%2F..",
        "site1%20",
        "SITE1",
        "%E3%82%B5%E3%82%A4%E3%83%88",
        "%E2%80%AE1etis",
        "%FF%FE",
        "site1%0D%0ASet-Cookie:%20x",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    sites.push(long.clone());
    for s in &sites {
        for (method, path) in [
            (Method::GET, format!("/tasks?site={s}")),
            (Method::GET, format!("/tasks/{id}?site={s}")),
            (Method::POST, format!("/tasks/poll?site={s}")),
        ] {
            let body = (method == Method::POST).then(|| json!([id]));
            let r = site
                .call(method.clone(), &path, Some(&alice), body.as_ref())
                .await;
            assert_refused(&r, 404, "SiteNotFound", &format!("{method} {path}"));
            assert!(!r.text.contains(&long), "{path}: echoed in full");
            assert!(
                r.header("Set-Cookie").is_none(),
                "{path}: a header was injected"
            );
        }
    }
    // Endpoints that take only `site` ignore other names (as the original API does) but not
    // a second `site`.
    for (query, status) in [
        ("sites=site1", 200),
        ("site=site1&limit=1", 200),
        ("site=site1&site=site1", 400),
    ] {
        let r = site
            .get(&format!("/tasks/{id}?{query}"), Some(&alice))
            .await;
        let r2 = site
            .post(&format!("/tasks/poll?{query}"), Some(&alice), &json!([id]))
            .await;
        if status == 400 {
            assert_refused(
                &r,
                400,
                "BadUserInput",
                &format!("GET /tasks/{{id}}?{query}"),
            );
            assert_refused(
                &r2,
                400,
                "BadUserInput",
                &format!("POST /tasks/poll?{query}"),
            );
        } else {
            assert_eq!(r.status, 200, "GET /tasks/{{id}}?{query}: {}", r.text);
            assert_eq!(r.body["id"], json!(id));
            assert_eq!(r2.status, 200, "POST /tasks/poll?{query}: {}", r2.text);
        }
    }

    // Extreme but valid values are answered, not failed with a 500.
    let ids_1000 = vec![id.clone(); 1000].join(",");
    let states = ["RUNNING", "FAILED"].repeat(3000).join(",");
    for (query, want_items) in [
        ("limit=5000".to_owned(), 1),
        ("offset=9223372036854775807".to_owned(), 0),
        ("startTimeBefore=9223372036854775807".to_owned(), 1),
        ("endTimeAfter=0&startTimeAfter=0".to_owned(), 0),
        (format!("state={states}"), 1),
        (format!("ids={ids_1000}"), 1),
        ("limit=0".to_owned(), 0),
    ] {
        let r = site.get(&format!("/tasks?{query}"), Some(&alice)).await;
        let body = r.expect(200, None);
        let items = body["items"].as_array().map_or(usize::MAX, Vec::len);
        assert_eq!(
            items,
            want_items,
            "GET /tasks?{}: {body}",
            &query[..40.min(query.len())]
        );
    }

    // Nothing changed.
    assert_eq!(task_total(&site, &admin).await, 1);
    assert_eq!(site.task(&id, &admin).await, task);
    assert_alive(&site, &alice).await;
}

// ---------------------------------------------------------------------------------------------
// Path segments

/// Task IDs that are not canonical UUIDs, path segments that try to climb out of their route,
/// and site names in paths: each refused with the envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_path_segments_are_refused_with_the_envelope() {
    let (_fed, site) = hostile_site(&[]).await;
    let svc = site.login("svc").await;
    let alice = site.login("alice").await;
    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let id = id_of(&task);
    let simple = id.replace('-', "");

    let long = "x".repeat(10_000);
    let ids: Vec<String> = vec![
        "not-a-uuid".into(),
        "%00".into(),
        "..%2F..%2Fetc%2Fpasswd".into(),
        format!("{id}%2F.."),
        format!("{id}%00"),
        format!("%7B{id}%7D"),
        format!("urn:uuid:{id}"),
        simple,
        "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz".into(),
        "%E2%80%AE".into(),
        "%FF%FE".into(),
        long.clone(),
    ];
    for bad in &ids {
        let path = format!("/tasks/{bad}");
        let r = site.get(&path, Some(&alice)).await;
        assert_refused(&r, 400, "BadUserInput", &format!("GET {path}"));
        assert!(!r.text.contains(&long), "{path}: echoed in full");
        let r = site
            .patch(&path, Some(&svc), &json!({"progress": 50}))
            .await;
        assert_refused(&r, 400, "BadUserInput", &format!("PATCH {path}"));
    }

    // Dot segments a client would normalise away, sent raw: no route, and never the route
    // they point at.
    let token = format!("X-VCAV-Auth: {alice}\r\n");
    for path in [
        "/tasks/../sessions",
        "/tasks/%2e%2e/sessions",
        "/tasks/./../healthz",
        "//sessions",
    ] {
        let r = exchange(&site, &get_request(path, &token)).await;
        assert_eq!(r.status, 404, "GET {path}: {r:?}");
        assert_envelope(&r.envelope(), "NotFound");
    }

    // Site names in paths.
    for bad in ["..%2F..", "%00", "site1%00", "sit%C3%A9", long.as_str()] {
        let r = site.get(&format!("/sites/{bad}"), Some(&alice)).await;
        assert_refused(&r, 404, "SiteNotFound", &format!("GET /sites/{bad}"));
        let r = site.delete(&format!("/sessions/{bad}"), Some(&alice)).await;
        assert_refused(&r, 404, "SiteNotFound", &format!("DELETE /sessions/{bad}"));
    }
    // Not UTF-8 once decoded.
    let r = site.get("/sites/%FF", Some(&alice)).await;
    assert_refused(&r, 400, "BadUserInput", "GET /sites/%FF");

    // The session survived every refused call, and the task is untouched.
    site.get("/sessions", Some(&alice)).await.expect(200, None);
    let admin = site.login("admin").await;
    assert_eq!(site.task(&id, &admin).await, task);
    assert_alive(&site, &alice).await;
}

// ---------------------------------------------------------------------------------------------
// Bodies

async fn send_raw_body(site: &Site, method: Method, path: &str, token: &str, body: &[u8]) -> Reply {
    support::send(
        site.request(method, path)
            .header("X-VCAV-Auth", token)
            .header("Content-Type", "application/json")
            .body(body.to_vec()),
    )
    .await
}

/// JSON bodies that are truncated, deeply nested, of the wrong shape or not UTF-8, for every
/// endpoint that takes one: each is refused with the envelope, and no task is created or
/// changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_bodies_change_nothing() {
    let (_fed, site) = hostile_site(&[]).await;
    let svc = site.login("svc").await;
    let alice = site.login("alice").await;
    let admin = site.login("admin").await;
    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let id = id_of(&task);
    let path = format!("/tasks/{id}");

    let deep_arrays = "[".repeat(100_000);
    let deep_objects = "{\"a\":".repeat(100_000);
    let balanced = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let many_ids = serde_json::to_string(&vec![id.clone(); 1001]).expect("json");
    let common: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"[\"".to_vec(),
        b"{\"user\":".to_vec(),
        b"null".to_vec(),
        b"1".to_vec(),
        b"\"x\"".to_vec(),
        b"not json".to_vec(),
        b"\xEF\xBB\xBF{}".to_vec(),
        b"[\"\xFF\xFE\"]".to_vec(),
        b"{\"progress\":\xFF}".to_vec(),
        b"{} trailing".to_vec(),
        deep_arrays.into_bytes(),
        deep_objects.into_bytes(),
        balanced.into_bytes(),
    ];

    // POST /tasks/poll: an array of task ID strings, at most 1000.
    let mut poll_bodies = common.clone();
    for b in [
        "{}",
        "[1,2]",
        "[null]",
        "[[]]",
        "[{}]",
        "[\"not-a-uuid\"]",
        "[\"\\u0000\"]",
        &many_ids,
    ] {
        poll_bodies.push(b.as_bytes().to_vec());
    }
    for body in &poll_bodies {
        let r = send_raw_body(&site, Method::POST, "/tasks/poll", &alice, body).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        assert_refused(&r, 400, "BadUserInput", &format!("poll body {shown:?}"));
    }

    // POST /tasks: the new task's fields.
    let long = "u".repeat(10_000);
    let mut create_bodies = common.clone();
    for b in [
        json!({}),
        json!({"user": "alice"}),
        json!({"user": "", "workflowInfo": {"type": "t"}}),
        json!({"user": "al\u{0}ice", "workflowInfo": {"type": "t"}}),
        json!({"user": long, "workflowInfo": {"type": "t"}}),
        json!({"user": "alice", "workflowInfo": {"type": "t".repeat(300)}}),
        json!({"user": "alice", "workflowInfo": {"type": "a\nb"}}),
        json!({"user": "alice", "workflowInfo": "t"}),
        json!({"user": 1, "workflowInfo": {"type": "t"}}),
        json!({"user": "alice", "workflowInfo": {"type": "t"}, "id": "not-a-uuid"}),
        json!({"user": "alice", "workflowInfo": {"type": "t"}, "id": 7}),
        json!({"user": "alice", "workflowInfo": {"type": "t"}, "state": "SUCCEEDED"}),
        // The ID of an existing task with a different body.
        json!({"user": "bob", "workflowInfo": {"type": "t"}, "id": id}),
    ] {
        create_bodies.push(b.to_string().into_bytes());
    }
    for body in &create_bodies {
        let r = send_raw_body(&site, Method::POST, "/tasks", &svc, body).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        assert_refused(&r, 400, "BadUserInput", &format!("create body {shown:?}"));
    }

    // PATCH /tasks/{id}: progress, state, result, warnings, error.
    let nested_result = format!(
        "{{\"state\":\"SUCCEEDED\",\"resultType\":\"json\",\"result\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut patch_bodies = common.clone();
    patch_bodies.push(nested_result.into_bytes());
    for b in [
        // serde reads a struct from an array of its fields too: an empty patch, progress 50.
        "[]",
        "[50]",
        "{\"progress\":\"50\"}",
        "{\"progress\":101}",
        "{\"progress\":-1}",
        "{\"progress\":1.5}",
        "{\"progress\":1e309}",
        "{\"progress\":18446744073709551616}",
        "{\"state\":\"DONE\"}",
        "{\"state\":\"succeeded\"}",
        "{\"state\":null,\"progress\":{}}",
        "{\"warnings\":[1]}",
        "{\"warnings\":{}}",
        "{\"state\":\"FAILED\",\"error\":\"x\"}",
        "{\"progress\":5,\"colour\":\"red\"}",
    ] {
        patch_bodies.push(b.as_bytes().to_vec());
    }
    let too_many_warnings = json!({
        "warnings": vec![json!({"code": "W", "msg": "m", "args": [], "stacktrace": ""}); 101]
    });
    patch_bodies.push(too_many_warnings.to_string().into_bytes());
    let long_result_type =
        json!({"state": "SUCCEEDED", "resultType": "r".repeat(300), "result": 1});
    patch_bodies.push(long_result_type.to_string().into_bytes());
    for body in &patch_bodies {
        let r = send_raw_body(&site, Method::PATCH, &path, &svc, body).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        assert_refused(&r, 400, "BadUserInput", &format!("patch body {shown:?}"));
    }

    // POST /sessions: the login body.
    for body in [
        b"{\"type\":\"localUser\",".to_vec(),
        "[".repeat(100_000).into_bytes(),
        json!({"type": "localUser", "localUser": ["alice"], "localPassword": "x"})
            .to_string()
            .into_bytes(),
        // Right credentials in the shape of an array: serde would read the tagged login
        // from it, tag first.
        json!(["localUser", "alice", support::PASSWORD])
            .to_string()
            .into_bytes(),
    ] {
        let r = support::send(
            site.request(Method::POST, "/sessions")
                .header("Content-Type", "application/json")
                .body(body),
        )
        .await;
        assert_refused(&r, 400, "BadUserInput", "login body");
        assert!(r.header("X-VCAV-Auth").is_none(), "a session was issued");
    }
    // Hostile but well-formed credentials are just wrong credentials.
    for (user, password) in [
        ("a".repeat(100_000), "x".to_owned()),
        ("al\u{0}ice".to_owned(), support::PASSWORD.to_owned()),
        ("alice".to_owned(), "p".repeat(200_000)),
    ] {
        let r = site.try_login(&user, &password).await;
        assert!(
            matches!(r.status, 400 | 401),
            "login as {:?}: {r:?}",
            &user[..user.len().min(10)]
        );
        let code = if r.status == 400 {
            "BadUserInput"
        } else {
            "NotAuthenticated"
        };
        assert_refused(&r, r.status, code, "hostile credentials");
        assert!(r.header("X-VCAV-Auth").is_none(), "a session was issued");
    }

    // Nothing was created or changed.
    assert_eq!(task_total(&site, &admin).await, 1);
    assert_eq!(site.task(&id, &admin).await, task);
    assert_alive(&site, &alice).await;
}

/// Bodies larger than `limits.max_body_bytes`, declared or streamed, get 413 without being
/// read to the end; a body that arrives too slowly gets 408; neither changes the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_slow_bodies_get_413_and_408() {
    let (_fed, site) = hostile_site(&[]).await;
    let svc = site.login("svc").await;
    let alice = site.login("alice").await;
    let admin = site.login("admin").await;
    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let id = id_of(&task);

    // A declared length over the limit is answered at once, without waiting for the body.
    for (method, path, token) in [
        ("PATCH", format!("/tasks/{id}"), &svc),
        ("POST", "/tasks".to_owned(), &svc),
        ("POST", "/tasks/poll".to_owned(), &alice),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{{"
        );
        let started = Instant::now();
        let r = exchange(&site, request.as_bytes()).await;
        assert_eq!(r.status, 413, "{method} {path} declaring 50 MB: {r:?}");
        assert_envelope(&r.envelope(), "BadUserInput");
        assert!(
            started.elapsed() < REQUEST_TIMEOUT,
            "413 only after {:?}",
            started.elapsed()
        );
        assert!(is_uuid(&r.header("operationID").unwrap_or_default()));
    }
    // The same with `Expect: 100-continue`: refused before the client is told to go on.
    let request = format!(
        "PATCH /tasks/{id} HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {svc}\r\n\
         Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
    );
    let r = exchange(&site, request.as_bytes()).await;
    assert_eq!(r.status, 413, "with Expect: 100-continue: {r:?}");

    // About 2 MiB streamed in chunks, with no length declared: refused once the limit is
    // passed. The server stops reading there and may reset the connection under the rest of
    // the upload, so the whole request is written before reading.
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "[".repeat(64 * 1024));
    let mut request = format!(
        "PATCH /tasks/{id} HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {svc}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..32 {
        request.extend_from_slice(chunk.as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let r = exchange(&site, &request).await;
    assert_eq!(r.status, 413, "2 MiB chunked: {r:?}");
    assert_envelope(&r.envelope(), "BadUserInput");

    // A body that never finishes: 408 when the request's time is up, and the connection is
    // closed; other clients are served meanwhile.
    let mut slow = connect(&site).await;
    let head = format!(
        "PATCH /tasks/{id} HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {svc}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"progress\":"
    );
    slow.write_all(head.as_bytes()).await.expect("write");
    let started = Instant::now();
    let others = Instant::now();
    assert_alive(&site, &alice).await;
    assert!(
        others.elapsed() < REQUEST_TIMEOUT,
        "others waited {:?} for a slow body",
        others.elapsed()
    );
    let r = read_to_end(&mut slow, REQUEST_TIMEOUT + SLACK).await;
    let waited = started.elapsed();
    assert_eq!(r.status, 408, "slow body: {r:?}");
    assert_envelope(&r.envelope(), "BadUserInput");
    assert_eq!(r.ending, Ending::Closed, "the connection is closed: {r:?}");
    assert!(
        waited >= REQUEST_TIMEOUT - Duration::from_millis(300) && waited < REQUEST_TIMEOUT + SLACK,
        "408 after {waited:?}"
    );
    assert!(is_uuid(&r.header("operationID").unwrap_or_default()));

    assert_eq!(site.task(&id, &admin).await, task);
    assert_eq!(task_total(&site, &admin).await, 1);
    assert_alive(&site, &alice).await;
}

// ---------------------------------------------------------------------------------------------
// Headers

/// Headers over `limits.max_header_bytes` get 431 with the envelope; heads over hyper's own
/// cap, or with more headers than it parses, get hyper's bare 431; hostile values in headers
/// the server reads are refused or ignored, never a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let (_fed, site) = hostile_site(&[]).await;
    let alice = site.login("alice").await;

    // One large header, and many medium ones, over the limit: our 431.
    let one_large = vec![("X-Pad".to_owned(), "a".repeat(MAX_HEADER_BYTES + 100))];
    let many: Vec<(String, String)> = (0..60)
        .map(|i| (format!("X-Pad-{i}"), "b".repeat(400)))
        .collect();
    for (what, headers) in [("one large header", one_large), ("60 headers", many)] {
        let mut rb = site
            .request(Method::GET, "/tasks")
            .header("X-VCAV-Auth", alice.clone());
        for (name, value) in headers {
            rb = rb.header(name, value);
        }
        let r = support::send(rb).await;
        assert_refused(&r, 431, "BadUserInput", what);
        assert_eq!(
            r.body["args"],
            json!([MAX_HEADER_BYTES.to_string()]),
            "{what}"
        );
    }
    // Just under the limit is fine.
    let r = support::send(
        site.request(Method::GET, "/tasks")
            .header("X-VCAV-Auth", alice.clone())
            .header("X-Pad", "c".repeat(MAX_HEADER_BYTES - 1000)),
    )
    .await;
    r.expect(200, None);

    // Huge or malformed values in headers the server reads.
    let r = site.get("/sessions", Some(&"t".repeat(15_000))).await;
    assert_refused(&r, 401, "NotAuthenticated", "a 15 KB token");
    for (name, value) in [
        ("traceparent", "00-zzzz-zzzz-01".to_owned()),
        (
            "traceparent",
            format!("00-{}-{}-01", "f".repeat(5000), "0".repeat(16)),
        ),
        ("tracestate", "k=".repeat(3000)),
        ("baggage", "k=v,".repeat(3000)),
        (
            "Accept",
            format!("application/vnd.vmware.h4-v{}+json", "9".repeat(5000)),
        ),
        ("Accept", "*/*;q=".repeat(2000)),
    ] {
        let r = support::send(
            site.request(Method::GET, "/sessions")
                .header("X-VCAV-Auth", alice.clone())
                .header(name, value),
        )
        .await;
        assert_eq!(r.status, 200, "{name} of {} bytes: {r:?}", r.text.len());
    }

    // Beyond hyper's own cap on a head (a backstop well above the limit): hyper's bare 431.
    let huge = get_request("/healthz", &format!("X-Pad: {}\r\n", "d".repeat(200_000)));
    let r = exchange(&site, &huge).await;
    assert_eq!(r.status, 431, "a 200 KB head: {r:?}");
    // More headers than hyper parses (100): hyper's bare 431.
    let lots: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = exchange(&site, &get_request("/healthz", &lots)).await;
    assert_eq!(r.status, 431, "150 headers: {r:?}");
    // A request line longer than hyper accepts: hyper's bare 414.
    let r = exchange(
        &site,
        &get_request(&format!("/tasks?site={}", "e".repeat(70_000)), ""),
    )
    .await;
    assert_eq!(r.status, 414, "a 70 KB request line: {r:?}");
    // A long one it accepts reaches the parsers: the envelope.
    let r = site
        .get(&format!("/tasks?site={}", "f".repeat(40_000)), Some(&alice))
        .await;
    assert_refused(&r, 404, "SiteNotFound", "a 40 KB site");

    assert_alive(&site, &alice).await;
}

/// An `operationID` that is huge, not visible ASCII, or carries control characters is refused
/// (by us with the envelope, or by hyper's parser with a bare 400) and is never reflected in
/// the answer's headers or body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_operation_ids_are_never_reflected() {
    let (_fed, site) = hostile_site(&[]).await;
    let alice = site.login("alice").await;

    let with_op = |op: reqwest::header::HeaderValue| {
        site.request(Method::GET, "/sessions")
            .header("X-VCAV-Auth", alice.clone())
            .header("operationID", op)
    };
    let hostile: Vec<Vec<u8>> = vec![
        b"x".repeat(129),
        b"y".repeat(10_000),
        b"z".repeat(MAX_HEADER_BYTES + 500),
        b"a\tb".to_vec(),
        b"has space".to_vec(),
        b"op-\xFF\xFE-id".to_vec(),
        "op-\u{202E}di".as_bytes().to_vec(),
    ];
    for op in &hostile {
        let value = reqwest::header::HeaderValue::from_bytes(op).expect("a sendable value");
        let r = support::send(with_op(value)).await;
        let shown = String::from_utf8_lossy(&op[..op.len().min(20)]).into_owned();
        assert_refused(&r, 400, "BadUserInput", &format!("operationID {shown:?}"));
        let echoed = r.operation_id();
        assert_ne!(echoed.as_bytes(), op.as_slice());
        let needle = String::from_utf8_lossy(&op[..op.len().min(64)]).into_owned();
        assert!(
            !r.text.contains(&needle),
            "reflected in the body: {}",
            r.text
        );
    }

    // Control characters only a raw client sends. hyper refuses most while parsing (a bare
    // 400); whatever passes the parser is refused by us. Either way no answer reflects it.
    for value in [
        &b"xyz\x01def"[..],
        b"xyz\x7Fdef",
        b"xyz\x00def",
        b"xyz\x1B[31mred",
        b"xyz\rdef",
        b"xyz\r\n folded",
    ] {
        let mut request = b"GET /healthz HTTP/1.1\r\nHost: x\r\noperationID: ".to_vec();
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let r = exchange(&site, &request).await;
        assert_eq!(r.status, 400, "operationID {value:?}: {r:?}");
        if let Some(op) = r.header("operationID") {
            assert!(is_uuid(&op), "operationID {value:?} answered with {op:?}");
        }
        // `xyz` is not hex, so no generated operation ID can contain it by chance.
        assert!(!r.head.contains("xyz") && !r.body.contains("xyz"), "{r:?}");
    }
    // A bare LF ends the header line (RFC 9112 allows it): what follows is another header,
    // never one of the answer's.
    let r = exchange(
        &site,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\noperationID: op-1\nSet-Cookie: evil=1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("operationID").as_deref(), Some("op-1"), "{r:?}");
    assert!(!r.head.to_ascii_lowercase().contains("set-cookie"), "{r:?}");

    assert_alive(&site, &alice).await;
}

// ---------------------------------------------------------------------------------------------
// Malformed HTTP

/// Requests hyper's parser refuses get its bare 400 and the connection is closed; the server
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_a_bare_400_and_the_server_keeps_serving() {
    let (_fed, site) = hostile_site(&[]).await;
    let alice = site.login("alice").await;

    let cases: [&[u8]; 13] = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX Bad: a\r\n\r\n",
        b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /heal\x01thz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /tasks/poll HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /tasks/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ];
    for request in cases {
        let r = exchange(&site, request).await;
        assert_eq!(
            r.status,
            400,
            "{:?}: {r:?}",
            String::from_utf8_lossy(request)
        );
        assert_ne!(r.ending, Ending::Open, "left open: {r:?}");
    }
    // An unsupported version.
    let r = exchange(&site, b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 400, "HTTP/9.9: {r:?}");

    // Both a length and chunked framing (request smuggling): hyper reads the body as chunked
    // and closes the connection after the answer, so the request hidden after the body is
    // never served.
    let smuggle = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = exchange(&site, smuggle).await;
    assert_eq!(r.status, 405, "smuggling: {r:?}");
    assert_envelope(&r.envelope(), "BadUserInput");
    assert_eq!(r.ending, Ending::Closed, "smuggling: {r:?}");
    assert!(
        !r.body.contains("HTTP/1.1"),
        "the hidden request was served: {r:?}"
    );

    // A malformed chunked body passes the parser, so it is ours to refuse.
    let request = format!(
        "POST /tasks/poll HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {alice}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n[]\r\n0\r\n\r\n"
    );
    let r = exchange(&site, request.as_bytes()).await;
    assert_eq!(r.status, 400, "bad chunk size: {r:?}");
    assert_envelope(&r.envelope(), "BadUserInput");

    assert_alive(&site, &alice).await;
}

// ---------------------------------------------------------------------------------------------
// Slow and idle connections

/// A client that does not finish its request head within `limits.header_read_timeout_secs`
/// gets 408 with the envelope and is disconnected, whether it stops or drips a byte at a
/// time; one that sends nothing, or part of the HTTP/2 preface, is disconnected; an idle
/// keep-alive connection is closed quietly. Other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_get_408_and_idle_connections_close() {
    let (_fed, site) = hostile_site(&[]).await;
    let alice = site.login("alice").await;
    let limit = HEAD_TIMEOUT + SLACK;

    let stalled = async {
        let mut s = connect(&site).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Part")
            .await
            .expect("write");
        read_to_end(&mut s, limit).await
    };
    let dripping = async {
        let mut s = connect(&site).await;
        let started = Instant::now();
        let mut interval = tokio::time::interval(Duration::from_millis(100));
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Drip: ".iter();
        for byte in head.chain(std::iter::repeat(&b'd')) {
            interval.tick().await;
            if s.write_all(&[*byte]).await.is_err() || started.elapsed() > limit {
                break;
            }
            if tokio::time::timeout(Duration::from_millis(1), s.peek(&mut [0u8; 1]))
                .await
                .is_ok()
            {
                break;
            }
        }
        let mut r = read_to_end(&mut s, limit).await;
        r.elapsed = started.elapsed();
        r
    };
    let silent = async {
        let mut s = connect(&site).await;
        read_to_end(&mut s, limit).await
    };
    let half_preface = async {
        let mut s = connect(&site).await;
        s.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        read_to_end(&mut s, limit).await
    };
    let second_request_stalled = async {
        let mut s = connect(&site).await;
        let (status, _) = one_answer(&mut s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 200);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .expect("write");
        read_to_end(&mut s, limit).await
    };
    let idle_keep_alive = async {
        let mut s = connect(&site).await;
        let (status, _) = one_answer(&mut s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 200);
        read_to_end(&mut s, limit).await
    };
    // Served while all of the above hold their connections.
    let others = async {
        tokio::time::sleep(HEAD_TIMEOUT / 2).await;
        let started = Instant::now();
        assert_alive(&site, &alice).await;
        started.elapsed()
    };
    let (stalled, dripping, silent, half_preface, second, idle, others) = tokio::join!(
        stalled,
        dripping,
        silent,
        half_preface,
        second_request_stalled,
        idle_keep_alive,
        others
    );

    assert!(others < HEAD_TIMEOUT, "others waited {others:?}");
    for (what, r) in [
        ("stalled head", &stalled),
        ("dripping head", &dripping),
        ("stalled second head", &second),
    ] {
        assert_eq!(r.status, 408, "{what}: {r:?}");
        assert_envelope(&r.envelope(), "BadUserInput");
        assert_eq!(r.ending, Ending::Closed, "{what}: {r:?}");
        assert!(r.elapsed < limit, "{what}: closed after {:?}", r.elapsed);
        assert!(
            r.elapsed >= HEAD_TIMEOUT - Duration::from_millis(200),
            "{what}: closed early, after {:?}",
            r.elapsed
        );
        assert_eq!(
            r.header("Connection").as_deref(),
            Some("close"),
            "{what}: {r:?}"
        );
        assert!(is_uuid(&r.header("operationID").unwrap_or_default()));
    }
    for (what, r) in [
        ("silent connection", &silent),
        ("half an HTTP/2 preface", &half_preface),
        ("idle keep-alive connection", &idle),
    ] {
        assert_eq!(r.ending, Ending::Closed, "{what}: {r:?}");
        assert!(r.head.is_empty() && r.body.is_empty(), "{what}: said {r:?}");
        assert!(r.elapsed < limit, "{what}: closed after {:?}", r.elapsed);
    }
    assert_alive(&site, &alice).await;
}

/// HTTP/2 (prior knowledge, as on the client API): a connection that brings no request, or
/// sits idle after its requests, is closed within the header read timeout; hyper has no idle
/// timeout of its own for HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_close() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let (_fed, site) = hostile_site(&[]).await;
    let limit = HEAD_TIMEOUT + SLACK;

    // One request, then idle.
    let stream = connect(&site).await;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(site.url("/healthz"))
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("HTTP/2 request");
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("operationID"));
    response.into_body().collect().await.expect("body");
    let idle_since = Instant::now();
    tokio::time::timeout(limit, connection)
        .await
        .expect("an idle HTTP/2 connection is closed within the timeout")
        .expect("connection task")
        .ok();
    let idle = idle_since.elapsed();
    assert!(
        idle >= HEAD_TIMEOUT - Duration::from_millis(200),
        "closed after only {idle:?} idle"
    );

    // The preface and settings, and no request.
    let mut s = connect(&site).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let r = read_to_end(&mut s, limit).await;
    assert_eq!(r.ending, Ending::Closed, "{r:?}");
    assert!(r.elapsed < limit);

    site.get("/healthz", None).await.expect(200, None);
}

// ---------------------------------------------------------------------------------------------
// Connection limit

/// At most `limits.max_connections` connections are served at once: one more waits, unserved,
/// until one of them closes, and is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    // Idle connections must outlive the checks below, so this site waits longer for heads.
    let (_fed, site) = hostile_site(&[
        ("LIMITS__MAX_CONNECTIONS", "2"),
        ("LIMITS__HEADER_READ_TIMEOUT_SECS", "20"),
    ])
    .await;
    let keep_alive = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

    // Two connections, each answered once and kept open: both slots are held.
    let mut first = connect(&site).await;
    let (status, _) = one_answer(&mut first, keep_alive).await;
    assert_eq!(status, 200);
    let mut second = connect(&site).await;
    let (status, _) = one_answer(&mut second, keep_alive).await;
    assert_eq!(status, 200);

    // A third is accepted by the kernel but not served.
    let mut third = connect(&site).await;
    third
        .write_all(&get_request("/healthz", ""))
        .await
        .expect("write");
    let early = read_to_end(&mut third, Duration::from_millis(700)).await;
    assert_eq!(
        (early.ending, early.status),
        (Ending::Open, 0),
        "served beyond the limit: {early:?}"
    );

    // Closing one frees its slot for the waiting one.
    drop(first);
    let r = read_to_end(&mut third, SLACK).await;
    assert_eq!(r.status, 200, "the waiting connection: {r:?}");

    // The one still open was not disturbed.
    let (status, _) = one_answer(&mut second, keep_alive).await;
    assert_eq!(status, 200);
}
