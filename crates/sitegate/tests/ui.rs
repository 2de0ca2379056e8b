//! The dashboard at `/ui`, over a real two-site federation: its files are served with their
//! types and a strict policy, and in a real headless Chromium (driven by chromedriver over the
//! W3C WebDriver protocol) it logs in, shows the user's tasks and moves a progress bar as the
//! task's event stream reports progress, extends the session to the peer and shows the peer's
//! tasks, shows the peer as down once it is killed, and logs out.
//!
//! The browser comes from the system (Debian's `chromium` and `chromium-driver`); the test
//! fails, never skips, when it is missing, so a CI machine without it cannot pass quietly.

#![cfg(unix)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use sitegate_testkit::site::*;

/// How long the page may take to show something the test is waiting for.
const UI_DEADLINE: Duration = Duration::from_secs(20);

/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The browser and its driver: Debian's paths, or the environment's when set.
fn browser_binaries() -> (PathBuf, PathBuf) {
    let find = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let chromium = find("SITEGATE_TEST_CHROMIUM", "/usr/bin/chromium");
    let driver = find("SITEGATE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver");
    for (path, var) in [
        (&chromium, "SITEGATE_TEST_CHROMIUM"),
        (&driver, "SITEGATE_TEST_CHROMEDRIVER"),
    ] {
        assert!(
            path.is_file(),
            "the dashboard test needs a headless browser, and {} is missing. Install it with \
             `apt-get install -y chromium chromium-driver` (Debian), or point {var} at it.",
            path.display()
        );
    }
    (chromium, driver)
}

