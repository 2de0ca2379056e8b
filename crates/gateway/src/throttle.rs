//! Login throttling: failed logins are counted per user name and per client address, and a
//! name or address with too many of them is refused for a while, before its password is
//! checked at all.
//!
//! The rules, with the defaults of `[auth]`:
//! - Failures are counted in a sliding window (`login_failure_window_secs`, 300 s).
//! - A user name reaching `login_failures_per_user` (5) failures in the window is locked for
//!   `login_lockout_secs` (30 s); an address reaching `login_failures_per_address` (20) is
//!   locked the same way. The failure that reaches the limit is already answered 429.
//! - Each further lockout of the same name or address doubles the previous one, up to
//!   `login_lockout_max_secs` (900 s): a guesser gets about 20 tries an hour at one name. A
//!   name or address with no failure for the window plus the longest lockout starts over.
//! - While locked, every attempt is refused with the time left (`Retry-After`), whether its
//!   password is right or not, and is not counted. A successful login forgets its user name's
//!   failures (not its address's: an attacker's own account must not reset its address).
//! - Unknown user names are counted like known ones, so a 429 says nothing about which names
//!   exist. Names that cannot be user names at all are counted only against the address.
//!
//! Addresses are IPv4 addresses or IPv6 /64 prefixes (one host usually owns a whole /64).
//! Requests arriving over the peer link carry the peer site's address, shared by all its
//! users, so only their user name is counted. Behind a load balancer every client shares the
//! balancer's address: turn per-address throttling off there (`login_failures_per_address =
//! 0`) and throttle at the balancer.
//!
//! State lives in this process only, deliberately: keeping it in the shared store would turn
//! every failed guess into a database write. With N replicas a guesser gets up to N times the
//! tries. Memory is bounded: each kind keeps at most [`MAX_TRACKED`] entries, evicting first
//! what has expired, then the unlocked entry idle longest.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sitegate_model::config::AuthConfig;
use sitegate_model::session::validate_user_name;

/// Most user names, and most addresses, tracked at once. An entry holds at most its limit of
/// failure times, so this bounds the throttle's memory to a few megabytes.
pub(crate) const MAX_TRACKED: usize = 10_000;

/// When failures lock a key, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThrottleRule {
    /// Failures within `window` that lock the key; 0 turns this rule off.
    pub(crate) max_failures: u32,
    pub(crate) window: Duration,
    /// The first lockout; each further one doubles.
    pub(crate) first_lockout: Duration,
    pub(crate) max_lockout: Duration,
}

/// The failures of one user name or address.
#[derive(Debug)]
struct Record {
    /// Times of the failures since the last lockout, oldest first; at most `max_failures`.
    failures: VecDeque<Instant>,
    /// Refused until then.
    locked_until: Option<Instant>,
    /// Lockouts so far (the next one lasts `first_lockout * 2^lockouts`).
    lockouts: u32,
    /// The last failure or the end of the last lockout, whichever is later: the record is
    /// forgotten a window plus the longest lockout after it.
    last_event: Instant,
}

