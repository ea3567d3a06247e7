//! Delivery: a fixed set of shards POST signed events to subscribers, retry on each
//! subscription's schedule, and keep per-subscription health. A subscription lives on
//! one shard (stable hash of its UID). Queues live in the store (`store::Queue`); the
//! store's other parts are handed from here to the code that uses each. This file is the
//! registry (what each shard delivers for); the core below the inbound adapters: depends on `store`, `route`, `event`, `archive`, `metrics`, `panics`, `lifecycle` and
//! `crypto`, never on a source or a controller.

pub mod client;
pub mod egress;
pub mod encryption;
pub mod health;
pub mod payload;
pub mod privacy;
pub mod retry;
pub mod schema;
pub mod signing;
pub mod verification;
pub mod wire;

mod attempt;
mod dead_letter;
mod housekeeping;
mod shard;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use tokio::sync::{Notify, Semaphore};
use tracing::{Instrument, info_span, warn};

use crate::lifecycle::{Lifecycle, Stage};
use crate::metrics::Metrics;
use crate::route::Target;
use crate::store::{Archive, Backend, BacklogCap, EventLog, History, PendingDelivery, Queue, Rows, Store, StoreError};
use health::{Health, HealthSnapshot};
use housekeeping::run_housekeeping;
pub use housekeeping::{Housekeeping, KEPT_FRESH, kept_group};
use payload::PayloadConfig;
use shard::{Shard, Subscription, run_shard};
use signing::SigningKey;

// Reached by `verification` as `super::…`: its challenge is signed like a delivery.
use attempt::{root_cause, signed_post, webhook_id};

/// Everything a shard needs to deliver for one subscription; rebuilt on every change.
pub struct DeliveryConfig {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub url: String,
    /// Shared by every subscription with the same TLS settings (`client::Clients`).
    pub client: Arc<reqwest::Client>,
    /// Extra headers, checked, sent with every request.
    pub headers: reqwest::header::HeaderMap,
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
    /// The endpoint must echo a challenge before the first delivery (`endpoint.verify`).
    pub verify: bool,
    /// Format, encryption and batching of what is sent.
    pub wire: wire::WireConfig,
    /// Several events per request (`delivery.batch`).
    pub batch: Option<BatchSettings>,
    /// Where dead-lettered events are sent as well (`delivery.deadLetterSink`).
    pub dead_letter_sink: Option<Sink>,
    /// The most its backlog may hold (`delivery.maxBacklog` over the operator's default);
    /// None: no cap.
    pub max_backlog: Option<BacklogCap>,
}

/// The cap a subscription's backlog gets: each figure its spec sets, otherwise the
/// operator's default; None when neither gives any. Pure.
pub fn backlog_cap(spec: BacklogCap, default: BacklogCap) -> Option<BacklogCap> {
    let cap = BacklogCap {
        events: spec.events.or(default.events),
        bytes: spec.bytes.or(default.bytes),
    };
    (cap.events.is_some() || cap.bytes.is_some()).then_some(cap)
}

/// `delivery.batch`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// How much delivers at once: shard workers, and requests in flight over all of them.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub shards: usize,
    pub max_in_flight: usize,
}

/// A dead-letter sink, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Another WebhookSubscription of the same namespace, by name.
    Subscription(String),
    /// An endpoint reached with the dead subscription's own settings.
    Uri(reqwest::Url),
}

/// The delivery side of the operator.
pub struct Deliveries {
    shards: Vec<Arc<Shard>>,
    store: Arc<dyn Store>,
    health: Mutex<HashMap<String, Arc<Health>>>,
    metrics: Metrics,
    /// Notified when a subscription's health class changes: status is written within a
    /// status pass (at most 250 ms).
    pub health_changed: Arc<Notify>,
    /// Endpoint verification handshakes, by subscription UID.
    handshakes: Mutex<HashMap<String, verification::Handshake>>,
    /// Starts the shards (which run their attempts) and handshakes, so that the drain
    /// waits for them.
    lifecycle: Lifecycle,
    /// Notified when new deliveries were committed here: a shared store claims them now
    /// rather than at its next poll.
    pub arrivals: Arc<Notify>,
    leadership: crate::handles::Leadership,
    /// The last replay carried out here per subscription, published with its health.
    replays: Mutex<HashMap<String, serde_json::Value>>,
    /// The routing table, whose MailboxGrants every delivery is checked against again
    /// when it is sent: a grant revoked after routing stops what was queued under it.
    router: Arc<crate::route::Router>,
    /// Process-wide request slots (`--max-deliveries-in-flight`): what many subscriptions
    /// draining at once hold in memory is bounded by this, not by their number. Waiting
    /// shards are served in turn (tokio's semaphore is fair).
    in_flight: Arc<Semaphore>,
    /// The request slots held back while the operator starts (`warmed_up`).
    warmup: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// Deleted subscriptions whose records a LegalHold keeps (`forget_unless_held`).
    kept_orphans: Mutex<std::collections::HashSet<String>>,
}