/// chromedriver with one Chromium session. Dropping it ends the session, the driver and any
/// Chromium process left of this profile, so no browser outlives the test even when it panics.
struct Browser {
    driver: Child,
    driver_log: PathBuf,
    port: u16,
    base: String,
    /// Empty until the session is open, and again once it is closed.
    session: String,
    http: reqwest::Client,
    /// Chromium's profile; a fresh one, so nothing from another run is remembered.
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path, logs: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("tempdir for the browser profile");
        let port = free_base_port(1);
        let driver_log = logs.join("chromedriver.log");
        let log = std::fs::File::create(&driver_log).expect("chromedriver log file");
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", chromedriver.display()));
        let http = http_client();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            driver_log,
            port,
            base,
            session: String::new(),
            http,
            profile,
        };
        let status_url = format!("{}/status", browser.base);
        let http = browser.http.clone();
        wait_for("chromedriver to be ready", START_DEADLINE, || {
            let (http, url) = (http.clone(), status_url.clone());
            async move {
                let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            // Containers often have a small /dev/shm.
            "--disable-dev-shm-usage",
            // The sites are on loopback; a proxy from the environment must not be asked.
            "--no-proxy-server",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .chain([format!(
            "--user-data-dir={}",
            browser.profile.path().display()
        )])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let created = browser
            .raw(Method::POST, "/session", Some(&caps))
            .await
            .unwrap_or_else(|e| browser.fail(&format!("could not open a browser session: {e}")));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session without sessionId: {created}"))
            .to_owned();
        browser
    }

    /// Panics with `msg` and the driver's log.
    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n---- chromedriver log ----\n{}",
            std::fs::read_to_string(&self.driver_log).unwrap_or_default()
        )
    }

    /// One WebDriver call: its `value`, or the error it answered.
    async fn raw(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await.map_err(|e| format!("{path}: {e}"))?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| format!("{path}: {e}"))?;
        if status.is_success() {
            Ok(v["value"].clone())
        } else {
            Err(format!("{path} answered {status}: {}", v["value"]))
        }
    }

    /// A call within the session.
    async fn try_command(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn command(&self, method: Method, path: &str, body: Option<&Value>) -> Value {
        match self.try_command(method, path, body).await {
            Ok(v) => v,
            Err(e) => self.fail(&format!("WebDriver call failed: {e}")),
        }
    }

    async fn goto(&self, url: &str) {
        self.command(Method::POST, "/url", Some(&json!({ "url": url })))
            .await;
    }

    async fn find(&self, css: &str) -> Result<String, String> {
        let v = self
            .try_command(
                Method::POST,
                "/element",
                Some(&json!({"using": "css selector", "value": css})),
            )
            .await?;
        v[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element reference in {v}"))
    }

    /// Types into the element `css` names, once it is there.
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.wait_for_element(css).await;
        self.command(
            Method::POST,
            &format!("/element/{id}/value"),
            Some(&json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let id = self.wait_for_element(css).await;
        self.command(
            Method::POST,
            &format!("/element/{id}/click"),
            Some(&json!({})),
        )
        .await;
    }

    /// The rendered text of the element `css` names, once it is there.
    async fn text(&self, css: &str) -> String {
        let id = self.wait_for_element(css).await;
        let v = self
            .command(Method::GET, &format!("/element/{id}/text"), None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    async fn wait_for_element(&self, css: &str) -> String {
        let until = Instant::now() + UI_DEADLINE;
        loop {
            match self.find(css).await {
                Ok(id) => return id,
                Err(e) if Instant::now() > until => {
                    self.fail_with_page(&format!("no element {css} after {UI_DEADLINE:?}: {e}"))
                        .await
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    async fn eval(&self, script: &str) -> Value {
        self.command(
            Method::POST,
            "/execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
        .await
    }

    /// Polls `script` until it returns something other than `null`/`false`; returns that.
    async fn wait_until(&self, what: &str, script: &str) -> Value {
        let until = Instant::now() + UI_DEADLINE;
        loop {
            let v = self.eval(script).await;
            if !matches!(v, Value::Null | Value::Bool(false)) {
                return v;
            }
            if Instant::now() > until {
                self.fail_with_page(&format!(
                    "timed out after {UI_DEADLINE:?} waiting for {what}"
                ))
                .await;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Panics with `msg` and what the page shows, which is what tells why.
    async fn fail_with_page(&self, msg: &str) -> ! {
        let page = self
            .try_command(
                Method::POST,
                "/execute/sync",
                Some(
                    &json!({"script": "return {view: document.body.dataset.view, \
                    error: document.getElementById('error').hidden ? null : \
                    document.getElementById('error').innerText, text: document.body.innerText}",
                    "args": []}),
                ),
            )
            .await;
        let page = match page {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(e) => format!("(could not read the page: {e})"),
        };
        self.fail(&format!("{msg}\n---- page ----\n{page}"))
    }

    /// Ends the session, which closes Chromium.
    async fn quit(&mut self) {
        self.command(Method::DELETE, "", None).await;
        self.session.clear();
    }
}

/// `DELETE /session/{id}` without a runtime, for `Drop`: chromedriver then closes Chromium.
fn close_session_blocking(port: u16, session: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(STOP_DEADLINE))?;
    stream.set_write_timeout(Some(STOP_DEADLINE))?;
    write!(
        stream,
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(())
}

/// The processes whose command line names `profile`: Chromium processes of this test only.
fn processes_using(profile: &Path) -> Vec<u32> {
    let needle = format!("--user-data-dir={}", profile.display()).into_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid > 1 && *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.windows(needle.len()).any(|w| w == needle.as_slice()))
        })
        .collect()
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = close_session_blocking(self.port, &self.session);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // A browser that did not close is killed by its own process ID, one by one (never
        // a process group: `kill -KILL -<pgid>` is read by some `kill`s as `kill -1`).
        for pid in processes_using(self.profile.path()) {
            let _ = Command::new("kill")
                .arg("-s")
                .arg("KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// A JavaScript expression for the task row of `id`.
fn row(id: &str) -> String {
    format!("document.getElementById('task-{id}')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_with_its_types_and_a_strict_policy() {
    let fed = Federation::init(&["site1"]);
    let site1 = fed.start("site1").await;
    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
    ] {
        // Asking for the vendor JSON type must not relabel the page: only JSON is rewritten.
        let r = send(
            site1
                .request(Method::GET, path)
                .header("Accept", "application/vnd.vmware.h4-v4+json"),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.header("content-type").as_deref(), Some(content_type));
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
            "{path}: {csp}"
        );
        assert_eq!(r.header("cache-control").as_deref(), Some("no-cache"));
        assert_eq!(
            r.header("x-content-type-options").as_deref(),
            Some("nosniff")
        );
        r.operation_id();
        // Revalidation is cheap.
        let etag = r.header("etag").expect("etag");
        let again = send(
            site1
                .request(Method::GET, path)
                .header("If-None-Match", &etag),
        )
        .await;
        assert_eq!(again.status, 304, "{path}");
    }
    let page = site1.get("/ui", None).await.text;
    assert!(
        page.contains("<script src=\"/ui/app.js\""),
        "the page loads its script from this site: {page}"
    );
    site1
        .get("/ui/nope.js", None)
        .await
        .expect(404, Some("NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_tasks_live_progress_and_link_health_in_a_browser() {
    let started = Instant::now();
    // First, so a machine without a browser fails at once with the way to get one.
    let (chromium, chromedriver) = browser_binaries();
    let fed = Federation::init(&["site1", "site2"]);
    let site1 = fed.start("site1").await;
    let mut site2 = fed.start("site2").await;
    let svc1 = site1.login("svc").await;
    let svc2 = site2.login("svc").await;
    let local = site1
        .create_task(&svc1, &new_task("alice", "Backup", "vm", "vm-1", "web-01"))
        .await;
    let local_id = id_of(&local);
    site1
        .patch(
            &format!("/tasks/{local_id}"),
            Some(&svc1),
            &json!({"progress": 10}),
        )
        .await
        .expect(200, None);
    let bobs = site1
        .create_task(&svc1, &new_task("bob", "Backup", "vm", "vm-2", "web-02"))
        .await;
    let remote = site2
        .create_task(&svc2, &new_task("alice", "Failover", "vm", "vm-9", "db-01"))
        .await;
    let remote_id = id_of(&remote);

    let mut browser = Browser::start(&chromium, &chromedriver, fed.dir.path()).await;
    browser.goto(&site1.url("/ui")).await;
    browser
        .wait_until(
            "the login form",
            "return document.body.dataset.view === 'login'",
        )
        .await;

    // Log in through the form.
    browser.type_into("#login-user", "alice").await;
    browser.type_into("#login-password", PASSWORD).await;
    browser.click("#login-submit").await;
    browser
        .wait_until(
            "the dashboard for alice",
            "return document.getElementById('session-user').textContent === 'alice'",
        )
        .await;
    assert_eq!(browser.text("#session-user").await, "alice");
    let token = browser
        .eval("return sessionStorage.getItem('sitegate.token')")
        .await
        .as_str()
        .map(str::to_owned)
        .expect("the token is kept in sessionStorage");

    // Her task, at 10%, followed by its event stream; not bob's, not site2's (not extended).
    browser
        .wait_until(
            "alice's task at 10%, followed live",
            &format!(
                "const r = {}; return r !== null && r.dataset.progress === '10' \
                 && r.dataset.live === 'true' && Number(r.dataset.events) >= 1",
                row(&local_id)
            ),
        )
        .await;
    let absent = browser
        .eval(&format!(
            "return [{}, {}].every((r) => r === null)",
            row(&id_of(&bobs)),
            row(&remote_id)
        ))
        .await;
    assert_eq!(
        absent,
        json!(true),
        "bob's task or an unextended site's task is shown"
    );
    browser
        .wait_until(
            "site2 up and not extended",
            "const r = document.getElementById('site-site2'); return r !== null \
             && r.dataset.health === 'up' && r.dataset.extended === 'false'",
        )
        .await;

    // Progress moves on the page, from the stream, without a reload.
    browser.eval("window.notReloaded = true; return true").await;
    site1
        .patch(
            &format!("/tasks/{local_id}"),
            Some(&svc1),
            &json!({"progress": 70}),
        )
        .await
        .expect(200, None);
    let bar = browser
        .wait_until(
            "the progress bar at 70, from the event stream",
            &format!(
                "const r = {}; const bar = document.getElementById('progress-{local_id}'); \
                 return r !== null && bar.value === 70 && Number(r.dataset.events) >= 2 \
                 && {{value: bar.value, aria: bar.getAttribute('aria-valuenow'), \
                 pct: r.querySelector('.pct').textContent, reloaded: window.notReloaded !== true}}",
                row(&local_id)
            ),
        )
        .await;
    assert_eq!(
        bar,
        json!({"value": 70, "aria": "70", "pct": "70%", "reloaded": false}),
        "the bar, its ARIA value and its label moved together, on the same page"
    );

    // Extend to site2: its task appears, and follows its progress across the link.
    browser.click("#extend-site2").await;
    browser
        .wait_until(
            "site2's task after extending",
            &format!(
                "const r = {}; return r !== null && r.dataset.site === 'site2' \
                 && document.getElementById('site-site2').dataset.extended === 'true'",
                row(&remote_id)
            ),
        )
        .await;
    site2
        .patch(
            &format!("/tasks/{remote_id}"),
            Some(&svc2),
            &json!({"progress": 55}),
        )
        .await
        .expect(200, None);
    browser
        .wait_until(
            "site2's task at 55%",
            &format!(
                "const r = {}; return r !== null && r.dataset.progress === '55'",
                row(&remote_id)
            ),
        )
        .await;

    // site2 dies: its link shows down, its failure is named, its tasks are kept as stale,
    // and site1's task is still there.
    site2.kill9();
    let health = browser
        .wait_until(
            "site2 shown as down",
            "const r = document.getElementById('site-site2'); \
             return r !== null && r.dataset.health === 'down' \
             && r.querySelector('.site-health').textContent",
        )
        .await;
    let health = health.as_str().unwrap_or_default().to_owned();
    assert!(
        health.contains("unreachable") || health.contains("down"),
        "site2's link status: {health}"
    );
    browser
        .wait_until(
            "site2 named among the sites that did not answer",
            &format!(
                "const e = document.querySelector('#site-errors li[data-site=\"site2\"]'); \
                 const remote = {}; const local = {}; \
                 return e !== null && remote !== null && remote.dataset.stale === 'true' \
                 && local !== null && local.dataset.stale === 'false' && e.dataset.code",
                row(&remote_id),
                row(&local_id)
            ),
        )
        .await;
    let violations = browser
        .eval("return document.body.dataset.cspViolations || null")
        .await;
    assert_eq!(violations, Value::Null, "the page broke its own policy");

    // Log out: back to the form, the token forgotten here and dead at the site.
    browser.click("#logout").await;
    browser
        .wait_until(
            "the login form after logout",
            "return document.body.dataset.view === 'login' \
             && sessionStorage.getItem('sitegate.token') === null",
        )
        .await;
    site1
        .get("/sessions", Some(&token))
        .await
        .expect(401, Some("NotAuthenticated"));
    browser.quit().await;
    eprintln!("dashboard scenario took {:?}", started.elapsed());
}