impl Record {
    fn locked_for(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// Failure counters for one kind of key.
struct Limiter<K> {
    rule: ThrottleRule,
    records: Mutex<HashMap<K, Record>>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone> Limiter<K> {
    fn new(rule: ThrottleRule, capacity: usize) -> Option<Self> {
        (rule.max_failures > 0).then(|| Limiter {
            rule,
            records: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<K, Record>> {
        // The map stays consistent even if a holder panicked: every update is a few field
        // writes with nothing that can panic between them.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget_after(&self) -> Duration {
        self.rule.window + self.rule.max_lockout
    }

    fn is_stale(&self, record: &Record, now: Instant) -> bool {
        record.locked_for(now).is_none()
            && now.saturating_duration_since(record.last_event) >= self.forget_after()
    }

    fn locked_for(&self, key: &K, now: Instant) -> Option<Duration> {
        self.records().get(key).and_then(|r| r.locked_for(now))
    }

    /// Counts a failure; returns the lockout it started, if it started one.
    fn fail(&self, key: &K, now: Instant) -> Option<Duration> {
        let mut records = self.records();
        if !records.contains_key(key) && records.len() >= self.capacity {
            self.make_room(&mut records, now);
        }
        let rule = self.rule;
        let record = records.entry(key.clone()).or_insert_with(|| Record {
            failures: VecDeque::new(),
            locked_until: None,
            lockouts: 0,
            last_event: now,
        });
        if self.is_stale(record, now) {
            record.failures.clear();
            record.lockouts = 0;
        }
        record.last_event = record.last_event.max(now);
        // Attempts refused while locked never get here; one that was already past the check
        // when the lock began still counts toward the next.
        while record
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= rule.window)
        {
            record.failures.pop_front();
        }
        record.failures.push_back(now);
        if record.failures.len() < rule.max_failures as usize {
            return None;
        }
        let factor = 1u32
            .checked_shl(record.lockouts.min(31))
            .unwrap_or(u32::MAX);
        let lockout = rule
            .first_lockout
            .saturating_mul(factor)
            .min(rule.max_lockout);
        record.failures.clear();
        record.lockouts = record.lockouts.saturating_add(1);
        let until = now + lockout;
        record.locked_until = Some(until);
        record.last_event = until;
        Some(lockout)
    }

    fn forget(&self, key: &K) {
        self.records().remove(key);
    }

    /// Drops every stale record; if none was, the unlocked record idle longest; if all are
    /// locked, the one whose lock ends first. A flood of new keys can so shorten a lockout
    /// only after it has filled the table with locked keys of its own.
    fn make_room(&self, records: &mut HashMap<K, Record>, now: Instant) {
        let before = records.len();
        records.retain(|_, r| !self.is_stale(r, now));
        if records.len() < before {
            return;
        }
        let victim = records
            .iter()
            .min_by_key(|(_, r)| (r.locked_for(now).is_some(), r.last_event))
            .map(|(k, _)| k.clone());
        if let Some(victim) = victim {
            records.remove(&victim);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.records().len()
    }
}

/// The throttle key of a client address: IPv4 addresses as they are, IPv6 by their /64.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AddressKey {
    V4(u32),
    V6Prefix(u64),
    /// A peer site relaying logins (credentials extensions): one site, one address. Only
    /// configured peers reach the peer link, so these keys are a bounded set.
    Site(String),
}

impl From<IpAddr> for AddressKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(u32::from(v4)),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressKey::V4(v4) => write!(f, "{}", std::net::Ipv4Addr::from(*v4)),
            AddressKey::V6Prefix(prefix) => write!(
                f,
                "{}/64",
                std::net::Ipv6Addr::from(u128::from(*prefix) << 64)
            ),
            AddressKey::Site(site) => write!(f, "site {site}"),
        }
    }
}

/// Refused: too many failed logins; try again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Locked {
    pub(crate) retry_after: Duration,
}

/// The per-user and per-address failure counters of one process.
pub(crate) struct LoginThrottle {
    per_user: Option<Limiter<String>>,
    per_address: Option<Limiter<AddressKey>>,
}

impl LoginThrottle {
    pub(crate) fn new(per_user: ThrottleRule, per_address: ThrottleRule, capacity: usize) -> Self {
        LoginThrottle {
            per_user: Limiter::new(per_user, capacity),
            per_address: Limiter::new(per_address, capacity),
        }
    }

    /// The throttle `[auth]` asks for.
    pub(crate) fn from_config(auth: &AuthConfig) -> Self {
        let rule = |max_failures| ThrottleRule {
            max_failures,
            window: Duration::from_secs(auth.login_failure_window_secs),
            first_lockout: Duration::from_secs(auth.login_lockout_secs),
            max_lockout: Duration::from_secs(auth.login_lockout_max_secs),
        };
        LoginThrottle::new(
            rule(auth.login_failures_per_user),
            rule(auth.login_failures_per_address),
            MAX_TRACKED,
        )
    }

    /// No throttling at all (benchmarks and tests of other things).
    pub(crate) fn off() -> Self {
        LoginThrottle {
            per_user: None,
            per_address: None,
        }
    }

    /// The user name's key, if it could name a user at all.
    fn user_key(user: &str) -> Option<String> {
        validate_user_name(user).ok().map(|()| user.to_owned())
    }

    /// Whether a login attempt may go on to the password check.
    pub(crate) fn check(
        &self,
        user: &str,
        address: Option<&AddressKey>,
        now: Instant,
    ) -> Result<(), Locked> {
        let by_user = self
            .per_user
            .as_ref()
            .zip(Self::user_key(user))
            .and_then(|(l, key)| l.locked_for(&key, now));
        let by_address = self
            .per_address
            .as_ref()
            .zip(address)
            .and_then(|(l, key)| l.locked_for(key, now));
        match by_user.max(by_address) {
            Some(retry_after) => Err(Locked { retry_after }),
            None => Ok(()),
        }
    }

