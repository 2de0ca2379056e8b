//! The harness of sitegate's integration tests: real `sitegate` processes on ports the OS says
//! are free, talked to over HTTP. Nothing here sleeps for a fixed time to wait for readiness:
//! every wait polls a condition against a deadline.
//!
//! [`Federation`] runs `sitegate init` into a temporary directory; [`Site`] is one
//! `sitegate serve` process of it, with JSON calls that answer a [`Reply`]; [`Proc`] is any
//! other child process (HAProxy, a second `serve`). The rest are the small helpers several test
//! files share: task bodies and fields, session extensions, JSON log lines, HAProxy, a site on
//! PostgreSQL.
//!
//! Everything here runs inside the test's tokio runtime; the helpers that block a thread for a
//! moment (a `sitegate init` run, starting PostgreSQL) need the multi-threaded one
//! (`#[tokio::test(flavor = "multi_thread")]`), as the tests that use them have.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use crate::prometheus::{self, Sample};
use crate::PgCluster;

/// The password `init` gives every user in these tests.
pub const PASSWORD: &str = "test-Passw0rd";

/// How long a site may take to answer `/healthz` after its process starts.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM.
pub const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// The interval at which conditions are re-checked while waiting.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long a `sitegate init|pki`, `curl` or `haproxy -c` run may take.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// The binary under test: the file `SITEGATE_BIN` names when it is set, else the `sitegate`
/// that cargo builds for the integration tests, found from the running test binary
/// (`<target>/<profile>/deps/<test>-<hash>`) as `<target>/<profile>/sitegate`. A library
/// cannot use `env!("CARGO_BIN_EXE_sitegate")`, which cargo sets for integration tests only.
/// Panics, saying where it looked, when there is no such file.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("SITEGATE_BIN").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "SITEGATE_BIN is set to {}, which is not a file",
                path.display()
            );
            return path;
        }
        let test_binary = std::env::current_exe().expect("the path of the running test binary");
        let path = bin_beside(&test_binary);
        assert!(
            path.is_file(),
            "the sitegate binary is not at {} (looked beside the test binary {}): run the tests \
             with `cargo test -p sitegate`, which builds it, or set SITEGATE_BIN to its path",
            path.display(),
            test_binary.display()
        );
        path
    })
}

/// Where cargo puts the `sitegate` binary for a test binary at `test_binary`: one directory
/// up from `deps/`, or beside it when it is not in `deps/`.
fn bin_beside(test_binary: &Path) -> PathBuf {
    let mut dir = test_binary.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let mut name = OsString::from("sitegate");
    name.push(std::env::consts::EXE_SUFFIX);
    dir.join(name)
}

/// A `sitegate` command with a clean environment for the things that would change its
/// behaviour behind a test's back.
pub fn command(cwd: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("SITEGATE_CONFIG")
        .stdin(Stdio::null());
    cmd
}

static RESERVED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port P such that P..P+count are all bindable on 127.0.0.1 right now and were not
/// handed to another test of this process. Candidates are drawn below the kernel's ephemeral
/// range, so outgoing connections do not take them in the meantime.
pub fn free_base_port(count: u16) -> u16 {
    const LOW: u64 = 20_000;
    const HIGH: u64 = 32_000;
    for _ in 0..500 {
        let base = (LOW + random_u64() % (HIGH - LOW)) as u16;
        let ports: Vec<u16> = (base..base + count).collect();
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = reserved.get_or_insert_with(HashSet::new);
        if ports.iter().any(|p| reserved.contains(p)) {
            continue;
        }
        if ports.iter().all(|p| bindable(*p)) {
            reserved.extend(ports);
            return base;
        }
    }
    panic!("found no {count} consecutive free ports on 127.0.0.1");
}

/// Runs a command to completion, giving up (and killing it) after `deadline`.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir for command output");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn sitegate");
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sitegate") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command did not finish within {deadline:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    std::process::Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// An HTTP client that never goes through a proxy configured in the environment.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// A federation written by `sitegate init` into its own temporary directory.
pub struct Federation {
    pub dir: tempfile::TempDir,
    pub base_port: u16,
    pub sites: Vec<String>,
    /// What `init` printed.
    pub init_stdout: String,
}

impl Federation {
    /// Runs `sitegate init --dir <tmp>/fed --sites ... --base-port P --dev-password PASSWORD`.
    pub fn init(sites: &[&str]) -> Federation {
        Federation::init_with(sites, &[])
    }

