//! The command-line client against real sites: `login` keeps the token in a 0600 file,
//! `tasks list|get` read local and remote tasks, `tasks watch` follows a task that a writer
//! moves forward and exits 0 on SUCCEEDED and 2 on FAILED, and failed requests print the
//! server's operationID.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sitegate_testkit::site::*;

/// Runs `sitegate <args>` as a client of `site`, with the session kept in `session`.
fn client(site: &Site, session: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = command(session.parent().expect("session file has a directory"));
    cmd.args(args)
        .env("SITEGATE_URL", format!("http://127.0.0.1:{}", site.port))
        .env("SITEGATE_SESSION_FILE", session)
        .env_remove("SITEGATE_CA_CERT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn sitegate client");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sitegate {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn session_file(fed: &Federation, name: &str) -> PathBuf {
    fed.dir.path().join(format!("{name}-session.json"))
}

#[tokio::test]
async fn login_list_get_and_errors_with_operation_ids() {
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let site2 = fed.start("site2").await;
    let svc1 = site1.login("svc").await;
    let svc2 = site2.login("svc").await;
    let local = site1
        .create_task(&svc1, &new_task("alice", "Sync", "vm", "vm-1", "web-01"))
        .await;
    let remote = site2
        .create_task(&svc2, &new_task("alice", "Failover", "vm", "vm-2", "db-01"))
        .await;
    let session = session_file(&fed, "alice");

    // Without a session, commands say how to get one.
    let out = client(&site1, &session, &["tasks", "list"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("sitegate login"), "{}", text(&out).1);

    // A wrong password: the envelope's code and the operationID are printed, exit 1.
    let out = client(
        &site1,
        &session,
        &["login", "--user", "alice", "--password-stdin"],
        Some("not-the-password\n"),
    );
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("NotAuthenticated"), "{err}");
    assert!(err.contains("operationID "), "{err}");
    assert!(!session.exists(), "a failed login saves nothing");

    let out = client(
        &site1,
        &session,
        &["login", "--user", "alice", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&session)
            .expect("session file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is private");
    }
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&session).expect("read session")).expect("json");
    let token = saved["token"].as_str().expect("token saved").to_owned();
    assert_eq!(site1.get("/sessions", Some(&token)).await.status, 200);

    // list and get, as JSON, locally.
    let out = client(
        &site1,
        &session,
        &["tasks", "list", "--output", "json"],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let page: Value = serde_json::from_slice(&out.stdout).expect("list prints JSON");
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], local["id"]);
    let out = client(
        &site1,
        &session,
        &["tasks", "get", &id_of(&local), "--output", "json"],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let task: Value = serde_json::from_slice(&out.stdout).expect("get prints JSON");
    assert_eq!(task["id"], local["id"]);
    assert_eq!(task["workflowInfo"]["resourceName"], "web-01");

    // The table names the task and its state.
    let out = client(&site1, &session, &["tasks", "list"], None);
    let (table, _) = text(&out);
    assert!(
        table.contains(&id_of(&local)) && table.contains("RUNNING"),
        "{table}"
    );

    // Remote: not extended yet is RemoteAuthenticationFailure; after `extend`, site2's task.
    let out = client(
        &site1,
        &session,
        &["tasks", "get", &id_of(&remote), "--site", "site2"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("RemoteAuthenticationFailure"),
        "{:?}",
        text(&out)
    );
    let out = client(&site1, &session, &["extend", "site2"], None);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = client(
        &site1,
        &session,
        &[
            "tasks",
            "get",
            &id_of(&remote),
            "--site",
            "site2",
            "--output",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let task: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(task["site"], "site2");

    // Unknown site and a malformed ID: the right codes, with operation IDs.
    let out = client(
        &site1,
        &session,
        &["tasks", "list", "--site", "nowhere"],
        None,
    );
    assert!(text(&out).1.contains("SiteNotFound"), "{:?}", text(&out));
    let out = client(&site1, &session, &["tasks", "get", "not-a-uuid"], None);
    let (_, err) = text(&out);
    assert!(
        err.contains("BadUserInput") && err.contains("operationID "),
        "{err}"
    );

    // sites shows both sites.
    let out = client(&site1, &session, &["sites", "--output", "json"], None);
    let sites: Value = serde_json::from_slice(&out.stdout).expect("sites JSON");
    assert_eq!(sites.as_array().map(Vec::len), Some(2), "{sites}");

    // logout kills the token at once and removes the file.
    let out = client(&site1, &session, &["logout"], None);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!session.exists());
    assert_eq!(site1.get("/sessions", Some(&token)).await.status, 401);
}

#[tokio::test]
async fn watch_follows_a_task_to_its_end_with_the_right_exit_code() {
    let fed = Federation::init(&["site1"]);
    let site1 = fed.start("site1").await;
    let svc = site1.login("svc").await;
    let session = session_file(&fed, "alice");
    let out = client(
        &site1,
        &session,
        &["login", "--user", "alice", "--password-stdin"],
        Some(PASSWORD),
    );
    assert!(out.status.success(), "{:?}", text(&out));

    for (ending, exit_code) in [("SUCCEEDED", 0), ("FAILED", 2)] {
        let task = site1
            .create_task(&svc, &new_task("alice", "Sync", "vm", "vm-1", "web-01"))
            .await;
        let id = id_of(&task);
        let url = format!("http://127.0.0.1:{}", site1.port);
        let writer = {
            let (svc, id) = (svc.clone(), id.clone());
            let http = http_client();
            tokio::spawn(async move {
                for progress in [20, 40, 60, 80] {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let r = http
                        .patch(format!("{url}/tasks/{id}"))
                        .header("X-VCAV-Auth", &svc)
                        .json(&json!({"progress": progress}))
                        .send()
                        .await
                        .expect("patch");
                    assert_eq!(r.status(), 200);
                }
                let end = if ending == "SUCCEEDED" {
                    json!({"state": "SUCCEEDED", "resultType": "none", "result": {}})
                } else {
                    json!({"state": "FAILED", "error": {"code": "ReplicationError",
                        "msg": "the target datastore is full", "args": [], "stacktrace": ""}})
                };
                let r = http
                    .patch(format!("{url}/tasks/{id}"))
                    .header("X-VCAV-Auth", &svc)
                    .json(&end)
                    .send()
                    .await
                    .expect("finish");
                assert_eq!(r.status(), 200);
            })
        };
        let started = Instant::now();
        let (out, session2) = {
            let site = site1.port;
            let session = session.clone();
            let id = id.clone();
            tokio::task::spawn_blocking(move || {
                let mut cmd = command(session.parent().expect("dir"));
                cmd.args(["tasks", "watch", &id, "--output", "json"])
                    .env("SITEGATE_URL", format!("http://127.0.0.1:{site}"))
                    .env("SITEGATE_SESSION_FILE", &session);
                (run_with_deadline(cmd, Duration::from_secs(60)), session)
            })
            .await
            .expect("watch ran")
        };
        writer.await.expect("writer");
        assert!(session2.exists());
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(exit_code), "{stdout}\n{stderr}");
        assert!(
            started.elapsed() >= Duration::from_millis(1000),
            "watch returned before the task ended"
        );
        let task: Value = serde_json::from_str(&stdout).expect("watch prints the final task");
        assert_eq!(task["state"], ending);
        if ending == "FAILED" {
            assert!(stderr.contains("the target datastore is full"), "{stderr}");
        } else {
            assert_eq!(task["progress"], 100);
        }
    }
}
