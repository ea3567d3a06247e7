//! Delivery: a fixed set of shards POST signed events to subscribers, retry on each
//! subscription's schedule, and keep per-subscription health. A subscription lives on
//! one shard (stable hash of its UID). Queues live behind the `Store` trait.

pub mod client;
pub mod egress;
pub mod health;
pub mod payload;
pub mod retry;
pub mod signing;
pub mod verification;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, debug, info_span, warn};

use crate::metrics::Metrics;
use crate::route::Target;
use crate::store::{Attempt, PendingDelivery, Retention, Store, StoreError};
use health::{Failure, Health, HealthSnapshot};
use payload::PayloadConfig;
use retry::Next;
use signing::SigningKey;

/// Everything a shard needs to deliver for one subscription; rebuilt on every change.
pub struct DeliveryConfig {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub url: String,
    pub client: reqwest::Client,
    /// The operator's egress policy (the client's resolver applies it; kept here to
    /// explain refused redirect targets).
    pub egress: Arc<egress::EgressPolicy>,
    pub timeout: Duration,
    pub signing_keys: Vec<SigningKey>,
    pub retry_schedule: Vec<Duration>,
    pub max_event_age: Duration,
    /// Longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    pub dead_letter_retention: Duration,
    pub disable_after: Duration,
    pub payload: PayloadConfig,
    pub concurrency: u32,
    pub rate_limit_per_second: Option<u32>,
    pub ordered: bool,
    pub paused: bool,
}

struct Subscription {
    config: Arc<DeliveryConfig>,
    /// `config.url`, parsed once.
    url: reqwest::Url,
    /// Metric series of a 2xx delivery, resolved once.
    success: (prometheus::IntCounter, prometheus::Histogram),
    slots: Arc<Semaphore>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    health: Arc<Health>,
}

#[derive(Default)]
struct Shard {
    subscriptions: Mutex<HashMap<String, Arc<Subscription>>>,
    wake: Notify,
}

/// Operator-wide retention of delivery history, applied by the housekeeping loop.
#[derive(Debug, Clone, Copy)]
pub struct Housekeeping {
    /// How often expiry and purges run.
    pub interval: Duration,
    /// Attempts older than this leave the audit log.
    pub attempt_retention: Duration,
    /// Most attempts kept per subscription (the newest).
    pub max_attempts: u64,
    /// How long a producer event id de-duplicates.
    pub dedup_window: Duration,
    /// How long raw messages stay archived.
    pub raw_message_retention: Duration,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping {
            interval: Duration::from_secs(30),
            attempt_retention: Duration::from_secs(72 * 3600),
            max_attempts: 10_000,
            dedup_window: Duration::from_secs(24 * 3600),
            raw_message_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The delivery side of the operator.
pub struct Deliveries {
    shards: Vec<Arc<Shard>>,
    store: Arc<dyn Store>,
    health: Mutex<HashMap<String, Arc<Health>>>,
    metrics: Metrics,
    /// Notified when a subscription's health class changes: status is written at once.
    pub health_changed: Arc<Notify>,
}

/// Stable shard of a subscription UID.
pub fn shard_of(uid: &str, shards: usize) -> usize {
    let digest = Sha256::digest(uid.as_bytes());
    let n = u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]);
    (n % shards.max(1) as u64) as usize
}

impl Deliveries {
    /// Starts `shards` shard workers and the housekeeping loop; they run until the
    /// process ends.
    pub fn start(
        shards: usize,
        store: Arc<dyn Store>,
        metrics: Metrics,
        housekeeping: Housekeeping,
    ) -> Arc<Deliveries> {
        let deliveries = Arc::new(Deliveries {
            shards: (0..shards.max(1)).map(|_| Arc::default()).collect(),
            store,
            health: Mutex::default(),
            metrics,
            health_changed: Arc::default(),
        });
        for (i, shard) in deliveries.shards.iter().enumerate() {
            tokio::spawn(run_shard(deliveries.clone(), shard.clone()).instrument(info_span!("shard", shard = i)));
        }
        tokio::spawn(run_housekeeping(deliveries.clone(), housekeeping).instrument(info_span!("housekeeping")));
        deliveries
    }

