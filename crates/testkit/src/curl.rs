//! The `curl` command-line tool (OpenSSL), a TLS client other than the sites' own: the raw TLS
//! checks of the client API over HTTPS and of the peer link use it, so the listeners are
//! checked against a second TLS stack.

use std::path::Path;
use std::process::Command;

use crate::site::{run_with_deadline, Federation, COMMAND_DEADLINE};

/// What a `curl` run produced.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code (0 when a response was received).
    pub exit: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `curl -sS --noproxy '*' --max-time 10 <args>`, giving up after [`COMMAND_DEADLINE`].
pub fn curl(args: &[String]) -> Curl {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "10"])
        .args(args);
    let out = run_with_deadline(cmd, COMMAND_DEADLINE);
    Curl {
        exit: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts the curl tool is installed; the raw TLS checks depend on it.
pub fn require_curl() {
    let ok = Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "these tests need the `curl` command-line tool");
}

/// curl arguments for a TLS client of `site`'s peer listener: it verifies the server against
/// the federation CA with the site's name as the TLS name (resolved to 127.0.0.1), and
/// presents `client_cert` (a `.pem`, with its `.key` beside it) if given. The URL is the
/// caller's: `https://<site>:<fed.peer_port(site)><path>`.
pub fn peer_link_args(fed: &Federation, site: &str, client_cert: Option<&Path>) -> Vec<String> {
    let port = fed.peer_port(site);
    let mut args = vec![
        "--cacert".to_owned(),
        fed.fed_dir().join("ca.pem").display().to_string(),
        "--resolve".to_owned(),
        format!("{site}:{port}:127.0.0.1"),
    ];
    if let Some(cert) = client_cert {
        args.extend([
            "--cert".to_owned(),
            cert.display().to_string(),
            "--key".to_owned(),
            cert.with_extension("key").display().to_string(),
        ]);
    }
    args
}

/// What a request over the peer link with `curl` produced.
pub struct PeerLinkOutcome {
    /// curl's exit code (0 when a response was received).
    pub exit: Option<i32>,
    /// `%{http_code}`: "000" when no HTTP response came.
    pub http_code: String,
    pub body: String,
    pub stderr: String,
}

impl std::fmt::Debug for PeerLinkOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "curl exit {:?}, http_code {}, body {:?}, stderr {:?}",
            self.exit, self.http_code, self.body, self.stderr
        )
    }
}

/// Marks the end of the body in curl's output; `%{http_code}` follows it.
const CURL_STATUS_MARK: &str = "\n--http-code--";

/// `GET <path>` on `site`'s peer listener with `curl` ([`peer_link_args`]), with `token` as
/// `X-VCAV-Auth` if given.
pub fn curl_peer_link(
    fed: &Federation,
    site: &str,
    client_cert: Option<&Path>,
    path: &str,
    token: Option<&str>,
) -> PeerLinkOutcome {
    let mut args = peer_link_args(fed, site, client_cert);
    if let Some(token) = token {
        args.push("-H".to_owned());
        args.push(format!("X-VCAV-Auth: {token}"));
    }
    args.push("-w".to_owned());
    args.push(format!("{CURL_STATUS_MARK}%{{http_code}}"));
    args.push(format!("https://{site}:{}{path}", fed.peer_port(site)));
    let run = curl(&args);
    let (body, http_code) = run
        .stdout
        .rsplit_once(CURL_STATUS_MARK)
        .map(|(b, c)| (b.to_owned(), c.trim().to_owned()))
        .unwrap_or_else(|| (run.stdout.clone(), String::new()));
    PeerLinkOutcome {
        exit: run.exit,
        http_code,
        body,
        stderr: run.stderr,
    }
}
