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
/// The mailbox index (`store::index_key` layout) → (unix seconds indexed, body).
pub(super) const MAILBOX_INDEX: TableDefinition<&[u8], (i64, &[u8])> = TableDefinition::new("mailbox_index");
/// Secrets kept with the data (name → 32 bytes).
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Creates every table that does not exist yet, so reads never meet a missing one.
pub(super) fn create_tables(db: &Database) -> Result<(), StoreError> {
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
    txn.commit().map_err(io)
}

/// A delivery as stored on disk.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StoredDelivery {
    pub(super) subscription: String,
    pub(super) event_id: String,
    pub(super) attempts: u32,
    pub(super) not_before: jiff::Timestamp,
    pub(super) accepted_at: jiff::Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) ordering_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) matched_filters: Vec<String>,
    /// Dead letters only: why it was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<String>,
    /// Dead letters only: when it was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dead_at: Option<jiff::Timestamp>,
}

impl StoredDelivery {
    /// A dead letter as the history API shows it.
    pub(super) fn into_dead_letter(self) -> crate::store::DeadLetter {
        crate::store::DeadLetter {
            dead_at: self.dead_at.unwrap_or(self.not_before),
            reason: self.reason.unwrap_or_default(),
            event_id: self.event_id,
            attempts: self.attempts,
            accepted_at: self.accepted_at,
        }
    }

    pub(super) fn from(d: &PendingDelivery) -> StoredDelivery {
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
        }
    }

    pub(super) fn into_pending(self, seq: u64) -> PendingDelivery {
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

pub(super) fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

pub(super) fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(io)
}

/// A timestamp as an ATTEMPTS key part.
pub(super) fn nanos(t: jiff::Timestamp) -> u64 {
    u64::try_from(t.as_nanosecond()).unwrap_or(0)
}
