//! Coalescing of concurrent writes into one upstream call, with one result per caller.
//!
//! Items with the same key (a survey's campaign and delay; "all customer upserts") join an open
//! batch. Each batch has a runner task that:
//! 1. waits for its turn: at most one *partial* batch per key is in flight, while full batches
//!    go at once;
//! 2. asks the lane for a budget slot — items keep joining while it waits, so under load batches
//!    fill up;
//! 3. seals the batch when the slot is granted and no more items are queued — it yields to the
//!    scheduler until the batch stops growing ([`BatchHandle::settle`]) — and sends it.
//!
//! There is no fixed linger timer: at low load a lone item is sent as soon as the budget allows
//! (a scheduler yield, microseconds); under load, items that arrive while a partial batch is in
//! flight, or while the budget is empty, collect into the next one. This is "natural batching"
//! (as in group commit): the cost is that a partial batch may wait for one upstream round trip
//! of the previous one for its key.
//!
//! Natural batching alone splits a steady crowd of callers in two: while batch A is in flight,
//! the other callers fill B; when A is answered, B goes at once and A's callers, coming back a
//! moment later, fill C, and so on, halving every batch. So a batch also expects the *wave* of
//! callers that the previous batch of its key has just answered ([`BatchHandle::gather`]): it
//! waits for as many more items as that batch answered, and stops waiting as soon as they are
//! there, when no item has joined for a short quiet gap, or after a small bound. Only a batch
//! answered in the last [`WAVE_WINDOW`] raises that expectation, so an isolated call never
//! waits.
//!
//! An item never shares a batch with another item of the same identity (a recipient's email, a
//! customer id): it goes to the next batch instead, so duplicates are applied in arrival order
//! and each caller gets the upstream's answer for its own request.
//!
//! A caller whose deadline passes while its item still sits in an open batch takes the item
//! out and gets `RESOURCE_EXHAUSTED` (the budget had no room in time). Once sealed, the batch's
//! attempts are bounded by the earliest deadline among its items, so every caller hears back in
//! time; items with less than `min_attempt_time` left are not sealed in.
//!
//! Each item keeps the span context of the caller that submitted it (when traces are exported),
//! so the batch's span can link to every caller it runs for.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::{Error, Result};
use crate::upstream::context::{CallContext, Priority};

/// How recently a batch of a key must have been answered for the next batches of that key to
/// expect its callers back. Callers that loop come back within one gRPC round trip.
pub const WAVE_WINDOW: Duration = Duration::from_millis(20);

/// Size limits of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_items: usize,
    /// Sum of the items' encoded sizes; keeps a request body reasonable when items are large.
    pub max_bytes: usize,
}

/// An item waiting in a batch.
pub struct Pending<I, O> {
    pub item: I,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    id: u64,
    identity: Option<String>,
    /// The span the caller submitted the item from, when traces are exported.
    caller: Option<SpanContext>,
    reply: oneshot::Sender<Result<O>>,
}

impl<I, O> Pending<I, O> {
    /// Answers the caller (who may have gone; then nothing happens).
    pub fn reply(self, result: Result<O>) {
        let _ = self.reply.send(result);
    }

    /// The span context of the caller that submitted the item, if it was traced.
    pub fn caller(&self) -> Option<&SpanContext> {
        self.caller.as_ref()
    }
}

/// The current span's context, for a batch to link to; `None` without trace export, so the
/// untraced path costs one flag test.
fn caller_context() -> Option<SpanContext> {
    if !crate::telemetry::traces_exported() {
        return None;
    }
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| span_context.clone())
}

struct OpenBatch<I, O> {
    id: u64,
    items: Vec<Pending<I, O>>,
    bytes: usize,
    identities: HashSet<String>,
    /// No more items fit (count or size): the batch may go without waiting its turn.
    full: bool,
    /// Items this batch expects to hold once the callers of the key's last answered batch are
    /// back (0: none expected); see [`BatchHandle::gather`].
    expect: usize,
}

/// The last answered batch of a key: when, and how many callers it answered.
#[derive(Clone, Copy)]
struct Wave {
    at: Instant,
    size: usize,
}

struct KeyState<I, O> {
    open: Vec<OpenBatch<I, O>>,
    /// Partial batches of this key sent and not yet answered.
    in_flight: usize,
    turn: Arc<Notify>,
    /// Woken whenever an item joins one of the key's open batches.
    grew: Arc<Notify>,
    last_wave: Option<Wave>,
}

impl<I, O> KeyState<I, O> {
    /// Nothing open, nothing in flight, and no recent wave to remember.
    fn idle(&self, now: Instant) -> bool {
        self.open.is_empty()
            && self.in_flight == 0
            && self
                .last_wave
                .is_none_or(|wave| now.duration_since(wave.at) >= WAVE_WINDOW)
    }
}

