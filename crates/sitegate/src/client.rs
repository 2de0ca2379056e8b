//! The command-line client: `sitegate login`, `sites`, `tasks list|get|watch`, `extend`,
//! `logout`. It speaks the same wire API as every other client (no private endpoints), keeps
//! its session token in a per-user file readable only by its owner, and prints the
//! `operationID` of any failed request so a user can hand it to an operator, who finds the
//! request's logs and trace on every site by it.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sitegate_model::task::{Task, TaskState};
use sitegate_model::ErrorEnvelope;

const AUTH_HEADER: &str = "X-VCAV-Auth";
const OPERATION_ID_HEADER: &str = "operationID";
const DEFAULT_URL: &str = "http://127.0.0.1:8046";

/// Exit code of `tasks watch` when the task ended FAILED (a request that failed exits 1).
pub const EXIT_TASK_FAILED: u8 = 2;

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The site's client API. Default: the URL of the saved session, else http://127.0.0.1:8046.
    #[arg(long, env = "SITEGATE_URL", global = true)]
    url: Option<String>,
    /// How to print answers.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Where the session token is kept (created with mode 0600).
    /// Default: $XDG_CONFIG_HOME/sitegate/session.json or ~/.config/sitegate/session.json.
    #[arg(long, env = "SITEGATE_SESSION_FILE", global = true)]
    session_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for an https:// URL, besides the public web roots.
    #[arg(long, env = "SITEGATE_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum TasksCommand {
    /// List tasks, newest first (filters as in the API).
    List(ListArgs),
    /// Show one task.
    Get {
        id: String,
        /// Read it from this site (over the peer link when it is not this site).
        #[arg(long)]
        site: Option<String>,
    },
    /// Follow a task with a progress bar until it is final. Exit code 0 when it SUCCEEDED,
    /// 2 when it FAILED (its error printed), 1 when a request failed.
    Watch {
        id: String,
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    site: Option<String>,
    /// RUNNING, SUCCEEDED or FAILED; repeat or comma-separate for several.
    #[arg(long, value_delimiter = ',')]
    state: Vec<String>,
    /// The workflow type.
    #[arg(long = "type")]
    task_type: Option<String>,
    #[arg(long)]
    resource_type: Option<String>,
    #[arg(long)]
    resource_id: Option<String>,
    #[arg(long)]
    resource_name: Option<String>,
    /// Admins only: tasks of this user.
    #[arg(long)]
    user: Option<String>,
    /// Comma list of fields; a trailing `-` sorts that field descending.
    #[arg(long)]
    sort: Option<String>,
    #[arg(long)]
    limit: Option<u32>,
    #[arg(long)]
    offset: Option<u64>,
}

/// What `login` saves: where, as whom, and the token.
#[derive(Serialize, Deserialize)]
struct SavedSession {
    url: String,
    user: String,
    token: String,
}

/// A failed command: what to print, and the exit code.
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { message, code: 1 }
    }
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    output: Output,
}

/// An answer the server refused: its envelope and the operation ID to quote.
fn api_failure(status: StatusCode, body: &[u8], operation_id: Option<String>) -> Failure {
    let op = operation_id.unwrap_or_else(|| "none".into());
    let message = match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(e) => format!(
            "{} ({}): {} [operationID {op}]",
            e.code,
            status.as_u16(),
            e.msg
        ),
        Err(_) => format!(
            "HTTP {} with no error envelope [operationID {op}]",
            status.as_u16()
        ),
    };
    Failure::from(message)
}

impl Client {
    fn new(args: &ClientArgs, session: Option<&SavedSession>) -> Result<Client, Failure> {
        let url = args
            .url
            .clone()
            .or_else(|| session.map(|s| s.url.clone()))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("sitegate-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &args.ca_cert {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Client {
            http,
            url: url.trim_end_matches('/').to_owned(),
            token: session.map(|s| s.token.clone()),
            output: args.output,
        })
    }

    /// One request; the answer's body when it succeeded, the envelope as a failure otherwise.
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), Failure> {
        let mut request = self
            .http
            .request(method, format!("{}{path_and_query}", self.url))
            .timeout(timeout);
        if let Some(token) = &self.token {
            request = request.header(AUTH_HEADER, token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.url))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("{}: the answer was cut off: {e}", self.url))?;
        if status.is_success() {
            Ok((headers, bytes.to_vec()))
        } else {
            let op = headers
                .get(OPERATION_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Err(api_failure(status, &bytes, op))
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        let (_, body) = self
            .call(Method::GET, path, None, Duration::from_secs(60))
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| Failure::from(format!("unexpected answer from {path}: {e}")))
    }
}