/// Requests in flight, over every subscription, until the controllers have reconciled
/// every resource (or WARMUP_GRACE has passed): queued work starts going out at once, but
/// a large backlog's drain does not take the cores the start needs to become ready.
const WARMUP_IN_FLIGHT: usize = 4;
const WARMUP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a raw message link no longer opens.
#[derive(Debug, thiserror::Error)]
pub enum RawLinkRefused {
    #[error("the subscription this link was issued to no longer exists or no longer asks for raw message links")]
    Subscription,
    #[error("no MailboxGrant allows this subscription raw messages of this event any more")]
    Grant,
}

/// A number no earlier handshake had: tells a handshake's result from a stale one.
fn next_handshake() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub use crate::store::shard_of;

impl Deliveries {
    /// Starts `capacity.shards` shard workers (delivery stage: on shutdown they take no new work,
    /// and the attempts in flight finish) and the housekeeping loop (storage stage).
    pub fn start(
        capacity: Capacity,
        store: Arc<dyn Store>,
        metrics: Metrics,
        housekeeping: Housekeeping,
        lifecycle: &Lifecycle,
        leadership: crate::handles::Leadership,
        router: Arc<crate::route::Router>,
    ) -> Arc<Deliveries> {
        let deliveries = Arc::new(Deliveries {
            shards: (0..capacity.shards.max(1))
                .map(|index| {
                    Arc::new(Shard {
                        index,
                        ..Shard::default()
                    })
                })
                .collect(),
            arrivals: Arc::default(),
            leadership,
            replays: Mutex::default(),
            router,
            store,
            health: Mutex::default(),
            metrics,
            health_changed: Arc::default(),
            handshakes: Mutex::default(),
            lifecycle: lifecycle.clone(),
            in_flight: Arc::new(Semaphore::new(capacity.max_in_flight.max(1))),
            warmup: Mutex::default(),
            kept_orphans: Mutex::default(),
        });
        deliveries
            .metrics
            .requests_in_flight_limit
            .set(capacity.max_in_flight.max(1) as i64);
        let held = capacity.max_in_flight.saturating_sub(WARMUP_IN_FLIGHT);
        if let Ok(held) = u32::try_from(held)
            && held > 0
        {
            *deliveries.warmup.lock() = deliveries.in_flight.clone().try_acquire_many_owned(held).ok();
            deliveries.metrics.requests_in_flight_limit.set(WARMUP_IN_FLIGHT as i64);
            let weak = Arc::downgrade(&deliveries);
            tokio::spawn(async move {
                tokio::time::sleep(WARMUP_GRACE).await;
                if let Some(d) = weak.upgrade() {
                    d.warmed_up();
                }
            });
        }
        for (i, shard) in deliveries.shards.iter().enumerate() {
            let stop = lifecycle.token(Stage::Delivery);
            lifecycle.spawn(
                Stage::Delivery,
                "delivery shard",
                run_shard(deliveries.clone(), shard.clone(), stop).instrument(info_span!("shard", shard = i)),
            );
        }
        let stop = lifecycle.token(Stage::Storage);
        lifecycle.spawn(
            Stage::Storage,
            "housekeeping",
            run_housekeeping(deliveries.clone(), housekeeping, stop).instrument(info_span!("housekeeping")),
        );
        deliveries
    }

