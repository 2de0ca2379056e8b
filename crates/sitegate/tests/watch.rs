//! Watching instead of polling, over real sites: blocking reads (`waitForChange`) answer as
//! soon as the task changes or at the timeout, locally and across the peer link, where many
//! identical waiters share one held peer request; the `/events` stream sends each change
//! until the task is final, then ends.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sitegate_testkit::site::*;

async fn patch_later(site_url: String, token: String, id: String, delay: Duration, body: Value) {
    tokio::time::sleep(delay).await;
    let r = http_client()
        .patch(format!("{site_url}/tasks/{id}"))
        .header("X-VCAV-Auth", token)
        .json(&body)
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200, "patch {body}");
}

fn base(site: &Site) -> String {
    format!("http://127.0.0.1:{}", site.port)
}

#[tokio::test]
async fn blocking_reads_answer_on_change_or_at_the_timeout() {
    let fed = Federation::init(&["site1"]);
    let site1 = fed.start("site1").await;
    let svc = site1.login("svc").await;
    let alice = site1.login("alice").await;
    let bob = site1.login("bob").await;
    let task = site1
        .create_task(&svc, &new_task("alice", "Sync", "vm", "vm-1", "web-01"))
        .await;
    let id = id_of(&task);
    let seen = int(&task, "lastUpdated");

    // Nothing changes: answered at the timeout, unchanged.
    let started = Instant::now();
    let r = site1
        .get(
            &format!("/tasks/{id}?waitForChange=true&timeout=1s&lastUpdated={seen}"),
            Some(&alice),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(int(r.expect(200, None), "lastUpdated"), seen);
    assert!(
        took >= Duration::from_millis(950),
        "answered early: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "answered late: {took:?}");

    // A change 700 ms in: answered right after it, with the change.
    let writer = tokio::spawn(patch_later(
        base(&site1),
        svc.clone(),
        id.clone(),
        Duration::from_millis(700),
        json!({"progress": 42}),
    ));
    let started = Instant::now();
    let r = site1
        .get(
            &format!("/tasks/{id}?waitForChange=true&timeout=20s&lastUpdated={seen}"),
            Some(&alice),
        )
        .await;
    let took = started.elapsed();
    writer.await.expect("writer");
    let body = r.expect(200, None);
    assert_eq!(body["progress"], 42);
    assert!(int(body, "lastUpdated") > seen);
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(5),
        "woken by the write, not the timeout: {took:?}"
    );

    // Another user waiting on it is told it does not exist, at once.
    let started = Instant::now();
    let r = site1
        .get(
            &format!("/tasks/{id}?waitForChange=true&timeout=20s&lastUpdated={seen}"),
            Some(&bob),
        )
        .await;
    r.expect(404, Some("TaskNotFound"));
    assert!(started.elapsed() < Duration::from_secs(3));

    // Bad waits are the caller's mistake.
    for bad in [
        "waitForChange=maybe&lastUpdated=1",
        "waitForChange=true",
        "waitForChange=true&lastUpdated=1&timeout=soon",
        "timeout=5s",
    ] {
        site1
            .get(&format!("/tasks/{id}?{bad}"), Some(&alice))
            .await
            .expect(400, Some("BadUserInput"));
    }
}

#[tokio::test]
async fn remote_waiters_share_held_peer_requests_and_events_stream_to_the_end() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let svc2 = site2.login("svc").await;
    let alice = site1.login("alice").await;
    site1
        .extend_multisite(&alice, "site2")
        .await
        .expect(200, None);
    let task = site2
        .create_task(&svc2, &new_task("alice", "Failover", "vm", "vm-9", "db-01"))
        .await;
    let id = id_of(&task);
    let seen = int(&task, "lastUpdated");
    let reads_at_site2 = || async {
        site2
            .metric(
                "sitegate_requests_total",
                &[("route", "/tasks/{task_id}"), ("method", "GET")],
            )
            .await
            .unwrap_or(0.0)
    };
    let before = reads_at_site2().await;

    // 30 identical blocking reads at site1 for site2's task (within the 32 one user may hold
    // by default), then one change at site2.
    let mut waiters = Vec::new();
    for _ in 0..30 {
        let url = format!(
            "{}/tasks/{id}?site=site2&waitForChange=true&timeout=20s&lastUpdated={seen}",
            base(&site1)
        );
        let alice = alice.clone();
        waiters.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = http_client()
                .get(url)
                .header("X-VCAV-Auth", alice)
                .send()
                .await
                .expect("blocking read");
            let status = r.status().as_u16();
            let body: Value = r.json().await.expect("json");
            (status, body, started.elapsed())
        }));
    }
    patch_later(
        base(&site2),
        svc2.clone(),
        id.clone(),
        Duration::from_millis(800),
        json!({"progress": 30}),
    )
    .await;
    for w in waiters {
        let (status, body, took) = w.await.expect("waiter");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["progress"], 30, "{body}");
        assert!(took < Duration::from_secs(8), "{took:?}");
    }
    let peer_reads = reads_at_site2().await - before;
    assert!(
        (1.0..=8.0).contains(&peer_reads),
        "30 waiters should share a few held peer requests, site2 answered {peer_reads}"
    );

    // The event stream, across the peer link: every change, then the end.
    let events = tokio::spawn({
        let url = format!("{}/tasks/{id}/events?site=site2", base(&site1));
        let alice = alice.clone();
        async move {
            let r = http_client()
                .get(url)
                .header("X-VCAV-Auth", alice)
                .header("Accept", "text/event-stream")
                .send()
                .await
                .expect("events");
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let started = Instant::now();
            // The whole stream: it must end by itself once the task is final.
            let text = tokio::time::timeout(Duration::from_secs(30), r.text())
                .await
                .expect("the stream ends once the task is final")
                .expect("stream body");
            (status, content_type, text, started.elapsed())
        }
    });
    for (delay, body) in [
        (400, json!({"progress": 60})),
        (400, json!({"progress": 90})),
        (
            400,
            json!({"state": "SUCCEEDED", "resultType": "none", "result": {}}),
        ),
    ] {
        patch_later(
            base(&site2),
            svc2.clone(),
            id.clone(),
            Duration::from_millis(delay),
            body,
        )
        .await;
    }
    let (status, content_type, text, _) = events.await.expect("events task");
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let tasks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).expect("event data is a task"))
        .collect();
    assert!(text.contains("event: task"), "{text}");
    let progress: Vec<i64> = tasks.iter().map(|t| int(t, "progress")).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(
        tasks.last().map(|t| t["state"].clone()),
        Some(json!("SUCCEEDED")),
        "{text}"
    );
    assert!(
        tasks.len() >= 3,
        "each change is an event (some may merge), got {progress:?}"
    );

    // A local stream of a task that is already final: one event, then the end.
    let svc1 = site1.login("svc").await;
    let local = site1
        .create_task(&svc1, &new_task("alice", "Sync", "vm", "vm-1", "web-01"))
        .await;
    let lid = id_of(&local);
    patch_later(
        base(&site1),
        svc1,
        lid.clone(),
        Duration::ZERO,
        json!({"state": "FAILED", "error": {"code": "X", "msg": "m", "args": [], "stacktrace": ""}}),
    )
    .await;
    let text = tokio::time::timeout(
        Duration::from_secs(10),
        http_client()
            .get(format!("{}/tasks/{lid}/events", base(&site1)))
            .header("X-VCAV-Auth", &alice)
            .send()
            .await
            .expect("events")
            .text(),
    )
    .await
    .expect("ends at once")
    .expect("body");
    assert_eq!(text.matches("event: task").count(), 1, "{text}");
    assert!(text.contains("FAILED"), "{text}");

    // A stream of someone else's / a missing task is a plain 404 envelope, not a stream.
    site1
        .get(
            &format!("/tasks/{}/events", uuid::Uuid::new_v4()),
            Some(&alice),
        )
        .await
        .expect(404, Some("TaskNotFound"));
}