    /// Queues again the subscription's dead letters given up at or after `since`.
    pub fn replay(&self, uid: &str, since: jiff::Timestamp) -> Result<u64, StoreError> {
        let n = self.store.replay(uid, since, jiff::Timestamp::now())?;
        if let Some(sub) = self.subscription(uid) {
            self.metrics
                .replayed
                .with_label_values(&[&sub.config.namespace, &sub.config.name])
                .inc_by(n);
        }
        self.wake([uid]);
        self.health_changed.notify_one();
        Ok(n)
    }

    /// Whether the subscription's deliveries carry links to archived raw messages.
    pub fn wants_raw_message(&self, uid: &str) -> bool {
        self.subscription(uid)
            .is_some_and(|s| s.config.payload.raw_links.is_some())
    }

    fn subscription(&self, uid: &str) -> Option<Arc<Subscription>> {
        let shard = &self.shards[shard_of(uid, self.shards.len())];
        shard.subscriptions.lock().ok()?.get(uid).cloned()
    }

    fn configs(&self) -> Vec<Arc<DeliveryConfig>> {
        self.shards
            .iter()
            .filter_map(|s| s.subscriptions.lock().ok())
            .flat_map(|subs| subs.values().map(|s| s.config.clone()).collect::<Vec<_>>())
            .collect()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Adds or replaces a subscription. An edit (new generation) re-enables a disabled
    /// endpoint.
    pub fn upsert(&self, config: DeliveryConfig) {
        let health = self.health_of(&config.uid);
        let shard = &self.shards[shard_of(&config.uid, self.shards.len())];
        let Ok(mut subs) = shard.subscriptions.lock() else {
            return;
        };
        if let Some(old) = subs.get(&config.uid)
            && old.config.generation != config.generation
            && health.enable()
        {
            self.health_changed.notify_one();
        }
        // Keep the slots and limiter when their settings did not change, so deliveries in
        // flight still count against the concurrency limit.
        let (slots, limiter) = match subs.get(&config.uid) {
            Some(old)
                if old.config.concurrency == config.concurrency
                    && old.config.rate_limit_per_second == config.rate_limit_per_second =>
            {
                (old.slots.clone(), old.limiter.clone())
            }
            _ => (
                Arc::new(Semaphore::new(config.concurrency.max(1) as usize)),
                config
                    .rate_limit_per_second
                    .and_then(NonZeroU32::new)
                    .map(|r| Arc::new(RateLimiter::direct(Quota::per_second(r)))),
            ),
        };
        let Ok(url) = reqwest::Url::parse(&config.url) else {
            // Validation refuses such URLs before they get here.
            warn!(
                subscription = config.name,
                "endpoint URL does not parse; not delivering"
            );
            return;
        };
        // The store keeps each subscription's namespace, so work of a namespace that is no
        // longer watched is never taken for a deleted subscription's (`drop_orphans`).
        if let Err(err) = self.store.note_subscription(&config.uid, &config.namespace) {
            self.metrics
                .store_errors
                .with_label_values(&["note_subscription"])
                .inc();
            warn!(%err, subscription = config.name, "cannot record the subscription's namespace in the store");
        }
        let success = self.metrics.success_series(&config.namespace, &config.name);
        subs.insert(
            config.uid.clone(),
            Arc::new(Subscription {
                url,
                success,
                config: Arc::new(config),
                slots,
                limiter,
                health,
            }),
        );
        drop(subs);
        shard.wake.notify_one();
    }

    /// Stops delivering for a subscription that is no longer valid; its queue and health
    /// stay until it is valid again or deleted.
    pub fn park(&self, uid: &str) {
        let shard = &self.shards[shard_of(uid, self.shards.len())];
        if let Ok(mut subs) = shard.subscriptions.lock() {
            subs.remove(uid);
        }
    }

    /// Forgets a deleted subscription.
    pub fn remove(&self, uid: &str) {
        let shard = &self.shards[shard_of(uid, self.shards.len())];
        if let Ok(mut subs) = shard.subscriptions.lock()
            && let Some(sub) = subs.remove(uid)
        {
            self.metrics
                .forget_subscription(&sub.config.namespace, &sub.config.name);
        }
        if let Ok(mut h) = self.health.lock() {
            h.remove(uid);
        }
        if let Err(err) = self.store.forget_subscription(uid) {
            warn!(%err, "cannot drop the queue of a deleted subscription");
        }
    }

    /// Drops what the store holds for subscriptions that are not in `live` (deleted while
    /// the operator was down): their queues would otherwise count against `--max-backlog`
    /// forever. With `watched` (the watched namespaces; None = all), only work of
    /// subscriptions known to be in a watched namespace is dropped: a namespace taken out of
    /// `--watch-namespace` keeps its queues. Returns how many subscriptions were dropped.
    /// Blocks on the store.
    pub fn drop_orphans(
        &self,
        live: &std::collections::HashSet<String>,
        watched: Option<&std::collections::HashSet<String>>,
    ) -> Result<u64, StoreError> {
        let mut dropped = 0;
        for (uid, namespace) in self.store.subscriptions()? {
            if live.contains(&uid) {
                continue;
            }
            let ours = match (watched, namespace.as_deref()) {
                (None, _) => true,
                (Some(w), Some(ns)) => w.contains(ns),
                (Some(_), None) => false,
            };
            if !ours {
                tracing::info!(
                    subscription_uid = uid,
                    namespace = namespace.as_deref().unwrap_or("<unknown>"),
                    "kept the stored work of a subscription outside the watched namespaces"
                );
                continue;
            }
            let counts = self.store.counts(&uid);
            self.store.forget_subscription(&uid)?;
            warn!(
                subscription_uid = uid,
                backlog = counts.backlog,
                dead_letters = counts.dead_lettered,
                "dropped the queue, dead letters and attempt log of a subscription that no longer exists"
            );
            let purged = &self.metrics.store_purged;
            purged.with_label_values(&["orphaned_subscription"]).inc();
            purged
                .with_label_values(&["orphaned_delivery"])
                .inc_by(counts.backlog + counts.dead_lettered);
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The deliveries one event needs, one per target.
    pub fn pending_for(event: &crate::event::MailboxEvent, targets: &[Target]) -> Vec<PendingDelivery> {
        targets
            .iter()
            .map(|t| PendingDelivery {
                subscription: t.subscription.clone(),
                event_id: event.id.clone(),
                attempts: 0,
                not_before: event.received_at,
                accepted_at: event.received_at,
                ordering_key: Some(event.mailbox.clone()),
                matched_filters: t.matched_filters.clone(),
                seq: 0,
            })
            .collect()
    }

    /// Wakes the shards of these subscriptions: they have new deliveries.
    pub fn wake<'a>(&self, subscriptions: impl IntoIterator<Item = &'a str>) {
        for uid in subscriptions {
            self.shards[shard_of(uid, self.shards.len())].wake.notify_one();
        }
    }

    pub fn health(&self, uid: &str) -> Option<HealthSnapshot> {
        self.health.lock().ok()?.get(uid).map(|h| h.snapshot())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn health_of(&self, uid: &str) -> Arc<Health> {
        match self.health.lock() {
            Ok(mut h) => h.entry(uid.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }
}

async fn run_shard(deliveries: Arc<Deliveries>, shard: Arc<Shard>) {
    loop {
        let subs: Vec<Arc<Subscription>> = match shard.subscriptions.lock() {
            Ok(s) => s.values().cloned().collect(),
            Err(_) => return,
        };
        let now = jiff::Timestamp::now();
        let mut wake_at = now + Duration::from_secs(1);
        for sub in subs {
            let config = &sub.config;
            if config.paused || sub.health.is_disabled() {
                continue;
            }
            let free = sub.slots.available_permits();
            if free > 0 {
                match deliveries.store.take_due(&config.uid, now, free, config.ordered) {
                    Ok(batch) => {
                        for d in batch {
                            let Ok(permit) = sub.slots.clone().try_acquire_owned() else {
                                break;
                            };
                            tokio::spawn(deliver(deliveries.clone(), shard.clone(), sub.clone(), d, permit));
                        }
                    }
                    Err(err) => {
                        warn!(%err, subscription = config.name, "cannot read the delivery queue")
                    }
                }
            }
            if let Some(due) = deliveries.store.next_due(&config.uid) {
                // A due delivery that is held back (ordering, no free slot) is retried
                // when a delivery finishes, or after a short pause.
                wake_at = wake_at.min(due.max(now + Duration::from_millis(100)));
            }
        }
        let sleep = Duration::try_from(wake_at.duration_since(jiff::Timestamp::now())).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = shard.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

fn since(now: jiff::Timestamp, age: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(age)
        .ok()
        .and_then(|age| now.checked_sub(age).ok())
        .unwrap_or(jiff::Timestamp::MIN)
}

/// Expires deliveries past their subscription's `maxEventAge` (also while the endpoint is
/// paused or disabled) and purges history past its retention, every `interval`.
async fn run_housekeeping(deliveries: Arc<Deliveries>, settings: Housekeeping) {
    loop {
        tokio::time::sleep(settings.interval).await;
        let d = deliveries.clone();
        // The store's purges wait for commits: off the async workers.
        match tokio::task::spawn_blocking(move || housekeep(&d, settings)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(%err, "housekeeping failed; will retry"),
            Err(err) => warn!(%err, "housekeeping stopped unexpectedly; will retry"),
        }
    }
}

fn housekeep(deliveries: &Deliveries, settings: Housekeeping) -> Result<(), StoreError> {
    let store = &deliveries.store;
    let now = jiff::Timestamp::now();
    let purged = &deliveries.metrics.store_purged;
    for config in deliveries.configs() {
        let reason = format!(
            "older than delivery.maxEventAge ({}s) before it could be delivered",
            config.max_event_age.as_secs()
        );
        let expired = store.expire(&config.uid, since(now, config.max_event_age), &reason)?;
        if expired > 0 {
            warn!(
                subscription = config.name,
                namespace = config.namespace,
                expired,
                "events expired undelivered; they are dead letters now"
            );
            deliveries.health_changed.notify_one();
        }
        let p = store.purge(
            &config.uid,
            Retention {
                dead_letters_before: since(now, config.dead_letter_retention),
                attempts_before: since(now, settings.attempt_retention),
                max_attempts: settings.max_attempts,
            },
        )?;
        purged.with_label_values(&["dead_letter"]).inc_by(p.dead_letters);
        purged.with_label_values(&["attempt"]).inc_by(p.attempts);
    }
    let producers = store.purge_producer_ids(since(now, settings.dedup_window))?;
    purged.with_label_values(&["producer_id"]).inc_by(producers);
    let raw = store.purge_raw_messages(since(now, settings.raw_message_retention))?;
    purged.with_label_values(&["raw_message"]).inc_by(raw);
    Ok(())
}

/// A Standard Webhooks POST of `body` to `url`, signed with every key of the subscription
/// (deliveries and verification requests alike).
fn signed_post(config: &DeliveryConfig, url: reqwest::Url, id: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
    let timestamp = jiff::Timestamp::now().as_second();
    let signature = signing::signature_header(&config.signing_keys, id, timestamp, &body);
    config
        .client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
}

/// Why a redirect failed the attempt: redirects are never followed, and a target the
/// egress guard refuses (a redirect to a metadata address is the classic SSRF) says so.
async fn redirect_message(
    status: u16,
    location: Option<&reqwest::header::HeaderValue>,
    base: &reqwest::Url,
    policy: &egress::EgressPolicy,
) -> String {
    let Some(target) = location.and_then(|l| l.to_str().ok()).and_then(|l| base.join(l).ok()) else {
        return format!("HTTP {status}: redirects are not followed; point endpoint.url at the final URL");
    };
    let refused = tokio::time::timeout(Duration::from_secs(2), egress::check_host(policy, &target))
        .await
        .ok()
        .and_then(Result::err);
    match refused {
        Some(e) => format!("HTTP {status}: redirect to {target} not followed; {e}"),
        None => format!(
            "HTTP {status}: redirect to {target} not followed (redirects never are); point endpoint.url at the final URL"
        ),
    }
}

/// What an attempt came to.
enum Outcome {
    Delivered {
        status: u16,
    },
    Failed {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
    },
    Gone,
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "transport",
    }
}

/// `webhook-id`: stable for one event and one subscription, so retries de-duplicate.
fn webhook_id(event_id: &str, subscription: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(subscription.as_bytes());
    hasher.update(b"/");
    hasher.update(event_id.as_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(36);
    id.push_str("msg_");
    for b in &digest[..16] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    id
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One signed POST of the event and what came of it (with its latency and end time).
async fn attempt_once(
    config: &DeliveryConfig,
    url: &reqwest::Url,
    event: &crate::event::MailboxEvent,
    matched_filters: &[String],
) -> (Outcome, Duration, jiff::Timestamp) {
    let id = webhook_id(&event.id, &config.uid);
    let body = payload::render(event, matched_filters, &config.payload);
    let started = Instant::now();
    let response = signed_post(config, url.clone(), &id, body).send().await;
    let elapsed = started.elapsed();
    let now = jiff::Timestamp::now();

    let outcome = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, now));
            match status {
                200..=299 => Outcome::Delivered { status },
                410 => Outcome::Gone,
                429 | 502 | 503 | 504 => Outcome::Failed {
                    status: Some(status),
                    message: format!("HTTP {status}: the endpoint asked to slow down"),
                    retry_after,
                },
                300..=399 => Outcome::Failed {
                    status: Some(status),
                    message: redirect_message(status, r.headers().get("location"), url, &config.egress).await,
                    retry_after: None,
                },
                _ => Outcome::Failed {
                    status: Some(status),
                    message: format!("HTTP {status}"),
                    retry_after: None,
                },
            }
        }
        Err(err) => {
            let message = if err.is_timeout() {
                format!("no answer within {}s (endpoint.timeout)", config.timeout.as_secs_f32())
            } else if err.is_connect() {
                format!("cannot connect: {}", root_cause(&err))
            } else {
                format!("request failed: {}", root_cause(&err))
            };
            Outcome::Failed {
                status: None,
                message,
                retry_after: None,
            }
        }
    };
    (outcome, elapsed, now)
}

/// How often a store write on the delivery path is tried before it is given up.
const STORE_WRITE_TRIES: u32 = 8;

/// Makes one store write of the delivery path (`what`: retry, dead_letter, complete,
/// attempt, read_event), trying again with backoff (100 ms doubling to 5 s, about 20 s in
/// all) while it fails: each failure is logged and counted. Given up, the delivery stays in
/// flight in memory and is due again from disk at the next start — never lost, never
/// repeated forever.
async fn store_write<T>(
    metrics: &Metrics,
    what: &'static str,
    subscription: &str,
    mut write: impl FnMut() -> Result<T, StoreError>,
) -> Option<T> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=STORE_WRITE_TRIES {
        match write() {
            Ok(v) => return Some(v),
            Err(err) => {
                metrics.store_errors.with_label_values(&[what]).inc();
                if attempt == STORE_WRITE_TRIES {
                    tracing::error!(
                        %err, operation = what, subscription, attempts = attempt,
                        "store write failed; giving up for now: the delivery is due again after a restart"
                    );
                    return None;
                }
                warn!(%err, operation = what, subscription, attempt, "store write failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    None
}

async fn deliver(
    deliveries: Arc<Deliveries>,
    shard: Arc<Shard>,
    sub: Arc<Subscription>,
    mut d: PendingDelivery,
    _permit: OwnedSemaphorePermit,
) {
    let config = &sub.config;
    let store = &deliveries.store;
    let metrics = &deliveries.metrics;
    let name = config.name.as_str();
    let event = match store.event(&d.event_id) {
        Ok(Some(e)) => e,
        Ok(None) => {
            let reason = "the event is no longer in the store";
            store_write(metrics, "dead_letter", name, || {
                store.dead_letter(d.clone(), reason.into())
            })
            .await;
            return;
        }
        Err(err) => {
            metrics.store_errors.with_label_values(&["read_event"]).inc();
            warn!(%err, subscription = name, "cannot read the event; will retry in 1 s");
            d.not_before = jiff::Timestamp::now() + Duration::from_secs(1);
            store_write(metrics, "retry", name, || store.retry(d.clone())).await;
            return;
        }
    };
    if let Some(limiter) = &sub.limiter {
        limiter.until_ready().await;
    }

    // Rendering and the request run on the event's data: a panic there (a bug) is a failed
    // attempt like any other, retried on the schedule (no sooner than a minute) and in the
    // end dead-lettered, never a delivery stuck in flight.
    let tried = std::panic::AssertUnwindSafe(attempt_once(config, &sub.url, &event, &d.matched_filters))
        .catch_unwind()
        .await;
    let (outcome, elapsed, now) = tried.unwrap_or_else(|_| {
        crate::panics::record(&deliveries.metrics, "delivery");
        let failed = Outcome::Failed {
            status: None,
            message: crate::panics::ANSWER.into(),
            retry_after: Some(Duration::from_secs(60)),
        };
        (failed, Duration::ZERO, jiff::Timestamp::now())
    });
    d.attempts += 1;
    let mut attempt = Attempt {
        subscription: d.subscription.clone(),
        event_id: d.event_id.clone(),
        attempt: d.attempts,
        at: now,
        http_status: None,
        error: None,
        latency_ms: elapsed.as_millis() as u64,
    };

    match &outcome {
        Outcome::Delivered { status } => attempt.http_status = Some(*status),
        Outcome::Gone => {
            attempt.http_status = Some(410);
            attempt.error = Some("HTTP 410 Gone".into());
        }
        Outcome::Failed { status, message, .. } => {
            attempt.http_status = *status;
            attempt.error = Some(message.clone());
        }
    }
    // Queued before the completion below, so it is on disk no later than it.
    // The audit log is not worth holding the delivery up for: one try, counted.
    if let Err(err) = store.record_attempt(attempt) {
        metrics.store_errors.with_label_values(&["attempt"]).inc();
        warn!(%err, subscription = name, "cannot log a delivery attempt");
    }

    let (outcome_label, status_label, changed) = match outcome {
        Outcome::Delivered { status } => {
            // Still holding the delivery slot: the completion is durable before the slot frees.
            if let Err(err) = async { store.complete(&d)?.wait().await }.await {
                // Not retried: the completion may be on disk already; if not, the delivery
                // is made once more after a restart (receivers de-duplicate by webhook-id).
                metrics.store_errors.with_label_values(&["complete"]).inc();
                warn!(%err, subscription = name, "cannot record a completed delivery; it may be made again");
            }
            let changed = sub.health.success(now, elapsed.as_millis() as u64);
            ("success", status_class(Some(status)), changed)
        }
        Outcome::Gone => {
            // 410: the receiver asked us to stop. Keep the event; stop the endpoint.
            store_write(metrics, "retry", name, || store.retry(d.clone())).await;
            let changed = sub.health.failure(
                Failure {
                    time: now,
                    http_status: Some(410),
                    message: "HTTP 410 Gone: the endpoint asked to stop deliveries".into(),
                },
                Some("the endpoint answered 410 Gone".into()),
            );
            ("gone", "4xx", changed)
        }
        Outcome::Failed {
            status,
            message,
            retry_after,
        } => {
            debug!(subscription = config.name, %message, attempts = d.attempts, "delivery failed");
            let failing_for = sub
                .health
                .failing_since()
                .map(|t| now.duration_since(t))
                .unwrap_or_default();
            let disable = (failing_for
                > jiff::SignedDuration::try_from(config.disable_after).unwrap_or(jiff::SignedDuration::MAX))
            .then(|| {
                format!(
                    "failing for longer than delivery.disableAfter ({}s)",
                    config.disable_after.as_secs()
                )
            });
            let changed = sub.health.failure(
                Failure {
                    time: now,
                    http_status: status,
                    message: message.clone(),
                },
                disable,
            );
            let policy = retry::Policy {
                schedule: &config.retry_schedule,
                max_event_age: config.max_event_age,
                max_retry_after: config.max_retry_after,
            };
            match retry::after_failure(policy, d.attempts, retry_after, d.accepted_at, now, retry::jitter()) {
                Next::RetryAt(at) => {
                    d.not_before = at;
                    store_write(metrics, "retry", name, || store.retry(d.clone())).await;
                }
                Next::DeadLetter(reason) => {
                    let reason = format!("{reason}; last error: {message}");
                    store_write(metrics, "dead_letter", name, || {
                        store.dead_letter(d.clone(), reason.clone())
                    })
                    .await;
                }
            }
            ("failure", status_class(status), changed)
        }
    };
    if status_label == "2xx" && outcome_label == "success" {
        sub.success.0.inc();
        sub.success.1.observe(elapsed.as_secs_f64());
    } else {
        deliveries
            .metrics
            .delivery(&config.namespace, &config.name, outcome_label, status_label, elapsed);
    }
    if changed {
        deliveries.health_changed.notify_one();
    }
    shard.wake.notify_one();
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing store write is tried again with backoff and counted each time; one that
    /// keeps failing is given up (the delivery then waits for a restart), never looped on.
    #[tokio::test(start_paused = true)]
    async fn store_writes_are_retried_counted_and_bounded() {
        let metrics = Metrics::new().expect("metrics");
        let mut calls = 0;
        let got = store_write(&metrics, "retry", "siem", || {
            calls += 1;
            if calls < 3 {
                Err(StoreError::Io("disk full".into()))
            } else {
                Ok(calls)
            }
        })
        .await;
        assert_eq!(got, Some(3));
        assert_eq!(metrics.store_errors.with_label_values(&["retry"]).get(), 2);

        let mut calls = 0;
        let got: Option<()> = store_write(&metrics, "dead_letter", "siem", || {
            calls += 1;
            Err(StoreError::Unavailable("the store's commit thread stopped".into()))
        })
        .await;
        assert_eq!((got, calls), (None, STORE_WRITE_TRIES));
        assert_eq!(
            metrics.store_errors.with_label_values(&["dead_letter"]).get(),
            u64::from(STORE_WRITE_TRIES)
        );
    }

    /// Receivers de-duplicate by `webhook-id`: it must not change between versions.
    #[test]
    fn webhook_id_is_stable() {
        let digest = Sha256::digest(b"sub-uid/evt_1");
        let expected = format!(
            "msg_{}",
            digest.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>()
        );
        assert_eq!(webhook_id("evt_1", "sub-uid"), expected);
        assert_eq!(expected.len(), 36);
    }
}
