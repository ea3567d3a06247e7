//! The store behind the event log and the delivery queues. The rest of the code knows
//! only this trait; which backend runs is chosen at start-up.

mod memory;

use std::sync::Arc;

pub use memory::MemoryStore;

use crate::event::MailboxEvent;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// What `append` did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The event's id: new, or the one assigned when its producer id was first seen.
    pub id: String,
    /// True when the producer event id was seen before: nothing new will be delivered.
    pub duplicate: bool,
}

/// One event waiting to be delivered to one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelivery {
    /// Subscription UID.
    pub subscription: String,
    pub event_id: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not to be attempted before this time.
    pub not_before: jiff::Timestamp,
    /// When the event was accepted; `maxEventAge` counts from here.
    pub accepted_at: jiff::Timestamp,
    /// Deliveries with the same key are made one at a time, in order (perMailbox).
    pub ordering_key: Option<String>,
    /// The subscription's filters that matched the event (carried in `data`).
    pub matched_filters: Vec<String>,
    /// Assigned by the store at enqueue: the order of enqueueing.
    pub seq: u64,
}

/// Queue figures of one subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting or in flight.
    pub backlog: u64,
    pub dead_lettered: u64,
}

pub trait Store: Send + Sync + 'static {
    /// Appends events to the log, de-duplicating by producer event id.
    fn append(&self, events: Vec<MailboxEvent>) -> Result<Vec<Appended>, StoreError>;
    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError>;
    fn enqueue(&self, deliveries: Vec<PendingDelivery>) -> Result<(), StoreError>;
    /// Takes up to `max` deliveries of `subscription` that are due at `now` and marks
    /// them in flight. With `ordered`, a key with a delivery in flight or not yet due
    /// holds back every later delivery of that key.
    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError>;
    /// The earliest `not_before` among waiting deliveries of `subscription`.
    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp>;
    /// The delivery succeeded: forget it.
    fn complete(&self, delivery: &PendingDelivery) -> Result<(), StoreError>;
    /// The delivery failed and will be tried again at its (updated) `not_before`.
    fn retry(&self, delivery: PendingDelivery) -> Result<(), StoreError>;
    /// The delivery will not be tried again; keep it for replay.
    fn dead_letter(&self, delivery: PendingDelivery, reason: String) -> Result<(), StoreError>;
    fn counts(&self, subscription: &str) -> QueueCounts;
}