/// Keys kept while idle (for their recent wave) before idle ones are pruned.
const MAX_IDLE_KEYS: usize = 64;

struct State<K, I, O> {
    keys: HashMap<K, KeyState<I, O>>,
    next_id: u64,
}

/// Collects items per key into batches; see the module documentation.
pub struct Batcher<K, I, O> {
    state: Arc<Mutex<State<K, I, O>>>,
    limits: BatchLimits,
}

impl<K, I, O> Clone for Batcher<K, I, O> {
    fn clone(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
            limits: self.limits,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only move items between collections; a poisoned lock still holds
    // consistent state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where an item sits, for the caller that may have to take it out again.
enum Placement {
    Open { batch: u64 },
}

impl<K, I, O> Batcher<K, I, O>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                keys: HashMap::new(),
                next_id: 0,
            })),
            limits: BatchLimits {
                max_items: limits.max_items.max(1),
                max_bytes: limits.max_bytes.max(1),
            },
        }
    }

    /// Adds `item` to a batch of `key` and waits for its own result. `runner` is started for
    /// every new batch; it drives the batch through its [`BatchHandle`].
    ///
    /// `on_timeout` builds the error for a caller whose deadline passes while its item is still
    /// waiting in an open batch.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit<R, E>(
        &self,
        key: K,
        item: I,
        ctx: &CallContext,
        identity: Option<String>,
        bytes: usize,
        runner: R,
        on_timeout: E,
    ) -> Result<O>
    where
        R: FnOnce(BatchHandle<K, I, O>) -> BoxFuture<'static, ()>,
        E: FnOnce() -> Error,
    {
        let (reply, mut answer) = oneshot::channel();
        let caller = caller_context();
        let (item_id, placement) = {
            let mut state = lock(&self.state);
            let item_id = state.next_id;
            state.next_id += 1;
            let pending = Pending {
                item,
                priority: ctx.priority,
                deadline: ctx.deadline,
                id: item_id,
                identity,
                caller,
                reply,
            };
            let (placement, new_batch) = self.place(&mut state, &key, pending, bytes);
            drop(state);
            if let Some(batch) = new_batch {
                // The batch's spans join the trace of the call that opened it.
                tokio::spawn(
                    runner(BatchHandle {
                        batcher: self.clone(),
                        key: key.clone(),
                        batch,
                        turn_taken: false,
                        sealed: AtomicUsize::new(0),
                    })
                    .in_current_span(),
                );
            }
            (item_id, placement)
        };
        let Placement::Open { batch } = placement;
        if let Some(deadline) = ctx.deadline {
            tokio::select! {
                result = &mut answer => return flatten(result),
                () = tokio::time::sleep_until(deadline) => {}
            }
            if self.withdraw(&key, batch, item_id) {
                return Err(on_timeout());
            }
        }
        // Sealed: the runner's attempts are bounded by this item's deadline, so the answer
        // comes; the runner dropping the item without one is reported, never a hang.
        flatten(answer.await)
    }

    /// Puts the item in the first open batch of `key` that takes it, or in a new one.
    fn place(
        &self,
        state: &mut State<K, I, O>,
        key: &K,
        pending: Pending<I, O>,
        bytes: usize,
    ) -> (Placement, Option<u64>) {
        let limits = self.limits;
        let new_id = state.next_id;
        let now = Instant::now();
        if state.keys.len() >= MAX_IDLE_KEYS && !state.keys.contains_key(key) {
            state.keys.retain(|_, entry| !entry.idle(now));
        }
        let entry = state.keys.entry(key.clone()).or_insert_with(|| KeyState {
            open: Vec::new(),
            in_flight: 0,
            turn: Arc::new(Notify::new()),
            grew: Arc::new(Notify::new()),
            last_wave: None,
        });
        // A batch opened right after another was answered expects that one's callers back.
        let recent_wave = entry
            .last_wave
            .filter(|wave| now.duration_since(wave.at) < WAVE_WINDOW)
            .map_or(0, |wave| wave.size);
        let fits = |batch: &OpenBatch<I, O>| {
            !batch.full
                && batch.items.len() < limits.max_items
                && (batch.items.is_empty() || batch.bytes + bytes <= limits.max_bytes)
                && pending
                    .identity
                    .as_ref()
                    .is_none_or(|identity| !batch.identities.contains(identity))
        };
        let position = entry.open.iter().position(fits);
        let (batch, created) = match position {
            Some(index) => (&mut entry.open[index], false),
            None => {
                // A batch refused this item for size: nothing more will fit, let it go.
                for batch in &mut entry.open {
                    if batch.bytes + bytes > limits.max_bytes {
                        batch.full = true;
                    }
                }
                entry.open.push(OpenBatch {
                    id: new_id,
                    items: Vec::new(),
                    bytes: 0,
                    identities: HashSet::new(),
                    full: false,
                    expect: recent_wave,
                });
                let last = entry.open.len() - 1;
                (&mut entry.open[last], true)
            }
        };
        if let Some(identity) = &pending.identity {
            batch.identities.insert(identity.clone());
        }
        batch.bytes += bytes;
        batch.items.push(pending);
        if batch.items.len() >= limits.max_items || batch.bytes >= limits.max_bytes {
            batch.full = true;
        }
        let batch_id = batch.id;
        let became_full = batch.full;
        if became_full {
            entry.turn.notify_waiters();
        }
        entry.grew.notify_waiters();
        if created {
            state.next_id += 1;
        }
        (
            Placement::Open { batch: batch_id },
            created.then_some(batch_id),
        )
    }

    /// Takes an item out of a still-open batch. `false` when the batch was already sealed.
    fn withdraw(&self, key: &K, batch: u64, item: u64) -> bool {
        let mut state = lock(&self.state);
        let Some(entry) = state.keys.get_mut(key) else {
            return false;
        };
        let Some(open) = entry.open.iter_mut().find(|open| open.id == batch) else {
            return false;
        };
        let Some(index) = open.items.iter().position(|pending| pending.id == item) else {
            return false;
        };
        let pending = open.items.remove(index);
        if let Some(identity) = &pending.identity {
            open.identities.remove(identity);
        }
        true
    }
}

