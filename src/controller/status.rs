//! The status writer: the one place that writes status. It composes what the reconcilers
//! decided (Ready) with what delivery measured (Healthy, counters) and patches the status
//! subresource at a bounded rate: within a pass (passes are at least `PASS_SPACING`, 250 ms,
//! apart) when a condition changes, otherwise at most
//! every `COUNTER_INTERVAL` per resource, however many events flow. Writes run in the
//! background, `WRITE_CONCURRENCY` at a time and within the client-side API budget
//! (`ApiLimiter`), condition changes before counter refreshes: a slow write holds up only
//! its own resource.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType as K8sEventType;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::conditions::{self, Desired, HEALTHY, READY, Status};
use super::{ApiLimiter, Context, FilterState, SubscriptionState, write_status};
use crate::api::{DeliveryFailure, MailboxFilterStatus, WebhookSubscription, WebhookSubscriptionStatus};
use crate::delivery::health::{HealthClass, HealthSnapshot, Published};
use crate::handles::MatchCount;
use crate::store::{BacklogCap, QueueCounts};
use futures::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Counter-only changes are written at most this often per resource: a thousand busy
/// subscriptions cost at most 200 writes a second.
pub const COUNTER_INTERVAL: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);
/// Passes start at least this far apart, however often the writer is woken.
const PASS_SPACING: Duration = Duration::from_millis(250);
/// One status write or Event may take this long; a stuck request must not stall the
/// status of every other resource (the kube client's own read timeout is minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `call` bounded by CALL_TIMEOUT.
async fn bounded<T>(what: &str, call: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{what} took longer than {}s", CALL_TIMEOUT.as_secs())),
    }
}

/// Reasons on the `Healthy` condition of a WebhookSubscription: how delivery is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthReason {
    AwaitingDelivery,
    EndpointHealthy,
    EndpointFailing,
    EndpointDisabled,
    Paused,
    StoreUnavailable,
    BacklogFull,
}

impl HealthReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthReason::AwaitingDelivery => "AwaitingDelivery",
            HealthReason::EndpointHealthy => "EndpointHealthy",
            HealthReason::EndpointFailing => "EndpointFailing",
            HealthReason::EndpointDisabled => "EndpointDisabled",
            HealthReason::Paused => "Paused",
            HealthReason::StoreUnavailable => "StoreUnavailable",
            HealthReason::BacklogFull => "BacklogFull",
        }
    }
}

impl conditions::Reason for HealthReason {
    fn as_str(&self) -> &'static str {
        HealthReason::as_str(self)
    }
}

/// Whether `conditions` (as written to the API) have `Healthy` with `reason`.
fn healthy_is(conditions: &[Condition], reason: HealthReason) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == HEALTHY && c.reason == reason.as_str())
}

fn time(t: jiff::Timestamp) -> Time {
    Time(t)
}

/// The figure of `cap` the backlog `counts` is at, named for a person, if any. Once full
/// (`was_full`) it stays so until the backlog is below nine tenths of that figure: a
/// backlog hovering at its cap must not flip the condition with every event. Pure.
pub fn backlog_full(cap: Option<&BacklogCap>, counts: &QueueCounts, was_full: bool) -> Option<String> {
    let cap = cap?;
    let reached = |max: u64, n: u64| n >= if was_full { max - max / 10 } else { max };
    if let Some(max) = cap.events.filter(|max| reached(*max, counts.backlog)) {
        return Some(format!("delivery.maxBacklog.events ({max})"));
    }
    if let Some(max) = cap.bytes.filter(|max| reached(*max, counts.bytes)) {
        return Some(format!("delivery.maxBacklog.bytes ({max} bytes)"));
    }
    None
}

/// The `Healthy` condition from delivery health, whether the backlog is at its cap
/// (`full`: the figure reached, from `backlog_full`) and, while the store cannot commit,
/// why not (`store_down`). Pure.
pub fn healthy_condition(
    health: &HealthSnapshot,
    paused: bool,
    full: Option<&str>,
    store_down: Option<&str>,
) -> Desired<HealthReason> {
    let last_error = || {
        health
            .last_failure
            .as_ref()
            .map(|f| format!("{} at {}", f.message, f.time.strftime("%Y-%m-%dT%H:%M:%SZ")))
            .unwrap_or_default()
    };
    // Why the backlog does not drain, for the BacklogFull message.
    let cause = || match health.class() {
        HealthClass::Disabled => format!(
            "Deliveries stopped: {}; last error: {}.",
            health.disabled.as_deref().unwrap_or("disabled"),
            last_error()
        ),
        _ if paused => "Deliveries are paused (spec.paused: true).".to_string(),
        HealthClass::Failing => format!(
            "The endpoint is failing ({} consecutive failed attempt(s); last: {}).",
            health.consecutive_failures,
            last_error()
        ),
        HealthClass::Healthy | HealthClass::Unknown => {
            "The endpoint takes events more slowly than they arrive (see delivery.concurrency and rateLimitPerSecond)."
                .to_string()
        }
    };
    let (status, reason, message) = match health.class() {
        // Every delivery waits on it, whatever the endpoint does.
        _ if store_down.is_some() => (
            Status::False,
            HealthReason::StoreUnavailable,
            format!(
                "Deliveries are paused: the store cannot commit ({}). New events are refused (HTTP 503, SMTP 451; 507 and 452 when its volume is full) until it can; nothing acknowledged is lost, and deliveries resume by themselves. Check the database (or the store volume).",
                store_down.unwrap_or_default()
            ),
        ),
        // Said before the endpoint's state, which it includes: events are being set aside.
        _ if full.is_some() => (
            Status::False,
            HealthReason::BacklogFull,
            format!(
                "The backlog is at {}: new events for this subscription go straight to its dead letters instead of waiting (other subscriptions are not affected). {} Fix the endpoint or raise delivery.maxBacklog, then replay the dead letters (annotation mailhook.io/replay-requested-at).",
                full.unwrap_or_default(),
                cause()
            ),
        ),
        HealthClass::Disabled => (
            Status::False,
            HealthReason::EndpointDisabled,
            format!(
                "Deliveries stopped: {}. Last error: {}. Events keep queueing; fix the endpoint, then edit the subscription to resume.",
                health.disabled.as_deref().unwrap_or("disabled"),
                last_error()
            ),
        ),
        _ if paused => (
            Status::Unknown,
            HealthReason::Paused,
            "Deliveries are paused (spec.paused: true).".to_string(),
        ),
        HealthClass::Failing => (
            Status::False,
            HealthReason::EndpointFailing,
            format!(
                "{} consecutive failed attempt(s); last: {}. Deliveries are retried on delivery.retrySchedule, one request at a time until one succeeds; check that the endpoint is up and answers 2xx.",
                health.consecutive_failures,
                last_error()
            ),
        ),
        HealthClass::Healthy => (
            Status::True,
            HealthReason::EndpointHealthy,
            format!(
                "The endpoint accepts deliveries (median latency {} ms).",
                health.latency_p50_ms.unwrap_or_default()
            ),
        ),
        HealthClass::Unknown => (
            Status::Unknown,
            HealthReason::AwaitingDelivery,
            "No delivery has been attempted yet.".to_string(),
        ),
    };
    Desired {
        type_: HEALTHY,
        status,
        reason,
        message,
    }
}

