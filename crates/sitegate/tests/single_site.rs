//! One site, one real `sitegate serve` process per test: sessions, the task API and the
//! task-writer API, sites, operations endpoints and the request-wide behaviour (operation IDs,
//! media types, body limits) as API.md describes them.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::site as support;
use support::{assert_envelope, id_of, int, is_uuid, new_task, Federation, Site, PASSWORD};

const VENDOR: &str = "application/vnd.vmware.h4-v4+json";
/// What the original answers the vendor type with: the type and its charset.
const VENDOR_ANSWER: &str = "application/vnd.vmware.h4-v4+json;charset=UTF-8";

async fn site1() -> (Federation, Site) {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    (fed, site)
}

fn items(v: &Value) -> Vec<Value> {
    v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items array in {v}"))
        .clone()
}

fn ids(list: &[Value]) -> Vec<String> {
    list.iter().map(id_of).collect()
}

// ---------------------------------------------------------------------------------------------
// Sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_login_details_logout_and_refusals() {
    let (_fed, site) = site1().await;

    for (user, role) in [
        ("admin", "admin"),
        ("alice", "user"),
        ("bob", "user"),
        ("svc", "writer"),
    ] {
        let r = site.try_login(user, PASSWORD).await;
        let body = r.expect(200, None);
        let token = r.header("X-VCAV-Auth").expect("X-VCAV-Auth header");
        assert_eq!(token.len(), 43, "token {token:?}");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "token is URL-safe base64: {token:?}"
        );
        assert_eq!(
            *body,
            json!({"user": user, "roles": [role], "authenticatedSites": [{"site": "site1", "org": "System"}]}),
            "login body of {user}"
        );
        let details = site.get("/sessions", Some(&token)).await;
        assert_eq!(details.expect(200, None), body, "GET /sessions of {user}");
    }

    // Refused logins.
    site.try_login("alice", "wrong-password")
        .await
        .expect(401, Some("NotAuthenticated"));
    site.try_login("mallory", PASSWORD)
        .await
        .expect(401, Some("NotAuthenticated"));
    site.try_login("alice", "")
        .await
        .expect(401, Some("NotAuthenticated"));
    for bad in [
        json!({"type": "ldap", "localUser": "alice", "localPassword": PASSWORD}),
        json!({"localUser": "alice", "localPassword": PASSWORD}),
        json!({"type": "localUser", "localUser": "alice"}),
        json!({"type": "localUser", "localPassword": PASSWORD}),
        json!(["alice", PASSWORD]),
    ] {
        site.post("/sessions", None, &bad)
            .await
            .expect(400, Some("BadUserInput"));
    }
    for raw in ["{\"type\":\"localUser\",", "not json", ""] {
        let r = support::send(
            site.request(Method::POST, "/sessions")
                .header("Content-Type", "application/json")
                .body(raw.to_owned()),
        )
        .await;
        r.expect(400, Some("BadUserInput"));
    }

    // Two logins are two sessions; logging one out leaves the other.
    let t1 = site.login("alice").await;
    let t2 = site.login("alice").await;
    assert_ne!(t1, t2, "two logins must give different tokens");
    site.get("/sessions", Some(&t1)).await.expect(200, None);
    site.delete("/sessions", Some(&t1)).await.expect(204, None);
    site.get("/sessions", Some(&t1))
        .await
        .expect(401, Some("NotAuthenticated"));
    site.delete("/sessions", Some(&t1))
        .await
        .expect(401, Some("NotAuthenticated"));
    site.get("/tasks", Some(&t1))
        .await
        .expect(401, Some("NotAuthenticated"));
    let still = site.get("/sessions", Some(&t2)).await;
    assert_eq!(still.expect(200, None)["user"], json!("alice"));

    // No token, a garbage token of the right length, a short one.
    site.get("/sessions", None)
        .await
        .expect(401, Some("NotAuthenticated"));
    let forged = "A".repeat(43);
    site.get("/sessions", Some(&forged))
        .await
        .expect(401, Some("NotAuthenticated"));
    site.get("/sessions", Some("garbage"))
        .await
        .expect(401, Some("NotAuthenticated"));
    site.delete("/sessions", None)
        .await
        .expect(401, Some("NotAuthenticated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_restart() {
    let (_fed, mut site) = site1().await;
    let token = site.login("bob").await;
    let ended = site.login("alice").await;
    site.delete("/sessions", Some(&ended))
        .await
        .expect(204, None);

    site.restart().await;

    let r = site.get("/sessions", Some(&token)).await;
    assert_eq!(r.expect(200, None)["user"], json!("bob"));
    // A logged-out session stays dead after the restart too.
    site.get("/sessions", Some(&ended))
        .await
        .expect(401, Some("NotAuthenticated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire() {
    let fed = Federation::init(&["site1"]);
    let mut site = fed.site("site1");
    site.env.push((
        "SITEGATE_AUTH__SESSION_IDLE_TIMEOUT_SECS".into(),
        "2".into(),
    ));
    site.start().await;

    // A session in use stays alive past the idle timeout: each use counts as activity.
    let busy = site.login("alice").await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        site.get("/sessions", Some(&busy)).await.expect(200, None);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // An unused one ends once the idle timeout has passed. Waiting is the point of this
    // test, so this is a deliberate idle period, not a readiness sleep.
    let token = site.login("alice").await;
    site.get("/sessions", Some(&token)).await.expect(200, None);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    site.get("/sessions", Some(&token))
        .await
        .expect(401, Some("NotAuthenticated"));
    // And it stays ended.
    site.get("/sessions", Some(&token))
        .await
        .expect(401, Some("NotAuthenticated"));
    // A new login works.
    let again = site.login("alice").await;
    site.get("/sessions", Some(&again)).await.expect(200, None);
}

// ---------------------------------------------------------------------------------------------
// Task writer API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_creation_roles_and_idempotency() {
    let (_fed, site) = site1().await;
    let svc = site.login("svc").await;
    let admin = site.login("admin").await;
    let alice = site.login("alice").await;
    let body = new_task("alice", "sync", "vm", "vm-1", "web");

    // Only writers and admins write.
    site.post("/tasks", Some(&alice), &body)
        .await
        .expect(403, Some("Forbidden"));
    site.post("/tasks", None, &body)
        .await
        .expect(401, Some("NotAuthenticated"));

    let before = support::now_millis();
    let r = site.post("/tasks", Some(&svc), &body).await;
    let task = r.expect(201, None).clone();
    let after = support::now_millis();
    let id = id_of(&task);
    assert!(is_uuid(&id), "id {id}");
    assert_eq!(r.header("Location"), Some(format!("/tasks/{id}")));
    assert_eq!(task["user"], json!("alice"));
    assert_eq!(task["site"], json!("site1"));
    assert_eq!(task["state"], json!("RUNNING"));
    assert_eq!(task["progress"], json!(0));
    assert_eq!(task["endTime"], json!(-1));
    assert_eq!(task["workflowInfo"], body["workflowInfo"]);
    assert_eq!(task["warnings"], json!([]));
    let start = int(&task, "startTime");
    assert!(
        (before - 1000..=after + 1000).contains(&start),
        "startTime {start} not near now ({before}..{after})"
    );
    assert!(int(&task, "lastUpdated") >= start);
    // The task reads back the same.
    let got = site.get(&format!("/tasks/{id}"), Some(&alice)).await;
    assert_eq!(*got.expect(200, None), task);

    // Admins may write too; workflowInfo fields other than type may be null.
    let sparse = site
        .create_task(
            &admin,
            &json!({"user": "bob", "workflowInfo": {"type": "failover"}}),
        )
        .await;
    assert_eq!(sparse["user"], json!("bob"));
    assert_eq!(sparse["workflowInfo"]["type"], json!("failover"));
    assert!(sparse["workflowInfo"]["resourceId"].is_null());

    // A caller-chosen ID: idempotent with the same body, refused with another.
    let chosen = uuid::Uuid::new_v4().to_string();
    let mut with_id = body.clone();
    with_id["id"] = json!(chosen);
    let first = site.post("/tasks", Some(&svc), &with_id).await;
    let first_task = first.expect(201, None).clone();
    assert_eq!(id_of(&first_task), chosen);
    assert_eq!(first.header("Location"), Some(format!("/tasks/{chosen}")));
    let again = site.post("/tasks", Some(&svc), &with_id).await;
    assert_eq!(*again.expect(201, None), first_task, "repeat create");
    let mut different = with_id.clone();
    different["workflowInfo"]["resourceName"] = json!("db");
    site.post("/tasks", Some(&svc), &different)
        .await
        .expect(400, Some("BadUserInput"));
    let mut other_user = with_id.clone();
    other_user["user"] = json!("bob");
    site.post("/tasks", Some(&svc), &other_user)
        .await
        .expect(400, Some("BadUserInput"));
    // The refused creates changed nothing.
    let still = site.get(&format!("/tasks/{chosen}"), Some(&admin)).await;
    assert_eq!(*still.expect(200, None), first_task);

    // Malformed creates.
    let mut unknown_field = body.clone();
    unknown_field["color"] = json!("blue");
    let mut empty_type = body.clone();
    empty_type["workflowInfo"]["type"] = json!("");
    let mut bad_id = body.clone();
    bad_id["id"] = json!("not-a-uuid");
    for bad in [
        unknown_field,
        empty_type,
        bad_id,
        json!({"workflowInfo": {"type": "sync"}}),
        json!({"user": "alice"}),
        json!({"user": "bad user", "workflowInfo": {"type": "sync"}}),
        json!([1, 2]),
    ] {
        site.post("/tasks", Some(&svc), &bad)
            .await
            .expect(400, Some("BadUserInput"));
    }
    // Writing for another site is refused.
    site.post("/tasks?site=nowhere", Some(&svc), &body)
        .await
        .expect(404, Some("SiteNotFound"));

    // Exactly the three tasks exist.
    let all = site.get("/tasks", Some(&admin)).await;
    assert_eq!(all.expect(200, None)["total"], json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_patches_and_final_states() {
    let (_fed, site) = site1().await;
    let svc = site.login("svc").await;
    let admin = site.login("admin").await;
    let alice = site.login("alice").await;
    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let id = id_of(&task);
    let path = format!("/tasks/{id}");

    // Progress.
    let p = site
        .patch(&path, Some(&svc), &json!({"progress": 40}))
        .await;
    let t1 = p.expect(200, None).clone();
    assert_eq!(t1["progress"], json!(40));
    assert_eq!(t1["state"], json!("RUNNING"));
    assert_eq!(t1["endTime"], json!(-1));
    assert_eq!(t1["startTime"], task["startTime"]);
    assert!(int(&t1, "lastUpdated") >= int(&task, "lastUpdated"));

    // Warnings are appended.
    let w1 = site
        .patch(
            &path,
            Some(&svc),
            &json!({"warnings": [{"code": "W1", "msg": "m"}]}),
        )
        .await;
    let t2 = w1.expect(200, None).clone();
    assert_eq!(t2["warnings"].as_array().map(Vec::len), Some(1));
    assert_eq!(t2["warnings"][0]["code"], json!("W1"));
    assert_eq!(t2["warnings"][0]["msg"], json!("m"));
    assert_eq!(t2["progress"], json!(40), "a warning leaves progress alone");
    let w2 = site
        .patch(
            &path,
            Some(&admin),
            &json!({"warnings": [{"code": "W2", "msg": "n"}], "progress": 60}),
        )
        .await;
    let t3 = w2.expect(200, None).clone();
    let codes: Vec<&Value> = t3["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .map(|w| &w["code"])
        .collect();
    assert_eq!(codes, [&json!("W1"), &json!("W2")]);
    assert_eq!(t3["progress"], json!(60));
    assert!(int(&t3, "lastUpdated") >= int(&t2, "lastUpdated"));

    // Refused patches change nothing.
    site.patch(&path, Some(&alice), &json!({"progress": 70}))
        .await
        .expect(403, Some("Forbidden"));
    site.patch(&path, None, &json!({"progress": 70}))
        .await
        .expect(401, Some("NotAuthenticated"));
    for bad in [
        json!({"progress": 101}),
        json!({"progress": -1}),
        json!({"progress": "50"}),
        json!({"progres": 50}),
        json!({"state": "DONE"}),
        json!({"state": "FAILED"}),
        json!({"result": "early"}),
        json!({"warnings": [{"msg": "no code"}]}),
    ] {
        site.patch(&path, Some(&svc), &bad)
            .await
            .expect(400, Some("BadUserInput"));
    }
    let unchanged = site.get(&path, Some(&admin)).await;
    assert_eq!(*unchanged.expect(200, None), t3);

    // Success.
    let done = site
        .patch(
            &path,
            Some(&svc),
            &json!({"state": "SUCCEEDED", "resultType": "string", "result": "ok"}),
        )
        .await;
    let t4 = done.expect(200, None).clone();
    assert_eq!(t4["state"], json!("SUCCEEDED"));
    assert_eq!(t4["progress"], json!(100));
    assert_eq!(t4["resultType"], json!("string"));
    assert_eq!(t4["result"], json!("ok"));
    assert!(t4["error"].is_null());
    assert!(int(&t4, "endTime") >= int(&t4, "startTime"));
    assert!(int(&t4, "lastUpdated") >= int(&t3, "lastUpdated"));
    assert_eq!(t4["warnings"], t3["warnings"]);

    // A final task never changes again.
    for later in [
        json!({"progress": 10}),
        json!({"warnings": [{"code": "W3", "msg": "late"}]}),
        json!({"state": "FAILED", "error": {"code": "X", "msg": "boom"}}),
        json!({"state": "SUCCEEDED", "resultType": "string", "result": "again"}),
    ] {
        site.patch(&path, Some(&svc), &later)
            .await
            .expect(409, Some("TaskAlreadyCompleted"));
    }
    let final_read = site.get(&path, Some(&alice)).await;
    assert_eq!(*final_read.expect(200, None), t4);

    // Failure, on another task.
    let other = site
        .create_task(&svc, &new_task("bob", "failover", "vm", "vm-2", "db"))
        .await;
    let other_path = format!("/tasks/{}", id_of(&other));
    site.patch(&other_path, Some(&svc), &json!({"progress": 30}))
        .await
        .expect(200, None);
    let failed = site
        .patch(
            &other_path,
            Some(&svc),
            &json!({"state": "FAILED", "error": {"code": "X", "msg": "boom"}}),
        )
        .await;
    let f = failed.expect(200, None).clone();
    assert_eq!(f["state"], json!("FAILED"));
    assert_eq!(f["error"]["code"], json!("X"));
    assert_eq!(f["error"]["msg"], json!("boom"));
    assert!(f["result"].is_null());
    assert!(int(&f, "endTime") >= int(&f, "startTime"));
    site.patch(&other_path, Some(&svc), &json!({"progress": 31}))
        .await
        .expect(409, Some("TaskAlreadyCompleted"));

    // Unknown and malformed IDs.
    let missing = uuid::Uuid::new_v4();
    let r = site
        .patch(
            &format!("/tasks/{missing}"),
            Some(&svc),
            &json!({"progress": 5}),
        )
        .await;
    r.expect(404, Some("TaskNotFound"));
    for bad in ["not-a-uuid", "12345", "F61D60D2698A46DCA26688DF27644956"] {
        site.patch(
            &format!("/tasks/{bad}"),
            Some(&svc),
            &json!({"progress": 5}),
        )
        .await
        .expect(400, Some("BadUserInput"));
    }
}

// ---------------------------------------------------------------------------------------------
// Task API: reads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_task_visibility_and_site_parameter() {
    let (_fed, site) = site1().await;
    let svc = site.login("svc").await;
    let admin = site.login("admin").await;
    let alice = site.login("alice").await;
    let bob = site.login("bob").await;
    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let id = id_of(&task);
    let path = format!("/tasks/{id}");

    assert_eq!(*site.get(&path, Some(&alice)).await.expect(200, None), task);
    assert_eq!(*site.get(&path, Some(&admin)).await.expect(200, None), task);
    assert_eq!(
        *site
            .get(&format!("{path}?site=site1"), Some(&alice))
            .await
            .expect(200, None),
        task
    );

    // Another user's task looks exactly like a missing one.
    let hidden = site.get(&path, Some(&bob)).await;
    hidden.expect(404, Some("TaskNotFound"));
    let missing_id = uuid::Uuid::new_v4().to_string();
    let missing = site.get(&format!("/tasks/{missing_id}"), Some(&bob)).await;
    missing.expect(404, Some("TaskNotFound"));
    let normalise = |text: &str, id: &str| text.replace(id, "<ID>");
    assert_eq!(
        normalise(&hidden.text, &id),
        normalise(&missing.text, &missing_id),
        "a hidden task must be indistinguishable from a missing one"
    );
    // The writer, not being the owner, does not see it either.
    site.get(&path, Some(&svc))
        .await
        .expect(404, Some("TaskNotFound"));
    site.get(&path, None)
        .await
        .expect(401, Some("NotAuthenticated"));

    // Unknown sites never fall back to the local store, and never echo much.
    let long_site = "s".repeat(5000);
    for site_param in ["nowhere", "..%2Fx", "../x", "SITE1", long_site.as_str()] {
        let r = site
            .get(&format!("{path}?site={site_param}"), Some(&alice))
            .await;
        r.expect(404, Some("SiteNotFound"));
        assert!(
            r.text.len() < 300,
            "SiteNotFound body is {} bytes: {}",
            r.text.len(),
            r.text
        );
    }

    // Malformed requests.
    site.get("/tasks/not-a-uuid", Some(&alice))
        .await
        .expect(400, Some("BadUserInput"));
    // A misspelt name is ignored, as the original API ignores unknown names.
    site.get(&format!("{path}?sight=site1"), Some(&alice))
        .await
        .expect(200, None);
    site.get(&format!("{path}?site=site1&site=site1"), Some(&alice))
        .await
        .expect(400, Some("BadUserInput"));
}

struct Seeded {
    /// Every task as the admin sees it after all writes.
    all: Vec<Value>,
}

/// Ten tasks with varied owners, kinds, resources, progress and states.
async fn seed(site: &Site, svc: &str, admin: &str) -> Seeded {
    let specs = [
        ("alice", "sync", "vm", "vm-1", "web", 10, "RUNNING"),
        ("alice", "sync", "vm", "vm-2", "db", 90, "SUCCEEDED"),
        ("alice", "failover", "vapp", "vapp-1", "shop", 35, "RUNNING"),
        ("bob", "sync", "vm", "vm-3", "web", 55, "FAILED"),
        ("alice", "pairing", "site", "site-2", "paris", 70, "RUNNING"),
        ("bob", "failover", "vm", "vm-1", "web", 20, "RUNNING"),
        ("bob", "sync", "vapp", "vapp-2", "crm", 80, "SUCCEEDED"),
        ("alice", "sync", "vm", "vm-4", "mail", 45, "FAILED"),
        ("bob", "pairing", "site", "site-3", "rome", 5, "RUNNING"),
        ("alice", "failover", "vm", "vm-5", "web", 65, "RUNNING"),
    ];
    for (user, kind, rtype, rid, rname, progress, state) in specs {
        let t = site
            .create_task(svc, &new_task(user, kind, rtype, rid, rname))
            .await;
        let path = format!("/tasks/{}", id_of(&t));
        site.patch(&path, Some(svc), &json!({"progress": progress}))
            .await
            .expect(200, None);
        match state {
            "SUCCEEDED" => {
                site.patch(
                    &path,
                    Some(svc),
                    &json!({"state": "SUCCEEDED", "resultType": "string", "result": "ok"}),
                )
                .await
                .expect(200, None);
            }
            "FAILED" => {
                site.patch(
                    &path,
                    Some(svc),
                    &json!({"state": "FAILED", "error": {"code": "E", "msg": "failed"}}),
                )
                .await
                .expect(200, None);
            }
            _ => {}
        }
    }
    let r = site.get("/tasks?limit=1000", Some(admin)).await;
    let all = items(r.expect(200, None));
    assert_eq!(all.len(), specs.len());
    Seeded { all }
}

/// The API's default order: newest first, ties by ID.
fn default_order(mut tasks: Vec<Value>) -> Vec<String> {
    tasks.sort_by(|a, b| {
        int(b, "startTime")
            .cmp(&int(a, "startTime"))
            .then_with(|| id_of(a).cmp(&id_of(b)))
    });
    ids(&tasks)
}

fn matching(all: &[Value], pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    all.iter().filter(|t| pred(t)).cloned().collect()
}

/// Checks `GET /tasks{query}` as `token` against the expected tasks, in the default order.
async fn check_list(site: &Site, query: String, token: String, expected: Vec<Value>) {
    let r = site.get(&format!("/tasks{query}"), Some(&token)).await;
    let body = r.expect(200, None).clone();
    let keys: HashSet<&str> = body
        .as_object()
        .expect("list body is an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["items", "total", "limit", "offset"]),
        "{query}: {body}"
    );
    assert_eq!(
        body["total"],
        json!(expected.len()),
        "total of /tasks{query}"
    );
    assert_eq!(
        ids(&items(&body)),
        default_order(expected),
        "items of /tasks{query}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_list_filters_sorting_and_paging() {
    let (_fed, site) = site1().await;
    let svc = site.login("svc").await;
    let admin = site.login("admin").await;
    let alice = site.login("alice").await;
    let bob = site.login("bob").await;
    let Seeded { all } = seed(&site, &svc, &admin).await;

    let check = |query: String, token: String, expected: Vec<Value>| {
        check_list(&site, query, token, expected)
    };

    // Visibility.
    let of = |u: &'static str| matching(&all, move |t| t["user"] == json!(u));
    assert!(!of("alice").is_empty() && !of("bob").is_empty());
    check(String::new(), alice.clone(), of("alice")).await;
    check(String::new(), bob.clone(), of("bob")).await;
    check(String::new(), admin.clone(), all.clone()).await;
    check("?user=bob".into(), admin.clone(), of("bob")).await;
    check("?user=nobody".into(), admin.clone(), vec![]).await;
    check(String::new(), svc.clone(), vec![]).await;
    site.get("/tasks?user=bob", Some(&alice))
        .await
        .expect(403, Some("Forbidden"));
    site.get("/tasks", None)
        .await
        .expect(401, Some("NotAuthenticated"));

    // Filters.
    let by = |field: &'static str, value: &'static str| {
        matching(&all, move |t| t["workflowInfo"][field] == json!(value))
    };
    check(
        "?state=RUNNING".into(),
        admin.clone(),
        matching(&all, |t| t["state"] == json!("RUNNING")),
    )
    .await;
    check(
        "?state=SUCCEEDED,FAILED".into(),
        admin.clone(),
        matching(&all, |t| t["state"] != json!("RUNNING")),
    )
    .await;
    check(
        "?state=FAILED".into(),
        alice.clone(),
        matching(&all, |t| {
            t["state"] == json!("FAILED") && t["user"] == json!("alice")
        }),
    )
    .await;
    check("?type=sync".into(), admin.clone(), by("type", "sync")).await;
    check(
        "?type=failover".into(),
        alice.clone(),
        matching(&by("type", "failover"), |t| t["user"] == json!("alice")),
    )
    .await;
    check(
        "?resourceType=vapp".into(),
        admin.clone(),
        by("resourceType", "vapp"),
    )
    .await;
    check(
        "?resourceId=vm-1".into(),
        admin.clone(),
        by("resourceId", "vm-1"),
    )
    .await;
    check(
        "?resourceName=web".into(),
        admin.clone(),
        by("resourceName", "web"),
    )
    .await;
    check(
        "?resourceName=web&type=sync&state=RUNNING".into(),
        admin.clone(),
        matching(&all, |t| {
            t["workflowInfo"]["resourceName"] == json!("web")
                && t["workflowInfo"]["type"] == json!("sync")
                && t["state"] == json!("RUNNING")
        }),
    )
    .await;
    check("?type=nothing".into(), admin.clone(), vec![]).await;

    let some_ids = [id_of(&all[1]), id_of(&all[4]), id_of(&all[7])];
    let wanted: HashSet<String> = some_ids.iter().cloned().collect();
    check(
        format!("?ids={}", some_ids.join(",")),
        admin.clone(),
        matching(&all, |t| wanted.contains(&id_of(t))),
    )
    .await;
    // `ids` does not widen what a user may see.
    check(
        format!("?ids={}", some_ids.join(",")),
        bob.clone(),
        matching(&all, |t| {
            wanted.contains(&id_of(t)) && t["user"] == json!("bob")
        }),
    )
    .await;

    // Time filters, with thresholds taken from the data.
    let mut starts: Vec<i64> = all.iter().map(|t| int(t, "startTime")).collect();
    starts.sort_unstable();
    let mid = starts[starts.len() / 2];
    check(
        format!("?startTimeAfter={mid}"),
        admin.clone(),
        matching(&all, |t| int(t, "startTime") > mid),
    )
    .await;
    check(
        format!("?startTimeBefore={mid}"),
        admin.clone(),
        matching(&all, |t| int(t, "startTime") < mid),
    )
    .await;
    let first = starts[0];
    let last = starts[starts.len() - 1];
    check(
        format!("?startTimeAfter={}&startTimeBefore={}", first - 1, last + 1),
        admin.clone(),
        all.clone(),
    )
    .await;
    let ended = |t: &Value| int(t, "endTime") >= 0;
    let far_future = support::now_millis() + 86_400_000;
    check(
        format!("?endTimeBefore={far_future}"),
        admin.clone(),
        matching(&all, ended),
    )
    .await;
    check(
        "?endTimeAfter=0".into(),
        admin.clone(),
        matching(&all, ended),
    )
    .await;
    check(format!("?endTimeAfter={far_future}"), admin.clone(), vec![]).await;
    let mut ends: Vec<i64> = all
        .iter()
        .filter(|t| ended(t))
        .map(|t| int(t, "endTime"))
        .collect();
    ends.sort_unstable();
    let end_mid = ends[ends.len() / 2];
    check(
        format!("?endTimeBefore={end_mid}"),
        admin.clone(),
        matching(&all, |t| ended(t) && int(t, "endTime") < end_mid),
    )
    .await;

    // Sorting.
    let sorted = |desc: bool| {
        let mut v = all.clone();
        v.sort_by(|a, b| {
            let (pa, pb) = (int(a, "progress"), int(b, "progress"));
            let o = if desc { pb.cmp(&pa) } else { pa.cmp(&pb) };
            o.then_with(|| id_of(a).cmp(&id_of(b)))
        });
        ids(&v)
    };
    for (query, desc) in [
        ("sort=progress", false),
        ("sort=-progress", true),
        ("sort=progress-", true),
    ] {
        let r = site.get(&format!("/tasks?{query}"), Some(&admin)).await;
        let got = ids(&items(r.expect(200, None)));
        assert_eq!(got, sorted(desc), "{query}");
    }
    let r = site.get("/tasks?sort=user,-progress", Some(&admin)).await;
    let got = items(r.expect(200, None));
    let mut expected = all.clone();
    expected.sort_by(|a, b| {
        a["user"]
            .as_str()
            .cmp(&b["user"].as_str())
            .then_with(|| int(b, "progress").cmp(&int(a, "progress")))
            .then_with(|| id_of(a).cmp(&id_of(b)))
    });
    assert_eq!(ids(&got), ids(&expected), "sort=user,-progress");

    // Paging: pages of 3 add up to the whole list; total is always the full count.
    let whole = default_order(all.clone());
    let mut paged = Vec::new();
    let mut offset = 0;
    while offset < whole.len() + 3 {
        let r = site
            .get(&format!("/tasks?limit=3&offset={offset}"), Some(&admin))
            .await;
        let body = r.expect(200, None);
        assert_eq!(
            body["total"],
            json!(whole.len()),
            "total at offset {offset}"
        );
        let page = ids(&items(body));
        assert!(page.len() <= 3);
        paged.extend(page);
        offset += 3;
    }
    assert_eq!(paged, whole, "paging");
    let r = site.get("/tasks?limit=0", Some(&admin)).await;
    let body = r.expect(200, None);
    assert_eq!(items(body).len(), 0);
    assert_eq!(body["total"], json!(whole.len()));
    let r = site.get("/tasks?limit=5000", Some(&admin)).await;
    let body = r.expect(200, None);
    assert!(items(body).len() <= 1000);
    assert_eq!(items(body).len(), whole.len());

    // Refused queries.
    for bad in [
        "limit=-1",
        "limit=ten",
        "offset=-1",
        "sort=bogus",
        "sort=progress,progress",
        "state=DONE",
        "ids=not-a-uuid",
        "startTimeAfter=yesterday",
        "limit=1&limit=2",
        "operationID=x&limit=ten",
    ] {
        site.get(&format!("/tasks?{bad}"), Some(&admin))
            .await
            .expect(400, Some("BadUserInput"));
    }
    // Unknown names are ignored, as the original ignores them (a public client sends its
    // operationID as a query parameter): the answer is the one without them.
    let plain = site.get("/tasks?state=RUNNING", Some(&admin)).await;
    let with_unknown = site
        .get(
            "/tasks?stat=FAILED&state=RUNNING&operationID=Powershell__1",
            Some(&admin),
        )
        .await;
    assert_eq!(with_unknown.expect(200, None), plain.expect(200, None));
    site.get("/tasks?site=nowhere", Some(&admin))
        .await
        .expect(404, Some("SiteNotFound"));
    check("?site=site1".into(), admin.clone(), all.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_returns_visible_tasks_in_the_order_asked() {
    let (_fed, site) = site1().await;
    let svc = site.login("svc").await;
    let admin = site.login("admin").await;
    let alice = site.login("alice").await;
    let a1 = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let a2 = site
        .create_task(&svc, &new_task("alice", "failover", "vm", "vm-2", "db"))
        .await;
    let b1 = site
        .create_task(&svc, &new_task("bob", "sync", "vm", "vm-3", "mail"))
        .await;
    let a2_path = format!("/tasks/{}", id_of(&a2));
    site.patch(
        &a2_path,
        Some(&svc),
        &json!({"progress": 50, "warnings": [{"code": "W", "msg": "w"}]}),
    )
    .await
    .expect(200, None);
    site.patch(
        &a2_path,
        Some(&svc),
        &json!({"state": "SUCCEEDED", "resultType": "json", "result": {"k": [1, 2]}}),
    )
    .await
    .expect(200, None);
    let missing = uuid::Uuid::new_v4().to_string();
    let asked = json!([id_of(&a2), missing, id_of(&b1), id_of(&a1)]);

    // Rows, as objects, compared with the task as GET returns it.
    let rows_as_tasks = |body: &Value| -> Vec<Value> {
        let names: Vec<String> = body["propertyNames"]
            .as_array()
            .expect("propertyNames")
            .iter()
            .map(|n| n.as_str().expect("name").to_owned())
            .collect();
        body["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|row| {
                let row = row.as_array().expect("row is an array");
                assert_eq!(row.len(), names.len(), "row width");
                let obj: serde_json::Map<String, Value> =
                    names.iter().cloned().zip(row.iter().cloned()).collect();
                Value::Object(obj)
            })
            .collect()
    };

    let r = site.post("/tasks/poll", Some(&alice), &asked).await;
    let body = r.expect(200, None).clone();
    let names = body["propertyNames"].as_array().expect("propertyNames");
    assert_eq!(names.len(), 13, "{body}");
    assert_eq!(names[0], json!("id"));
    let task_keys: HashSet<String> = a1.as_object().expect("task").keys().cloned().collect();
    let name_set: HashSet<String> = names
        .iter()
        .map(|n| n.as_str().expect("name").to_owned())
        .collect();
    assert_eq!(name_set, task_keys, "propertyNames are the task's fields");
    let rows = rows_as_tasks(&body);
    assert_eq!(
        rows,
        vec![
            site.task(&id_of(&a2), &admin).await,
            site.task(&id_of(&a1), &admin).await,
        ],
        "alice sees her two tasks, in the order asked"
    );

    let r = site.post("/tasks/poll", Some(&admin), &asked).await;
    let rows = rows_as_tasks(r.expect(200, None));
    assert_eq!(ids(&rows), [id_of(&a2), id_of(&b1), id_of(&a1)]);

    let r = site
        .post("/tasks/poll?site=site1", Some(&admin), &json!([]))
        .await;
    assert_eq!(r.expect(200, None)["values"], json!([]));

    for bad in [
        json!([id_of(&a1), "not-a-uuid"]),
        json!({"ids": [id_of(&a1)]}),
        json!(id_of(&a1)),
        json!([1, 2]),
    ] {
        site.post("/tasks/poll", Some(&alice), &bad)
            .await
            .expect(400, Some("BadUserInput"));
    }
    site.post("/tasks/poll?site=nowhere", Some(&alice), &asked)
        .await
        .expect(404, Some("SiteNotFound"));
    site.post("/tasks/poll", None, &asked)
        .await
        .expect(401, Some("NotAuthenticated"));
}

// ---------------------------------------------------------------------------------------------
// Sites and operations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_and_operations_endpoints() {
    let (_fed, site) = site1().await;
    let alice = site.login("alice").await;

    let r = site.get("/sites", Some(&alice)).await;
    let list = r.expect(200, None).as_array().expect("array").clone();
    assert_eq!(list.len(), 1, "{list:?}");
    let local = &list[0];
    assert_eq!(local["site"], json!("site1"));
    assert_eq!(local["isLocal"], json!(true));
    assert_eq!(
        local["state"],
        json!({"incomingCommError": null, "outgoingCommError": null})
    );
    let one = site.get("/sites/site1", Some(&alice)).await;
    assert_eq!(one.expect(200, None), local);
    site.get("/sites/nowhere", Some(&alice))
        .await
        .expect(404, Some("SiteNotFound"));
    site.get("/sites", None)
        .await
        .expect(401, Some("NotAuthenticated"));
    site.get("/sites/site1", None)
        .await
        .expect(401, Some("NotAuthenticated"));

    for path in ["/healthz", "/readyz"] {
        site.get(path, None).await.expect(200, None);
        let forged = "B".repeat(43);
        site.get(path, Some(&forged)).await.expect(200, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_an_operation_id() {
    let (_fed, site) = site1().await;
    let alice = site.login("alice").await;

    // Successes and every kind of error carry one; fresh ones are UUIDs and differ.
    let mut seen = HashSet::new();
    let replies = [
        site.get("/healthz", None).await,
        site.get("/sessions", Some(&alice)).await,
        site.get("/tasks", None).await,
        site.get("/no/such/route", Some(&alice)).await,
        support::send(site.request(Method::PUT, "/sessions")).await,
        site.get("/tasks?limit=-1", Some(&alice)).await,
        site.try_login("alice", "nope").await,
    ];
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 401, 404, 405, 400, 401]);
    let codes = [
        None,
        None,
        Some("NotAuthenticated"),
        // An unknown path is NotFound, not a malformed request.
        Some("NotFound"),
        Some(""),
        Some("BadUserInput"),
        Some("NotAuthenticated"),
    ];
    for (r, code) in replies.iter().zip(codes) {
        let op = r.operation_id();
        assert!(is_uuid(&op), "generated operationID {op:?} is a UUID");
        assert!(seen.insert(op), "operationIDs must differ");
        match code {
            // Unknown route and wrong method: an envelope, whatever its code.
            Some("") => assert_envelope(&r.body, r.body["code"].as_str().unwrap_or("?")),
            Some(code) => assert_envelope(&r.body, code),
            None => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_ids_are_echoed_or_refused() {
    let (_fed, site) = site1().await;
    let alice = site.login("alice").await;

    let with_op = |method: Method, path: &str, op: &str| {
        site.request(method, path)
            .header("X-VCAV-Auth", alice.clone())
            .header("operationID", op.to_owned())
    };
    for op in [
        "my-op-123",
        "f61d60d2-698a-46dc-a266-88df27644956",
        &"o".repeat(128),
    ] {
        let ok = support::send(with_op(Method::GET, "/sessions", op)).await;
        ok.expect(200, None);
        assert_eq!(ok.operation_id(), op);
        let err = support::send(with_op(Method::GET, "/tasks/not-a-uuid", op)).await;
        err.expect(400, Some("BadUserInput"));
        assert_eq!(err.operation_id(), op);
        let route = support::send(with_op(Method::GET, "/nothing-here", op)).await;
        assert_eq!(route.status, 404);
        assert_eq!(route.operation_id(), op);
        let method = support::send(with_op(Method::PATCH, "/sessions", op)).await;
        assert_eq!(method.status, 405);
        assert_eq!(method.operation_id(), op);
    }

    // A malformed operation ID is refused and never reflected.
    for bad in ["a\tb", &"x".repeat(129), "has space"] {
        let r = support::send(with_op(Method::GET, "/sessions", bad)).await;
        r.expect(400, Some("BadUserInput"));
        let fresh = r.operation_id();
        assert_ne!(fresh, bad);
        assert!(is_uuid(&fresh), "fresh operationID {fresh:?}");
        assert!(!r.text.contains(bad), "the bad value is echoed: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_types_follow_the_accept_header() {
    let (_fed, site) = site1().await;
    let alice = site.login("alice").await;

    let ct = |r: &support::Reply| r.header("Content-Type").unwrap_or_default();
    for (path, token, status) in [
        ("/sessions", Some(alice.as_str()), 200),
        ("/tasks", Some(alice.as_str()), 200),
        ("/tasks", None, 401),
        ("/tasks/not-a-uuid", Some(alice.as_str()), 400),
    ] {
        let mut rb = site.request(Method::GET, path).header("Accept", VENDOR);
        if let Some(t) = token {
            rb = rb.header("X-VCAV-Auth", t);
        }
        let vendor = support::send(rb).await;
        assert_eq!(vendor.status, status, "{path}");
        assert_eq!(ct(&vendor), VENDOR_ANSWER, "{path} with the vendor type");
        assert!(vendor.body.is_object(), "{path}: body is still JSON");

        let mut rb = site
            .request(Method::GET, path)
            .header("Accept", "application/json");
        if let Some(t) = token {
            rb = rb.header("X-VCAV-Auth", t);
        }
        let plain = support::send(rb).await;
        assert_eq!(plain.status, status);
        assert_eq!(
            ct(&plain),
            "application/json",
            "{path} with application/json"
        );

        let mut rb = site.request(Method::GET, path);
        if let Some(t) = token {
            rb = rb.header("X-VCAV-Auth", t);
        }
        let none = support::send(rb).await;
        assert_eq!(ct(&none), "application/json", "{path} without Accept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_deeply_nested_bodies_are_refused() {
    let (_fed, site) = site1().await;
    let alice = site.login("alice").await;
    let svc = site.login("svc").await;

    // About 2 MiB of JSON.
    let big: Vec<String> = (0..58_000)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let big = serde_json::to_string(&big).expect("json");
    assert!(big.len() > 2_000_000);
    // The server answers before it has read the whole body and then closes the connection,
    // so the client, still writing, may see the reset instead of the answer (a TCP race, not
    // an answer). Every answer that does arrive must be the 413 envelope, and one must arrive.
    // Each attempt uses its own client: the server closes the connection after the 413
    // without saying `Connection: close`, so a pooled connection would be dead on reuse.
    let mut resets = Vec::new();
    let mut answered = false;
    for _ in 0..5 {
        let attempt = support::http_client()
            .post(site.url("/tasks/poll"))
            .header("X-VCAV-Auth", alice.clone())
            .header("Content-Type", "application/json")
            .body(big.clone())
            .send()
            .await;
        match attempt {
            Ok(response) => {
                let r = support::reply(response).await;
                r.expect(413, Some("BadUserInput"));
                r.operation_id();
                answered = true;
                break;
            }
            Err(e) => resets.push(e.to_string()),
        }
    }
    assert!(answered, "no answer to an oversized body: {resets:?}");

    // 10000 levels of nesting, as a poll body and as a task result.
    let depth = 10_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let r = support::send(
        site.request(Method::POST, "/tasks/poll")
            .header("X-VCAV-Auth", alice.clone())
            .header("Content-Type", "application/json")
            .body(nested.clone()),
    )
    .await;
    r.expect(400, Some("BadUserInput"));

    let task = site
        .create_task(&svc, &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    let path = format!("/tasks/{}", id_of(&task));
    let patch = format!("{{\"state\":\"SUCCEEDED\",\"resultType\":\"json\",\"result\":{nested}}}");
    let r = support::send(
        site.request(Method::PATCH, &path)
            .header("X-VCAV-Auth", svc.clone())
            .header("Content-Type", "application/json")
            .body(patch),
    )
    .await;
    r.expect(400, Some("BadUserInput"));
    let after = site.get(&path, Some(&alice)).await;
    assert_eq!(after.expect(200, None)["state"], json!("RUNNING"));

    // The server is still healthy and still serves.
    site.get("/healthz", None).await.expect(200, None);
    site.get("/sessions", Some(&alice)).await.expect(200, None);
}

/// API.md: "answers use `application/json` unless the vendor type was asked for, then that
/// type" holds for every answer, including the refusal of a malformed operation ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_operation_ids_answer_in_the_vendor_type_asked_for() {
    let (_fed, site) = site1().await;
    let r = support::send(
        site.request(Method::GET, "/healthz")
            .header("Accept", VENDOR)
            .header("operationID", "has space"),
    )
    .await;
    r.expect(400, Some("BadUserInput"));
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some(VENDOR_ANSWER),
        "the vendor type was asked for"
    );
}
