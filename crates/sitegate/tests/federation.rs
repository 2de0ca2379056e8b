//! Federation scenarios: several real `sitegate serve` processes, written by `sitegate init`,
//! talking to each other over the real mutual-TLS peer link.
//!
//! Covered: remote reads (Get One, Query, Poll) equal the owning site's local answers; users
//! stay isolated across sites; the remote error codes stay distinct and a peer's own errors pass
//! through unchanged; a site with a certificate from another CA is refused both ways, and
//! pairs once each side records the other's CA as its trust anchor (`[[peer]] ca`); the peer
//! listener refuses clients without a federation certificate naming a configured peer (and plain
//! HTTP); a killed peer is reported quickly and used again after its restart; certificates
//! rotate (SIGHUP and file watcher) without a failed request; the operation ID reaches the
//! peer's log.
//!
//! Raw TLS clients are the `curl` command-line tool (OpenSSL), so the peer listener is also
//! checked against a TLS stack other than its own.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::curl::{curl, curl_peer_link, peer_link_args, require_curl};
use sitegate_testkit::raw;
use sitegate_testkit::site as support;
use support::{
    authenticated_sites, command, create_tasks, id_of, json_lines, log_field, new_task,
    run_with_deadline, send, wait_for, Federation, Reply, Site, COMMAND_DEADLINE, PASSWORD,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs `sitegate <args>` in the federation's temporary directory; it must succeed.
fn sitegate<I, S>(fed: &Federation, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = command(fed.dir.path());
    cmd.args(&args);
    let out = run_with_deadline(cmd, COMMAND_DEADLINE);
    assert!(
        out.status.success(),
        "sitegate {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sitegate pki issue --ca-dir <ca_dir> --site <site> --out-dir <out_dir> --days <days>`.
fn issue_certificate(fed: &Federation, ca_dir: &Path, site: &str, out_dir: &Path, days: u32) {
    let days = days.to_string();
    sitegate(
        fed,
        [
            OsStr::new("pki"),
            OsStr::new("issue"),
            OsStr::new("--ca-dir"),
            ca_dir.as_os_str(),
            OsStr::new("--site"),
            OsStr::new(site),
            OsStr::new("--out-dir"),
            out_dir.as_os_str(),
            OsStr::new("--days"),
            OsStr::new(&days),
        ],
    );
}

/// Makes a new CA in `<tmp>/<ca_dir>` (`sitegate pki ca`) and issues `site`'s certificate and
/// key from it over the ones `init` wrote; returns the CA's directory.
fn certificate_from_a_new_ca(fed: &Federation, site: &str, ca_dir: &str) -> PathBuf {
    let dir = fed.dir.path().join(ca_dir);
    sitegate(
        fed,
        [
            OsStr::new("pki"),
            OsStr::new("ca"),
            OsStr::new("--dir"),
            dir.as_os_str(),
        ],
    );
    assert!(dir.join("ca.pem").is_file() && dir.join("ca.key").is_file());
    issue_certificate(fed, &dir, site, &fed.fed_dir(), 365);
    dir
}

/// Rewrites `site`'s config so that it trusts none of its peers for multisite sessions.
fn distrust_all_peers(fed: &Federation, site: &str) {
    let path = fed.config_path(site);
    let text = std::fs::read_to_string(&path).expect("read the site config");
    let changed = text.replace("trust_multisite = true", "trust_multisite = false");
    assert_ne!(
        changed,
        text,
        "no trust_multisite = true in {}",
        path.display()
    );
    std::fs::write(&path, changed).expect("write the site config");
}

async fn extend_credentials(
    site: &Site,
    token: &str,
    peer: &str,
    user: &str,
    password: &str,
) -> Reply {
    site.post(
        "/sessions/extend",
        Some(token),
        &json!({"type": "credentials", "site": peer, "username": user, "password": password}),
    )
    .await
}

/// Logs `user` in at `site` and extends the session to every one of `peers` with a multisite
/// request, which must succeed.
async fn login_extended(site: &Site, user: &str, peers: &[&str]) -> String {
    let token = site.login(user).await;
    for peer in peers {
        let r = site.extend_multisite(&token, peer).await;
        let details = r.expect(200, None);
        let sites = authenticated_sites(details);
        assert!(
            sites.iter().any(|s| s == &site.name) && sites.iter().any(|s| s == peer),
            "extension of {user} to {peer} not listed: {details}"
        );
    }
    token
}

/// The `/sites` entry of `peer` as `site` reports it.
async fn site_entry(site: &Site, token: &str, peer: &str) -> Value {
    let r = site.get("/sites", Some(token)).await;
    let list = r.expect(200, None);
    list.as_array()
        .unwrap_or_else(|| panic!("/sites is not a list: {list}"))
        .iter()
        .find(|s| s["site"] == json!(peer))
        .cloned()
        .unwrap_or_else(|| panic!("/sites at {} does not list {peer}: {list}", site.name))
}

/// The JSON log lines (of a site's output) that carry `operation_id`.
fn log_lines_of(log: &str, operation_id: &str) -> Vec<Value> {
    json_lines(log)
        .into_iter()
        .filter(|l| log_field(l, "operation_id").as_deref() == Some(operation_id))
        .collect()
}

/// The "Expire date" of the certificate `site`'s peer listener serves to a new connection
/// presenting `client_cert` (curl's `%{certs}`).
fn served_certificate_expiry(fed: &Federation, site: &str, client_cert: &Path) -> Option<String> {
    let mut args = peer_link_args(fed, site, Some(client_cert));
    args.extend([
        "-o".to_owned(),
        "/dev/null".to_owned(),
        "-w".to_owned(),
        "%{certs}".to_owned(),
        format!("https://{site}:{}/healthz", fed.peer_port(site)),
    ]);
    let run = curl(&args);
    if run.exit != Some(0) {
        return None;
    }
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Expire date:").map(|d| d.trim().to_owned()))
}

// ---------------------------------------------------------------------------------------------
// 1. Remote reads equal the owning site's local answers; 8. the operation ID crosses sites
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reads_equal_the_owning_sites_local_answers() {
    let fed = Federation::init(&["site1", "site2", "site3"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let site3 = fed.start("site3").await;

    // Tasks at site2 and site3: alice's of two resource types, and one of bob's.
    let mut owned = Vec::new();
    for site in [&site2, &site3] {
        let tasks = create_tasks(
            site,
            &[
                new_task("alice", "sync", "vm", "vm-1", "web"),
                new_task("alice", "sync", "vm", "vm-2", "db"),
                new_task("alice", "restore", "disk", "disk-1", "data"),
                new_task("bob", "sync", "vm", "vm-3", "bob-vm"),
            ],
        )
        .await;
        // One of alice's finishes, so final-state fields cross the link too.
        let svc = site.login("svc").await;
        let done = site
            .patch(
                &format!("/tasks/{}", id_of(&tasks[1])),
                Some(&svc),
                &json!({"state": "SUCCEEDED", "resultType": "text", "result": {"ok": true}}),
            )
            .await;
        done.expect(200, None);
        owned.push(tasks);
    }

    // alice at site1: multisite to site2, credentials to site3.
    let alice1 = login_extended(&site1, "alice", &["site2"]).await;
    let r = extend_credentials(&site1, &alice1, "site3", "alice", PASSWORD).await;
    let details = r.expect(200, None);
    assert_eq!(
        authenticated_sites(details),
        ["site1", "site2", "site3"],
        "{details}"
    );
    let r = site1.get("/sessions", Some(&alice1)).await;
    assert_eq!(
        authenticated_sites(r.expect(200, None)),
        ["site1", "site2", "site3"]
    );

    for (site, tasks) in [(&site2, &owned[0]), (&site3, &owned[1])] {
        let name = site.name.as_str();
        let local = site.login("alice").await;

        // Get One, for a running and a finished task.
        for task in &tasks[..2] {
            let id = id_of(task);
            let remote = site1
                .get(&format!("/tasks/{id}?site={name}"), Some(&alice1))
                .await;
            let here = site.get(&format!("/tasks/{id}"), Some(&local)).await;
            here.expect(200, None);
            remote.expect(200, None);
            assert_eq!(remote.body, here.body, "Get One of {id} at {name}");
            assert_eq!(remote.body["site"], json!(name));
            assert!(
                remote
                    .header("content-type")
                    .is_some_and(|ct| ct.starts_with("application/json")),
                "{remote:?}"
            );
        }

        // Query with filters (and a sort), and without.
        for filter in [
            "resourceType=vm",
            "resourceType=vm&state=RUNNING",
            "type=restore",
            "sort=startTime&limit=2",
            "",
        ] {
            let sep = if filter.is_empty() { "" } else { "&" };
            let remote = site1
                .get(&format!("/tasks?site={name}{sep}{filter}"), Some(&alice1))
                .await;
            let here = site.get(&format!("/tasks?{filter}"), Some(&local)).await;
            here.expect(200, None);
            remote.expect(200, None);
            assert_eq!(remote.body, here.body, "Query {filter:?} at {name}");
            let items = remote.body["items"].as_array().expect("items");
            assert!(
                !items.is_empty(),
                "Query {filter:?} at {name}: {}",
                remote.text
            );
            assert!(
                items.iter().all(|t| t["user"] == json!("alice")),
                "{}",
                remote.text
            );
        }
        let vms = site1
            .get(
                &format!("/tasks?site={name}&resourceType=vm"),
                Some(&alice1),
            )
            .await;
        assert_eq!(vms.body["total"], json!(2), "{}", vms.text);

        // Poll, with a missing ID left out.
        let ids = json!([
            id_of(&tasks[2]),
            uuid::Uuid::new_v4().to_string(),
            id_of(&tasks[0])
        ]);
        let remote = site1
            .post(&format!("/tasks/poll?site={name}"), Some(&alice1), &ids)
            .await;
        let here = site.post("/tasks/poll", Some(&local), &ids).await;
        here.expect(200, None);
        remote.expect(200, None);
        assert_eq!(remote.body, here.body, "Poll at {name}");
        assert_eq!(
            remote.body["values"].as_array().map(Vec::len),
            Some(2),
            "{}",
            remote.text
        );
    }

    // 8. operationID: echoed by site1, and in site2's log with the site it came from.
    let op = format!("fed-op-{}", uuid::Uuid::new_v4());
    let id = id_of(&owned[0][0]);
    let r = send(
        site1
            .request(Method::GET, &format!("/tasks/{id}?site=site2"))
            .header("X-VCAV-Auth", &alice1)
            .header("operationID", &op),
    )
    .await;
    r.expect(200, None);
    assert_eq!(r.operation_id(), op);
    // Logs are written by a background thread: wait for each site's access-log line, the last
    // line of the request there, so every earlier line of it is in the file too.
    let access_logged = |lines: &[Value]| {
        lines
            .iter()
            .any(|l| l.get("target").and_then(Value::as_str) == Some("sitegate::access"))
    };
    let lines2 = wait_for(
        "site2's log to show the forwarded request's operation ID",
        Duration::from_secs(5),
        || {
            let lines = log_lines_of(&site2.stderr(), &op);
            async move { access_logged(&lines).then_some(lines) }
        },
    )
    .await;
    let lines1 = wait_for(
        "site1's log to show the operation ID",
        Duration::from_secs(5),
        || {
            let lines = log_lines_of(&site1.stderr(), &op);
            async move { access_logged(&lines).then_some(lines) }
        },
    )
    .await;
    // Every line of the operation, on both sites, carries one and the same trace ID.
    let trace_ids: std::collections::BTreeSet<Option<String>> = lines1
        .iter()
        .chain(&lines2)
        .map(|l| log_field(l, "trace_id"))
        .collect();
    assert!(
        trace_ids.len() == 1 && trace_ids.iter().all(Option::is_some),
        "trace IDs of operation {op}: {trace_ids:?}"
    );
    // site2 logged the request as one that came from site1 over the peer link.
    assert!(
        lines2
            .iter()
            .all(|l| log_field(l, "from_peer").as_deref() == Some("site1")),
        "site2's log lines of operation {op} should say from_peer site1: {lines2:#?}"
    );
    // The other peer never saw it.
    assert!(!site3.stderr().contains(&op), "site3 logged {op}");
}

// ---------------------------------------------------------------------------------------------
// 2. Users stay isolated across sites
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stay_isolated_across_sites() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let tasks = create_tasks(
        &site2,
        &[
            new_task("alice", "sync", "vm", "vm-1", "alice-vm"),
            new_task("bob", "sync", "vm", "vm-2", "bob-vm"),
        ],
    )
    .await;
    let (alice_task, bob_task) = (id_of(&tasks[0]), id_of(&tasks[1]));

    let bob1 = login_extended(&site1, "bob", &["site2"]).await;

    // Get One: alice's task is indistinguishable from a missing one.
    let r = site1
        .get(&format!("/tasks/{alice_task}?site=site2"), Some(&bob1))
        .await;
    r.expect(404, Some("TaskNotFound"));
    let bob2 = site2.login("bob").await;
    let local = site2
        .get(&format!("/tasks/{alice_task}"), Some(&bob2))
        .await;
    assert_eq!(r.body, local.body, "remote and local refusals differ");
    let r = site1
        .get(&format!("/tasks/{bob_task}?site=site2"), Some(&bob1))
        .await;
    assert_eq!(r.expect(200, None)["user"], json!("bob"));

    // Query: only bob's own.
    for filter in [
        "",
        "&resourceType=vm",
        &format!("&ids={alice_task},{bob_task}"),
    ] {
        let r = site1
            .get(&format!("/tasks?site=site2{filter}"), Some(&bob1))
            .await;
        let body = r.expect(200, None);
        let items = body["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "{filter}: {body}");
        assert!(items.iter().all(|t| t["user"] == json!("bob")), "{body}");
        assert!(!r.text.contains(&alice_task), "{body}");
        assert_eq!(body["total"], json!(1), "{body}");
    }
    // A user filter naming alice is refused, as it would be locally.
    let r = site1.get("/tasks?site=site2&user=alice", Some(&bob1)).await;
    r.expect(403, Some("Forbidden"));

    // Poll: alice's task is left out.
    let r = site1
        .post(
            "/tasks/poll?site=site2",
            Some(&bob1),
            &json!([alice_task, bob_task]),
        )
        .await;
    let body = r.expect(200, None);
    assert_eq!(body["values"].as_array().map(Vec::len), Some(1), "{body}");
    assert!(!r.text.contains(&alice_task), "{body}");

    // An extended admin sees alice's task, exactly as site2 shows it to its own admin.
    let admin1 = site1.login("admin").await;
    extend_credentials(&site1, &admin1, "site2", "admin", PASSWORD)
        .await
        .expect(200, None);
    let admin2 = site2.login("admin").await;
    let remote = site1
        .get(&format!("/tasks/{alice_task}?site=site2"), Some(&admin1))
        .await;
    let here = site2
        .get(&format!("/tasks/{alice_task}"), Some(&admin2))
        .await;
    assert_eq!(remote.expect(200, None)["user"], json!("alice"));
    assert_eq!(remote.body, here.body);
    let r = site1
        .get("/tasks?site=site2&user=alice", Some(&admin1))
        .await;
    assert_eq!(r.expect(200, None)["total"], json!(1), "{}", r.text);

    // Dropping the extension: site2 is no longer listed, and remote reads are refused.
    let r = site1.delete("/sessions/site2", Some(&bob1)).await;
    assert_eq!(authenticated_sites(r.expect(200, None)), ["site1"]);
    let r = site1
        .get(&format!("/tasks/{bob_task}?site=site2"), Some(&bob1))
        .await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    // The local session is untouched.
    site1.get("/tasks", Some(&bob1)).await.expect(200, None);
}

// ---------------------------------------------------------------------------------------------
// 3. The remote error codes stay distinct; a peer's own errors pass through unchanged
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_errors_stay_distinct_and_pass_through() {
    let fed = Federation::init(&["site1", "site2", "site3"]);
    // site3 trusts no peer to assert identities.
    distrust_all_peers(&fed, "site3");
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let site3 = fed.start("site3").await;
    let task = create_tasks(&site2, &[new_task("alice", "sync", "vm", "vm-1", "web")]).await;
    let id = id_of(&task[0]);

    let alice1 = site1.login("alice").await;

    // Not extended.
    for path in [
        format!("/tasks/{id}?site=site2"),
        "/tasks?site=site2".to_owned(),
    ] {
        let r = site1.get(&path, Some(&alice1)).await;
        r.expect(401, Some("RemoteAuthenticationFailure"));
        assert!(r.msg().contains("site2"), "{r:?}");
    }
    let r = site1
        .post("/tasks/poll?site=site2", Some(&alice1), &json!([id]))
        .await;
    r.expect(401, Some("RemoteAuthenticationFailure"));

    // An unknown site, for reads and for extension.
    for path in [
        format!("/tasks/{id}?site=nowhere"),
        "/tasks?site=nowhere".to_owned(),
    ] {
        site1
            .get(&path, Some(&alice1))
            .await
            .expect(404, Some("SiteNotFound"));
    }
    site1
        .post("/tasks/poll?site=nowhere", Some(&alice1), &json!([id]))
        .await
        .expect(404, Some("SiteNotFound"));
    site1
        .extend_multisite(&alice1, "nowhere")
        .await
        .expect(404, Some("SiteNotFound"));

    // Wrong password on a credentials extension.
    let r = extend_credentials(&site1, &alice1, "site2", "alice", "not-the-password").await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    assert!(r.msg().contains("site2"), "{r:?}");
    // An unknown user there too.
    extend_credentials(&site1, &alice1, "site2", "mallory", PASSWORD)
        .await
        .expect(401, Some("RemoteAuthenticationFailure"));
    let r = site1.get("/sessions", Some(&alice1)).await;
    assert_eq!(authenticated_sites(r.expect(200, None)), ["site1"]);

    // Multisite refused by a site that does not trust the caller; credentials still work.
    let r = site1.extend_multisite(&alice1, "site3").await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    assert!(r.msg().contains("site3"), "{r:?}");
    let r = site2
        .extend_multisite(&site2.login("alice").await, "site3")
        .await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    extend_credentials(&site1, &alice1, "site3", "alice", PASSWORD)
        .await
        .expect(200, None);
    site1
        .get("/tasks?site=site3", Some(&alice1))
        .await
        .expect(200, None);
    // ... while site3 itself may still ask the others, which trust it.
    let alice3 = site3.login("alice").await;
    site3
        .extend_multisite(&alice3, "site2")
        .await
        .expect(200, None);
    let r = site3
        .get(&format!("/tasks/{id}?site=site2"), Some(&alice3))
        .await;
    assert_eq!(r.expect(200, None)["id"], json!(id));

    // A remote TaskNotFound and BadUserInput reach the caller unchanged.
    site1
        .extend_multisite(&alice1, "site2")
        .await
        .expect(200, None);
    let alice2 = site2.login("alice").await;
    let missing = uuid::Uuid::new_v4();
    let remote = site1
        .get(&format!("/tasks/{missing}?site=site2"), Some(&alice1))
        .await;
    let here = site2.get(&format!("/tasks/{missing}"), Some(&alice2)).await;
    remote.expect(404, Some("TaskNotFound"));
    assert_eq!(
        remote.body, here.body,
        "the peer's TaskNotFound changed on the way"
    );
    let remote = site1
        .get("/tasks?site=site2&sort=nosuchfield", Some(&alice1))
        .await;
    let here = site2.get("/tasks?sort=nosuchfield", Some(&alice2)).await;
    here.expect(400, Some("BadUserInput"));
    remote.expect(400, Some("BadUserInput"));
    assert_eq!(remote.body, here.body);
    // And the site parameter is not confused with a missing task.
    site1
        .get(&format!("/tasks/{id}?site=site2"), Some(&alice1))
        .await
        .expect(200, None);
}

// ---------------------------------------------------------------------------------------------
// 4. A site whose certificate comes from another CA is refused both ways
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_a_certificate_from_another_ca_is_refused_both_ways() {
    let fed = Federation::init(&["site1", "site3"]);
    // site3's certificate, key and all, now comes from CA2; it still trusts the federation CA.
    certificate_from_a_new_ca(&fed, "site3", "ca2");

    let site1 = fed.start("site1").await;
    let site3 = fed.start("site3").await;
    // site3 serves its own users, and says at once that its peers will refuse it.
    let admin3 = site3.login("admin").await;
    let sites = site3.get("/sites", Some(&admin3)).await;
    let problem = sites.expect(200, None)[0]["certificateError"]["msg"].clone();
    assert!(
        problem
            .as_str()
            .is_some_and(|m| m.contains("refused by peers")),
        "{problem}"
    );
    let task = create_tasks(&site3, &[new_task("alice", "sync", "vm", "vm-1", "web")]).await;
    let id = id_of(&task[0]);

    // site1 -> site3: site1 cannot verify site3's certificate.
    let alice1 = site1.login("alice").await;
    for r in [
        site1.extend_multisite(&alice1, "site3").await,
        extend_credentials(&site1, &alice1, "site3", "alice", PASSWORD).await,
    ] {
        r.expect(401, Some("RemoteAuthenticationFailure"));
        let m = r.msg();
        assert!(
            m.contains("site3") && m.contains("TLS handshake") && m.contains("certificate"),
            "message should name the site and the TLS step: {r:?}"
        );
    }
    let r = site1.get("/sessions", Some(&alice1)).await;
    assert_eq!(authenticated_sites(r.expect(200, None)), ["site1"]);
    // Reads are refused before anything is sent (not extended).
    site1
        .get(&format!("/tasks/{id}?site=site3"), Some(&alice1))
        .await
        .expect(401, Some("RemoteAuthenticationFailure"));

    // site3 -> site1: site1 refuses site3's certificate. (Asserted last: site1's view first.)
    let alice3 = site3.login("alice").await;
    let refusals = [
        site3.extend_multisite(&alice3, "site1").await,
        extend_credentials(&site3, &alice3, "site1", "alice", PASSWORD).await,
        site3.extend_multisite(&alice3, "site1").await,
    ];

    // site1 reports both directions of its link to site3 as failing.
    let admin1 = site1.login("admin").await;
    let entry = wait_for(
        "site1's /sites to report site3's refused certificate",
        Duration::from_secs(5),
        || async {
            let entry = site_entry(&site1, &admin1, "site3").await;
            entry["state"]["incomingCommError"]
                .is_object()
                .then_some(entry)
        },
    )
    .await;
    for direction in ["incomingCommError", "outgoingCommError"] {
        assert_eq!(
            entry["state"][direction]["code"],
            json!("RemoteAuthenticationFailure"),
            "{direction}: {entry}"
        );
    }
    // A refused certificate is not a reachability problem: the circuit stays closed.
    assert_eq!(entry["link"]["circuit"], json!("closed"), "{entry}");

    for r in &refusals {
        r.expect(401, Some("RemoteAuthenticationFailure"));
        let m = r.msg();
        assert!(
            m.contains("site1") && m.contains("TLS handshake") && m.contains("certificate"),
            "message should name the site and the TLS step: {r:?}"
        );
    }
    let admin3 = site3.login("admin").await;
    let entry = site_entry(&site3, &admin3, "site1").await;
    assert_eq!(
        entry["state"]["outgoingCommError"]["code"],
        json!("RemoteAuthenticationFailure"),
        "{entry}"
    );
    assert_eq!(entry["link"]["circuit"], json!("closed"), "{entry}");
}

/// Sites run by two organisations, each with its own CA, pair by recording each other's CA
/// as the peer's trust anchor (`[[peer]] ca`): both directions of the link work, with no
/// certificate from a shared CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_with_their_own_cas_pair_by_recording_each_others_anchor() {
    let fed = Federation::init(&["site1", "site3"]);
    // site3 moves to an organisation of its own: its CA, its certificate from that CA, and
    // that CA as its `[tls] ca`.
    let org3 = certificate_from_a_new_ca(&fed, "site3", "org3");
    let org3_ca = org3.join("ca.pem");
    let org1_ca = fed.fed_dir().join("ca.pem");
    let edit = |site: &str, peer: &str, own_ca: Option<&Path>, peer_ca: &Path| {
        let path = fed.config_path(site);
        let mut text = std::fs::read_to_string(&path).expect("read the site config");
        if let Some(own) = own_ca {
            text = text.replace(
                "ca = \"ca.pem\"",
                &format!("ca = {:?}", own.display().to_string()),
            );
        }
        let entry = format!("[[peer]]\nname = \"{peer}\"\n");
        assert!(
            text.contains(&entry),
            "no [[peer]] {peer} in {}",
            path.display()
        );
        text = text.replace(
            &entry,
            &format!("{entry}ca = {:?}\n", peer_ca.display().to_string()),
        );
        std::fs::write(&path, text).expect("write the site config");
    };
    edit("site1", "site3", None, &org3_ca);
    edit("site3", "site1", Some(&org3_ca), &org1_ca);

    let site1 = fed.start("site1").await;
    let site3 = fed.start("site3").await;
    // site3's certificate chains to the CA it names: no problem reported.
    let admin3 = site3.login("admin").await;
    let own = site3.get("/sites", Some(&admin3)).await;
    assert!(
        own.expect(200, None)[0].get("certificateError").is_none(),
        "{own:?}"
    );

    // site1 -> site3: extend, then read site3's task; the answer is site3's own.
    let task = create_tasks(&site3, &[new_task("alice", "sync", "vm", "vm-1", "web")]).await;
    let id = id_of(&task[0]);
    let alice1 = login_extended(&site1, "alice", &["site3"]).await;
    let remote = site1
        .get(&format!("/tasks/{id}?site=site3"), Some(&alice1))
        .await;
    let alice3 = site3.login("alice").await;
    let local = site3.get(&format!("/tasks/{id}"), Some(&alice3)).await;
    assert_eq!(remote.expect(200, None), local.expect(200, None));

    // site3 -> site1: the other direction checks site1 against org1's CA.
    let alice3 = login_extended(&site3, "alice", &["site1"]).await;
    let task1 = create_tasks(&site1, &[new_task("alice", "sync", "vm", "vm-2", "db")]).await;
    let id1 = id_of(&task1[0]);
    site3
        .get(&format!("/tasks/{id1}?site=site1"), Some(&alice3))
        .await
        .expect(200, None);

    // Neither side reports a failing link, and each shows the other's anchor as
    // `sitegate pki fingerprint` prints the CA file it was given.
    let fingerprint = |ca: &Path| {
        let printed = sitegate(
            &fed,
            [OsStr::new("pki"), OsStr::new("fingerprint"), ca.as_os_str()],
        );
        printed.trim().to_owned()
    };
    let admin1 = site1.login("admin").await;
    for (site, admin, peer, ca) in [
        (&site1, &admin1, "site3", &org3_ca),
        (&site3, &admin3, "site1", &org1_ca),
    ] {
        let entry = site_entry(site, admin, peer).await;
        for direction in ["incomingCommError", "outgoingCommError"] {
            assert!(entry["state"][direction].is_null(), "{direction}: {entry}");
        }
        assert_eq!(
            entry["link"]["trustAnchor"],
            json!({"source": "peer", "sha256": fingerprint(ca)}),
            "{entry}"
        );
    }
    assert_ne!(fingerprint(&org1_ca), fingerprint(&org3_ca));
    assert_eq!(
        fingerprint(&org1_ca).len(),
        32 * 3 - 1,
        "32 hex pairs and colons"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The peer listener refuses clients without a federation certificate naming a peer
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_listener_refuses_clients_that_are_not_peers() {
    require_curl();
    let fed = Federation::init(&["site1", "site2", "site3"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let fed_dir = fed.fed_dir();

    // Control: a configured peer's certificate gets an answer, so the refusals below are the
    // listener's and not the client's setup.
    let ok = curl_peer_link(
        &fed,
        "site1",
        Some(&fed_dir.join("site2.pem")),
        "/healthz",
        None,
    );
    assert_eq!((ok.exit, ok.http_code.as_str()), (Some(0), "200"), "{ok:?}");

    // No client certificate: refused during the handshake, no HTTP answer.
    let r = curl_peer_link(&fed, "site1", None, "/healthz", None);
    assert!(
        r.exit != Some(0) && r.http_code == "000" && r.body.is_empty(),
        "{r:?}"
    );

    // A certificate from the federation CA naming a site that is not a configured peer.
    let stranger = fed.dir.path().join("stranger");
    issue_certificate(&fed, &fed_dir, "site9", &stranger, 30);
    let r = curl_peer_link(
        &fed,
        "site1",
        Some(&stranger.join("site9.pem")),
        "/healthz",
        None,
    );
    assert!(
        r.exit != Some(0) && r.http_code == "000" && r.body.is_empty(),
        "{r:?}"
    );
    // Nor may a peer's certificate be used to reach the listener under another site's name:
    // site1's own certificate is not a peer of site1.
    let r = curl_peer_link(
        &fed,
        "site1",
        Some(&fed_dir.join("site1.pem")),
        "/healthz",
        None,
    );
    assert!(r.exit != Some(0) && r.http_code == "000", "{r:?}");

    // Plain HTTP gets no HTTP answer.
    let port = fed.peer_port("site1");
    let answer = tokio::task::spawn_blocking(move || {
        raw::exchange_until_close(port, raw::PLAIN_HTTP_REQUEST)
    })
    .await
    .expect("plain HTTP exchange");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("HTTP/") && !text.contains("status"),
        "plain HTTP got an HTTP answer: {text:?}"
    );

    // The loop guard, seen from a peer: over the peer link a request naming another site is
    // SiteNotFound, never forwarded; the receiving site's own name is answered locally.
    let task = create_tasks(&site2, &[new_task("alice", "sync", "vm", "vm-1", "web")]).await;
    let id = id_of(&task[0]);
    let alice2 = site2.login("alice").await;
    let as_site1 = Some(fed_dir.join("site1.pem"));
    for path in [
        "/tasks?site=site3".to_owned(),
        "/tasks?site=site1".to_owned(),
        format!("/tasks/{id}?site=site3"),
    ] {
        let r = curl_peer_link(&fed, "site2", as_site1.as_deref(), &path, Some(&alice2));
        assert_eq!(r.http_code, "404", "{path}: {r:?}");
        let body: Value = serde_json::from_str(&r.body).expect("an error envelope");
        assert_eq!(body["code"], json!("SiteNotFound"), "{path}: {r:?}");
    }
    for path in [format!("/tasks/{id}?site=site2"), format!("/tasks/{id}")] {
        let r = curl_peer_link(&fed, "site2", as_site1.as_deref(), &path, Some(&alice2));
        assert_eq!(r.http_code, "200", "{path}: {r:?}");
        let body: Value = serde_json::from_str(&r.body).expect("a task");
        assert_eq!(body["id"], json!(id), "{r:?}");
    }
    // The peer listener is not a way around the caller's own authentication.
    let r = curl_peer_link(&fed, "site2", as_site1.as_deref(), "/tasks", None);
    assert_eq!(r.http_code, "401", "{r:?}");
    // site1 served the checks above until here.
    drop(site1);
}

// ---------------------------------------------------------------------------------------------
// 6. A killed peer is reported quickly and used again once it is back
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_fails_fast_and_recovers_after_restart() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed
        .start_with_env("site1", &[("SITEGATE_PEERING__PROBE_INTERVAL_MS", "300")])
        .await;
    let mut site2 = fed.start("site2").await;
    let task = create_tasks(&site2, &[new_task("alice", "sync", "vm", "vm-1", "web")]).await;
    let id = id_of(&task[0]);
    let path = format!("/tasks/{id}?site=site2");

    let alice1 = login_extended(&site1, "alice", &["site2"]).await;
    let admin1 = site1.login("admin").await;
    let before = site1.get(&path, Some(&alice1)).await;
    before.expect(200, None);
    let entry = site_entry(&site1, &admin1, "site2").await;
    assert_eq!(entry["state"]["outgoingCommError"], Value::Null, "{entry}");

    site2.kill9();

    let started = Instant::now();
    let r = site1.get(&path, Some(&alice1)).await;
    let took = started.elapsed();
    r.expect(502, Some("RemoteSiteUnavailable"));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(r.msg().contains("site2"), "{r:?}");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in seconds: {r:?}"));
    assert!(retry_after >= 1, "{r:?}");
    // Every read kind fails the same way, and fast.
    for (method, p, body) in [
        (Method::GET, "/tasks?site=site2".to_owned(), None),
        (
            Method::POST,
            "/tasks/poll?site=site2".to_owned(),
            Some(json!([id])),
        ),
    ] {
        let started = Instant::now();
        let r = site1.call(method, &p, Some(&alice1), body.as_ref()).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{p}");
        r.expect(502, Some("RemoteSiteUnavailable"));
    }

    let entry = wait_for(
        "site1's /sites to report site2's link as failing",
        Duration::from_secs(5),
        || async {
            let entry = site_entry(&site1, &admin1, "site2").await;
            entry["state"]["outgoingCommError"]
                .is_object()
                .then_some(entry)
        },
    )
    .await;
    assert_eq!(
        entry["state"]["outgoingCommError"]["code"],
        json!("RemoteSiteUnavailable"),
        "{entry}"
    );
    assert!(entry["link"]["lastFailure"].is_i64(), "{entry}");

    // Back with the same config and data: site1 uses it again, without a restart or a new
    // extension (the remote session is in site2's store).
    site2.start().await;
    let after = wait_for(
        "remote reads via site1 to work again",
        Duration::from_secs(10),
        || async {
            let r = site1.get(&path, Some(&alice1)).await;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert_eq!(after.body, before.body);
    site1
        .get("/tasks?site=site2", Some(&alice1))
        .await
        .expect(200, None);
    let entry = wait_for(
        "site1's /sites to report site2's link as healthy",
        Duration::from_secs(5),
        || async {
            let entry = site_entry(&site1, &admin1, "site2").await;
            (entry["state"]["outgoingCommError"].is_null()
                && entry["link"]["circuit"] == json!("closed"))
            .then_some(entry)
        },
    )
    .await;
    assert!(entry["link"]["lastSuccess"].is_i64(), "{entry}");
}

// ---------------------------------------------------------------------------------------------
// 7. Certificates rotate without a failed request
// ---------------------------------------------------------------------------------------------

/// Reads at site1 for a task at site2, every ~20 ms until stopped, counting the outcomes.
struct ReadLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    handle: tokio::task::JoinHandle<()>,
}

impl ReadLoop {
    fn start(site1: &Site, token: &str, path: String) -> ReadLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (client, url, token) = (site1.client.clone(), site1.url(&path), token.to_owned());
        let handle = tokio::spawn({
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            async move {
                while !stop.load(Ordering::SeqCst) {
                    let outcome = client
                        .get(&url)
                        .header("X-VCAV-Auth", &token)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    match outcome {
                        Ok(r) if r.status().as_u16() == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(format!("{status}: {text}"));
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        ReadLoop {
            stop,
            ok,
            failures,
            handle,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more reads have succeeded than now.
    async fn wait_for_more(&self, n: u64) {
        let target = self.ok() + n;
        wait_for("more successful reads", Duration::from_secs(10), || async {
            (self.ok() >= target).then_some(())
        })
        .await;
    }

    /// Stops the loop; returns the successes and the failures.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("the read loop panicked");
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

/// Epoch milliseconds `days` from now.
fn days_from_now_millis(days: i64) -> i64 {
    support::now_millis() + days * 86_400_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_failed_request() {
    require_curl();
    let fed = Federation::init(&["site1", "site2", "site3"]);
    let fed_dir = fed.fed_dir();
    // site1 reloads through its file watcher (every second); site2 only on SIGHUP.
    let site1 = fed
        .start_with_env(
            "site1",
            &[("SITEGATE_PEERING__TLS_RELOAD_INTERVAL_SECS", "1")],
        )
        .await;
    let site2 = fed
        .start_with_env(
            "site2",
            &[("SITEGATE_PEERING__TLS_RELOAD_INTERVAL_SECS", "3600")],
        )
        .await;
    let task = create_tasks(&site2, &[new_task("alice", "sync", "vm", "vm-1", "web")]).await;
    let id = id_of(&task[0]);
    let alice1 = login_extended(&site1, "alice", &["site2"]).await;
    let admin1 = site1.login("admin").await;
    let as_site1: PathBuf = fed_dir.join("site1.pem");
    let as_site3: PathBuf = fed_dir.join("site3.pem");

    let old_site2 = served_certificate_expiry(&fed, "site2", &as_site1)
        .expect("site2 serves a certificate to site1's");
    let old_site1 = served_certificate_expiry(&fed, "site1", &as_site3)
        .expect("site1 serves a certificate to site3's");
    let entry = site_entry(&site1, &admin1, "site2").await;
    let old_peer_expiry = entry["link"]["peerCertificateExpiry"]
        .as_i64()
        .unwrap_or_else(|| panic!("no peerCertificateExpiry after a read: {entry}"));

    let reads = ReadLoop::start(&site1, &alice1, format!("/tasks/{id}?site=site2"));
    reads.wait_for_more(10).await;

    // site2: a new certificate from the same CA, valid 30 days instead of 365, and SIGHUP.
    issue_certificate(&fed, &fed_dir, "site2", &fed_dir, 30);
    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(site2.pid().to_string())
        .status()
        .expect("run kill -HUP");
    assert!(hup.success());
    let new_site2 = wait_for(
        "site2 to serve its new certificate",
        Duration::from_secs(10),
        || {
            let seen = served_certificate_expiry(&fed, "site2", &as_site1);
            let old = old_site2.clone();
            async move { seen.filter(|s| *s != old) }
        },
    )
    .await;
    reads.wait_for_more(10).await;
    assert!(site2.is_running(), "SIGHUP must not stop site2");

    // site1: a new certificate (60 days), picked up by its file watcher, no signal.
    issue_certificate(&fed, &fed_dir, "site1", &fed_dir, 60);
    let new_site1 = wait_for(
        "site1 to serve its new certificate",
        Duration::from_secs(10),
        || {
            let seen = served_certificate_expiry(&fed, "site1", &as_site3);
            let old = old_site1.clone();
            async move { seen.filter(|s| *s != old) }
        },
    )
    .await;
    assert_ne!(new_site1, new_site2);
    reads.wait_for_more(10).await;
    let (ok, failures) = reads.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} reads failed during the rotation: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok >= 30, "only {ok} reads");

    // New peer-link connections with the new certificates on both ends succeed: a site
    // started now connects to both and reads at site2.
    let site3 = fed.start("site3").await;
    let alice3 = login_extended(&site3, "alice", &["site2", "site1"]).await;
    let r = site3
        .get(&format!("/tasks/{id}?site=site2"), Some(&alice3))
        .await;
    assert_eq!(r.expect(200, None)["id"], json!(id));
    let admin3 = site3.login("admin").await;
    let entry = site_entry(&site3, &admin3, "site2").await;
    let new_peer_expiry = entry["link"]["peerCertificateExpiry"]
        .as_i64()
        .unwrap_or_else(|| panic!("no peerCertificateExpiry: {entry}"));
    assert_ne!(new_peer_expiry, old_peer_expiry, "{entry}");
    let hour = 3_600_000;
    assert!(
        (new_peer_expiry - days_from_now_millis(30)).abs() < hour,
        "site2's certificate as site3 sees it should expire in 30 days: {entry}"
    );
    assert!(
        (old_peer_expiry - days_from_now_millis(365)).abs() < hour,
        "site2's first certificate should expire in 365 days: {old_peer_expiry}"
    );
    // site2 took site1's new client certificate: site2 -> site1 works over a new connection too.
    let alice2 = login_extended(&site2, "alice", &["site1"]).await;
    site2
        .get("/tasks?site=site1", Some(&alice2))
        .await
        .expect(200, None);
    let entry = site_entry(&site3, &admin3, "site1").await;
    let site1_expiry = entry["link"]["peerCertificateExpiry"]
        .as_i64()
        .unwrap_or_else(|| panic!("no peerCertificateExpiry: {entry}"));
    assert!(
        (site1_expiry - days_from_now_millis(60)).abs() < hour,
        "site1's certificate as site3 sees it should expire in 60 days: {entry}"
    );
    // site1's own /sites entry reports its new certificate.
    let r = site1.get("/sites", Some(&admin1)).await;
    let local = r
        .expect(200, None)
        .as_array()
        .and_then(|l| l.iter().find(|s| s["isLocal"] == json!(true)).cloned())
        .unwrap_or_else(|| panic!("no local site in {}", r.text));
    let own = local["certificateExpiry"].as_i64().unwrap_or_default();
    assert!(
        (own - days_from_now_millis(60)).abs() < hour,
        "site1's own certificateExpiry after the reload: {local}"
    );
}