    /// [`Federation::init`] with more arguments for `sitegate init` (`--postgres <url>`).
    pub fn init_with(sites: &[&str], extra_args: &[&str]) -> Federation {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_port = free_base_port(2 * sites.len() as u16);
        let fed_dir = dir.path().join("fed");
        let mut cmd = command(dir.path());
        cmd.arg("init")
            .arg("--dir")
            .arg(&fed_dir)
            .arg("--sites")
            .arg(sites.join(","))
            .arg("--base-port")
            .arg(base_port.to_string())
            .arg("--dev-password")
            .arg(PASSWORD)
            .args(extra_args);
        let out = run_with_deadline(cmd, COMMAND_DEADLINE);
        assert!(
            out.status.success(),
            "sitegate init {extra_args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Federation {
            dir,
            base_port,
            sites: sites.iter().map(|s| (*s).to_owned()).collect(),
            init_stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }

    /// Where `init` wrote the federation's files.
    pub fn fed_dir(&self) -> PathBuf {
        self.dir.path().join("fed")
    }

    pub fn config_path(&self, site: &str) -> PathBuf {
        self.fed_dir().join(format!("{site}.toml"))
    }

    fn index(&self, site: &str) -> u16 {
        self.sites
            .iter()
            .position(|s| s == site)
            .unwrap_or_else(|| panic!("site {site} is not part of this federation")) as u16
    }

    /// The client API port of `site`: P + 2k.
    pub fn client_port(&self, site: &str) -> u16 {
        self.base_port + 2 * self.index(site)
    }

    /// The peer-link port of `site`: P + 2k + 1.
    pub fn peer_port(&self, site: &str) -> u16 {
        self.client_port(site) + 1
    }

    /// A handle for `site`, not yet started.
    pub fn site(&self, site: &str) -> Site {
        Site::new(
            site,
            self.config_path(site),
            self.client_port(site),
            self.dir.path(),
        )
    }

    /// A handle for `site` with extra environment (`SITEGATE_<SECTION>__<KEY>` config
    /// overrides), not yet started.
    pub fn site_with_env<V: AsRef<str>>(&self, site: &str, env: &[(&str, V)]) -> Site {
        let mut s = self.site(site);
        s.env = env_vars(env);
        s
    }

    /// A handle for `site`, started and answering `/healthz`.
    pub async fn start(&self, site: &str) -> Site {
        let mut s = self.site(site);
        s.start().await;
        s
    }

    /// [`Federation::site_with_env`], started and answering `/healthz`.
    pub async fn start_with_env<V: AsRef<str>>(&self, site: &str, env: &[(&str, V)]) -> Site {
        let mut s = self.site_with_env(site, env);
        s.start().await;
        s
    }
}

/// Environment pairs as a [`Site`] holds them.
pub fn env_vars<V: AsRef<str>>(pairs: &[(&str, V)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_ref().to_owned()))
        .collect()
}

/// A fresh database on a PostgreSQL cluster of the test's own, and a federation that
/// `sitegate init --postgres <url>` wrote for it: each site's store is a schema of that
/// database. Fields drop in order: the federation's files go before the cluster stops.
pub struct PostgresFederation {
    pub fed: Federation,
    /// The database's URL (superuser, trust authentication on loopback).
    pub url: String,
    pub pg: PgCluster,
}

/// Starts a PostgreSQL cluster and creates a database on it: the cluster and the database's
/// URL. Blocks a runtime thread meanwhile (multi-threaded runtime only).
pub async fn postgres_database() -> (PgCluster, String) {
    let pg = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .expect("start a PostgreSQL cluster");
    let url = tokio::task::block_in_place(|| pg.create_database());
    (pg, url)
}

