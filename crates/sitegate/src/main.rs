//! The `sitegate` command: `serve` one site, `init` a federation's files, run a `demo`.
//! A thin shell: configuration and files here, everything that serves in `sitegate-gateway`.

mod config;
mod demo;
mod init;
mod logging;
mod pki;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sitegate", version, about = "Multi-site task federation gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one site. With no --config: a dev site `local` on 127.0.0.1:8046, data in ./data.
    Serve {
        /// The site's TOML config; `SITEGATE_<SECTION>__<KEY>` environment variables override it.
        #[arg(long, env = "SITEGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Write a ready federation: CA, site certificates, configs and users for every site.
    Init(init::InitArgs),
    /// Run a small federation on this machine with tasks that make progress.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Init(args) => init::run(&args).map(|dir| {
            println!("{}", init::summary(&args, &dir));
        }),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sitegate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn serve(config_path: Option<PathBuf>) -> Result<(), String> {
    let config = match config_path {
        Some(path) => config::load(&path).map_err(|e| e.to_string())?,
        None => config::dev_default().map_err(|e| e.to_string())?,
    };
    logging::init(&config.log);
    runtime()?.block_on(async move {
        let app = sitegate_gateway::Application::build(config)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(site = app.site_name(), client = %app.client_addr(), "serving");
        app.run(shutdown_signal()).await.map_err(|e| e.to_string())
    })
}

/// Resolves on SIGINT or SIGTERM, so both Ctrl-C and an orchestrator's stop drain gracefully.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
