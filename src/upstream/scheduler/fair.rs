//! Fair shares of the budget between callers: weighted fair queueing inside a priority class,
//! and optional hard per-caller quotas.
//!
//! Each caller (`CallContext::caller`; calls without one share a single flow) has its own FIFO
//! of waiting attempts. When a slot frees, the class serves the flow whose head has the smallest
//! virtual finish tag — self-clocked fair queueing: a flow that becomes active starts one
//! "cost" after the current virtual time, and each grant advances its tag by `1 / weight`. So
//! while several callers wait, each gets grants in proportion to its weight whatever its
//! backlog: a caller flooding with a thousand queued attempts gets one grant per round like a
//! caller with one, and an idle caller earns no credit to burst with later. Tags are kept only
//! for the head of each flow, so attempts that leave the queue (deadline, cancellation) need no
//! re-tagging.
//!
//! The same tags tell how long a new attempt would wait ([`FairQueue::ahead`]): its own backlog
//! plus, from each other flow, only the attempts tagged before it. The lane sheds an attempt
//! whose wait exceeds its deadline, so a flooding caller is refused for its excess while a
//! trickling caller is still admitted — which is the point.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use super::Waiter;

/// A caller's share of an upstream's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerShare {
    /// Relative weight when callers compete for slots (1 ..= 1000; 0 is treated as 1).
    pub weight: u32,
    /// Attempts this caller may start per quota window (a minute in production), if capped.
    pub quota_per_minute: Option<u32>,
}

impl Default for CallerShare {
    fn default() -> Self {
        Self {
            weight: 1,
            quota_per_minute: None,
        }
    }
}

/// Where the lane learns each caller's share; asked on every admission, so a source that
/// reloads (the callers file) takes effect at once.
pub trait CallerShares: Send + Sync + fmt::Debug {
    fn share(&self, caller: &str) -> CallerShare;
}

/// Every caller has weight 1 and no quota.
#[derive(Debug, Clone, Copy, Default)]
pub struct EqualShares;

impl CallerShares for EqualShares {
    fn share(&self, _caller: &str) -> CallerShare {
        CallerShare::default()
    }
}

/// A flow: the waiting attempts of one caller in one class.
pub(super) type FlowKey = Option<Arc<str>>;

/// Virtual time of one grant at weight 1. Large so that `SCALE / weight` stays exact enough for
/// weights up to 1000, small enough that u128 never overflows in any realistic uptime.
const SCALE: u128 = 1 << 40;

fn cost(weight: u32) -> u128 {
    SCALE / u128::from(weight.max(1))
}

#[derive(Debug)]
struct Flow {
    waiters: VecDeque<Waiter>,
    /// Virtual time a grant costs this flow (`SCALE / weight`).
    cost: u128,
    /// Finish tag of the waiter at the front.
    head_tag: u128,
}

impl Flow {
    /// Drops waiters at the front whose caller left; the next one inherits the head tag, so a
    /// flow is never charged for a grant it did not get.
    fn prune_front(&mut self) -> usize {
        let mut pruned = 0;
        while self.waiters.front().is_some_and(|w| w.grant.is_closed()) {
            self.waiters.pop_front();
            pruned += 1;
        }
        pruned
    }
}

/// The waiting attempts of one priority class, served in weighted fair order between callers
/// and in arrival order within a caller.
#[derive(Debug, Default)]
pub(super) struct FairQueue {
    /// A `BTreeMap` so that ties between equal tags break the same way every time.
    flows: BTreeMap<FlowKey, Flow>,
    /// Finish tag of the last grant.
    virtual_time: u128,
    len: usize,
}

impl FairQueue {
    /// Waiting attempts (including some whose caller just left and are not pruned yet).
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push(&mut self, key: FlowKey, weight: u32, waiter: Waiter) {
        let cost = cost(weight);
        let virtual_time = self.virtual_time;
        let flow = self.flows.entry(key).or_insert_with(|| Flow {
            waiters: VecDeque::new(),
            cost,
            head_tag: virtual_time + cost,
        });
        // The weight may have changed with a reload of the callers.
        flow.cost = cost;
        flow.waiters.push_back(waiter);
        self.len += 1;
    }

    fn prune(&mut self) {
        let mut pruned = 0;
        self.flows.retain(|_, flow| {
            pruned += flow.prune_front();
            !flow.waiters.is_empty()
        });
        self.len -= pruned;
    }

    /// The next waiter still listening: the head of the flow with the smallest tag.
    pub(super) fn pop(&mut self) -> Option<Waiter> {
        self.prune();
        let key = self
            .flows
            .iter()
            .min_by_key(|(_, flow)| flow.head_tag)
            .map(|(key, _)| key.clone())?;
        let flow = self.flows.get_mut(&key)?;
        let waiter = flow.waiters.pop_front()?;
        self.len -= 1;
        self.virtual_time = self.virtual_time.max(flow.head_tag);
        if flow.waiters.is_empty() {
            // An emptied flow starts afresh from the virtual time when it comes back: no credit
            // for having been idle.
            self.flows.remove(&key);
        } else {
            flow.head_tag += flow.cost;
        }
        Some(waiter)
    }

