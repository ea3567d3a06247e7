//! The on-disk schema: the redb tables, how a delivery is encoded in them, and the small
//! encoding helpers. Depends on nothing else in `durable`, so the layout can be read in
//! one place.

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::store::{PendingDelivery, StoreError};

pub(super) const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
/// Producer event id → (event id, unix seconds first seen).
pub(super) const PRODUCERS: TableDefinition<&str, (&str, i64)> = TableDefinition::new("producers");
pub(super) const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
pub(super) const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// (subscription, unix nanoseconds) → attempt: one subscription's log is one key range,
/// in time order.
pub(super) const ATTEMPTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("attempts");
/// Raw message SHA-256 (hex) → (unix seconds archived, message bytes).
pub(super) const RAW: TableDefinition<&str, (i64, &[u8])> = TableDefinition::new("raw_messages");
/// (unix seconds archived, SHA-256) of every raw message: retention purges read this
/// index, never the messages themselves.
pub(super) const RAW_BY_AGE: TableDefinition<(i64, &str), ()> = TableDefinition::new("raw_messages_by_age");
/// Subscription UID → its namespace, for every subscription that had deliveries: tells
/// at start-up which stored work belongs to a watched namespace.
pub(super) const SUBSCRIPTIONS: TableDefinition<&str, &str> = TableDefinition::new("subscriptions");
/// Keyed rows (`store::rows`: `group NUL key`) → (unix seconds written, body). Named for
/// its first user, the Dovecot source's mailbox index; the name is kept for stores on disk.
pub(super) const MAILBOX_INDEX: TableDefinition<&[u8], (i64, &[u8])> = TableDefinition::new("mailbox_index");
/// The paged store's queues: (subscription, seq) → stored delivery. One subscription's
/// queue is one key range in the order of acceptance.
pub(crate) const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
/// (subscription, due time in unix nanoseconds, seq) of every queued delivery: an
/// unordered queue is read in this order.
pub(crate) const QUEUE_DUE: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("queue_due");
/// (subscription, seq) → dead letter.
pub(crate) const DEAD_QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_queue");
/// (subscription, given up at in unix nanoseconds, seq) of every dead letter.
pub(crate) const DEAD_BY_TIME: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("dead_by_time");
/// Event id → deliveries and dead letters that still refer to it (the event goes with the last).
pub(crate) const EVENT_REFS: TableDefinition<&str, u32> = TableDefinition::new("event_refs");
/// (unix seconds first seen, producer id) of every producer id, for its expiry.
pub(crate) const PRODUCERS_BY_AGE: TableDefinition<(i64, &str), ()> = TableDefinition::new("producers_by_age");
/// Subscription → (deliveries queued, bytes of their events, dead letters).
pub(crate) const QUEUE_STATS: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("queue_stats");
/// Secrets kept with the data (name → 32 bytes).
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The audit log's stored hashes, a run per commit (`audit`: the run's first stored index
/// → its hashes, 32 bytes each): one write per commit, not one per hash.
pub(crate) const AUDIT_HASHES: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_hashes");
/// The audit log's leaves (leaf index → record bytes).
pub(crate) const AUDIT_RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_records");
/// Signed checkpoints of the audit log (tree size → note); the newest is the last.
pub(crate) const AUDIT_CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_checkpoints");
/// An event's acceptance leaf (event id → leaf index); event ids are time-ordered, so
/// these are appended.
pub(crate) const AUDIT_EVENTS: TableDefinition<&str, u64> = TableDefinition::new("audit_events");
/// Delivery leaves by their event's acceptance: (acceptance index, leaf index). A retry
/// of an old event inserts in the middle: the key is kept small (16 bytes), since each
/// page such an insert touches is held until its commit.
pub(crate) const AUDIT_DELIVERIES: TableDefinition<(u64, u64), ()> = TableDefinition::new("audit_deliveries");

/// Creates every table that does not exist yet, so reads never meet a missing one.
pub(crate) fn create_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io)?;
    txn.open_table(EVENTS).map_err(io)?;
    txn.open_table(PRODUCERS).map_err(io)?;
    txn.open_table(PENDING).map_err(io)?;
    txn.open_table(DEAD).map_err(io)?;
    txn.open_table(ATTEMPTS).map_err(io)?;
    txn.open_table(RAW).map_err(io)?;
    txn.open_table(RAW_BY_AGE).map_err(io)?;
    txn.open_table(META).map_err(io)?;
    txn.open_table(SUBSCRIPTIONS).map_err(io)?;
    txn.open_table(MAILBOX_INDEX).map_err(io)?;
    txn.open_table(QUEUE).map_err(io)?;
    txn.open_table(QUEUE_DUE).map_err(io)?;
    txn.open_table(DEAD_QUEUE).map_err(io)?;
    txn.open_table(DEAD_BY_TIME).map_err(io)?;
    txn.open_table(EVENT_REFS).map_err(io)?;
    txn.open_table(PRODUCERS_BY_AGE).map_err(io)?;
    txn.open_table(QUEUE_STATS).map_err(io)?;
    txn.open_table(AUDIT_HASHES).map_err(io)?;
    txn.open_table(AUDIT_RECORDS).map_err(io)?;
    txn.open_table(AUDIT_EVENTS).map_err(io)?;
    txn.open_table(AUDIT_DELIVERIES).map_err(io)?;
    txn.open_table(AUDIT_CHECKPOINTS).map_err(io)?;
    txn.commit().map_err(io)
}

