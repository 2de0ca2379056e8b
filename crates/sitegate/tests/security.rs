//! Security scenarios over real `sitegate serve` processes.
//!
//! Covered here (what `federation.rs` already proves is not repeated: a peer certificate from
//! another CA, no client certificate, a federation certificate naming a non-peer, plain HTTP to
//! the peer link, and the basic cross-site isolation of Get One / Query / Poll):
//! 1. Broken object-level authorization: no endpoint, parameter combination, poll list,
//!    remote `site` or extended session lets bob see or touch alice's tasks, on either site;
//!    every refusal is identical to the one for a missing task.
//! 2. Sessions: logout is immediate (and reaches the peer), idle and maximum-age expiry, token
//!    format and entropy.
//! 3. Login throttling per user name and per address: 429 `NotAuthenticated` with
//!    `Retry-After`, backoff, reset on success, peer-link logins counted by name only.
//! 4. The client API over HTTPS: TLS 1.2 and 1.3 with ALPN; TLS 1.1 and plain HTTP refused.
//! 5. The peer link refuses an expired certificate (either way), a server certificate naming
//!    another site, and a TCP connection that never starts a handshake.
//! 6. Secrets (passwords, tokens, the PostgreSQL password) never reach the logs, even at
//!    debug level.
//!
//! Raw TLS checks use the `curl` tool (OpenSSL) and hand-made ClientHello records, so the
//! listeners are checked against something other than their own TLS stack.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sitegate_testkit::curl::{curl, curl_peer_link, peer_link_args, require_curl};
use sitegate_testkit::raw::{self, exchange_until_close};
use sitegate_testkit::site as support;
use support::{
    assert_envelope, authenticated_sites, client_from, command, create_tasks, id_of, item_ids,
    json_lines, log_field, new_task, run_with_deadline, Federation, Proc, Reply, Site,
    COMMAND_DEADLINE, PASSWORD, POLL_INTERVAL, START_DEADLINE,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn extend(site: &Site, token: &str, body: Value) -> Reply {
    site.post("/sessions/extend", Some(token), &body).await
}

/// The `Retry-After` header in whole seconds.
fn retry_after(reply: &Reply) -> u64 {
    reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in seconds: {reply:?}"))
}

/// Asserts that `reply`, about `id`, is exactly what the caller gets for `missing_id`, a task
/// that does not exist: same status, content type and body, once the ID is set aside.
fn assert_same_as_missing(what: &str, reply: &Reply, id: &str, missing: &Reply, missing_id: &str) {
    assert_eq!(
        reply.status, missing.status,
        "{what}: {reply:?} vs {missing:?}"
    );
    assert_eq!(
        reply.header("content-type"),
        missing.header("content-type"),
        "{what}"
    );
    assert_eq!(
        reply.text.replace(id, "<id>"),
        missing.text.replace(missing_id, "<id>"),
        "{what}: the refusal differs from a missing task's"
    );
}

/// The task IDs of a poll answer's rows (the column named `id`).
fn poll_ids(body: &Value) -> Vec<String> {
    let names = body["propertyNames"]
        .as_array()
        .unwrap_or_else(|| panic!("no propertyNames in {body}"));
    let column = names
        .iter()
        .position(|n| n == "id")
        .unwrap_or_else(|| panic!("no id column in {body}"));
    body["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no values in {body}"))
        .iter()
        .map(|row| row[column].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A TLS ClientHello record offering `version` (0x0302 = TLS 1.1, 0x0303 = TLS 1.2) and
/// nothing newer: ECDHE-ECDSA/RSA AES-GCM suites, the usual groups and signature schemes,
/// and no `supported_versions` extension (which would offer TLS 1.3).
fn client_hello(version: u16) -> Vec<u8> {
    fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend((data.len() as u16).to_be_bytes());
        out.extend(data);
        out
    }
    let mut extensions = Vec::new();
    // supported_groups: x25519, secp256r1, secp384r1.
    extensions.extend(extension(
        0x000a,
        &[0x00, 0x06, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18],
    ));
    // ec_point_formats: uncompressed.
    extensions.extend(extension(0x000b, &[0x01, 0x00]));
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256.
    extensions.extend(extension(
        0x000d,
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    ));
    // extended_master_secret and renegotiation_info, as every modern client sends.
    extensions.extend(extension(0x0017, &[]));
    extensions.extend(extension(0xff01, &[0x00]));

    let mut body = version.to_be_bytes().to_vec();
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)));
    body.push(0); // no session ID
    let suites: [u16; 4] = [0xc02b, 0xc02f, 0xc02c, 0xc030];
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([0x01, 0x00]); // compression: null only
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);

    let mut handshake = vec![0x01];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    // The record layer says TLS 1.0, as real clients do for compatibility.
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Certificates made in the test with rcgen: a CA and leaves it signs.
struct TestPki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl TestPki {
    /// A new CA of its own.
    fn new_ca() -> TestPki {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "security test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestPki {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The federation CA that `sitegate init` wrote.
    fn federation(fed: &Federation) -> TestPki {
        let read = |name: &str| {
            std::fs::read_to_string(fed.fed_dir().join(name))
                .unwrap_or_else(|e| panic!("read {name}: {e}"))
        };
        let (ca_pem, ca_key) = (read("ca.pem"), read("ca.key"));
        let key = rcgen::KeyPair::from_pem(&ca_key).expect("the federation CA key");
        TestPki {
            issuer: rcgen::Issuer::from_ca_cert_pem(&ca_pem, key).expect("the federation CA"),
            ca_pem,
        }
    }

    /// A leaf for `dns_names` and `ips`, valid from `not_before` to `not_after` days from now,
    /// written to `<dir>/<name>.pem` and `.key`; returns the `.pem` path.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
        valid_days: (i64, i64),
    ) -> PathBuf {
        let mut params = rcgen::CertificateParams::new(
            dns_names
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        )
        .expect("certificate parameters");
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            dns_names.first().copied().unwrap_or(name),
        );
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(valid_days.0);
        params.not_after = now + time::Duration::days(valid_days.1);
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        std::fs::create_dir_all(dir).expect("certificate directory");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).expect("write the certificate");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())
            .expect("write the key");
        pem
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Broken object-level authorization
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_or_parameter_lets_one_user_see_anothers_task() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;

    let at1 = create_tasks(
        &site1,
        &[
            new_task("alice", "sync", "vm", "vm-a1", "alice-vm"),
            new_task("bob", "sync", "vm", "vm-b1", "bob-vm"),
        ],
    )
    .await;
    let at2 = create_tasks(
        &site2,
        &[
            new_task("alice", "sync", "vm", "vm-a2", "alice-vm"),
            new_task("bob", "sync", "vm", "vm-b2", "bob-vm"),
            new_task("alice", "restore", "disk", "disk-a2", "alice-disk"),
        ],
    )
    .await;
    let (alice1_task, bob1_task) = (id_of(&at1[0]), id_of(&at1[1]));
    let (alice2_task, bob2_task, alice2_done) = (id_of(&at2[0]), id_of(&at2[1]), id_of(&at2[2]));
    // One of alice's remote tasks is final, so site1 keeps the answer about it: the cache must
    // not hand alice's answer to bob.
    let svc2 = site2.login("svc").await;
    site2
        .patch(
            &format!("/tasks/{alice2_done}"),
            Some(&svc2),
            &json!({"state": "SUCCEEDED", "resultType": "text", "result": {"secret": "alice"}}),
        )
        .await
        .expect(200, None);
    let alice_ids = [
        alice1_task.clone(),
        alice2_task.clone(),
        alice2_done.clone(),
    ];
    let bob_ids = [bob1_task.clone(), bob2_task.clone()];

    let alice = site1.login("alice").await;
    site1
        .extend_multisite(&alice, "site2")
        .await
        .expect(200, None);
    let bob = site1.login("bob").await;
    // bob cannot ask for a multisite session in alice's name: the body has no user field.
    let r = extend(
        &site1,
        &bob,
        json!({"type": "multisite", "site": "site2", "user": "alice"}),
    )
    .await;
    r.expect(400, Some("BadUserInput"));
    // Nor log in at site2 as alice without her password.
    let r = extend(
        &site1,
        &bob,
        json!({"type": "credentials", "site": "site2", "username": "alice", "password": "guess"}),
    )
    .await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    let r = site1.get("/sessions", Some(&bob)).await;
    assert_eq!(authenticated_sites(r.expect(200, None)), ["site1"]);
    // The peers' session endpoint is not part of the client API.
    let r = site1
        .post("/peer/sessions", Some(&bob), &json!({"user": "alice"}))
        .await;
    r.expect(404, Some("NotFound"));
    assert!(r.header("X-VCAV-Auth").is_none(), "{r:?}");
    // Now bob's own extension; it is bob's session at site2.
    let r = site1.extend_multisite(&bob, "site2").await;
    let details = r.expect(200, None);
    assert_eq!(details["user"], json!("bob"), "{details}");
    assert_eq!(authenticated_sites(details), ["site1", "site2"]);
    let r = site1.get("/tasks?site=site2", Some(&bob)).await;
    assert_eq!(
        item_ids(r.expect(200, None)),
        std::slice::from_ref(&bob2_task),
        "{}",
        r.text
    );

    // Controls: the owner and an administrator see every one of alice's tasks by every route,
    // so the refusals below are authorization, not a broken setup.
    // (A multisite session is role user at most at the peer, so the administrator's control
    // at site2 logs in there with site2's admin credentials.)
    let admin = site1.login("admin").await;
    extend(
        &site1,
        &admin,
        json!({"type": "credentials", "site": "site2", "vcdUsername": "admin", "vcdPassword": PASSWORD}),
    )
    .await
    .expect(200, None);
    for token in [&alice, &admin] {
        site1
            .get(&format!("/tasks/{alice1_task}"), Some(token))
            .await
            .expect(200, None);
        for id in [&alice2_task, &alice2_done] {
            let r = site1
                .get(&format!("/tasks/{id}?site=site2"), Some(token))
                .await;
            assert_eq!(r.expect(200, None)["user"], json!("alice"));
        }
    }
    let r = site1
        .get("/tasks?site=site2&user=alice", Some(&admin))
        .await;
    assert_eq!(r.expect(200, None)["total"], json!(2), "{}", r.text);

    // Get One, by every route, while alice reads the same tasks at the same time (shared
    // remote reads must not cross users).
    let missing = uuid::Uuid::new_v4().to_string();
    for site_param in ["", "?site=site1", "?site=site2"] {
        let missing_reply = site1
            .get(&format!("/tasks/{missing}{site_param}"), Some(&bob))
            .await;
        missing_reply.expect(404, Some("TaskNotFound"));
        for id in &alice_ids {
            let path = format!("/tasks/{id}{site_param}");
            let (by_bob, by_alice) =
                tokio::join!(site1.get(&path, Some(&bob)), site1.get(&path, Some(&alice)));
            assert_same_as_missing(&path, &by_bob, id, &missing_reply, &missing);
            assert!(!by_bob.text.contains("secret"), "{by_bob:?}");
            // alice's own read by the same route: hers where the task lives, missing elsewhere.
            let lives_here = (site_param == "?site=site2") == (*id != alice1_task);
            assert_eq!(
                by_alice.status,
                if lives_here { 200 } else { 404 },
                "{path}"
            );
        }
    }
    // Over and over, concurrently: no answer cached or shared for alice ever reaches bob.
    let path = format!("/tasks/{alice2_done}?site=site2");
    for _ in 0..5 {
        let (by_alice, by_bob) =
            tokio::join!(site1.get(&path, Some(&alice)), site1.get(&path, Some(&bob)));
        by_alice.expect(200, None);
        by_bob.expect(404, Some("TaskNotFound"));
    }

    // Query: `ids` listing everyone's tasks, with every site parameter, and other filters.
    let all_ids = alice_ids
        .iter()
        .chain(&bob_ids)
        .cloned()
        .chain([missing.clone()])
        .collect::<Vec<_>>()
        .join(",");
    for (query, bob_expected) in [
        (format!("ids={all_ids}"), vec![bob1_task.clone()]),
        (format!("site=site1&ids={all_ids}"), vec![bob1_task.clone()]),
        (format!("site=site2&ids={all_ids}"), vec![bob2_task.clone()]),
        ("resourceName=alice-vm".to_owned(), vec![]),
        ("site=site2&resourceName=alice-disk".to_owned(), vec![]),
        ("site=site2&type=restore".to_owned(), vec![]),
        ("site=site2&state=SUCCEEDED".to_owned(), vec![]),
        ("sort=user&limit=1000".to_owned(), vec![bob1_task.clone()]),
        ("site=site2&sort=-user".to_owned(), vec![bob2_task.clone()]),
    ] {
        let r = site1.get(&format!("/tasks?{query}"), Some(&bob)).await;
        let body = r.expect(200, None);
        assert_eq!(item_ids(body), bob_expected, "{query}: {}", r.text);
        assert_eq!(
            body["total"],
            json!(bob_expected.len()),
            "{query}: {}",
            r.text
        );
    }

    // The `user` filter is for administrators only, wherever it points and however spelled.
    for query in [
        "user=alice",
        "user=bob",
        "site=site2&user=alice",
        "site=site1&user=alice",
        &format!("ids={alice1_task}&user=alice"),
        &format!("site=site2&ids={alice2_task}&user=alice"),
        "user=%61lice",
    ] {
        let r = site1.get(&format!("/tasks?{query}"), Some(&bob)).await;
        r.expect(403, Some("Forbidden"));
    }
    // Parameter tricks: whatever the answer, never one of alice's tasks, never a 5xx.
    for query in [
        format!("site=site1&site=site2&ids={all_ids}"),
        format!("site=site2&site=site1&ids={all_ids}"),
        format!("ids={alice1_task}&ids={bob1_task}"),
        format!("Site=site2&ids={all_ids}"),
        format!("site=SITE2&ids={all_ids}"),
        format!("site=site2%00&ids={all_ids}"),
        format!("site=&ids={all_ids}"),
        format!("USER=alice&ids={all_ids}"),
        format!("user=&ids={all_ids}"),
        format!("ids={}", alice1_task.to_uppercase()),
        format!("ids=%20{alice1_task}"),
        "owner=alice".to_owned(),
        "user[]=alice".to_owned(),
        "user=alice&user=bob".to_owned(),
    ] {
        let r = site1.get(&format!("/tasks?{query}"), Some(&bob)).await;
        assert!(r.status < 500, "{query}: {r:?}");
        // An error may echo the caller's own input, but no answer holds alice's task data.
        for data in ["vm-a1", "vm-a2", "disk-a2", "alice-vm", "alice-disk"] {
            assert!(
                !r.text.contains(data),
                "{query} showed alice's {data}: {r:?}"
            );
        }
        if r.status == 200 {
            for id in &alice_ids {
                assert!(!r.text.contains(id), "{query} listed alice's {id}: {r:?}");
            }
            let items = r.body["items"].as_array().expect("items");
            assert!(
                items.iter().all(|t| t["user"] == json!("bob")),
                "{query}: {r:?}"
            );
        } else {
            assert_envelope(&r.body, r.body["code"].as_str().unwrap_or_default());
        }
    }

    // Poll lists mixing everyone's IDs, local and remote, and a missing one.
    let mixed: Vec<String> = alice_ids
        .iter()
        .chain(&bob_ids)
        .cloned()
        .chain([missing.clone()])
        .collect();
    for (site_param, bob_expected) in [
        ("", vec![bob1_task.clone()]),
        ("?site=site1", vec![bob1_task.clone()]),
        ("?site=site2", vec![bob2_task.clone()]),
    ] {
        let path = format!("/tasks/poll{site_param}");
        let r = site1.post(&path, Some(&bob), &json!(mixed)).await;
        assert_eq!(poll_ids(r.expect(200, None)), bob_expected, "{path}");
        for id in &alice_ids {
            assert!(!r.text.contains(id), "{path}: {}", r.text);
        }
        // Alice's IDs alone give exactly what missing IDs give: an empty list.
        let only_alice = site1.post(&path, Some(&bob), &json!(alice_ids)).await;
        let only_missing = site1
            .post(
                &path,
                Some(&bob),
                &json!([uuid::Uuid::new_v4().to_string()]),
            )
            .await;
        assert_eq!(only_alice.body, only_missing.body, "{path}");
        assert_eq!(poll_ids(&only_alice.body), Vec::<String>::new());
    }

    // PATCH: bob is no writer, so it is refused, and exactly as for a task that does not
    // exist; alice's task is untouched.
    for site_param in ["", "?site=site1", "?site=site2"] {
        let patch = json!({"progress": 99});
        let missing_reply = site1
            .patch(&format!("/tasks/{missing}{site_param}"), Some(&bob), &patch)
            .await;
        missing_reply.expect(403, Some("Forbidden"));
        for id in &alice_ids {
            let path = format!("/tasks/{id}{site_param}");
            let r = site1.patch(&path, Some(&bob), &patch).await;
            assert_same_as_missing(&path, &r, id, &missing_reply, &missing);
        }
    }
    let r = site1
        .get(&format!("/tasks/{alice1_task}"), Some(&alice))
        .await;
    assert_eq!(r.expect(200, None)["progress"], json!(0));
    let r = site1
        .get(&format!("/tasks/{alice2_task}?site=site2"), Some(&alice))
        .await;
    assert_eq!(r.expect(200, None)["progress"], json!(0));

    // The same from bob's own session at site2: nothing of alice's there either.
    let bob2 = site2.login("bob").await;
    for id in &alice_ids {
        site2
            .get(&format!("/tasks/{id}"), Some(&bob2))
            .await
            .expect(404, Some("TaskNotFound"));
    }
    // And site2 never issued bob's extension in alice's name.
    let issued: Vec<String> = json_lines(&site2.stderr())
        .iter()
        .filter(|l| {
            l.to_string().contains("issued a multisite session")
                && log_field(l, "from_peer").as_deref() == Some("site1")
        })
        .filter_map(|l| log_field(l, "user"))
        .collect();
    assert_eq!(issued, ["alice", "bob"], "multisite sessions site2 issued");
}

