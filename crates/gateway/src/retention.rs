//! Task retention: removing finished tasks past `[store] task_retention`, and the store's
//! size on `/metrics`.
//!
//! Why in small, paced batches: the embedded store has one writer thread, shared with every
//! client's writes, and PostgreSQL row locks are shared with every update. A batch holds
//! either for a few milliseconds; between batches the purger sleeps several times as long as
//! the batch took, so a purge of a million tasks is spread out and the writes of users never
//! wait behind more than one batch. Space is then given back a few pages at a time, paced the
//! same way.
//!
//! On PostgreSQL every replica runs this loop; the store lets one of them purge at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sitegate_store::{now_millis, PurgeOutcome, Store};

/// Tasks removed per batch.
const BATCH: u32 = 32;
/// Pages given back per step (4 KiB each).
const RECLAIM_PAGES: u32 = 128;
/// The least pause between two batches; otherwise a multiple of the batch's own time.
const MIN_PAUSE: Duration = Duration::from_millis(10);
/// How many times a batch's own duration the purger then leaves the store to others.
const PAUSE_FACTOR: u32 = 4;
/// How often the store's size is read when nothing is purged.
const SIZE_EVERY: Duration = Duration::from_secs(60);

/// How often a sweep looks for tasks past their retention: a quarter of it, between 1 s and
/// a minute, so a task is removed at most a little after its time.
fn sweep_interval(keep: Option<Duration>) -> Duration {
    match keep {
        Some(keep) => (keep / 4).clamp(Duration::from_secs(1), SIZE_EVERY),
        None => SIZE_EVERY,
    }
}

/// Runs for the life of the site: sweeps when a retention is set, and keeps
/// `sitegate_store_size_bytes` current either way.
pub(crate) async fn keep_store(store: Arc<dyn Store>, keep: Option<Duration>) {
    metrics::gauge!("sitegate_task_retention_seconds").set(keep.map_or(0.0, |k| k.as_secs_f64()));
    let mut tick = tokio::time::interval(sweep_interval(keep));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The size is shown from the start, not only once the first sweep (which may take long
    // on a big backlog) is over.
    record_size(store.as_ref()).await;
    loop {
        tick.tick().await;
        if let Some(keep) = keep {
            sweep(store.as_ref(), keep).await;
        }
        record_size(store.as_ref()).await;
    }
}

async fn record_size(store: &dyn Store) {
    match store.size_bytes().await {
        Ok(bytes) => metrics::gauge!("sitegate_store_size_bytes").set(bytes as f64),
        Err(e) => tracing::warn!(error = %e, "could not read the store's size"),
    }
}

/// Removes every finished task that ended more than `keep` ago, batch by batch, then gives
/// the space back.
async fn sweep(store: &dyn Store, keep: Duration) {
    let cutoff = now_millis().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let started = Instant::now();
    let mut removed = 0u64;
    loop {
        let batch_started = Instant::now();
        match store.purge_finished(cutoff, BATCH).await {
            Ok(PurgeOutcome::Removed(n)) => {
                metrics::counter!("sitegate_tasks_purged_total").increment(n);
                removed += n;
                if n < u64::from(BATCH) {
                    break;
                }
                pause_after(batch_started).await;
            }
            // Another replica is at it; the next sweep looks again.
            Ok(PurgeOutcome::OtherReplicaPurging) => break,
            Err(e) => {
                tracing::warn!(error = %e, "could not remove finished tasks past their retention");
                return;
            }
        }
    }
    if removed == 0 {
        return;
    }
    loop {
        let step_started = Instant::now();
        match store.reclaim_space(RECLAIM_PAGES).await {
            Ok(0) => break,
            Ok(_) => pause_after(step_started).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not give the store's free space back");
                break;
            }
        }
    }
    tracing::info!(
        tasks = removed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        retention = %humantime_like(keep),
        "removed finished tasks past their retention"
    );
}

async fn pause_after(step_started: Instant) {
    tokio::time::sleep((step_started.elapsed() * PAUSE_FACTOR).max(MIN_PAUSE)).await;
}

/// The retention as configured (`30days`), for the log line.
fn humantime_like(keep: Duration) -> String {
    sitegate_model::config::Retention::keep_for(keep).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_come_often_enough_and_not_too_often() {
        assert_eq!(sweep_interval(None), SIZE_EVERY);
        assert_eq!(
            sweep_interval(Some(Duration::from_secs(2))),
            Duration::from_secs(1)
        );
        assert_eq!(
            sweep_interval(Some(Duration::from_secs(20))),
            Duration::from_secs(5)
        );
        assert_eq!(
            sweep_interval(Some(Duration::from_secs(30 * 86_400))),
            SIZE_EVERY
        );
    }
}