/// A subscription's full status. Pure.
pub fn subscription_status(
    previous: &WebhookSubscriptionStatus,
    state: &SubscriptionState,
    health: &HealthSnapshot,
    counts: QueueCounts,
    store_down: Option<&str>,
    now: &Time,
) -> WebhookSubscriptionStatus {
    let mut status = previous.clone();
    let generation = state.generation;
    status.observed_generation = generation;
    let ready = super::subscription::with_verification(state.ready.clone(), health.verification.as_ref());
    conditions::set(&mut status.conditions, ready.clone(), generation, now);
    let was_full = healthy_is(&previous.conditions, HealthReason::BacklogFull);
    let full = backlog_full(state.backlog_cap.as_ref(), &counts, was_full);
    conditions::set(
        &mut status.conditions,
        healthy_condition(health, state.paused, full.as_deref(), store_down),
        generation,
        now,
    );
    conditions::set_progress(
        &mut status.conditions,
        super::subscription::progress(&ready),
        generation,
        now,
    );
    status.endpoint_host = state.endpoint_host.clone();
    status.signing_public_keys = state.signing_public_keys.clone();
    status.encryption_key_id = state.encryption_key_id.clone();
    status.insecure_skip_tls_verify = state.insecure_skip_tls_verify;
    status.grants = state.grants.clone();
    status.shard = Some(state.shard);
    status.delivered = health.delivered;
    status.failed_attempts = health.failed_attempts;
    status.consecutive_failures = health.consecutive_failures;
    status.backlog = counts.backlog;
    status.backlog_bytes = counts.bytes;
    // A time, not an age: status changes when the head of the queue does, not every second.
    status.oldest_pending_time = counts.oldest_accepted.map(time);
    status.dead_lettered = counts.dead_lettered;
    status.last_success_time = health.last_success.map(time).or(status.last_success_time);
    status.last_failure = health
        .last_failure
        .as_ref()
        .map(|f| DeliveryFailure {
            time: time(f.time),
            http_status: f.http_status,
            message: f.message.clone(),
        })
        .or(status.last_failure);
    status.recent_latency_ms = health.latency_p50_ms.or(status.recent_latency_ms);
    if state.last_replay.is_some() {
        status.last_replay = state.last_replay.clone();
    }
    status
}

/// A filter's full status. Pure.
pub fn filter_status(
    previous: &MailboxFilterStatus,
    state: &FilterState,
    users: Vec<String>,
    matched: MatchCount,
    now: &Time,
) -> MailboxFilterStatus {
    let mut status = previous.clone();
    status.observed_generation = state.generation;
    conditions::set_ready(&mut status.conditions, &state.ready, state.generation, now);
    status.subscriptions = users;
    status.matched_messages = matched.0;
    status.last_match_time = matched.1.map(time).or(status.last_match_time);
    status
}

/// The part of status that, when it changes, is written at once.
fn urgent_key(conditions: &[Condition], generation: Option<i64>) -> Vec<(String, String, String, Option<i64>)> {
    conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone(), generation))
        .collect()
}

struct Written<S> {
    status: S,
    at: Instant,
}

/// Whether to write `desired` now, given what was last written.
fn due<S: PartialEq>(desired: &S, last: Option<&Written<S>>, urgent: bool) -> bool {
    match last {
        None => true,
        Some(w) if &w.status == desired => false,
        Some(w) => urgent || w.at.elapsed() >= COUNTER_INTERVAL,
    }
}

/// Status writes (and their Events) in flight at once, across passes: a thousand resources
/// becoming Ready together take a thousand round trips, which one at a time would take
/// minutes.
const WRITE_CONCURRENCY: usize = 16;

/// What one write wrote: the UID and the status, or None.
type Wrote<S> = Option<Box<(String, S)>>;

/// A finished write, by kind.
enum Done {
    Subscription(Wrote<WebhookSubscriptionStatus>),
    Filter(Wrote<MailboxFilterStatus>),
}

/// A due write, not started yet: `write` does nothing until spawned.
struct Job<F> {
    uid: String,
    /// A condition, the generation, a filter's users or a replay changed: it goes before
    /// counter refreshes.
    urgent: bool,
    write: F,
}

type Queued = Job<BoxFuture<'static, Done>>;

