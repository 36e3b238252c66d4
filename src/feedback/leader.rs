//! Which replica polls: the feedback poller runs only on the replica that holds the poller's
//! lease ([`crate::store::leases`]), so replicas sharing one database make one poll per interval
//! in all, and another replica takes over when the holder dies.
//!
//! Every replica asks for the lease every third of its length; the holder's asking renews it.
//! A holder that cannot renew in time (its database is away, it was paused) stops polling
//! before its lease can have passed to another replica, and its writes carry the lease's epoch
//! ([`Fence`]), which the store checks in the write's own transaction: even a holder that
//! stopped noticing time (a long GC-like pause, a frozen VM) can neither append nor move the
//! checkpoint once another replica took over. On the embedded store the lease is always this
//! process's, so the poller has one path for both engines.
//!
//! Leadership shows in the log (`feedback poller leads` with the replica and epoch, and when it
//! is lost or released), in `/feedback/stats` (`poller_leading`) and in the metrics
//! (`cxgw.feedback.poller.leader`, and lease events in `cxgw.feedback.events`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::stats::FeedbackStats;
use crate::backoff::FailureStreak;
use crate::shutdown::Drain;
use crate::store::LeaseStore;
use crate::store::leases::Fence;

/// A name for this process as a lease holder: the host name (the pod's name on Kubernetes) and
/// a random suffix, since a restarted pod keeps its name but must not inherit its lease.
pub fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "replica".to_owned());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// This replica's side of one lease.
pub struct Leadership {
    leases: Arc<dyn LeaseStore>,
    lease: String,
    holder: String,
    stats: Arc<FeedbackStats>,
    drain: Drain,
}

/// One uninterrupted tenure of the lease; renewed in the background while it lasts. Dropping
/// it stops the renewals.
pub struct Term {
    fence: Fence,
    lost: Arc<Lost>,
    renewal: tokio::task::JoinHandle<()>,
}

/// The end of a term, told once.
struct Lost {
    flag: watch::Sender<bool>,
    holder: String,
    epoch: i64,
    stats: Arc<FeedbackStats>,
}

impl Lost {
    fn lose(&self, why: &'static str) {
        if self
            .flag
            .send_if_modified(|lost| !std::mem::replace(lost, true))
        {
            FeedbackStats::add(&self.stats.lease_lost, 1);
            self.stats.set_poller_leading(false);
            tracing::warn!(
                replica = %self.holder,
                epoch = self.epoch,
                why,
                "feedback poller lost its lease, polling stops here"
            );
        }
    }
}

