//! Compatibility with the public clients of the original API: each test replays, over a raw
//! socket (or with the real tool: curl), what one client written by other people against the
//! original product sends, byte for byte where it matters (header names in its case and
//! order, its `Accept` values, its query encoding, `Expect: 100-continue`, its token quirks),
//! against real `sitegate` sites, and asserts what that client's code needs from the answer.
//!
//! The requests are described here in our own words from reading each client; none of their
//! code is copied. To re-check a client, read the files named at its test:
//!
//! | test | client | what it exercises |
//! |---|---|---|
//! | `vcav_community_powershell` | PowerShell module VMware.vCAV.Community (`PsychoBelka/VMware.vCAV.Community`, Adrian Begg's): `Public/Session/Connect-vCAVService.ps1`, `Private/Invoke-vCAVAPIRequest.ps1`, `Public/Tasks/Get-vCAVTasks.ps1`, `Private/Watch-TaskCompleted.ps1` | 100-continue login, `about` right after login, `/sites` array, list `resourceType` and `operationID` as a query parameter, paging by `offset += 100` while `offset < total`, polling to the end, `vcdUser` extension, `cookie` extension refused clearly |
//! | `powervcav_powershell` | PowerShell module PowerVCAV (`jondwaite/PowerVCAV`, `8bitnz/PowerVCAV`): `PowerVCAV.psm1` | `vcdCookie` login refused clearly, `h4-v3+json;charset=UTF-8`, unencoded query strings, paging by `items.Count` until `total`, `GET`/`DELETE /sessions` |
//! | `vcda_avs_powershell` | VMware.VCDA.AVS (`vmware/vmware-powercli-for-vmware-cloud-director-availability`): `Private/Connect-VCDA.ps1`, `Private/Invoke-VCDARequest.ps1` | login's `Content-Type` echoed as `Accept`, one `operationID` per connection, `Content-Type` on GETs, `%2c` lists, JSON recognised by its regex, `WWW-Authenticate: Authentication Token Required` on a dead session, `.msg` of errors |
//! | `terraform_provider_go` | Terraform provider (`vmware/terraform-provider-vcda`): `vcda/client.go`, `vcda/data_source_cloud_health.go` | a login before every call, Go's `X-Vcav-Auth` spelling, `h4-v4.7+json;charset=UTF-8`, `POST /diagnostics/health` with no body answered by a task polled to SUCCEEDED, numbers as numbers |
//! | `ansible_module_python` | Ansible module (`ihumster/ansible_vcda_module`): `module_utils/vcda_common.py`, `library/vcda_info.py` | status exactly 200, urllib's `Content-type`/`X-vcav-auth` spellings, `application/json;charset=UTF-8`, `about` |
//! | `perl_health_check` | Nagios-style Perl/LWP health check (found in the public code index without its repository) | `charset` with a space, no `Accept`, `GET /diagnostics/health` read key by key: `null` when healthy, set when a peer is down |
//! | `curl_script` | a bash backup script using curl (found in the public code index without its repository) | the real `curl -i ... \| grep X-VCAV-Auth \| cut -d " " -f2`, and the token sent back with its trailing CR |
//! | `java_httpclient` | a Java orchestrator on Apache HttpClient 4 (found in the public code index without its repository) | `Content-type` spelling, `ssoCredentials` refused clearly, a token sent back with a leading space |
//! | `malformed_requests_get_the_envelope` | what hyper refuses before any handler | 400/414/431 with the envelope and an `operationID` |

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sitegate_testkit::raw::{self, RawConnection, RawReply};
use sitegate_testkit::site as support;
use support::{id_of, new_task, Federation, Site, PASSWORD};

/// Two sites of a fresh federation, both running; the writer token of each.
struct World {
    _fed: Federation,
    site1: Site,
    site2: Site,
    svc1: String,
    svc2: String,
}

async fn world() -> World {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let svc1 = site1.login("svc").await;
    let svc2 = site2.login("svc").await;
    World {
        _fed: fed,
        site1,
        site2,
        svc1,
        svc2,
    }
}

