//! A shard: the subscriptions that hash to it and the loop that takes their due
//! deliveries and starts one `attempt::deliver` per free slot — a slot of the subscription
//! (`delivery.concurrency`) and one of the process (`--max-deliveries-in-flight`, shared by
//! every shard, handed out in turn while they run short) — on the shard's runners (one per
//! runtime worker), not a task each. Depends on the registry (`super::Deliveries`, the
//! store behind it) and `attempt`; owns no policy of its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::attempt::{Taken, deliver};
use super::health::Health;
use super::{Deliveries, DeliveryConfig};

pub(super) struct Subscription {
    pub(super) config: Arc<DeliveryConfig>,
    /// `config.url`, parsed once.
    pub(super) url: reqwest::Url,
    /// Metric series of a 2xx delivery, resolved once.
    pub(super) success: (prometheus::IntCounter, prometheus::Histogram),
    pub(super) slots: Arc<Semaphore>,
    pub(super) limiter: Option<Arc<RateBucket>>,
    pub(super) health: Arc<Health>,
}

/// A request's place: one of its subscription's slots and one of the process's, given
/// back (and uncounted) when the attempt ends, however it ends.
pub(super) struct Slot {
    _subscription: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Slot {
    fn new(subscription: OwnedSemaphorePermit, process: OwnedSemaphorePermit, gauge: &prometheus::IntGauge) -> Slot {
        gauge.inc();
        Slot {
            _subscription: subscription,
            _process: process,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Process-wide slots for up to `need` requests: `reserved` (one the shard waited for)
/// first, then what is free now, without waiting.
fn process_slots(
    slots: &Arc<Semaphore>,
    reserved: &mut Option<OwnedSemaphorePermit>,
    need: usize,
) -> Vec<OwnedSemaphorePermit> {
    let mut got: Vec<OwnedSemaphorePermit> = reserved.take().into_iter().collect();
    while got.len() < need {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            break;
        };
        got.push(permit);
    }
    got
}

/// The order in which a round visits the shard's subscriptions (`subs` sorted by UID):
/// from `first` on, wrapping around, so that when process-wide slots run out the one left
/// waiting goes first next time — not, every round, the same ones. `first` may be gone
/// since: its successor starts. Pure.
fn in_turn<T>(mut subs: Vec<T>, first: Option<&str>, uid: impl Fn(&T) -> &str) -> Vec<T> {
    if let Some(first) = first {
        let at = subs.partition_point(|s| uid(s) < first);
        subs.rotate_left(at);
    }
    subs
}

/// A subscription's `rateLimitPerSecond` (it counts requests): a bucket of up to one
/// second's tokens, refilled continuously. Written here rather than taken from `governor`
/// because the shard must know how many requests may go *before* it takes them from the
/// queue and their slots (governor's limiter can only take): a request waiting for its
/// token would hold a process-wide slot, and tokens taken for deliveries that turn out not
/// to be takeable would be lost.
pub(super) struct RateBucket {
    per_second: f64,
    /// (tokens, when they were counted).
    state: Mutex<(f64, std::time::Instant)>,
}

impl RateBucket {
    pub(super) fn new(per_second: std::num::NonZeroU32, now: std::time::Instant) -> RateBucket {
        let per_second = f64::from(per_second.get());
        RateBucket {
            per_second,
            state: Mutex::new((per_second, now)),
        }
    }

    fn refilled(&self, state: &mut (f64, std::time::Instant), now: std::time::Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.per_second).min(self.per_second);
        state.1 = state.1.max(now);
    }

    /// Whole tokens at `now`, and when the next one comes if there is none.
    fn available(&self, now: std::time::Instant) -> (usize, Duration) {
        let mut state = self.state.lock();
        self.refilled(&mut state, now);
        let whole = state.0.max(0.0).floor() as usize;
        let next = Duration::from_secs_f64(((1.0 - state.0) / self.per_second).max(0.0));
        (whole, next)
    }

    /// Spends a token per request sent.
    fn spend(&self, requests: usize, now: std::time::Instant) {
        let mut state = self.state.lock();
        self.refilled(&mut state, now);
        state.0 -= requests as f64;
    }
}

/// The UID of the subscription at `at` in this round's order (wrapping), to start the next.
fn turn_after(subs: &[Arc<Subscription>], at: usize) -> Option<String> {
    subs.get(at.checked_rem(subs.len())?).map(|s| s.config.uid.clone())
}

#[derive(Default)]
pub(super) struct Shard {
    pub(super) index: usize,
    /// By UID: sorted, so a round can start where the last one stopped.
    pub(super) subscriptions: Mutex<BTreeMap<String, Arc<Subscription>>>,
    pub(super) wake: Notify,
}

/// The slots a subscription may use now: all that are free, or, while its endpoint is
/// failing, one probe once nothing is in flight and the probe is due (`wake_at` then
/// comes no later than it). Pure.
fn probe_slots(
    free: usize,
    concurrency: usize,
    probe_at: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
    wake_at: &mut jiff::Timestamp,
) -> usize {
    let Some(probe_at) = probe_at else { return free };
    if free < concurrency {
        // A request is in flight: its outcome decides (and wakes the shard).
        return 0;
    }
    if probe_at > now {
        *wake_at = (*wake_at).min(probe_at);
        return 0;
    }
    free.min(1)
}

/// Queue heads a round is about to take from and memory does not hold (at a start, or a
/// window run low): read first, a few at once, on blocking threads and without the store's
/// lock, so a cold read of a large store holds up neither the runtime nor other queues.
async fn read_heads(deliveries: &Arc<Deliveries>, subs: &[Arc<Subscription>]) {
    use futures::StreamExt as _;
    let store = &deliveries.store;
    let reads: Vec<(String, bool)> = subs
        .iter()
        .filter(|s| !s.config.paused && !s.health.is_disabled() && s.slots.available_permits() > 0)
        .filter(|s| store.wants_read(&s.config.uid, s.config.ordered))
        .map(|s| (s.config.uid.clone(), s.config.ordered))
        .collect();
    if reads.is_empty() {
        return;
    }
    futures::stream::iter(reads)
        .map(|(uid, ordered)| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.read_ahead(&uid, ordered))
        })
        .buffer_unordered(HEAD_READS)
        .for_each(|read| async move {
            // A failed read is the take's to report: it reads again, under the lock.
            if let Ok(Err(err)) = read {
                tracing::debug!(%err, "cannot read a queue's head ahead of its take");
            }
        })
        .await;
}