    /// The start is over (every resource reconciled): deliveries may use every request
    /// slot. Idempotent.
    pub fn warmed_up(&self) {
        if let Some(held) = self.warmup.lock().take() {
            let limit = held.num_permits() + WARMUP_IN_FLIGHT;
            drop(held);
            self.metrics.requests_in_flight_limit.set(limit as i64);
            tracing::debug!("started: deliveries use every request slot");
        }
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

    /// Whether a raw message link may still be used: its subscription exists and asks for
    /// links, and a MailboxGrant of the subscription's namespace still allows raw messages
    /// of the link's mailbox and event type.
    pub fn raw_link_allowed(&self, to: &crate::archive::LinkTo<'_>) -> Result<(), RawLinkRefused> {
        let sub = self
            .subscription(to.subscription)
            .filter(|s| s.config.payload.raw_links.is_some())
            .ok_or(RawLinkRefused::Subscription)?;
        let event_type = crate::api::EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == to.event_type)
            .ok_or(RawLinkRefused::Grant)?;
        let ceiling = self
            .router
            .current()
            .grants()
            .ceiling_for(&sub.config.namespace, event_type, to.mailbox);
        if !ceiling.is_some_and(|c| c.raw_links) {
            return Err(RawLinkRefused::Grant);
        }
        Ok(())
    }

    /// Whether the subscription's deliveries carry links to archived raw messages.
    pub fn wants_raw_message(&self, uid: &str) -> bool {
        self.subscription(uid)
            .is_some_and(|s| s.config.payload.raw_links.is_some())
    }

    /// Whether the subscription gets a link to the raw message of `event`: it asks for
    /// links and a grant of its namespace allows raw messages of that event.
    pub fn links_raw_message(
        &self,
        uid: &str,
        event: &crate::event::MailboxEvent,
        grants: &crate::route::Grants,
    ) -> bool {
        self.subscription(uid).is_some_and(|s| {
            s.config.payload.raw_links.is_some()
                && grants.ceiling(&s.config.namespace, event).is_some_and(|c| c.raw_links)
        })
    }

    fn subscription(&self, uid: &str) -> Option<Arc<Subscription>> {
        let shard = &self.shards[shard_of(uid, self.shards.len())];
        shard.subscriptions.lock().get(uid).cloned()
    }

    fn configs(&self) -> Vec<Arc<DeliveryConfig>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.subscriptions
                    .lock()
                    .values()
                    .map(|s| s.config.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every subscription the shards deliver for.
    pub fn uids(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| s.subscriptions.lock().keys().cloned().collect::<Vec<_>>())
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
        self.note_verification(&config, &health);
        let mut subs = shard.subscriptions.lock();
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
                    .map(|r| Arc::new(shard::RateBucket::new(r, std::time::Instant::now()))),
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
        // Before the route that brings it events: the store caps what it queues at ingest.
        self.store.limit_backlog(&config.uid, config.max_backlog);
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
        shard.subscriptions.lock().remove(uid);
    }

    /// On a new configuration: whether its endpoint still needs the handshake (`verify`
    /// and a URL not verified yet by this process), shown through health.
    fn note_verification(&self, config: &DeliveryConfig, health: &Health) {
        let state = {
            let mut handshakes = self.handshakes.lock();
            if config.verify {
                let h = handshakes
                    .entry(config.uid.clone())
                    .or_insert_with(|| verification::Handshake {
                        attempt: next_handshake(),
                        ..verification::Handshake::new(&config.url)
                    });
                if h.url != config.url {
                    *h = verification::Handshake::new(&config.url);
                    h.attempt = next_handshake();
                }
                Some(h.state.clone())
            } else {
                handshakes.remove(&config.uid);
                None
            }
        };
        if health.set_verification(state) {
            self.health_changed.notify_one();
        }
    }