impl Term {
    /// What the poller's writes carry.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.flag.borrow()
    }

    /// Resolves once the term is over.
    pub async fn lost(&self) {
        let mut lost = self.lost.flag.subscribe();
        // The sender lives in `self`, so the wait ends only with a loss.
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// The store refused a write of this term: another replica holds the lease now.
    pub fn taken_over(&self) {
        self.lost.lose("another replica took the lease over");
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl Leadership {
    pub fn new(
        leases: Arc<dyn LeaseStore>,
        lease: &str,
        holder: String,
        stats: Arc<FeedbackStats>,
        drain: Drain,
    ) -> Leadership {
        Leadership {
            leases,
            lease: lease.to_owned(),
            holder,
            stats,
            drain,
        }
    }

    /// Waits until this replica holds the lease, asking every third of its length; `None` when
    /// draining starts first.
    pub async fn acquire(&self) -> Option<Term> {
        let ttl = self.leases.lease_ttl();
        let every = ttl / 3;
        let mut failures = FailureStreak::new(every, every.max(Duration::from_secs(30)));
        loop {
            if self.drain.is_draining() {
                return None;
            }
            let asked = Instant::now();
            let wait = match self.leases.acquire_lease(&self.lease, &self.holder).await {
                Ok(Some(fence)) => {
                    failures.succeeded();
                    return Some(self.start_term(fence, asked, ttl));
                }
                Ok(None) => {
                    failures.succeeded();
                    every
                }
                Err(error) => {
                    let failure = failures.failed();
                    if let Some(suppressed) = failure.log {
                        tracing::warn!(
                            %error,
                            failures = failure.failures,
                            suppressed,
                            "cannot ask for the feedback poller's lease, retrying"
                        );
                    }
                    failure.delay
                }
            };
            tokio::select! {
                () = self.drain.clone().signaled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn start_term(&self, fence: Fence, asked: Instant, ttl: Duration) -> Term {
        FeedbackStats::add(&self.stats.lease_acquired, 1);
        self.stats.set_poller_leading(true);
        tracing::info!(
            replica = %self.holder,
            epoch = fence.epoch,
            lease = %fence.lease,
            "feedback poller leads"
        );
        let lost = Arc::new(Lost {
            flag: watch::Sender::new(false),
            holder: self.holder.clone(),
            epoch: fence.epoch,
            stats: Arc::clone(&self.stats),
        });
        let renewal = tokio::spawn(renew(
            Arc::clone(&self.leases),
            self.holder.clone(),
            fence.clone(),
            asked + ttl,
            ttl,
            Arc::clone(&lost),
        ));
        Term {
            fence,
            lost,
            renewal,
        }
    }

    /// Ends a term. When draining, gives the lease up so another replica takes over at once
    /// instead of after it expires (a rolling upgrade hands the poller over without a pause).
    pub async fn end(&self, term: Term) {
        term.renewal.abort();
        if !self.drain.is_draining() || term.is_lost() {
            return;
        }
        self.stats.set_poller_leading(false);
        match self.leases.release_lease(&term.fence).await {
            Ok(()) => tracing::info!(
                replica = %self.holder,
                epoch = term.fence.epoch,
                "feedback poller released its lease"
            ),
            // It expires by itself.
            Err(error) => tracing::warn!(%error, "cannot release the feedback poller's lease"),
        }
    }
}

/// Renews the lease every third of its length until it is lost. The term is over when a renewal
/// finds another holder, or when none succeeded before the lease's own end as counted from
/// when the last successful renewal was sent (so this replica stops before the database's
/// clock could let another one in).
async fn renew(
    leases: Arc<dyn LeaseStore>,
    holder: String,
    fence: Fence,
    mut valid_until: Instant,
    ttl: Duration,
    lost: Arc<Lost>,
) {
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        let asked = Instant::now();
        let renewed =
            tokio::time::timeout_at(valid_until, leases.acquire_lease(&fence.lease, &holder)).await;
        match renewed {
            Ok(Ok(Some(renewed))) if renewed.epoch == fence.epoch => valid_until = asked + ttl,
            // Someone else holds it, or held it in between (a new epoch).
            Ok(Ok(_)) => {
                lost.lose("another replica took the lease over");
                return;
            }
            Ok(Err(error)) if Instant::now() < valid_until => {
                tracing::warn!(%error, "cannot renew the feedback poller's lease, retrying");
            }
            Ok(Err(_)) | Err(_) => {
                lost.lose("the lease could not be renewed in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::shutdown;
    use crate::store::StoreError;

    /// What the scripted store answers to every request for the lease.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Answer {
        Granted(i64),
        Taken,
        Unreachable,
    }

    struct ScriptedLeases {
        answer: Mutex<Answer>,
        asked: Mutex<Vec<Instant>>,
        released: Mutex<Vec<i64>>,
    }

    impl ScriptedLeases {
        fn new(answer: Answer) -> Arc<ScriptedLeases> {
            Arc::new(ScriptedLeases {
                answer: Mutex::new(answer),
                asked: Mutex::new(Vec::new()),
                released: Mutex::new(Vec::new()),
            })
        }

        fn answer(&self, answer: Answer) {
            *self.answer.lock().unwrap() = answer;
        }
    }

    const TTL: Duration = Duration::from_secs(3);

    #[async_trait::async_trait]
    impl LeaseStore for ScriptedLeases {
        fn lease_ttl(&self) -> Duration {
            TTL
        }

        async fn acquire_lease(
            &self,
            lease: &str,
            _holder: &str,
        ) -> Result<Option<Fence>, StoreError> {
            self.asked.lock().unwrap().push(Instant::now());
            match *self.answer.lock().unwrap() {
                Answer::Granted(epoch) => Ok(Some(Fence {
                    lease: lease.to_owned(),
                    epoch,
                })),
                Answer::Taken => Ok(None),
                Answer::Unreachable => Err(StoreError::unavailable("the database is away")),
            }
        }

        async fn release_lease(&self, fence: &Fence) -> Result<(), StoreError> {
            self.released.lock().unwrap().push(fence.epoch);
            Ok(())
        }
    }

    fn leadership(leases: &Arc<ScriptedLeases>, drain: Drain) -> (Leadership, Arc<FeedbackStats>) {
        let stats = Arc::new(FeedbackStats::default());
        let leadership = Leadership::new(
            Arc::clone(leases) as Arc<dyn LeaseStore>,
            "feedback.retently",
            "replica-a".to_owned(),
            Arc::clone(&stats),
            drain,
        );
        (leadership, stats)
    }

    /// A standby asks every third of the lease until it is granted; the term then lasts while
    /// renewals keep the epoch, and ends at the first renewal that finds another holder.
    #[tokio::test(start_paused = true)]
    async fn a_term_lasts_while_renewed_and_ends_when_taken_over() {
        let leases = ScriptedLeases::new(Answer::Taken);
        let (_trigger, drain) = shutdown::channel();
        let (leadership, stats) = leadership(&leases, drain);
        let started = Instant::now();
        let granting = {
            let leases = Arc::clone(&leases);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                leases.answer(Answer::Granted(7));
            })
        };
        let term = leadership.acquire().await.expect("granted");
        granting.await.unwrap();
        assert_eq!(term.fence().epoch, 7);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3),
            "asked every second"
        );
        assert_eq!(
            stats
                .poller_leading
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!term.is_lost(), "renewed with the same epoch");
        leases.answer(Answer::Taken);
        let taken = Instant::now();
        term.lost().await;
        assert!(taken.elapsed() <= TTL / 3);
        assert_eq!(
            stats
                .poller_leading
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(
            stats.lease_lost.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    /// A holder granted the lease at `epoch` on its first ask, with the trigger of its drain.
    async fn granted(
        epoch: i64,
    ) -> (
        Arc<ScriptedLeases>,
        shutdown::DrainTrigger,
        (Leadership, Arc<FeedbackStats>),
        Term,
    ) {
        let leases = ScriptedLeases::new(Answer::Granted(epoch));
        let (trigger, drain) = shutdown::channel();
        let (leadership, stats) = leadership(&leases, drain);
        let term = leadership.acquire().await.expect("granted");
        (leases, trigger, (leadership, stats), term)
    }

    /// A holder that cannot reach the store stops leading when its lease may have run out,
    /// counted from the last renewal that succeeded, not later.
    #[tokio::test(start_paused = true)]
    async fn a_term_ends_when_no_renewal_succeeded_within_the_lease() {
        let (leases, _trigger, _leadership, term) = granted(1).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        leases.answer(Answer::Unreachable);
        // The last success was the renewal at 1 s: the lease holds until 4 s.
        term.lost().await;
        let renewals = leases.asked.lock().unwrap().clone();
        let granted_at = renewals[0];
        assert_eq!(
            Instant::now() - granted_at,
            Duration::from_secs(4),
            "lost exactly when the lease renewed at 1 s ran out"
        );
    }

    /// A draining holder gives its lease up, so another replica does not wait for it to expire.
    #[tokio::test(start_paused = true)]
    async fn a_draining_holder_releases_its_lease() {
        let (leases, trigger, (leadership, stats), term) = granted(4).await;
        trigger.start();
        leadership.end(term).await;
        assert_eq!(*leases.released.lock().unwrap(), [4]);
        assert_eq!(
            stats
                .poller_leading
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert!(
            leadership.acquire().await.is_none(),
            "no new term while draining"
        );
    }
}
