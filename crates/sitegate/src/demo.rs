//! `sitegate demo`: a federation of two sites in this process, with a simulated replication
//! service at each that starts tasks and moves them to completion, so there is something to
//! look at straight away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rand::Rng;
use sitegate_model::task::{NewTask, TaskPatch, TaskState, WorkflowInfo};
use sitegate_model::ErrorEnvelope;
use sitegate_store::Store;

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Where the demo federation's files go; re-created on every run.
    #[arg(long, default_value = "sitegate-demo")]
    pub dir: PathBuf,
    /// Site k serves its client API on P+2k.
    #[arg(long, default_value_t = 8046)]
    pub base_port: u16,
    /// The password of every demo user.
    #[arg(long, default_value = "demo")]
    pub password: String,
}

const MARKER: &str = ".sitegate-demo";
const SITES: [&str; 2] = ["site1", "site2"];
const LOG_FILE: &str = "sitegate.log";

/// Every port the demo will bind (site k: client P+2k, peer link P+2k+1), checked before any
/// file is written, so a taken port is a sentence naming it rather than a bind error.
fn ports_free(base: u16) -> Result<(), String> {
    let last = u16::try_from(2 * SITES.len() - 1).map_err(|e| e.to_string())?;
    if base.checked_add(last).is_none() {
        return Err(format!(
            "--base-port {base} leaves no room for {} ports",
            last + 1
        ));
    }
    for (k, site) in SITES.iter().enumerate() {
        for (offset, what) in [(0, "client API"), (1, "peer link")] {
            let port = base + 2 * k as u16 + offset;
            if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return Err(format!(
                    "port {port} (for {site}'s {what}) is not free: {e}.\n\
                     The demo uses ports {base}-{end}; choose others with --base-port, e.g.\n  \
                     cargo run --release -- demo --base-port {suggest}",
                    end = base + last,
                    suggest = base.saturating_add(1000),
                ));
            }
        }
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    ports_free(args.base_port)?;
    prepare_dir(&args.dir)?;
    let init_args = crate::init::InitArgs {
        dir: args.dir.clone(),
        sites: SITES.iter().map(|s| (*s).to_owned()).collect(),
        base_port: args.base_port,
        dev_password: args.password.clone(),
        postgres: None,
    };
    crate::init::run(&init_args)?;
    std::fs::write(args.dir.join(MARKER), "").map_err(|e| e.to_string())?;
    let log_path = args.dir.join(LOG_FILE);
    let log_file = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    crate::runtime()?.block_on(async move {
        // The sites log as `init` configures them (info, access log on), but to a file: the
        // terminal shows task progress, and the file is where an operator finds a request by
        // its operation ID.
        let _telemetry = sitegate_gateway::telemetry::init_with_writer(
            &sitegate_model::config::LogConfig {
                format: sitegate_model::config::LogFormat::Json,
                level: "info".into(),
            },
            &sitegate_model::config::TelemetryConfig::default(),
            "demo",
            log_file,
            false,
        )?;
        let mut apps = Vec::new();
        for site in SITES {
            let path = args.dir.join(format!("{site}.toml"));
            let config = crate::config::load(&path).map_err(|e| e.to_string())?;
            let app = sitegate_gateway::Application::build(config)
                .await
                .map_err(|e| format!("site {site}: {e}"))?;
            apps.push(app);
        }
        print_intro(&args, &apps);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut running = Vec::new();
        for app in apps {
            tokio::spawn(simulate_service(app.store(), app.site_name().to_owned()));
            let mut stop = stop_rx.clone();
            running.push(tokio::spawn(app.run(async move {
                let _ = stop.changed().await;
            })));
        }
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
        for r in running {
            let _ = r.await;
        }
        Ok(())
    })
}