/// Due writes in the order to start them: urgent first, otherwise as found. A resource
/// whose write is still in flight waits for a later pass: two writes of one resource at
/// once could land out of order.
fn schedule<F>(jobs: Vec<Job<F>>, in_flight: &HashSet<&str>) -> VecDeque<Job<F>> {
    let (urgent, counters): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .filter(|j| !in_flight.contains(j.uid.as_str()))
        .partition(|j| j.urgent);
    urgent.into_iter().chain(counters).collect()
}

/// What the writer keeps across passes. Writes run as tasks of their own, so a slow one
/// holds up only its own resource; dropping the writer (at shutdown) aborts them.
#[derive(Default)]
struct Writer {
    subscriptions: HashMap<String, Written<WebhookSubscriptionStatus>>,
    filters: HashMap<String, Written<MailboxFilterStatus>>,
    /// Due writes waiting for a slot; each pass replaces it with what is due then.
    queue: VecDeque<Queued>,
    tasks: JoinSet<Done>,
    /// The resource (UID) each task writes.
    in_flight: HashMap<tokio::task::Id, String>,
}

impl Writer {
    fn in_flight(&self) -> HashSet<&str> {
        self.in_flight.values().map(String::as_str).collect()
    }

    /// Starts queued writes while slots are free. A counter refresh starts only with a
    /// token to spare, taken here (its write does not wait for another): when the budget
    /// is short, counter refreshes wait and condition changes go first.
    fn start(&mut self, limiter: &ApiLimiter) {
        while self.tasks.len() < WRITE_CONCURRENCY {
            let Some(job) = self.queue.front() else { return };
            if !job.urgent && limiter.check().is_err() {
                return;
            }
            let Some(job) = self.queue.pop_front() else { return };
            let task = self.tasks.spawn(job.write);
            self.in_flight.insert(task.id(), job.uid);
        }
    }

    /// A write finished: records it and starts what waits for its slot.
    fn refill(&mut self, finished: Result<(tokio::task::Id, Done), tokio::task::JoinError>, ctx: &Context) {
        self.finish(finished, ctx.leadership.is_leader());
        self.start(&ctx.api_limiter);
    }

    /// Frees a finished write's slot and records what it wrote, while this replica leads.
    fn finish(&mut self, finished: Result<(tokio::task::Id, Done), tokio::task::JoinError>, leader: bool) {
        let (id, done) = match finished {
            Ok((id, done)) => (id, Some(done)),
            Err(err) => {
                tracing::error!(%err, "a status write stopped unexpectedly; retried on a later pass");
                (err.id(), None)
            }
        };
        self.in_flight.remove(&id);
        let at = Instant::now();
        match done {
            Some(Done::Subscription(Some(written))) if leader => {
                let (uid, status) = *written;
                self.subscriptions.insert(uid, Written { status, at });
            }
            Some(Done::Filter(Some(written))) if leader => {
                let (uid, status) = *written;
                self.filters.insert(uid, Written { status, at });
            }
            _ => {}
        }
    }
}

/// Writes status until `shutdown`: a pass every TICK or when woken (PASS_SPACING apart),
/// whatever is in flight;
/// a write's slot is refilled as soon as it finishes.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut writer = Writer::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_pass: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(finished) = writer.tasks.join_next_with_id() => {
                writer.refill(finished, &ctx);
                continue;
            }
            () = ctx.status_changed.notified() => {}
            _ = tick.tick() => {}
        }
        // A pass looks at every resource: a burst of wake-ups (a thousand subscriptions'
        // first deliveries after a start) makes one pass per PASS_SPACING, not one each.
        if let Some(next) = last_pass.map(|at| at + PASS_SPACING) {
            let until = tokio::time::sleep_until(next.into());
            tokio::pin!(until);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    Some(finished) = writer.tasks.join_next_with_id() => writer.refill(finished, &ctx),
                    () = &mut until => break,
                }
            }
        }
        last_pass = Some(Instant::now());
        // A pass may take round trips to the store: shutdown does not wait for it.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = pass(&ctx, &mut writer) => {}
        }
    }
}

/// One pass: the writes due now replace the queue, and as many start as slots allow.
async fn pass(ctx: &Arc<Context>, writer: &mut Writer) {
    // Not the leader: what this replica wrote before says nothing of what the leader
    // writes now; when it leads again it starts from the resources as they are.
    let leader = ctx.leadership.is_leader();
    if !leader {
        writer.subscriptions.clear();
        writer.filters.clear();
    }
    // Computed all the same: a pass also keeps metrics and drops what was deleted.
    let mut jobs = subscription_writes(ctx, &mut writer.subscriptions).await;
    jobs.extend(filter_writes(ctx, &mut writer.filters).await);
    if !leader {
        jobs.clear();
    }
    writer.queue = schedule(jobs, &writer.in_flight());
    writer.start(&ctx.api_limiter);
}

/// A kind whose status the writer writes.
trait Kind:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl Kind for WebhookSubscription {}
impl Kind for crate::api::MailboxFilter {}

/// One status to write: the object, where it is, and what to write.
struct Write<K, S> {
    object: Arc<K>,
    uid: String,
    ns: String,
    name: String,
    previous: Vec<Condition>,
    desired: S,
}

/// The job writing `w`: urgent ones wait for a token of their own, counter refreshes are
/// started with one (`Writer::start`).
fn job<K: Kind, S>(ctx: &Arc<Context>, w: Write<K, S>, urgent: bool, done: fn(Wrote<S>) -> Done) -> Queued
where
    S: serde::Serialize + HasConditions + Send + Sync + 'static,
{
    let ctx = ctx.clone();
    Job {
        uid: w.uid.clone(),
        urgent,
        write: Box::pin(async move { done(write_one(&ctx, w, urgent).await.map(Box::new)) }),
    }
}

