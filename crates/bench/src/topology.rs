//! Setting up what is measured: a two-site federation written by `sitegate init`, the site
//! processes, sessions, the limit server process and the nginx mTLS reverse proxy.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

use crate::error::BenchError;
use crate::limit::FixedAnswer;
use crate::load::{one_request, RequestTemplate};
use crate::process::{which, Pinning, Supervised};

/// The password `init` gives every user of the benchmark federation.
pub const PASSWORD: &str = "bench-Passw0rd";
/// How long a server may take to accept connections after it starts.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Idle keep-alive connections nginx keeps to site2's peer link.
pub const NGINX_UPSTREAM_KEEPALIVE: usize = 64;
const AUTH: HeaderName = HeaderName::from_static("x-vcav-auth");

/// `count` consecutive ports on 127.0.0.1 that can be bound right now, drawn below the
/// ephemeral range so outgoing connections do not take them meanwhile.
pub fn free_ports(count: u16) -> Result<u16, BenchError> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..500u32 {
        let base = 20_000 + ((seed.wrapping_add(attempt.wrapping_mul(7_919))) % 12_000) as u16;
        if (base..base + count).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(base);
        }
    }
    Err(BenchError::Setup(format!(
        "found no {count} consecutive free ports on 127.0.0.1"
    )))
}

/// The files `sitegate init --sites site1,site2` wrote, and where each site listens.
#[derive(Clone, Debug)]
pub struct Federation {
    pub dir: PathBuf,
    pub base_port: u16,
}

impl Federation {
    pub fn init(sitegate: &Path, dir: &Path, base_port: u16) -> Result<Federation, BenchError> {
        let output = Command::new(sitegate)
            .arg("init")
            .arg("--dir")
            .arg(dir)
            .args(["--sites", "site1,site2", "--base-port"])
            .arg(base_port.to_string())
            .args(["--dev-password", PASSWORD])
            .stdin(Stdio::null())
            .output()
            .map_err(BenchError::io(format!("run {} init", sitegate.display())))?;
        if !output.status.success() {
            return Err(BenchError::Setup(format!(
                "sitegate init failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(Federation {
            dir: dir.to_owned(),
            base_port,
        })
    }

    /// Site number `k` (0 = site1): its client API address.
    pub fn client_addr(&self, k: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 2 * k))
    }

    /// Site number `k`: its peer link address.
    pub fn peer_addr(&self, k: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 2 * k + 1))
    }

    /// The embedded store directory of `site` (the config's `[store] path`).
    pub fn store_dir(&self, site: &str) -> PathBuf {
        self.dir.join("data").join(site)
    }

    /// Starts `sitegate serve` for `site` (number `k`) with logging at warn, and waits until
    /// it answers `/healthz`.
    pub async fn start_site(
        &self,
        sitegate: &Path,
        pinning: &Pinning,
        site: &str,
        k: u16,
    ) -> Result<Supervised, BenchError> {
        let mut cmd = pinning.server_command(sitegate);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.join(format!("{site}.toml")))
            .env_remove("RUST_LOG")
            .env_remove("SITEGATE_CONFIG")
            .env("SITEGATE_LOG__LEVEL", "warn");
        let log = self.dir.join(format!("{site}.log"));
        let mut process = Supervised::spawn(site, cmd, &log)?;
        let addr = self.client_addr(k);
        wait_for_http(&mut process, addr, "/healthz").await?;
        Ok(process)
    }
}

