//! Setting up what is measured: a two-site federation written by `sitegate init`, the site
//! processes (logging as `init` configured them, or at a `--log-level` for a tuned run),
//! sessions, the limit server process and the two mTLS reverse-proxy baselines, nginx and
//! HAProxy.

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

    /// Where `site`'s standard output and error (its log lines) go: a file in the work
    /// directory, never the terminal.
    pub fn log_file(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.log"))
    }

    /// The `[log]` section `init` wrote for `site`.
    pub fn written_log_config(&self, site: &str) -> Result<WrittenLogConfig, BenchError> {
        let path = self.dir.join(format!("{site}.toml"));
        let text = std::fs::read_to_string(&path)
            .map_err(BenchError::io(format!("read {}", path.display())))?;
        WrittenLogConfig::parse(&text)
            .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))
    }

    /// Starts `sitegate serve` for `site` (number `k`) with the configuration `init` wrote and
    /// waits until it answers `/healthz`. No inherited setting reaches it (`RUST_LOG`,
    /// `SITEGATE_<SECTION>__<KEY>`), except the log level when `log_level` overrides it.
    /// Standard error is a file, so the site logs JSON lines there (`format = "auto"`).
    pub async fn start_site(
        &self,
        sitegate: &Path,
        pinning: &Pinning,
        site: &str,
        k: u16,
        log_level: Option<&str>,
    ) -> Result<Supervised, BenchError> {
        let mut cmd = pinning.server_command(sitegate);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.join(format!("{site}.toml")))
            .env_remove("RUST_LOG")
            .env_remove("SITEGATE_CONFIG");
        for (key, _) in std::env::vars_os() {
            if key
                .to_str()
                .is_some_and(|k| k.starts_with("SITEGATE_") && k.contains("__"))
            {
                cmd.env_remove(key);
            }
        }
        if let Some(level) = log_level {
            cmd.env("SITEGATE_LOG__LEVEL", level);
        }
        let log = self.log_file(site);
        let mut process = Supervised::spawn(site, cmd, &log)?;
        let addr = self.client_addr(k);
        wait_for_http(&mut process, addr, "/healthz").await?;
        Ok(process)
    }
}

/// The `[log]` section of a site configuration written by `init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenLogConfig {
    /// The tracing filter (`info`).
    pub level: String,
    /// `auto`, `json` or `text`.
    pub format: String,
}

impl WrittenLogConfig {
    /// Reads `[log] level` and `format` from a site configuration, with the product's
    /// defaults (`info`, `auto`) for keys it leaves out.
    pub fn parse(config_text: &str) -> Result<WrittenLogConfig, String> {
        let value: toml::Table = config_text.parse().map_err(|e| format!("not TOML: {e}"))?;
        let log = value.get("log").and_then(toml::Value::as_table);
        let key = |name: &str, default: &str| {
            log.and_then(|t| t.get(name))
                .and_then(toml::Value::as_str)
                .unwrap_or(default)
                .to_owned()
        };
        Ok(WrittenLogConfig {
            level: key("level", "info"),
            format: key("format", "auto"),
        })
    }
}

/// Whether a tracing filter lets the access log through (target `sitegate::access`, level
/// info): the most specific directive naming a prefix of that target decides, else the bare
/// level. `None` when the filter is beyond this simple reading (spans, fields, regexes).
pub fn access_log_on(filter: &str) -> Option<bool> {
    const TARGET: &str = "sitegate::access";
    let mut best: Option<(usize, &str)> = None;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive.contains(['[', '{', '/']) {
            return None;
        }
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (target.trim(), level.trim()),
            None if level_rank(directive).is_some() => ("", directive),
            // A bare target: everything of it is enabled.
            None => (directive, "trace"),
        };
        let matches = target.is_empty()
            || TARGET == target
            || TARGET
                .strip_prefix(target)
                .is_some_and(|rest| rest.starts_with("::"));
        if matches && best.is_none_or(|(len, _)| target.len() >= len) {
            best = Some((target.len(), level));
        }
    }
    // A filter none of whose directives matches disables the target.
    let level = best.map_or("off", |(_, level)| level);
    level_rank(level).map(|rank| rank >= level_rank("info").unwrap_or(0))
}

/// [`access_log_on`] in words: `on`, `off`, or `as that filter decides`.
pub fn access_log_state(filter: &str) -> &'static str {
    match access_log_on(filter) {
        Some(true) => "on",
        Some(false) => "off",
        None => "as that filter decides",
    }
}