/// `taken` with their events: what memory does not hold is read in one go off the
/// runtime, so that the attempts need not read one each. One that is not found here is
/// left to its attempt (which reads again, and says why it cannot).
async fn with_events(deliveries: &Arc<Deliveries>, taken: Vec<crate::store::PendingDelivery>) -> Vec<Taken> {
    let store = &deliveries.store;
    let mut out: Vec<Taken> = taken
        .into_iter()
        .map(|d| {
            let e = store.cached_event(&d.event_id);
            (d, e)
        })
        .collect();
    let missing: Vec<String> = out
        .iter()
        .filter(|(_, e)| e.is_none())
        .map(|(d, _)| d.event_id.clone())
        .collect();
    if missing.len() < 2 {
        return out;
    }
    let store = store.clone();
    let Ok(read) = tokio::task::spawn_blocking(move || store.events(&missing)).await else {
        return out;
    };
    let mut read = read.into_iter();
    for (_, e) in out.iter_mut().filter(|(_, e)| e.is_none()) {
        *e = read.next().and_then(Result::ok).flatten();
    }
    out
}

/// Queue heads a shard reads at once (each on a blocking thread).
const HEAD_READS: usize = 4;

/// A delivery attempt the shard runs (boxed: the shard holds many at once).
type Attempt = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Takes due deliveries until `stop`; then takes none, and the attempts already started
/// finish (the lifecycle waits for the shard up to its deadline). Attempts do not get a
/// task each: the loop that takes hands them to a few runners, one per runtime worker, each
/// polling its attempts together — so a shard with one busy subscription still uses every
/// core, and the attempts that finish between two polls cost one wake-up, not one each.
pub(super) async fn run_shard(deliveries: Arc<Deliveries>, shard: Arc<Shard>, stop: CancellationToken) {
    use tracing::Instrument as _;
    let workers = tokio::runtime::Handle::current().metrics().num_workers().max(1);
    let mut runners = tokio::task::JoinSet::new();
    let mut started = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Attempt>();
        started.push(tx);
        runners.spawn(run_attempts(rx).in_current_span());
    }
    take_rounds(deliveries, shard, stop, started).await;
    // The senders are gone with the loop: each runner finishes what it was handed.
    while let Some(ended) = runners.join_next().await {
        if let Err(err) = ended {
            warn!(%err, "a delivery runner ended abnormally");
        }
    }
}

