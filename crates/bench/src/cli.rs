//! The command line, and the plan it turns into.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::scenario::Scenario;
pub use crate::topology::UpstreamProtocol;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "sitegate-bench",
    version,
    about = "Benchmarks a two-site sitegate federation against a bare hyper server, nginx and HAProxy",
    after_help = "Build first: cargo build --release -p sitegate -p sitegate-bench\n\
                  Needs nginx and HAProxy for the remote baselines: apt-get install -y nginx haproxy\n\
                  Scenarios: get-one, poll-100, writes, remote-get-one, remote-get-one-mixed, \
                  remote-running-1000, remote-finished-1000, get-one-large, query"
)]
pub struct Options {
    /// Seconds measured per loop of each scenario (default 10; 3 with --quick).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Connections of the closed loop and of the open loop's pool.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// A smoke run: 10 k tasks instead of 1 M, 3 s per loop.
    #[arg(long)]
    pub quick: bool,
    /// Comma-separated scenarios to run (default: all); baselines they need run with them.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Write the report (BENCHMARKS.md) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The sitegate binary (default: `sitegate` beside this program, e.g. target/release).
    #[arg(long)]
    pub sitegate: Option<PathBuf>,
    /// Tasks in the large store (default 1,000,000; 10,000 with --quick). The small store has
    /// a hundredth of it, at least 1,000.
    #[arg(long)]
    pub tasks: Option<u64>,
    /// Connections of the many-clients scenarios.
    #[arg(long, default_value_t = 1000)]
    pub many_clients: usize,
    /// The open loop's rate, as a fraction of the closed loop's throughput.
    #[arg(long, default_value_t = 0.5)]
    pub rate_fraction: f64,
    /// Do not pin the servers to CPU 0 and the load generator to CPU 1.
    #[arg(long)]
    pub no_pin: bool,
    /// Keep the temporary directory (configs, stores, logs) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Run the sites at this log level (`SITEGATE_LOG__LEVEL`, e.g. `warn`) instead of the
    /// `[log] level` that `sitegate init` wrote (info, access log on); the report is then
    /// labelled a tuned run. Without it the sites run exactly as `init` configured them.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// What HAProxy speaks to site2's peer link: `http1.1` (a pool of keep-alive mTLS
    /// connections, as site1 does by default and nginx does) or `h2` (multiplexed mTLS
    /// connections, as site1 does with `peering.transport = "http2"`).
    #[arg(long, value_name = "PROTOCOL", default_value = "http1.1")]
    pub haproxy_upstream: UpstreamProtocol,
    #[command(subcommand)]
    pub command: Option<Internal>,
}

/// Not for people: how the tool starts its own baseline server as a separate process.
#[derive(Subcommand, Debug, Clone)]
pub enum Internal {
    #[command(hide = true)]
    ServeLimit {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        body: PathBuf,
        #[arg(long)]
        content_type: String,
    },
}

/// What one run does, resolved from the options.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scenarios: Vec<Scenario>,
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    pub many_clients: usize,
    pub rate_fraction: f64,
    pub small_tasks: u64,
    pub large_tasks: u64,
    pub quick: bool,
    /// The sites' log level when overridden (`--log-level`); `None`: as `init` wrote it.
    pub log_level: Option<String>,
    pub haproxy_upstream: UpstreamProtocol,
}

impl Plan {
    pub fn from_options(o: &Options) -> Result<Plan, String> {
        let mut scenarios = Vec::new();
        for name in o.scenarios.iter().filter(|n| !n.trim().is_empty()) {
            let s = Scenario::parse(name).ok_or_else(|| {
                format!(
                    "unknown scenario '{name}'; known: {}",
                    Scenario::ALL.map(Scenario::name).join(", ")
                )
            })?;
            if !scenarios.contains(&s) {
                scenarios.push(s);
            }
        }
        if scenarios.is_empty() {
            scenarios = Scenario::ALL.to_vec();
        }
        // The large-store Get One is judged against the small-store one at the same rate.
        if scenarios.contains(&Scenario::GetOneLarge) && !scenarios.contains(&Scenario::GetOne) {
            scenarios.push(Scenario::GetOne);
        }
        scenarios.sort();
        let secs = o.duration.unwrap_or(if o.quick { 3.0 } else { 10.0 });
        if !(secs.is_finite() && secs > 0.0) {
            return Err("--duration must be a positive number of seconds".into());
        }
        if o.connections == 0 || o.many_clients == 0 {
            return Err("--connections and --many-clients must be at least 1".into());
        }
        if !(o.rate_fraction > 0.0 && o.rate_fraction <= 1.0) {
            return Err("--rate-fraction must be in (0, 1]".into());
        }
        let log_level = match o.log_level.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err("--log-level needs a level, e.g. warn".into()),
            Some(level) => Some(level.to_owned()),
        };
        let large_tasks = o.tasks.unwrap_or(if o.quick { 10_000 } else { 1_000_000 });
        let small_tasks = (large_tasks / 100).max(1_000).min(large_tasks);
        Ok(Plan {
            scenarios,
            warmup: Duration::from_secs_f64(if o.quick { 1.0_f64 } else { 2.0 }.min(secs)),
            duration: Duration::from_secs_f64(secs),
            connections: o.connections,
            many_clients: o.many_clients,
            rate_fraction: o.rate_fraction,
            small_tasks,
            large_tasks,
            quick: o.quick,
            log_level,
            haproxy_upstream: o.haproxy_upstream,
        })
    }

    pub fn runs(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let options =
            Options::try_parse_from(std::iter::once("sitegate-bench").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        Plan::from_options(&options)
    }

    #[test]
    fn the_sites_run_as_init_wrote_them_unless_a_log_level_is_given() {
        let default = plan(&["--quick"]).expect("plan");
        assert_eq!(default.log_level, None);
        assert_eq!(default.haproxy_upstream, UpstreamProtocol::Http11);
        let tuned = plan(&["--log-level", "warn", "--haproxy-upstream", "h2"]).expect("plan");
        assert_eq!(tuned.log_level.as_deref(), Some("warn"));
        assert_eq!(tuned.haproxy_upstream, UpstreamProtocol::H2);
        assert!(plan(&["--log-level", " "]).is_err());
        assert!(plan(&["--haproxy-upstream", "h3"]).is_err());
    }
}