/// Polls `path` at `addr` until it answers 200, failing early if the process exits.
pub async fn wait_for_http(
    process: &mut Supervised,
    addr: SocketAddr,
    path: &str,
) -> Result<(), BenchError> {
    let until = Instant::now() + START_DEADLINE;
    loop {
        process.check_alive()?;
        if let Ok(answer) = one_request(addr, &RequestTemplate::get(path)).await {
            if answer.status == StatusCode::OK {
                return Ok(());
            }
        }
        if Instant::now() > until {
            return Err(BenchError::Setup(format!(
                "{} did not answer {path} on {addr} within {START_DEADLINE:?}",
                process.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `addr` accepts TCP connections.
async fn wait_for_port(process: &mut Supervised, addr: SocketAddr) -> Result<(), BenchError> {
    let until = Instant::now() + START_DEADLINE;
    loop {
        process.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(BenchError::Setup(format!(
                "{} did not listen on {addr} within {START_DEADLINE:?}",
                process.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs `user` in at the client API `addr`; returns the `X-VCAV-Auth` token.
pub async fn login(addr: SocketAddr, user: &str) -> Result<HeaderValue, BenchError> {
    let body = serde_json::json!({
        "type": "localUser",
        "localUser": user,
        "localPassword": PASSWORD,
    })
    .to_string();
    let answer = one_request(
        addr,
        &RequestTemplate::json(Method::POST, "/sessions", body, StatusCode::OK),
    )
    .await?;
    if answer.status != StatusCode::OK {
        return Err(BenchError::Setup(format!(
            "login of {user} at {addr}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )));
    }
    answer
        .headers
        .get(AUTH)
        .cloned()
        .ok_or_else(|| BenchError::Setup(format!("login of {user} at {addr}: no X-VCAV-Auth")))
}

/// Extends the session `token` held at `addr` to `site` (`multisite`).
pub async fn extend(addr: SocketAddr, token: &HeaderValue, site: &str) -> Result<(), BenchError> {
    let body = serde_json::json!({"type": "multisite", "site": site}).to_string();
    let template = RequestTemplate::json(Method::POST, "/sessions/extend", body, StatusCode::OK)
        .header(AUTH, token.clone());
    let answer = one_request(addr, &template).await?;
    if !answer.status.is_success() {
        return Err(BenchError::Setup(format!(
            "extending the session to {site}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )));
    }
    Ok(())
}

/// `GET path` with a session; the answer must be 200.
pub async fn get_ok(
    addr: SocketAddr,
    token: &HeaderValue,
    path: &str,
) -> Result<crate::load::Answer, BenchError> {
    let answer = one_request(
        addr,
        &RequestTemplate::get(path).header(AUTH, token.clone()),
    )
    .await?;
    if answer.status != StatusCode::OK {
        return Err(BenchError::Setup(format!(
            "GET {path} at {addr}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )));
    }
    Ok(answer)
}

/// A read request with a session.
pub fn authed_get(path: impl Into<String>, token: &HeaderValue) -> RequestTemplate {
    RequestTemplate::get(path).header(AUTH, token.clone())
}

/// A `POST /tasks/poll` of `ids` with a session.
pub fn authed_poll(
    path: impl Into<String>,
    ids: &[uuid::Uuid],
    token: &HeaderValue,
) -> RequestTemplate {
    let body = serde_json::Value::from(
        ids.iter()
            .map(|id| serde_json::Value::String(id.to_string()))
            .collect::<Vec<_>>(),
    )
    .to_string();
    RequestTemplate::json(Method::POST, path, Bytes::from(body), StatusCode::OK)
        .header(AUTH, token.clone())
}

/// Starts the limit server as a child process of this tool (`sitegate-bench serve-limit`),
/// pinned like the sites, serving `answer` on `addr`.
pub async fn start_limit_server(
    pinning: &Pinning,
    work: &Path,
    addr: SocketAddr,
    answer: &FixedAnswer,
) -> Result<Supervised, BenchError> {
    let me = std::env::current_exe().map_err(BenchError::io("find this program"))?;
    let body = work.join("limit-body.json");
    std::fs::write(&body, &answer.body)
        .map_err(BenchError::io(format!("write {}", body.display())))?;
    let content_type = answer
        .content_type
        .to_str()
        .map_err(|e| BenchError::Setup(format!("content type: {e}")))?;
    let mut cmd = pinning.server_command(&me);
    cmd.arg("serve-limit")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--body")
        .arg(&body)
        .arg("--content-type")
        .arg(content_type);
    let mut process = Supervised::spawn("limit server", cmd, &work.join("limit.log"))?;
    wait_for_port(&mut process, addr).await?;
    Ok(process)
}

/// The nginx baseline: nginx as an HTTP listener on `listen` proxying over mTLS to site2's
/// peer link, presenting site1's certificate, exactly the hop site1 makes.
pub struct Nginx {
    pub process: Supervised,
    pub listen: SocketAddr,
}

/// Where nginx is, or a message saying how to install it.
pub fn find_nginx() -> Result<PathBuf, String> {
    which("nginx").ok_or_else(|| {
        "nginx is not installed, so the nginx baseline (and the remote targets measured against \
         it) is skipped. Install it with `apt-get install -y nginx` (Debian) and run again."
            .to_owned()
    })
}

/// nginx.conf for the baseline: one worker (the sites get one CPU too), keep-alive to the
/// upstream, TLS 1.3 with site1's client certificate, verifying site2's name against the CA.
pub fn nginx_config(fed: &Federation, work: &Path, listen: SocketAddr) -> String {
    let d = fed.dir.display();
    let w = work.display();
    let upstream = fed.peer_addr(1);
    let keepalive = NGINX_UPSTREAM_KEEPALIVE;
    format!(
        r#"# Written by sitegate-bench: the nginx mTLS reverse-proxy baseline.
user root;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path {w}/nginx-body;
    proxy_temp_path {w}/nginx-proxy;
    fastcgi_temp_path {w}/nginx-fastcgi;
    uwsgi_temp_path {w}/nginx-uwsgi;
    scgi_temp_path {w}/nginx-scgi;
    keepalive_requests 1000000;
    upstream site2_peer_link {{
        server {upstream};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass https://site2_peer_link;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {d}/site1.pem;
            proxy_ssl_certificate_key {d}/site1.key;
            proxy_ssl_trusted_certificate {d}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name site2;
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    pub async fn start(
        nginx: &Path,
        pinning: &Pinning,
        fed: &Federation,
        work: &Path,
        listen: SocketAddr,
    ) -> Result<Nginx, BenchError> {
        let conf = work.join("nginx.conf");
        std::fs::write(&conf, nginx_config(fed, work, listen))
            .map_err(BenchError::io(format!("write {}", conf.display())))?;
        let mut cmd = pinning.server_command(nginx);
        cmd.arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(work)
            .arg("-e")
            .arg(work.join("nginx-error.log"))
            .args(["-g", "daemon off;"]);
        let mut process = Supervised::spawn("nginx", cmd, &work.join("nginx.log"))?;
        wait_for_port(&mut process, listen).await?;
        Ok(Nginx { process, listen })
    }

    /// The error log, to explain a failing request.
    pub fn error_log(&self, work: &Path) -> String {
        crate::process::tail(&work.join("nginx-error.log"), 2000)
    }
}

/// The bytes and media type of an answer, for the limit server to repeat.
pub fn fixed_answer(answer: &crate::load::Answer) -> FixedAnswer {
    FixedAnswer {
        body: answer.body.clone(),
        content_type: answer
            .headers
            .get(http::header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/json")),
    }
}