/// A fresh GUID as .NET prints one.
fn guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The token of a login answer, read as each of these clients reads it: the one header named
/// `X-VCAV-Auth` (in any case), which must come exactly once and be spelled as the original.
fn token_of(reply: &RawReply) -> String {
    assert_eq!(reply.status, 200, "login: {}\n{}", reply.head, reply.text());
    assert_eq!(
        reply.count_spelled("X-VCAV-Auth"),
        1,
        "the token header is spelled X-VCAV-Auth, once: {}",
        reply.head
    );
    reply.header("X-VCAV-Auth").expect("token").to_owned()
}

/// Creates `n` tasks for `user` whose resource types cycle through `types`; returns the
/// tasks created.
async fn seed(site: &Site, writer: &str, user: &str, types: &[&str], n: usize) -> Vec<Value> {
    let mut made = Vec::with_capacity(n);
    for i in 0..n {
        let rtype = types[i % types.len()];
        let body = new_task(
            user,
            "replication-sync",
            rtype,
            &format!("vm-{i}"),
            &format!("app-{i}"),
        );
        made.push(site.create_task(writer, &body).await);
    }
    made
}

fn ids_with_types(tasks: &[Value], types: &[&str]) -> HashSet<String> {
    tasks
        .iter()
        .filter(|t| types.contains(&t["workflowInfo"]["resourceType"].as_str().unwrap_or("")))
        .map(id_of)
        .collect()
}