/// A [`PostgresFederation`] of `sites`, none of them started.
pub async fn postgres_federation(sites: &[&str]) -> PostgresFederation {
    let (pg, url) = postgres_database().await;
    let fed = tokio::task::block_in_place(|| Federation::init_with(sites, &["--postgres", &url]));
    for site in sites {
        let path = fed.config_path(site);
        let text = std::fs::read_to_string(&path).expect("read the site's config");
        assert!(
            text.contains(r#"backend = "postgres""#),
            "init --postgres wrote no PostgreSQL store section into {}:\n{text}",
            path.display()
        );
    }
    PostgresFederation { fed, url, pg }
}

/// One `sitegate serve` process. Dropping the handle kills the process; when the test is
/// failing, the process's standard error is printed first.
pub struct Site {
    pub name: String,
    pub config: PathBuf,
    pub port: u16,
    pub client: reqwest::Client,
    /// Extra environment for the process (config overrides).
    pub env: Vec<(String, String)>,
    workdir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// An HTTP answer: status, headers, raw body and the body parsed as JSON (`Null` when empty,
/// a JSON string holding the text when it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The error envelope's `msg` (empty when there is none).
    pub fn msg(&self) -> String {
        self.body["msg"].as_str().unwrap_or_default().to_owned()
    }

    /// The `operationID` response header, which every response must carry.
    pub fn operation_id(&self) -> String {
        self.header("operationID")
            .unwrap_or_else(|| panic!("response without operationID header: {self:?}"))
    }

    /// Asserts the status and, for errors, the envelope's code; returns the body.
    pub fn expect(&self, status: u16, code: Option<&str>) -> &Value {
        assert_eq!(self.status, status, "unexpected status; reply: {self:?}");
        if let Some(code) = code {
            assert_envelope(&self.body, code);
        }
        &self.body
    }
}

/// Asserts that `value` is exactly the error envelope `{code,msg,args,stacktrace}` with an
/// empty `stacktrace` and the given code.
pub fn assert_envelope(value: &Value, code: &str) {
    let obj = value
        .as_object()
        .unwrap_or_else(|| panic!("error body is not a JSON object: {value}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["args", "code", "msg", "stacktrace"],
        "envelope keys: {value}"
    );
    assert_eq!(obj["code"], json!(code), "envelope code: {value}");
    assert_eq!(obj["stacktrace"], json!(""), "envelope stacktrace: {value}");
    assert!(obj["msg"].is_string(), "envelope msg: {value}");
    assert!(
        obj["args"]
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string)),
        "envelope args: {value}"
    );
}

impl Site {
    pub fn new(name: &str, config: PathBuf, port: u16, workdir: &Path) -> Site {
        Site {
            name: name.to_owned(),
            config,
            port,
            client: http_client(),
            env: Vec::new(),
            workdir: workdir.to_path_buf(),
            log: workdir.join(format!("{name}.stderr.log")),
            child: None,
            starts: 0,
        }
    }

