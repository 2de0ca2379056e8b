//! The results table (printed, and the heart of BENCHMARKS.md) and the document around it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::scenario::{targets, Row, Verdict};

/// Everything a run found, and what it needs to say how it was made.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// The configuration the sites ran with, as the report names it: the default (as
    /// `sitegate init` writes it) or a tuned one ([`crate::topology::configuration_label`]).
    pub configuration: String,
    /// The command as typed, for BENCHMARKS.md.
    pub command: String,
    /// UTC time the run started.
    pub started: String,
    pub machine: String,
    pub pinning: String,
    /// 1/5/15-minute load average before and after the run.
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    pub many_clients: usize,
    pub rate_fraction: f64,
    pub small_tasks: u64,
    pub large_tasks: u64,
    pub quick: bool,
    /// Lines about setup: seeding times, the captured answer, skipped baselines.
    pub setup_notes: Vec<String>,
}

/// `12,345`.
pub fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate: `12,345`, or `0.7` when below 100 (slow scenarios).
pub fn rate(n: f64) -> String {
    if n < 100.0 {
        format!("{n:.1}")
    } else {
        thousands(n)
    }
}

/// `412 µs`, `3.21 ms`, `1.20 s`.
pub fn latency(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.0} µs")
    } else if micros < 1_000_000.0 {
        format!("{:.2} ms", micros / 1e3)
    } else {
        format!("{:.2} s", micros / 1e6)
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn load(l: Option<[f64; 3]>) -> String {
    l.map_or_else(
        || "unknown".into(),
        |[a, b, c]| format!("{a:.2} / {b:.2} / {c:.2}"),
    )
}

/// The title of the results table: which configuration was measured.
pub fn table_title(configuration: &str) -> String {
    format!("Results: {configuration}")
}

/// The results table in Markdown. `ratio` is req/s over the baseline named beside it (for
/// remote scenarios, the better of nginx and HAProxy); `met` says whether the target was met.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | conns | req/s | ratio | latency at | p50 | p99 | p99.9 | peak RSS | target | met |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---|---|---|\n",
    );
    for row in rows {
        let rps = row.throughput().map_or("—".into(), rate);
        let ratio = row
            .ratio
            .as_ref()
            .map_or("—".into(), |(r, of)| format!("{r:.2}x {of}"));
        let (at, p50, p99, p999) = match (row.latency_source(), &row.open) {
            (Some(l), Some(open)) => (
                format!("{} req/s", rate(open.offered_rate.unwrap_or(0.0))),
                latency(l.latency.quantile(0.5)),
                latency(l.latency.quantile(0.99)),
                latency(l.latency.quantile(0.999)),
            ),
            (Some(l), None) => (
                "closed loop".into(),
                latency(l.latency.quantile(0.5)),
                latency(l.latency.quantile(0.99)),
                latency(l.latency.quantile(0.999)),
            ),
            _ => ("—".into(), "—".into(), "—".into(), "—".into()),
        };
        let rss = if row.peak_rss.is_empty() {
            "—".into()
        } else {
            row.peak_rss
                .iter()
                .map(|(name, bytes)| format!("{name} {}", mib(*bytes)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let target = if row.target.is_empty() {
            "—".into()
        } else {
            row.target.clone()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {rps} | {ratio} | {at} | {p50} | {p99} | {p999} | {rss} | {target} | {} |",
            row.title,
            row.connections,
            match row.verdict {
                Verdict::Pass => "**met**",
                Verdict::Fail => "**not met**",
                _ => row.verdict.label(),
            }
        );
    }
    s
}

/// Per-row details: closed-loop latencies, errors, notes.
pub fn details(rows: &[Row]) -> String {
    let mut s = String::new();
    for row in rows {
        let mut parts = Vec::new();
        if let Some(c) = &row.closed {
            parts.push(format!(
                "closed loop {} req/s, p50 {}, p99 {}, max {}",
                rate(c.throughput()),
                latency(c.latency.quantile(0.5)),
                latency(c.latency.quantile(0.99)),
                latency(c.latency.max()),
            ));
        }
        if let Some(o) = &row.open {
            parts.push(format!(
                "open loop {} of {} req/s offered, max {}",
                rate(o.throughput()),
                rate(o.offered_rate.unwrap_or(0.0)),
                latency(o.latency.max()),
            ));
        }
        let errors = row.errors();
        if errors > 0 {
            let first = [&row.closed, &row.open]
                .into_iter()
                .flatten()
                .find_map(|r| r.first_error.clone())
                .unwrap_or_default();
            parts.push(format!("{errors} failed requests (first: {first})"));
        }
        parts.extend(row.notes.iter().cloned());
        let _ = writeln!(
            s,
            "- **{}** (`{}`): {}.",
            row.title,
            row.key,
            parts.join("; ")
        );
    }
    s
}

/// BENCHMARKS.md.
pub fn document(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `sitegate-bench` (crate `crates/bench`); do not edit by hand. To regenerate:\n\n\
         ```sh\ncargo build --release -p sitegate -p sitegate-bench\n{}\n```\n",
        report.command
    );
    let _ = writeln!(s, "Measured: **{}**.\n", report.configuration);
    if report.quick {
        let _ = writeln!(
            s,
            "> This is a **quick** (smoke) run: small stores and short phases. Its numbers are \
             indicative only; a full run drops `--quick`.\n"
        );
    }
    let _ = writeln!(s, "## Run\n");
    let _ = writeln!(s, "- Started: {}", report.started);
    let _ = writeln!(s, "- Sites' configuration: {}", report.configuration);
    let _ = writeln!(s, "- Machine: {}", report.machine);
    let _ = writeln!(
        s,
        "- Load average (1/5/15 min): {} before, {} after (the run keeps both CPUs busy itself)",
        load(report.load_before),
        load(report.load_after)
    );
    let _ = writeln!(s, "- CPU placement: {}", report.pinning);
    let _ = writeln!(
        s,
        "- Each measurement: {:.1} s warm-up, then {:.1} s measured; {} connections \
         ({} for the many-clients scenarios); open loop at {:.0} % of the closed-loop throughput",
        report.warmup.as_secs_f64(),
        report.duration.as_secs_f64(),
        report.connections,
        report.many_clients,
        report.rate_fraction * 100.0
    );
    let _ = writeln!(
        s,
        "- Stores: site1 with {} tasks (then {} for the large-store scenarios), site2 with {} \
         tasks plus 1,000 RUNNING and 1 finished task of alice for the remote scenarios",
        thousands(report.small_tasks as f64),
        thousands(report.large_tasks as f64),
        thousands(report.small_tasks as f64)
    );
    for note in &report.setup_notes {
        let _ = writeln!(s, "- {note}");
    }
    let _ = writeln!(s, "\n## {}\n", table_title(&report.configuration));
    s.push_str(&table(&report.rows));
    let _ = writeln!(s, "\n### Details\n");
    s.push_str(&details(&report.rows));
    s.push_str(&method());
    s
}

/// How the numbers are made: the fixed part of BENCHMARKS.md.
fn method() -> String {
    format!(
        r#"
## How it is measured

**Topology.** `sitegate init --sites site1,site2` writes the federation (CA, site
certificates, configs, users); the tool seeds the stores through `sitegate-store` before the
sites start, then runs `sitegate serve` for both sites with the configuration `init` wrote and
nothing else: `RUST_LOG` and any inherited `SITEGATE_<SECTION>__<KEY>` setting are removed from
their environment. That is the default configuration users run: `[log] level = "info"` with
the access log on (one JSON line per request, to a file: standard error is one). A tuned run
(`--log-level warn`) sets `SITEGATE_LOG__LEVEL` instead, and the report says so in its title.
Either way the sites' logs go to `site1.log` and `site2.log` in the run's work directory
(`--keep` keeps it), never to the terminal. The tool logs in as `alice` at site1 and extends
the session to site2 (`multisite`), and logs in as `svc` (writer) for the write scenario. The
seeded history: one task in ten belongs to `alice`, one in ten is RUNNING, half are of type
`sync`.

**Load.** The tool's own pooled HTTP/1.1 client on hyper's connection API. *req/s* is the
closed loop: N connections, each sending its next request as soon as the answer is read. The
latency columns are an open loop at a fixed rate (a fraction of the closed-loop throughput, the
same rate for a scenario and its baselines): requests are scheduled on a timetable and each
latency counts from the scheduled time, so a stall is not hidden by the requests that were not
sent during it (no coordinated omission). One worker per connection takes the next slot of
the timetable when it is free; a slot still ahead is waited for with tokio's millisecond timer
and timed from its actual send, so requests of one millisecond leave together. The write scenario is sequential per connection
(create, 5 patches, finish), so its latencies are the closed loop's.

**Baselines**, measured in the same run on the same CPU:
- `limit`: a bare hyper HTTP/1.1 server (a child process of the tool) answering every request
  with the exact bytes and media type of a Get One answer captured from site1: no routing, no
  authentication, no store. Local reads are compared with it.
- `nginx`: nginx (Debian package, one worker) listening on plain HTTP and proxying to site2's
  peer link over mutual TLS with site1's certificate and key (`proxy_ssl_verify on`,
  `proxy_ssl_name site2`, HTTP/1.1 keep-alive upstream of 64), with the `X-VCAV-Auth` of a
  session logged in at site2 itself: client -> nginx -> mTLS -> site2, the same hop site1 makes
  for a remote read.
- `haproxy`: HAProxy (Debian package, `nbthread 1`) on the same hop: plain HTTP in, then
  `ssl crt` (site1's certificate and key) `ca-file` (the federation CA) `verify required
  verifyhost site2 sni str(site2)` to site2's peer link, which speaks TLS 1.3 only and offers
  `h2` and `http/1.1` by ALPN. It speaks HTTP/1.1 there by default, as site1 does with the
  default `peering.transport = "http1"` (`--haproxy-upstream h2` for `alpn h2`), keeps
  connections alive on both sides and shares idle upstream connections between clients (`http-reuse always`); it logs abnormal requests
  only, as nginx logs errors only.
- Remote reads are compared with the better of the two (the higher closed-loop req/s in that
  scenario), at the same connection count; the three open loops run at one rate, the open-loop
  fraction of the slowest closed loop, and the p99 is compared with that same proxy's. Both
  proxies' rows are in the table.

**Scenarios.**
- `get-one`: `GET /tasks/{{id}}` at site1, going round 1,000 of alice's tasks, small store.
- `poll-100`: `POST /tasks/poll` with 100 of alice's task IDs.
- `remote-get-one`: `GET /tasks/{{id}}?site=site2` at site1 (site1 -> peer link -> site2),
  going round 1,000 RUNNING tasks of alice seeded at site2 for it: site1 shares only
  concurrent identical reads of a running task, so (nearly) every read crosses the link, as
  every proxied request does.
- `remote-get-one-mixed`: the same over 1,000 of alice's tasks of the seeded history (nine in
  ten finished): site1 keeps finished tasks' answers, so most reads stay at site1. The share
  of reads that crossed the link (Get Ones counted by site2's `sitegate_requests_total` over
  those site1 forwarded) is in the details, for every remote scenario.
- `remote-running-1000`, `remote-finished-1000`: 1,000 connections polling one RUNNING
  (respectively SUCCEEDED) task of site2 through site1.
- `writes`: `POST /tasks`, 5 x `PATCH {{"progress"}}`, `PATCH {{"state":"SUCCEEDED"}}` as `svc`,
  every answer durable (SQLite WAL, `synchronous=FULL`, group commit); req/s = updates/s.
- `get-one-large`: `get-one` after site1 is reseeded to the large store, at the same offered
  rate as `get-one`, for the lookup-flatness target.
- `query`: `GET /tasks?state=RUNNING&type=sync&limit=100` as alice on the large store, at
  most 4 connections (the embedded store's reader threads; more would only queue).

**Targets** (issue 15's, ratios from this one run): remote Get One over many distinct RUNNING
tasks (and over the mixed history) >= {:.1}x the throughput of the better of nginx and HAProxy,
with p99 no worse than that proxy's; local Get One >= {:.2}x limit; 1,000 clients polling one
RUNNING remote task: site1 under {} MiB peak RSS. Kept from before: query p99 < {:.0} ms; Get
One latency on the large store within {:.0}x of the small store; >= {:.0} durable updates/s;
every site process under {} MiB peak RSS. A row whose target is not met shows what missed it in
the details; every row also misses on any failed request.

**Peak RSS** is `VmHWM` of each server process, reset through `/proc/<pid>/clear_refs` before
each measurement, so it is the peak during that measurement. glibc's allocator keeps memory
it has freed, so a peak also holds what earlier scenarios left behind: the writes run before
the many-clients scenarios, and site1 is restarted (to reseed it) before the large-store ones.
"#,
        targets::REMOTE_VS_PROXY,
        targets::GET_ONE_VS_LIMIT,
        targets::SITE_RSS_BYTES / (1024 * 1024),
        targets::QUERY_P99_MS,
        targets::LOOKUP_FLATNESS,
        targets::WRITES_PER_SEC,
        targets::SITE_RSS_BYTES / (1024 * 1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        for (n, s) in [
            (0.0, "0"),
            (999.0, "999"),
            (1_000.0, "1,000"),
            (1_234_567.4, "1,234,567"),
        ] {
            assert_eq!(thousands(n), s);
        }
        assert_eq!(rate(0.74), "0.7");
        assert_eq!(rate(12_345.0), "12,345");
        assert_eq!(latency(Duration::from_micros(412)), "412 µs");
        assert_eq!(latency(Duration::from_micros(3_210)), "3.21 ms");
        assert_eq!(latency(Duration::from_millis(1_200)), "1.20 s");
    }
}

/// `path` as BENCHMARKS.md shows it: relative to the directory the bench runs in (the
/// repository, as documented) when it lies below it, so a committed report names no machine's
/// directories; other paths (system tools such as `/usr/sbin/nginx`) as they are.
pub fn shown_path(path: &std::path::Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            path.strip_prefix(cwd)
                .ok()
                .map(std::path::Path::to_path_buf)
        })
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

#[cfg(test)]
mod shown_path_tests {
    use super::shown_path;

    #[test]
    fn paths_below_the_working_directory_are_shown_relative() {
        let cwd = std::env::current_dir().expect("a working directory");
        let inside = cwd.join("target/release/sitegate");
        assert_eq!(shown_path(&inside), "target/release/sitegate");
        assert_eq!(
            shown_path(std::path::Path::new("/usr/sbin/nginx")),
            "/usr/sbin/nginx"
        );
    }
}
