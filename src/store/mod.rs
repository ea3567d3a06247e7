//! The store behind the event log and the delivery queues, as one trait per consumer:
//! `EventLog` (sources), `Rows` (keyed rows a source keeps beside its events, opaque to
//! the store), `Archive` (raw messages), `Queue` (delivery shards), `History` (attempts
//! and dead letters) and `Backend` (health, volume, sharing, secrets). A backend implements every part; `Store`
//! is all of them, and each consumer is handed the part it uses. Which backend runs is
//! chosen at start-up; `conformance` is the behaviour every backend must show. Depends on
//! `event`, `crypto` and `memory` only (and the crate root's `error_chain`).

pub mod audit;
pub mod durable;
pub mod hold;
pub mod open;
pub mod paged;
pub mod postgres;
mod queue;
pub mod rows;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use audit::AuditTrail;
pub use durable::DurableStore;
pub use durable::shared::SharedStore;
pub use hold::{Holds, Kept, KeptRecords, NoHolds};
pub use paged::PagedStore;
pub use rows::{Row, RowWrite, Rows, is_reserved, reserved_group};

use crate::event::MailboxEvent;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing can be committed now (the commit thread stopped, the database is gone).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database beneath failed (redb, PostgreSQL, the file system), or what it holds
    /// could not be decoded: the error it gave is the source.
    #[error("store I/O: {0}")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A failure reported as text: a commit's outcome shared by every writer waiting on
    /// it, or a state the store never writes.
    #[error("store I/O: {0}")]
    Failed(String),
    /// A write the store refuses as asked (a name it cannot key).
    #[error("refused by the store: {0}")]
    Invalid(String),
}

impl StoreError {
    /// The database's own error, kept as the source.
    pub fn io(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Io(Box::new(err))
    }
}

/// How many parsed events a store keeps in memory, oldest out first: fan-out and retries
/// of recent events do not read them again. One per KiB of a sixteenth of the memory limit,
/// 1,000 to 10,000 (an event costs ~450 bytes, more with long subjects and address lists).
pub fn event_cache() -> usize {
    crate::memory::share(crate::memory::limit(), 16 << 10, 1_000, 10_000) as usize
}

/// The embedded store's page cache, in bytes (sized from the memory limit too).
pub fn page_cache_bytes() -> usize {
    durable::engine::redb_cache_bytes()
}

/// Whether a store error says the volume is full (ENOSPC as the OS words it, with or
/// without its number, or a quota).
pub fn out_of_space(reason: &str) -> bool {
    reason.contains("No space left on device") || reason.contains("os error 28") || reason.contains("os error 122")
}

/// Stable shard of a subscription UID: where its deliveries are made, and in a shared
/// store which replica's share of the work they are.
pub fn shard_of(uid: &str, shards: usize) -> usize {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(uid.as_bytes());
    let n = u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]);
    (n % shards.max(1) as u64) as usize
}

/// Resolves once a write is on disk.
pub struct Durable(Option<tokio::sync::oneshot::Receiver<Result<(), String>>>);

impl Durable {
    /// Already durable (or nothing to persist).
    pub fn now() -> Durable {
        Durable(None)
    }

    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx
                .await
                .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))?
                .map_err(StoreError::Failed),
        }
    }
}

/// One new event and the deliveries it needs; stored together or not at all.
#[derive(Debug, Clone)]
pub struct Ingest {
    pub event: MailboxEvent,
    pub deliveries: Vec<PendingDelivery>,
}

/// A raw message kept beside the events made from it, under its SHA-256 (hex): the same
/// message journaled twice is kept once.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub sha256: String,
    pub bytes: Vec<u8>,
}

impl RawMessage {
    pub fn new(bytes: Vec<u8>) -> RawMessage {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(&bytes);
        let sha256 = crate::crypto::hex(&digest);
        RawMessage { sha256, bytes }
    }
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
    /// Of the backlog, in flight.
    pub in_flight: u64,
    pub dead_lettered: u64,
    /// Bytes of the events the backlog holds (each delivery counts its event's stored size).
    pub bytes: u64,
    /// When the oldest delivery of the backlog was accepted (its queue's head).
    pub oldest_accepted: Option<jiff::Timestamp>,
    /// Deliveries sent straight to the dead letters since start because the backlog was at
    /// its cap (`BacklogCap`).
    pub overflowed: u64,
}

/// The most a subscription's backlog may hold (`delivery.maxBacklog`): a new delivery past
/// either figure goes straight to the dead letters, so one subscriber's backlog never
/// makes ingest refuse another's mail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BacklogCap {
    pub events: Option<u64>,
    pub bytes: Option<u64>,
}

impl BacklogCap {
    /// Why a backlog of `counts` takes no new delivery, if it takes none.
    pub fn full(&self, counts: &QueueCounts) -> Option<String> {
        if let Some(max) = self.events.filter(|max| counts.backlog >= *max) {
            return Some(format!(
                "the subscription's backlog is at delivery.maxBacklog.events ({max}); raise it or let the endpoint catch up, then replay"
            ));
        }
        if let Some(max) = self.bytes.filter(|max| counts.bytes >= *max) {
            return Some(format!(
                "the subscription's backlog is at delivery.maxBacklog.bytes ({max}); raise it or let the endpoint catch up, then replay"
            ));
        }
        None
    }
}

