//! The health of one peer link: the circuit breaker and what `/sites` shows.
//!
//! Consecutive failures of the link itself (unreachable, timed out, unreadable answer) open
//! the circuit for `circuit_open_secs`: callers then fail fast with `Retry-After` instead of
//! each waiting out a connect timeout. A refused certificate does not count: it is a
//! configuration problem that retrying faster or slower does not change. Any success closes
//! the circuit (the probe finds one as soon as the peer is back). Pure state: the caller
//! passes the clock in, so the rules are tested without waiting.

use std::time::{Duration, Instant};

use sitegate_model::site::CircuitState;
use sitegate_model::ErrorEnvelope;

use super::error::PeerError;

/// What this site knows of one peer link.
#[derive(Default)]
pub(super) struct LinkHealth {
    pub(super) consecutive_failures: u32,
    open_until: Option<Instant>,
    pub(super) last_success: Option<i64>,
    pub(super) last_failure: Option<i64>,
    pub(super) last_error: Option<ErrorEnvelope>,
    pub(super) round_trip_ms: Option<f64>,
    pub(super) peer_cert_expiry: Option<i64>,
    pub(super) last_incoming: Option<i64>,
    pub(super) incoming_error: Option<(i64, ErrorEnvelope)>,
}

/// The breaker's settings (from `[peering]`).
#[derive(Clone, Copy, Debug)]
pub(super) struct BreakerRules {
    pub(super) failure_threshold: u32,
    pub(super) open_for: Duration,
}

impl LinkHealth {
    /// A request over the link was answered (whatever the status: the link works).
    pub(super) fn succeeded(&mut self, now_ms: i64, round_trip: Duration) {
        self.consecutive_failures = 0;
        self.open_until = None;
        self.last_success = Some(now_ms);
        self.last_error = None;
        self.round_trip_ms = Some(round_trip.as_secs_f64() * 1000.0);
    }

    /// A request over the link failed; returns whether this failure opened the circuit
    /// (it was closed before).
    pub(super) fn failed(
        &mut self,
        error: &PeerError,
        rules: BreakerRules,
        now: Instant,
        now_ms: i64,
    ) -> bool {
        self.last_failure = Some(now_ms);
        self.last_error = Some(ErrorEnvelope::new(error.code(), error.message(), vec![]));
        if !error.counts_for_circuit() {
            return false;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures < rules.failure_threshold {
            return false;
        }
        let was_closed = self.open_until.is_none();
        self.open_until = Some(now + rules.open_for);
        was_closed
    }

    /// `Some(wait)` while the circuit is open: how long callers should wait.
    pub(super) fn circuit_wait(&self, now: Instant) -> Option<Duration> {
        self.open_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Open while failing fast; half open once the open time is over and until a request
    /// (or the probe) succeeds.
    pub(super) fn circuit(&self, now: Instant) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(until) if until > now => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Whether `/sites` reports the outgoing link as failing.
    pub(super) fn failing(&self, now: Instant) -> bool {
        self.last_failure > self.last_success || self.circuit(now) != CircuitState::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: BreakerRules = BreakerRules {
        failure_threshold: 3,
        open_for: Duration::from_secs(10),
    };

    fn unreachable() -> PeerError {
        PeerError::Unreachable {
            site: "site2".into(),
            detail: "connection refused".into(),
        }
    }

    #[test]
    fn opens_after_the_threshold_and_fails_fast_for_its_time() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        assert!(!h.failed(&unreachable(), RULES, t0, 1));
        assert!(!h.failed(&unreachable(), RULES, t0, 2));
        assert_eq!(h.circuit(t0), CircuitState::Closed);
        assert!(h.circuit_wait(t0).is_none());
        assert!(h.failing(t0), "a failure after no success is failing");
        assert!(h.failed(&unreachable(), RULES, t0, 3), "the third opens it");
        assert_eq!(h.circuit(t0), CircuitState::Open);
        assert_eq!(h.circuit_wait(t0), Some(Duration::from_secs(10)));
        let later = t0 + Duration::from_secs(4);
        assert_eq!(h.circuit_wait(later), Some(Duration::from_secs(6)));
        // A failure while open extends it but does not count as opening again.
        assert!(!h.failed(&unreachable(), RULES, later, 4));
        assert_eq!(h.circuit_wait(later), Some(Duration::from_secs(10)));
        // Past its time: half open, no longer failing fast, still reported failing.
        let after = later + Duration::from_secs(11);
        assert_eq!(h.circuit(after), CircuitState::HalfOpen);
        assert!(h.circuit_wait(after).is_none());
        assert!(h.failing(after));
    }

    #[test]
    fn a_success_closes_it_and_resets_the_count() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        for i in 0..3 {
            h.failed(&unreachable(), RULES, t0, i);
        }
        assert_eq!(h.circuit(t0), CircuitState::Open);
        h.succeeded(10, Duration::from_millis(3));
        assert_eq!(h.circuit(t0), CircuitState::Closed);
        assert_eq!(h.consecutive_failures, 0);
        assert!(h.last_error.is_none());
        assert!(!h.failing(t0));
        assert_eq!(h.round_trip_ms, Some(3.0));
        // Counting starts again from zero.
        assert!(!h.failed(&unreachable(), RULES, t0, 11));
        assert!(!h.failed(&unreachable(), RULES, t0, 12));
        assert_eq!(h.circuit(t0), CircuitState::Closed);
    }

    #[test]
    fn certificate_refusals_never_open_it_but_are_reported() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        let refused = PeerError::RefusedOurCertificate {
            site: "site2".into(),
            detail: "bad certificate".into(),
        };
        for i in 0..10 {
            assert!(!h.failed(&refused, RULES, t0, i));
        }
        assert_eq!(h.circuit(t0), CircuitState::Closed);
        assert_eq!(h.consecutive_failures, 0);
        let reported = h.last_error.as_ref().map(|e| e.code.clone());
        assert_eq!(reported.as_deref(), Some("RemoteAuthenticationFailure"));
        assert!(h.failing(t0));
    }

    #[test]
    fn timeouts_and_bad_answers_count() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        h.failed(&PeerError::Timeout { site: "s".into() }, RULES, t0, 1);
        h.failed(
            &PeerError::BadAnswer {
                site: "s".into(),
                detail: String::new(),
            },
            RULES,
            t0,
            2,
        );
        assert!(h.failed(&PeerError::Timeout { site: "s".into() }, RULES, t0, 3));
    }
}
