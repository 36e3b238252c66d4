//! Counters of the feedback pipeline, served as JSON on the admin port
//! (`GET /feedback/stats`) and as the `cxgw.feedback.events` / `cxgw.feedback.subscribers`
//! metrics. Relaxed atomics: each counter is independent and only ever read for monitoring.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::KeyValue;

use serde::Serialize;

#[derive(Debug, Default)]
pub struct FeedbackStats {
    /// Completed incremental polls (each pages until done).
    pub polls: AtomicU64,
    /// Completed rescans of the recent window (to see changes to older responses).
    pub rescans: AtomicU64,
    /// Upstream list requests made by the poller, successful or not.
    pub poll_requests: AtomicU64,
    pub poll_failures: AtomicU64,
    /// Upstream items that could not be read (no id or creation date).
    pub malformed_items: AtomicU64,
    pub created: AtomicU64,
    pub updated: AtomicU64,
    pub unchanged: AtomicU64,
    /// Webhook observations of already known responses.
    pub ignored: AtomicU64,
    pub webhook_accepted: AtomicU64,
    pub webhook_rejected_unauthenticated: AtomicU64,
    pub webhook_rejected_signature: AtomicU64,
    pub webhook_rejected_stale: AtomicU64,
    pub webhook_rejected_malformed: AtomicU64,
    pub webhook_rejected_too_large: AtomicU64,
    /// Calls that were valid but could not be stored (answered 503 so the sender retries).
    pub webhook_failed: AtomicU64,
    /// Streams open now.
    pub subscribers: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Times a subscriber fell behind the live buffer and continued from the log.
    pub catch_ups: AtomicU64,
    /// Log entries deleted by retention.
    pub pruned: AtomicU64,
    /// 1 while this replica holds the feedback poller's lease (it is the one that polls).
    pub poller_leading: AtomicU64,
    /// Times this replica took the poller's lease, and lost it to another replica or for want
    /// of a timely renewal.
    pub lease_acquired: AtomicU64,
    pub lease_lost: AtomicU64,
}

/// A point-in-time copy of [`FeedbackStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub polls: u64,
    pub rescans: u64,
    pub poll_requests: u64,
    pub poll_failures: u64,
    pub malformed_items: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub ignored: u64,
    pub webhook_accepted: u64,
    pub webhook_rejected_unauthenticated: u64,
    pub webhook_rejected_signature: u64,
    pub webhook_rejected_stale: u64,
    pub webhook_rejected_malformed: u64,
    pub webhook_rejected_too_large: u64,
    pub webhook_failed: u64,
    pub subscribers: u64,
    pub subscriptions: u64,
    pub catch_ups: u64,
    pub pruned: u64,
    pub poller_leading: u64,
    pub lease_acquired: u64,
    pub lease_lost: u64,
}

/// The event counters of `s`, each under the `kind` it has in the metrics.
fn event_counters(s: &StatsSnapshot) -> [(&'static str, u64); 21] {
    [
        ("poll", s.polls),
        ("rescan", s.rescans),
        ("poll_request", s.poll_requests),
        ("poll_failure", s.poll_failures),
        ("malformed_item", s.malformed_items),
        ("created", s.created),
        ("updated", s.updated),
        ("unchanged", s.unchanged),
        ("webhook_known", s.ignored),
        ("webhook_accepted", s.webhook_accepted),
        (
            "webhook_rejected_unauthenticated",
            s.webhook_rejected_unauthenticated,
        ),
        ("webhook_rejected_signature", s.webhook_rejected_signature),
        ("webhook_rejected_stale", s.webhook_rejected_stale),
        ("webhook_rejected_malformed", s.webhook_rejected_malformed),
        ("webhook_rejected_too_large", s.webhook_rejected_too_large),
        ("webhook_failed", s.webhook_failed),
        ("subscription", s.subscriptions),
        ("catch_up", s.catch_ups),
        ("pruned", s.pruned),
        ("lease_acquired", s.lease_acquired),
        ("lease_lost", s.lease_lost),
    ]
}

/// Reads one gauge of the stats.
type Gauge = fn(&FeedbackStats) -> &AtomicU64;

impl FeedbackStats {
    /// Reports the counters to the process's metrics until `stats` is dropped.
    pub fn register_metrics(stats: &Arc<FeedbackStats>) {
        use crate::telemetry::metrics::{Observed, register_probe};
        let events = Arc::downgrade(stats);
        register_probe(Observed::FeedbackEvents, move |readings| {
            let Some(stats) = events.upgrade() else {
                return false;
            };
            for (kind, value) in event_counters(&stats.snapshot()) {
                readings.push((value, vec![KeyValue::new("kind", kind)]));
            }
            true
        });
        // Gauges read as they are, each on its own probe.
        let gauges: [(Observed, Gauge); 2] = [
            (Observed::FeedbackSubscribers, |stats| &stats.subscribers),
            (Observed::FeedbackPollerLeader, |stats| {
                &stats.poller_leading
            }),
        ];
        for (observed, gauge) in gauges {
            let stats = Arc::downgrade(stats);
            register_probe(observed, move |readings| {
                let Some(stats) = stats.upgrade() else {
                    return false;
                };
                readings.push((gauge(&stats).load(Ordering::Relaxed), Vec::new()));
                true
            });
        }
    }

    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    /// Whether this replica now runs the feedback poller (the `poller_leading` gauge).
    pub fn set_poller_leading(&self, leading: bool) {
        self.poller_leading
            .store(u64::from(leading), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            polls: get(&self.polls),
            rescans: get(&self.rescans),
            poll_requests: get(&self.poll_requests),
            poll_failures: get(&self.poll_failures),
            malformed_items: get(&self.malformed_items),
            created: get(&self.created),
            updated: get(&self.updated),
            unchanged: get(&self.unchanged),
            ignored: get(&self.ignored),
            webhook_accepted: get(&self.webhook_accepted),
            webhook_rejected_unauthenticated: get(&self.webhook_rejected_unauthenticated),
            webhook_rejected_signature: get(&self.webhook_rejected_signature),
            webhook_rejected_stale: get(&self.webhook_rejected_stale),
            webhook_rejected_malformed: get(&self.webhook_rejected_malformed),
            webhook_rejected_too_large: get(&self.webhook_rejected_too_large),
            webhook_failed: get(&self.webhook_failed),
            subscribers: get(&self.subscribers),
            subscriptions: get(&self.subscriptions),
            catch_ups: get(&self.catch_ups),
            pruned: get(&self.pruned),
            poller_leading: get(&self.poller_leading),
            lease_acquired: get(&self.lease_acquired),
            lease_lost: get(&self.lease_lost),
        }
    }
}