/// What Windows PowerShell 5.1's `Invoke-WebRequest` sends with a body: `Expect:
/// 100-continue`, so the head goes first and the body only after the server's `100 Continue`.
async fn post_expecting_continue(
    conn: &mut RawConnection,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawReply {
    let mut head = format!("POST {target} HTTP/1.1\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    ));
    conn.send(head.as_bytes()).await;
    let interim = conn.answer().await;
    assert_eq!(
        interim.status, 100,
        "an interim 100 Continue: {}",
        interim.head
    );
    conn.send(body.as_bytes()).await;
    conn.answer().await
}

/// `ConvertTo-Json` output: pretty-printed, CRLF line ends.
fn powershell_json(pairs: &[(&str, &str)]) -> String {
    let fields: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("    \"{k}\":  \"{v}\""))
        .collect();
    format!("{{\r\n{}\r\n}}", fields.join(",\r\n"))
}

/// The VMware.vCAV.Community PowerShell module on Windows PowerShell 5.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcav_community_powershell() {
    let w = world().await;
    let types = [
        "replication",
        "vmReplication",
        "vappReplication",
        "inventory",
    ];
    let tasks = seed(&w.site1, &w.svc1, "alice", &types, 160).await;
    seed(&w.site2, &w.svc2, "alice", &["vmReplication"], 3).await;
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    let accept = "application/vnd.vmware.h4-v3+json";
    let ua = "Mozilla/5.0 (Windows NT; Windows NT 10.0; en-US) WindowsPowerShell/5.1.17763.592";
    let mut conn = RawConnection::open(port).await;

    // Connect-vCAVService: a hashtable of headers, then the login body from ConvertTo-Json.
    let op = format!("Powershell__{}", guid());
    let login = post_expecting_continue(
        &mut conn,
        "/sessions",
        &[
            ("Content-Type", "application/json"),
            ("Accept", accept),
            ("operationID", &op),
            ("User-Agent", ua),
            ("Host", &host),
        ],
        &powershell_json(&[
            ("type", "localUser"),
            ("localUser", "alice"),
            ("localPassword", PASSWORD),
        ]),
    )
    .await;
    let token = token_of(&login);
    assert_eq!(login.header("operationID"), Some(op.as_str()));
    assert_eq!(login.count_spelled("operationID"), 1, "{}", login.head);
    let details = login.json();
    assert_eq!(details["user"], "alice");
    assert!(details["roles"].is_array());
    assert_eq!(details["authenticatedSites"][0]["site"], "site1");

    // Right after login: GET diagnostics/about; any failure drops the connection. It reads
    // serviceType, productName, buildVersion and buildDate, and checks the service type.
    let headers = |op: &str| {
        vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("Accept".to_owned(), accept.to_owned()),
            ("operationID".to_owned(), op.to_owned()),
            ("X-VCAV-Auth".to_owned(), token.clone()),
            ("User-Agent".to_owned(), ua.to_owned()),
            ("Host".to_owned(), host.clone()),
        ]
    };
    let get = |target: String| {
        let hs = headers(&format!("Powershell__{}", guid()));
        let refs: Vec<(&str, &str)> = hs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        raw::request("GET", &target, &refs, None)
    };
    let about = conn.exchange(&get("/diagnostics/about".into())).await;
    assert_eq!(about.status, 200, "{}", about.text());
    assert_eq!(
        about.header("Content-Type"),
        Some("application/vnd.vmware.h4-v3+json;charset=UTF-8")
    );
    let about = about.json();
    for field in ["serviceType", "productName", "buildVersion"] {
        assert!(
            about[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}: {about}"
        );
    }
    assert!(about["buildDate"].is_i64(), "{about}");
    let service = about["serviceType"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(["cloud", "manager", "replicator", "tunnel"].contains(&service.as_str()));

    // Get-vCAVSites: a JSON array, filtered on `.site` and `.isLocal`.
    let sites = conn.exchange(&get("/sites".into())).await.json();
    let sites = sites.as_array().expect("GET /sites is an array");
    assert!(sites
        .iter()
        .any(|s| s["site"] == "site1" && s["isLocal"] == true));
    assert!(sites
        .iter()
        .any(|s| s["site"] == "site2" && s["isLocal"] == false));

    // Get-vCAVTasks -Replications: a hashtable as the query (its order is the hashtable's),
    // each value URL-encoded the .NET way (`%2C`), and the operation ID as a parameter too.
    // It steps `offset` by 100 while it is below `total`, never looking at the item count.
    let mut seen: Vec<String> = Vec::new();
    let mut offset = 0;
    let mut pages = 0;
    loop {
        let target = format!(
            "/tasks?resourceType=replication%2CvmReplication%2CvappReplication&limit=100&operationID=Powershell__{}&offset={offset}",
            guid()
        );
        let page = conn.exchange(&get(target)).await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json();
        seen.extend(page["items"].as_array().expect("items").iter().map(id_of));
        let total = page["total"].as_u64().expect("total");
        assert_eq!(page["limit"], 100);
        assert_eq!(page["offset"], offset);
        pages += 1;
        offset += 100;
        if offset >= total {
            break;
        }
        assert!(pages < 10, "paging does not end");
    }
    let expected = ids_with_types(&tasks, &types[..3]);
    assert_eq!(expected.len(), 120);
    assert_eq!(pages, 2);
    assert_eq!(seen.len(), expected.len(), "no task twice");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);

    // Watch-TaskCompleted: GET tasks/{id} until the state is not RUNNING, progress shown as
    // it goes; a state other than SUCCEEDED throws with error.code and error.msg.
    let watched = id_of(&tasks[0]);
    let (client, base) = (w.site1.client.clone(), w.site1.url(""));
    let svc = w.svc1.clone();
    let moves = tokio::spawn(async move {
        for body in [
            json!({"progress": 40}),
            json!({"progress": 90}),
            json!({"state": "FAILED", "error": {"code": "ReplicationError", "msg": "The datastore is full.", "args": [], "stacktrace": ""}}),
        ] {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = client
                .patch(format!("{base}/tasks/{watched}"))
                .header("X-VCAV-Auth", &svc)
                .json(&body)
                .send()
                .await
                .expect("PATCH");
            assert_eq!(r.status().as_u16(), 200);
        }
    });
    let started = Instant::now();
    let last = loop {
        let task = conn
            .exchange(&get(format!("/tasks/{}", id_of(&tasks[0]))))
            .await
            .json();
        let progress = task["progress"].as_i64().expect("progress is an integer");
        assert!((0..=100).contains(&progress));
        if task["state"] != "RUNNING" {
            break task;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the task never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    moves.await.expect("writer");
    assert_eq!(last["state"], "FAILED");
    assert_eq!(last["error"]["code"], "ReplicationError");
    assert_eq!(last["error"]["msg"], "The datastore is full.");

    // Extend to another site with vCD credentials: the module sends `vcdUser` where the
    // documentation says `vcdUsername`.
    let hs = headers(&format!("Powershell__{}", guid()));
    let refs: Vec<(&str, &str)> = hs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let extended = post_expecting_continue(
        &mut conn,
        "/sessions/extend",
        &refs,
        &powershell_json(&[
            ("type", "credentials"),
            ("site", "site2"),
            ("vcdUser", "alice"),
            ("vcdPassword", PASSWORD),
        ]),
    )
    .await;
    assert_eq!(extended.status, 200, "{}", extended.text());
    let sites: Vec<Value> = extended.json()["authenticatedSites"]
        .as_array()
        .expect("authenticatedSites")
        .clone();
    assert!(
        sites
            .iter()
            .any(|s| s["site"] == "site2" && s["org"].is_string()),
        "{sites:?}"
    );
    let remote = conn
        .exchange(&get("/tasks?offset=0&limit=100&site=site2".into()))
        .await;
    assert_eq!(remote.status, 200, "{}", remote.text());
    assert_eq!(remote.json()["total"], 3);

    // Its `vcdCookie` extension: refused, saying what is supported.
    let refused = post_expecting_continue(
        &mut conn,
        "/sessions/extend",
        &refs,
        &powershell_json(&[
            ("type", "cookie"),
            ("site", "site2"),
            ("vcdCookie", "secret"),
        ]),
    )
    .await;
    assert_eq!(refused.status, 400);
    let envelope = refused.json();
    assert_eq!(envelope["code"], "BadUserInput");
    let msg = envelope["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("credentials") && msg.contains("multisite"),
        "{msg}"
    );
    assert!(!refused.text().contains("secret"));

    // A dead token is a 401 (the module raises UnauthorizedAccessException on it).
    let dead = raw::exchange(
        port,
        &raw::request(
            "GET",
            "/tasks",
            &[("Host", &host), ("X-VCAV-Auth", "not-a-token")],
            None,
        ),
    )
    .await;
    assert_eq!(dead.status, 401);
}

/// PowerVCAV: logs in with a vCloud Director session cookie, which a sitegate site has no
/// vCloud Director to check; then (with a token from a local user) its paged helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powervcav_powershell() {
    let w = world().await;
    let tasks = seed(&w.site1, &w.svc1, "bob", &["vappReplication"], 7).await;
    for t in &tasks[..5] {
        w.site1
            .patch(
                &format!("/tasks/{}", id_of(t)),
                Some(&w.svc1),
                &json!({"state": "SUCCEEDED", "resultType": "string", "result": "ok"}),
            )
            .await
            .expect(200, None);
    }
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    let mut conn = RawConnection::open(port).await;

    // Invoke-WebRequest -ContentType 'application/json', no Accept, compressed JSON.
    let cookie_login = post_expecting_continue(
        &mut conn,
        "/sessions",
        &[("Content-Type", "application/json"), ("Host", &host)],
        r#"{"type":"vcdCookie","vcdCookie":"0a1b2c3d4e5f"}"#,
    )
    .await;
    assert_eq!(cookie_login.status, 400, "{}", cookie_login.text());
    let envelope = cookie_login.json();
    assert_eq!(envelope["code"], "BadUserInput");
    assert!(
        envelope["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("localUser"),
        "the refusal names what works: {envelope}"
    );
    assert!(cookie_login.header("operationID").is_some());

    let token = w.site1.login("bob").await;
    let accept = "application/vnd.vmware.h4-v3+json;charset=UTF-8";
    // The paged helper: the URL by string concatenation, no encoding; `offset += items.Count`
    // until `offset >= total` (an empty page short of the total would loop for ever).
    let mut offset = 0u64;
    let mut seen = Vec::new();
    for round in 0.. {
        assert!(round < 10, "paging does not end");
        let target = format!("/tasks?offset={offset}&limit=2&state=SUCCEEDED");
        let page = conn
            .exchange(&raw::request(
                "GET",
                &target,
                &[("X-VCAV-Auth", &token), ("Accept", accept), ("Host", &host)],
                None,
            ))
            .await;
        assert_eq!(page.status, 200, "{}", page.text());
        assert_eq!(page.header("Content-Type"), Some(accept));
        let page = page.json();
        let items = page["items"].as_array().expect("items");
        assert!(!items.is_empty() || offset >= page["total"].as_u64().unwrap_or(0));
        offset += items.len() as u64;
        seen.extend(items.iter().map(id_of));
        if offset >= page["total"].as_u64().expect("total") {
            break;
        }
    }
    let expected: HashSet<String> = tasks[..5].iter().map(id_of).collect();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);

    // GET /sessions, then Disconnect-VCAV: DELETE /sessions with only the token.
    let me = conn
        .exchange(&raw::request(
            "GET",
            "/sessions",
            &[("X-VCAV-Auth", &token), ("Host", &host)],
            None,
        ))
        .await;
    assert_eq!(me.json()["user"], "bob");
    let bye = conn
        .exchange(&raw::request(
            "DELETE",
            "/sessions",
            &[("X-VCAV-Auth", &token), ("Host", &host)],
            None,
        ))
        .await;
    assert_eq!(bye.status, 204);
    let after = conn
        .exchange(&raw::request(
            "GET",
            "/tasks",
            &[("X-VCAV-Auth", &token), ("Host", &host)],
            None,
        ))
        .await;
    assert_eq!(after.status, 401);
}

