//! The `sitegate` command: `serve` one site, `init` a federation's files, run a `demo`,
//! `backup`/`restore` a site's embedded store, and
//! the command-line client (`login`, `sites`, `tasks ...`) that talks to a site's API.
//! A thin shell: configuration and files here, everything that serves in `sitegate-gateway`.

mod backup;
mod client;
mod config;
mod demo;
mod init;
mod pki;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sitegate",
    version,
    about = "Multi-site task federation gateway"
)]
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
    /// Copy a site's embedded store to a new file, while the site runs (a consistent
    /// snapshot; sessions left out).
    Backup {
        /// The site's TOML config (names the store).
        #[arg(long, env = "SITEGATE_CONFIG")]
        config: PathBuf,
        /// The backup file to write; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a backup in place as a stopped site's store (sessions are not restored).
    Restore {
        /// The site's TOML config (names the store).
        #[arg(long, env = "SITEGATE_CONFIG")]
        config: PathBuf,
        /// The backup file, as `sitegate backup` wrote it.
        #[arg(long)]
        from: PathBuf,
        /// Replace a store that holds tasks.
        #[arg(long)]
        force: bool,
    },
    /// Write a ready federation: CA, site certificates, configs and users for every site.
    Init(init::InitArgs),
    /// Run a small federation on this machine with tasks that make progress.
    Demo(demo::DemoArgs),
    /// Certificates for real deployments: a federation CA, and site certificates from it.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Log in to a site and keep the session for the other commands.
    Login {
        /// The user name.
        #[arg(long, short)]
        user: String,
        /// Read the password from stdin instead of prompting (for scripts).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// End the saved session, here and at every site it was extended to.
    Logout {
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// Extend the saved session to a peer site: as the same user (the peer must trust this
    /// site for that), or with --user and a password for the peer.
    Extend {
        site: String,
        #[arg(long, short)]
        user: Option<String>,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// The sites this site knows and the health of each link.
    Sites {
        #[command(flatten)]
        client: client::ClientArgs,
    },
    /// The trace ID that every site gives a request sent with this operationID (and no
    /// traceparent): what to search a trace backend or the JSON logs' `trace_id` for.
    TraceId {
        /// The `operationID` header's value.
        operation_id: String,
    },
    /// Tasks: list, get, and watch one until it is final.
    Tasks {
        #[command(subcommand)]
        command: client::TasksCommand,
        #[command(flatten)]
        client: client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a federation CA: DIR/ca.pem and DIR/ca.key (keep the key offline).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name. Default: "sitegate federation CA <random suffix>", so two
        /// CAs never share a name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Issue a certificate for a site from the CA in CA_DIR: OUT_DIR/<site>.pem and .key.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        out_dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Print the SHA-256 fingerprint of each certificate in a PEM file, as `/sites` shows a
    /// peer's trust anchor: check a CA received from another organisation against the
    /// fingerprint its operators read out before naming it in `[[peer]] ca`.
    Fingerprint { file: PathBuf },
}

fn pki(command: PkiCommand) -> Result<(), String> {
    match command {
        PkiCommand::Fingerprint { file } => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(&file)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate in the file", file.display()));
            }
            for cert in certs {
                println!(
                    "{}",
                    sitegate_model::site::fingerprint_sha256(cert.as_ref())
                );
            }
        }
        PkiCommand::Ca { dir, name } => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
            if key.exists() {
                return Err(format!(
                    "{} exists; refusing to overwrite a CA key",
                    key.display()
                ));
            }
            let name = name.unwrap_or_else(pki::unique_ca_name);
            let ca = pki::new_authority(&name)?;
            std::fs::write(&cert, &ca.pem.cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            init::write_private(&key, &ca.pem.key)?;
            println!("Wrote {} and {}", cert.display(), key.display());
        }
        PkiCommand::Issue {
            ca_dir,
            site,
            out_dir,
            days,
        } => {
            let site = sitegate_model::site::SiteName::parse(&site).map_err(|e| e.to_string())?;
            if days < 1 {
                return Err("--days must be at least 1".into());
            }
            let read = |name: &str| {
                let path = ca_dir.join(name);
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
            };
            let ca = pki::load_authority(&read("ca.pem")?, &read("ca.key")?)?;
            let issued = pki::issue_site_certificate(&ca, site.as_str(), days)?;
            std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
            let (cert, key) = (
                out_dir.join(format!("{site}.pem")),
                out_dir.join(format!("{site}.key")),
            );
            // Key first, certificate last: a site reloading on the certificate's change then
            // finds a matching key already in place.
            let tmp_key = out_dir.join(format!(".{site}.key.new"));
            let tmp_cert = out_dir.join(format!(".{site}.pem.new"));
            init::write_private(&tmp_key, &issued.key)?;
            std::fs::write(&tmp_cert, &issued.cert)
                .map_err(|e| format!("{}: {e}", tmp_cert.display()))?;
            std::fs::rename(&tmp_key, &key).map_err(|e| format!("{}: {e}", key.display()))?;
            std::fs::rename(&tmp_cert, &cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            println!(
                "Wrote {} and {} for site '{site}', valid {days} days",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

fn trace_id(operation_id: &str) -> Result<(), String> {
    let id = sitegate_model::operation::OperationId::parse(operation_id)
        .map_err(|e| format!("not an operation ID: {e}"))?;
    let trace = sitegate_model::operation::derive_trace_id(id.as_str());
    let hex: String = trace.iter().map(|b| format!("{b:02x}")).collect();
    println!("{hex}");
    Ok(())
}

/// mimalloc: per-request allocations were about a sixth of a request's CPU with glibc's
/// allocator, and it returns freed memory to the system sooner (lower RSS with many clients).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Login {
            user,
            password_stdin,
            client,
        } => return run_client(client::login(&client, &user, password_stdin)),
        Command::Logout { client } => return run_client(client::logout(&client)),
        Command::Extend {
            site,
            user,
            password_stdin,
            client,
        } => {
            return run_client(client::extend(
                &client,
                &site,
                user.as_deref(),
                password_stdin,
            ))
        }
        Command::Sites { client } => return run_client(client::sites(&client)),
        Command::Tasks { command, client } => return run_client(client::tasks(&client, command)),
        Command::Serve { config } => serve(config),
        Command::Backup { config, out } => config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| backup::run_backup(&c, &out)),
        Command::Restore {
            config,
            from,
            force,
        } => config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| backup::run_restore(&c, &from, force)),
        Command::Init(args) => init::run(&args).map(|dir| {
            println!("{}", init::summary(&args, &dir));
        }),
        Command::Demo(args) => demo::run(args),
        Command::Pki(command) => pki(command),
        Command::TraceId { operation_id } => trace_id(&operation_id),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sitegate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// mimalloc advises the kernel to back its arenas with transparent huge pages, and a 2 MiB
/// huge page is resident as a whole however little of it is used. Measured on a site: idle
/// RSS 43 -> 35 MiB, and 14 -> 4 MiB more for 1,000 open client connections. Failure only
/// means the kernel keeps its default, so it is not an error.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
}

/// Runs one client command on a small runtime; its failure is printed and becomes the exit
/// code (1, or 2 for a watched task that FAILED).
fn run_client(command: impl std::future::Future<Output = Result<(), client::Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sitegate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("sitegate: {}", failure.message);
            ExitCode::from(failure.code)
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
    runtime()?.block_on(async move {
        let telemetry = sitegate_gateway::telemetry::init(
            &config.log,
            &config.telemetry,
            config.site.name.as_str(),
        )?;
        let app = sitegate_gateway::Application::build(config)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(site = app.site_name(), client = %app.client_addr(), peer_link = ?app.peer_addr(), "serving");
        let result = app.run(shutdown_signal()).await.map_err(|e| e.to_string());
        telemetry.shutdown().await;
        result
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