/// Writes one status and announces its transitions; what was written, or None.
async fn write_one<K: Kind, S>(ctx: &Context, w: Write<K, S>, wait_for_token: bool) -> Option<(String, S)>
where
    S: serde::Serialize + HasConditions,
{
    if wait_for_token {
        ctx.api_limiter.until_ready().await;
    }
    // One writer: with several replicas, the leader — asked per write, as leadership can
    // move while a write waits.
    if !ctx.leadership.is_leader() {
        return None;
    }
    let result = bounded(
        "status write",
        write_status::<K>(&ctx.client, &w.ns, &w.name, &w.desired),
    )
    .await;
    let outcome = if result.is_ok() { "written" } else { "failed" };
    ctx.metrics
        .status_writes
        .with_label_values(&[&K::kind(&()), outcome])
        .inc();
    if let Err(err) = result {
        warn!(namespace = w.ns, name = w.name, %err, "cannot write status; will retry");
        return None;
    }
    announce(ctx, w.object.as_ref(), &w.previous, w.desired.conditions()).await;
    Some((w.uid, w.desired))
}

/// Statuses with conditions.
trait HasConditions {
    fn conditions(&self) -> &[Condition];
}

impl HasConditions for WebhookSubscriptionStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

impl HasConditions for MailboxFilterStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

/// The subscriptions' due writes; keeps the metrics and forgets deleted subscriptions.
async fn subscription_writes(
    ctx: &Arc<Context>,
    written: &mut HashMap<String, Written<WebhookSubscriptionStatus>>,
) -> Vec<Queued> {
    let now = Time(jiff::Timestamp::now());
    let (queues, store) = (ctx.deliveries.queues(), ctx.deliveries.backend());
    ctx.metrics.store_disk_bytes.set(store.disk_bytes().unwrap_or(0) as i64);
    let (size, available) = store.volume().unwrap_or((0, 0));
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    ctx.metrics.store_volume_bytes.set(gauge(size));
    ctx.metrics.store_volume_available_bytes.set(gauge(available));
    if let Some(read) = queues.queue_rows_read() {
        // Counted by the store; the metric follows it.
        let counter = &ctx.metrics.store_queue_rows_read;
        counter.inc_by(read.saturating_sub(counter.get()));
    }
    ctx.metrics.store_backlog.set(queues.total_backlog() as i64);
    // Commit failures are counted by the store's commit thread; the metric follows it.
    let failed = ctx.metrics.store_errors.with_label_values(&["commit"]);
    failed.inc_by(store.commit_failures().saturating_sub(failed.get()));
    if let Some(sharing) = store.sharing() {
        let fenced = &ctx.metrics.fenced_writes;
        fenced.inc_by(sharing.fenced_writes().saturating_sub(fenced.get()));
    }
    let store_down = store.unavailable();
    // Shared store: what every shard's owner published (the leader writes from it).
    let published = match store.sharing() {
        None => None,
        Some(_) => {
            let s = store.clone();
            let read = tokio::task::spawn_blocking(move || s.sharing().map(|sh| sh.published_health())).await;
            match read {
                Ok(Some(Ok(rows))) => Some(
                    rows.into_iter()
                        .filter_map(|row| {
                            serde_json::from_value::<Published>(row.body)
                                .ok()
                                .map(|p| (row.uid, (p, row.owner)))
                        })
                        .collect::<HashMap<_, _>>(),
                ),
                Ok(Some(Err(err))) => {
                    warn!(%err, "cannot read the delivery health the replicas published; status waits");
                    return Vec::new();
                }
                _ => return Vec::new(),
            }
        }
    };
    let objects = ctx.subscriptions.state();
    // This replica's queue figures, read off the runtime: each queue's oldest event is a
    // read of the store, a cold one at a start with a large backlog.
    let mut counted: HashMap<String, QueueCounts> = HashMap::new();
    if published.is_none() {
        let uids: Vec<String> = objects.iter().filter_map(|w| w.uid()).collect();
        let q = queues.clone();
        let read = tokio::task::spawn_blocking(move || {
            uids.into_iter()
                .map(|uid| {
                    let counts = q.counts(&uid);
                    (uid, counts)
                })
                .collect::<HashMap<_, _>>()
        });
        counted = read.await.unwrap_or_default();
    }
    let (states, filters) = {
        let state = ctx.state.lock();
        (state.subscriptions.clone(), state.filters.clone())
    };
    // Read after the states: a state at or below it is in the routing table (see Routes).
    let routed = ctx.routes.routed();
    let mut jobs = Vec::new();
    for whs in &objects {
        let Some(uid) = whs.uid() else { continue };
        let Some(state) = states.get(&uid) else {
            continue;
        };
        let (ns, name) = (whs.namespace().unwrap_or_default(), whs.name_any());
        // A shared store's figures come from the shard's owner, through the store.
        let (health, counts, owner) = match published.as_ref().and_then(|p| p.get(&uid)) {
            Some((p, owner)) => (p.snapshot(), p.counts(), Some(owner.clone())),
            None if published.is_some() => (HealthSnapshot::default(), QueueCounts::default(), None),
            None => (
                ctx.deliveries.health(&uid).unwrap_or_default(),
                counted.remove(&uid).unwrap_or_else(|| queues.counts(&uid)),
                None,
            ),
        };
        let replayed = published
            .as_ref()
            .and_then(|p| p.get(&uid))
            .and_then(|(p, _)| p.last_replay.clone())
            .and_then(|v| serde_json::from_value::<crate::api::ReplayStatus>(v).ok());
        let labels = [ns.as_str(), name.as_str()];
        ctx.metrics
            .backlog
            .with_label_values(&labels)
            .set(counts.backlog as i64);
        ctx.metrics
            .dead_letters
            .with_label_values(&labels)
            .set(counts.dead_lettered as i64);
        ctx.metrics
            .backlog_bytes
            .with_label_values(&labels)
            .set(gauge(counts.bytes));
        let age = counts
            .oldest_accepted
            .map_or(0, |t| now.0.duration_since(t).as_secs().max(0));
        ctx.metrics.backlog_oldest_age.with_label_values(&labels).set(age);
        // The store counts since it started; the counter follows it.
        let overflowed = ctx.metrics.backlog_overflowed.with_label_values(&labels);
        overflowed.inc_by(counts.overflowed.saturating_sub(overflowed.get()));
        ctx.metrics
            .endpoint_up
            .with_label_values(&labels)
            .set(i64::from(health.class() == HealthClass::Healthy));
        ctx.metrics
            .endpoint_disabled
            .with_label_values(&labels)
            .set(i64::from(health.disabled.is_some()));
        // Not routed yet — the subscription, or a filter it routes through — saying Ready
        // now could send a test (or a person) an event that nobody routes. The rebuilder
        // wakes this writer once it is; a filter's reconcile re-checks its users.
        let filters_routed = state.route.as_ref().is_none_or(|r| {
            r.filters.iter().all(|f| {
                filters
                    .get(&(ns.clone(), f.clone()))
                    .is_some_and(|f| f.version <= routed && f.compiled.is_some())
            })
        });
        if state.version > routed || !filters_routed {
            continue;
        }

        let previous = written
            .get(&uid)
            .map(|w| w.status.clone())
            .or_else(|| whs.status.clone())
            .unwrap_or_default();
        let mut desired = subscription_status(&previous, state, &health, counts, store_down.as_deref(), &now);
        let full = healthy_is(&desired.conditions, HealthReason::BacklogFull);
        ctx.metrics.backlog_full.with_label_values(&labels).set(i64::from(full));
        if published.is_some() {
            desired.shard_owner = owner;
            if replayed.is_some() {
                desired.last_replay = replayed;
            }
        }
        let urgent = urgent_key(&previous.conditions, previous.observed_generation)
            != urgent_key(&desired.conditions, desired.observed_generation)
            || previous.last_replay != desired.last_replay;
        if !due(&desired, written.get(&uid), urgent) {
            continue;
        }
        let write = Write {
            object: whs.clone(),
            uid,
            ns,
            name,
            previous: previous.conditions,
            desired,
        };
        jobs.push(job(ctx, write, urgent, Done::Subscription));
    }
    let removed = forget_deleted(ctx, written);
    if !removed.is_empty() {
        // Dropping their stored work is a store write each: off the async workers.
        let deliveries = ctx.deliveries.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            for uid in &removed {
                deliveries.remove(uid);
            }
        });
        if let Err(err) = dropped.await {
            tracing::error!(%err, "dropping the work of deleted subscriptions stopped unexpectedly");
        }
    }
    jobs
}

