//! The command line the contract tests rely on: `init`, `serve` (config errors, SIGTERM) and
//! `demo`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sitegate_testkit::site as support;
use support::{Federation, Proc, Site, PASSWORD};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_a_ready_federation() {
    let fed = Federation::init(&["site1", "site2"]);
    let dir = fed.fed_dir();
    let p = fed.base_port;

    // Certificates are public; keys and password hashes are the owner's only.
    assert!(read(&dir.join("ca.pem")).starts_with("-----BEGIN CERTIFICATE-----"));
    let ca_key = dir.join("ca.key");
    assert!(read(&ca_key).contains("PRIVATE KEY"));
    assert_eq!(mode(&ca_key), 0o600, "ca.key mode");
    for site in ["site1", "site2"] {
        let cert = read(&dir.join(format!("{site}.pem")));
        assert!(
            cert.starts_with("-----BEGIN CERTIFICATE-----"),
            "{site}.pem"
        );
        let key = dir.join(format!("{site}.key"));
        assert!(read(&key).contains("PRIVATE KEY"), "{site}.key");
        assert_eq!(mode(&key), 0o600, "{site}.key mode");
        let users = dir.join(format!("{site}.users.toml"));
        assert_eq!(mode(&users), 0o600, "{site}.users.toml mode");
        let users_text = read(&users);
        for user in ["admin", "alice", "bob", "svc"] {
            assert!(
                users_text.contains(&format!("\"{user}\"")),
                "{site}: user {user} missing"
            );
        }
        assert!(users_text.contains("$argon2"), "password hashes are argon2");
        assert!(
            !users_text.contains(PASSWORD),
            "the users file must not hold the password"
        );
        assert!(dir.join(format!("{site}.toml")).is_file());
    }

    // Site k: client API on P+2k, peer link on P+2k+1; each site paired with the other.
    let site1 = read(&dir.join("site1.toml"));
    let site2 = read(&dir.join("site2.toml"));
    assert!(site1.contains("\"site1\"") && site2.contains("\"site2\""));
    assert!(site1.contains(&format!("\"127.0.0.1:{p}\"")), "{site1}");
    assert!(
        site1.contains(&format!("\"127.0.0.1:{}\"", p + 1)),
        "{site1}"
    );
    assert!(
        site1.contains(&format!("https://127.0.0.1:{}", p + 3)),
        "{site1}"
    );
    assert!(
        site2.contains(&format!("\"127.0.0.1:{}\"", p + 2)),
        "{site2}"
    );
    assert!(
        site2.contains(&format!("\"127.0.0.1:{}\"", p + 3)),
        "{site2}"
    );
    assert!(
        site2.contains(&format!("https://127.0.0.1:{}", p + 1)),
        "{site2}"
    );
    for (k, site) in ["site1", "site2"].iter().enumerate() {
        assert!(
            fed.init_stdout
                .contains(&format!("http://127.0.0.1:{}", usize::from(p) + 2 * k)),
            "init's summary names {site}'s port: {}",
            fed.init_stdout
        );
    }

    // Ready: both sites serve with these files, and every user logs in with the password.
    let s1 = fed.start("site1").await;
    let s2 = fed.start("site2").await;
    assert_eq!(s1.port, p);
    assert_eq!(s2.port, p + 2);
    for (site, name) in [(&s1, "site1"), (&s2, "site2")] {
        for user in ["admin", "alice", "bob", "svc"] {
            let r = site.try_login(user, PASSWORD).await;
            assert_eq!(
                r.expect(200, None)["authenticatedSites"][0]["site"],
                json!(name)
            );
        }
    }

    // Refused arguments.
    let tmp = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["--sites", "bad name", "--dev-password", "pw"],
        vec!["--sites", "site1,site1", "--dev-password", "pw"],
        vec!["--sites", "site1", "--dev-password", ""],
    ] {
        let mut cmd = support::command(tmp.path());
        cmd.arg("init")
            .arg("--dir")
            .arg(tmp.path().join("x"))
            .arg("--base-port")
            .arg("20000")
            .args(&args);
        let out = support::run_with_deadline(cmd, Duration::from_secs(60));
        assert!(!out.status.success(), "init {args:?} should fail");
        assert!(!out.stderr.is_empty(), "init {args:?} should say why");
    }
}

