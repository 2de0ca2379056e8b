//! The handlers, one module per resource. Each takes the validated pieces of its request
//! (caller, path, query, body), asks the [`crate::federation::Federation`] where to answer, and
//! calls the store or the peer's handle; every failure is an [`crate::ApiError`]. A handler
//! that resolved a site attaches it to its answer ([`crate::federation::TargetSite`]).

pub(crate) mod diagnostics;
pub(crate) mod ops;
pub(crate) mod sessions;
pub(crate) mod sites;
pub(crate) mod tasks;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sitegate_store::Store;

use crate::auth::SessionManager;
use crate::federation::Federation;

/// Unknown query parameter names are ignored, as the original API ignores them; an operator
/// sees them in a debug line and a counter (no label: the names come from callers).
pub(crate) fn note_ignored_parameters(names: &[String]) {
    if !names.is_empty() {
        tracing::debug!(ignored = ?names, "ignored unknown query parameters");
        metrics::counter!("sitegate_ignored_query_parameters_total").increment(names.len() as u64);
    }
}

/// What handlers share, behind one `Arc`: axum clones the state for every extractor and
/// layer that takes it, and one reference count is cheaper than one per field (a clone
/// showed up in profiles of a proxied read).
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub(crate) fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

/// The parts of [`AppState`].
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) sessions: Arc<SessionManager>,
    pub(crate) federation: Arc<Federation>,
    pub(crate) readiness: Arc<Readiness>,
    /// Blocking reads and event streams waiting for a task to change.
    pub(crate) watch: crate::watch::SharedWatch,
    /// The instance and process facts `/diagnostics` reports.
    pub(crate) build: Arc<diagnostics::BuildFacts>,
    /// Blocking reads and event streams open, per user and in total.
    pub(crate) held: Arc<crate::budget::HeldBudget>,
}

/// Whether this process should receive new traffic; set to draining on shutdown so load
/// balancers stop sending before the listener closes.
#[derive(Default)]
pub(crate) struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