/// The filters' due writes; forgets deleted filters.
async fn filter_writes(ctx: &Arc<Context>, written: &mut HashMap<String, Written<MailboxFilterStatus>>) -> Vec<Queued> {
    let now = Time(jiff::Timestamp::now());
    let objects = ctx.filters.state();
    let (states, users) = {
        let state = ctx.state.lock();
        (
            state.filters.clone(),
            users(&ctx.subscriptions.state(), &state.subscriptions),
        )
    };
    let routed = ctx.routes.routed();
    let mut jobs = Vec::new();
    for filter in &objects {
        let Some(uid) = filter.uid() else { continue };
        let (ns, name) = (filter.namespace().unwrap_or_default(), filter.name_any());
        let key = (ns, name);
        let Some(state) = states.get(&key).filter(|s| s.version <= routed) else {
            continue;
        };
        let previous = written
            .get(&uid)
            .map(|w| w.status.clone())
            .or_else(|| filter.status.clone())
            .unwrap_or_default();
        let using = users.get(&key).cloned().unwrap_or_default();
        let desired = filter_status(&previous, state, using, ctx.matches.get(&key.0, &key.1), &now);
        let urgent = urgent_key(&previous.conditions, previous.observed_generation)
            != urgent_key(&desired.conditions, desired.observed_generation)
            || previous.subscriptions != desired.subscriptions;
        if !due(&desired, written.get(&uid), urgent) {
            continue;
        }
        let (ns, name) = key;
        let write = Write {
            object: filter.clone(),
            uid,
            ns,
            name,
            previous: previous.conditions,
            desired,
        };
        jobs.push(job(ctx, write, urgent, Done::Filter));
    }
    // A fresh snapshot, not `objects`: a filter created and reconciled since is live, and
    // must not be dropped from the routing table.
    let objects = ctx.filters.state();
    let live: std::collections::HashSet<String> = objects.iter().filter_map(|f| f.uid()).collect();
    written.retain(|uid, _| live.contains(uid));
    ctx.forget_compiled(&live);
    let names: std::collections::HashSet<(String, String)> = objects
        .iter()
        .map(|f| (f.namespace().unwrap_or_default(), f.name_any()))
        .collect();
    ctx.matches.retain(&names);
    ctx.forget(&[], &names, true);
    ctx.compiled.lock().retain(|uid, _| live.contains(uid));
    jobs
}

/// The subscriptions using each filter, by (namespace, filter name), sorted: from what
/// each subscription's reconcile found it names or selects.
pub fn users(
    objects: &[Arc<WebhookSubscription>],
    states: &HashMap<String, SubscriptionState>,
) -> HashMap<(String, String), Vec<String>> {
    let mut users: HashMap<(String, String), Vec<String>> = HashMap::new();
    for whs in objects {
        let Some(state) = whs.uid().and_then(|u| states.get(&u)) else {
            continue;
        };
        let ns = whs.namespace().unwrap_or_default();
        for filter in &state.uses {
            users
                .entry((ns.clone(), filter.clone()))
                .or_default()
                .push(whs.name_any());
        }
    }
    for names in users.values_mut() {
        names.sort();
    }
    users
}

