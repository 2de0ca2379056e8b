//! Boundaries: no single client, user or site can exhaust a site or reach beyond its rights.
//! Each test is one finding of the boundaries review, against real `sitegate` processes (and
//! a real HAProxy for the load-balancer case); each failed before the fix it checks. The
//! peer-trust and certificate-reload findings are in `security.rs`, beside the PKI helpers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sitegate_testkit::raw::{self, RawConnection};
use sitegate_testkit::site as support;
use support::{id_of, new_task, wait_for, Federation, Site, PASSWORD};

/// A running task of `user` at `site`, created by the site's writer.
async fn running_task(site: &Site, user: &str) -> Value {
    let svc = site.login("svc").await;
    site.create_task(&svc, &new_task(user, "sync", "vm", "vm-1", "web"))
        .await
}

fn blocking_read(site: &Site, token: &str, task: &Value, secs: u64) -> reqwest::RequestBuilder {
    let path = format!(
        "/tasks/{}?waitForChange=true&timeout={secs}s&lastUpdated={}",
        id_of(task),
        task["lastUpdated"]
    );
    site.request(reqwest::Method::GET, &path)
        .header("X-VCAV-Auth", token)
}

// 1. Labels fed from the request come from a fixed set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_add_no_metric_series() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let mut conn = RawConnection::open(site.port).await;
    // Pipelined: 300 requests with 300 made-up methods, then their answers.
    let mut burst = Vec::new();
    for i in 0..300 {
        burst.extend(raw::request(
            &format!("ZQX{i:09}"),
            "/healthz",
            &[("Host", "x")],
            None,
        ));
    }
    conn.send(&burst).await;
    for _ in 0..300 {
        let answer = conn.answer().await;
        assert!(
            answer.status == 200 || answer.status == 405,
            "{}",
            answer.head
        );
    }
    let metrics = site.get("/metrics", None).await.text;
    let series: HashSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sitegate_requests_total{"))
        .collect();
    assert!(!metrics.contains("ZQX"), "a method became a label");
    assert!(
        series.iter().any(|l| l.contains("method=\"other\"")),
        "{series:?}"
    );
    assert!(series.len() < 10, "{} series: {series:?}", series.len());
}