fn flatten<O>(result: std::result::Result<Result<O>, oneshot::error::RecvError>) -> Result<O> {
    result.unwrap_or_else(|_| Err(Error::internal("batch ended without an answer for an item")))
}

/// The runner's view of its batch.
pub struct BatchHandle<K, I, O>
where
    K: Eq + Hash,
{
    batcher: Batcher<K, I, O>,
    key: K,
    batch: u64,
    turn_taken: bool,
    /// Items taken by [`BatchHandle::seal`]: the wave this batch answers.
    sealed: AtomicUsize,
}

impl<K, I, O> BatchHandle<K, I, O>
where
    K: Eq + Hash + Clone,
{
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Waits until this batch may be sent: it is full, or no partial batch of its key is in
    /// flight. Returns `false` when the batch emptied meanwhile (every caller left).
    pub async fn wait_turn(&mut self) -> bool {
        let turn = {
            let state = lock(&self.batcher.state);
            match state.keys.get(&self.key) {
                Some(entry) => Arc::clone(&entry.turn),
                None => return false,
            }
        };
        loop {
            let mut notified = pin!(turn.notified());
            // Registered before checking, so a notification between the check and the await
            // is not lost.
            notified.as_mut().enable();
            {
                let mut state = lock(&self.batcher.state);
                let Some(entry) = state.keys.get_mut(&self.key) else {
                    return false;
                };
                let Some(open) = entry.open.iter().find(|open| open.id == self.batch) else {
                    return false;
                };
                if open.items.is_empty() {
                    return false;
                }
                if open.full || entry.in_flight == 0 {
                    entry.in_flight += 1;
                    self.turn_taken = true;
                    return true;
                }
            }
            notified.await;
        }
    }

    /// Items in the batch while it is open (0 once sealed or emptied), and whether it is full.
    pub fn open_len(&self) -> (usize, bool) {
        let state = lock(&self.batcher.state);
        state
            .keys
            .get(&self.key)
            .and_then(|entry| entry.open.iter().find(|open| open.id == self.batch))
            .map_or((0, true), |open| (open.items.len(), open.full))
    }

    /// Lets callers that are already runnable join before the batch is sealed: yields to the
    /// scheduler until the batch stops growing (or is full), at most `max_yields` times. This is
    /// the "no more items queued" condition of the flush: it costs microseconds, so a lone item
    /// is not delayed, while a burst of callers arriving together ends up in one call.
    pub async fn settle(&self, max_yields: usize) {
        let (mut size, mut full) = self.open_len();
        for _ in 0..max_yields {
            if full {
                return;
            }
            tokio::task::yield_now().await;
            let (now, now_full) = self.open_len();
            if now == size {
                return;
            }
            (size, full) = (now, now_full);
        }
    }

    /// Under sustained load, waits for the callers of the key's last answered batch to come
    /// back (see the module documentation): until the batch holds the items it expects, is
    /// full, no item joined for `quiet`, or `max` has passed. Returns at once when no wave is
    /// expected.
    pub async fn gather(&self, quiet: Duration, max: Duration) {
        let Some(grew) = ({
            let state = lock(&self.batcher.state);
            state
                .keys
                .get(&self.key)
                .map(|entry| Arc::clone(&entry.grew))
        }) else {
            return;
        };
        let give_up = Instant::now() + max;
        loop {
            let mut notified = pin!(grew.notified());
            // Registered before checking, so an item joining in between is not missed.
            notified.as_mut().enable();
            {
                let state = lock(&self.batcher.state);
                let Some(open) = state
                    .keys
                    .get(&self.key)
                    .and_then(|entry| entry.open.iter().find(|open| open.id == self.batch))
                else {
                    return;
                };
                if open.full || open.items.is_empty() || open.items.len() >= open.expect {
                    return;
                }
            }
            let now = Instant::now();
            if now >= give_up {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until((now + quiet).min(give_up)) => return,
            }
        }
    }

    /// The context to wait for budget with: the most urgent priority among the items, and the
    /// latest deadline (`None` if any item has none). `None` when the batch is empty.
    pub fn waiting_context(&self) -> Option<CallContext> {
        let state = lock(&self.batcher.state);
        let open = state
            .keys
            .get(&self.key)?
            .open
            .iter()
            .find(|open| open.id == self.batch)?;
        combined(open.items.iter(), Pick::Latest)
    }

    /// Closes the batch to new items and takes its items. Items with less than `min_time` left
    /// are answered with `too_late()` and left out.
    pub fn seal(
        &self,
        min_time: Duration,
        too_late: impl Fn() -> Error,
    ) -> (Vec<Pending<I, O>>, Option<CallContext>) {
        let items = {
            let mut state = lock(&self.batcher.state);
            let Some(entry) = state.keys.get_mut(&self.key) else {
                return (Vec::new(), None);
            };
            match entry.open.iter().position(|open| open.id == self.batch) {
                Some(index) => {
                    let open = entry.open.remove(index);
                    // A batch that was refused an item for size left its successor waiting.
                    entry.turn.notify_waiters();
                    self.sealed.store(open.items.len(), Ordering::Relaxed);
                    open.items
                }
                None => Vec::new(),
            }
        };
        let now = Instant::now();
        let (keep, late): (Vec<_>, Vec<_>) = items.into_iter().partition(|pending| {
            pending
                .deadline
                .is_none_or(|deadline| deadline.saturating_duration_since(now) >= min_time)
        });
        for pending in late {
            pending.reply(Err(too_late()));
        }
        // Sealed attempts must finish before the earliest deadline among the items.
        let ctx = combined(keep.iter(), Pick::Earliest);
        (keep, ctx)
    }

    /// Seals the batch and fails every item with `error`.
    pub fn fail_all(&self, error: &Error) {
        let (items, _) = self.seal(Duration::ZERO, || error.clone());
        for pending in items {
            pending.reply(Err(error.clone()));
        }
    }
}