/// Forgets the status and state of subscriptions that no longer exist; returns the UIDs
/// whose deliveries and stored work the caller drops (`Deliveries::remove`, which blocks).
fn forget_deleted(ctx: &Context, written: &mut HashMap<String, Written<WebhookSubscriptionStatus>>) -> Vec<String> {
    // A fresh snapshot: one taken earlier in the pass would miss a subscription created
    // and reconciled meanwhile, and "forget" it — its deliveries, queue and status
    // gone until its next reconcile (CI caught this as a subscription that never got status).
    let live: std::collections::HashSet<String> = ctx.subscriptions.state().iter().filter_map(|w| w.uid()).collect();
    written.retain(|uid, _| live.contains(uid));
    let gone: Vec<String> = ctx
        .state
        .lock()
        .subscriptions
        .keys()
        .filter(|u| !live.contains(*u))
        .cloned()
        .collect();
    if !gone.is_empty() {
        ctx.forget(&gone, &std::collections::HashSet::new(), false);
        ctx.directory.forget(&gone);
    }
    // A reconcile that failed after handing its subscription to the data path (say, a
    // replay the store refused) recorded no state: the registry is swept too.
    let mut removed = gone;
    removed.extend(ctx.deliveries.uids().into_iter().filter(|uid| !live.contains(uid)));
    removed.sort_unstable();
    removed.dedup();
    removed
}

/// Records a Kubernetes Event for every condition whose status changed.
async fn announce<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, before: &[Condition], after: &[Condition]) {
    for c in announced(before, after) {
        let type_ = if c.status == "False" {
            K8sEventType::Warning
        } else {
            K8sEventType::Normal
        };
        let regarding = obj.object_ref(&());
        // The token first: waiting for one is not the call taking long.
        ctx.api_limiter.until_ready().await;
        let event = ctx.post_event(&regarding, type_, &c.reason, &c.message);
        if tokio::time::timeout(CALL_TIMEOUT, event).await.is_err() {
            warn!(
                reason = c.reason,
                "recording an Event took longer than {}s; skipped",
                CALL_TIMEOUT.as_secs()
            );
        }
    }
}

