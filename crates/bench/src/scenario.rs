//! The scenarios, their baselines and targets (issue 15's), and the rows of the results table
//! with their verdicts: target met or not.

use std::time::Duration;

use crate::load::LoadResult;

/// The targets of issue 15, and the earlier ones it keeps, in one place.
pub mod targets {
    /// Local Get One throughput against the bare hyper limit.
    pub const GET_ONE_VS_LIMIT: f64 = 0.80;
    /// Remote Get One throughput against the better (higher req/s) of nginx and HAProxy as an
    /// mTLS proxy over the same hop; its p99 must be no worse than that proxy's.
    pub const REMOTE_VS_PROXY: f64 = 1.0;
    /// p99 of the indexed query with limit=100 on the large store.
    pub const QUERY_P99_MS: f64 = 20.0;
    /// Get One latency on the large store against the small one (same offered rate).
    pub const LOOKUP_FLATNESS: f64 = 2.0;
    /// Durable task updates per second (create, patches and finish each count as one).
    pub const WRITES_PER_SEC: f64 = 5_000.0;
    /// Peak RSS of any site process under load; for 1,000 clients polling one RUNNING remote
    /// task, issue 15 names site1's.
    pub const SITE_RSS_BYTES: u64 = 100 * 1024 * 1024;
}

/// What can be asked for with `--scenarios`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    GetOne,
    Poll100,
    Writes,
    RemoteGetOne,
    RemoteGetOneMixed,
    RemoteRunning1000,
    RemoteFinished1000,
    GetOneLarge,
    Query,
}

impl Scenario {
    /// Every scenario, in the order they run (the large-store ones last, after reseeding).
    pub const ALL: [Scenario; 9] = [
        Scenario::GetOne,
        Scenario::Poll100,
        Scenario::Writes,
        Scenario::RemoteGetOne,
        Scenario::RemoteGetOneMixed,
        Scenario::RemoteRunning1000,
        Scenario::RemoteFinished1000,
        Scenario::GetOneLarge,
        Scenario::Query,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::GetOne => "get-one",
            Scenario::Poll100 => "poll-100",
            Scenario::RemoteGetOne => "remote-get-one",
            Scenario::RemoteGetOneMixed => "remote-get-one-mixed",
            Scenario::RemoteRunning1000 => "remote-running-1000",
            Scenario::RemoteFinished1000 => "remote-finished-1000",
            Scenario::Writes => "writes",
            Scenario::GetOneLarge => "get-one-large",
            Scenario::Query => "query",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name.trim())
    }

    /// Whether it runs on the large store (after site1 is reseeded).
    pub fn needs_large_store(self) -> bool {
        matches!(self, Scenario::GetOneLarge | Scenario::Query)
    }

    /// Whether it is measured against the proxy baselines, nginx and HAProxy (else against the
    /// limit server, or nothing).
    pub fn is_remote(self) -> bool {
        matches!(
            self,
            Scenario::RemoteGetOne
                | Scenario::RemoteGetOneMixed
                | Scenario::RemoteRunning1000
                | Scenario::RemoteFinished1000
        )
    }

    pub fn uses_limit(self) -> bool {
        matches!(
            self,
            Scenario::GetOne | Scenario::Poll100 | Scenario::GetOneLarge | Scenario::Query
        )
    }
}

/// The verdict of a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A baseline: measured, nothing to pass.
    Baseline,
    /// Could not be judged (a baseline it needs is missing); the reason.
    NotJudged(String),
}

impl Verdict {
    /// The table's "met" column: whether the target was met.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass => "met",
            Verdict::Fail => "not met",
            Verdict::Baseline => "baseline",
            Verdict::NotJudged(_) => "n/a",
        }
    }
}

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct Row {
    /// The `--scenarios` name, or `limit` / `nginx` / `haproxy` for baselines.
    pub key: String,
    /// What the line measures, for people.
    pub title: String,
    pub connections: usize,
    /// Throughput at `connections` (closed loop).
    pub closed: Option<LoadResult>,
    /// Latency at a fixed rate (open loop); `None` where only the closed loop ran.
    pub open: Option<LoadResult>,
    /// Peak RSS in bytes of each server process involved, by name.
    pub peak_rss: Vec<(String, u64)>,
    /// Throughput over the baseline's, and the baseline's name as shown ([`shown_name`]).
    pub ratio: Option<(f64, String)>,
    pub target: String,
    pub verdict: Verdict,
    /// What else a reader should know: errors, why something was not measured, details.
    pub notes: Vec<String>,
}