    /// Counts a failed attempt against the name and the address; returns the lockout it
    /// started, if it started one (the longer, if both).
    pub(crate) fn record_failure(
        &self,
        user: &str,
        address: Option<&AddressKey>,
        now: Instant,
    ) -> Option<Locked> {
        let by_user = self
            .per_user
            .as_ref()
            .zip(Self::user_key(user))
            .and_then(|(l, key)| l.fail(&key, now));
        let by_address = self
            .per_address
            .as_ref()
            .zip(address)
            .and_then(|(l, key)| l.fail(key, now));
        if let Some(lockout) = by_user {
            tracing::warn!(
                user,
                lockout_secs = lockout.as_secs(),
                "too many failed logins for this user name: locked"
            );
        }
        if let (Some(lockout), Some(key)) = (by_address, address) {
            tracing::warn!(address = %key, lockout_secs = lockout.as_secs(), "too many failed logins from this address: locked");
        }
        by_user
            .max(by_address)
            .map(|retry_after| Locked { retry_after })
    }

    /// The key of credentials extensions by local user `user` to peer `site`: a name no user
    /// can have (it has a space), so it never locks anyone's own login.
    fn extension_key(user: &str, site: &str) -> String {
        format!("extend {user}@{site}")
    }

    /// Whether `user` may try a credentials extension to `site` now.
    pub(crate) fn check_extension(
        &self,
        user: &str,
        site: &str,
        now: Instant,
    ) -> Result<(), Locked> {
        match self
            .per_user
            .as_ref()
            .and_then(|l| l.locked_for(&Self::extension_key(user, site), now))
        {
            Some(retry_after) => Err(Locked { retry_after }),
            None => Ok(()),
        }
    }

    /// Counts a refused credentials extension; the lockout it started, if any.
    pub(crate) fn record_extension_failure(
        &self,
        user: &str,
        site: &str,
        now: Instant,
    ) -> Option<Locked> {
        let lockout = self
            .per_user
            .as_ref()
            .and_then(|l| l.fail(&Self::extension_key(user, site), now))?;
        tracing::warn!(
            user,
            peer = site,
            lockout_secs = lockout.as_secs(),
            "too many refused credentials extensions: locked"
        );
        Some(Locked {
            retry_after: lockout,
        })
    }

    pub(crate) fn record_extension_success(&self, user: &str, site: &str) {
        if let Some(limiter) = &self.per_user {
            limiter.forget(&Self::extension_key(user, site));
        }
    }