    /// Starts `sitegate serve --config <config>` and waits until `/healthz` answers 200.
    pub async fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "site {} is already running",
            self.name
        );
        self.starts += 1;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the site's stderr log");
        let stdout = stderr.try_clone().expect("clone the log file");
        let mut cmd = command(&self.workdir);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdout(stdout)
            .stderr(stderr);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn sitegate serve"));
        let until = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                self.child = None;
                panic!(
                    "site {} exited during start with {status}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            if Instant::now() > until {
                panic!(
                    "site {} did not become healthy within {START_DEADLINE:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until `/readyz` answers 200 (its store is reachable), panicking after `deadline`.
    pub async fn wait_ready(&self, deadline: Duration) {
        wait_for(&format!("{} /readyz 200", self.name), deadline, || async {
            match self.client.get(self.url("/readyz")).send().await {
                Ok(r) if r.status().as_u16() == 200 => Some(()),
                _ => None,
            }
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("site is not running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything the process wrote to stdout and stderr, over all its starts.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGHUP: reload what can be reloaded (the users file, certificates).
    pub fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -HUP {}", self.pid());
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (panicking after [`STOP_DEADLINE`]).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("site is not running");
        match sigterm_and_wait(&mut child, STOP_DEADLINE).await {
            Some(status) => status,
            None => panic!(
                "site {} did not exit within {STOP_DEADLINE:?} of SIGTERM; stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }

    /// A graceful stop (which must succeed) and a new start on the same data.
    pub async fn restart(&mut self) {
        let status = self.terminate().await;
        assert!(status.success(), "site {} exited with {status}", self.name);
        self.start().await;
    }

    /// A request builder for `path` on this site.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A JSON request with an optional token and body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut rb = self.request(method, path);
        if let Some(t) = token {
            rb = rb.header("X-VCAV-Auth", t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        send(rb).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        self.call(Method::PATCH, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Reply {
        self.call(Method::DELETE, path, token, None).await
    }

    /// `POST /sessions` as `user` with the dev password; the reply must be a success.
    pub async fn login(&self, user: &str) -> String {
        self.login_with(user, PASSWORD).await
    }

    pub async fn login_with(&self, user: &str, password: &str) -> String {
        let r = self.try_login(user, password).await;
        assert_eq!(r.status, 200, "login of {user} failed: {r:?}");
        r.header("X-VCAV-Auth")
            .unwrap_or_else(|| panic!("login reply without X-VCAV-Auth: {r:?}"))
    }

    pub async fn try_login(&self, user: &str, password: &str) -> Reply {
        self.post(
            "/sessions",
            None,
            &json!({"type": "localUser", "localUser": user, "localPassword": password}),
        )
        .await
    }

    /// `POST /tasks` of a task for `user`; must answer 201. Returns the task.
    pub async fn create_task(&self, token: &str, body: &Value) -> Value {
        let r = self.post("/tasks", Some(token), body).await;
        assert_eq!(r.status, 201, "create task failed: {r:?}");
        r.body
    }

    /// `GET /tasks/{id}` as `token`, which must answer 200: the task as it is now.
    pub async fn task(&self, id: &str, token: &str) -> Value {
        let r = self.get(&format!("/tasks/{id}"), Some(token)).await;
        r.expect(200, None).clone()
    }

    /// `POST /sessions/extend` of the session `token` to `peer` with a multisite request.
    pub async fn extend_multisite(&self, token: &str, peer: &str) -> Reply {
        self.post(
            "/sessions/extend",
            Some(token),
            &json!({"type": "multisite", "site": peer}),
        )
        .await
    }

    /// `/metrics`, which must answer 200 with non-empty, valid Prometheus text.
    pub async fn scrape(&self) -> Vec<Sample> {
        let reply = self.get("/metrics", None).await;
        assert_eq!(reply.status, 200, "{}: /metrics: {reply:?}", self.name);
        let content_type = reply.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("text/plain"),
            "{}: /metrics content type {content_type}",
            self.name
        );
        let samples = prometheus::parse(&reply.text);
        assert!(!samples.is_empty(), "{}: empty /metrics", self.name);
        samples
    }

    /// The sum of the `/metrics` samples named `name` whose labels include all of `labels`;
    /// `None` when there is none.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        prometheus::metric(&self.scrape().await, name, labels)
    }
}

/// Creates tasks at `site` as its writer `svc`; returns them in the order given.
pub async fn create_tasks(site: &Site, bodies: &[Value]) -> Vec<Value> {
    let svc = site.login("svc").await;
    let mut tasks = Vec::new();
    for body in bodies {
        tasks.push(site.create_task(&svc, body).await);
    }
    tasks
}

/// Sends a request and reads the whole answer.
pub async fn send(rb: reqwest::RequestBuilder) -> Reply {
    let r = rb.send().await.expect("HTTP request failed");
    reply(r).await
}

pub async fn reply(r: reqwest::Response) -> Reply {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("read the response body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()))
    };
    Reply {
        status,
        headers,
        text,
        body,
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: String = {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(60)..].join("\n")
            };
            eprintln!(
                "---- site {} (started {} time(s)) output, last 60 lines ----\n{tail}\n----",
                self.name, self.starts
            );
        }
    }
}

/// Sends SIGTERM (with the `kill` command) and waits up to `deadline` for the exit; on
/// timeout the process is killed and `None` returned.
pub async fn sigterm_and_wait(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill -TERM");
    assert!(sent.success(), "kill -TERM failed: {sent}");
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Any child process, killed when dropped; its output goes to files.
pub struct Proc {
    pub child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its stdout and stderr in `<dir>/<name>.stdout|stderr`.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = cmd
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn sitegate");
        Proc {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether it has exited (and with what).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    pub async fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("process is not running");
        sigterm_and_wait(&mut child, deadline).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- process stdout ----\n{}\n---- process stderr ----\n{}\n----",
                self.stdout(),
                self.stderr()
            );
        }
    }
}

/// Polls `check` until it returns `Some`, panicking with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The current time in epoch milliseconds, as the API counts it.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A task-creation body.
pub fn new_task(user: &str, kind: &str, rtype: &str, rid: &str, rname: &str) -> Value {
    json!({
        "user": user,
        "workflowInfo": {
            "type": kind,
            "resourceType": rtype,
            "resourceId": rid,
            "resourceName": rname,
        }
    })
}

/// The `id` of a task object as a string.
pub fn id_of(task: &Value) -> String {
    task["id"]
        .as_str()
        .unwrap_or_else(|| panic!("task without id: {task}"))
        .to_owned()
}

/// The IDs of a `GET /tasks` answer's items.
pub fn item_ids(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {body}"))
        .iter()
        .map(id_of)
        .collect()
}

/// The site names of a session-details body's `authenticatedSites`.
pub fn authenticated_sites(details: &Value) -> Vec<String> {
    details["authenticatedSites"]
        .as_array()
        .unwrap_or_else(|| panic!("no authenticatedSites in {details}"))
        .iter()
        .map(|s| s["site"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Whether `s` is a UUID in its hyphenated form, as task and operation IDs are generated.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

/// An `i64` field of a JSON object.
pub fn int(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("field {field} is not an integer in {v}"))
}

/// The JSON lines of a log (`Site::stderr` with `log.format = "json"`); lines that are not a
/// JSON object are left out.
pub fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(Value::is_object)
        .collect()
}

/// A field of a JSON log line, as text: at the top level, or in its `span` object, `spans`
/// list or `fields` object (the places `tracing-subscriber`'s JSON formats put fields).
pub fn log_field(line: &Value, key: &str) -> Option<String> {
    let as_text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    line.get(key)
        .and_then(as_text)
        .or_else(|| line.get("span").and_then(|s| s.get(key)).and_then(as_text))
        .or_else(|| {
            line.get("spans")
                .and_then(Value::as_array)
                .and_then(|spans| spans.iter().find_map(|s| s.get(key).and_then(as_text)))
        })
        .or_else(|| {
            line.get("fields")
                .and_then(|f| f.get(key))
                .and_then(as_text)
        })
}

/// An HTTP client that connects from `local` (any 127.0.0.0/8 address is the loopback
/// device), so a site sees requests from distinct client addresses.
pub fn client_from(local: &str) -> reqwest::Client {
    let ip: std::net::IpAddr = local.parse().expect("a loopback address");
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// HAProxy, for tests of what sits behind a load balancer: `SITEGATE_HAPROXY`, else Debian's
/// (`scripts/test` installs it).
pub fn haproxy_binary() -> PathBuf {
    let path = std::env::var_os("SITEGATE_HAPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    assert!(
        path.exists(),
        "HAProxy not found at {} (scripts/test installs Debian's haproxy package; or set \
         SITEGATE_HAPROXY)",
        path.display()
    );
    path
}

/// Starts HAProxy in the foreground (`haproxy -f <dir>/haproxy.cfg -db`) with `config`, once
/// `haproxy -c` has accepted it. It is not waited for: the caller knows what "up" means for
/// its configuration.
pub fn start_haproxy(dir: &Path, config: &str) -> Proc {
    let binary = haproxy_binary();
    let cfg_path = dir.join("haproxy.cfg");
    std::fs::write(&cfg_path, config).expect("write haproxy.cfg");
    let mut check = Command::new(&binary);
    check.arg("-c").arg("-f").arg(&cfg_path);
    let out = run_with_deadline(check, COMMAND_DEADLINE);
    assert!(
        out.status.success(),
        "haproxy -c refused the config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(&binary);
    cmd.arg("-f").arg(&cfg_path).arg("-db");
    Proc::spawn(cmd, dir, "haproxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_looked_for_beside_deps() {
        let exe = std::env::consts::EXE_SUFFIX;
        assert_eq!(
            bin_beside(Path::new("/t/debug/deps/cli-0123abcd")),
            PathBuf::from(format!("/t/debug/sitegate{exe}"))
        );
        assert_eq!(
            bin_beside(Path::new("/t/x86_64-unknown-linux-gnu/release/deps/cli-1")),
            PathBuf::from(format!("/t/x86_64-unknown-linux-gnu/release/sitegate{exe}"))
        );
        assert_eq!(
            bin_beside(Path::new("/opt/tests/cli")),
            PathBuf::from(format!("/opt/tests/sitegate{exe}"))
        );
    }

    #[test]
    fn env_vars_and_uuids() {
        assert_eq!(
            env_vars(&[("A", "1"), ("B", "2")]),
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
        assert!(is_uuid("6f1c0e7e-8a43-4d6b-9d0f-3c2b1a0e9f11"));
        assert!(!is_uuid("6f1c0e7e8a434d6b9d0f3c2b1a0e9f11"));
    }

    #[test]
    fn log_fields_are_found_where_the_json_formats_put_them() {
        let lines = json_lines(
            "not json\n42\n{\"a\":\"1\",\"span\":{\"b\":2},\"spans\":[{\"c\":\"3\"}],\"fields\":{\"d\":true}}\n",
        );
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(log_field(line, "a").as_deref(), Some("1"));
        assert_eq!(log_field(line, "b").as_deref(), Some("2"));
        assert_eq!(log_field(line, "c").as_deref(), Some("3"));
        assert_eq!(log_field(line, "d").as_deref(), Some("true"));
        assert_eq!(log_field(line, "e"), None);
    }
}