/// VMware.VCDA.AVS on PowerShell 7: the login answer's Content-Type becomes the Accept of
/// every later request, one operation ID serves the whole connection, and a 401 with
/// `WWW-Authenticate: Authentication Token Required` means "the session is gone".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcda_avs_powershell() {
    let w = world().await;
    let types = ["replication", "vmReplication", "site"];
    let tasks = seed(&w.site1, &w.svc1, "alice", &types, 9).await;
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    let ua = "Powershell/7.4.6 VMware.VCDA.AVS/1.0.0";
    let mut conn = RawConnection::open(port).await;
    let body = "{\n  \"type\": \"localUser\",\n  \"localUser\": \"alice\",\n  \"localPassword\": \"PW\"\n}"
        .replace("PW", PASSWORD);
    let login = conn
        .exchange(&raw::request(
            "POST",
            "/sessions",
            &[
                ("Host", &host),
                ("User-Agent", ua),
                ("Content-Type", "application/json"),
            ],
            Some(body.as_bytes()),
        ))
        .await;
    let token = token_of(&login);
    let echoed_accept = login
        .header("Content-Type")
        .expect("a content type")
        .to_owned();
    let details = login.json();
    assert!(
        details["authenticatedSites"][0]["org"].is_string(),
        "{details}"
    );

    // One operation ID for the connection; Content-Type on every request, GETs included.
    let op = format!("VMware.VCDA.AVS-{}", guid());
    let call = |method: &str, target: &str| {
        raw::request(
            method,
            target,
            &[
                ("Host", &host),
                ("User-Agent", ua),
                ("X-VCAV-Auth", &token),
                ("Accept", &echoed_accept),
                ("Content-Type", "application/json"),
                ("operationID", &op),
            ],
            None,
        )
    };
    let is_json = |ct: &str| {
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        media == "application/json" || (media.contains('/') && media.ends_with("+json"))
    };
    let about = conn.exchange(&call("GET", "/diagnostics/about")).await;
    assert_eq!(about.status, 200, "{}", about.text());
    assert!(
        is_json(about.header("Content-Type").unwrap_or("")),
        "{}",
        about.head
    );
    assert_eq!(about.header("operationID"), Some(op.as_str()));
    assert_eq!(about.json()["serviceType"], "CLOUD");

    // HttpUtility.ParseQueryString encodes a comma as `%2c` (lower-case hex).
    let list = conn
        .exchange(&call(
            "GET",
            "/tasks?resourceType=replication%2cvmReplication&limit=100",
        ))
        .await;
    assert_eq!(list.status, 200, "{}", list.text());
    let got: HashSet<String> = list.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(got, ids_with_types(&tasks, &types[..2]));

    // An error with a body: the module shows its `.msg`.
    let bad = conn.exchange(&call("GET", "/tasks/not-a-task")).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["msg"].as_str().is_some_and(|m| !m.is_empty()));

    // After the session is gone, the 401 says so the way the module recognises.
    let logout = conn.exchange(&call("DELETE", "/sessions")).await;
    assert_eq!(logout.status, 204);
    let gone = conn.exchange(&call("GET", "/tasks")).await;
    assert_eq!(gone.status, 401);
    assert_eq!(
        gone.header("WWW-Authenticate"),
        Some("Authentication Token Required")
    );
    assert_eq!(gone.count_spelled("WWW-Authenticate"), 1, "{}", gone.head);
    assert_eq!(gone.json()["code"], "NotAuthenticated");
    // A wrong password is not an expired session: no such header.
    let wrong = raw::exchange(
        port,
        &raw::request(
            "POST",
            "/sessions",
            &[("Host", &host), ("Content-Type", "application/json")],
            Some(br#"{"type":"localUser","localUser":"alice","localPassword":"nope"}"#),
        ),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("WWW-Authenticate"), None);
}

