//! `sitegate-bench` measures a real two-site sitegate federation on this machine and says,
//! per scenario, whether it meets its target. It sets the topology up itself (`sitegate init`,
//! stores seeded through `sitegate-store`, both sites served by the release binary, sessions
//! logged in and extended), drives load with its own pooled hyper client (a closed loop at N
//! connections for throughput, and a fixed-rate open loop for latency without coordinated
//! omission), runs its baselines side by side in the same run (a bare hyper server repeating
//! the same bytes, and two mTLS reverse proxies over the same peer hop: nginx with one worker
//! and HAProxy with one thread; remote reads are judged against the better of the two), and
//! prints a table of requests/s, p50/p99/p99.9 latency, peak RSS, ratio to the baseline,
//! target and whether it was met, which it also writes as BENCHMARKS.md.
//!
//! By default it measures what users run: the sites start with the configuration `sitegate
//! init` wrote, nothing overridden, so they log at info with the access log on (JSON lines, to
//! `site1.log` and `site2.log` in the run's work directory, not the terminal). `--log-level
//! warn` measures a tuned configuration instead, and the report's title says which it was.
//!
//! It is not a load-testing framework, a regression gate run by CI (the smoke test runs only
//! the load generator against the in-process limit server), or a profiler: it reports where
//! the time goes only as far as the scenarios and baselines tell apart. It never changes the
//! product: it runs the `sitegate` binary as it is built.
//!
//! Modules:
//! - [`cli`]: the command line and the [`cli::Plan`] it resolves to.
//! - [`load`]: the pooled client, closed and open loops, request templates and workloads.
//! - [`histogram`]: the latency histogram (log-linear buckets, about 1.6 % precision).
//! - [`limit`]: the bare hyper "limit" server.
//! - [`seed`]: filling embedded stores with a realistic task history.
//! - [`topology`]: init, site processes and their log configuration, logins, the limit
//!   server process, the nginx and HAProxy baselines.
//! - [`process`]: CPU pinning, peak RSS, child processes, load average.
//! - [`scenario`]: scenarios, issue 15's targets, table rows and their verdicts, the choice of
//!   the better proxy baseline.
//! - [`runner`]: one run from set-up to report.
//! - [`report`]: the table and BENCHMARKS.md.
//! - [`error`]: the one error type, [`error::BenchError`].

pub mod cli;
pub mod error;
pub mod histogram;
pub mod limit;
pub mod load;
pub mod process;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod seed;
pub mod topology;
