//! Housekeeping: the periodic loop that expires deliveries past `maxEventAge` and purges
//! history past its retention. Depends on the registry (`super::Deliveries`) and the
//! `Store` it holds; nothing on the delivery path depends on it.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::Deliveries;
use crate::store::{Kept, Retention, RowWrite, StoreError};

/// The reserved row group where each replica leaves what the LegalHolds kept from its
/// last round of purges (key: the replica's name; body: `Kept` as JSON), which the hold
/// controller adds up for status.
pub fn kept_group() -> String {
    crate::store::reserved_group("legal-hold-kept")
}

/// A replica's figures older than this are not counted (it stopped).
pub const KEPT_FRESH: Duration = Duration::from_secs(600);

/// The store asks the LegalHolds in force through the routing table's set.
pub(super) struct HoldsInForce(pub(super) std::sync::Arc<crate::route::HoldSet>);

impl crate::store::Holds for HoldsInForce {
    fn any(&self) -> bool {
        !self.0.is_empty()
    }

    fn holding(&self, mailbox: &str, at: jiff::Timestamp) -> Vec<String> {
        self.0.holding(mailbox, at).map(String::from).collect()
    }
}

/// Operator-wide retention of delivery history, applied by the housekeeping loop.
#[derive(Debug, Clone)]
pub struct Housekeeping {
    /// This replica's name, under which it reports what holds kept.
    pub replica: String,
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
            replica: "mailhook".into(),
            interval: Duration::from_secs(30),
            attempt_retention: Duration::from_secs(72 * 3600),
            max_attempts: 10_000,
            dedup_window: Duration::from_secs(24 * 3600),
            raw_message_retention: Duration::from_secs(7 * 24 * 3600),
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
pub(super) async fn run_housekeeping(
    deliveries: Arc<Deliveries>,
    settings: Housekeeping,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(settings.interval) => {}
        }
        let (d, s) = (deliveries.clone(), settings.clone());
        // The store's purges wait for commits: off the async workers.
        match tokio::task::spawn_blocking(move || housekeep(&d, &s)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(%err, "housekeeping failed; will retry"),
            Err(err) => warn!(%err, "housekeeping stopped unexpectedly; will retry"),
        }
    }
}

