//! What one listener and one user may hold at once, so no client, user or site can take a
//! site for itself:
//!
//! - [`RequestBudget`]: requests in progress on one listener (the client API and the peer
//!   link each have their own). A request waits for a slot only as long as its deadline
//!   allows, then gets 503 `ServerBusy`; it never hangs. `/healthz`, `/readyz` and `/metrics`
//!   and held requests are outside it.
//! - [`HeldBudget`]: held requests (a `waitForChange` blocking read, a `/events` stream), per
//!   user and in total. They wait for minutes by design, so they have a budget of their own
//!   instead of occupying request slots: over it, 429 `TooManyRequests` for the user, 503
//!   `ServerBusy` for the site.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::layers::Deadline;

/// A queued request gives up this long before its deadline, so its answer is the clear 503
/// and not the deadline's 500.
const GIVE_UP_BEFORE_DEADLINE: Duration = Duration::from_millis(50);

/// Request slots of one listener.
pub(crate) struct RequestBudget {
    slots: Arc<Semaphore>,
    /// For the refusal's message: "requests on the client API".
    what: &'static str,
}

impl RequestBudget {
    pub(crate) fn new(slots: usize, what: &'static str) -> Arc<Self> {
        Arc::new(RequestBudget {
            slots: Arc::new(Semaphore::new(slots)),
            what,
        })
    }
}

/// Whether a request is held by design (a blocking read or an event stream): the cheap look
/// the layers take before routing. The handler counts it against the [`HeldBudget`].
pub(crate) fn is_held(req: &Request) -> bool {
    req.uri().path().ends_with("/events")
        || !sitegate_model::watch::requested_wait(req.uri().query()).is_zero()
}

/// The request budget as a layer (inside the deadline layer, which it reads).
pub(crate) async fn limit_requests(
    State(budget): State<Arc<RequestBudget>>,
    req: Request,
    next: Next,
) -> Response {
    let exempt = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") || is_held(&req);
    if exempt {
        return next.run(req).await;
    }
    let give_up = req
        .extensions()
        .get::<Deadline>()
        .map(|d| d.0.checked_sub(GIVE_UP_BEFORE_DEADLINE).unwrap_or(d.0));
    let acquire = budget.slots.clone().acquire_owned();
    let permit = match give_up {
        Some(at) => tokio::time::timeout_at(at.into(), acquire).await.ok(),
        None => Some(acquire.await),
    };
    match permit {
        Some(Ok(permit)) => {
            let response = next.run(req).await;
            drop(permit);
            response
        }
        _ => {
            metrics::counter!("sitegate_requests_refused_total", "budget" => budget.what)
                .increment(1);
            ApiError::Busy(budget.what).into_response()
        }
    }
}

/// Held requests, per user and in total. User names come from authenticated sessions, so
/// the map's keys are a bounded set (this site's users); an entry leaves with its last slot.
pub(crate) struct HeldBudget {
    per_user: usize,
    total: usize,
    held: Mutex<Held>,
    /// How long an event stream may last.
    pub(crate) max_stream: Duration,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_user: HashMap<String, usize>,
}

/// One held request's place in the budget; given back when dropped.
pub(crate) struct HeldSlot {
    budget: Arc<HeldBudget>,
    user: String,
    /// When the request started holding (for the stream lifetime).
    pub(crate) since: Instant,
}

impl HeldBudget {
    pub(crate) fn new(per_user: usize, total: usize, max_stream: Duration) -> Arc<Self> {
        Arc::new(HeldBudget {
            per_user,
            total,
            held: Mutex::new(Held::default()),
            max_stream,
        })
    }

    /// A slot for one held request of `user`, or why not: the user's own limit first (429),
    /// then the site's (503), so one user at their limit is told it is theirs.
    pub(crate) fn hold(self: &Arc<Self>, user: &str) -> Result<HeldSlot, ApiError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mine = held.by_user.get(user).copied().unwrap_or(0);
        if mine >= self.per_user {
            metrics::counter!("sitegate_requests_refused_total", "budget" => "held per user")
                .increment(1);
            return Err(ApiError::TooManyHeld {
                limit: self.per_user,
            });
        }
        if held.total >= self.total {
            metrics::counter!("sitegate_requests_refused_total", "budget" => "held").increment(1);
            return Err(ApiError::Busy("blocking reads and event streams"));
        }
        held.total += 1;
        *held.by_user.entry(user.to_owned()).or_insert(0) += 1;
        metrics::gauge!("sitegate_held_requests").set(held.total as f64);
        Ok(HeldSlot {
            budget: self.clone(),
            user: user.to_owned(),
            since: Instant::now(),
        })
    }

    /// Held requests open now, in total.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                held.by_user.remove(&self.user);
            }
        }
        metrics::gauge!("sitegate_held_requests").set(held.total as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_slots_are_counted_per_user_and_in_total_and_given_back() {
        let budget = HeldBudget::new(2, 3, Duration::from_secs(60));
        let a1 = budget.hold("alice").unwrap();
        let _a2 = budget.hold("alice").unwrap();
        assert!(matches!(
            budget.hold("alice"),
            Err(ApiError::TooManyHeld { limit: 2 })
        ));
        let _b1 = budget.hold("bob").unwrap();
        assert!(matches!(budget.hold("carol"), Err(ApiError::Busy(_))));
        assert_eq!(budget.in_use(), 3);
        drop(a1);
        assert_eq!(budget.in_use(), 2);
        let _c1 = budget.hold("carol").unwrap();
        // No entry outlives its last slot.
        drop(_c1);
        assert!(!budget.held.lock().unwrap().by_user.contains_key("carol"));
    }
}