/// The Ready and Healthy conditions whose status changed, apart from one that first
/// appears as Unknown (a new subscription awaiting its first delivery): nothing happened
/// yet, and an Event for it would cost every new resource a call. Pure.
fn announced<'a>(before: &[Condition], after: &'a [Condition]) -> impl Iterator<Item = &'a Condition> {
    after.iter().filter(move |c| {
        let was = conditions::status_of(before, &c.type_);
        [READY, HEALTHY].contains(&c.type_.as_str())
            && was != Some(c.status.as_str())
            && !(was.is_none() && c.status == "Unknown")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::health::Failure;

    #[test]
    fn health_reasons_on_the_wire() {
        use HealthReason::*;
        let wire = [
            AwaitingDelivery,
            EndpointHealthy,
            EndpointFailing,
            EndpointDisabled,
            Paused,
            StoreUnavailable,
            BacklogFull,
        ]
        .map(|r| r.as_str());
        assert_eq!(
            wire,
            [
                "AwaitingDelivery",
                "EndpointHealthy",
                "EndpointFailing",
                "EndpointDisabled",
                "Paused",
                "StoreUnavailable",
                "BacklogFull",
            ]
        );
    }

    #[test]
    fn events_announce_changes_but_not_a_first_unknown() {
        let cond = |type_: &str, status: &str| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "R".into(),
            message: String::new(),
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            observed_generation: Some(1),
        };
        let names = |before: &[Condition], after: &[Condition]| -> Vec<String> {
            announced(before, after)
                .map(|c| format!("{}={}", c.type_, c.status))
                .collect()
        };
        let new = [
            cond(READY, "True"),
            cond(HEALTHY, "Unknown"),
            cond("Reconciling", "False"),
        ];
        assert_eq!(names(&[], &new), ["Ready=True"]);
        let delivered = [cond(READY, "True"), cond(HEALTHY, "True")];
        assert_eq!(names(&new, &delivered), ["Healthy=True"]);
        assert!(names(&delivered, &delivered).is_empty());
        let paused = [cond(READY, "True"), cond(HEALTHY, "Unknown")];
        assert_eq!(names(&delivered, &paused), ["Healthy=Unknown"]);
    }

    #[test]
    fn healthy_condition_reasons() {
        let mut h = HealthSnapshot::default();
        assert_eq!(
            healthy_condition(&h, false, None, None).reason,
            HealthReason::AwaitingDelivery
        );
        assert_eq!(healthy_condition(&h, true, None, None).reason, HealthReason::Paused);
        h.last_success = Some(jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(healthy_condition(&h, false, None, None).status, Status::True);
        h.consecutive_failures = 2;
        h.last_failure = Some(Failure {
            time: jiff::Timestamp::UNIX_EPOCH,
            http_status: Some(500),
            message: "HTTP 500".into(),
            not_before: None,
        });
        let failing = healthy_condition(&h, false, None, None);
        assert_eq!(
            (failing.status, failing.reason),
            (Status::False, HealthReason::EndpointFailing)
        );
        assert!(failing.message.contains("HTTP 500"), "{}", failing.message);
        h.disabled = Some("the endpoint answered 410 Gone".into());
        assert_eq!(
            healthy_condition(&h, true, None, None).reason,
            HealthReason::EndpointDisabled,
            "disabled outranks paused"
        );
        let down = healthy_condition(&h, true, None, Some("PostgreSQL: connection refused"));
        assert_eq!(
            (down.status, down.reason),
            (Status::False, HealthReason::StoreUnavailable)
        );
        assert!(
            down.message.contains("connection refused") && down.message.contains("resume by themselves"),
            "says why and what happens next: {}",
            down.message
        );
    }

    #[test]
    fn a_full_backlog_stays_full_until_below_nine_tenths_of_its_cap() {
        let cap = BacklogCap {
            events: Some(100),
            bytes: Some(1000),
        };
        let counts = |backlog, bytes| QueueCounts {
            backlog,
            bytes,
            ..Default::default()
        };
        assert_eq!(backlog_full(None, &counts(u64::MAX, u64::MAX), false), None, "no cap");
        assert_eq!(backlog_full(Some(&cap), &counts(99, 999), false), None);
        assert_eq!(
            backlog_full(Some(&cap), &counts(100, 0), false).as_deref(),
            Some("delivery.maxBacklog.events (100)")
        );
        assert_eq!(
            backlog_full(Some(&cap), &counts(1, 1000), false).as_deref(),
            Some("delivery.maxBacklog.bytes (1000 bytes)")
        );
        // Once full, a backlog just under the cap is still full; below 90% it is not.
        assert!(backlog_full(Some(&cap), &counts(99, 0), true).is_some());
        assert!(backlog_full(Some(&cap), &counts(90, 0), true).is_some());
        assert_eq!(backlog_full(Some(&cap), &counts(89, 899), true), None);
        let tiny = BacklogCap {
            events: Some(5),
            bytes: None,
        };
        assert_eq!(
            backlog_full(Some(&tiny), &counts(4, 0), true),
            None,
            "a cap of 5 leaves at 4"
        );
    }

    /// BacklogFull says what happens to new events and what to do, with why the backlog
    /// does not drain; its transition time stays while it remains full.
    #[test]
    fn a_backlog_at_its_cap_is_unhealthy_with_what_to_do() {
        let mut h = HealthSnapshot {
            consecutive_failures: 3,
            last_failure: Some(Failure {
                time: jiff::Timestamp::UNIX_EPOCH,
                http_status: Some(503),
                message: "HTTP 503".into(),
                not_before: None,
            }),
            ..Default::default()
        };
        let full = healthy_condition(&h, false, Some("delivery.maxBacklog.events (5)"), None);
        assert_eq!((full.status, full.reason), (Status::False, HealthReason::BacklogFull));
        for part in [
            "delivery.maxBacklog.events (5)",
            "go straight to its dead letters",
            "HTTP 503",
            "raise delivery.maxBacklog",
            "replay",
        ] {
            assert!(full.message.contains(part), "{part:?} in {}", full.message);
        }
        assert!(
            healthy_condition(&h, true, Some("x"), None)
                .message
                .contains("spec.paused"),
            "paused is the cause"
        );
        assert_eq!(
            healthy_condition(&h, false, Some("x"), Some("disk full")).reason,
            HealthReason::StoreUnavailable,
            "the store outage outranks it"
        );

        let mut state = state(valid());
        state.backlog_cap = Some(BacklogCap {
            events: Some(5),
            bytes: None,
        });
        let at = |s: i64| Time(jiff::Timestamp::from_second(s).expect("time"));
        let counts = |backlog| QueueCounts {
            backlog,
            bytes: backlog * 100,
            oldest_accepted: Some(jiff::Timestamp::UNIX_EPOCH),
            ..Default::default()
        };
        let first = subscription_status(&Default::default(), &state, &h, counts(5), None, &at(10));
        let healthy = first.conditions.iter().find(|c| c.type_ == HEALTHY).expect("Healthy");
        assert_eq!(healthy.reason, HealthReason::BacklogFull.as_str());
        assert_eq!((first.backlog, first.backlog_bytes), (5, 500));
        assert_eq!(
            first.oldest_pending_time,
            Some(at(0)),
            "when it was accepted, not an age"
        );
        h.consecutive_failures = 4;
        let later = subscription_status(&first, &state, &h, counts(5), None, &at(20));
        let again = later.conditions.iter().find(|c| c.type_ == HEALTHY).expect("Healthy");
        assert_eq!(again.last_transition_time, at(10), "no transition while it stays full");
        let drained = subscription_status(&later, &state, &h, QueueCounts::default(), None, &at(30));
        let failing = drained.conditions.iter().find(|c| c.type_ == HEALTHY).expect("Healthy");
        assert_eq!(
            (failing.reason.as_str(), &failing.last_transition_time),
            (HealthReason::EndpointFailing.as_str(), &at(10)),
            "still False, for the endpoint now"
        );
        assert_eq!(drained.oldest_pending_time, None, "nothing waits");
    }

    #[test]
    fn counter_changes_wait_condition_changes_do_not() {
        let last = Written {
            status: 1u32,
            at: Instant::now(),
        };
        assert!(!due(&1, Some(&last), false), "unchanged: nothing to write");
        assert!(!due(&2, Some(&last), false), "counters only: wait for the interval");
        assert!(due(&2, Some(&last), true), "a condition changed: write at once");
        assert!(due(&2, None, false), "never written: write");
    }

    #[test]
    fn counter_changes_are_due_after_the_interval() {
        let Some(at) = Instant::now().checked_sub(COUNTER_INTERVAL) else {
            return;
        };
        let last = Written { status: 1u32, at };
        assert!(due(&2, Some(&last), false), "counters only, interval passed: write");
        assert!(!due(&1, Some(&last), false), "unchanged: nothing to write, however old");
    }

    fn jobs(specs: &[(&str, bool)]) -> Vec<Job<()>> {
        specs
            .iter()
            .map(|&(uid, urgent)| Job {
                uid: uid.into(),
                urgent,
                write: (),
            })
            .collect()
    }

    fn uids<F>(queue: &VecDeque<Job<F>>) -> Vec<&str> {
        queue.iter().map(|j| j.uid.as_str()).collect()
    }

    #[test]
    fn schedule_puts_condition_changes_first_and_keeps_the_order_found() {
        let queue = schedule(
            jobs(&[("a", false), ("b", true), ("c", false), ("d", true)]),
            &HashSet::new(),
        );
        assert_eq!(uids(&queue), ["b", "d", "a", "c"]);
    }

    #[test]
    fn schedule_skips_resources_with_a_write_in_flight() {
        let in_flight = HashSet::from(["b", "c"]);
        let queue = schedule(
            jobs(&[("a", false), ("b", true), ("c", false), ("d", true)]),
            &in_flight,
        );
        assert_eq!(uids(&queue), ["d", "a"], "never two writes of one resource at once");
    }

    fn queued(uid: &str, urgent: bool) -> Queued {
        Job {
            uid: uid.into(),
            urgent,
            // A write that never finishes: a slot held by a slow call.
            write: Box::pin(futures::future::pending()),
        }
    }

    fn limiter(qps: u32, burst: u32) -> ApiLimiter {
        let n = |v| std::num::NonZeroU32::new(v).expect("non-zero");
        super::super::ApiBudget {
            qps: n(qps),
            burst: n(burst),
        }
        .limiter()
    }

    #[tokio::test]
    async fn start_fills_the_free_slots_only() {
        let mut writer = Writer {
            queue: (0..WRITE_CONCURRENCY + 4)
                .map(|i| queued(&i.to_string(), true))
                .collect(),
            ..Writer::default()
        };
        writer.start(&limiter(1000, 1000));
        assert_eq!(writer.tasks.len(), WRITE_CONCURRENCY);
        assert_eq!(writer.in_flight().len(), WRITE_CONCURRENCY);
        assert_eq!(writer.queue.len(), 4, "the rest wait for a slot");
        writer.start(&limiter(1000, 1000));
        assert_eq!(
            writer.tasks.len(),
            WRITE_CONCURRENCY,
            "still full: nothing more started"
        );
    }

    #[tokio::test]
    async fn counter_refreshes_wait_when_the_budget_is_short() {
        let mut writer = Writer {
            queue: VecDeque::from([
                queued("u1", true),
                queued("u2", true),
                queued("c1", false),
                queued("c2", false),
            ]),
            ..Writer::default()
        };
        let budget = limiter(1, 1);
        writer.start(&budget);
        assert_eq!(
            uids(&writer.queue),
            ["c2"],
            "condition changes start (and wait for tokens in their task); one counter refresh takes the spare token"
        );
        writer.start(&budget);
        assert_eq!(
            uids(&writer.queue),
            ["c2"],
            "no token to spare: the counter refresh waits"
        );
    }

    #[tokio::test]
    async fn a_finished_write_frees_its_slot_and_is_recorded_while_leading() {
        let mut writer = Writer::default();
        for (uid, leader) in [("a", true), ("b", false)] {
            let status = MailboxFilterStatus::default();
            let task = writer
                .tasks
                .spawn(async move { Done::Filter(Some(Box::new((uid.to_string(), status)))) });
            writer.in_flight.insert(task.id(), uid.to_string());
            let finished = writer.tasks.join_next_with_id().await.expect("a task");
            writer.finish(finished, leader);
        }
        assert!(writer.in_flight.is_empty());
        assert!(writer.filters.contains_key("a"));
        assert!(
            !writer.filters.contains_key("b"),
            "a replica that does not lead records nothing"
        );
    }

    fn state(ready: Desired<crate::controller::subscription::Reason>) -> SubscriptionState {
        SubscriptionState {
            generation: Some(3),
            endpoint_host: Some("siem.example.com".into()),
            ready,
            route: None,
            shard: 1,
            paused: false,
            last_replay: None,
            signing_public_keys: vec![],
            encryption_key_id: None,
            insecure_skip_tls_verify: false,
            uses: vec![],
            grants: vec![],
            backlog_cap: None,
            version: 1,
        }
    }

    fn valid() -> Desired<crate::controller::subscription::Reason> {
        Desired {
            type_: READY,
            status: Status::True,
            reason: crate::controller::subscription::Reason::Valid,
            message: "Configuration is valid".into(),
        }
    }

    /// Status composes what the reconcile decided with what the data path measured: an
    /// endpoint that did not echo the challenge is not Ready (and is on its way).
    #[test]
    fn subscription_status_shows_verification_counts_and_generation() {
        let now = Time(jiff::Timestamp::UNIX_EPOCH);
        let counts = QueueCounts {
            backlog: 4,
            in_flight: 0,
            dead_lettered: 1,
            ..Default::default()
        };
        let mut health = HealthSnapshot {
            verification: Some(crate::delivery::verification::Verification::Failed(
                "the endpoint answered 2xx but did not echo the challenge".into(),
            )),
            ..Default::default()
        };
        let status = subscription_status(&Default::default(), &state(valid()), &health, counts, None, &now);
        let ready = status.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "EndpointNotVerified")
        );
        assert!(
            ready.message.contains("did not echo the challenge"),
            "{}",
            ready.message
        );
        assert_eq!(
            conditions::status_of(&status.conditions, conditions::RECONCILING),
            Some("True")
        );
        assert_eq!((status.backlog, status.dead_lettered), (4, 1));
        assert_eq!((status.observed_generation, status.shard), (Some(3), Some(1)));

        health.verification = Some(crate::delivery::verification::Verification::Pending);
        let status = subscription_status(&status, &state(valid()), &health, counts, None, &now);
        assert_eq!(conditions::status_of(&status.conditions, READY), Some("Unknown"));

        health.verification = Some(crate::delivery::verification::Verification::Verified);
        let status = subscription_status(&status, &state(valid()), &health, counts, None, &now);
        assert_eq!(conditions::status_of(&status.conditions, READY), Some("True"));
        assert_eq!(conditions::status_of(&status.conditions, conditions::RECONCILING), None);
    }
}
