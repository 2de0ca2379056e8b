//! Remote Get One answers, shared between callers who would get the same answer.
//!
//! A task in a final state never changes, so its remote answer is kept for
//! `peering.final_task_cache_secs` and polls of finished tasks stop crossing the link. A running
//! task's answer is kept for `peering.running_task_cache_ms` (a poll interval's worth of
//! staleness at most). Concurrent identical reads share one peer request (single flight). Keys
//! hold the peer, the path and the *remote user*, so an answer is only ever given to the user
//! the peer gave it to; only `200` answers are kept, errors are shared only while in flight.
//!
//! The single flight is a map of in-flight reads, each a `OnceCell` the first reader fills;
//! the kept answers are a `moka` cache used only through `get` and `insert`. moka's own
//! `try_get_with` did both, but its future was about 35 KiB, carried (with the unpolled peer
//! request inside it) by every waiting reader: with 1,000 clients polling one remote task that
//! was most of the site's memory, and moving it was a visible share of a forwarded read's CPU.
//! Here a waiter holds a small future and the peer request is built only by the reader that
//! sends it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode};
use moka::sync::Cache;
use moka::Expiry;
use tokio::sync::OnceCell;

use super::client::PeerResponse;
use super::error::PeerError;

/// Who asked what of which peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(super) struct ReadKey {
    pub(super) peer: String,
    pub(super) path: String,
    pub(super) remote_user: String,
}

/// A peer's answer as kept: what is passed back of it (status, `Content-Type`, body). The
/// other headers are dropped: each kept answer held a whole header map, and every shared
/// read cloned it.
#[derive(Debug)]
pub(super) struct SharedAnswer {
    pub(super) status: StatusCode,
    content_type: Option<HeaderValue>,
    pub(super) body: Bytes,
    is_final: bool,
}

impl SharedAnswer {
    fn from_response(r: PeerResponse) -> Self {
        let is_final = r.status == StatusCode::OK && task_is_final(&r.body);
        SharedAnswer {
            status: r.status,
            content_type: r.headers.get(CONTENT_TYPE).cloned(),
            body: r.body,
            is_final,
        }
    }

    pub(super) fn to_response(&self) -> PeerResponse {
        let mut headers = HeaderMap::with_capacity(1);
        if let Some(ct) = &self.content_type {
            headers.insert(CONTENT_TYPE, ct.clone());
        }
        PeerResponse {
            status: self.status,
            headers,
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

/// One read on its way: the first reader sends it and fills the cell; the others wait on it.
type Flight = Arc<OnceCell<Result<Arc<SharedAnswer>, PeerError>>>;

/// The shared remote reads of one site.
pub(super) struct RemoteReads {
    cache: Cache<ReadKey, Arc<SharedAnswer>>,
    /// Reads in flight. Bounded by the requests in flight (themselves capped by the limits):
    /// an entry leaves when its read is answered.
    in_flight: DashMap<ReadKey, Flight>,
    running: Duration,
    finished: Duration,
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
            in_flight: DashMap::new(),
            running,
            finished,
        }
    }

    /// The kept answer for `key`, or the one `fetch` gets, shared with every concurrent caller
    /// of the same key. `fetch` is called only by the caller that sends the read; if that
    /// caller goes away (its client hung up), a waiting one sends it instead.
    pub(super) async fn get_or_fetch<F, Fut>(
        &self,
        key: ReadKey,
        fetch: F,
    ) -> Result<Arc<SharedAnswer>, PeerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PeerResponse, PeerError>>,
    {
        if let Some(kept) = self.cache.get(&key) {
            count_read("cached");
            return Ok(kept);
        }
        let flight: Flight = self.in_flight.entry(key.clone()).or_default().clone();
        let mut sent = false;
        let result = flight
            .get_or_init(|| async {
                sent = true;
                // Boxed, so that the waiters' futures (which reserve room for this one but
                // never run it) stay small.
                let result = Box::pin(fetch())
                    .await
                    .map(|r| Arc::new(SharedAnswer::from_response(r)));
                if let Ok(answer) = &result {
                    if self.keeps(answer) {
                        self.cache.insert(key.clone(), answer.clone());
                    }
                }
                // Later readers must not get this answer from the flight: they ask again, or
                // find it kept.
                self.in_flight
                    .remove_if(&key, |_, current| Arc::ptr_eq(current, &flight));
                result
            })
            .await
            .clone();
        count_read(if sent { "fetched" } else { "joined" });
        result
    }

    fn keeps(&self, answer: &SharedAnswer) -> bool {
        answer.status == StatusCode::OK
            && !(if answer.is_final {
                self.finished.is_zero()
            } else {
                self.running.is_zero()
            })
    }
}

/// Counts a read by how it was answered: `cached` (a kept answer), `joined` (another
/// caller's read in flight) or `fetched` (sent to the peer).
fn count_read(shared: &'static str) {
    metrics::counter!("sitegate_remote_reads_total", "shared" => shared).increment(1);
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
                    .get_or_fetch(key("alice"), || async {
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
            .get_or_fetch(key("alice"), || async {
                fetches.fetch_add(1, Ordering::SeqCst);
                Ok(answer("SUCCEEDED"))
            })
            .await;
        assert!(again.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // ...but another user's read is never answered from alice's.
        let bob = reads
            .get_or_fetch(key("bob"), || async {
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
                .get_or_fetch(key("alice"), || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Ok(answer("RUNNING"))
                })
                .await;
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        for _ in 0..2 {
            let r = reads
                .get_or_fetch(key("carol"), || async {
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

    /// A reader whose read is in flight when it goes away (its client hung up) does not leave
    /// the others waiting: one of them sends the read instead.
    #[tokio::test]
    async fn a_waiter_takes_over_when_the_sender_goes_away() {
        let reads = Arc::new(RemoteReads::new(Duration::ZERO, Duration::from_secs(60)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let first = {
            let (reads, fetches) = (reads.clone(), fetches.clone());
            tokio::spawn(async move {
                reads
                    .get_or_fetch(key("alice"), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<Result<PeerResponse, PeerError>>().await
                    })
                    .await
            })
        };
        while fetches.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let second = {
            let (reads, fetches) = (reads.clone(), fetches.clone());
            tokio::spawn(async move {
                reads
                    .get_or_fetch(key("alice"), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        Ok(answer("RUNNING"))
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        first.abort();
        let answer = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiter was left waiting")
            .unwrap()
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        assert!(reads.in_flight.is_empty(), "the finished flight is gone");
    }

    /// What a waiting reader holds: small, whatever the size of the peer request's future
    /// (which only the sender allocates). 1,000 clients polling one task are 1,000 of these.
    #[test]
    fn a_waiting_reader_is_small() {
        let reads = RemoteReads::new(Duration::ZERO, Duration::ZERO);
        let big = [0u8; 16 * 1024];
        let waiter = reads.get_or_fetch(key("alice"), || async move {
            std::hint::black_box(&big);
            tokio::task::yield_now().await;
            Ok(answer("RUNNING"))
        });
        let size = std::mem::size_of_val(&waiter);
        assert!(size < 2 * 1024, "a waiting read is {size} bytes");
    }
}