/// A delivery as stored on disk.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredDelivery {
    pub(crate) subscription: String,
    pub(crate) event_id: String,
    pub(crate) attempts: u32,
    pub(crate) not_before: jiff::Timestamp,
    pub(crate) accepted_at: jiff::Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ordering_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) matched_filters: Vec<String>,
    /// Dead letters only: why it was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// Dead letters only: when it was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dead_at: Option<jiff::Timestamp>,
    /// Bytes of its event (the paged store's backlog counts them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) size: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StoredDelivery {
    /// A dead letter as the history API shows it.
    pub(crate) fn into_dead_letter(self) -> crate::store::DeadLetter {
        crate::store::DeadLetter {
            dead_at: self.dead_at.unwrap_or(self.not_before),
            reason: self.reason.unwrap_or_default(),
            event_id: self.event_id,
            attempts: self.attempts,
            accepted_at: self.accepted_at,
        }
    }

    pub(crate) fn from(d: &PendingDelivery) -> StoredDelivery {
        StoredDelivery {
            subscription: d.subscription.clone(),
            event_id: d.event_id.clone(),
            attempts: d.attempts,
            not_before: d.not_before,
            accepted_at: d.accepted_at,
            ordering_key: d.ordering_key.clone(),
            matched_filters: d.matched_filters.clone(),
            reason: None,
            dead_at: None,
            size: 0,
        }
    }

    pub(crate) fn into_pending(self, seq: u64) -> PendingDelivery {
        PendingDelivery {
            subscription: self.subscription,
            event_id: self.event_id,
            attempts: self.attempts,
            not_before: self.not_before,
            accepted_at: self.accepted_at,
            ordering_key: self.ordering_key,
            matched_filters: self.matched_filters,
            seq,
        }
    }
}

pub(crate) fn io(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::io(e)
}

pub(crate) fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(io)
}

/// A timestamp as an ATTEMPTS key part.
/// Saturating: before 1970 is 0, past what 64 bits hold (year 2554) is `u64::MAX`, so a
/// range bound of `Timestamp::MAX` still ends after every key.
pub(crate) fn nanos(t: jiff::Timestamp) -> u64 {
    let n = t.as_nanosecond();
    if n <= 0 {
        0
    } else {
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// A subscription's attempts at or after `since` as the engine keeps them, newest first
/// (the subscription is not stored in each row). Both stores read the log this way.
pub(crate) fn read_attempts(
    engine: &dyn super::engine::Engine,
    subscription: &str,
    since: jiff::Timestamp,
    limit: usize,
) -> Result<Vec<crate::store::Attempt>, StoreError> {
    let mut out = Vec::new();
    for bytes in engine.attempts(subscription, nanos(since), limit)? {
        let mut attempt: crate::store::Attempt = serde_json::from_slice(&bytes).map_err(io)?;
        attempt.subscription = subscription.to_string();
        out.push(attempt);
    }
    Ok(out)
}

/// What `EventLog::events` answers, for both stores: the events `cached` finds, the rest in
/// one read of `engine`, each parsed on its own (one that does not parse fails alone, one
/// the engine lacks stays None); `keep` is handed the events read (a store caches them).
pub(crate) fn events_by_id(
    engine: &dyn super::engine::Engine,
    ids: &[String],
    cached: impl FnOnce(&[String]) -> Vec<Option<std::sync::Arc<crate::event::MailboxEvent>>>,
    keep: impl FnOnce(&[std::sync::Arc<crate::event::MailboxEvent>]),
) -> Vec<Result<Option<std::sync::Arc<crate::event::MailboxEvent>>, StoreError>> {
    let mut out: Vec<Result<Option<std::sync::Arc<crate::event::MailboxEvent>>, StoreError>> =
        cached(ids).into_iter().map(Ok).collect();
    out.resize_with(ids.len(), || Ok(None));
    let missing: Vec<String> = ids
        .iter()
        .zip(&out)
        .filter(|(_, e)| matches!(e, Ok(None)))
        .map(|(id, _)| id.clone())
        .collect();
    if missing.is_empty() {
        return out;
    }
    let read: std::collections::HashMap<String, (Vec<u8>, Option<u64>)> = match engine.events_indexed(&missing) {
        Ok(read) => read.into_iter().map(|(id, body, index)| (id, (body, index))).collect(),
        Err(err) => {
            let message = err.to_string();
            for slot in out.iter_mut().filter(|e| matches!(e, Ok(None))) {
                *slot = Err(StoreError::Failed(message.clone()));
            }
            return out;
        }
    };
    let mut kept = Vec::with_capacity(read.len());
    for (id, slot) in ids.iter().zip(out.iter_mut()) {
        if !matches!(slot, Ok(None)) {
            continue;
        }
        let Some((bytes, index)) = read.get(id) else { continue };
        *slot = match serde_json::from_slice::<crate::event::MailboxEvent>(bytes) {
            Ok(e) => {
                if let Some(index) = index {
                    e.log_index.set(*index);
                }
                let e = std::sync::Arc::new(e);
                kept.push(e.clone());
                Ok(Some(e))
            }
            Err(err) => Err(io(err)),
        };
    }
    keep(&kept);
    out
}

/// Tells events read back from the engine where their acceptance is in the audit log.
/// Without it a delivery only lacks its log index header: a failed read is not an error.
pub(crate) fn indexed(engine: &dyn super::engine::Engine, events: &[std::sync::Arc<crate::event::MailboxEvent>]) {
    if events.is_empty() {
        return;
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    match engine.audit_accepted(&ids) {
        Ok(found) => {
            for (event, index) in events.iter().zip(found) {
                if let Some(index) = index {
                    event.log_index.set(index);
                }
            }
        }
        Err(err) => tracing::debug!(%err, "cannot read the events' audit log indexes"),
    }
}