/// The Terraform provider (Go's net/http): a login before every API call, the token sent as
/// Go spells it (`X-Vcav-Auth`), and the health read as a task it polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_provider_go() {
    let w = world().await;
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    let accept = "application/vnd.vmware.h4-v4.7+json;charset=UTF-8";
    // Go writes Host, User-Agent, Content-Length, then the request's headers, then
    // Accept-Encoding (it adds gzip itself).
    let login = || {
        let body = br#"{"type":"localUser","localUser":"admin","localPassword":"PW"}"#;
        let body = String::from_utf8_lossy(body).replace("PW", PASSWORD);
        format!(
            "POST /sessions HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: {accept}\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let with_token = |method: &str, target: &str, token: &str| {
        let length = if method == "POST" {
            "Content-Length: 0\r\n"
        } else {
            ""
        };
        format!(
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\n{length}Accept: {accept}\r\nContent-Type: application/json\r\nX-Vcav-Auth: {token}\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        .into_bytes()
    };
    let mut conn = RawConnection::open(port).await;
    // Every call: a login on the same connection, then the call with the new token.
    async fn call(
        conn: &mut RawConnection,
        login: &[u8],
        request: impl Fn(&str) -> Vec<u8>,
    ) -> RawReply {
        let token = token_of(&conn.exchange(login).await);
        let answer = conn.exchange(&request(&token)).await;
        assert_eq!(answer.header("Content-Encoding"), None, "{}", answer.head);
        answer
    }

    // data_source_cloud_health: POST diagnostics/health, no body; read the task's `id`.
    let started = call(&mut conn, &login(), |t| {
        with_token("POST", "/diagnostics/health", t)
    })
    .await;
    assert!((200..300).contains(&started.status), "{}", started.text());
    assert_eq!(started.header("Content-Type"), Some(accept));
    let task_id = started.json()["id"].as_str().expect("a task id").to_owned();
    // Poll until not RUNNING or QUEUED; FAILED is an error built from code and msg.
    let done = loop {
        let target = format!("/tasks/{task_id}");
        let task = call(&mut conn, &login(), |t| with_token("GET", &target, t))
            .await
            .json();
        match task["state"].as_str() {
            Some("RUNNING" | "QUEUED") => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => break task,
        }
    };
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    for field in ["progress", "lastUpdated", "startTime", "endTime"] {
        assert!(done[field].is_i64(), "{field} is a number: {done}");
    }
    let health = &done["result"];
    for field in [
        "productName",
        "buildVersion",
        "instanceId",
        "runtimeId",
        "address",
    ] {
        assert!(health[field].is_string(), "{field}: {health}");
    }
    for field in ["buildDate", "currentTime", "serviceBootTimestamp"] {
        assert!(health[field].is_i64(), "{field}: {health}");
    }
    assert!(health["dbError"].is_null(), "{health}");

    // It logs in before every call and never logs out: many sessions, none refused.
    for _ in 0..10 {
        let sites = call(&mut conn, &login(), |t| with_token("GET", "/sites", t)).await;
        assert_eq!(sites.status, 200);
    }

    // It does not check the login's status: a failed login leaves the header empty.
    let empty = conn.exchange(&with_token("GET", "/sites", "")).await;
    assert_eq!(empty.status, 401);
    assert_eq!(empty.json()["code"], "NotAuthenticated");
}

/// The Ansible module (Python, `fetch_url` on urllib): success is status 200 exactly; urllib
/// capitalises header names (`Content-type`, `X-vcav-auth`); the login answer's Content-Type
/// is sent back as `Accept`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ansible_module_python() {
    let w = world().await;
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    let body = format!(
        "{{\"type\": \"localUser\", \"localUser\": \"admin\", \"localPassword\": \"{PASSWORD}\"}}"
    );
    let login = raw::exchange(
        port,
        &raw::request(
            "POST",
            "/sessions",
            &[
                ("Accept-Encoding", "identity"),
                ("Host", &host),
                ("User-Agent", "ansible-httpget"),
                ("Accept", "application/json;charset=UTF-8"),
                ("Content-type", "application/json"),
                ("Connection", "close"),
            ],
            Some(body.as_bytes()),
        ),
    )
    .await;
    let token = token_of(&login);
    let h_accept = login
        .header("Content-Type")
        .expect("content type")
        .to_owned();
    let about = raw::exchange(
        port,
        &raw::request(
            "GET",
            "/diagnostics/about",
            &[
                ("Accept-Encoding", "identity"),
                ("Host", &host),
                ("User-Agent", "ansible-httpget"),
                ("Accept", &h_accept),
                ("Content-type", "application/json"),
                ("X-vcav-auth", &token),
                ("Connection", "close"),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(about.status, 200, "{}", about.text());
    let info = about.json();
    assert_eq!(info["productName"], "sitegate");
    assert!(info["instanceId"]
        .as_str()
        .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()));

    // Its vCloud Director login (with `username`/`password`): refused, clearly.
    let vcd = raw::exchange(
        port,
        &raw::request(
            "POST",
            "/sessions",
            &[
                ("Host", &host),
                ("Content-type", "application/json"),
                ("Connection", "close"),
            ],
            Some(br#"{"type": "vcdCredentials", "username": "a@Org1", "password": "x"}"#),
        ),
    )
    .await;
    assert_eq!(vcd.status, 400);
    assert_eq!(vcd.json()["code"], "BadUserInput");
}

/// A Nagios-style health check in Perl (LWP): `charset` after a space, no `Accept`, and the
/// health answer read one top-level key at a time: defined means CRITICAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perl_health_check() {
    let mut w = world().await;
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    // Its login is vCloud Director credentials: refused, clearly.
    let vcd = raw::exchange(
        port,
        &raw::request(
            "POST",
            "/sessions",
            &[
                ("Host", &host),
                ("Content-Type", "application/json; charset=UTF-8"),
            ],
            Some(br#"{"vcdPassword":"x","type":"vcdCredentials","vcdUser":"admin@System"}"#),
        ),
    )
    .await;
    assert_eq!(vcd.status, 400);
    // With a local user's body in Perl's hash order, it works.
    let body =
        format!(r#"{{"localPassword":"{PASSWORD}","type":"localUser","localUser":"admin"}}"#);
    let login = raw::exchange(
        port,
        &raw::request(
            "POST",
            "/sessions",
            &[
                ("Host", &host),
                ("User-Agent", "libwww-perl/6.67"),
                ("Content-Type", "application/json; charset=UTF-8"),
            ],
            Some(body.as_bytes()),
        ),
    )
    .await;
    let token = token_of(&login);
    let check = |key: &'static str| {
        let host = host.clone();
        let token = token.clone();
        async move {
            let r = raw::exchange(
                port,
                &raw::request(
                    "GET",
                    "/diagnostics/health",
                    &[
                        ("Host", &host),
                        ("User-Agent", "libwww-perl/6.67"),
                        ("X-VCAV-Auth", &token),
                    ],
                    None,
                ),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let health = r.json();
            assert!(
                health.get(key).is_some(),
                "{key} is always present: {health}"
            );
            !health[key].is_null()
        }
    };
    // site1 started before site2, so its first probe of the link failed: healthy once a
    // probe gets through.
    support::wait_for("peersError null", Duration::from_secs(30), || async {
        (!check("peersError").await).then_some(())
    })
    .await;
    for key in ["dbError", "certificateError"] {
        assert!(!check(key).await, "{key} is null on a healthy site");
    }
    // site2 goes away: the peers key turns CRITICAL once the link notices.
    w.site2.kill9();
    support::wait_for("peersError set", Duration::from_secs(30), || async {
        check("peersError").await.then_some(())
    })
    .await;
    assert!(!check("dbError").await);
}

/// A bash script with the real curl: the token comes from `grep X-VCAV-Auth | cut -d " "
/// -f2`, which keeps the header line's CR, and goes back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_script() {
    let w = world().await;
    let url = format!("http://127.0.0.1:{}", w.site1.port);
    let script = format!(
        r#"set -u
accept='application/vnd.vmware.h4-v4.3+json;charset=UTF-8'
body='{{
  "type": "localUser",
  "localUser": "alice",
  "localPassword": "{PASSWORD}"
}}'
Auth=$(curl -s "{url}/sessions" -i -X POST -H 'Content-Type: application/json' -H "Accept: $accept" -d "$body" | grep X-VCAV-Auth | cut -d " " -f2)
case "$Auth" in *$'\r') echo "token ends in CR" ;; esac
code=$(curl -s -o /dev/null -w '%{{http_code}}' "{url}/tasks" -H "Accept: $accept" -H "X-VCAV-Auth: $Auth")
echo "status $code"
curl -s "{url}/diagnostics/about" -H "Accept: $accept" -H "X-VCAV-Auth: $Auth"
"#
    );
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("bash runs (curl is installed by scripts/test)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("token ends in CR"),
        "the quirk is exercised: {stdout}"
    );
    assert!(
        stdout.contains("status 200"),
        "the token with its CR works: {stdout}"
    );
    assert!(stdout.contains("\"productName\":\"sitegate\""), "{stdout}");
}