    pub(super) fn has_live(&mut self) -> bool {
        self.prune();
        !self.flows.is_empty()
    }

    pub(super) fn remove(&mut self, id: u64) {
        let mut removed = 0;
        self.flows.retain(|_, flow| {
            let before = flow.waiters.len();
            flow.waiters.retain(|waiter| waiter.id != id);
            removed += before - flow.waiters.len();
            !flow.waiters.is_empty()
        });
        self.len -= removed;
    }

    /// Grants this class would make before a new attempt of flow `key` at `weight`, if nothing
    /// else arrived: the flow's own backlog plus the attempts of other flows tagged no later.
    pub(super) fn ahead(&self, key: &FlowKey, weight: u32) -> usize {
        let (own, tag) = match self.flows.get(key) {
            Some(flow) => {
                let queued = flow.waiters.len();
                (queued, flow.head_tag + queued as u128 * flow.cost)
            }
            None => (0, self.virtual_time + cost(weight)),
        };
        own + self
            .flows
            .iter()
            .filter(|(other, flow)| *other != key && flow.head_tag <= tag)
            .map(|(_, flow)| {
                let before = (tag - flow.head_tag) / flow.cost + 1;
                usize::try_from(before).map_or(flow.waiters.len(), |n| n.min(flow.waiters.len()))
            })
            .sum::<usize>()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod queue_tests {
    use tokio::sync::oneshot;

    use super::*;

    fn key(name: &str) -> FlowKey {
        Some(Arc::from(name))
    }

    /// Pushes a waiter and keeps its receiver alive so it counts as listening.
    fn push(
        queue: &mut FairQueue,
        receivers: &mut Vec<oneshot::Receiver<super::super::Grant>>,
        name: &str,
        weight: u32,
        id: u64,
    ) {
        let (grant, receiver) = oneshot::channel();
        receivers.push(receiver);
        queue.push(key(name), weight, Waiter { id, grant });
    }

    fn order(queue: &mut FairQueue, ids: &[(u64, &str)]) -> String {
        let mut served = String::new();
        while let Some(waiter) = queue.pop() {
            let name = ids.iter().find(|(id, _)| *id == waiter.id).unwrap().1;
            served.push_str(name);
        }
        served
    }

    /// A queue of listening waiters, each labelled so the order they are served in reads as a
    /// string.
    #[derive(Default)]
    struct Labelled {
        queue: FairQueue,
        receivers: Vec<oneshot::Receiver<super::super::Grant>>,
        labels: Vec<(u64, &'static str)>,
    }

    impl Labelled {
        fn push(&mut self, name: &str, weight: u32, id: u64, label: &'static str) {
            push(&mut self.queue, &mut self.receivers, name, weight, id);
            self.labels.push((id, label));
        }

        /// Serves every waiter: their labels, in the order served.
        fn order(&mut self) -> String {
            order(&mut self.queue, &self.labels)
        }
    }

    #[test]
    fn a_backlog_does_not_crowd_out_a_newcomer() {
        let mut queued = Labelled::default();
        for id in 0..6 {
            queued.push("a", 1, id, "a");
        }
        for id in 100..102 {
            queued.push("b", 1, id, "b");
        }
        // b arrived after six of a's attempts, yet alternates with a at once.
        assert_eq!(queued.order(), "ababaaaa");
        assert_eq!(queued.queue.len(), 0);
    }

    #[test]
    fn grants_follow_the_weights() {
        let mut queued = Labelled::default();
        for id in 0..12 {
            queued.push("heavy", 3, id, "H");
            queued.push("light", 1, 100 + id, "L");
        }
        let served = queued.order();
        let first_eight = &served[..8];
        assert_eq!(first_eight.matches('H').count(), 6, "{served}");
        assert_eq!(first_eight.matches('L').count(), 2, "{served}");
    }

    #[test]
    fn leavers_are_skipped_without_charging_their_flow() {
        let mut queue = FairQueue::default();
        let mut receivers = Vec::new();
        push(&mut queue, &mut receivers, "a", 1, 1);
        push(&mut queue, &mut receivers, "a", 1, 2);
        push(&mut queue, &mut receivers, "b", 1, 3);
        drop(receivers.remove(0));
        queue.remove(2);
        assert_eq!(queue.len(), 2);
        assert!(queue.has_live());
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.pop().map(|w| w.id), Some(3));
        assert!(!queue.has_live());
    }

    #[test]
    fn the_estimate_counts_only_what_is_served_first() {
        let mut queue = FairQueue::default();
        let mut receivers = Vec::new();
        for id in 0..50 {
            push(&mut queue, &mut receivers, "flood", 1, id);
        }
        // A newcomer waits behind one of the flood's attempts, not fifty.
        assert_eq!(queue.ahead(&key("trickle"), 1), 1);
        // The flood's next attempt waits behind its own fifty.
        assert_eq!(queue.ahead(&key("flood"), 1), 50);
        // With weight 4 against 1, a newcomer still goes after at most one.
        assert!(queue.ahead(&key("vip"), 4) <= 1);
        push(&mut queue, &mut receivers, "trickle", 1, 100);
        assert_eq!(queue.ahead(&key("trickle"), 1), 1 + 2);
    }
}