fn write_config(dir: &Path, port: u16, extra_site: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "[site]\nname = \"site1\"\n{extra_site}\n[listen]\nclient = \"127.0.0.1:{port}\"\n\
             [auth]\nusers_file = \"users.toml\"\n{extra}\n"
        ),
    )
    .expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_unknown_config_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = support::free_base_port(1);
    for (extra_site, extra, key) in [
        ("frobnicate = true", "", "frobnicate"),
        ("", "[limits]\nmax_body_byte = 5000", "max_body_byte"),
        ("", "[sitee]\nname = \"x\"", "sitee"),
    ] {
        let config = write_config(tmp.path(), port, extra_site, extra);
        let mut cmd = support::command(tmp.path());
        cmd.arg("serve").arg("--config").arg(&config);
        let out = support::run_with_deadline(cmd, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "serve accepted the unknown key {key}"
        );
        assert!(
            stderr.contains(key),
            "the error should name the key {key}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_missing_config_fails() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("missing.toml");
    let mut cmd = support::command(tmp.path());
    cmd.arg("serve").arg("--config").arg(&missing);
    let out = support::run_with_deadline(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve without its config file started"
    );
    assert!(stderr.contains("missing.toml"), "stderr: {stderr}");
    // Nothing was created in its place.
    assert!(!missing.exists());
    assert!(!tmp.path().join("data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_serve_cleanly() {
    let fed = Federation::init(&["site1"]);
    let mut site = fed.start("site1").await;
    let token = site.login("alice").await;
    site.get("/readyz", None).await.expect(200, None);
    // An idle keep-alive connection is open in the client's pool.
    site.get("/sessions", Some(&token)).await.expect(200, None);

    let started = Instant::now();
    let status = site.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    // The port is free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", site.port)).is_ok());
    // And the site comes back on the same data.
    site.start().await;
    site.get("/sessions", Some(&token)).await.expect(200, None);
}

/// The `  site1  http://127.0.0.1:P` line of the demo's intro, as (site, port).
fn demo_sites(stdout: &str) -> HashMap<String, u16> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let site = words.next()?;
            let url = words.next()?;
            let port = url.strip_prefix("http://127.0.0.1:")?.parse().ok()?;
            words.next().is_none().then(|| (site.to_owned(), port))
        })
        .collect()
}

fn demo_password(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .find_map(|l| l.split("password: ").nth(1))
        .map(|p| p.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_tasks_that_make_progress() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = support::free_base_port(4);
    let mut cmd = support::command(tmp.path());
    cmd.arg("demo")
        .arg("--dir")
        .arg(tmp.path().join("demo"))
        .arg("--base-port")
        .arg(base.to_string());
    let mut demo = Proc::spawn(cmd, tmp.path(), "demo");

    // The intro names both sites and the password.
    let until = Instant::now() + support::START_DEADLINE;
    let (sites, password) = loop {
        let out = demo.stdout();
        let sites = demo_sites(&out);
        if let (true, Some(pw)) = (sites.len() >= 2, demo_password(&out)) {
            break (sites, pw);
        }
        if let Some(status) = demo.exited() {
            panic!("demo exited with {status} before printing its intro");
        }
        assert!(Instant::now() < until, "the demo printed no intro: {out}");
        tokio::time::sleep(support::POLL_INTERVAL).await;
    };
    assert_eq!(sites.get("site1"), Some(&base), "{sites:?}");
    assert_eq!(sites.get("site2"), Some(&(base + 2)), "{sites:?}");

    let site = Site::new("site1", tmp.path().join("unused.toml"), base, tmp.path());
    site.get("/healthz", None).await.expect(200, None);
    let admin = site.login_with("admin", &password).await;

    // Some task's progress must go up (or the task finish) while we watch.
    let mut first_seen: HashMap<String, (i64, String)> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(15);
    let advanced = loop {
        let r = site.get("/tasks?limit=1000", Some(&admin)).await;
        let body = r.expect(200, None);
        let mut hit = None;
        for t in body["items"].as_array().expect("items") {
            let id = support::id_of(t);
            let progress = support::int(t, "progress");
            let state = t["state"].as_str().unwrap_or("?").to_owned();
            match first_seen.get(&id) {
                None => {
                    first_seen.insert(id, (progress, state));
                }
                Some((p0, s0)) => {
                    if progress > *p0 || (s0 == "RUNNING" && state != "RUNNING") {
                        hit = Some((id, *p0, progress, state));
                    }
                }
            }
        }
        if let Some(hit) = hit {
            break hit;
        }
        assert!(
            Instant::now() < until,
            "no demo task made progress in 15s; seen: {first_seen:?}"
        );
        assert!(demo.exited().is_none(), "the demo exited");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (id, from, to, state) = advanced;
    assert!(to >= from, "{id}: {from} -> {to} ({state})");
    // The progress lines are printed too.
    let out = demo.stdout();
    assert!(
        out.lines()
            .any(|l| l.starts_with("site1") && l.contains('%')),
        "no progress lines in the demo's output: {out}"
    );
    let users_seen: Vec<Value> = site
        .get("/tasks?limit=1000", Some(&admin))
        .await
        .expect(200, None)["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|t| t["user"].clone())
        .collect();
    assert!(
        users_seen
            .iter()
            .all(|u| *u == json!("alice") || *u == json!("bob")),
        "{users_seen:?}"
    );

    let status = demo
        .terminate(support::STOP_DEADLINE)
        .await
        .expect("the demo did not stop on SIGTERM");
    assert!(status.success(), "demo exit status {status}");
}

/// `sitegate demo` with one of its ports taken says which port and how to choose others, and
/// writes nothing.
#[test]
fn the_demo_names_a_taken_port_and_the_way_out() {
    let base = support::free_base_port(4);
    let taken = std::net::TcpListener::bind(("127.0.0.1", base + 1)).expect("take a port");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = support::command(dir.path());
    cmd.args(["demo", "--base-port", &base.to_string(), "--dir", "demo"]);
    let out = support::run_with_deadline(cmd, Duration::from_secs(30));
    drop(taken);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "port {} (for site1's peer link) is not free",
            base + 1
        )) && stderr.contains("--base-port"),
        "{stderr}"
    );
    assert!(!dir.path().join("demo").exists(), "nothing was written");
}