/// A Java orchestrator on Apache HttpClient 4: `Content-type` spelled so, an SSO login, and
/// the token taken from `Header.toString()` after ": ", so it keeps a leading space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_httpclient() {
    let w = world().await;
    let port = w.site1.port;
    let host = format!("127.0.0.1:{port}");
    let sso = raw::exchange(
        port,
        &raw::request(
            "POST",
            "/sessions",
            &[("Content-type", "application/json"), ("Host", &host), ("Connection", "Keep-Alive"), ("User-Agent", "Apache-HttpClient/4.5.13 (Java/17.0.15)")],
            Some(b"{\r\n\"type\":\"ssoCredentials\",\r\n\"username\":\"administrator@vsphere.local\",\r\n\"password\":\"x\"\r\n}"),
        ),
    )
    .await;
    assert_eq!(sso.status, 400);
    assert_eq!(sso.json()["code"], "BadUserInput");

    let token = w.site1.login("alice").await;
    let spaced = format!(" {token}");
    let r = raw::exchange(
        port,
        &raw::request(
            "GET",
            "/tasks",
            &[
                ("Content-type", "application/json"),
                ("X-VCAV-Auth", &spaced),
                ("Host", &host),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "a token with a leading space: {}", r.text());
}

/// What hyper answers itself, before any handler, carries the envelope and an operation ID
/// too: a bare CR inside a header value, a URI over its limit, a header section over its
/// limit. The connection is closed after each (the request could not be framed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_envelope() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let port = site.port;
    let long_uri = format!("/tasks?type={}", "a".repeat(70 * 1024));
    // Over hyper's own cap on a head (about 88 KiB), not just over `max_header_bytes`.
    let huge_header = "h".repeat(300 * 1024);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            b"GET /tasks HTTP/1.1\r\nHost: x\r\nX-VCAV-Auth: ab\rcd\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"GET /tasks HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n".to_vec(),
            400,
        ),
        (raw::request("GET", &long_uri, &[("Host", "x")], None), 414),
        (
            raw::request(
                "GET",
                "/tasks",
                &[("Host", "x"), ("X-Big", &huge_header)],
                None,
            ),
            431,
        ),
    ];
    let mut seen_ops = HashSet::new();
    for (request, status) in cases {
        let r = raw::exchange(port, &request).await;
        assert_eq!(r.status, status, "{}", r.head);
        assert_eq!(
            r.header("Content-Type"),
            Some("application/json"),
            "{}",
            r.head
        );
        assert_eq!(r.count_spelled("operationID"), 1, "{}", r.head);
        let op = r.header("operationID").expect("operationID").to_owned();
        assert!(uuid::Uuid::parse_str(&op).is_ok(), "{op}");
        assert!(seen_ops.insert(op));
        let envelope = r.json();
        assert_eq!(envelope["code"], "BadUserInput");
        assert_eq!(envelope["stacktrace"], "");
        assert_eq!(envelope["args"], json!([]));
        assert!(envelope["msg"].as_str().is_some_and(|m| m.len() > 10));
    }
    // The site is fine afterwards.
    site.get("/healthz", None).await.expect(200, None);
}

/// The CR a shell leaves on a token is read as trailing whitespace, as nginx does, on a
/// request that also has a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_trailing_cr_works() {
    let fed = Federation::init(&["site1"]);
    let site = fed.start("site1").await;
    let svc = site.login("svc").await;
    let port = site.port;
    let body = br#"{"user":"alice","workflowInfo":{"type":"sync","resourceType":"vm","resourceId":"a","resourceName":"x"}}"#;
    let mut request = format!(
        "POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-VCAV-Auth: {svc}\r\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let created = raw::exchange(port, &request).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json()["user"], "alice");
}
