//! Read sharing: single-flight for identical in-flight reads, and a short TTL cache for
//! slow-moving data (campaigns, templates, scores, reports).
//!
//! The upstream call of a flight runs in its own task, so the first caller going away does not
//! cancel it for the others. A caller joins a flight only if the flight is at least as urgent
//! (an interactive read never waits behind a background one queued for budget) and lasts at
//! least as long as the caller is willing to wait (a flight started by a caller with a 1 s
//! deadline would give up on behalf of a caller with 30 s); otherwise it starts its own flight,
//! which then becomes the one later callers join. Errors are never cached.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::upstream::context::{CallContext, Priority, deadline_exceeded};

type SharedResult<V> = Shared<BoxFuture<'static, Result<V>>>;

struct Flight<V> {
    id: u64,
    priority: Priority,
    deadline: Option<Instant>,
    result: SharedResult<V>,
}

struct State<K, V> {
    cache: HashMap<K, (Instant, V)>,
    flights: HashMap<K, Flight<V>>,
    next_id: u64,
}

/// Shared reads keyed by `K` (the operation and its parameters).
pub struct Reads<K, V> {
    state: Arc<Mutex<State<K, V>>>,
    ttl: Duration,
    capacity: usize,
    upstream: &'static str,
}

/// Whether a successful result may be served to later callers for the TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    Cached,
    SingleFlightOnly,
    /// Skips the cached value but stores the fresh one: for a caller that has just seen the
    /// cached value miss something that may have been created since (a new campaign).
    Refresh,
}