/// Polls the attempts it is handed until the sender is gone and they are all done.
async fn run_attempts(mut new: tokio::sync::mpsc::UnboundedReceiver<Attempt>) {
    use futures::StreamExt as _;
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            attempt = new.recv() => match attempt {
                Some(attempt) => running.push(attempt),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

/// Wraps an attempt so that a panic in it (a bug) is counted and ends that attempt only,
/// not its runner and the other attempts on it. (Its deliveries stay in flight until a
/// restart: the attempt's own `catch_unwind` around the request is what retries them.)
fn guarded(
    metrics: crate::metrics::Metrics,
    attempt: impl std::future::Future<Output = ()> + Send + 'static,
) -> Attempt {
    use futures::FutureExt as _;
    Box::pin(async move {
        if std::panic::AssertUnwindSafe(attempt).catch_unwind().await.is_err() {
            crate::panics::record(&metrics, "delivery");
        }
    })
}

async fn take_rounds(
    deliveries: Arc<Deliveries>,
    shard: Arc<Shard>,
    stop: CancellationToken,
    started: Vec<tokio::sync::mpsc::UnboundedSender<Attempt>>,
) {
    // The runner the next attempt goes to (in turn).
    let mut next_runner = 0usize;
    // Where the next round starts when process-wide slots ran out, and the slot this shard
    // waited its turn for.
    let mut first: Option<String> = None;
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // The store cannot commit: a completion would not be durable, so no new attempts
        // until it can (those in flight wait for their completion's commit).
        if deliveries.store.commits_fail().is_some() {
            reserved = None;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        // On a shared store, another replica delivers a shard this one does not own.
        if let Some(sharing) = deliveries.store.sharing()
            && !sharing.owns(shard.index as u32)
        {
            reserved = None;
            tokio::select! {
                () = stop.cancelled() => return,
                () = shard.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        // By UID (the map's key is the subscription's UID).
        let subs: Vec<Arc<Subscription>> = shard.subscriptions.lock().values().cloned().collect();
        let subs = in_turn(subs, first.take().as_deref(), |s| s.config.uid.as_str());
        read_heads(&deliveries, &subs).await;
        let now = jiff::Timestamp::now();
        let clock = std::time::Instant::now();
        let mut wake_at = now + Duration::from_secs(1);
        // Set when a subscription with due work found no process-wide slot: the shard then
        // waits for one, in turn with the other shards.
        let mut starved = false;
        for (at, sub) in subs.iter().enumerate() {
            if starved {
                break;
            }
            let config = &sub.config;
            if config.paused || sub.health.is_disabled() {
                continue;
            }
            // Until the endpoint has echoed the challenge (`endpoint.verify`), events queue.
            if let Err(again) = deliveries.verified(sub, &shard) {
                let wait = again.saturating_duration_since(std::time::Instant::now());
                wake_at = wake_at.min(now + wait);
                continue;
            }
            // Batched, a request waits until it is full or its oldest event has waited
            // maxWait; each free slot then carries up to maxEvents.
            let per_request = config.batch.map_or(1, |b| b.max_events.max(1));
            // A sink URI's dead-letter copies share this queue and are made exactly while the
            // endpoint fails: limiting the queue to probes would hold them behind it.
            let probe_at = match config.dead_letter_sink {
                Some(super::Sink::Uri(_)) => None,
                _ => sub
                    .health
                    .probe_at(super::health::probe_interval(&config.retry_schedule), now),
            };
            let mut free = probe_slots(
                sub.slots.available_permits(),
                config.concurrency.max(1) as usize,
                probe_at,
                now,
                &mut wake_at,
            );
            // Held back for a probe: its own wake-up (or a completion) decides, not a poll.
            let probing = probe_at.is_some() && free == 0;
            // Set while a batch waits to fill: the shard sleeps until it is due.
            let mut filling = false;
            // Whether this subscription sent a request in this round (its turn is used).
            let mut sent = false;
            // Set when its rate limit holds due work back: the shard wakes for the token.
            let mut rate_limited = false;
            while free > 0 {
                if let Some(batch) = config.batch {
                    let due = deliveries.store.next_due(&config.uid);
                    let counts = deliveries.store.counts(&config.uid);
                    let waiting = counts.backlog.saturating_sub(counts.in_flight) as usize;
                    let filled = waiting >= batch.max_events;
                    let waited = due.is_some_and(|d| d + batch.max_wait <= now);
                    if !filled && !waited {
                        if let Some(d) = due {
                            wake_at = wake_at.min(d + batch.max_wait);
                            filling = true;
                        }
                        break;
                    }
                }
                // Nothing due (or only held back, e.g. behind a mailbox's request in
                // flight): no slot is taken, and the shard sleeps as usual.
                if deliveries.store.next_due(&config.uid).is_none_or(|due| due > now) {
                    break;
                }
                // The rate limit first: a request that may not go yet takes no slot.
                let tokens = match &sub.limiter {
                    Some(bucket) => {
                        let (tokens, next) = bucket.available(clock);
                        if tokens == 0 {
                            rate_limited = true;
                            wake_at = wake_at.min(now + next);
                            break;
                        }
                        tokens
                    }
                    None => usize::MAX,
                };
                let need = (if config.batch.is_some() { 1 } else { free }).min(tokens);
                let mut process = process_slots(&deliveries.in_flight, &mut reserved, need);
                if process.is_empty() {
                    // Out of process-wide slots with work due: the next round starts here,
                    // or with the next subscription if this one already sent in this one.
                    starved = true;
                    first = turn_after(&subs, if sent { at + 1 } else { at });
                    break;
                }
                let slots_short = process.len() < need;
                let got = process.len();
                let want = if config.batch.is_some() { per_request } else { got };
                let taken = match deliveries.store.take_due(&config.uid, now, want, config.ordered) {
                    Ok(taken) => taken,
                    Err(err) => {
                        warn!(%err, subscription = config.name, "cannot read the delivery queue");
                        // One slot is kept for the round's next subscription: the shard may
                        // have waited its turn for it.
                        reserved = process.pop();
                        break;
                    }
                };
                if taken.is_empty() {
                    // Due but held back (e.g. behind its mailbox's request in flight).
                    reserved = process.pop();
                    break;
                }
                // Unbatched: every slot got was used, fewer than were free here, and more
                // is due: the slots ran short, and the next subscription goes first.
                let short = config.batch.is_none()
                    && slots_short
                    && taken.len() == got
                    && deliveries.store.next_due(&config.uid).is_some_and(|due| due <= now);
                // Unbatched, each request would read its one event: what memory lacks is
                // read here for all of them in one go instead (a batch reads its own).
                let requests: Vec<Vec<Taken>> = if config.batch.is_some() {
                    vec![taken.into_iter().map(|d| (d, None)).collect()]
                } else {
                    with_events(&deliveries, taken)
                        .await
                        .into_iter()
                        .map(|t| vec![t])
                        .collect()
                };
                let mut sent_now = 0;
                for request in requests {
                    // One process slot per request was taken above (a batch is one request).
                    let (Some(process), Ok(permit)) = (process.pop(), sub.slots.clone().try_acquire_owned()) else {
                        // Only this loop takes slots, so they cannot run out: should it happen,
                        // what was taken goes back rather than stay in flight.
                        free = 0;
                        for (d, _) in request {
                            if let Err(err) = deliveries.store.retry(d) {
                                warn!(%err, subscription = config.name, "cannot put a delivery back; it is due again after a restart");
                            }
                        }
                        continue;
                    };
                    free = free.saturating_sub(1);
                    sent = true;
                    sent_now += 1;
                    let attempt = deliver(
                        deliveries.clone(),
                        shard.clone(),
                        sub.clone(),
                        request,
                        Slot::new(permit, process, &deliveries.metrics.requests_in_flight),
                    );
                    next_runner = next_runner.wrapping_add(1);
                    let attempt = guarded(deliveries.metrics.clone(), attempt);
                    // Runners live until this loop ends; should one be gone all the same,
                    // the attempt runs as a task of its own rather than stay in flight.
                    let unsent = match started.get(next_runner % started.len().max(1)) {
                        Some(runner) => runner.send(attempt).err().map(|e| e.0),
                        None => Some(attempt),
                    };
                    if let Some(attempt) = unsent {
                        warn!("a delivery runner of this shard is gone; the attempt runs on its own");
                        tokio::spawn(attempt);
                    }
                }
                if let Some(bucket) = &sub.limiter {
                    bucket.spend(sent_now, clock);
                }
                if short {
                    starved = true;
                    first = turn_after(&subs, at + 1);
                }
                if config.batch.is_none() {
                    break;
                }
            }
            if let Some(due) = deliveries
                .store
                .next_due(&config.uid)
                .filter(|_| !filling && !probing && !rate_limited)
            {
                // A due delivery that is held back (ordering, no free slot) is retried
                // when a delivery finishes, or after a short pause.
                wake_at = wake_at.min(due.max(now + Duration::from_millis(100)));
            }
        }
        if starved {
            // A process-wide slot is waited for in turn (first come, first served across
            // shards) and kept for the next round, which starts where this one stopped.
            tokio::select! {
                () = stop.cancelled() => return,
                permit = deliveries.in_flight.clone().acquire_owned() => reserved = permit.ok(),
            }
            continue;
        }
        // Not needed after all (its work was gone): back for the other shards.
        reserved = None;
        let sleep = Duration::try_from(wake_at.duration_since(jiff::Timestamp::now())).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = stop.cancelled() => return,
            () = shard.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_starts_with_the_subscription_left_waiting() {
        let subs = |uids: &[&str]| uids.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let in_turn = |subs: Vec<String>, first: Option<&str>| in_turn(subs, first, |s| s.as_str());
        assert_eq!(in_turn(subs(&["a", "b", "c"]), None), ["a", "b", "c"]);
        assert_eq!(in_turn(subs(&["a", "b", "c"]), Some("b")), ["b", "c", "a"]);
        assert_eq!(
            in_turn(subs(&["a", "c", "d"]), Some("b")),
            ["c", "d", "a"],
            "b is gone: its successor"
        );
        assert_eq!(
            in_turn(subs(&["a", "b"]), Some("z")),
            ["a", "b"],
            "past the end: from the start"
        );
        assert!(in_turn(subs(&[]), Some("a")).is_empty());
    }

    #[test]
    fn the_rate_bucket_lets_a_second_s_worth_go_then_refills() {
        let start = std::time::Instant::now();
        let two = std::num::NonZeroU32::MIN.saturating_add(1);
        let bucket = RateBucket::new(two, start);
        assert_eq!(bucket.available(start).0, 2, "a full second's worth at first");
        bucket.spend(2, start);
        let (tokens, next) = bucket.available(start);
        assert_eq!(tokens, 0);
        assert_eq!(next, Duration::from_millis(500), "the next token in 1/rate");
        let later = start + Duration::from_millis(750);
        assert_eq!(bucket.available(later).0, 1);
        assert_eq!(
            bucket.available(start + Duration::from_secs(60)).0,
            2,
            "never more than the burst"
        );
        // Asking takes nothing.
        assert_eq!(bucket.available(start + Duration::from_secs(60)).0, 2);
        // A clock read earlier than the last one counts as no time passed.
        bucket.spend(2, start + Duration::from_secs(60));
        assert_eq!(bucket.available(start).0, 0);
    }

    #[test]
    fn process_slots_take_the_reserved_one_first_and_never_wait() {
        let slots = Arc::new(Semaphore::new(3));
        let mut reserved = slots.clone().try_acquire_owned().ok();
        let got = process_slots(&slots, &mut reserved, 5);
        assert_eq!(got.len(), 3, "the reserved one and the two free");
        assert!(reserved.is_none());
        assert!(
            process_slots(&slots, &mut reserved, 1).is_empty(),
            "none free: none, at once"
        );
        drop(got);
        assert_eq!(process_slots(&slots, &mut reserved, 2).len(), 2, "no more than asked");
    }

    #[test]
    fn a_failing_endpoint_gets_one_probe_at_a_time_once_it_is_due() {
        let now = jiff::Timestamp::from_second(1_800_000_000).expect("time");
        let later = now + Duration::from_secs(1);
        let far = now + Duration::from_secs(60);
        let mut wake = far;
        // Not failing: every free slot.
        assert_eq!(probe_slots(3, 4, None, now, &mut wake), 3);
        assert_eq!(wake, far);
        // Failing, nothing in flight, probe due: one request.
        assert_eq!(probe_slots(4, 4, Some(now), now, &mut wake), 1);
        // Failing with a request in flight: none; its outcome wakes the shard.
        assert_eq!(probe_slots(3, 4, Some(now), now, &mut wake), 0);
        assert_eq!(wake, far);
        // Failing, probe not due yet: none, and the shard wakes for it.
        assert_eq!(probe_slots(4, 4, Some(later), now, &mut wake), 0);
        assert_eq!(wake, later);
    }
}