/// One delivery attempt, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// Subscription UID (the log is kept per subscription, so it is not stored twice).
    #[serde(skip)]
    pub subscription: String,
    pub event_id: String,
    /// 1 for the first attempt of a delivery.
    pub attempt: u32,
    pub at: jiff::Timestamp,
    /// The endpoint's answer; absent when the request got none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Why the attempt failed (transport error or non-2xx answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: u64,
    /// The audit log index of the event's acceptance, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_index: Option<u64>,
    /// The request's `webhook-id` (a batch's own), when one was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_id: Option<String>,
    /// The SHA-256 (hex) of the exact body sent, when one was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
    /// The mailbox of the event: what a LegalHold keeps attempts by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
}

impl Attempt {
    /// The audit log's record of this attempt.
    pub fn audit_record(&self) -> crate::audit::Record {
        crate::audit::Record::Delivery {
            event_id: self.event_id.clone(),
            event_index: self.log_index,
            subscription: self.subscription.clone(),
            webhook_id: self.webhook_id.clone(),
            attempt: self.attempt,
            http_status: self.http_status,
            at: self.at,
            body_sha256: self.body_sha256.clone(),
        }
    }
}

/// A delivery that was given up, kept for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub event_id: String,
    pub attempts: u32,
    pub accepted_at: jiff::Timestamp,
    pub dead_at: jiff::Timestamp,
    pub reason: String,
}

/// How long a subscription's history is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Dead letters given up before this are deleted.
    pub dead_letters_before: jiff::Timestamp,
    /// Attempts made before this are deleted.
    pub attempts_before: jiff::Timestamp,
    /// At most this many attempts are kept (the newest).
    pub max_attempts: u64,
}

/// What a purge removed, and what LegalHolds kept from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub dead_letters: u64,
    pub attempts: u64,
    pub raw_messages: u64,
    pub kept: Kept,
}

/// A subscription's delivery health as its shard's owner last published it.
#[derive(Debug, Clone)]
pub struct PublishedHealth {
    pub uid: String,
    /// The replica (pod) that published it.
    pub owner: String,
    /// What the owner wrote (the delivery module's encoding).
    pub body: serde_json::Value,
}

/// A store several replicas share (PostgreSQL): each replica loads and delivers only the
/// shards it owns. Ownership itself is decided outside the store (`replica::ownership`);
/// the store is told, and fences its writes with the epoch of each claim.
pub trait Sharing: Send + Sync {
    /// The number of shards the rows are sharded by.
    fn shards(&self) -> usize;
    /// Loads the waiting deliveries and dead letters of the shards `taken` (shard, epoch),
    /// claiming them under their epochs (writes made by an earlier owner's claim are
    /// refused from now on). Returns the subscriptions that have work.
    fn acquire(&self, taken: &[(u32, u64)]) -> Result<Vec<String>, StoreError>;
    /// Lets go of a shard: its waiting work leaves memory; deliveries in flight finish,
    /// and their writes reach the database only while the claim is still this replica's.
    fn release(&self, shard: u32);
    /// Deliveries of the shard in flight here.
    fn in_flight(&self, shard: u32) -> usize;
    fn owns(&self, shard: u32) -> bool;
    /// The shards owned, with the epoch of each claim.
    fn owned(&self) -> Vec<(u32, u64)>;
    /// Claims the deliveries committed since (by any replica) for the shards owned;
    /// returns the subscriptions that got some.
    fn claim_arrivals(&self) -> Result<Vec<String>, StoreError>;
    /// Loads the owned shards again (their claims kept): after a claim whose answer was
    /// lost, the rows it claimed would otherwise wait for the next owner. Returns the
    /// subscriptions with work.
    fn reload(&self) -> Result<Vec<String>, StoreError>;
    /// Deletes events nothing refers to any more (one replica's last delivery of an event
    /// cannot know of another's); returns how many.
    fn collect_events(&self) -> Result<u64, StoreError>;
    /// Counts the waiting deliveries of every shard (what `total_backlog` answers until the
    /// next count); returns the count.
    fn refresh_backlog(&self) -> Result<u64, StoreError>;
    /// Replaces the published health of `rows`' subscriptions.
    fn publish_health(&self, owner: &str, rows: Vec<(String, serde_json::Value)>) -> Result<(), StoreError>;
    /// Every subscription's published health.
    fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError>;
    /// Forgets the published health of subscriptions that are gone.
    fn forget_health(&self, uids: &[String]) -> Result<(), StoreError>;
    /// Delivery writes the database refused so far: made under a claim that had moved on.
    fn fenced_writes(&self) -> u64;
}

/// The event log, as the sources use it: events stored with their deliveries in one
/// durable write (producer ids de-duplicated), and read back by id.
pub trait EventLog: Send + Sync {
    /// Stores events with their deliveries, atomically and durably before it returns;
    /// an event whose producer id was seen before is skipped, deliveries and all.
    fn ingest(&self, items: Vec<Ingest>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_archived(items, None)
    }
    /// As `ingest`, archiving `raw` in the same write when a stored event refers to it
    /// (`MailboxEvent::raw_message`).
    fn ingest_archived(&self, items: Vec<Ingest>, raw: Option<RawMessage>) -> Result<Vec<Appended>, StoreError>;
    /// As `ingest`, writing a source's keyed `rows` (`rows`) in the same commit.
    fn ingest_with_rows(&self, items: Vec<Ingest>, rows: Vec<RowWrite>) -> Result<Vec<Appended>, StoreError>;
    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError>;
    /// The event if it is in memory (no disk or database read): async callers try this
    /// first and read with `event` off the runtime only when it misses.
    fn cached_event(&self, _id: &str) -> Option<Arc<MailboxEvent>> {
        None
    }
    /// Events by id, in the order asked for, each as `event` answers it: one read for all
    /// the events a request carries, not one each, and an event that cannot be read fails
    /// alone.
    fn events(&self, ids: &[String]) -> Vec<Result<Option<Arc<MailboxEvent>>, StoreError>> {
        ids.iter().map(|id| self.event(id)).collect()
    }
    /// Forgets producer event ids first seen before `before`: a later event with one of
    /// them is new again.
    fn purge_producer_ids(&self, before: jiff::Timestamp) -> Result<u64, StoreError>;
    /// Events stored, for tests and figures.
    fn event_count(&self) -> Result<u64, StoreError>;
}

