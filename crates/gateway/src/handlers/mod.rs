//! The handlers, one module per resource. Each takes the validated pieces of its request
//! (caller, path, query, body), asks the [`crate::sites::SiteResolver`] where to answer, and
//! calls the store; every failure is an [`crate::ApiError`].

pub mod forward;
pub mod ops;
pub mod sessions;
pub mod sites;
pub mod tasks;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sitegate_store::Store;

use crate::auth::SessionManager;
use crate::sites::SiteResolver;

/// What handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub sessions: Arc<SessionManager>,
    pub resolver: Arc<SiteResolver>,
    pub readiness: Arc<Readiness>,
    /// Blocking reads and event streams waiting for a task to change.
    pub watch: crate::watch::SharedWatch,
}

/// Whether this process should receive new traffic; set to draining on shutdown so load
/// balancers stop sending before the listener closes.
#[derive(Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