    /// The shard loop's side of verification: whether `sub` may deliver now; if not,
    /// starts a handshake when one is due and returns when to look again.
    fn verified(self: &Arc<Self>, sub: &Arc<Subscription>, shard: &Arc<Shard>) -> Result<(), std::time::Instant> {
        let config = &sub.config;
        if !config.verify {
            return Ok(());
        }
        let mut handshakes = self.handshakes.lock();
        let Some(h) = handshakes.get_mut(&config.uid) else {
            return Ok(());
        };
        if h.state == verification::Verification::Verified {
            return Ok(());
        }
        let now = std::time::Instant::now();
        if h.in_flight || now < h.next_try {
            // The task wakes the shard when it is done.
            return Err(h.next_try.max(now + verification::RETRY));
        }
        h.in_flight = true;
        let attempt = h.attempt;
        drop(handshakes);
        let (deliveries, sub, shard) = (self.clone(), sub.clone(), shard.clone());
        self.lifecycle
            .spawn_short(Stage::Delivery, "verification handshake", async move {
                use futures::FutureExt;
                // A panic (a bug) is a failed handshake, retried: never one stuck in flight.
                let outcome = std::panic::AssertUnwindSafe(verification::handshake(&sub.config))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        crate::panics::record(&deliveries.metrics, "delivery");
                        Err(crate::panics::ANSWER.to_string())
                    });
                let state = match outcome {
                    Ok(()) => {
                        tracing::info!(url = sub.config.url, "endpoint verified");
                        verification::Verification::Verified
                    }
                    Err(why) => verification::Verification::Failed(why),
                };
                // Only the handshake of the current configuration counts: one started for an
                // earlier URL (or before `verify` was turned off) is dropped.
                let current = match deliveries.handshakes.lock().get_mut(&sub.config.uid) {
                    Some(h) if h.attempt == attempt => {
                        h.in_flight = false;
                        h.state = state.clone();
                        h.next_try = std::time::Instant::now() + verification::RETRY;
                        true
                    }
                    _ => false,
                };
                if current && sub.health.set_verification(Some(state)) {
                    deliveries.health_changed.notify_one();
                }
                shard.wake.notify_one();
            });
        Err(now + verification::RETRY)
    }

    /// Forgets a deleted subscription.
    pub fn remove(&self, uid: &str) {
        let shard = &self.shards[shard_of(uid, self.shards.len())];
        if let Some(sub) = shard.subscriptions.lock().remove(uid) {
            self.metrics
                .forget_subscription(&sub.config.namespace, &sub.config.name);
        }
        self.health.lock().remove(uid);
        self.handshakes.lock().remove(uid);
        self.store.limit_backlog(uid, None);
        if let Err(err) = self.forget_unless_held(uid) {
            warn!(%err, "cannot drop the queue of a deleted subscription");
        }
    }

    /// Forgets what the store holds for a subscription that no longer exists, but for the
    /// attempts and dead letters a LegalHold keeps: then the rest goes, the subscription is
    /// kept in `kept_orphans`, and housekeeping asks again each round. Returns None when it
    /// was forgotten, else what the holds kept. While the holds are not known yet nothing
    /// is forgotten.
    pub fn forget_unless_held(&self, uid: &str) -> Result<Option<crate::store::Kept>, StoreError> {
        let Some(holds) = self.router.holds() else {
            self.kept_orphans.lock().insert(uid.to_string());
            return Ok(Some(crate::store::Kept::new()));
        };
        if !holds.is_empty() {
            // On a shared store only the owner of the subscription's shard has its dead
            // letters to judge: the others leave it to the owner (who is told of the
            // deletion too).
            if let Some(sharing) = self.store.sharing()
                && !sharing.owns(shard_of(uid, sharing.shards()) as u32)
            {
                self.kept_orphans.lock().remove(uid);
                return Ok(Some(crate::store::Kept::new()));
            }
            // What was waiting becomes dead letters first (held ones stay, the rest go),
            // then everything is purged but what a hold keeps, sweep after sweep.
            self.store
                .expire(uid, jiff::Timestamp::MAX, "its WebhookSubscription was deleted")?;
            let everything = crate::store::Retention {
                dead_letters_before: jiff::Timestamp::MAX,
                attempts_before: jiff::Timestamp::MAX,
                max_attempts: 0,
            };
            let holds = housekeeping::HoldsInForce(holds);
            let mut kept = crate::store::Kept::new();
            for _ in 0..100 {
                let purged = self.store.purge(uid, everything, &holds)?;
                kept = purged.kept;
                if purged.attempts == 0 && purged.dead_letters == 0 {
                    break;
                }
            }
            if kept.values().any(|k| k.attempts > 0 || k.dead_letters > 0) {
                if self.kept_orphans.lock().insert(uid.to_string()) {
                    tracing::info!(
                        subscription_uid = uid,
                        "kept what a LegalHold keeps of a deleted subscription (its other work is gone)"
                    );
                }
                return Ok(Some(kept));
            }
        }
        self.store.forget_subscription(uid)?;
        if self.kept_orphans.lock().remove(uid) {
            tracing::info!(
                subscription_uid = uid,
                "forgot the attempts and dead letters of a deleted subscription: no LegalHold keeps them any more"
            );
        }
        Ok(None)
    }

    /// Deleted subscriptions whose records a hold still keeps (see `forget_unless_held`).
    pub fn kept_orphans(&self) -> Vec<String> {
        self.kept_orphans.lock().iter().cloned().collect()
    }

    /// Drops what the store holds for subscriptions that are not in `live` (deleted while
    /// the operator was down): their queues would otherwise hold their events on disk
    /// forever. With `watched` (the watched namespaces; None = all), only work of
    /// subscriptions known to be in a watched namespace is dropped: a namespace taken out of
    /// `--watch-namespace` keeps its queues. Returns how many subscriptions were dropped.
    /// Blocks on the store.
    pub fn drop_orphans(
        &self,
        live: &std::collections::HashSet<String>,
        watched: Option<&std::collections::HashSet<String>>,
    ) -> Result<u64, StoreError> {
        // Shared by several replicas, the database holds work of subscriptions this one's
        // caches may not show yet (created while it started): deletions are left to the
        // status writer, which sees them happen.
        if self.store.sharing().is_some() {
            return Ok(0);
        }
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
            if self.forget_unless_held(&uid)?.is_some() {
                tracing::info!(
                    subscription_uid = uid,
                    "kept the attempts and dead letters a LegalHold keeps of a subscription that no longer exists"
                );
                continue;
            }
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

    /// Wakes the shards of these subscriptions: they have new deliveries. On a shared
    /// store, the claim of new deliveries too (they reach memory through it).
    pub fn wake<'a>(&self, subscriptions: impl IntoIterator<Item = &'a str>) {
        if self.wake_shards(subscriptions) {
            self.arrivals.notify_one();
        }
    }

    /// Wakes the shards of these subscriptions only (the claim of new deliveries woke
    /// them: waking it again would spin). Returns whether there were any.
    pub fn wake_shards<'a>(&self, subscriptions: impl IntoIterator<Item = &'a str>) -> bool {
        let mut any = false;
        for uid in subscriptions {
            self.shards[shard_of(uid, self.shards.len())].wake.notify_one();
            any = true;
        }
        any
    }

    /// Wakes one shard's loop (it was just taken over).
    pub fn wake_shard(&self, shard: usize) {
        if let Some(s) = self.shards.get(shard) {
            s.wake.notify_one();
        }
    }

    /// Takes over the health the previous owners of these subscriptions published.
    pub fn seed_health(&self, rows: &[crate::store::PublishedHealth]) {
        for row in rows {
            if let Ok(p) = serde_json::from_value::<health::Published>(row.body.clone()) {
                self.health_of(&row.uid).seed(&p);
            }
        }
    }

    /// Health and queue figures of every subscription on the shards this replica owns.
    pub fn published(&self) -> Vec<(String, health::Published)> {
        let mut out = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let index = i as u32;
            if !self.store.sharing().is_none_or(|s| s.owns(index)) {
                continue;
            }
            let uids: Vec<String> = shard.subscriptions.lock().keys().cloned().collect();
            for uid in uids {
                let snapshot = self.health(&uid).unwrap_or_default();
                let counts = self.store.counts(&uid);
                let mut p = health::Published::new(&snapshot, counts, index);
                p.last_replay = self.replays.lock().get(&uid).cloned();
                out.push((uid, p));
            }
        }
        out
    }

    /// Whether this replica delivers for the subscription (always, on a store of its own).
    pub fn owns(&self, uid: &str) -> bool {
        self.store
            .sharing()
            .is_none_or(|s| s.owns(shard_of(uid, s.shards()) as u32))
    }

    /// Notes a replay carried out here (published to the leader with the health).
    pub fn note_replay(&self, uid: &str, replay: serde_json::Value) {
        self.replays.lock().insert(uid.to_string(), replay);
    }

    /// Whether this replica leads (always, on a store of its own).
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    pub fn health(&self, uid: &str) -> Option<HealthSnapshot> {
        self.health.lock().get(uid).map(|h| h.snapshot())
    }

    // The store's parts, for the code outside delivery that uses one: each sees only
    // what it uses.

    /// Where the sources store events.
    pub fn events(&self) -> Arc<dyn EventLog> {
        self.store.clone()
    }

    /// The keyed rows sources keep beside their events (the Dovecot mailbox index).
    pub fn rows(&self) -> Arc<dyn Rows> {
        self.store.clone()
    }

    /// The archive of raw messages.
    pub fn archive(&self) -> Arc<dyn Archive> {
        self.store.clone()
    }

    /// The audit log.
    pub fn audit(&self) -> Arc<dyn crate::store::AuditTrail> {
        self.store.clone()
    }

    /// The attempt log and dead letters.
    pub fn history(&self) -> Arc<dyn History> {
        self.store.clone()
    }

    /// The queues, for status and metrics, which read their figures (counts, backlog,
    /// rows read) and nothing else.
    pub fn queues(&self) -> Arc<dyn Queue> {
        self.store.clone()
    }

    /// The backend: whether it commits, how full it is, whether replicas share it.
    pub fn backend(&self) -> Arc<dyn Backend> {
        self.store.clone()
    }

    fn health_of(&self, uid: &str) -> Arc<Health> {
        self.health.lock().entry(uid.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(max_in_flight: usize) -> Arc<Deliveries> {
        let store = crate::store::PagedStore::in_memory().unwrap_or_else(|e| panic!("store: {e}"));
        Deliveries::start(
            Capacity {
                shards: 1,
                max_in_flight,
            },
            Arc::new(store),
            Metrics::new().unwrap_or_else(|e| panic!("metrics: {e}")),
            Housekeeping::default(),
            &Lifecycle::new(),
            crate::handles::Leadership::default(),
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn deliveries_hold_to_a_few_requests_until_the_start_is_over() {
        let d = started(512);
        assert_eq!(d.in_flight.available_permits(), WARMUP_IN_FLIGHT, "while starting");
        assert_eq!(d.metrics.requests_in_flight_limit.get(), WARMUP_IN_FLIGHT as i64);
        d.warmed_up();
        assert_eq!(d.in_flight.available_permits(), 512, "started: every slot");
        assert_eq!(d.metrics.requests_in_flight_limit.get(), 512);
        d.warmed_up();
        assert_eq!(d.in_flight.available_permits(), 512, "idempotent");
        // A limit below the start's share is the limit from the start.
        assert_eq!(started(3).in_flight.available_permits(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_that_never_ends_holds_the_slots_back_for_the_grace_period_only() {
        let d = started(512);
        tokio::time::sleep(WARMUP_GRACE - std::time::Duration::from_secs(1)).await;
        assert_eq!(d.in_flight.available_permits(), WARMUP_IN_FLIGHT);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(d.in_flight.available_permits(), 512);
    }

    #[test]
    fn the_spec_overrides_the_default_figure_by_figure() {
        let cap = |events, bytes| BacklogCap { events, bytes };
        let default = cap(Some(1_000_000), None);
        assert_eq!(
            backlog_cap(BacklogCap::default(), default),
            Some(default),
            "no maxBacklog: the default"
        );
        assert_eq!(backlog_cap(cap(Some(5), None), default), Some(cap(Some(5), None)));
        assert_eq!(
            backlog_cap(cap(None, Some(2 << 30)), default),
            Some(cap(Some(1_000_000), Some(2 << 30))),
            "bytes from the spec, events from the default"
        );
        assert_eq!(
            backlog_cap(cap(Some(7), Some(1024)), cap(Some(1), Some(1))),
            Some(cap(Some(7), Some(1024)))
        );
        assert_eq!(
            backlog_cap(cap(None, Some(512)), cap(None, Some(4096))),
            Some(cap(None, Some(512)))
        );
        assert_eq!(
            backlog_cap(BacklogCap::default(), BacklogCap::default()),
            None,
            "neither: no cap"
        );
    }
}