/// Which deadline of a batch's items bounds the batch.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// While waiting for budget: as long as any item still wants to wait (`None` if any item
    /// has no deadline).
    Latest,
    /// Once sealed: the first deadline, so every caller hears back in time.
    Earliest,
}

/// The most urgent priority among the items and the deadline chosen by `pick`; `None` when
/// there are no items.
fn combined<'a, I: 'a, O: 'a>(
    items: impl Iterator<Item = &'a Pending<I, O>>,
    pick: Pick,
) -> Option<CallContext> {
    let mut priority: Option<Priority> = None;
    let mut deadlines = Vec::new();
    let mut unbounded = false;
    for pending in items {
        priority = Some(priority.map_or(pending.priority, |p| p.max(pending.priority)));
        match pending.deadline {
            Some(deadline) => deadlines.push(deadline),
            None => unbounded = true,
        }
    }
    let deadline = match pick {
        Pick::Latest if unbounded => None,
        Pick::Latest => deadlines.into_iter().max(),
        Pick::Earliest => deadlines.into_iter().min(),
    };
    Some(CallContext {
        priority: priority?,
        deadline,
        caller: None,
    })
}

impl<K, I, O> Drop for BatchHandle<K, I, O>
where
    K: Eq + Hash,
{
    fn drop(&mut self) {
        let mut state = lock(&self.batcher.state);
        let Some(entry) = state.keys.get_mut(&self.key) else {
            return;
        };
        if self.turn_taken {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        let answered = self.sealed.load(Ordering::Relaxed);
        if answered > 0 {
            // Its callers have their answers and, under load, are about to send again: the
            // batches open now expect them on top of what they hold.
            let now = Instant::now();
            entry.last_wave = Some(Wave {
                at: now,
                size: answered,
            });
            for open in &mut entry.open {
                open.expect = open.expect.max(open.items.len() + answered);
            }
        }
        // Items of a batch whose runner ended without sealing it would wait forever: answer
        // them.
        if let Some(index) = entry.open.iter().position(|open| open.id == self.batch) {
            let open = entry.open.remove(index);
            for pending in open.items {
                pending.reply(Err(Error::internal("batch runner stopped before sending")));
            }
        }
        entry.turn.notify_waiters();
        if entry.idle(Instant::now()) {
            state.keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests;