impl<K, V> Reads<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `capacity` bounds the cache: keys include caller-chosen ids (template ids), so it must
    /// not grow without limit.
    pub fn new(upstream: &'static str, ttl: Duration, capacity: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                cache: HashMap::new(),
                flights: HashMap::new(),
                next_id: 0,
            })),
            ttl,
            capacity: capacity.max(1),
            upstream,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        // A panic while holding this lock can only come from HashMap itself; the maps stay
        // consistent, so the poison flag is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves `key` from the cache, from an in-flight call, or by running `fetch` in a new task.
    pub async fn get<F>(&self, key: K, ctx: &CallContext, caching: Caching, fetch: F) -> Result<V>
    where
        F: FnOnce() -> BoxFuture<'static, Result<V>>,
    {
        let now = Instant::now();
        let shared = {
            let mut state = self.lock();
            if caching == Caching::Cached {
                match state.cache.get(&key) {
                    Some((stored, value)) if now.duration_since(*stored) < self.ttl => {
                        return Ok(value.clone());
                    }
                    Some(_) => {
                        state.cache.remove(&key);
                    }
                    None => {}
                }
            }
            let joinable = state.flights.get(&key).filter(|flight| {
                flight.priority >= ctx.priority
                    && match (flight.deadline, ctx.deadline) {
                        (None, _) => true,
                        (Some(_), None) => false,
                        (Some(flight), Some(caller)) => flight >= caller,
                    }
            });
            match joinable {
                Some(flight) => flight.result.clone(),
                None => {
                    let id = state.next_id;
                    state.next_id += 1;
                    let result = self.start(key.clone(), id, caching, fetch());
                    state.flights.insert(
                        key,
                        Flight {
                            id,
                            priority: ctx.priority,
                            deadline: ctx.deadline,
                            result: result.clone(),
                        },
                    );
                    result
                }
            }
        };
        match ctx.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, shared)
                .await
                .map_err(|_| deadline_exceeded(self.upstream))?,
            None => shared.await,
        }
    }

    fn start(
        &self,
        key: K,
        id: u64,
        caching: Caching,
        fetch: BoxFuture<'static, Result<V>>,
    ) -> SharedResult<V> {
        let state = Arc::clone(&self.state);
        let ttl = self.ttl;
        let capacity = self.capacity;
        let flight = async move {
            let result = fetch.await;
            let mut state = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state
                .flights
                .get(&key)
                .is_some_and(|flight| flight.id == id)
            {
                state.flights.remove(&key);
            }
            if let (Ok(value), Caching::Cached | Caching::Refresh) = (&result, caching) {
                let now = Instant::now();
                if state.cache.len() >= capacity {
                    state
                        .cache
                        .retain(|_, (stored, _)| now.duration_since(*stored) < ttl);
                }
                if state.cache.len() >= capacity {
                    let oldest = state
                        .cache
                        .iter()
                        .min_by_key(|(_, (stored, _))| *stored)
                        .map(|(key, _)| key.clone());
                    if let Some(oldest) = oldest {
                        state.cache.remove(&oldest);
                    }
                }
                state.cache.insert(key, (now, value.clone()));
            }
            result
        };
        // The flight's upstream spans join the trace of the caller that started it.
        let task = tokio::spawn(flight.in_current_span());
        let upstream = self.upstream;
        async move {
            task.await.unwrap_or_else(|join_error| {
                Err(Error::internal(format!(
                    "{upstream} read task failed: {join_error}"
                )))
            })
        }
        .boxed()
        .shared()
    }

    /// Drops every cached value (after a write that changes them).
    pub fn invalidate_all(&self) {
        self.lock().cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::error::ErrorCode;

    /// Reads of `&str` keys whose upstream calls are counted and held at a gate until it opens.
    struct GatedReads {
        reads: Arc<Reads<&'static str, u32>>,
        calls: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Notify>,
    }

    impl GatedReads {
        fn new() -> GatedReads {
            GatedReads {
                reads: Arc::new(Reads::new("retently", Duration::from_secs(30), 16)),
                calls: Arc::new(AtomicUsize::new(0)),
                gate: Arc::new(tokio::sync::Notify::new()),
            }
        }

        /// The upstream calls made so far.
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        /// A fetch that counts its call, waits for the gate, then answers `value`.
        fn fetch(&self, value: u32) -> impl FnOnce() -> BoxFuture<'static, Result<u32>> + use<> {
            let calls = Arc::clone(&self.calls);
            let gate = Arc::clone(&self.gate);
            move || {
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok(value)
                }
                .boxed()
            }
        }

        /// A read that must succeed: the value it got.
        async fn read(
            &self,
            key: &'static str,
            ctx: &CallContext,
            caching: Caching,
            value: u32,
        ) -> u32 {
            let fetch = self.fetch(value);
            self.reads
                .get(key, ctx, caching, fetch)
                .await
                .expect("read")
        }

        /// The same read in a task of its own, so several can wait at the gate at once.
        fn spawn_read(
            &self,
            key: &'static str,
            ctx: CallContext,
            caching: Caching,
            value: u32,
        ) -> tokio::task::JoinHandle<Result<u32>> {
            let reads = Arc::clone(&self.reads);
            let fetch = self.fetch(value);
            tokio::spawn(async move { reads.get(key, &ctx, caching, fetch).await })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn identical_in_flight_reads_share_one_call() {
        let gated = GatedReads::new();
        let interactive = CallContext::interactive(None);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                gated.spawn_read(
                    "campaigns",
                    interactive.clone(),
                    Caching::SingleFlightOnly,
                    7,
                )
            })
            .collect();
        // Let every caller register before the one upstream call answers.
        tokio::time::sleep(Duration::from_millis(1)).await;
        gated.gate.notify_waiters();
        for task in tasks {
            assert_eq!(task.await.expect("task").expect("read"), 7);
        }
        assert_eq!(gated.calls(), 1);
        // Not cached: the next read calls again.
        gated.gate.notify_one();
        let value = gated
            .read("campaigns", &interactive, Caching::SingleFlightOnly, 8)
            .await;
        assert_eq!(value, 8);
        assert_eq!(gated.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cached_values_expire_after_the_ttl() {
        let gated = GatedReads::new();
        let ctx = CallContext::interactive(None);
        gated.gate.notify_one();
        let first = gated.read("score", &ctx, Caching::Cached, 1).await;
        tokio::time::advance(Duration::from_secs(29)).await;
        let cached = gated.read("score", &ctx, Caching::Cached, 2).await;
        assert_eq!((first, cached), (1, 1));
        assert_eq!(gated.calls(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        gated.gate.notify_one();
        let fresh = gated.read("score", &ctx, Caching::Cached, 3).await;
        assert_eq!(fresh, 3);
        assert_eq!(gated.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_skips_the_cached_value_and_replaces_it() {
        let reads = Reads::<&'static str, u32>::new("retently", Duration::from_secs(30), 16);
        let ctx = CallContext::interactive(None);
        let get = |caching, value: u32| {
            reads.get("campaigns", &ctx, caching, move || {
                async move { Ok(value) }.boxed()
            })
        };
        assert_eq!(get(Caching::Cached, 1).await.expect("read"), 1);
        assert_eq!(get(Caching::Cached, 2).await.expect("read"), 1);
        assert_eq!(get(Caching::Refresh, 3).await.expect("read"), 3);
        assert_eq!(get(Caching::Cached, 4).await.expect("read"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_not_cached() {
        let reads = Reads::<&'static str, u32>::new("retently", Duration::from_secs(30), 16);
        let ctx = CallContext::interactive(None);
        let failed = reads
            .get("score", &ctx, Caching::Cached, || {
                async { Err(Error::internal("boom")) }.boxed()
            })
            .await;
        assert!(failed.is_err());
        let value = reads
            .get("score", &ctx, Caching::Cached, || async { Ok(5) }.boxed())
            .await
            .expect("read");
        assert_eq!(value, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_longer_deadline_does_not_join_a_shorter_flight() {
        let gated = GatedReads::new();
        let short = CallContext::interactive_within(Duration::from_secs(1));
        let long = CallContext::interactive_within(Duration::from_secs(10));
        let first = gated.spawn_read("templates", short, Caching::SingleFlightOnly, 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let second = gated.spawn_read("templates", long, Caching::SingleFlightOnly, 2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(gated.calls(), 2, "the longer caller started its own flight");
        // The short caller gives up at its deadline; the long one still gets an answer.
        let first = first.await.expect("task").expect_err("deadline");
        assert_eq!(first.code(), ErrorCode::DeadlineExceeded);
        gated.gate.notify_waiters();
        assert_eq!(second.await.expect("task").expect("read"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cache_is_bounded() {
        let reads = Reads::<u32, u32>::new("retently", Duration::from_secs(30), 4);
        let ctx = CallContext::interactive(None);
        for key in 0..10 {
            reads
                .get(key, &ctx, Caching::Cached, move || {
                    async move { Ok(key) }.boxed()
                })
                .await
                .expect("read");
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(reads.lock().cache.len() <= 4);
        assert!(
            reads.lock().cache.contains_key(&9),
            "the newest entry is kept"
        );
    }
}