// ---------------------------------------------------------------------------------------------
// 2. Sessions: logout, expiry, tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_takes_effect_at_once_here_and_at_the_peer() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let task = create_tasks(&site2, &[new_task("bob", "sync", "vm", "vm-1", "bob-vm")]).await;
    let path = format!("/tasks/{}?site=site2", id_of(&task[0]));

    let bob = site1.login("bob").await;
    let other = site1.login("bob").await;
    site1
        .extend_multisite(&bob, "site2")
        .await
        .expect(200, None);
    site1.get(&path, Some(&bob)).await.expect(200, None);

    let r = site1.delete("/sessions", Some(&bob)).await;
    assert_eq!(r.status, 204, "{r:?}");
    // The very next request with the token is refused, locally and for remote reads.
    for r in [
        site1.get("/sessions", Some(&bob)).await,
        site1.get(&path, Some(&bob)).await,
        site1.get("/tasks", Some(&bob)).await,
        site1.delete("/sessions", Some(&bob)).await,
    ] {
        r.expect(401, Some("NotAuthenticated"));
    }
    // Only that session ended: bob's other one still works.
    site1.get("/sessions", Some(&other)).await.expect(200, None);

    // The session held at site2 was ended there: site2 answered site1's DELETE /sessions over
    // the peer link with 204, which it sends only after deleting the session.
    support::wait_for(
        "site2 to log the peer's logout of bob's remote session",
        Duration::from_secs(10),
        || {
            let lines = json_lines(&site2.stderr());
            async move {
                let logged_out = lines.iter().any(|l| {
                    log_field(l, "from_peer").as_deref() == Some("site1")
                        && l.to_string().contains("logged out")
                        && log_field(l, "user").as_deref() == Some("bob")
                });
                let answered = lines.iter().any(|l| {
                    log_field(l, "target").as_deref() == Some("sitegate::access")
                        && log_field(l, "from_peer").as_deref() == Some("site1")
                        && log_field(l, "status").as_deref() == Some("204")
                        && l.to_string().contains("DELETE /sessions")
                });
                (logged_out && answered).then_some(())
            }
        },
    )
    .await;

    // A new login and extension work as before.
    let again = site1.login("bob").await;
    site1
        .extend_multisite(&again, "site2")
        .await
        .expect(200, None);
    site1.get(&path, Some(&again)).await.expect(200, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_old_sessions_are_refused() {
    let fed = Federation::init(&["site1"]);
    let site = fed
        .start_with_env(
            "site1",
            &[
                ("SITEGATE_AUTH__SESSION_IDLE_TIMEOUT_SECS", "2"),
                ("SITEGATE_AUTH__SESSION_MAX_AGE_SECS", "5"),
            ],
        )
        .await;

    // Idle: unused for longer than the idle timeout. (The sleep is the behaviour under test:
    // the session must not be used while it runs.)
    let idle = site.login("alice").await;
    site.get("/sessions", Some(&idle)).await.expect(200, None);
    // In use: a session used every 400 ms outlives the idle timeout...
    let busy = site.login("alice").await;
    let busy_since = Instant::now();
    let mut idle_checked = false;
    let ended = loop {
        let r = site.get("/sessions", Some(&busy)).await;
        let age = busy_since.elapsed();
        if !idle_checked && age > Duration::from_millis(2600) {
            // ...while the unused one has ended.
            let r = site.get("/sessions", Some(&idle)).await;
            r.expect(401, Some("NotAuthenticated"));
            assert!(r.msg().contains("expired"), "{r:?}");
            // It is gone, not only refused.
            let r = site.get("/sessions", Some(&idle)).await;
            r.expect(401, Some("NotAuthenticated"));
            idle_checked = true;
        }
        if r.status != 200 {
            break (r, age);
        }
        assert!(age < Duration::from_secs(15), "the session never ended");
        tokio::time::sleep(Duration::from_millis(400)).await;
    };
    assert!(
        idle_checked,
        "the busy session ended before the idle one was checked"
    );
    // ...but not its maximum age.
    let (r, age) = ended;
    r.expect(401, Some("NotAuthenticated"));
    assert!(r.msg().contains("expired"), "{r:?}");
    assert!(
        age >= Duration::from_millis(4500),
        "the session ended after only {age:?}, before its maximum age of 5 s"
    );
}

/// Decodes unpadded URL-safe base64.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_at_least_128_random_bits() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let mut tokens = Vec::new();
    for _ in 0..16 {
        tokens.push(site.login("alice").await);
    }
    let mut decoded = Vec::new();
    for token in &tokens {
        let bytes = base64url_decode(token)
            .unwrap_or_else(|| panic!("token {token:?} is not URL-safe base64"));
        assert!(
            bytes.len() * 8 >= 128,
            "token {token:?} carries only {} bits",
            bytes.len() * 8
        );
        decoded.push(bytes);
    }
    let distinct: BTreeSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), tokens.len(), "repeated tokens: {tokens:?}");
    // Random, not counters or timestamps: no byte position is the same in every token, and
    // about half of all bits are set (4096 bits: mean 2048, sd 32; 6 sd either way).
    let len = decoded.iter().map(Vec::len).min().unwrap_or_default();
    for i in 0..len {
        let values: BTreeSet<u8> = decoded.iter().map(|d| d[i]).collect();
        assert!(values.len() > 1, "byte {i} is the same in every token");
    }
    let ones: u32 = decoded
        .iter()
        .flat_map(|d| d.iter().take(len))
        .map(|b| b.count_ones())
        .sum();
    let total = (decoded.len() * len * 8) as f64;
    let sd = (total / 4.0).sqrt();
    assert!(
        (f64::from(ones) - total / 2.0).abs() < 6.0 * sd,
        "{ones} of {total} bits set"
    );
    // Nothing but the exact token works, and it is never echoed in a body.
    let token = &tokens[0];
    let r = site.get("/sessions", Some(token)).await;
    assert!(!r.text.contains(token.as_str()), "{r:?}");
    let last = token.chars().last().unwrap_or('A');
    let altered = format!(
        "{}{}",
        &token[..token.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    for bad in [
        altered.as_str(),
        &token[..token.len() - 1],
        &format!("{token}A"),
        &token.to_uppercase(),
    ] {
        site.get("/sessions", Some(bad))
            .await
            .expect(401, Some("NotAuthenticated"));
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Login throttling
// ---------------------------------------------------------------------------------------------

async fn login_from(client: &reqwest::Client, site: &Site, user: &str, password: &str) -> Reply {
    support::send(
        client
            .post(site.url("/sessions"))
            .json(&json!({"type": "localUser", "localUser": user, "localPassword": password})),
    )
    .await
}

/// Asserts a throttled login: 429, `NotAuthenticated` envelope, `Retry-After` within
/// `1..=max_secs`, a message saying so and when to retry; returns the `Retry-After`.
fn assert_throttled(r: &Reply, max_secs: u64) -> u64 {
    r.expect(429, Some("NotAuthenticated"));
    let secs = retry_after(r);
    assert!((1..=max_secs).contains(&secs), "Retry-After {secs}: {r:?}");
    let m = r.msg();
    assert!(
        m.contains("Too many failed logins") && m.contains(&format!("{secs} seconds")),
        "{r:?}"
    );
    assert_eq!(r.body["args"], json!([secs.to_string()]), "{r:?}");
    assert!(r.header("X-VCAV-Auth").is_none(), "{r:?}");
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_are_throttled_per_user_and_per_address() {
    let fed = Federation::init(&["site1", "site2"]);
    let throttle = [
        ("SITEGATE_AUTH__LOGIN_FAILURES_PER_USER", "3"),
        ("SITEGATE_AUTH__LOGIN_LOCKOUT_SECS", "2"),
        ("SITEGATE_AUTH__LOGIN_LOCKOUT_MAX_SECS", "4"),
    ];
    // site1: per user only; site2: per address too.
    let mut env1 = throttle.to_vec();
    env1.push(("SITEGATE_AUTH__LOGIN_FAILURES_PER_ADDRESS", "0"));
    let mut env2 = throttle.to_vec();
    env2.push(("SITEGATE_AUTH__LOGIN_FAILURES_PER_ADDRESS", "4"));
    let site1 = fed.start_with_env("site1", &env1).await;
    let site2 = fed.start_with_env("site2", &env2).await;
    let from_a = client_from("127.0.0.21");
    let from_b = client_from("127.0.0.22");
    let wrong = "not-the-password";

    // A success forgets the name's failures: 2 + success + 2 never make 3.
    for _ in 0..2 {
        login_from(&from_a, &site1, "alice", wrong)
            .await
            .expect(401, Some("NotAuthenticated"));
    }
    login_from(&from_a, &site1, "alice", PASSWORD)
        .await
        .expect(200, None);
    for _ in 0..2 {
        login_from(&from_a, &site1, "alice", wrong)
            .await
            .expect(401, Some("NotAuthenticated"));
    }
    // The third failure in a row locks the name, and says so at once.
    let r = login_from(&from_a, &site1, "alice", wrong).await;
    let locked_at = Instant::now();
    assert_eq!(assert_throttled(&r, 2), 2);
    // Locked means locked: the right password from another address is refused too, unchecked.
    let r = login_from(&from_b, &site1, "alice", PASSWORD).await;
    assert_throttled(&r, 2);
    // Other names are not affected.
    login_from(&from_a, &site1, "bob", PASSWORD)
        .await
        .expect(200, None);
    // Once the lockout is over, the right password works (and clears the name).
    support::wait_for(
        "alice's lockout to end",
        Duration::from_secs(10),
        || async {
            let r = login_from(&from_b, &site1, "alice", PASSWORD).await;
            (r.status == 200).then_some(())
        },
    )
    .await;
    assert!(
        locked_at.elapsed() >= Duration::from_millis(1500),
        "the 2 s lockout ended after {:?}",
        locked_at.elapsed()
    );

    // Unknown names are throttled like real ones (a 429 tells nothing about which exist), and
    // each further lockout doubles, up to the maximum.
    for _ in 0..2 {
        login_from(&from_a, &site1, "mallory", wrong)
            .await
            .expect(401, Some("NotAuthenticated"));
    }
    let r = login_from(&from_a, &site1, "mallory", wrong).await;
    assert_eq!(assert_throttled(&r, 2), 2);
    let r = support::wait_for(
        "mallory's first lockout to end",
        Duration::from_secs(10),
        || async {
            let r = login_from(&from_a, &site1, "mallory", wrong).await;
            (r.status != 429).then_some(r)
        },
    )
    .await;
    r.expect(401, Some("NotAuthenticated"));
    login_from(&from_a, &site1, "mallory", wrong)
        .await
        .expect(401, Some("NotAuthenticated"));
    let r = login_from(&from_a, &site1, "mallory", wrong).await;
    assert_eq!(assert_throttled(&r, 4), 4, "the second lockout doubles");

    // Per address (site2: 4 failures): different names from one address lock the address...
    for i in 0..3 {
        login_from(&from_a, &site2, &format!("nobody{i}"), wrong)
            .await
            .expect(401, Some("NotAuthenticated"));
    }
    let r = login_from(&from_a, &site2, "nobody3", wrong).await;
    assert_throttled(&r, 2);
    // ...for every name, even with the right password...
    let r = login_from(&from_a, &site2, "bob", PASSWORD).await;
    assert_throttled(&r, 2);
    // ...and only that address.
    login_from(&from_b, &site2, "bob", PASSWORD)
        .await
        .expect(200, None);

    // Credentials extensions are throttled at both ends. At site1, per local user and peer:
    // alice's third refused extension to site2 locks her extensions there (429, with the wait),
    // and not her own login.
    let alice1 = site1.login("alice").await;
    let credentials = |user: &str, password: &str| json!({"type": "credentials", "site": "site2", "vcdUsername": user, "vcdPassword": password});
    for i in 0..2 {
        let r = extend(&site1, &alice1, credentials(&format!("guess{i}"), wrong)).await;
        r.expect(401, Some("RemoteAuthenticationFailure"));
    }
    let r = extend(&site1, &alice1, credentials("guess2", wrong)).await;
    assert_throttled(&r, 2);
    let r = extend(&site1, &alice1, credentials("alice", PASSWORD)).await;
    assert_throttled(&r, 2);
    site1.login("alice").await;
    // At site2, site1 counts as one address (4 failures here), whichever of its users
    // relays: bob's first guess is site1's fourth, and locks site1 there. site1 passes the
    // peer's 429 on with its wait, so even a right password through site1 waits.
    let bob1 = site1.login("bob").await;
    let r = extend(&site1, &bob1, credentials("guess3", wrong)).await;
    assert_throttled(&r, 2);
    let r = extend(&site1, &bob1, credentials("bob", PASSWORD)).await;
    assert_throttled(&r, 2);
    // site2's own clients, from their own addresses, are not affected.
    login_from(&from_b, &site2, "alice", PASSWORD)
        .await
        .expect(200, None);
    // After the lockout, the right password through site1 works.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    extend(&site1, &bob1, credentials("bob", PASSWORD))
        .await
        .expect(200, None);

    // The lockouts were logged, by name and by address, without the passwords.
    for (site, needle) in [(&site1, "mallory"), (&site2, "127.0.0.21")] {
        let log = site.stderr();
        assert!(
            log.lines()
                .any(|l| l.contains("too many failed logins") && l.contains(needle)),
            "{} did not log the lockout of {needle}",
            site.name
        );
        assert!(!log.contains(wrong) && !log.contains(PASSWORD));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The client API over HTTPS
// ---------------------------------------------------------------------------------------------

/// Starts `sitegate serve` for `site` with `env`, where the client API speaks HTTPS with a
/// certificate `ca` issued for `localhost`; waits until `/healthz` answers over HTTPS.
async fn start_https_site(
    fed: &Federation,
    site: &str,
    env: &[(String, String)],
    ca: &Path,
) -> Proc {
    let mut cmd = command(fed.dir.path());
    cmd.arg("serve").arg("--config").arg(fed.config_path(site));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn(cmd, fed.dir.path(), site);
    let port = fed.client_port(site);
    let until = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = proc.exited() {
            panic!(
                "{site} exited during start with {status}: {}",
                proc.stderr()
            );
        }
        let r = curl(&https_args(
            port,
            ca,
            &["-o", "/dev/null", "-w", "%{http_code}"],
            "/healthz",
        ));
        if r.stdout.trim() == "200" {
            return proc;
        }
        assert!(
            Instant::now() < until,
            "{site} did not answer over HTTPS within {START_DEADLINE:?}: curl said {}\n{}",
            r.stderr,
            proc.stderr()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// curl arguments for `https://localhost:<port><path>` trusting only `ca`.
fn https_args(port: u16, ca: &Path, extra: &[&str], path: &str) -> Vec<String> {
    let mut args = vec![
        "--cacert".to_owned(),
        ca.display().to_string(),
        "--resolve".to_owned(),
        format!("localhost:{port}:127.0.0.1"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(format!("https://localhost:{port}{path}"));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_api_serves_https_with_tls_1_2_or_newer_only() {
    require_curl();
    let fed = Federation::init(&["site1"]);
    let pki = TestPki::new_ca();
    let dir = fed.dir.path().join("client-tls");
    let cert = pki.issue(&dir, "api", &["localhost"], &[], (-1, 30));
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write the CA");
    let env = vec![
        (
            "SITEGATE_LISTEN__TLS_CERT".to_owned(),
            cert.display().to_string(),
        ),
        (
            "SITEGATE_LISTEN__TLS_KEY".to_owned(),
            cert.with_extension("key").display().to_string(),
        ),
    ];
    let proc = start_https_site(&fed, "site1", &env, &ca).await;
    let port = fed.client_port("site1");

    // HTTP/1.1 only, even when the client offers HTTP/2 (curl does by default): scripts of
    // the original API grep for `X-VCAV-Auth`, which HTTP/2 would send in lower case. TLS
    // 1.3 and TLS 1.2 both work.
    for (extra, version) in [
        (vec![], "1.1"),
        (vec!["--http2"], "1.1"),
        (vec!["--tlsv1.3"], "1.1"),
        (vec!["--tlsv1.2", "--tls-max", "1.2"], "1.1"),
        (vec!["--tlsv1.2", "--tls-max", "1.2", "--http1.1"], "1.1"),
    ] {
        let mut extra = extra.clone();
        extra.extend(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"]);
        let r = curl(&https_args(port, &ca, &extra, "/healthz"));
        assert_eq!(
            r.stdout.trim(),
            format!("200 {version}"),
            "{extra:?}: {r:?}"
        );
    }
    // The whole API is there: log in and use the session over HTTPS.
    let body = json!({"type": "localUser", "localUser": "alice", "localPassword": PASSWORD});
    let r = curl(&https_args(
        port,
        &ca,
        &[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: application/json",
            "--data",
            &body.to_string(),
        ],
        "/sessions",
    ));
    // Found as a script of the original API finds it: by the exact spelling (`grep
    // X-VCAV-Auth`), which needs HTTP/1.1 over HTTPS too.
    let token = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("X-VCAV-Auth: ").map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no X-VCAV-Auth line from a login over HTTPS: {r:?}"));
    let r = curl(&https_args(
        port,
        &ca,
        &["-H", &format!("X-VCAV-Auth: {token}")],
        "/sessions",
    ));
    let details: Value = serde_json::from_str(&r.stdout).expect("session details");
    assert_eq!(details["user"], json!("alice"), "{r:?}");
    // A client that does not trust the certificate refuses it (the server is authenticated).
    let r = curl(&[
        format!("https://localhost:{port}/healthz"),
        "--resolve".into(),
        format!("localhost:{port}:127.0.0.1"),
    ]);
    assert!(r.exit != Some(0), "{r:?}");

    // TLS 1.2 by hand: the listener answers with a handshake record (ServerHello, TLS 1.2).
    let answer =
        tokio::task::spawn_blocking(move || exchange_until_close(port, &client_hello(0x0303)))
            .await
            .expect("TLS 1.2 hello");
    assert!(
        answer.len() > 11
            && answer[0] == 0x16
            && answer[5] == 0x02
            && answer[9..11] == [0x03, 0x03],
        "a TLS 1.2 ClientHello should get a TLS 1.2 ServerHello: {answer:02x?}"
    );
    // The same hello offering TLS 1.1: a fatal protocol_version alert, no ServerHello.
    let answer =
        tokio::task::spawn_blocking(move || exchange_until_close(port, &client_hello(0x0302)))
            .await
            .expect("TLS 1.1 hello");
    assert!(
        answer.len() >= 7 && answer[0] == 0x15 && answer[5] == 0x02 && answer[6] == 70,
        "a TLS 1.1 ClientHello should get a fatal protocol_version alert: {answer:02x?}"
    );
    // OpenSSL's own TLS 1.1 client is refused too.
    let r = curl(&https_args(
        port,
        &ca,
        &[
            "--tlsv1.1",
            "--tls-max",
            "1.1",
            "--ciphers",
            "DEFAULT@SECLEVEL=0",
        ],
        "/healthz",
    ));
    assert!(r.exit != Some(0) && r.stdout.is_empty(), "{r:?}");
    // Plain HTTP gets no HTTP answer.
    let answer =
        tokio::task::spawn_blocking(move || exchange_until_close(port, raw::PLAIN_HTTP_REQUEST))
            .await
            .expect("plain HTTP exchange");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("HTTP/"),
        "plain HTTP got an HTTP answer: {text:?}"
    );
    support::wait_for(
        "the refused handshakes in the log",
        Duration::from_secs(5),
        || {
            let log = proc.stderr();
            async move {
                (log.matches("client API: TLS handshake refused").count() >= 3).then_some(())
            }
        },
    )
    .await;

    // A certificate file that cannot be read stops the start with a message naming the key.
    let mut cmd = command(fed.dir.path());
    cmd.arg("serve")
        .arg("--config")
        .arg(fed.config_path("site1"))
        .env("SITEGATE_LISTEN__TLS_CERT", dir.join("missing.pem"))
        .env("SITEGATE_LISTEN__TLS_KEY", cert.with_extension("key"))
        .env("SITEGATE_LISTEN__CLIENT", "127.0.0.1:0")
        .env("SITEGATE_STORE__PATH", dir.join("data"));
    let out = run_with_deadline(cmd, COMMAND_DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tls_cert") && stderr.contains("missing.pem"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The peer link: expired certificates, a certificate naming the wrong site, idle TCP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_link_refuses_expired_and_misnamed_certificates_and_idle_connections() {
    require_curl();
    let fed = Federation::init(&["site1", "site2", "site3"]);
    let pki = TestPki::federation(&fed);
    let certs = fed.dir.path().join("extra-certs");
    let expired = pki.issue(&certs, "site2-expired", &["site2"], &[], (-30, -1));
    let fresh = pki.issue(&certs, "site2-fresh", &["site2"], &[], (-1, 30));
    let site1 = fed
        .start_with_env(
            "site1",
            &[("SITEGATE_LIMITS__HEADER_READ_TIMEOUT_SECS", "1")],
        )
        .await;

    // A client presenting an expired certificate from the federation CA, naming a configured
    // peer, is refused during the handshake; the same with a valid one is served (control).
    let run = curl_peer_link(&fed, "site1", Some(&fresh), "/healthz", None);
    assert_eq!(
        (run.exit, run.http_code.as_str()),
        (Some(0), "200"),
        "{run:?}"
    );
    let run = curl_peer_link(&fed, "site1", Some(&expired), "/healthz", None);
    assert!(run.exit != Some(0) && run.http_code == "000", "{run:?}");

    // A TCP connection that never starts a handshake is closed (here after the 1 s head
    // timeout), so it cannot hold a connection slot.
    let port = fed.peer_port("site1");
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || exchange_until_close(port, b""))
        .await
        .expect("idle exchange");
    assert!(answer.is_empty(), "{answer:02x?}");
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "an idle connection stayed open {:?}",
        started.elapsed()
    );

    // A peer serving an expired certificate is refused by the site calling it.
    let site2 = fed
        .start_with_env(
            "site2",
            &[
                ("SITEGATE_TLS__CERT", &expired.display().to_string()),
                (
                    "SITEGATE_TLS__KEY",
                    &expired.with_extension("key").display().to_string(),
                ),
            ],
        )
        .await;
    let alice1 = site1.login("alice").await;
    let r = site1.extend_multisite(&alice1, "site2").await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    let m = r.msg();
    assert!(
        m.contains("site2") && m.contains("TLS handshake") && m.contains("certificate"),
        "{r:?}"
    );
    assert!(
        !site2.stderr().contains("issued a multisite session"),
        "site2 served a request over a refused link"
    );
    drop(site2);
    drop(site1);

    // A peer listener at the address configured for site2 that presents a valid federation
    // certificate naming site3 is refused: the name must be the site site1 meant to reach.
    // site1's config now sends "site2" to site3's peer link.
    let config = fed.config_path("site1");
    let text = std::fs::read_to_string(&config).expect("site1's config");
    let (site2_link, site3_link) = (
        format!("127.0.0.1:{}", fed.peer_port("site2")),
        format!("127.0.0.1:{}", fed.peer_port("site3")),
    );
    assert!(text.contains(&site2_link), "{text}");
    std::fs::write(&config, text.replace(&site2_link, &site3_link))
        .expect("rewrite site1's config");
    let site1 = fed.start("site1").await;
    let site3 = fed.start("site3").await;
    let alice1 = site1.login("alice").await;
    let r = site1.extend_multisite(&alice1, "site2").await;
    r.expect(401, Some("RemoteAuthenticationFailure"));
    let m = r.msg();
    assert!(
        m.contains("site2") && m.contains("TLS handshake") && m.contains("certificate"),
        "{r:?}"
    );
    // Control: the same process reaches the real site3 under its own name.
    site1
        .extend_multisite(&alice1, "site3")
        .await
        .expect(200, None);
    // site3 never answered the request meant for site2.
    let issued = json_lines(&site3.stderr())
        .iter()
        .filter(|l| l.to_string().contains("issued a multisite session"))
        .count();
    assert_eq!(
        issued, 1,
        "site3 should have issued only the session meant for it"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Secrets never reach the logs
// ---------------------------------------------------------------------------------------------

/// Runs of token characters exactly as long as a session token (43): what a leaked token
/// looks like in a log, whatever its origin. UUIDs (36), trace IDs (32), span IDs (16) and
/// SHA-256 hex (64) are other lengths.
fn token_shaped(log: &str) -> Vec<String> {
    log.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .filter(|run| {
            // 43 random characters all but surely mix upper case, lower case and digits;
            // identifiers and metric names of that length do not.
            run.len() == 43
                && run.bytes().any(|b| b.is_ascii_uppercase())
                && run.bytes().any(|b| b.is_ascii_lowercase())
                && run.bytes().any(|b| b.is_ascii_digit())
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let (_pg, url) = support::postgres_database().await;
    let pg_password = "Pg-S3cret-9f2c";
    let url = url.replacen("postgres@", &format!("postgres:{pg_password}@"), 1);
    assert!(url.contains(pg_password), "{url}");
    let fed = Federation::init(&["site1", "site2"]);
    // Debug level everywhere: even what an operator turns on to investigate must not leak.
    let debug = [
        ("SITEGATE_LOG__LEVEL", "debug"),
        ("SITEGATE_LOG__FORMAT", "json"),
    ];
    let mut env1 = debug.to_vec();
    env1.extend([
        ("SITEGATE_STORE__BACKEND", "postgres"),
        ("SITEGATE_STORE__URL", url.as_str()),
    ]);
    let site1 = fed.start_with_env("site1", &env1).await;
    let site2 = fed.start_with_env("site2", &debug).await;
    let wrong = "Wr0ng-Passw0rd-7731";

    // Everything that carries a secret: logins (right and wrong), both kinds of extension,
    // remote reads with the held token, unknown tokens, logout (which ends the remote one).
    let mut tokens = Vec::new();
    for user in ["alice", "bob", "admin", "svc"] {
        tokens.push(site1.login(user).await);
        tokens.push(site2.login(user).await);
    }
    let task = site2
        .create_task(&tokens[7], &new_task("alice", "sync", "vm", "vm-1", "web"))
        .await;
    site1
        .try_login("alice", wrong)
        .await
        .expect(401, Some("NotAuthenticated"));
    site1
        .try_login("nosuchuser", wrong)
        .await
        .expect(401, Some("NotAuthenticated"));
    let alice = tokens[0].clone();
    site1
        .extend_multisite(&alice, "site2")
        .await
        .expect(200, None);
    let bob = tokens[2].clone();
    extend(
        &site1,
        &bob,
        json!({"type": "credentials", "site": "site2", "username": "bob", "password": PASSWORD}),
    )
    .await
    .expect(200, None);
    extend(
        &site1,
        &bob,
        json!({"type": "credentials", "site": "site2", "username": "alice", "password": wrong}),
    )
    .await
    .expect(401, Some("RemoteAuthenticationFailure"));
    site1
        .get(&format!("/tasks/{}?site=site2", id_of(&task)), Some(&alice))
        .await
        .expect(200, None);
    site1
        .get("/tasks?site=site2", Some(&bob))
        .await
        .expect(200, None);
    let unknown = "A".repeat(43);
    site1
        .get("/sessions", Some(&unknown))
        .await
        .expect(401, Some("NotAuthenticated"));
    assert_eq!(site1.delete("/sessions", Some(&alice)).await.status, 204);
    assert_eq!(
        site1.delete("/sessions/site2", Some(&bob)).await.status,
        200
    );
    tokens.push(unknown);

    // Wait for the peer's side of the logouts, the last thing logged, so nothing is missed.
    support::wait_for(
        "site2 to log both remote logouts",
        Duration::from_secs(10),
        || {
            let log = site2.stderr();
            async move {
                let n = json_lines(&log)
                    .iter()
                    .filter(|l| {
                        l.to_string().contains("logged out")
                            && log_field(l, "from_peer").as_deref() == Some("site1")
                    })
                    .count();
                (n >= 2).then_some(())
            }
        },
    )
    .await;

    // A failed start with a database URL also keeps the password out of its message.
    let closed_port = support::free_base_port(1);
    let mut cmd = command(fed.dir.path());
    cmd.arg("serve")
        .arg("--config")
        .arg(fed.config_path("site1"))
        .env("SITEGATE_STORE__BACKEND", "postgres")
        .env(
            "SITEGATE_STORE__URL",
            format!("postgres://postgres:{pg_password}@127.0.0.1:{closed_port}/db"),
        )
        .env("SITEGATE_LISTEN__CLIENT", "127.0.0.1:0")
        .env("SITEGATE_LISTEN__PEER", "127.0.0.1:0")
        .env("SITEGATE_LOG__LEVEL", "debug");
    let failed = run_with_deadline(cmd, COMMAND_DEADLINE);
    assert!(
        !failed.status.success(),
        "a site without its database started"
    );
    let failed_output = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );

    let logs = [
        ("site1", site1.stderr()),
        ("site2", site2.stderr()),
        ("failed start", failed_output),
    ];
    let mut secrets: Vec<(&str, String)> = vec![
        ("the dev password", PASSWORD.to_owned()),
        ("a wrong password", wrong.to_owned()),
        ("the PostgreSQL password", pg_password.to_owned()),
    ];
    secrets.extend(tokens.iter().map(|t| ("a session token", t.clone())));
    assert!(
        logs[2].1.contains("error connecting"),
        "the failed start should say why: {}",
        logs[2].1
    );
    for (name, log) in &logs {
        // Something to search: the sites logged every request at debug level.
        assert!(
            log.lines().count() > 20 || *name == "failed start",
            "{name} logged almost nothing: {log}"
        );
        for (what, secret) in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "{name}'s log contains {what}: {}",
                log.lines()
                    .find(|l| l.contains(secret.as_str()))
                    .unwrap_or_default()
            );
        }
        // Tokens this test never saw (the sessions held at peers) have the same shape.
        let shaped = token_shaped(log);
        let lines: Vec<&str> = shaped
            .iter()
            .filter_map(|t| log.lines().find(|l| l.contains(t.as_str())))
            .collect();
        assert!(
            shaped.is_empty(),
            "{name}'s log has token-shaped strings {shaped:?}, in:\n{}",
            lines.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Least privilege across sites, and certificate reloads that cannot break the link
// ---------------------------------------------------------------------------------------------

/// A request on `site`'s peer link as the site whose certificate `as_site` names (`<fed>/
/// <as_site>.pem`): `(status, body)`.
fn peer_call(
    fed: &Federation,
    site: &str,
    as_site: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (String, String) {
    let port = fed.peer_port(site);
    let cert = fed.fed_dir().join(format!("{as_site}.pem"));
    let mut args = peer_link_args(fed, site, Some(&cert));
    args.extend([
        "-X".to_owned(),
        method.to_owned(),
        "-w".to_owned(),
        "\n%{http_code}".to_owned(),
        "-D".to_owned(),
        "-".to_owned(),
    ]);
    if let Some(t) = token {
        args.extend(["-H".to_owned(), format!("X-VCAV-Auth: {t}")]);
    }
    if let Some(b) = body {
        args.extend([
            "-H".to_owned(),
            "Content-Type: application/json".to_owned(),
            "--data".to_owned(),
            b.to_string(),
        ]);
    }
    args.push(format!("https://{site}:{port}{path}"));
    let run = curl(&args);
    let (rest, code) = run.stdout.rsplit_once('\n').unwrap_or(("", ""));
    (code.trim().to_owned(), rest.to_owned())
}

/// The token in a head printed by `curl -D -`.
fn token_in(head_and_body: &str) -> Option<String> {
    head_and_body.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-vcav-auth"))
            .map(|(_, v)| v.trim().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_can_assert_identities_but_not_privileges() {
    require_curl();
    let fed = Federation::init(&["site1", "site2"]);
    let _site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let ask = |user: &str| {
        peer_call(
            &fed,
            "site2",
            "site1",
            "POST",
            "/peer/sessions",
            None,
            Some(&json!({"user": user})),
        )
    };
    // With site1's certificate, asking for site2's admin gets a session of role user only.
    let (code, answer) = ask("admin");
    assert_eq!(code, "200", "{answer}");
    assert!(answer.contains(r#""roles":["user"]"#), "{answer}");
    let token = token_in(&answer).expect("a token");
    // The site's own services are never a peer's to assert.
    let (code, answer) = ask("svc");
    assert_eq!(code, "403", "{answer}");
    assert!(token_in(&answer).is_none());
    // The session works over the peer link, with site1's certificate, as role user: it
    // sees its own tasks only and may not filter by user.
    let (code, _) = peer_call(&fed, "site2", "site1", "GET", "/tasks", Some(&token), None);
    assert_eq!(code, "200");
    let (code, _) = peer_call(
        &fed,
        "site2",
        "site1",
        "GET",
        "/tasks?user=bob",
        Some(&token),
        None,
    );
    assert_eq!(code, "403");
    // On site2's client API the same token is nothing: a copy of site1's database (where
    // such tokens are kept) opens nothing at site2 without site1's key.
    site2
        .get("/tasks", Some(&token))
        .await
        .expect(401, Some("NotAuthenticated"));
    let svc = site2.login("svc").await;
    let r = site2
        .post(
            "/tasks",
            Some(&token),
            &json!({"user": "bob", "workflowInfo": {"type": "x"}}),
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    // And a writer's own session still works, of course.
    site2.get("/tasks", Some(&svc)).await.expect(200, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reloads_that_peers_would_refuse_are_refused() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let admin1 = site1.login("admin").await;
    let admin2 = site2.login("admin").await;
    let link_to_site1_healthy = || async {
        let sites = site2.get("/sites", Some(&admin2)).await;
        let sites = sites.body.as_array().cloned().unwrap_or_default();
        sites
            .iter()
            .find(|s| s["site"] == "site1")
            .is_some_and(|s| s["state"]["outgoingCommError"].is_null())
    };
    support::wait_for(
        "site2 -> site1 healthy",
        Duration::from_secs(20),
        || async { link_to_site1_healthy().await.then_some(()) },
    )
    .await;
    let certs = fed.fed_dir();
    let (pem, key) = (certs.join("site1.pem"), certs.join("site1.key"));
    let (good_pem, good_key) = (
        std::fs::read(&pem).expect("pem"),
        std::fs::read(&key).expect("key"),
    );
    let staging = fed.dir.path().join("staging");
    let install = |from: &Path| {
        std::fs::copy(from.with_extension("key"), &key).expect("key in place");
        std::fs::copy(from, &pem).expect("certificate in place");
        site1.sighup();
    };
    let local = || async {
        let sites = site1.get("/sites", Some(&admin1)).await;
        sites
            .body
            .as_array()
            .and_then(|s| s.first().cloned())
            .unwrap_or_default()
    };
    // A certificate naming site1 from another CA (as a self-signed one would be), and one
    // from the federation CA that expired: each refused, reported, counted; the link stays.
    let foreign = TestPki::new_ca().issue(&staging, "foreign", &["site1"], &[], (-1, 30));
    let expired =
        TestPki::federation(&fed).issue(&staging, "expired", &["site1"], &[], (-400, -35));
    for (n, bad) in [foreign, expired].iter().enumerate() {
        install(bad);
        let reported =
            support::wait_for("the refusal in /sites", Duration::from_secs(10), || async {
                let l = local().await;
                l["certificateError"]["msg"].as_str().map(str::to_owned)
            })
            .await;
        assert!(reported.contains("refused"), "{reported}");
        support::wait_for("the logged refusal", Duration::from_secs(5), || async {
            site1
                .stderr()
                .contains("certificates not reloaded")
                .then_some(())
        })
        .await;
        // Each refusal counted (this one is the (n+1)th).
        support::wait_for("the refusal counted", Duration::from_secs(10), || async {
            let refused = site1
                .metric(
                    "sitegate_certificate_reloads_total",
                    &[("listener", "peer link"), ("outcome", "refused")],
                )
                .await
                .unwrap_or(0.0);
            (refused >= (n + 1) as f64).then_some(())
        })
        .await;

        // The probes keep passing: site1 still presents the good certificate.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(link_to_site1_healthy().await, "the link broke");
    }
    // A good one (the original files back) is taken, and the report clears.
    std::fs::write(&key, &good_key).expect("key");
    std::fs::write(&pem, &good_pem).expect("pem");
    site1.sighup();
    support::wait_for("the report clears", Duration::from_secs(10), || async {
        local()
            .await
            .get("certificateError")
            .is_none()
            .then_some(())
    })
    .await;
}