/// Raw messages archived with the events that refer to them.
pub trait Archive: Send + Sync {
    /// An archived raw message by its SHA-256, with when it was archived.
    fn raw_message(&self, sha256: &str) -> Result<Option<(jiff::Timestamp, Vec<u8>)>, StoreError>;
    /// Deletes the raw messages archived before `before` that no hold keeps (with their
    /// mailbox index); returns how many, and what `holds` kept.
    fn purge_raw_messages(&self, before: jiff::Timestamp, holds: &dyn Holds) -> Result<Purged, StoreError>;
}

/// The delivery queues, as the shards use them: take what is due, then complete, retry or
/// give up each delivery; counts and caps per subscription.
pub trait Queue: Send + Sync {
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
    /// The delivery succeeded: forget it. Await the returned `Durable` to know it is on
    /// disk (a delivery counts as in flight until then).
    fn complete(&self, delivery: &PendingDelivery) -> Result<Durable, StoreError>;
    /// The delivery failed and will be tried again at its (updated) `not_before`.
    fn retry(&self, delivery: PendingDelivery) -> Result<(), StoreError>;
    /// The delivery will not be tried again; keep it for replay.
    fn dead_letter(&self, delivery: PendingDelivery, reason: String) -> Result<(), StoreError>;
    /// Queues again every dead letter given up at or after `since`, due at `now` with a
    /// fresh attempt count and age; returns how many. Durable when it returns.
    fn replay(&self, subscription: &str, since: jiff::Timestamp, now: jiff::Timestamp) -> Result<u64, StoreError>;
    /// Moves waiting deliveries accepted before `accepted_before` to the dead letters;
    /// returns them.
    fn expire(
        &self,
        subscription: &str,
        accepted_before: jiff::Timestamp,
        reason: &str,
    ) -> Result<Vec<PendingDelivery>, StoreError>;
    fn counts(&self, subscription: &str) -> QueueCounts;
    /// Sets (or lifts, with None) the cap on a subscription's backlog, applied to the
    /// deliveries ingested from now on.
    fn limit_backlog(&self, subscription: &str, cap: Option<BacklogCap>);
    /// Deliveries waiting or in flight, over every subscription.
    fn total_backlog(&self) -> u64;
    /// Every subscription the store holds deliveries, dead letters or attempts for, with
    /// its namespace when `note_subscription` recorded it.
    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError>;
    /// Records the namespace of a subscription that is about to get deliveries (kept until
    /// `forget_subscription`).
    fn note_subscription(&self, uid: &str, namespace: &str) -> Result<(), StoreError>;
    /// Drops every delivery, dead letter and attempt of a deleted subscription.
    fn forget_subscription(&self, subscription: &str) -> Result<(), StoreError>;
    /// Queued deliveries read from the store since start, for backends that page their
    /// queues (a start reads each queue's head only, not the backlog).
    fn queue_rows_read(&self) -> Option<u64> {
        None
    }
    /// Whether the next `take_due` of `subscription` would read the disk first (cheap).
    /// Backends that page their queues say so, and the shard makes that read with
    /// `read_ahead` on a blocking thread, so the take itself finds memory ready.
    fn wants_read(&self, _subscription: &str, _ordered: bool) -> bool {
        false
    }
    /// Reads the head of `subscription`'s queue that the next `take_due` needs, without
    /// holding up anything else meanwhile. Blocks on the disk: call it off the runtime.
    fn read_ahead(&self, _subscription: &str, _ordered: bool) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The delivery history: every attempt and every dead letter, for the history API and
/// retention.
pub trait History: Send + Sync {
    /// Adds an attempt to the subscription's audit log; it is committed no later than a
    /// completion recorded after it.
    fn record_attempt(&self, attempt: Attempt) -> Result<(), StoreError>;
    /// The subscription's attempts made at or after `since`, newest first.
    fn attempts(&self, subscription: &str, since: jiff::Timestamp, limit: usize) -> Result<Vec<Attempt>, StoreError>;
    /// The subscription's dead letters given up at or after `since`, newest first.
    fn dead_letters(
        &self,
        subscription: &str,
        since: jiff::Timestamp,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;
    /// Deletes dead letters and attempts older than `retention` allows, but those a hold
    /// keeps; returns how many, and what `holds` kept.
    fn purge(&self, subscription: &str, retention: Retention, holds: &dyn Holds) -> Result<Purged, StoreError>;
}

/// The backend itself: whether it can commit, how full its volume is, whether replicas
/// share it, and the secrets kept with the data.
pub trait Backend: Send + Sync {
    /// Set when several replicas share this store: the part of the work that is this
    /// replica's is decided outside it.
    fn sharing(&self) -> Option<&dyn Sharing> {
        None
    }
    /// A 32-byte secret kept with the data (created on first use), so what it signs stays
    /// valid across restarts and dies with the store.
    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError>;
    /// Commits that failed since start (writes nobody waits for included).
    fn commit_failures(&self) -> u64 {
        0
    }
    /// Why the store cannot commit right now, if it cannot (the database is down, the disk
    /// is full): new events are refused, deliveries pause, readiness and status say why.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Why the store's commits fail, if they do: deliveries pause, since a completion would
    /// not be durable. Unlike `unavailable`, not while only the volume is too full for new
    /// events (writes of deliveries still go through, and free space as they drain).
    fn commits_fail(&self) -> Option<String> {
        self.unavailable()
    }
    /// Returns once every write queued so far is durable (at shutdown: the attempts and
    /// retries that were queued without waiting).
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Bytes on disk, for backends that have a disk.
    fn disk_bytes(&self) -> Option<u64> {
        None
    }
    /// The store's volume as (size, bytes available), for backends on a local volume: how
    /// full it is before it is full.
    fn volume(&self) -> Option<(u64, u64)> {
        None
    }
}

/// Every part of a store: what a backend implements and start-up wires. Each consumer
/// is handed only the part it uses (`Deliveries::events`, `history`, ...).
pub trait Store: EventLog + Rows + Archive + Queue + History + AuditTrail + Backend + 'static {}

impl<T: EventLog + Rows + Archive + Queue + History + AuditTrail + Backend + 'static> Store for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_keeps_the_database_error_as_its_source() {
        let err = StoreError::io(std::io::Error::from_raw_os_error(28));
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(source.and_then(std::io::Error::raw_os_error), Some(28));
        assert!(out_of_space(&err.to_string()), "{err}");
        assert_eq!(crate::error_chain(&err), err.to_string(), "the cause is said once");
    }
}

