//! The `sitegate-bench` command: a thin shell over the `sitegate_bench` library. It pins
//! itself to CPU 1 before any thread starts (servers go to CPU 0), runs the plan, prints the
//! table and, with `--out`, writes BENCHMARKS.md. See the library's documentation for what is
//! measured and how.

use std::process::ExitCode;

use clap::Parser;
use sitegate_bench::cli::{Internal, Options, Plan};
use sitegate_bench::process::{self, Pinning};
use sitegate_bench::{limit, report, runner};

fn main() -> ExitCode {
    let options = Options::parse();
    let result = match &options.command {
        Some(Internal::ServeLimit {
            listen,
            body,
            content_type,
        }) => serve_limit(*listen, body, content_type),
        None => bench(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sitegate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The limit baseline as its own process, so it can be pinned and measured like a site.
fn serve_limit(
    listen: std::net::SocketAddr,
    body: &std::path::Path,
    content_type: &str,
) -> Result<(), String> {
    let answer = limit::FixedAnswer {
        body: std::fs::read(body)
            .map_err(|e| format!("{}: {e}", body.display()))?
            .into(),
        content_type: http::HeaderValue::try_from(content_type).map_err(|e| e.to_string())?,
    };
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        limit::serve(listener, answer).await;
        Ok(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn bench(options: &Options) -> Result<(), String> {
    let plan = Plan::from_options(options)?;
    let sitegate = runner::locate_sitegate(options.sitegate.as_deref())?;
    if sitegate.components().any(|c| c.as_os_str() == "debug") {
        eprintln!(
            "warning: {} looks like a debug build; numbers will be far below a release build's",
            sitegate.display()
        );
    }
    // Before the runtime starts its threads: they inherit this thread's CPU mask.
    let pinning = Pinning::apply_to_self(!options.no_pin);
    eprintln!("CPU placement: {}", pinning.describe());
    if let Some([one, _, _]) = process::load_average() {
        if one >= 1.5 {
            eprintln!("warning: load average {one:.2}: the machine is busy, numbers will be noisy");
        }
    }
    let mut report = runtime()?
        .block_on(runner::run(plan, pinning, sitegate, options.keep))
        .map_err(|e| e.to_string())?;
    report.command = command_line();
    println!("{}\n", report::table_title(&report.configuration));
    println!("{}", report::table(&report.rows));
    println!("{}", report::details(&report.rows));
    for note in &report.setup_notes {
        println!("- {note}");
    }
    if let (Some([before, _, _]), Some([after, _, _])) = (report.load_before, report.load_after) {
        println!("- Load average (1 min): {before:.2} before, {after:.2} after");
    }
    if let Some(out) = &options.out {
        std::fs::write(out, report::document(&report))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// This invocation as a shell command, with the program named as typed and absolute paths
/// below the working directory made relative.
fn command_line() -> String {
    std::env::args()
        .map(|a| sitegate_bench::report::shown_path(std::path::Path::new(&a)))
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