impl Row {
    pub fn new(key: &str, title: impl Into<String>, connections: usize) -> Row {
        Row {
            key: key.to_owned(),
            title: title.into(),
            connections,
            closed: None,
            open: None,
            peak_rss: Vec::new(),
            ratio: None,
            target: String::new(),
            verdict: Verdict::Baseline,
            notes: Vec::new(),
        }
    }

    /// Keeps the largest peak seen for each process.
    pub fn add_rss(&mut self, readings: &[(String, u64)]) {
        for (name, bytes) in readings {
            match self.peak_rss.iter_mut().find(|(n, _)| n == name) {
                Some((_, peak)) => *peak = (*peak).max(*bytes),
                None => self.peak_rss.push((name.clone(), *bytes)),
            }
        }
    }

    pub fn throughput(&self) -> Option<f64> {
        self.closed.as_ref().map(LoadResult::throughput)
    }

    /// The latencies shown: the open loop's, else the closed loop's.
    pub fn latency_source(&self) -> Option<&LoadResult> {
        self.open.as_ref().or(self.closed.as_ref())
    }

    pub fn errors(&self) -> u64 {
        self.closed.as_ref().map_or(0, |r| r.errors) + self.open.as_ref().map_or(0, |r| r.errors)
    }

    /// The largest peak RSS among site processes (names starting with "site").
    pub fn site_rss(&self) -> Option<(String, u64)> {
        self.peak_rss
            .iter()
            .filter(|(n, _)| n.starts_with("site"))
            .max_by_key(|(_, b)| *b)
            .cloned()
    }
}

/// A baseline's key as people write it: `HAProxy`, `nginx`, `limit`.
pub fn shown_name(key: &str) -> &str {
    match key {
        "haproxy" => "HAProxy",
        other => other,
    }
}

/// Of the proxy baselines measured beside a remote scenario (indices into `rows`), the one
/// with the higher closed-loop throughput: the remote targets are judged against it. Rows
/// that were not measured (proxy missing or not started) are passed over; `None` if none was.
/// A tie goes to the first.
pub fn better_baseline(rows: &[Row], candidates: &[usize]) -> Option<usize> {
    candidates
        .iter()
        .copied()
        .filter_map(|i| Some((i, rows.get(i)?.throughput()?)))
        .fold(None, |best: Option<(usize, f64)>, (i, t)| match best {
            Some((_, b)) if b >= t => best,
            _ => Some((i, t)),
        })
        .map(|(i, _)| i)
}

/// What a scenario's verdict rests on, besides its own row.
#[derive(Clone, Debug, Default)]
pub struct Evidence<'a> {
    /// The row it is measured against (limit, or the better proxy baseline).
    pub baseline: Option<&'a Row>,
    /// For the large-store Get One: the small-store Get One, at the same offered rate.
    pub small_store: Option<&'a Row>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sets the row's target text, ratio and verdict.