/// The behaviour every backend must show; each backend's tests run it (the PostgreSQL
/// backend's from `tests/postgres`, against a real server). Test support, not API.
#[doc(hidden)]
pub mod conformance {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid")
    }

    pub fn event(id: &str, producer: Option<&str>) -> MailboxEvent {
        let mut e: MailboxEvent = serde_json::from_value(serde_json::json!({
            "id": id, "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "a@b.c",
        }))
        .expect("event");
        e.producer_event_id = producer.map(String::from);
        e
    }

    /// (backlog, in flight, dead letters): what every backend counts alike.
    fn figures(c: QueueCounts) -> (u64, u64, u64) {
        (c.backlog, c.in_flight, c.dead_lettered)
    }

    pub fn pending(event: &str, key: Option<&str>, not_before: i64) -> PendingDelivery {
        PendingDelivery {
            subscription: "sub".into(),
            event_id: event.into(),
            attempts: 0,
            not_before: at(not_before),
            accepted_at: at(0),
            ordering_key: key.map(String::from),
            matched_filters: vec![],
            seq: 0,
        }
    }

    fn ingest(store: &dyn Store, deliveries: Vec<PendingDelivery>) {
        let items = deliveries
            .into_iter()
            .map(|d| Ingest {
                event: event(&d.event_id, None),
                deliveries: vec![d],
            })
            .collect();
        store.ingest(items).expect("ingest");
    }

    /// Every part's checks, each on a fresh store (most need events in to see anything out).
    pub fn run(make: &dyn Fn() -> Box<dyn Store>) {
        // Queue
        unordered_takes_due_in_time_order_and_counts_backlog(make().as_ref());
        ordered_holds_back_later_events_of_a_busy_or_waiting_key(make().as_ref());
        a_forgotten_subscription_leaves_nothing_behind(make().as_ref());
        waiting_deliveries_past_their_age_become_dead_letters(make().as_ref());
        // EventLog
        producer_ids_deduplicate_with_their_deliveries(make().as_ref());
        producer_ids_expire(make().as_ref());
        events_are_read_by_id_in_the_order_asked(make().as_ref());
        // History (and the Queue's replay of dead letters)
        dead_letters_are_listed_replayed_and_purged_with_their_events(make().as_ref());
        attempts_are_logged_newest_first_and_purged_by_age_and_count(make().as_ref());
        // Archive
        raw_messages_are_archived_with_their_events_only_and_purged_by_age(make().as_ref());
        legal_holds_keep_records_past_retention_until_released(make().as_ref());
        // Backend
        secrets_are_created_once(make().as_ref());
        // Rows
        rows_are_written_with_events_and_read_by_group_prefix_and_age(make().as_ref());
        // AuditTrail
        accepted_events_attempts_and_custody_grow_one_verifiable_tree(make().as_ref());
    }

    fn accepted_events_attempts_and_custody_grow_one_verifiable_tree(s: &dyn Store) {
        use crate::audit::{Record, leaf_hash, prove_consistency, prove_leaf, root};
        ingest(s, vec![pending("evt_a1", None, 0), pending("evt_a2", None, 0)]);
        // Accepted without subscribers: logged too; a duplicate producer id is not.
        let lone = || Ingest {
            event: event("evt_a3", Some("p-a3")),
            deliveries: vec![],
        };
        s.ingest(vec![lone()]).expect("ingest");
        let mut again = lone();
        again.event.id = "evt_a3b".into();
        s.ingest(vec![again]).expect("ingest");
        let mut tried = attempt(20, 1);
        tried.event_id = "evt_a1".into();
        tried.log_index = Some(0);
        s.record_attempt(tried).expect("attempt");
        s.flush().expect("flush");
        let custody = Record::Custody {
            action: "export".into(),
            subject: "evt_a1".into(),
            by: "auditor".into(),
            at: at(30),
            detail: String::new(),
        };
        assert_eq!(
            s.audit_append(&custody).expect("custody"),
            Some(4),
            "its index, once committed"
        );
        let size = s.audit_size().expect("size");
        assert_eq!(size, 5, "three events, one attempt, one act of custody");
        let records = s.audit_records(0, size).expect("records");
        let kinds: Vec<String> = records
            .iter()
            .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).expect("json")["kind"].to_string())
            .collect();
        assert_eq!(
            kinds,
            ["\"event\"", "\"event\"", "\"event\"", "\"delivery\"", "\"custody\""]
        );
        assert_eq!(s.audit_leaves_of("evt_a3").expect("index"), [2]);
        assert_eq!(
            s.audit_leaves_of("evt_a1").expect("index"),
            [0, 3],
            "the event's acceptance, then its attempt"
        );
        assert!(s.audit_leaves_of("evt_a3b").expect("index").is_empty());
        let hashes = crate::store::audit::Hashes(s);
        let top = root(size, &hashes).expect("root");
        for (i, body) in &records {
            let proof = prove_leaf(size, *i, &hashes).expect("prove");
            tlog_tiles::check_record(&proof, size, top, *i, leaf_hash(body)).expect("included");
        }
        let proof = prove_consistency(size, 2, &hashes).expect("prove");
        tlog_tiles::check_tree(&proof, size, top, 2, root(2, &hashes).expect("old root")).expect("consistent");
        // Each event is told its own acceptance's index once committed, a derived one
        // (a flag made from it) included, and events read back learn theirs.
        let original = event("evt_a6", None);
        let derived = original.derive();
        let (told, told_derived) = (original.log_index.share(), derived.log_index.share());
        let (clone, derived_id) = (original.clone(), derived.id.clone());
        let item = |e: MailboxEvent| Ingest {
            event: e,
            deliveries: vec![],
        };
        s.ingest(vec![item(original), item(derived)]).expect("ingest");
        let index_of = |id: &str| s.audit_leaves_of(id).expect("leaves").first().copied();
        assert!(told.get().is_some());
        assert_eq!(told.get(), index_of("evt_a6"), "told its own index");
        assert_eq!(told_derived.get(), index_of(&derived_id));
        assert_ne!(told.get(), told_derived.get());
        assert_eq!(clone.log_index.get(), None, "a clone made before is not told");
        let read = s.events(&["evt_a1".to_string()]);
        let read = read
            .first()
            .and_then(|r| r.as_ref().ok())
            .and_then(|e| e.clone())
            .expect("stored");
        assert_eq!(read.log_index.get(), Some(0), "the stored event knows its index");
        // Checkpoints: one per size (the first kept), the newest is the largest.
        assert_eq!(s.audit_checkpoint(None).expect("none yet"), None);
        s.audit_keep_checkpoint(5, b"five".to_vec()).expect("keep");
        s.audit_keep_checkpoint(3, b"three".to_vec()).expect("keep");
        s.audit_keep_checkpoint(5, b"another five".to_vec()).expect("keep");
        assert_eq!(s.audit_checkpoint(None).expect("read"), Some((5, b"five".to_vec())));
        assert_eq!(s.audit_checkpoint(Some(3)).expect("read"), Some((3, b"three".to_vec())));
        assert_eq!(s.audit_checkpoint(Some(4)).expect("read"), None);
    }

    fn events_are_read_by_id_in_the_order_asked(s: &dyn Store) {
        ingest(s, vec![pending("evt_r1", None, 0), pending("evt_r2", None, 0)]);
        let ids: Vec<String> = ["evt_r2", "evt_gone", "evt_r1", "evt_r2"]
            .iter()
            .map(|i| i.to_string())
            .collect();
        let read: Vec<Option<String>> = s
            .events(&ids)
            .into_iter()
            .map(|e| e.expect("read").map(|e| e.id.clone()))
            .collect();
        assert_eq!(
            read,
            [Some("evt_r2"), None, Some("evt_r1"), Some("evt_r2")].map(|i| i.map(String::from))
        );
        assert!(s.events(&[]).is_empty());
    }

    fn rows_are_written_with_events_and_read_by_group_prefix_and_age(s: &dyn Store) {
        let put = |group: &str, key: &[u8], at: i64| RowWrite::Put {
            group: group.into(),
            row: Row {
                key: key.to_vec(),
                at,
                body: format!("{group}:{at}").into_bytes(),
            },
        };
        let first = s
            .ingest_with_rows(
                vec![Ingest {
                    event: event("evt_w1", Some("rows:1")),
                    deliveries: vec![],
                }],
                vec![
                    put("zoë", b"a\0\x01", 10),
                    put("zoë", b"a\0\xff", 20),
                    put("zoë", b"a/b\0", 30),
                    put("zoë", b"\xff\xff", 40),
                    put("z", b"a\0\x01", 50),
                ],
            )
            .expect("ingest");
        assert!(!first[0].duplicate);
        let keys = |group: &str, prefix: &[u8]| -> Vec<Vec<u8>> {
            s.rows(group, prefix)
                .expect("scan")
                .into_iter()
                .map(|r| r.key)
                .collect()
        };
        assert_eq!(keys("zoë", b"a\0"), vec![b"a\0\x01".to_vec(), b"a\0\xff".to_vec()]);
        assert_eq!(
            keys("zoë", b"a"),
            vec![b"a\0\x01".to_vec(), b"a\0\xff".to_vec(), b"a/b\0".to_vec()]
        );
        assert_eq!(
            keys("zoë", b"\xff"),
            vec![b"\xff\xff".to_vec()],
            "a prefix of 0xff bytes"
        );
        assert_eq!(keys("zoë", b"").len(), 4, "a group is not another that starts like it");
        assert_eq!(keys("z", b"").len(), 1);
        assert!(keys("nobody", b"").is_empty());
        assert_eq!(
            s.row("zoë", b"a\0\xff").expect("get"),
            Some(Row {
                key: b"a\0\xff".to_vec(),
                at: 20,
                body: b"zo\xc3\xab:20".to_vec(),
            })
        );
        assert_eq!(s.row("zoë", b"a\0").expect("get"), None);
        assert_eq!(
            s.row_groups().expect("groups"),
            vec!["z".to_string(), "zoë".to_string()]
        );
        let mut old = s.rows_before(25).expect("old");
        old.sort();
        assert_eq!(
            old,
            vec![
                ("zoë".to_string(), b"a\0\x01".to_vec()),
                ("zoë".to_string(), b"a\0\xff".to_vec())
            ]
        );
        s.write_rows(vec![
            RowWrite::Delete {
                group: "zoë".into(),
                key: b"a\0\x01".to_vec(),
            },
            put("zoë", b"a\0\xff", 60),
        ])
        .expect("write");
        assert_eq!(keys("zoë", b"a\0"), vec![b"a\0\xff".to_vec()]);
        assert!(
            s.rows_before(25).expect("old").is_empty(),
            "a row put again is as new as its write"
        );
        assert!(
            s.write_rows(vec![put("a\0b", b"k", 1)]).is_err(),
            "a group holding a NUL is refused"
        );
    }

    fn attempt(at_s: i64, n: u32) -> Attempt {
        Attempt {
            subscription: "sub".into(),
            event_id: format!("e{n}"),
            attempt: n,
            at: at(at_s),
            http_status: Some(500),
            error: Some("HTTP 500".into()),
            latency_ms: 3,
            log_index: None,
            webhook_id: Some(format!("msg_{n}")),
            body_sha256: None,
            mailbox: Some("a@b.c".into()),
        }
    }

    fn dead_letters_are_listed_replayed_and_purged_with_their_events(s: &dyn Store) {
        ingest(s, vec![pending("a", None, 0), pending("b", None, 0)]);
        for d in s.take_due("sub", at(10), 10, false).expect("take") {
            s.dead_letter(d, "gave up".into()).expect("dead letter");
        }
        let dead = s.dead_letters("sub", at(0), 10).expect("list");
        assert_eq!(dead.len(), 2);
        assert_eq!(dead[0].reason, "gave up");
        assert!(
            s.dead_letters("sub", jiff::Timestamp::MAX, 10)
                .expect("list")
                .is_empty()
        );
        assert_eq!(s.dead_letters("sub", at(0), 1).expect("list").len(), 1, "limit");

        let now = jiff::Timestamp::now();
        assert_eq!(s.replay("sub", at(0), now).expect("replay"), 2);
        assert_eq!(figures(s.counts("sub")), (2, 0, 0));
        let again = s.take_due("sub", now, 10, false).expect("take");
        assert_eq!(again.len(), 2, "replayed deliveries are due at once");
        assert!(again.iter().all(|d| d.attempts == 0 && d.accepted_at == now));
        assert!(
            s.event("a").expect("read").is_some(),
            "the event was kept for the replay"
        );

        for d in again {
            s.dead_letter(d, "gave up again".into()).expect("dead letter");
        }
        let retention = Retention {
            dead_letters_before: jiff::Timestamp::MAX,
            attempts_before: at(0),
            max_attempts: 10,
        };
        assert_eq!(s.purge("sub", retention, &NoHolds).expect("purge").dead_letters, 2);
        assert_eq!(figures(s.counts("sub")), (0, 0, 0));
        s.ingest(vec![]).expect("flush");
        assert_eq!(
            s.event_count().expect("count"),
            0,
            "events go with their last dead letter"
        );
    }

    fn attempts_are_logged_newest_first_and_purged_by_age_and_count(s: &dyn Store) {
        for i in 1..=5 {
            s.record_attempt(attempt(i64::from(i) * 10, i)).expect("record");
        }
        s.ingest(vec![]).expect("flush");
        let all = s.attempts("sub", at(0), 100).expect("list");
        assert_eq!(all.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![5, 4, 3, 2, 1]);
        assert_eq!(all[0], attempt(50, 5));
        assert_eq!(s.attempts("sub", at(30), 100).expect("list").len(), 3, "since");
        assert!(s.attempts("other", at(0), 100).expect("list").is_empty());

        // Age: the two before t=25 go; count: of the three left, keep two.
        let retention = Retention {
            dead_letters_before: at(0),
            attempts_before: at(25),
            max_attempts: 2,
        };
        assert_eq!(s.purge("sub", retention, &NoHolds).expect("purge").attempts, 3);
        s.ingest(vec![]).expect("flush");
        let left = s.attempts("sub", at(0), 100).expect("list");
        assert_eq!(left.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![5, 4]);
        assert_eq!(
            s.purge("sub", retention, &NoHolds).expect("purge"),
            Purged::default(),
            "nothing more"
        );

        s.forget_subscription("sub").expect("forget");
        assert!(s.attempts("sub", at(0), 100).expect("list").is_empty());
    }

    fn waiting_deliveries_past_their_age_become_dead_letters(s: &dyn Store) {
        let mut old = pending("old", None, 0);
        old.accepted_at = at(5);
        let mut new = pending("new", None, 0);
        new.accepted_at = at(50);
        ingest(s, vec![old, new]);
        assert_eq!(
            s.expire("sub", at(10), "older than maxEventAge").expect("expire").len(),
            1
        );
        assert_eq!(figures(s.counts("sub")), (1, 0, 1));
        assert_eq!(s.dead_letters("sub", at(0), 10).expect("list")[0].event_id, "old");
    }

    fn raw_messages_are_archived_with_their_events_only_and_purged_by_age(s: &dyn Store) {
        let raw = RawMessage::new(b"From: a@b.c\r\n\r\nhello\r\n".to_vec());
        let with_raw = |id: &str, deliveries: Vec<PendingDelivery>| {
            let mut e = event(id, None);
            e.raw_message = Some(raw.sha256.clone());
            Ingest { event: e, deliveries }
        };
        // No event refers to it (the pipeline drops the reference when nobody links to
        // the message and no hold keeps it): nothing is kept.
        let mut e0 = with_raw("e0", vec![pending("e0", None, 0)]);
        e0.event.raw_message = None;
        s.ingest_archived(vec![e0], Some(raw.clone())).expect("ingest");
        assert_eq!(s.raw_message(&raw.sha256).expect("read"), None);
        s.ingest_archived(vec![with_raw("e1", vec![pending("e1", None, 0)])], Some(raw.clone()))
            .expect("ingest");
        let (at, bytes) = s.raw_message(&raw.sha256).expect("read").expect("archived");
        assert_eq!(bytes, raw.bytes);
        assert_eq!(
            s.purge_raw_messages(at, &NoHolds).expect("purge").raw_messages,
            0,
            "not older than itself"
        );
        let later = at.checked_add(jiff::SignedDuration::from_secs(1)).expect("time");
        assert_eq!(s.purge_raw_messages(later, &NoHolds).expect("purge").raw_messages, 1);
        assert_eq!(s.raw_message(&raw.sha256).expect("read"), None);
        assert!(
            s.rows(&hold::raw_mailboxes_group(), b"").expect("rows").is_empty(),
            "the mailbox index goes with the message"
        );
    }

    /// Holds `held@example.com` as hold `matter-1`.
    struct OneHold;

    impl Holds for OneHold {
        fn any(&self) -> bool {
            true
        }

        fn holding(&self, mailbox: &str, _at: jiff::Timestamp) -> Vec<String> {
            if mailbox == "held@example.com" {
                vec!["matter-1".into()]
            } else {
                Vec::new()
            }
        }
    }

    fn legal_holds_keep_records_past_retention_until_released(s: &dyn Store) {
        let of = |id: &str, mailbox: &str| {
            let mut e = event(id, None);
            e.mailbox = mailbox.into();
            e
        };
        // A raw message of a held mailbox is archived with no delivery at all.
        let raw = RawMessage::new("From: zoë@example.com\r\n\r\nheld\r\n".as_bytes().to_vec());
        let mut held = of("h1", "held@example.com");
        held.raw_message = Some(raw.sha256.clone());
        s.ingest_archived(
            vec![Ingest {
                event: held,
                deliveries: vec![],
            }],
            Some(raw.clone()),
        )
        .expect("ingest");
        let free_raw = RawMessage::new(b"From: a@b.c\r\n\r\nfree\r\n".to_vec());
        let mut free = of("f1", "a@b.c");
        free.raw_message = Some(free_raw.sha256.clone());
        s.ingest_archived(
            vec![Ingest {
                event: free,
                deliveries: vec![pending("f1", None, 0)],
            }],
            Some(free_raw.clone()),
        )
        .expect("ingest");
        // Dead letters and attempts of both mailboxes.
        s.ingest(vec![
            Ingest {
                event: of("h2", "held@example.com"),
                deliveries: vec![pending("h2", None, 0)],
            },
            Ingest {
                event: of("f2", "a@b.c"),
                deliveries: vec![pending("f2", None, 0)],
            },
        ])
        .expect("ingest");
        for d in s.take_due("sub", at(10), 10, false).expect("take") {
            s.dead_letter(d, "gave up".into()).expect("dead letter");
        }
        for (i, mailbox) in [(1, "held@example.com"), (2, "a@b.c"), (3, "held@example.com")] {
            let mut a = attempt(i64::from(i) * 10, i);
            a.mailbox = Some(mailbox.into());
            s.record_attempt(a).expect("record");
        }
        s.ingest(vec![]).expect("flush");

        // Everything is past its retention; the hold keeps its mailbox's records.
        let all_gone = Retention {
            dead_letters_before: jiff::Timestamp::MAX,
            attempts_before: jiff::Timestamp::MAX,
            max_attempts: 0,
        };
        let p = s.purge("sub", all_gone, &OneHold).expect("purge");
        assert_eq!((p.attempts, p.dead_letters), (1, 2), "f1 and f2 dead, attempt 2");
        let k = p.kept.get("matter-1").copied().expect("kept by the hold");
        assert_eq!((k.attempts, k.dead_letters), (2, 1));
        let raw_purged = s.purge_raw_messages(jiff::Timestamp::MAX, &OneHold).expect("purge");
        assert_eq!(raw_purged.raw_messages, 1, "the free message goes");
        let k = raw_purged.kept.get("matter-1").copied().expect("kept by the hold");
        assert_eq!((k.raw_messages, k.raw_message_bytes), (1, raw.bytes.len() as u64));
        s.ingest(vec![]).expect("flush");
        assert_eq!(
            s.attempts("sub", at(0), 100)
                .expect("list")
                .iter()
                .map(|a| a.attempt)
                .collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert_eq!(
            s.dead_letters("sub", at(0), 10)
                .expect("list")
                .iter()
                .map(|d| d.event_id.as_str())
                .collect::<Vec<_>>(),
            ["h2"]
        );
        assert!(
            s.event("h2").expect("read").is_some(),
            "a held dead letter keeps its event"
        );
        assert!(s.raw_message(&raw.sha256).expect("read").is_some());
        assert_eq!(s.raw_message(&free_raw.sha256).expect("read"), None);

        // Released: the next purge takes them.
        let p = s.purge("sub", all_gone, &NoHolds).expect("purge");
        assert_eq!((p.attempts, p.dead_letters), (2, 1));
        assert_eq!(
            s.purge_raw_messages(jiff::Timestamp::MAX, &NoHolds)
                .expect("purge")
                .raw_messages,
            1
        );
        s.ingest(vec![]).expect("flush");
        assert!(s.attempts("sub", at(0), 100).expect("list").is_empty());
        assert!(s.dead_letters("sub", at(0), 10).expect("list").is_empty());
        assert_eq!(s.raw_message(&raw.sha256).expect("read"), None);
    }

    fn secrets_are_created_once(s: &dyn Store) {
        let a = s.secret("links").expect("secret");
        assert_eq!(s.secret("links").expect("secret"), a);
        assert_ne!(s.secret("other").expect("secret"), a);
        assert_ne!(a, [0; 32]);
    }

    fn producer_ids_expire(s: &dyn Store) {
        let first = Ingest {
            event: event("evt_1", Some("p-1")),
            deliveries: vec![],
        };
        assert!(!s.ingest(vec![first]).expect("ingest")[0].duplicate);
        assert_eq!(
            s.purge_producer_ids(at(0)).expect("purge"),
            0,
            "younger than the window"
        );
        assert_eq!(s.purge_producer_ids(jiff::Timestamp::MAX).expect("purge"), 1);
        let again = Ingest {
            event: event("evt_2", Some("p-1")),
            deliveries: vec![],
        };
        assert!(
            !s.ingest(vec![again]).expect("ingest")[0].duplicate,
            "new again after the window"
        );
    }

    fn a_forgotten_subscription_leaves_nothing_behind(s: &dyn Store) {
        ingest(s, vec![pending("a", None, 0), pending("b", None, 0)]);
        let mut other = pending("c", None, 0);
        other.subscription = "other".into();
        ingest(s, vec![other]);
        let taken = s.take_due("sub", at(10), 1, false).expect("take");
        s.dead_letter(taken[0].clone(), "test".into()).expect("dead letter");
        s.record_attempt(attempt(5, 1)).expect("attempt");
        let mut logged_only = attempt(6, 1);
        logged_only.subscription = "attempts-only".into();
        s.record_attempt(logged_only).expect("attempt");
        s.note_subscription("sub", "mail").expect("note");
        s.note_subscription("sub", "mail").expect("noting twice is a no-op");
        let uids = |s: &dyn Store| s.subscriptions().expect("subscriptions");
        let named = |uid: &str, ns: Option<&str>| (uid.to_string(), ns.map(String::from));
        assert_eq!(
            uids(s),
            vec![
                named("attempts-only", None),
                named("other", None),
                named("sub", Some("mail"))
            ],
            "queues, dead letters and attempt logs all name their subscription"
        );
        s.forget_subscription("sub").expect("forget");
        s.forget_subscription("attempts-only").expect("forget");
        assert_eq!(uids(s), vec![named("other", None)]);
        assert_eq!(figures(s.counts("sub")), (0, 0, 0));
        assert_eq!(s.counts("other").backlog, 1, "other subscriptions keep theirs");
        assert!(s.take_due("sub", at(10), 10, false).expect("take").is_empty());
    }

    fn unordered_takes_due_in_time_order_and_counts_backlog(s: &dyn Store) {
        ingest(
            s,
            vec![pending("late", None, 50), pending("a", None, 10), pending("b", None, 5)],
        );
        let taken = s.take_due("sub", at(20), 10, false).expect("take");
        assert_eq!(
            taken.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
            vec!["b", "a"]
        );
        assert_eq!(s.counts("sub").backlog, 3, "in flight still counts");
        s.complete(&taken[0]).expect("complete");
        let mut again = taken[1].clone();
        again.not_before = at(30);
        s.retry(again).expect("retry");
        assert_eq!(s.next_due("sub"), Some(at(30)));
        assert_eq!(s.counts("sub").backlog, 2);
        let late = s.take_due("sub", at(100), 10, false).expect("take");
        s.dead_letter(late[0].clone(), "test".into()).expect("dead letter");
        assert_eq!(figures(s.counts("sub")), (1, 1, 1));
    }

    fn ordered_holds_back_later_events_of_a_busy_or_waiting_key(s: &dyn Store) {
        ingest(
            s,
            vec![
                pending("m1-first", Some("m1"), 100), // not due: holds m1 back
                pending("m1-second", Some("m1"), 0),
                pending("m2-first", Some("m2"), 0),
                pending("m2-second", Some("m2"), 0),
            ],
        );
        let taken = s.take_due("sub", at(10), 10, true).expect("take");
        assert_eq!(
            taken.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
            vec!["m2-first"]
        );
        assert!(
            s.take_due("sub", at(10), 10, true).expect("take").is_empty(),
            "m2-second waits for m2-first"
        );
        s.complete(&taken[0]).expect("complete");
        assert_eq!(
            s.take_due("sub", at(10), 10, true).expect("take")[0].event_id,
            "m2-second"
        );
    }

    fn producer_ids_deduplicate_with_their_deliveries(s: &dyn Store) {
        let first = s
            .ingest(vec![Ingest {
                event: event("evt_1", Some("p-1")),
                deliveries: vec![pending("evt_1", None, 0)],
            }])
            .expect("ingest");
        let second = s
            .ingest(vec![Ingest {
                event: event("evt_2", Some("p-1")),
                deliveries: vec![pending("evt_2", None, 0)],
            }])
            .expect("ingest");
        assert_eq!(
            first[0],
            Appended {
                id: "evt_1".into(),
                duplicate: false
            }
        );
        assert_eq!(
            second[0],
            Appended {
                id: "evt_1".into(),
                duplicate: true
            }
        );
        assert_eq!(s.counts("sub").backlog, 1, "a duplicate queues nothing");
        assert!(s.event("evt_1").expect("read").is_some());
        assert!(s.event("evt_2").expect("read").is_none());
    }
}
