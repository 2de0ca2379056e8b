//! Waiting for a task to change: the blocking read of `GET /tasks/{id}?waitForChange=true` and
//! the event stream of `GET /tasks/{id}/events`.
//!
//! Why a hub and not polling: a UI showing a progress bar would otherwise read every second,
//! and a thousand of them a thousand times a second. A waiter here costs a parked future; a
//! write to its task wakes it at once. Writes through this process notify the hub; writes
//! through another replica (PostgreSQL) cannot, so a waiter also looks again every
//! `RECHECK`, which bounds how late it can be, not whether it hears of the change.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use sitegate_model::task::{Task, TaskState};
use sitegate_model::watch::Wait;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::ApiError;

/// How often a waiter reads its task again in case another replica changed it.
const RECHECK: Duration = Duration::from_secs(1);

/// One channel per task somebody is waiting on; none for the rest.
#[derive(Default)]
pub(crate) struct TaskWatch {
    channels: DashMap<Uuid, watch::Sender<()>>,
}

/// A waiter's interest in one task; the channel goes when its last waiter does.
struct Subscription<'a> {
    hub: &'a TaskWatch,
    id: Uuid,
    rx: Option<watch::Receiver<()>>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub
            .channels
            .remove_if(&self.id, |_, tx| tx.receiver_count() == 0);
    }
}

impl TaskWatch {
    /// Called after every task write this process made durable.
    pub(crate) fn changed(&self, id: Uuid) {
        if let Some(tx) = self.channels.get(&id) {
            tx.send_replace(());
        }
    }

    /// Waiters right now (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.channels.iter().map(|c| c.receiver_count()).sum()
    }

    fn subscribe(&self, id: Uuid) -> Subscription<'_> {
        let rx = self
            .channels
            .entry(id)
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Subscription {
            hub: self,
            id,
            rx: Some(rx),
        }
    }

    /// Reads the task with `read` until it changed after `wait.last_updated` or is final, or
    /// until `wait.timeout`; answers the task as last read. A final task never changes, so one
    /// that is final is answered at once whatever `last_updated` says.
    pub(crate) async fn wait_for_change<F, Fut>(
        &self,
        id: Uuid,
        wait: Wait,
        mut read: F,
    ) -> Result<Task, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Task, ApiError>>,
    {
        let until = Instant::now() + wait.timeout;
        // Subscribed before the first read, so a write between the read and the wait is
        // not missed: it marks the channel changed and the wait returns at once.
        let mut subscription = self.subscribe(id);
        loop {
            let task = read().await?;
            if task.last_updated > wait.last_updated || task.state != TaskState::Running {
                return Ok(task);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(task);
            }
            let next = until.min(now + RECHECK);
            let Some(rx) = subscription.rx.as_mut() else {
                return Ok(task);
            };
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }
}

/// Shared by the handlers and `AppState`.
pub(crate) type SharedWatch = Arc<TaskWatch>;

#[cfg(test)]
mod tests {
    use super::*;
    use sitegate_model::task::WorkflowInfo;
    use std::sync::Mutex;

    fn task(last_updated: i64, state: TaskState) -> Task {
        Task {
            id: Uuid::from_u128(1),
            user: "alice".into(),
            site: "s".into(),
            state,
            progress: 0,
            start_time: 0,
            last_updated,
            end_time: -1,
            result_type: None,
            result: None,
            error: None,
            warnings: Vec::new(),
            workflow_info: WorkflowInfo::default(),
            source_org: None,
            destination_org: None,
        }
    }

    #[tokio::test]
    async fn a_write_wakes_the_waiter_and_the_channel_goes_afterwards() {
        let hub = Arc::new(TaskWatch::default());
        let current = Arc::new(Mutex::new(task(10, TaskState::Running)));
        let wait = Wait {
            last_updated: 10,
            timeout: Duration::from_secs(20),
        };
        let waiter = {
            let (hub, current) = (hub.clone(), current.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let t = hub
                    .wait_for_change(Uuid::from_u128(1), wait, || {
                        let t = current
                            .lock()
                            .map(|t| t.clone())
                            .map_err(|_| ApiError::NoRoute);
                        async move { t }
                    })
                    .await;
                (t, started.elapsed())
            })
        };
        while hub.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *current.lock().expect("lock") = task(11, TaskState::Running);
        hub.changed(Uuid::from_u128(1));
        let (t, took) = waiter.await.expect("joined");
        assert_eq!(t.ok().map(|t| t.last_updated), Some(11));
        assert!(
            took < Duration::from_millis(900),
            "woken, not rechecked: {took:?}"
        );
        assert_eq!(hub.waiting(), 0);
        assert!(hub.channels.is_empty());
    }

    #[tokio::test]
    async fn unchanged_task_is_answered_at_the_timeout_and_final_at_once() {
        let hub = TaskWatch::default();
        let wait = Wait {
            last_updated: 10,
            timeout: Duration::from_millis(300),
        };
        let started = Instant::now();
        let t = hub
            .wait_for_change(Uuid::from_u128(1), wait, || async {
                Ok(task(10, TaskState::Running))
            })
            .await
            .expect("task");
        assert_eq!(t.last_updated, 10);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let started = Instant::now();
        let t = hub
            .wait_for_change(Uuid::from_u128(1), wait, || async {
                Ok(task(3, TaskState::Succeeded))
            })
            .await
            .expect("task");
        assert_eq!(t.state, TaskState::Succeeded);
        assert!(started.elapsed() < Duration::from_millis(250));
    }
}