/// Verbosity rank of a level name: off 0 ... trace 5.
fn level_rank(level: &str) -> Option<u8> {
    match level.to_ascii_lowercase().as_str() {
        "off" => Some(0),
        "error" => Some(1),
        "warn" => Some(2),
        "info" => Some(3),
        "debug" => Some(4),
        "trace" => Some(5),
        _ => None,
    }
}

/// What the report calls the configuration the sites ran with: `written_level` is the
/// `[log] level` that `init` wrote, `override_level` the `--log-level` of a tuned run.
pub fn configuration_label(written_level: &str, override_level: Option<&str>) -> String {
    match override_level {
        Some(level) => format!("tuned: log level {level}"),
        None => format!(
            "default configuration (as `sitegate init` writes it: log level {written_level}, \
             access log {})",
            access_log_state(written_level)
        ),
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

/// Which reverse proxy a baseline runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    Nginx,
    Haproxy,
}

impl ProxyKind {
    /// Both, in the order they are measured.
    pub const ALL: [ProxyKind; 2] = [ProxyKind::Nginx, ProxyKind::Haproxy];

    /// The row key of its baseline rows and the stem of its files in the work directory.
    pub fn key(self) -> &'static str {
        match self {
            ProxyKind::Nginx => "nginx",
            ProxyKind::Haproxy => "haproxy",
        }
    }

    /// How people write its name.
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Nginx => "nginx",
            ProxyKind::Haproxy => "HAProxy",
        }
    }

    /// Where the program is, or a message saying how to install it.
    pub fn find(self) -> Result<PathBuf, String> {
        which(self.key()).ok_or_else(|| {
            format!(
                "{name} is not installed, so the {name} baseline is skipped (the remote targets \
                 are then judged against the other proxy alone). Install it with \
                 `apt-get install -y {key}` (Debian) and run again.",
                name = self.name(),
                key = self.key()
            )
        })
    }

    /// The program's version line, for the report.
    pub fn version(self, program: &Path) -> Option<String> {
        let out = Command::new(program).arg("-v").output().ok()?;
        // nginx prints its version on stderr, HAProxy on stdout.
        let text = [out.stdout, out.stderr]
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<String>();
        text.lines()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
    }
}

/// A reverse-proxy baseline: nginx or HAProxy as an HTTP listener on `listen` proxying over
/// mTLS to site2's peer link, presenting site1's certificate, exactly the hop site1 makes.
pub struct ProxyBaseline {
    pub kind: ProxyKind,
    pub process: Supervised,
    pub listen: SocketAddr,
    /// Where it writes what went wrong (nginx's error log, HAProxy's abnormal requests).
    pub error_log: PathBuf,
}

impl ProxyBaseline {
    /// Writes the proxy's configuration into `work`, starts it pinned like the sites, and
    /// waits until it listens.
    pub async fn start(
        kind: ProxyKind,
        program: &Path,
        pinning: &Pinning,
        fed: &Federation,
        work: &Path,
        listen: SocketAddr,
        haproxy_upstream: UpstreamProtocol,
    ) -> Result<ProxyBaseline, BenchError> {
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(BenchError::io(format!("write {}", path.display())))
        };
        let (cmd, error_log) = match kind {
            ProxyKind::Nginx => {
                let conf = work.join("nginx.conf");
                write(&conf, &nginx_config(fed, work, listen))?;
                let mut cmd = pinning.server_command(program);
                cmd.arg("-c")
                    .arg(&conf)
                    .arg("-p")
                    .arg(work)
                    .arg("-e")
                    .arg(work.join("nginx-error.log"))
                    .args(["-g", "daemon off;"]);
                (cmd, work.join("nginx-error.log"))
            }
            ProxyKind::Haproxy => {
                // HAProxy wants the client certificate and its key in one file.
                let pem = work.join("haproxy-site1.pem");
                let read = |path: PathBuf| {
                    std::fs::read_to_string(&path)
                        .map_err(BenchError::io(format!("read {}", path.display())))
                };
                let cert = read(fed.dir.join("site1.pem"))?;
                let key = read(fed.dir.join("site1.key"))?;
                write_private(&pem, &format!("{}\n{}", cert.trim_end(), key))?;
                let conf = work.join("haproxy.cfg");
                write(&conf, &haproxy_config(fed, &pem, listen, haproxy_upstream))?;
                check_haproxy_config(program, &conf)?;
                let mut cmd = pinning.server_command(program);
                // In the foreground, one process: its stderr (alerts and the abnormal-request
                // log) goes to haproxy.log.
                cmd.arg("-f").arg(&conf).arg("-db");
                (cmd, work.join("haproxy.log"))
            }
        };
        let log = work.join(format!("{}.log", kind.key()));
        let mut process = Supervised::spawn(kind.name(), cmd, &log)?;
        wait_for_port(&mut process, listen).await?;
        Ok(ProxyBaseline {
            kind,
            process,
            listen,
            error_log,
        })
    }

    /// The end of its error log, to explain a failing request.
    pub fn error_log_tail(&self) -> String {
        crate::process::tail(&self.error_log, 2000)
    }

    /// The processes whose peak RSS counts for it: nginx's master and workers, HAProxy's one.
    pub fn pids(&self) -> Vec<u32> {
        let main = self.process.pid();
        let mut pids = vec![main];
        pids.extend(crate::process::children(main));
        pids
    }
}