/// Refuses to delete a directory the demo did not create.
fn prepare_dir(dir: &std::path::Path) -> Result<(), String> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            return Err(format!(
                "{} exists and was not made by `sitegate demo`; choose another --dir",
                dir.display()
            ));
        }
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn print_intro(args: &DemoArgs, apps: &[sitegate_gateway::Application]) {
    println!("sitegate demo: {} sites are running.", apps.len());
    for app in apps {
        println!("  {}  http://{}", app.site_name(), app.client_addr());
    }
    let base = apps
        .first()
        .map(|a| a.client_addr().to_string())
        .unwrap_or_default();
    let remote = apps
        .get(1)
        .map(|a| a.site_name().to_owned())
        .unwrap_or_default();
    println!(
        "Users at every site: admin, alice, bob, svc; password: {pw}\n\n\
         Try:\n  \
         TOKEN=$(curl -s -D - -o /dev/null -X POST http://{base}/sessions \\\n      \
         -d '{{\"type\":\"localUser\",\"localUser\":\"alice\",\"localPassword\":\"{pw}\"}}' \\\n      \
         | awk -F': ' 'tolower($1)==\"x-vcav-auth\"{{print $2}}' | tr -d '\\r')\n  \
         curl -s -H \"X-VCAV-Auth: $TOKEN\" 'http://{base}/tasks?state=RUNNING'\n  \
         # read {remote}'s tasks through this site: extend the session, then name the site\n  \
         curl -s -H \"X-VCAV-Auth: $TOKEN\" -X POST http://{base}/sessions/extend -d '{{\"type\":\"multisite\",\"site\":\"{remote}\"}}'\n  \
         curl -s -H \"X-VCAV-Auth: $TOKEN\" 'http://{base}/tasks?site={remote}&state=RUNNING'\n  \
         curl -s -H \"X-VCAV-Auth: $TOKEN\" http://{base}/sites\n\n\
         Every request's log lines (JSON) are in {log}; find one by the operationID you sent\n\
         (curl -H 'operationID: my-op-42' ...), and its trace ID with `sitegate trace-id my-op-42`.\n\n\
         Task progress is printed below; Ctrl-C stops the demo.",
        pw = args.password,
        log = args.dir.join(LOG_FILE).display(),
    );
}

/// A stand-in for a site's replication service: keeps a few tasks running for alice and bob,
/// advances them every second, and finishes them (now and then with a failure).
async fn simulate_service(store: Arc<dyn Store>, site: String) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut running: Vec<uuid::Uuid> = Vec::new();
    let mut n = 0u32;
    loop {
        tick.tick().await;
        if running.len() < 3 {
            n += 1;
            let user = if n.is_multiple_of(2) { "alice" } else { "bob" };
            let kind = ["replication-sync", "failover", "pairing"][(n % 3) as usize];
            let new = NewTask {
                id: None,
                user: user.into(),
                workflow_info: WorkflowInfo {
                    workflow_type: kind.into(),
                    resource_type: Some("vm".into()),
                    resource_id: Some(format!("vm-{n}")),
                    resource_name: Some(format!("app-server-{n}")),
                },
                source_org: None,
                destination_org: None,
            };
            match store.create_task(new, &site).await {
                Ok(outcome) => running.push(outcome.task().id),
                Err(e) => tracing::warn!(error = %e, "demo: could not create a task"),
            }
        }
        let mut still_running = Vec::new();
        for id in running.drain(..) {
            let Ok(Some(task)) = store.get_task(id).await else {
                continue;
            };
            let step: u8 = rand::thread_rng().gen_range(5..25);
            let progress = task.progress.saturating_add(step).min(100);
            let mut patch = TaskPatch {
                progress: Some(i64::from(progress)),
                ..TaskPatch::default()
            };
            if progress == 100 {
                if rand::thread_rng().gen_bool(0.2) {
                    patch.state = Some(TaskState::Failed);
                    patch.error = Some(ErrorEnvelope {
                        code: "ReplicationError".into(),
                        msg: "The target datastore ran out of space.".into(),
                        args: vec![],
                        stacktrace: String::new(),
                    });
                } else {
                    patch.state = Some(TaskState::Succeeded);
                    patch.result_type = Some("string".into());
                    patch.result = Some(serde_json::json!("synchronised"));
                }
            }
            let Ok(valid) = patch.validate() else {
                continue;
            };
            match store.update_task(id, valid).await {
                Ok(t) => {
                    println!(
                        "{site}  {}  {:<16} {:<14} {:>3}%  {}",
                        t.id,
                        t.workflow_info.workflow_type,
                        t.workflow_info.resource_name.clone().unwrap_or_default(),
                        t.progress,
                        t.state.as_str()
                    );
                    if !t.state.is_final() {
                        still_running.push(id);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "demo: could not update a task"),
            }
        }
        running = still_running;
    }
}
