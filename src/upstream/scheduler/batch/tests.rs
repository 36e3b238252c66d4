//! Batching tests with a paused clock: coalescing, per-item results, duplicates, deadlines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;

use super::*;
use crate::error::{ErrorCode, Reason};

/// What the fake upstream saw: one entry per call, with the items of that call.
type Calls = Arc<Mutex<Vec<Vec<String>>>>;

fn batcher(max_items: usize) -> Batcher<&'static str, String, String> {
    Batcher::new(BatchLimits {
        max_items,
        max_bytes: 1 << 20,
    })
}

/// A runner that takes its turn, seals, "sends" for 10 ms and answers each item with
/// `<item>@<call number>`.
fn runner(
    calls: &Calls,
) -> impl FnOnce(BatchHandle<&'static str, String, String>) -> BoxFuture<'static, ()> + use<> {
    runner_gathering(calls, None)
}

/// Like [`runner`], but with `gather = Some((quiet, max))` it also waits for the wave of
/// callers the key's last batch answered before sealing.
fn runner_gathering(
    calls: &Calls,
    gather: Option<(Duration, Duration)>,
) -> impl FnOnce(BatchHandle<&'static str, String, String>) -> BoxFuture<'static, ()> + use<> {
    let calls = Arc::clone(calls);
    move |mut handle| {
        async move {
            if !handle.wait_turn().await {
                return;
            }
            if let Some((quiet, max)) = gather {
                handle.gather(quiet, max).await;
            }
            let (items, _) = handle.seal(Duration::ZERO, || Error::internal("late"));
            let call = {
                let mut calls = calls.lock().unwrap();
                calls.push(items.iter().map(|p| p.item.clone()).collect());
                calls.len()
            };
            tokio::time::sleep(Duration::from_millis(10)).await;
            for pending in items {
                let answer = format!("{}@{call}", pending.item);
                pending.reply(Ok(answer));
            }
        }
        .boxed()
    }
}

/// The wave settings of the gateway's batchers: a 2 ms quiet gap, 5 ms at most.
const GATHER: Option<(Duration, Duration)> =
    Some((Duration::from_millis(2), Duration::from_millis(5)));

/// One item as a test submits it: under the key "k", 1 byte, without identity, for an
/// interactive caller without a deadline, unless changed.
struct Submission {
    key: &'static str,
    item: String,
    ctx: CallContext,
    identity: Option<String>,
    bytes: usize,
}

fn submission(item: impl Into<String>) -> Submission {
    Submission {
        key: "k",
        item: item.into(),
        ctx: CallContext::interactive(None),
        identity: None,
        bytes: 1,
    }
}

impl Submission {
    fn key(self, key: &'static str) -> Self {
        Self { key, ..self }
    }

    fn within(self, ctx: CallContext) -> Self {
        Self { ctx, ..self }
    }

    fn identity(self, identity: &str) -> Self {
        let identity = Some(identity.to_owned());
        Self { identity, ..self }
    }

    fn bytes(self, bytes: usize) -> Self {
        Self { bytes, ..self }
    }

    /// Submits the item from a task of its own (see [`Submission::through`]).
    fn spawn<R>(
        self,
        batcher: &Batcher<&'static str, String, String>,
        runner: R,
    ) -> tokio::task::JoinHandle<Result<String>>
    where
        R: FnOnce(BatchHandle<&'static str, String, String>) -> BoxFuture<'static, ()>
            + Send
            + 'static,
    {
        let batcher = batcher.clone();
        tokio::spawn(async move { self.through(&batcher, runner).await })
    }

    /// Submits the item to `batcher`, sent by `runner`; a refusal is [`budget_error`].
    async fn through<R>(
        self,
        batcher: &Batcher<&'static str, String, String>,
        runner: R,
    ) -> Result<String>
    where
        R: FnOnce(BatchHandle<&'static str, String, String>) -> BoxFuture<'static, ()>,
    {
        let Self {
            key,
            item,
            ctx,
            identity,
            bytes,
        } = self;
        batcher
            .submit(key, item, &ctx, identity, bytes, runner, budget_error)
            .await
    }
}

fn budget_error() -> Error {
    Error::new(
        ErrorCode::ResourceExhausted,
        Reason::UpstreamBudgetExhausted,
        "no room",
    )
}

#[tokio::test(start_paused = true)]
async fn concurrent_items_coalesce_into_full_batches_and_each_gets_its_own_result() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..250 {
        let batcher = batcher.clone();
        let runner = runner(&calls);
        tasks.push(tokio::spawn(async move {
            let item = format!("r{i}");
            submission(item.clone())
                .key("campaign")
                .identity(&item)
                .bytes(10)
                .through(&batcher, runner)
                .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let answer = task.await.unwrap().unwrap();
        assert!(answer.starts_with(&format!("r{i}@")), "{answer}");
    }
    let calls = calls.lock().unwrap();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 250);
    assert!(sizes.iter().all(|&size| size <= 100), "{sizes:?}");
    assert!(calls.len() <= 4, "{sizes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_lone_item_is_sent_without_delay() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let start = tokio::time::Instant::now();
    let answer = submission("solo")
        .key("campaign")
        .bytes(10)
        .through(&batcher, runner(&calls))
        .await
        .unwrap();
    assert_eq!(answer, "solo@1");
    // Only the fake upstream's 10 ms: no linger.
    assert_eq!(start.elapsed(), Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn one_partial_batch_in_flight_per_key_while_others_fill() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let first = {
        let batcher = batcher.clone();
        let runner = runner(&calls);
        tokio::spawn(async move { submission("a").through(&batcher, runner).await })
    };
    // Let the first batch go out alone.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut rest = Vec::new();
    for name in ["b", "c", "d"] {
        let batcher = batcher.clone();
        let runner = runner(&calls);
        rest.push(tokio::spawn(async move {
            submission(name).through(&batcher, runner).await
        }));
    }
    first.await.unwrap().unwrap();
    for task in rest {
        task.await.unwrap().unwrap();
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![
            vec!["a".to_owned()],
            vec!["b".into(), "c".into(), "d".into()]
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_identity_goes_to_the_next_batch() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let mut tasks = Vec::new();
    for (item, identity) in [("first", "ann@x"), ("other", "bob@x"), ("second", "ann@x")] {
        tasks.push(
            submission(item)
                .identity(identity)
                .spawn(&batcher, runner(&calls)),
        );
    }
    let answers: Vec<String> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(answers, vec!["first@1", "other@1", "second@2"]);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|call| {
        call.iter()
            .filter(|i| i.starts_with("first") || i.starts_with("second"))
            .count()
            <= 1
    }));
}

#[tokio::test(start_paused = true)]
async fn different_keys_never_share_a_batch() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let ctx = CallContext::interactive(None);
    let a = submission("x")
        .key("a")
        .within(ctx.clone())
        .through(&batcher, runner(&calls));
    let b = submission("y")
        .key("b")
        .within(ctx.clone())
        .through(&batcher, runner(&calls));
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.unwrap().as_str(), b.unwrap().as_str()), ("x@1", "y@2"));
}

#[tokio::test(start_paused = true)]
async fn an_item_whose_deadline_passes_before_sealing_is_withdrawn() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    // A runner that waits for the gate (as if queued for budget) before sealing.
    let gated = {
        let calls = Arc::clone(&calls);
        let gate = Arc::clone(&gate);
        move |mut handle: BatchHandle<&'static str, String, String>| {
            async move {
                handle.wait_turn().await;
                gate.notified().await;
                let (items, ctx) = handle.seal(Duration::ZERO, || Error::internal("late"));
                assert!(ctx.is_some_and(|ctx| ctx.deadline.is_none()));
                calls
                    .lock()
                    .unwrap()
                    .push(items.iter().map(|p| p.item.clone()).collect());
                for pending in items {
                    pending.reply(Ok("sent".to_owned()));
                }
            }
            .boxed()
        }
    };
    let impatient = {
        let batcher = batcher.clone();
        let gated = gated.clone();
        tokio::spawn(async move {
            submission("impatient")
                .within(CallContext::interactive_within(Duration::from_secs(1)))
                .through(&batcher, gated)
                .await
        })
    };
    let patient = {
        let batcher = batcher.clone();
        tokio::spawn(async move { submission("patient").through(&batcher, gated).await })
    };
    let error = impatient
        .await
        .unwrap()
        .expect_err("deadline passed in the open batch");
    assert_eq!(error.reason(), Reason::UpstreamBudgetExhausted);
    gate.notify_one();
    assert_eq!(patient.await.unwrap().unwrap(), "sent");
    assert_eq!(*calls.lock().unwrap(), vec![vec!["patient".to_owned()]]);
}

#[tokio::test(start_paused = true)]
async fn sealing_leaves_out_items_too_close_to_their_deadline() {
    let batcher = batcher(100);
    let answers = Arc::new(Mutex::new(None));
    let seal_late = {
        let answers = Arc::clone(&answers);
        move |mut handle: BatchHandle<&'static str, String, String>| {
            async move {
                handle.wait_turn().await;
                // Wait until the first item has only 0.5 s left.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (items, ctx) = handle.seal(Duration::from_secs(1), budget_error);
                *answers.lock().unwrap() = Some((items.len(), ctx.and_then(|c| c.deadline)));
                for pending in items {
                    pending.reply(Ok("sent".to_owned()));
                }
            }
            .boxed()
        }
    };
    let start = tokio::time::Instant::now();
    let short_ctx = CallContext::interactive_within(Duration::from_secs(1));
    let long_ctx = CallContext::interactive_within(Duration::from_secs(10));
    let short = submission("short")
        .within(short_ctx.clone())
        .through(&batcher, seal_late.clone());
    let long = submission("long")
        .within(long_ctx.clone())
        .through(&batcher, seal_late);
    let (short, long) = tokio::join!(short, long);
    assert_eq!(short.unwrap_err().code(), ErrorCode::ResourceExhausted);
    assert_eq!(long.unwrap(), "sent");
    let (count, deadline) = answers.lock().unwrap().unwrap();
    assert_eq!(count, 1);
    assert_eq!(deadline, Some(start + Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_gives_up_answers_its_items() {
    let batcher = batcher(100);
    let quitter = |_handle: BatchHandle<&'static str, String, String>| async {}.boxed();
    let error = submission("x")
        .through(&batcher, quitter)
        .await
        .expect_err("no answer");
    assert_eq!(error.code(), ErrorCode::Internal);
}

#[tokio::test(start_paused = true)]
async fn size_limit_splits_batches() {
    let batcher: Batcher<&'static str, String, String> = Batcher::new(BatchLimits {
        max_items: 100,
        max_bytes: 25,
    });
    let calls: Calls = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let submitted = submission(format!("i{i}")).bytes(10);
        tasks.push(submitted.spawn(&batcher, runner(&calls)));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let sizes: Vec<usize> = calls.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 5);
    assert!(sizes.iter().all(|&s| s <= 2), "{sizes:?}");
}

/// `callers` tasks, each sending `rounds` items one after another, and coming back one or two
/// milliseconds (a network round trip) after each answer. Returns the size of every upstream
/// call.
async fn crowd(gather: bool, callers: usize, rounds: usize) -> Vec<usize> {
    let batcher = batcher(10_000);
    let calls: Calls = Arc::default();
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let batcher = batcher.clone();
        let calls = Arc::clone(&calls);
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                // Callers do not arrive in lockstep: some take longer to come back than others.
                tokio::time::sleep(Duration::from_millis(1 + (caller % 2) as u64)).await;
                let item = format!("c{caller}-{round}");
                let ctx = CallContext::interactive(None);
                let run = runner_gathering(&calls, if gather { GATHER } else { None });
                let answer = submission(item.clone())
                    .key("customers")
                    .within(ctx.clone())
                    .bytes(10)
                    .through(&batcher, run)
                    .await;
                assert!(answer.unwrap().starts_with(&format!("{item}@")));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let sizes: Vec<usize> = calls.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), callers * rounds);
    sizes
}

