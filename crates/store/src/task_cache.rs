//! The embedded store's memory of recently read and written tasks.
//!
//! Why: UIs and scripts poll the same few tasks every second, and a read that goes to a reader
//! thread pays two thread hand-offs and a SQLite lookup for an answer that rarely changed. A hit
//! here answers on the calling task, with no hop.
//!
//! Why it is never stale: this process is the store's only writer (the directory lock makes
//! sure), and the writer thread puts every task it commits here, after the commit and before it
//! answers anyone. The one race is a reader that read a row just before a commit and offers the
//! old version afterwards. A generation counter closes it: the writer makes it odd while a batch
//! is open and even again once the batch's tasks are in, and a reader's offer counts only when
//! the generation it saw before reading was even and is still the same after the insert.
//! Otherwise the offer is taken back. A taken-back or evicted entry only costs a later miss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use sitegate_model::task::Task;
use uuid::Uuid;

/// Bytes of task JSON kept in memory by default: about 40,000 typical tasks.
pub const DEFAULT_CAPACITY_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone)]
struct Entry {
    task: Arc<Task>,
    weight: u32,
}

#[derive(Clone)]
struct ByWeight;

impl Weighter<Uuid, Entry> for ByWeight {
    fn weight(&self, _key: &Uuid, entry: &Entry) -> u64 {
        u64::from(entry.weight)
    }
}

pub(crate) struct TaskCache {
    entries: Cache<Uuid, Entry, ByWeight>,
    generation: AtomicU64,
}

/// What a reader saw before reading: the cache's generation, when no write batch was open.
#[derive(Clone, Copy)]
pub(crate) struct Ticket(Option<u64>);

impl TaskCache {
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        // Typical tasks weigh about 400 bytes; the estimate only sizes the table up front.
        let estimated_items = usize::try_from(capacity_bytes / 400).unwrap_or(usize::MAX);
        TaskCache {
            entries: Cache::with_weighter(estimated_items.max(16), capacity_bytes.max(1), ByWeight),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self, id: &Uuid) -> Option<Task> {
        self.entries.get(id).map(|e| Task::clone(&e.task))
    }

    /// Taken before a read starts; see the module comment.
    pub(crate) fn ticket(&self) -> Ticket {
        let generation = self.generation.load(Ordering::SeqCst);
        Ticket(generation.is_multiple_of(2).then_some(generation))
    }

    /// A reader offers what it read; kept only if no write batch opened since its ticket.
    pub(crate) fn offer(&self, ticket: Ticket, task: &Task) {
        let Ticket(Some(seen)) = ticket else { return };
        if self.generation.load(Ordering::SeqCst) != seen {
            return;
        }
        self.entries.insert(task.id, entry(task));
        if self.generation.load(Ordering::SeqCst) != seen {
            // A batch opened while we inserted: what we put may be older than its commit.
            self.entries.remove(&task.id);
        }
    }

    /// The writer thread, before it begins a batch.
    pub(crate) fn batch_opened(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The writer thread, for each task of a batch whose commit succeeded.
    pub(crate) fn committed(&self, task: &Task) {
        self.entries.insert(task.id, entry(task));
    }

    /// The writer thread, for each task a committed batch removed.
    pub(crate) fn removed(&self, id: &Uuid) {
        self.entries.remove(id);
    }

    /// The writer thread, once a batch's tasks are in (or its commit failed).
    pub(crate) fn batch_closed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

fn entry(task: &Task) -> Entry {
    Entry {
        task: Arc::new(task.clone()),
        weight: weight_of(task),
    }
}

/// The task's JSON size plus the fixed part of its in-memory form; never zero (quick_cache
/// never evicts zero-weight entries).
fn weight_of(task: &Task) -> u32 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing a Task cannot fail (no maps with non-string keys); if it ever did, count
    // what was written so far.
    let _ = serde_json::to_writer(&mut count, task);
    u32::try_from(count.0 + std::mem::size_of::<Task>() as u64).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sitegate_model::task::{TaskState, WorkflowInfo};

    fn task(progress: u8) -> Task {
        Task {
            id: Uuid::from_u128(7),
            user: "alice".into(),
            site: "site1".into(),
            state: TaskState::Running,
            progress,
            start_time: 1,
            last_updated: 1,
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

    #[test]
    fn an_offer_made_across_a_batch_is_not_kept() {
        let cache = TaskCache::new(DEFAULT_CAPACITY_BYTES);
        let before = cache.ticket();
        cache.batch_opened();
        cache.committed(&task(50));
        cache.batch_closed();
        // The reader read progress 10 before the commit and offers it afterwards.
        cache.offer(before, &task(10));
        assert_eq!(cache.get(&Uuid::from_u128(7)).map(|t| t.progress), Some(50));
    }

    #[test]
    fn no_ticket_while_a_batch_is_open() {
        let cache = TaskCache::new(DEFAULT_CAPACITY_BYTES);
        cache.batch_opened();
        let during = cache.ticket();
        cache.offer(during, &task(10));
        assert!(cache.get(&Uuid::from_u128(7)).is_none());
        cache.batch_closed();
        let after = cache.ticket();
        cache.offer(after, &task(20));
        assert_eq!(cache.get(&Uuid::from_u128(7)).map(|t| t.progress), Some(20));
    }

    #[test]
    fn a_removed_task_is_not_answered_even_if_offered_across_the_removal() {
        let cache = TaskCache::new(DEFAULT_CAPACITY_BYTES);
        cache.batch_opened();
        cache.committed(&task(100));
        cache.batch_closed();
        let before = cache.ticket();
        cache.batch_opened();
        cache.removed(&Uuid::from_u128(7));
        cache.batch_closed();
        // A reader that read the row before the purge committed offers it afterwards.
        cache.offer(before, &task(100));
        assert!(cache.get(&Uuid::from_u128(7)).is_none());
    }

    #[test]
    fn bounded_by_bytes() {
        let cache = TaskCache::new(64 * 1024);
        for i in 0..10_000u128 {
            let mut t = task(1);
            t.id = Uuid::from_u128(i);
            cache.batch_opened();
            cache.committed(&t);
            cache.batch_closed();
        }
        assert!(cache.entries.weight() <= 64 * 1024);
        assert!(cache.entries.len() < 10_000);
    }
}