fn housekeep(deliveries: &Deliveries, settings: &Housekeeping) -> Result<(), StoreError> {
    let store = &deliveries.store;
    let now = jiff::Timestamp::now();
    let purged = &deliveries.metrics.store_purged;
    // Until the LegalHolds are listed, nothing a hold could keep is purged (expiry into the
    // dead letters goes on: it deletes nothing).
    let known = deliveries.router.holds();
    let holds = HoldsInForce(known.clone().unwrap_or_default());
    let mut kept = Kept::new();
    let sharing = store.sharing();
    for config in deliveries.configs() {
        // A shared store's subscriptions are kept by the owner of their shard.
        if sharing.is_some_and(|s| !s.owns(crate::store::shard_of(&config.uid, s.shards()) as u32)) {
            continue;
        }
        let reason = format!(
            "older than delivery.maxEventAge ({}s) before it could be delivered",
            config.max_event_age.as_secs()
        );
        let expired = store.expire(&config.uid, since(now, config.max_event_age), &reason)?;
        if !expired.is_empty() {
            warn!(
                subscription = config.name,
                namespace = config.namespace,
                expired = expired.len(),
                "events expired undelivered; they are dead letters now"
            );
            deliveries.health_changed.notify_one();
        }
        if config.dead_letter_sink.is_some() {
            for d in expired {
                let why = super::dead_letter::Why {
                    reason: reason.clone(),
                    attempts: d.attempts,
                    last_status: None,
                    last_error: None,
                };
                // The dead letter is written already: a copy that cannot be queued now is
                // logged; the event can still be replayed.
                let copied = match store.event(&d.event_id) {
                    Ok(Some(event)) => deliveries.queue_dead_letter_copy(&config, &event, &d, why),
                    Ok(None) => Ok(()),
                    Err(err) => Err(err),
                };
                if let Err(err) = copied {
                    deliveries
                        .metrics
                        .store_errors
                        .with_label_values(&["dead_letter_sink"])
                        .inc();
                    warn!(%err, subscription = config.name, "cannot queue the dead-letter copy of an expired event");
                }
            }
        }
        if known.is_none() {
            continue;
        }
        let p = store.purge(
            &config.uid,
            Retention {
                dead_letters_before: since(now, config.dead_letter_retention),
                attempts_before: since(now, settings.attempt_retention),
                max_attempts: settings.max_attempts,
            },
            &holds,
        )?;
        purged.with_label_values(&["dead_letter"]).inc_by(p.dead_letters);
        purged.with_label_values(&["attempt"]).inc_by(p.attempts);
        crate::store::hold::add_kept(&mut kept, &p.kept);
    }
    if known.is_none() {
        return Ok(());
    }
    // Deleted subscriptions whose records a hold kept: forgotten once it no longer does.
    for uid in deliveries.kept_orphans() {
        match deliveries.forget_unless_held(&uid) {
            Ok(Some(still)) => crate::store::hold::add_kept(&mut kept, &still),
            Ok(None) => {}
            Err(err) => {
                warn!(%err, subscription_uid = uid, "cannot purge a deleted subscription's records; will retry")
            }
        }
    }
    // The store-wide part runs once: on the leader.
    if !deliveries.is_leader() {
        return report_kept(deliveries, settings, &holds, kept, now);
    }
    if let Some(sharing) = sharing {
        let collected = sharing.collect_events()?;
        purged.with_label_values(&["event"]).inc_by(collected);
    }
    let producers = store.purge_producer_ids(since(now, settings.dedup_window))?;
    purged.with_label_values(&["producer_id"]).inc_by(producers);
    let raw = store.purge_raw_messages(since(now, settings.raw_message_retention), &holds)?;
    purged.with_label_values(&["raw_message"]).inc_by(raw.raw_messages);
    crate::store::hold::add_kept(&mut kept, &raw.kept);
    report_kept(deliveries, settings, &holds, kept, now)
}

/// Leaves what the holds kept this round in the store (for the hold controller's status)
/// and in `mailhook_legal_hold_kept`. Every hold in force is reported, with zeros for one
/// that kept nothing, so a figure drops once its records are released.
fn report_kept(
    deliveries: &Deliveries,
    settings: &Housekeeping,
    holds: &HoldsInForce,
    mut kept: Kept,
    now: jiff::Timestamp,
) -> Result<(), StoreError> {
    for name in holds.0.names() {
        kept.entry(name.to_string()).or_default();
    }
    let gauge = &deliveries.metrics.legal_hold_kept;
    gauge.reset();
    for (hold, k) in &kept {
        for (kind, n) in [
            ("raw_message", k.raw_messages),
            ("raw_message_bytes", k.raw_message_bytes),
            ("attempt", k.attempts),
            ("dead_letter", k.dead_letters),
        ] {
            gauge
                .with_label_values(&[hold.as_str(), kind])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    // As the hold controller reads it back: the figures of each hold, as status shows them.
    let figures: std::collections::BTreeMap<&str, crate::api::HeldRecords> = kept
        .iter()
        .map(|(hold, k)| {
            let figures = crate::api::HeldRecords {
                raw_messages: k.raw_messages,
                raw_message_bytes: k.raw_message_bytes,
                attempts: k.attempts,
                dead_letters: k.dead_letters,
            };
            (hold.as_str(), figures)
        })
        .collect();
    let body = serde_json::to_vec(&figures).map_err(|e| StoreError::Failed(e.to_string()))?;
    deliveries.store.write_rows(vec![RowWrite::Put {
        group: kept_group(),
        row: crate::store::Row {
            key: settings.replica.as_bytes().to_vec(),
            at: now.as_second(),
            body,
        },
    }])
}