#[tokio::test(start_paused = true)]
async fn a_steady_crowd_of_callers_is_not_split_in_two() {
    // Natural batching alone: while one batch is in flight the callers of the one before fill
    // the next, so 40 looping callers settle into batches of about 20.
    let split = crowd(false, 40, 20).await;
    let split_calls = split.len();
    // Waiting for the wave just answered keeps them together: about one call per round.
    let gathered = crowd(true, 40, 20).await;
    assert!(
        gathered.len() <= 25,
        "{} calls for 20 rounds of 40 callers: {gathered:?}",
        gathered.len()
    );
    assert!(
        gathered.len() * 3 < split_calls * 2,
        "gathered {gathered:?}, split {split:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wave_is_only_expected_right_after_an_answer_and_is_waited_for_briefly() {
    let batcher = batcher(100);
    let calls: Calls = Arc::default();
    let send = |name: &str| {
        let batcher = batcher.clone();
        let run = runner_gathering(&calls, GATHER);
        let item = name.to_owned();
        async move { submission(item).through(&batcher, run).await.unwrap() }
    };
    // Two callers answered together.
    let (a, b) = tokio::join!(send("a"), send("b"));
    assert_eq!((a.as_str(), b.as_str()), ("a@1", "b@1"));
    // One comes back at once, the other never does: the batch waits one quiet gap for it.
    let start = tokio::time::Instant::now();
    assert_eq!(send("a2").await, "a2@2");
    assert_eq!(start.elapsed(), Duration::from_millis(12));
    // Long after the last answer, nothing is expected: a lone item goes at once.
    tokio::time::sleep(WAVE_WINDOW * 2).await;
    let start = tokio::time::Instant::now();
    assert_eq!(send("solo").await, "solo@3");
    assert_eq!(start.elapsed(), Duration::from_millis(10));
}