/// A file only its owner may read (the proxy's copy of site1's private key).
fn write_private(path: &Path, text: &str) -> Result<(), BenchError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(BenchError::io(format!("write {}", path.display())))
}

/// `haproxy -c`: a configuration HAProxy refuses is reported with its reasons, before any
/// load is sent.
fn check_haproxy_config(program: &Path, conf: &Path) -> Result<(), BenchError> {
    let out = Command::new(program)
        .arg("-c")
        .arg("-f")
        .arg(conf)
        .stdin(Stdio::null())
        .output()
        .map_err(BenchError::io(format!("run {} -c", program.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Setup(format!(
            "haproxy -c refused {}: {}{}",
            conf.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
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

/// What HAProxy speaks to site2's peer link. The peer link offers both over TLS 1.3 by ALPN
/// (`h2`, `http/1.1`); site1 speaks HTTP/1.1 unless `peering.transport = "http2"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamProtocol {
    /// HTTP/2: streams of many client requests multiplexed on few mTLS connections.
    #[value(name = "h2")]
    H2,
    /// HTTP/1.1: one request at a time per mTLS connection, idle ones kept for reuse.
    #[value(name = "http1.1")]
    Http11,
}

impl UpstreamProtocol {
    /// The ALPN protocol HAProxy offers.
    pub fn alpn(self) -> &'static str {
        match self {
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Http11 => "http/1.1",
        }
    }
}

/// Connections HAProxy accepts at once (global and per frontend): well above the
/// many-clients scenarios' 1,000, and low enough that the descriptors it needs (about two per
/// connection) stay under a hard `ulimit -n` of 20,000, which HAProxy cannot raise past.
pub const HAPROXY_MAXCONN: usize = 8_000;

/// haproxy.cfg for the baseline: one thread (comparable with nginx's one worker and the
/// sites' one CPU), keep-alive on both sides with idle upstream connections shared between
/// clients (`http-reuse always`), site1's certificate and key (`client_pem`) presented to
/// site2's peer link, site2's certificate verified against the federation CA for the name
/// `site2`, and only abnormal requests logged (as nginx logs errors only).
///
/// What the peer link requires, and HAProxy 2.6 does: TLS 1.3 (it refuses 1.2, hence
/// `ssl-min-ver TLSv1.3`), a client certificate naming a configured peer (without `crt` it
/// answers nothing and HAProxy returns 502), and either ALPN protocol it offers. HAProxy checks
/// the server certificate's name against the SNI when one is sent and against `verifyhost`
/// only without one; both say `site2`, and a wrong SNI or CA fails the request (503).
pub fn haproxy_config(
    fed: &Federation,
    client_pem: &Path,
    listen: SocketAddr,
    upstream: UpstreamProtocol,
) -> String {
    let ca = fed.dir.join("ca.pem");
    let ca = ca.display();
    let pem = client_pem.display();
    let peer = fed.peer_addr(1);
    let alpn = upstream.alpn();
    let maxconn = HAPROXY_MAXCONN;
    format!(
        r#"# Written by sitegate-bench: the HAProxy mTLS reverse-proxy baseline.
global
    nbthread 1
    maxconn {maxconn}
    log stderr format raw local0

defaults
    mode http
    maxconn {maxconn}
    log global
    option httplog
    option dontlog-normal
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind {listen}
    default_backend site2_peer_link

backend site2_peer_link
    http-reuse always
    server site2 {peer} ssl crt {pem} ca-file {ca} verify required verifyhost site2 sni str(site2) alpn {alpn} ssl-min-ver TLSv1.3
"#
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn federation() -> Federation {
        Federation {
            dir: PathBuf::from("/bench/fed"),
            base_port: 20_000,
        }
    }

    #[test]
    fn haproxy_config_is_one_thread_mtls_to_site2_peer_link() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 20_006));
        let pem = Path::new("/bench/haproxy-site1.pem");
        let h2 = haproxy_config(&federation(), pem, listen, UpstreamProtocol::H2);
        for line in [
            "    nbthread 1\n",
            "    maxconn 8000\n",
            "    mode http\n",
            "    option dontlog-normal\n",
            "    option http-keep-alive\n",
            "    bind 127.0.0.1:20006\n",
            "    http-reuse always\n",
            "    server site2 127.0.0.1:20003 ssl crt /bench/haproxy-site1.pem \
             ca-file /bench/fed/ca.pem verify required verifyhost site2 sni str(site2) \
             alpn h2 ssl-min-ver TLSv1.3\n",
        ] {
            assert!(h2.contains(line), "missing {line:?} in:\n{h2}");
        }
        let h1 = haproxy_config(&federation(), pem, listen, UpstreamProtocol::Http11);
        assert!(h1.contains(" alpn http/1.1 "), "{h1}");
        assert!(!h1.contains("alpn h2"), "{h1}");
    }

    #[test]
    fn upstream_protocols_parse_from_the_command_line() {
        use clap::ValueEnum;
        assert_eq!(
            UpstreamProtocol::from_str("h2", false),
            Ok(UpstreamProtocol::H2)
        );
        assert_eq!(
            UpstreamProtocol::from_str("http1.1", false),
            Ok(UpstreamProtocol::Http11)
        );
        assert!(UpstreamProtocol::from_str("h3", false).is_err());
    }

    #[test]
    fn nginx_config_keeps_its_shape() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 20_005));
        let conf = nginx_config(&federation(), Path::new("/bench"), listen);
        for line in [
            "worker_processes 1;",
            "server 127.0.0.1:20003;",
            "listen 127.0.0.1:20005;",
            "proxy_ssl_certificate /bench/fed/site1.pem;",
            "proxy_ssl_name site2;",
        ] {
            assert!(conf.contains(line), "missing {line:?}");
        }
    }

    #[test]
    fn the_log_section_init_wrote_is_read_with_the_products_defaults() {
        let written = "# sitegate configuration\n[site]\nname = \"site1\"\n\n\
                       [log]\nformat = \"auto\"\nlevel = \"info\"\n";
        assert_eq!(
            WrittenLogConfig::parse(written),
            Ok(WrittenLogConfig {
                level: "info".into(),
                format: "auto".into()
            })
        );
        assert_eq!(
            WrittenLogConfig::parse("[site]\nname = \"site1\"\n"),
            Ok(WrittenLogConfig {
                level: "info".into(),
                format: "auto".into()
            })
        );
        assert!(WrittenLogConfig::parse("[log\n").is_err());
    }

    #[test]
    fn the_access_log_follows_the_filter() {
        for (filter, expected) in [
            ("info", Some(true)),
            ("debug", Some(true)),
            ("TRACE", Some(true)),
            ("warn", Some(false)),
            ("error", Some(false)),
            ("off", Some(false)),
            ("warn,sitegate::access=info", Some(true)),
            ("info,sitegate::access=warn", Some(false)),
            ("warn,sitegate=debug", Some(true)),
            ("info,sitegate=warn,sitegate::access=info", Some(true)),
            // Prefixes count at `::` boundaries only.
            ("warn,sitegate_gateway=info", Some(false)),
            ("sitegate_gateway=debug", Some(false)),
            ("warn,sitegate::access", Some(true)),
            ("info,[request]=debug", None),
            ("bogus", Some(false)),
        ] {
            assert_eq!(access_log_on(filter), expected, "{filter}");
        }
    }

    #[test]
    fn the_report_names_the_configuration_measured() {
        assert_eq!(
            configuration_label("info", None),
            "default configuration (as `sitegate init` writes it: log level info, access log on)"
        );
        assert_eq!(
            configuration_label("info", Some("warn")),
            "tuned: log level warn"
        );
        assert_eq!(
            configuration_label("warn", None),
            "default configuration (as `sitegate init` writes it: log level warn, access log off)"
        );
    }
}