fn session_path(args: &ClientArgs) -> Result<PathBuf, Failure> {
    if let Some(path) = &args.session_file {
        return Ok(path.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or_else(|| Failure::from("set HOME, XDG_CONFIG_HOME or --session-file".to_owned()))?;
    Ok(base.join("sitegate").join("session.json"))
}

fn load_session(args: &ClientArgs) -> Result<Option<SavedSession>, Failure> {
    let path = session_path(args)?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Failure::from(format!(
                "{}: not a saved session ({e}); log in again",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::from(format!("{}: {e}", path.display()))),
    }
}

fn require_session(args: &ClientArgs) -> Result<SavedSession, Failure> {
    load_session(args)?
        .ok_or_else(|| Failure::from("not logged in: run `sitegate login`".to_owned()))
}

/// Written to a new file beside the old one, created 0600, then renamed over it: the token
/// is never readable by others, not even for a moment.
fn save_session(path: &Path, session: &SavedSession) -> Result<(), Failure> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension("json.new");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let text = serde_json::to_vec_pretty(session).map_err(|e| e.to_string())?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn print_json(value: &impl Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let present: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
        .collect();
    if present.is_empty() {
        String::new()
    } else {
        // Encoding a list of string pairs cannot fail.
        format!(
            "?{}",
            serde_urlencoded::to_string(present).unwrap_or_default()
        )
    }
}

fn task_table(tasks: &[Task]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "ID", "SITE", "USER", "STATE", "PROGRESS", "TYPE", "RESOURCE",
    ]);
    for t in tasks {
        table.add_row(vec![
            t.id.to_string(),
            t.site.clone(),
            t.user.clone(),
            t.state.as_str().to_owned(),
            format!("{}%", t.progress),
            t.workflow_info.workflow_type.clone(),
            t.workflow_info
                .resource_name
                .clone()
                .or_else(|| t.workflow_info.resource_id.clone())
                .unwrap_or_default(),
        ]);
    }
    table
}

fn print_tasks(output: Output, tasks: &[Task], total: Option<u64>) -> Result<(), Failure> {
    match output {
        Output::Json => match total {
            Some(total) => print_json(&serde_json::json!({"items": tasks, "total": total})),
            None => print_json(&tasks.first()),
        },
        Output::Table => {
            println!("{}", task_table(tasks));
            if let Some(total) = total {
                println!("{} of {total} tasks", tasks.len());
            }
            Ok(())
        }
    }
}

fn read_password(from_stdin: bool) -> Result<String, Failure> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
    }
    rpassword::prompt_password("Password: ").map_err(|e| Failure::from(e.to_string()))
}

pub async fn login(args: &ClientArgs, user: &str, password_stdin: bool) -> Result<(), Failure> {
    let password = read_password(password_stdin)?;
    let client = Client::new(args, None)?;
    let body =
        serde_json::json!({"type": "localUser", "localUser": user, "localPassword": password});
    let (headers, answer) = client
        .call(
            Method::POST,
            "/sessions",
            Some(body),
            Duration::from_secs(60),
        )
        .await?;
    let token = headers
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Failure::from("the server answered without a session token".to_owned()))?;
    let path = session_path(args)?;
    save_session(
        &path,
        &SavedSession {
            url: client.url.clone(),
            user: user.to_owned(),
            token: token.to_owned(),
        },
    )?;
    let details: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    match client.output {
        Output::Json => print_json(&details)?,
        Output::Table => println!(
            "Logged in to {} as {user}; session saved in {}",
            client.url,
            path.display()
        ),
    }
    Ok(())
}

pub async fn logout(args: &ClientArgs) -> Result<(), Failure> {
    let session = require_session(args)?;
    let client = Client::new(args, Some(&session))?;
    let outcome = client
        .call(Method::DELETE, "/sessions", None, Duration::from_secs(30))
        .await;
    // The local copy goes whatever the server said: a dead token is no use to keep.
    let path = session_path(args)?;
    let _ = std::fs::remove_file(&path);
    outcome?;
    println!("Logged out");
    Ok(())
}

pub async fn extend(
    args: &ClientArgs,
    site: &str,
    user: Option<&str>,
    password_stdin: bool,
) -> Result<(), Failure> {
    let session = require_session(args)?;
    let client = Client::new(args, Some(&session))?;
    let body = match user {
        Some(user) => {
            let password = read_password(password_stdin)?;
            serde_json::json!({"type": "credentials", "site": site, "vcdUsername": user, "vcdPassword": password})
        }
        None => serde_json::json!({"type": "multisite", "site": site}),
    };
    let (_, answer) = client
        .call(
            Method::POST,
            "/sessions/extend",
            Some(body),
            Duration::from_secs(60),
        )
        .await?;
    match client.output {
        Output::Json => {
            let details: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            print_json(&details)
        }
        Output::Table => {
            println!("Session extended to site {site}");
            Ok(())
        }
    }
}