    /// Forgets the user name's failures and lockouts after a successful login.
    pub(crate) fn record_success(&self, user: &str) {
        if let (Some(limiter), Some(key)) = (&self.per_user, Self::user_key(user)) {
            limiter.forget(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(max_failures: u32) -> ThrottleRule {
        ThrottleRule {
            max_failures,
            window: Duration::from_secs(300),
            first_lockout: Duration::from_secs(30),
            max_lockout: Duration::from_secs(900),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn ip(text: &str) -> Option<&'static AddressKey> {
        // Leaked: a few bytes per test, for keys that read like the addresses they stand for.
        text.parse::<IpAddr>()
            .ok()
            .map(|a| &*Box::leak(Box::new(AddressKey::from(a))))
    }

    #[test]
    fn a_relaying_site_counts_as_one_address_and_extensions_lock_only_themselves() {
        let t = LoginThrottle::new(rule(100), rule(3), 1000);
        let now = Instant::now();
        let site2 = AddressKey::Site("site2".into());
        for user in ["a", "b"] {
            assert_eq!(t.record_failure(user, Some(&site2), now), None);
        }
        assert!(t.record_failure("c", Some(&site2), now).is_some());
        assert!(
            t.check("d", Some(&site2), now).is_err(),
            "the relaying site is locked"
        );
        assert!(t
            .check("d", Some(&AddressKey::Site("site3".into())), now)
            .is_ok());
        // Refused extensions of alice to site2 lock those extensions, not alice's own login.
        let t = LoginThrottle::new(rule(2), rule(100), 1000);
        assert!(t.record_extension_failure("alice", "site2", now).is_none());
        assert!(t.record_extension_failure("alice", "site2", now).is_some());
        assert!(t.check_extension("alice", "site2", now).is_err());
        assert!(t.check_extension("alice", "site3", now).is_ok());
        assert!(t.check("alice", None, now).is_ok());
        t.record_extension_success("alice", "site2");
        assert!(t.check_extension("alice", "site2", now).is_ok());
    }

    #[test]
    fn the_failure_reaching_the_limit_locks_the_user_for_the_first_lockout() {
        let t = LoginThrottle::new(rule(5), rule(0), 100);
        let now = Instant::now();
        for i in 0..4 {
            assert_eq!(t.record_failure("alice", None, now + i * SECOND), None);
            assert!(t.check("alice", None, now + i * SECOND).is_ok());
        }
        let locked = t.record_failure("alice", None, now + 4 * SECOND);
        assert_eq!(locked.map(|l| l.retry_after), Some(30 * SECOND));
        assert_eq!(
            t.check("alice", None, now + 14 * SECOND),
            Err(Locked {
                retry_after: 20 * SECOND
            })
        );
        // Other names are not affected; the lock ends on time.
        assert!(t.check("bob", None, now + 14 * SECOND).is_ok());
        assert!(t.check("alice", None, now + 34 * SECOND).is_ok());
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let t = LoginThrottle::new(rule(3), rule(0), 100);
        let now = Instant::now();
        // Two failures every 301 s never make three within 300 s.
        for i in 0..10u32 {
            let at = now + i * 301 * SECOND;
            assert_eq!(t.record_failure("alice", None, at), None);
            assert_eq!(t.record_failure("alice", None, at + SECOND), None);
        }
    }

    #[test]
    fn each_further_lockout_doubles_up_to_the_maximum() {
        let t = LoginThrottle::new(rule(2), rule(0), 100);
        let mut now = Instant::now();
        let mut lockouts = Vec::new();
        for _ in 0..8 {
            assert_eq!(t.record_failure("alice", None, now), None);
            let locked = t
                .record_failure("alice", None, now)
                .expect("the second failure locks");
            lockouts.push(locked.retry_after.as_secs());
            now += locked.retry_after;
        }
        assert_eq!(lockouts, [30, 60, 120, 240, 480, 900, 900, 900]);
        // A long quiet spell (window + longest lockout) starts over.
        now += Duration::from_secs(1200);
        assert_eq!(t.record_failure("alice", None, now), None);
        assert_eq!(
            t.record_failure("alice", None, now).map(|l| l.retry_after),
            Some(30 * SECOND)
        );
    }

    #[test]
    fn a_success_forgets_the_user_but_not_the_address() {
        let t = LoginThrottle::new(rule(3), rule(5), 100);
        let now = Instant::now();
        let from = ip("192.0.2.7");
        for _ in 0..2 {
            t.record_failure("alice", from, now);
        }
        t.record_success("alice");
        assert_eq!(t.record_failure("alice", from, now), None);
        assert_eq!(t.record_failure("alice", from, now), None);
        // Five failures from the address in all: the address is locked, for every name.
        assert!(t.record_failure("bob", from, now).is_some());
        assert!(t.check("carol", from, now).is_err());
        assert!(t.check("carol", ip("192.0.2.8"), now).is_ok());
    }

    #[test]
    fn addresses_are_keyed_by_ipv4_and_ipv6_slash_64() {
        let t = LoginThrottle::new(rule(0), rule(2), 100);
        let now = Instant::now();
        t.record_failure("a", ip("2001:db8:1:2::1"), now);
        assert!(t
            .record_failure("b", ip("2001:db8:1:2:ffff::9"), now)
            .is_some());
        assert!(t.check("c", ip("2001:db8:1:2::77"), now).is_err());
        assert!(t.check("c", ip("2001:db8:1:3::1"), now).is_ok());
        t.record_failure("a", ip("198.51.100.1"), now);
        assert!(t
            .record_failure("a", ip("::ffff:198.51.100.1"), now)
            .is_some());
        assert!(t.check("a", ip("198.51.100.1"), now).is_err());
    }

    #[test]
    fn names_that_cannot_be_users_count_only_against_the_address() {
        let t = LoginThrottle::new(rule(1), rule(3), 100);
        let now = Instant::now();
        let long = "x".repeat(100_000);
        assert_eq!(t.record_failure(&long, None, now), None);
        assert_eq!(t.record_failure("bad name", None, now), None);
        assert!(t.check(&long, None, now).is_ok());
        assert_eq!(t.per_user.as_ref().map(Limiter::len), Some(0));
    }

    #[test]
    fn zero_turns_a_rule_off() {
        let t = LoginThrottle::new(rule(0), rule(0), 100);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(t.record_failure("alice", ip("192.0.2.1"), now), None);
        }
        assert!(t.check("alice", ip("192.0.2.1"), now).is_ok());
        let off = LoginThrottle::off();
        assert_eq!(off.record_failure("alice", ip("192.0.2.1"), now), None);
    }

    #[test]
    fn memory_is_bounded_and_locked_entries_are_evicted_last() {
        let t = LoginThrottle::new(rule(2), rule(0), 10);
        let now = Instant::now();
        // A locked victim, then a flood of names with one failure each.
        t.record_failure("victim", None, now);
        assert!(t.record_failure("victim", None, now).is_some());
        for i in 0..1000 {
            t.record_failure(&format!("spray{i}"), None, now + SECOND);
            let len = t.per_user.as_ref().map_or(0, Limiter::len);
            assert!(len <= 10, "{len} entries");
        }
        assert!(t.check("victim", None, now + 2 * SECOND).is_err());
        // Stale entries go first.
        let later = now + Duration::from_secs(3600);
        t.record_failure("fresh", None, later);
        assert_eq!(t.per_user.as_ref().map(Limiter::len), Some(1));
    }
}
