//! Remote Get One answers, shared between callers who would get the same answer.
//!
//! A task in a final state never changes, so its remote answer is kept for
//! `peering.final_task_cache_secs` and polls of finished tasks stop crossing the link. A running
//! task's answer is kept for `peering.running_task_cache_ms` (a poll interval's worth of
//! staleness at most). Concurrent identical reads share one peer request (single flight). Keys
//! hold the peer, the path and the *remote user*, so an answer is only ever given to the user
//! the peer gave it to; only `200` answers are kept, errors are shared only while in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use moka::future::Cache;
use moka::Expiry;

use super::client::PeerResponse;
use super::error::PeerError;

/// Who asked what of which peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(super) struct ReadKey {
    pub(super) peer: String,
    pub(super) path: String,
    pub(super) remote_user: String,
}

/// A peer's answer as kept.
#[derive(Debug)]
pub(super) struct SharedAnswer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    is_final: bool,
}

impl SharedAnswer {
    fn from_response(r: PeerResponse) -> Self {
        let is_final = r.status == StatusCode::OK && task_is_final(&r.body);
        SharedAnswer {
            status: r.status,
            headers: r.headers,
            body: r.body,
            is_final,
        }
    }

    pub(super) fn to_response(&self) -> PeerResponse {
        PeerResponse {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }
}

fn task_is_final(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct StateOnly {
        state: sitegate_model::task::TaskState,
    }
    serde_json::from_slice::<StateOnly>(body)
        .map(|t| t.state.is_final())
        .unwrap_or(false)
}

struct Lifetimes {
    running: Duration,
    finished: Duration,
}

impl Expiry<ReadKey, Arc<SharedAnswer>> for Lifetimes {
    fn expire_after_create(
        &self,
        _key: &ReadKey,
        value: &Arc<SharedAnswer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(if value.status != StatusCode::OK {
            Duration::ZERO
        } else if value.is_final {
            self.finished
        } else {
            self.running
        })
    }
}

/// The shared remote reads of one site.
pub(super) struct RemoteReads {
    cache: Cache<ReadKey, Arc<SharedAnswer>>,
}

/// The most bytes of answers kept.
const MAX_BYTES: u64 = 64 * 1024 * 1024;

impl RemoteReads {
    pub(super) fn new(running: Duration, finished: Duration) -> Self {
        RemoteReads {
            cache: Cache::builder()
                .max_capacity(MAX_BYTES)
                .weigher(|k: &ReadKey, v: &Arc<SharedAnswer>| {
                    u32::try_from(v.body.len() + k.path.len() + 256).unwrap_or(u32::MAX)
                })
                .expire_after(Lifetimes { running, finished })
                .build(),
        }
    }

    /// The kept answer for `key`, or the one `fetch` gets, shared with every concurrent caller
    /// of the same key.
    pub(super) async fn get_or_fetch(
        &self,
        key: ReadKey,
        fetch: impl std::future::Future<Output = Result<PeerResponse, PeerError>>,
    ) -> Result<Arc<SharedAnswer>, PeerError> {
        let hit = self.cache.contains_key(&key);
        let result = self
            .cache
            .try_get_with(key, async {
                fetch
                    .await
                    .map(|r| Arc::new(SharedAnswer::from_response(r)))
            })
            .await
            .map_err(|e| (*e).clone());
        metrics::counter!("sitegate_remote_reads_total", "shared" => if hit { "cached" } else { "fetched" })
            .increment(1);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn answer(state: &str) -> PeerResponse {
        PeerResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(format!(r#"{{"state":"{state}"}}"#)),
        }
    }

    fn key(user: &str) -> ReadKey {
        ReadKey {
            peer: "site2".into(),
            path: "/tasks/x".into(),
            remote_user: user.into(),
        }
    }

    #[tokio::test]
    async fn concurrent_reads_share_one_fetch_and_finished_tasks_stay() {
        let reads = RemoteReads::new(Duration::ZERO, Duration::from_secs(60));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        let reads = Arc::new(reads);
        for _ in 0..50 {
            let reads = reads.clone();
            let fetches = fetches.clone();
            handles.push(tokio::spawn(async move {
                reads
                    .get_or_fetch(key("alice"), async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(answer("SUCCEEDED"))
                    })
                    .await
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap().unwrap().status, StatusCode::OK);
        }
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "one peer request for 50 readers"
        );
        // A finished task is not fetched again...
        let again = reads
            .get_or_fetch(key("alice"), async {
                fetches.fetch_add(1, Ordering::SeqCst);
                Ok(answer("SUCCEEDED"))
            })
            .await;
        assert!(again.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // ...but another user's read is never answered from alice's.
        let bob = reads
            .get_or_fetch(key("bob"), async {
                fetches.fetch_add(1, Ordering::SeqCst);
                Ok(answer("SUCCEEDED"))
            })
            .await;
        assert!(bob.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn running_tasks_and_errors_are_fetched_again() {
        let reads = RemoteReads::new(Duration::ZERO, Duration::from_secs(60));
        let fetches = AtomicUsize::new(0);
        for _ in 0..3 {
            let _ = reads
                .get_or_fetch(key("alice"), async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Ok(answer("RUNNING"))
                })
                .await;
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        for _ in 0..2 {
            let r = reads
                .get_or_fetch(key("carol"), async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Err(PeerError::Timeout {
                        site: "site2".into(),
                    })
                })
                .await;
            assert!(r.is_err());
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 5);
    }
}