// 2. One user's long polls cannot freeze the site for another (nor the probes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_long_polls_do_not_starve_another() {
    let fed = Federation::init(&["site1"]);
    let site = fed
        .start_with_env(
            "site1",
            &[
                ("SITEGATE_LIMITS__MAX_CONCURRENT_REQUESTS", "4"),
                ("SITEGATE_LIMITS__MAX_HELD_PER_USER", "8"),
                ("SITEGATE_LIMITS__MAX_HELD_TOTAL", "12"),
            ],
        )
        .await;
    let alice = site.login("alice").await;
    let bob = site.login("bob").await;
    let alices = running_task(&site, "alice").await;
    let bobs = running_task(&site, "bob").await;

    // Alice opens 40 blocking reads: 8 are held, the rest refused at once with 429.
    let mut polls = Vec::new();
    for _ in 0..40 {
        polls.push(tokio::spawn(
            blocking_read(&site, &alice, &alices, 20).send(),
        ));
    }
    let refused = wait_for(
        "alice's excess polls refused",
        Duration::from_secs(10),
        || async {
            let done: Vec<_> = polls.iter().filter(|p| p.is_finished()).collect();
            (done.len() >= 32).then_some(done.len())
        },
    )
    .await;
    assert_eq!(refused, 32, "exactly the excess is refused");
    let mut statuses = Vec::new();
    for p in polls.iter_mut().filter(|p| p.is_finished()) {
        let r = support::reply(p.await.expect("join").expect("answer")).await;
        assert_eq!(r.header("Retry-After").as_deref(), Some("1"), "{r:?}");
        statuses.push((r.status, r.body["code"].as_str().unwrap_or("").to_owned()));
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == (429, "TooManyRequests".to_owned())),
        "{statuses:?}"
    );

    // Meanwhile bob, the probes and the writer are answered at once.
    let started = Instant::now();
    site.get(&format!("/tasks/{}", id_of(&bobs)), Some(&bob))
        .await
        .expect(200, None);
    site.get("/healthz", None).await.expect(200, None);
    site.get("/readyz", None).await.expect(200, None);
    let svc = site.login("svc").await;
    site.patch(
        &format!("/tasks/{}", id_of(&bobs)),
        Some(&svc),
        &json!({"progress": 5}),
    )
    .await
    .expect(200, None);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Bob may hold polls of his own: the site's total (12) has room beside alice's 8.
    let bobs_poll = blocking_read(&site, &bob, &bobs, 1)
        .send()
        .await
        .expect("answer");
    assert_eq!(bobs_poll.status().as_u16(), 200);
    // The site's total: bob's 5th held poll meets it (8 + 4 = 12). (Read again: the writer
    // changed the task, and a wait on an older lastUpdated answers at once.)
    let bobs = site
        .get(&format!("/tasks/{}", id_of(&bobs)), Some(&bob))
        .await
        .expect(200, None)
        .clone();
    let mut bob_polls = Vec::new();
    for _ in 0..4 {
        bob_polls.push(tokio::spawn(blocking_read(&site, &bob, &bobs, 20).send()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let over = support::send(blocking_read(&site, &bob, &bobs, 20)).await;
    over.expect(503, Some("ServerBusy"));
    for p in polls.into_iter().chain(bob_polls) {
        p.abort();
    }
}

// 2, second part. The client API and the peer link have budgets of their own: a site whose
// client API is saturated still answers its peers, so they do not open their circuit to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_api_does_not_starve_the_peer_link() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed
        .start_with_env(
            "site2",
            &[
                ("SITEGATE_LIMITS__MAX_CONCURRENT_REQUESTS", "2"),
                ("SITEGATE_LIMITS__REQUEST_TIMEOUT_SECS", "4"),
            ],
        )
        .await;
    let svc2 = site2.login("svc").await;
    let bob2 = site2.login("bob").await;
    let bobs = site2
        .create_task(&svc2, &new_task("bob", "sync", "vm", "vm-2", "db"))
        .await;
    let alices = site2
        .create_task(&svc2, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let alice1 = site1.login("alice").await;
    site1
        .extend_multisite(&alice1, "site2")
        .await
        .expect(200, None);
    // site2's own users: 10 held polls, and slow bodies holding both client API slots.
    let mut load = Vec::new();
    for _ in 0..10 {
        load.push(tokio::spawn(blocking_read(&site2, &bob2, &bobs, 20).send()));
    }
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut conn = RawConnection::open(site2.port).await;
        let head = format!(
            "POST /tasks HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {svc2}\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{{"
        );
        conn.send(head.as_bytes()).await;
        slow.push(tokio::spawn(async move {
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.send(b" ").await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // site2's client API is full: a plain read there waits, then is refused.
    let local = site2.get("/tasks", Some(&bob2)).await;
    assert!(local.status == 503 || local.status == 200, "{local:?}");
    // Meanwhile alice at site1 reads site2's task over the peer link, every time.
    let started = Instant::now();
    for _ in 0..20 {
        site1
            .get(
                &format!("/tasks/{}?site=site2", id_of(&alices)),
                Some(&alice1),
            )
            .await
            .expect(200, None);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let admin1 = site1.login("admin").await;
    let sites = site1.get("/sites", Some(&admin1)).await;
    let site2_entry = sites
        .expect(200, None)
        .as_array()
        .and_then(|s| s.iter().find(|s| s["site"] == "site2").cloned())
        .expect("site2 listed");
    assert_eq!(site2_entry["link"]["circuit"], "closed", "{site2_entry}");
    for t in load.into_iter() {
        t.abort();
    }
    for t in slow {
        t.abort();
    }
}

// 3. Event streams: capped per user, bounded in life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_user_and_end() {
    let fed = Federation::init(&["site1"]);
    let site = fed
        .start_with_env(
            "site1",
            &[
                ("SITEGATE_LIMITS__MAX_HELD_PER_USER", "3"),
                ("SITEGATE_LIMITS__MAX_STREAM_SECS", "2"),
            ],
        )
        .await;
    let alice = site.login("alice").await;
    let bob = site.login("bob").await;
    let alices = running_task(&site, "alice").await;
    let bobs = running_task(&site, "bob").await;
    let open = |token: &str, task: &Value| {
        site.request(
            reqwest::Method::GET,
            &format!("/tasks/{}/events", id_of(task)),
        )
        .header("X-VCAV-Auth", token)
        .send()
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        let r = open(&alice, &alices).await.expect("stream");
        assert_eq!(r.status().as_u16(), 200);
        streams.push(r);
    }
    let fourth = support::reply(open(&alice, &alices).await.expect("answer")).await;
    fourth.expect(429, Some("TooManyRequests"));
    // Bob is not affected by alice's streams.
    let bobs_stream = open(&bob, &bobs).await.expect("stream");
    assert_eq!(bobs_stream.status().as_u16(), 200);
    // Each stream ends by itself after max_stream_secs, and its slot comes back.
    let started = Instant::now();
    let mut first = streams.remove(0);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = first.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended within its life");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(streams);
    wait_for(
        "alice may open a stream again",
        Duration::from_secs(10),
        || async {
            let r = open(&alice, &alices).await.ok()?;
            (r.status().as_u16() == 200).then_some(())
        },
    )
    .await;
}

// 4. Waiting for a request slot counts against the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_covers_the_wait_for_a_slot() {
    let fed = Federation::init(&["site1"]);
    let site = fed
        .start_with_env(
            "site1",
            &[
                ("SITEGATE_LIMITS__MAX_CONCURRENT_REQUESTS", "2"),
                ("SITEGATE_LIMITS__REQUEST_TIMEOUT_SECS", "2"),
            ],
        )
        .await;
    let svc = site.login("svc").await;
    let bob = site.login("bob").await;
    // Slow bodies hold both slots: each declares a body and sends it a byte at a time.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut conn = RawConnection::open(site.port).await;
        let head = format!(
            "POST /tasks HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: {svc}\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{{"
        );
        conn.send(head.as_bytes()).await;
        holders.push(tokio::spawn(async move {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.send(b" ").await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let r = site.get("/tasks", Some(&bob)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "answered after {took:?}: {r:?}"
    );
    if r.status != 200 {
        r.expect(503, Some("ServerBusy"));
        assert_eq!(r.header("Retry-After").as_deref(), Some("1"));
    }
    for h in holders {
        h.abort();
    }
}

// 5. Logout and expiry end open streams and held polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_ends_open_streams_and_held_polls() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let alice = site.login("alice").await;
    let task = running_task(&site, "alice").await;
    let mut stream = site
        .request(
            reqwest::Method::GET,
            &format!("/tasks/{}/events", id_of(&task)),
        )
        .header("X-VCAV-Auth", &alice)
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status().as_u16(), 200);
    let poll = tokio::spawn(blocking_read(&site, &alice, &task, 50).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    site.delete("/sessions", Some(&alice)).await;
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its session");
    let poll = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the held poll outlived its session")
        .expect("join")
        .expect("answer");
    let poll = support::reply(poll).await;
    poll.expect(401, Some("NotAuthenticated"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

// 6. Sessions follow the users file: a removed user, a removed role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_the_users_file() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let bob = site.login("bob").await;
    let admin = site.login("admin").await;
    site.get("/tasks?user=alice", Some(&admin))
        .await
        .expect(200, None);
    // The operator removes bob and takes the admin role away from admin.
    let path = fed.fed_dir().join("site1.users.toml");
    let text = std::fs::read_to_string(&path).expect("users file");
    let kept: Vec<&str> = text
        .split("[[user]]")
        .filter(|t| !t.contains("name = \"bob\""))
        .collect();
    let edited = kept.join("[[user]]").replace(
        "name = \"admin\"\nroles = [\"admin\"]",
        "name = \"admin\"\nroles = [\"user\"]",
    );
    assert_ne!(edited, text);
    std::fs::write(&path, edited).expect("write the users file");
    site.sighup();
    wait_for("bob's session ends", Duration::from_secs(10), || async {
        (site.get("/sessions", Some(&bob)).await.status == 401).then_some(())
    })
    .await;
    site.get("/tasks?user=alice", Some(&admin))
        .await
        .expect(403, Some("Forbidden"));
    assert_eq!(site.try_login("bob", PASSWORD).await.status, 401);
    assert!(site.stderr().contains("users file reloaded"));
}

// 7. Re-extending to a peer ends the session held there before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_extending_ends_the_previous_remote_session() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let alice = site1.login("alice").await;
    let sessions_at_site2 = || async {
        site2
            .metric("sitegate_sessions_active", &[])
            .await
            .unwrap_or(-1.0)
    };
    let before = sessions_at_site2().await;
    for _ in 0..20 {
        site1
            .extend_multisite(&alice, "site2")
            .await
            .expect(200, None);
    }
    let after = wait_for(
        "old remote sessions ended",
        Duration::from_secs(10),
        || async {
            let n = sessions_at_site2().await;
            (n <= before + 1.0).then_some(n)
        },
    )
    .await;
    assert!(after <= before + 1.0, "{before} -> {after}");
    // The one held now works.
    site1
        .get("/tasks?site=site2", Some(&alice))
        .await
        .expect(200, None);
}

// 8. Credentials extensions are throttled at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_extensions_are_throttled_at_both_ends() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let _site2 = fed
        .start_with_env(
            "site2",
            &[("SITEGATE_AUTH__LOGIN_FAILURES_PER_ADDRESS", "6")],
        )
        .await;
    let guess = |user: &str, password: &str| json!({"type": "credentials", "site": "site2", "vcdUsername": user, "vcdPassword": password});
    // At site1: alice's refused extensions to site2 lock them after 5.
    let alice = site1.login("alice").await;
    let mut codes = Vec::new();
    for i in 0..6 {
        let r = site1
            .post(
                "/sessions/extend",
                Some(&alice),
                &guess(&format!("target{i}"), "wrong"),
            )
            .await;
        codes.push(r.status);
    }
    assert_eq!(codes[..4], [401, 401, 401, 401], "{codes:?}");
    assert_eq!(codes[4..], [429, 429], "{codes:?}");
    // At site2: site1 counts as one address. Alice's 5 and bob's 1 make 6: locked.
    let bob = site1.login("bob").await;
    let r = site1
        .post("/sessions/extend", Some(&bob), &guess("target9", "wrong"))
        .await;
    assert!(r.status == 401 || r.status == 429, "{r:?}");
    // Now even admin's correct password through site1 is refused, with the peer's wait.
    let admin = site1.login("admin").await;
    let r = site1
        .post("/sessions/extend", Some(&admin), &guess("admin", PASSWORD))
        .await;
    r.expect(429, Some("NotAuthenticated"));
    assert!(r.header("Retry-After").is_some(), "{r:?}");
}

// 11. Every change of a task gets a lastUpdated of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_get_distinct_last_updated() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let svc = site.login("svc").await;
    let task = running_task(&site, "alice").await;
    let path = format!("/tasks/{}", id_of(&task));
    let mut seen = HashSet::new();
    for round in 0..30 {
        let progress = json!({"progress": round});
        let warning = json!({"warnings": [{"code": "W", "msg": format!("{round}"), "args": [], "stacktrace": ""}]});
        let (a, b) = tokio::join!(
            site.patch(&path, Some(&svc), &progress),
            site.patch(&path, Some(&svc), &warning),
        );
        let (a, b) = (a.expect(200, None).clone(), b.expect(200, None).clone());
        assert_ne!(
            a["lastUpdated"], b["lastUpdated"],
            "round {round}: {a} / {b}"
        );
        assert!(seen.insert(a["lastUpdated"].to_string()));
        assert!(seen.insert(b["lastUpdated"].to_string()));
    }
}

// 12. A task is bounded by its encoded size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_bounded_by_its_size() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let svc = site.login("svc").await;
    let task = running_task(&site, "alice").await;
    let path = format!("/tasks/{}", id_of(&task));
    // 100 warnings of 3,000 bytes: under the body limit, over a task's 256 KiB.
    let warnings: Vec<Value> = (0..100)
        .map(|i| json!({"code": "W", "msg": format!("{i}{}", "m".repeat(3000)), "args": [], "stacktrace": ""}))
        .collect();
    let r = site
        .patch(&path, Some(&svc), &json!({"warnings": warnings}))
        .await;
    r.expect(400, Some("BadUserInput"));
    assert!(r.text.contains("bytes"), "{r:?}");
    let admin = site.login("admin").await;
    let now = site.get(&path, Some(&admin)).await;
    assert_eq!(now.expect(200, None)["warnings"], json!([]));
}

// 13. Secrets readable by others are reported; an empty users file is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_secrets_are_reported_and_an_empty_users_file_refused() {
    use std::os::unix::fs::PermissionsExt;
    // Two sites, so site1 has a peer link and reads its key.
    let fed = Federation::init(&["site1", "site2"]);
    let users = fed.fed_dir().join("site1.users.toml");
    let key = fed.fed_dir().join("site1.key");
    for path in [&users, &key] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let mut site = fed.start("site1").await;
    wait_for("the warnings", Duration::from_secs(10), || async {
        let log = site.stderr();
        (log.contains("site1.users.toml") && log.contains("site1.key") && log.contains("chmod 600"))
            .then_some(())
    })
    .await;
    site.terminate().await;

    std::fs::write(&users, "# nobody\n").expect("empty users file");
    let mut cmd = support::command(fed.dir.path());
    cmd.arg("serve")
        .arg("--config")
        .arg(fed.config_path("site1"));
    let out = support::run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("names no users"), "{stderr}");
}

// 14. SIGHUP never stops a site, whatever its shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_never_stops_a_site() {
    // One site: no peers, so no peer link and no certificates to reload; no client TLS.
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    for _ in 0..3 {
        site.sighup();
        tokio::time::sleep(Duration::from_millis(200)).await;
        site.get("/healthz", None).await.expect(200, None);
    }
    assert!(
        site.stderr().contains("SIGHUP: reloading"),
        "{}",
        site.stderr()
    );
}

// 15. Behind a trusted load balancer, the client's own address counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_each_client_is_throttled_by_its_own_address() {
    let fed = Federation::init(&["site1"]);
    let site = fed
        .start_with_env(
            "site1",
            &[("SITEGATE_LISTEN__TRUSTED_PROXIES", "[\"127.0.0.1\"]")],
        )
        .await;
    let front = support::free_base_port(1);
    let _haproxy = support::start_haproxy(
        fed.dir.path(),
        &format!(
            "defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    option forwardfor\n\
             frontend f\n    bind 127.0.0.1:{front}\n    bind 127.0.0.3:{front}\n    bind 127.0.0.4:{front}\n    default_backend b\n\
             backend b\n    server s1 127.0.0.1:{} check inter 200ms\n",
            site.port
        ),
    );
    let (mallory, alice) = (
        support::client_from("127.0.0.3"),
        support::client_from("127.0.0.4"),
    );
    let login = |client: &reqwest::Client, user: &str, password: &str, spoof: Option<&str>| {
        let mut rb = client
            .post(format!("http://127.0.0.3:{front}/sessions"))
            .json(&json!({"type": "localUser", "localUser": user, "localPassword": password}));
        if let Some(s) = spoof {
            rb = rb.header("X-Forwarded-For", s);
        }
        rb.send()
    };
    wait_for("haproxy up", Duration::from_secs(10), || async {
        login(&alice, "nobody", "x", None).await.ok().map(|_| ())
    })
    .await;
    // Mallory guesses 25 names, claiming to be alice's address.
    let mut statuses = Vec::new();
    for i in 0..25 {
        let r = login(&mallory, &format!("user{i}"), "guess", Some("127.0.0.4"))
            .await
            .expect("answer");
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&429), "mallory is locked: {statuses:?}");
    // Alice, through the same HAProxy, logs in.
    let r = login(&alice, "alice", PASSWORD, None)
        .await
        .expect("answer");
    assert_eq!(r.status().as_u16(), 200);
    // And the access log names each client, not HAProxy.
    let log = site.stderr();
    assert!(
        log.contains("127.0.0.3"),
        "the access log shows mallory's address"
    );
    assert!(
        log.contains("127.0.0.4"),
        "the access log shows alice's address"
    );
}