pub async fn sites(args: &ClientArgs) -> Result<(), Failure> {
    let session = require_session(args)?;
    let client = Client::new(args, Some(&session))?;
    let sites: Vec<Value> = client.get_json("/sites").await?;
    if client.output == Output::Json {
        return print_json(&sites);
    }
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(vec!["SITE", "LOCAL", "LINK", "PROBLEM"]);
    for site in &sites {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let local = site["isLocal"].as_bool().unwrap_or(false);
        let problem = ["outgoingCommError", "incomingCommError"]
            .iter()
            .filter_map(|k| site["state"][k]["msg"].as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let link = if local {
            "-".to_owned()
        } else {
            text(&site["link"]["circuit"])
        };
        table.add_row(vec![
            text(&site["name"]),
            if local { "yes" } else { "no" }.to_owned(),
            link,
            problem,
        ]);
    }
    println!("{table}");
    Ok(())
}

pub async fn tasks(args: &ClientArgs, command: TasksCommand) -> Result<(), Failure> {
    let session = require_session(args)?;
    let client = Client::new(args, Some(&session))?;
    match command {
        TasksCommand::List(l) => {
            let state = (!l.state.is_empty()).then(|| l.state.join(","));
            let query = query_string(&[
                ("site", l.site),
                ("state", state),
                ("type", l.task_type),
                ("resourceType", l.resource_type),
                ("resourceId", l.resource_id),
                ("resourceName", l.resource_name),
                ("user", l.user),
                ("sort", l.sort),
                ("limit", l.limit.map(|n| n.to_string())),
                ("offset", l.offset.map(|n| n.to_string())),
            ]);
            #[derive(Deserialize)]
            struct Page {
                items: Vec<Task>,
                total: u64,
            }
            let page: Page = client.get_json(&format!("/tasks{query}")).await?;
            print_tasks(client.output, &page.items, Some(page.total))
        }
        TasksCommand::Get { id, site } => {
            let task: Task = client
                .get_json(&format!(
                    "/tasks/{}{}",
                    encode(&id),
                    query_string(&[("site", site)])
                ))
                .await?;
            print_tasks(client.output, std::slice::from_ref(&task), None)
        }
        TasksCommand::Watch { id, site } => watch(&client, &id, site).await,
    }
}

fn encode(segment: &str) -> String {
    // A task ID is a UUID; anything else is sent encoded so the server can refuse it clearly.
    serde_urlencoded::to_string([("", segment)])
        .map(|s| s.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

/// Follows the task with blocking reads (`waitForChange`): the server answers when the task
/// changed after the `lastUpdated` we hold, or after `timeout` with the task unchanged. A server
/// that does not know the parameter refuses it, and then we poll once a second instead.
async fn watch(client: &Client, id: &str, site: Option<String>) -> Result<(), Failure> {
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<10} [{bar:40}] {pos:>3}% {elapsed}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let base = format!("/tasks/{}", encode(id));
    let mut blocking = true;
    let mut last: Option<Task> = None;
    let task = loop {
        let path = match (&last, blocking) {
            (Some(t), true) => format!(
                "{base}{}",
                query_string(&[
                    ("site", site.clone()),
                    ("waitForChange", Some("true".into())),
                    ("timeout", Some("30s".into())),
                    ("lastUpdated", Some(t.last_updated.to_string())),
                ])
            ),
            _ => format!("{base}{}", query_string(&[("site", site.clone())])),
        };
        let answer = client
            .call(Method::GET, &path, None, Duration::from_secs(90))
            .await;
        let body = match answer {
            Ok((_, body)) => body,
            Err(f) if blocking && last.is_some() && f.message.starts_with("BadUserInput") => {
                blocking = false;
                continue;
            }
            Err(f) => {
                bar.abandon();
                return Err(f);
            }
        };
        let task: Task = serde_json::from_slice(&body)
            .map_err(|e| Failure::from(format!("unexpected answer for task {id}: {e}")))?;
        bar.set_position(u64::from(task.progress));
        bar.set_message(task.state.as_str());
        if task.state != TaskState::Running {
            break task;
        }
        if !blocking && last.is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        last = Some(task);
    };
    bar.finish();
    print_tasks(client.output, std::slice::from_ref(&task), None)?;
    match task.state {
        TaskState::Failed => {
            let why = task
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.code, e.msg))
                .unwrap_or_else(|| "no error given".into());
            Err(Failure {
                message: format!("task {id} FAILED: {why}"),
                code: EXIT_TASK_FAILED,
            })
        }
        _ => Ok(()),
    }
}
