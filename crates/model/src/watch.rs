//! Blocking reads: `GET /tasks/{id}?waitForChange=true&timeout=30s&lastUpdated=T` answers as
//! soon as the task changed after `T`, or at the timeout with the task as it is (Consul's
//! blocking queries, for tasks). This module is the query's wire form; waiting is the
//! gateway's business.

use std::time::Duration;

use crate::error::echo;
use crate::query::parse_pairs;
use crate::{EpochMillis, ModelError};

/// `timeout` when none is given.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest wait a caller may ask for; longer asks are clamped, as Consul does, so a
/// client written for a larger limit still works.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The query of `GET /tasks/{id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetOneQuery {
    pub site: Option<String>,
    pub wait: Option<Wait>,
    /// Parameter names ignored (see `query::QueryPairs::ignored`).
    pub ignored: Vec<String>,
}

/// Answer once the task's `lastUpdated` is after `last_updated`, or after `timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    pub last_updated: EpochMillis,
    pub timeout: Duration,
}

impl GetOneQuery {
    pub fn parse(raw: Option<&str>) -> Result<GetOneQuery, ModelError> {
        let parsed = parse_pairs(
            raw,
            &["site", "waitForChange", "timeout", "lastUpdated"],
            &[],
        )?;
        let pairs = &parsed.pairs;
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let wait = match get("waitForChange") {
            None | Some("false") => None,
            Some("true") => Some(()),
            Some(other) => {
                return Err(ModelError::invalid(format!(
                    "waitForChange must be true or false, not '{}'",
                    echo(other)
                )))
            }
        };
        let wait = match wait {
            None => {
                if get("timeout").is_some() || get("lastUpdated").is_some() {
                    return Err(ModelError::invalid(
                        "timeout and lastUpdated are only meaningful with waitForChange=true",
                    ));
                }
                None
            }
            Some(()) => {
                let raw_last = get("lastUpdated").ok_or_else(|| {
                    ModelError::invalid(
                        "waitForChange=true needs lastUpdated: the lastUpdated of the task as \
                         you last saw it (epoch milliseconds)",
                    )
                })?;
                let last_updated = raw_last.parse::<EpochMillis>().map_err(|_| {
                    ModelError::invalid(format!(
                        "lastUpdated must be epoch milliseconds, not '{}'",
                        echo(raw_last)
                    ))
                })?;
                let timeout = match get("timeout") {
                    None => DEFAULT_WAIT,
                    Some(t) => parse_timeout(t)?.min(MAX_WAIT),
                };
                Some(Wait {
                    last_updated,
                    timeout,
                })
            }
        };
        Ok(GetOneQuery {
            site: get("site").map(str::to_owned),
            wait,
            ignored: parsed.ignored.clone(),
        })
    }

    /// The query to send a peer: the same wait, without `site`.
    pub fn to_query_string_without_site(&self) -> String {
        match self.wait {
            None => String::new(),
            Some(w) => format!(
                "waitForChange=true&timeout={}ms&lastUpdated={}",
                w.timeout.as_millis(),
                w.last_updated
            ),
        }
    }
}

/// `30s`, `500ms`, `1m`, or a plain number of seconds.
pub fn parse_timeout(raw: &str) -> Result<Duration, ModelError> {
    let bad = || {
        ModelError::invalid(format!(
            "timeout must be a duration such as 30s, 500ms or 1m, not '{}'",
            echo(raw)
        ))
    };
    let (digits, unit_ms) = if let Some(d) = raw.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = raw.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = raw.strip_suffix('m') {
        (d, 60_000)
    } else {
        (raw, 1000)
    };
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Duration::from_millis(n * unit_ms))
}

/// How much longer than usual a request may take because it asks to wait: a cheap look at
/// the raw query for the deadline layer, which runs before routing. Whether the query is
/// valid is the handler's to say; this only never gives more than `MAX_WAIT`.
pub fn requested_wait(raw_query: Option<&str>) -> Duration {
    let Some(raw) = raw_query else {
        return Duration::ZERO;
    };
    if !raw.split('&').any(|p| p == "waitForChange=true") {
        return Duration::ZERO;
    }
    raw.split('&')
        .find_map(|p| p.strip_prefix("timeout="))
        .map_or(Ok(DEFAULT_WAIT), parse_timeout)
        .map_or(DEFAULT_WAIT, |t| t.min(MAX_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_waits() {
        let q = GetOneQuery::parse(Some("site=s2&waitForChange=true&timeout=5s&lastUpdated=17"))
            .expect("valid");
        assert_eq!(q.site.as_deref(), Some("s2"));
        assert_eq!(
            q.wait,
            Some(Wait {
                last_updated: 17,
                timeout: Duration::from_secs(5)
            })
        );
        assert_eq!(
            q.to_query_string_without_site(),
            "waitForChange=true&timeout=5000ms&lastUpdated=17"
        );
        let again = GetOneQuery::parse(Some(&q.to_query_string_without_site())).expect("valid");
        assert_eq!(again.wait, q.wait);
        assert_eq!(GetOneQuery::parse(None).expect("valid").wait, None);
        let long = GetOneQuery::parse(Some("waitForChange=true&timeout=10m&lastUpdated=1"))
            .expect("clamped");
        assert_eq!(long.wait.map(|w| w.timeout), Some(MAX_WAIT));
    }

    #[test]
    fn refuses_bad_waits() {
        for bad in [
            "waitForChange=yes&lastUpdated=1",
            "waitForChange=true",
            "waitForChange=true&lastUpdated=x",
            "waitForChange=true&lastUpdated=1&timeout=-1s",
            "waitForChange=true&lastUpdated=1&timeout=1h",
            "waitForChange=true&lastUpdated=1&timeout=99999999999",
            "timeout=5s",
            "lastUpdated=5",
            "waitForChange=true&lastUpdated=1&lastUpdated=2",
        ] {
            assert!(GetOneQuery::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn requested_wait_is_bounded() {
        assert_eq!(requested_wait(None), Duration::ZERO);
        assert_eq!(requested_wait(Some("site=a")), Duration::ZERO);
        assert_eq!(
            requested_wait(Some("waitForChange=true&lastUpdated=1")),
            DEFAULT_WAIT
        );
        assert_eq!(
            requested_wait(Some("waitForChange=true&timeout=2s")),
            Duration::from_secs(2)
        );
        assert_eq!(
            requested_wait(Some("waitForChange=true&timeout=100m")),
            MAX_WAIT
        );
    }
}
