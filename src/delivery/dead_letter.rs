//! The dead-letter sink (`delivery.deadLetterSink`): a copy of each dead-lettered event,
//! with why it died, is queued for another subscription (`ref`) or for an endpoint that
//! the dead subscription reaches itself (`uri`). The copy is a new event with a
//! `DeadLetterNote`, ingested like any other: durable, retried, shared between replicas.
//! The dead letter itself stays for replay; a copy that dies in turn is not sent on.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{Deliveries, DeliveryConfig, Sink, webhook_id};
use crate::event::{DeadLetterNote, MailboxEvent};
use crate::store::{Ingest, PendingDelivery};

/// Why a delivery died, as its last attempt saw it.
#[derive(Clone)]
pub struct Why {
    pub reason: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// The endpoint as a dead letter names it: no query (it may hold a token), no user info.
pub fn shown_endpoint(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            // Both fail only for URLs that cannot hold credentials, which then have none.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => String::from("<unparsable endpoint.url>"),
    }
}

/// The copy of `event` for the sink, to be delivered to `target` (a subscription UID).
pub fn copy_for_sink(
    origin: &DeliveryConfig,
    event: &MailboxEvent,
    d: &PendingDelivery,
    why: Why,
    target: &str,
    sink_uri: Option<String>,
    now: jiff::Timestamp,
) -> Ingest {
    let original = webhook_id(&event.id, &origin.uid);
    let mut copy = event.derive();
    copy.received_at = now;
    // Dead-lettered twice (a crash between the copy and the dead letter): one copy. A
    // replay starts the delivery's age again, so dying again after one is a new copy.
    copy.producer_event_id = Some(format!("deadletter:{original}:{target}:{}", d.accepted_at.as_second()));
    copy.dead_letter = Some(Box::new(DeadLetterNote {
        event_id: event.id.clone(),
        subscription: format!("{}/{}", origin.namespace, origin.name),
        endpoint: shown_endpoint(&origin.url),
        webhook_id: original,
        reason: why.reason,
        attempts: why.attempts,
        last_status: why.last_status,
        last_error: why.last_error,
        dead_lettered_at: now,
        sink_uri,
    }));
    let pending = PendingDelivery {
        subscription: target.to_string(),
        event_id: copy.id.clone(),
        attempts: 0,
        not_before: now,
        accepted_at: now,
        // A copy must not hold back the mailbox's other events.
        ordering_key: None,
        matched_filters: d.matched_filters.clone(),
        seq: 0,
    };
    Ingest {
        event: copy,
        deliveries: vec![pending],
    }
}

impl Deliveries {
    /// The UID of the subscription `name` in `namespace`, if this process knows it.
    fn uid_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.shards.iter().find_map(|s| {
            s.subscriptions
                .lock()
                .values()
                .find(|sub| sub.config.namespace == namespace && sub.config.name == name)
                .map(|sub| sub.config.uid.clone())
        })
    }

    /// Queues the copy of a dead-lettered event for the subscription's sink. Blocks on the
    /// store. A `ref` naming no subscription this process knows (missing, or not valid) is
    /// logged and counted: the dead letter is kept for replay either way.
    pub(super) fn queue_dead_letter_copy(
        &self,
        origin: &DeliveryConfig,
        event: &MailboxEvent,
        d: &PendingDelivery,
        why: Why,
    ) -> Result<(), crate::store::StoreError> {
        // Never loops: a copy that dies stays a dead letter.
        if event.dead_letter.is_some() {
            return Ok(());
        }
        let Some(sink) = &origin.dead_letter_sink else {
            return Ok(());
        };
        let (target, sink_uri) = match sink {
            Sink::Uri(url) => (origin.uid.clone(), Some(url.to_string())),
            Sink::Subscription(name) => match self.uid_of(&origin.namespace, name) {
                Some(uid) => (uid, None),
                None => {
                    self.metrics
                        .dead_letter_forwards
                        .with_label_values(&[&origin.namespace, &origin.name, "sink_missing"])
                        .inc();
                    warn!(
                        subscription = origin.name,
                        sink = name,
                        "the dead-letter sink subscription does not exist or is not valid; the event stays a dead letter"
                    );
                    return Ok(());
                }
            },
        };
        let ingest = copy_for_sink(origin, event, d, why, &target, sink_uri, jiff::Timestamp::now());
        let appended = self.store.ingest(vec![ingest])?;
        if appended.iter().any(|a| !a.duplicate) {
            self.metrics
                .dead_letter_forwards
                .with_label_values(&[&origin.namespace, &origin.name, "queued"])
                .inc();
            self.wake([target.as_str()]);
        }
        Ok(())
    }

    /// `queue_dead_letter_copy` from the delivery path: off the async workers, tried a few
    /// times with backoff (a duplicate is dropped by its producer id).
    pub(super) async fn forward_dead_letter(
        self: &Arc<Self>,
        origin: &Arc<DeliveryConfig>,
        event: &Arc<MailboxEvent>,
        d: &PendingDelivery,
        why: Why,
    ) {
        let mut delay = Duration::from_millis(100);
        for tries in 1..=5u32 {
            let (this, config, event, d, why) = (self.clone(), origin.clone(), event.clone(), d.clone(), why.clone());
            let result = tokio::task::spawn_blocking(move || this.queue_dead_letter_copy(&config, &event, &d, why))
                .await
                .unwrap_or_else(|e| Err(crate::store::StoreError::Failed(format!("the sink copy stopped: {e}"))));
            match result {
                Ok(()) => return,
                Err(err) if tries < 5 => {
                    warn!(%err, subscription = origin.name, "cannot queue the dead-letter copy; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(err) => {
                    self.metrics.store_errors.with_label_values(&["dead_letter_sink"]).inc();
                    warn!(%err, subscription = origin.name, "cannot queue the dead-letter copy; the event stays a dead letter");
                }
            }
        }
    }
}