pub fn judge(scenario: Scenario, row: &mut Row, evidence: &Evidence<'_>) {
    use targets::*;
    let rss_limit_mib = SITE_RSS_BYTES / (1024 * 1024);
    let mut checks: Vec<(bool, String)> = Vec::new();
    let mut not_judged: Option<String> = None;
    let throughput = row.throughput().unwrap_or(0.0);

    let baseline_throughput = evidence.baseline.and_then(Row::throughput);
    if let (Some(base), Some(b)) = (baseline_throughput, evidence.baseline) {
        if base > 0.0 {
            row.ratio = Some((throughput / base, shown_name(&b.key).to_owned()));
        }
    }
    let ratio = row.ratio.as_ref().map(|(r, _)| *r);
    let need_baseline = |what: &str| match evidence.baseline {
        Some(b) if b.closed.is_some() => None,
        Some(b) => Some(format!(
            "the {} baseline was not measured{}",
            b.key,
            b.notes
                .first()
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        )),
        None => Some(format!("needs the {what} baseline")),
    };

    let target = match scenario {
        Scenario::GetOne => {
            not_judged = need_baseline("limit");
            if let Some(r) = ratio {
                checks.push((r >= GET_ONE_VS_LIMIT, format!("{r:.2}x limit")));
            }
            format!(">= {GET_ONE_VS_LIMIT:.2}x limit req/s")
        }
        Scenario::RemoteGetOne | Scenario::RemoteGetOneMixed => {
            not_judged = need_baseline("nginx or HAProxy");
            let proxy = evidence.baseline.map_or("proxy", |b| shown_name(&b.key));
            if let Some(r) = ratio {
                checks.push((r >= REMOTE_VS_PROXY, format!("{r:.2}x {proxy}")));
            }
            let mine = row.open.as_ref().map(|o| o.latency.quantile(0.99));
            let theirs = evidence
                .baseline
                .and_then(|b| b.open.as_ref())
                .map(|o| o.latency.quantile(0.99));
            if let (Some(m), Some(t)) = (mine, theirs) {
                checks.push((
                    m <= t,
                    format!(
                        "p99 {} vs {proxy} {}",
                        crate::report::latency(m),
                        crate::report::latency(t)
                    ),
                ));
            }
            format!(
                ">= {REMOTE_VS_PROXY:.1}x req/s of the better of nginx and HAProxy, p99 <= its p99"
            )
        }
        Scenario::Query => {
            let p99 = row.latency_source().map(|l| l.latency.quantile(0.99));
            checks.push((
                p99.is_some_and(|p| ms(p) < QUERY_P99_MS),
                format!(
                    "p99 {}",
                    p99.map_or("unmeasured".into(), crate::report::latency)
                ),
            ));
            format!("p99 < {QUERY_P99_MS:.0} ms")
        }
        Scenario::GetOneLarge => {
            match (
                row.open.as_ref(),
                evidence.small_store.and_then(|s| s.open.as_ref()),
            ) {
                (Some(large), Some(small)) => {
                    for q in [0.5, 0.99] {
                        let (l, s) = (large.latency.quantile(q), small.latency.quantile(q));
                        let factor = l.as_secs_f64() / s.as_secs_f64().max(1e-9);
                        checks.push((
                            factor <= LOOKUP_FLATNESS,
                            format!("p{:.0} {factor:.2}x small store", q * 100.0),
                        ));
                    }
                }
                _ => {
                    not_judged = Some("needs get-one (small store) at the same rate".into());
                }
            }
            format!("p50, p99 within {LOOKUP_FLATNESS:.0}x of get-one (same rate)")
        }
        Scenario::Writes => {
            checks.push((
                throughput >= WRITES_PER_SEC,
                format!("{throughput:.0} updates/s"),
            ));
            format!(">= {WRITES_PER_SEC:.0} durable updates/s")
        }
        // Issue 15's memory target; the check every row gets below covers it.
        Scenario::RemoteRunning1000 => format!("site1 RSS < {rss_limit_mib} MiB, site2 too"),
        Scenario::Poll100 | Scenario::RemoteFinished1000 => String::new(),
    };
    match row.site_rss() {
        Some((name, bytes)) => checks.push((
            bytes < SITE_RSS_BYTES,
            format!("{name} {:.1} MiB", bytes as f64 / 1048576.0),
        )),
        None => row.notes.push("peak RSS could not be read".into()),
    }
    let errors = row.errors();
    if errors > 0 {
        checks.push((false, format!("{errors} failed requests")));
    }
    row.target = if target.is_empty() {
        format!("RSS < {rss_limit_mib} MiB")
    } else if target.contains("RSS") {
        target
    } else {
        format!("{target}; RSS < {rss_limit_mib} MiB")
    };
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| what.as_str())
        .collect();
    row.verdict = if !failed.is_empty() {
        row.notes.push(format!("fails on: {}", failed.join(", ")));
        Verdict::Fail
    } else if let Some(why) = not_judged {
        row.notes.push(format!("not judged: {why}"));
        Verdict::NotJudged(why)
    } else {
        Verdict::Pass
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Histogram;

    fn result(ok: u64, secs: u64, p: Duration) -> LoadResult {
        let mut latency = Histogram::new();
        for _ in 0..ok.min(1000) {
            latency.record(p);
        }
        LoadResult {
            ok,
            window: Duration::from_secs(secs),
            latency,
            ..LoadResult::default()
        }
    }

    fn row(key: &str, ok: u64, rss_mib: u64) -> Row {
        let mut row = Row::new(key, key, 32);
        row.closed = Some(result(ok, 1, Duration::from_micros(300)));
        row.open = Some(result(ok / 2, 1, Duration::from_micros(300)));
        row.add_rss(&[("site1".into(), rss_mib * 1024 * 1024)]);
        row
    }

    #[test]
    fn verdicts_follow_the_targets() {
        let limit = row("limit", 100_000, 5);
        for (ok, rss, expected) in [
            (85_000, 40, Verdict::Pass),
            (70_000, 40, Verdict::Fail),
            (85_000, 120, Verdict::Fail),
        ] {
            let mut r = row("get-one", ok, rss);
            judge(
                Scenario::GetOne,
                &mut r,
                &Evidence {
                    baseline: Some(&limit),
                    small_store: None,
                },
            );
            assert_eq!(r.verdict, expected, "{ok} req/s, {rss} MiB: {:?}", r.notes);
        }
        let mut writes = row("writes", 4_000, 40);
        judge(Scenario::Writes, &mut writes, &Evidence::default());
        assert_eq!(writes.verdict, Verdict::Fail);
        let mut unjudged = row("get-one", 90_000, 40);
        let mut missing = Row::new("limit", "limit", 32);
        missing.notes.push("not started".into());
        judge(
            Scenario::GetOne,
            &mut unjudged,
            &Evidence {
                baseline: Some(&missing),
                small_store: None,
            },
        );
        assert!(matches!(unjudged.verdict, Verdict::NotJudged(_)));
    }

    #[test]
    fn the_better_proxy_baseline_is_the_faster_measured_one() {
        let nginx = row("nginx", 15_000, 20);
        let haproxy = row("haproxy", 18_000, 20);
        let mut missing = Row::new("haproxy", "haproxy", 32);
        missing.notes.push("HAProxy is not installed".into());
        let limit = row("limit", 100_000, 5);
        let rows = vec![nginx.clone(), haproxy.clone(), missing, limit];
        for (candidates, expected) in [
            (vec![0, 1], Some(1)),
            (vec![1, 0], Some(1)),
            (vec![0, 2], Some(0)),
            (vec![2, 0], Some(0)),
            (vec![2], None),
            (vec![], None),
            // An index past the rows is passed over, not a panic.
            (vec![9, 0], Some(0)),
        ] {
            assert_eq!(
                better_baseline(&rows, &candidates),
                expected,
                "{candidates:?}"
            );
        }
        // A tie goes to the first named.
        let tied = vec![row("nginx", 15_000, 20), row("haproxy", 15_000, 20)];
        assert_eq!(better_baseline(&tied, &[0, 1]), Some(0));
        assert_eq!(better_baseline(&tied, &[1, 0]), Some(1));
    }

    #[test]
    fn remote_get_one_is_judged_against_the_better_proxy_on_throughput_and_p99() {
        let haproxy = row("haproxy", 20_000, 20);
        let judged = |ok: u64, p99: Duration| {
            let mut r = row("remote-get-one", ok, 40);
            r.open = Some(result(ok / 2, 1, p99));
            judge(
                Scenario::RemoteGetOne,
                &mut r,
                &Evidence {
                    baseline: Some(&haproxy),
                    small_store: None,
                },
            );
            r
        };
        let met = judged(21_000, Duration::from_micros(250));
        assert_eq!(met.verdict, Verdict::Pass, "{:?}", met.notes);
        let (ratio, of) = met.ratio.clone().expect("a ratio");
        assert!((ratio - 1.05).abs() < 1e-9);
        assert_eq!(of, "HAProxy");
        assert!(
            met.target.contains("better of nginx and HAProxy"),
            "{}",
            met.target
        );
        let slow = judged(19_000, Duration::from_micros(250));
        assert_eq!(slow.verdict, Verdict::Fail);
        assert!(
            slow.notes.iter().any(|n| n.contains("0.95x HAProxy")),
            "{:?}",
            slow.notes
        );
        let late = judged(21_000, Duration::from_millis(2));
        assert_eq!(late.verdict, Verdict::Fail);
        assert!(
            late.notes.iter().any(|n| n.contains("vs HAProxy")),
            "{:?}",
            late.notes
        );
        let mut unjudged = row("remote-get-one", 21_000, 40);
        judge(Scenario::RemoteGetOne, &mut unjudged, &Evidence::default());
        assert!(
            matches!(unjudged.verdict, Verdict::NotJudged(ref why) if why.contains("nginx or HAProxy"))
        );
    }

    #[test]
    fn many_clients_on_one_running_task_are_held_to_site1_memory() {
        let mut r = row("remote-running-1000", 20_000, 99);
        judge(Scenario::RemoteRunning1000, &mut r, &Evidence::default());
        assert_eq!(r.verdict, Verdict::Pass, "{:?}", r.notes);
        assert_eq!(r.target, "site1 RSS < 100 MiB, site2 too");
        let mut heavy = row("remote-running-1000", 20_000, 136);
        judge(
            Scenario::RemoteRunning1000,
            &mut heavy,
            &Evidence::default(),
        );
        assert_eq!(heavy.verdict, Verdict::Fail);
    }

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()), Some(s));
        }
        assert_eq!(Scenario::parse("nope"), None);
    }
}
