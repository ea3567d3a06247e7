//! Shared mode: the durable store when several replicas share one PostgreSQL database.
//! Memory holds only the shards this replica owns; new events go to the database alone
//! (de-duplicated and numbered there) and reach memory when their shard's owner claims
//! them. Every write to a delivery carries the epoch it was claimed under, so a replica
//! that lost a shard cannot change what the new owner now holds.
//!
//! This file owns `SharedStore`, the store a replica of a shared database uses: the
//! memory-indexed `DurableStore` for the shards it owns, whose writes it fences, with
//! ingest, ownership (`Sharing`) and the store-wide reads its own. It also owns the types
//! of the fenced writes and what the database beneath must offer for them (`SharedEngine`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::committer::Op;
use super::engine::Engine;
use super::schema::{StoredDelivery, io, json};
use super::state::{Ref, State};
use super::{DurableStore, Fence, parse_row};
use crate::event::MailboxEvent;
use crate::store::queue::Dead;
use crate::store::{
    Appended, Archive, Attempt, Backend, BacklogCap, DeadLetter, Durable, EventLog, History, Ingest, PendingDelivery,
    PublishedHealth, Purged, Queue, QueueCounts, RawMessage, Retention, Row, RowWrite, Rows, Sharing, StoreError,
};

/// One event of a shared ingest.
#[derive(Clone)]
pub struct IngestItem {
    pub producer: Option<String>,
    pub event_id: String,
    /// The event's JSON; None when nobody subscribed (only its producer id is kept).
    pub event: Option<Vec<u8>>,
    /// (subscription, shard, stored delivery JSON), in the order enqueued.
    pub deliveries: Vec<(String, i32, Vec<u8>)>,
    /// The audit log's record of its acceptance, appended when the event is new.
    pub audit: Option<crate::audit::Leaf>,
}

/// The events of one `ingest` call, and where the outcome goes once committed.
#[derive(Clone)]
pub struct IngestBatch {
    pub items: Vec<IngestItem>,
    /// Unix seconds.
    pub seen_at: i64,
    /// (SHA-256, archived at, bytes), archived when a stored event refers to it.
    pub raw: Option<(String, i64, Vec<u8>)>,
    pub outcome: Arc<Mutex<Option<Vec<Appended>>>>,
}

/// A write to a claimed delivery.
pub enum Fenced {
    /// Done (delivered, or its subscription forgot it).
    Delete,
    /// Tried and due again: the new stored JSON.
    Update(Vec<u8>),
    /// Given up: moved to the dead letters with this JSON.
    Bury(Vec<u8>),
}

/// Rows a claim loaded: (seq, stored JSON).
#[derive(Default)]
pub struct Claimed {
    pub pending: Vec<(u64, Vec<u8>)>,
    pub dead: Vec<(u64, Vec<u8>)>,
}

/// What shared mode needs from the database beyond `Engine`.
pub trait SharedEngine: Send + Sync + 'static {
    /// Every waiting delivery of `shard`, claimed under `epoch`, and its dead letters.
    fn claim_shard(&self, shard: u32, epoch: u64) -> Result<Claimed, StoreError>;
    /// Unclaimed deliveries of the shards in `owned` (shard, epoch), claimed now — only
    /// where the epoch is still the shard's current one: (seq, epoch, stored JSON).
    fn claim_arrivals(&self, owned: &[(u32, u64)]) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError>;
    /// Events' JSON by id (absent ones skipped).
    fn events(&self, ids: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// (subscription, attempts logged, newest key) of every subscription with attempts.
    fn attempt_counts(&self) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// Deletes producer ids first seen before `before` (unix s); returns how many.
    fn purge_producers(&self, before: i64) -> Result<u64, StoreError>;
    fn collect_events(&self) -> Result<u64, StoreError>;
    /// Every subscription the database holds anything for, with its namespace if noted.
    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError>;
    fn publish_health(&self, owner: &str, rows: Vec<(String, String)>) -> Result<(), StoreError>;
    fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError>;
    fn forget_health(&self, uids: &[String]) -> Result<(), StoreError>;
    /// A subscription's dead letters on `shard`: (seq, stored JSON).
    fn dead_letters_of(&self, shard: u32, subscription: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Waiting deliveries over every shard.
    fn pending_count(&self) -> Result<u64, StoreError>;
    /// Fenced writes refused so far.
    fn fenced_writes(&self) -> u64;
}

/// What a replica knows of the shards: which it owns, and under which claim each
/// delivery in memory was loaded.
pub(super) struct Shared {
    pub(super) engine: Arc<dyn SharedEngine>,
    pub(super) shards: usize,
    /// The shards owned, by epoch of their claim.
    pub(super) owned: Mutex<HashMap<u32, u64>>,
    /// The epoch each delivery in memory was claimed under (in flight ones too, after
    /// their shard was let go: their writes stay fenced by it).
    pub(super) claims: Mutex<HashMap<u64, u64>>,
}

impl Shared {
    pub(super) fn shard(&self, subscription: &str) -> u32 {
        crate::store::shard_of(subscription, self.shards) as u32
    }

    pub(super) fn owns_subscription(&self, subscription: &str) -> bool {
        self.owned.lock().contains_key(&self.shard(subscription))
    }

    /// Rewrites the store's ordinary writes for a shared database: delivery writes fenced
    /// by their claim (a completed or buried delivery's claim is let go), event deletes made
    /// conditional on nothing else referring to the event. A delivery write without a
    /// known claim is dropped: this replica never loaded it, so it is not its to change.
    pub(super) fn fence(&self, ops: Vec<Op>) -> Vec<Op> {
        let mut claims = self.claims.lock();
        let mut out = Vec::with_capacity(ops.len());
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            match op {
                Op::DeletePending(seq) => {
                    // A move to the dead letters is a delete followed by a put of the same seq.
                    let bury = matches!(ops.peek(), Some(Op::PutDead(next, _)) if *next == seq);
                    let Some(epoch) = claims.remove(&seq) else {
                        if bury {
                            ops.next();
                        }
                        continue;
                    };
                    if bury {
                        if let Some(Op::PutDead(_, body)) = ops.next() {
                            out.push(Op::Fenced(seq, epoch, Fenced::Bury(body)));
                        }
                    } else {
                        out.push(Op::Fenced(seq, epoch, Fenced::Delete));
                    }
                }
                Op::PutPending(seq, body) => {
                    if let Some(epoch) = claims.get(&seq) {
                        out.push(Op::Fenced(seq, *epoch, Fenced::Update(body)));
                    }
                }
                Op::DeleteEvent(id) => out.push(Op::DeleteEventIfUnused(id)),
                Op::DeleteDead(seq) => out.push(Op::DropDead(seq)),
                other => out.push(other),
            }
        }
        out
    }
}

impl Fence for Shared {
    fn fence(&self, ops: Vec<Op>) -> Vec<Op> {
        Shared::fence(self, ops)
    }
}

/// The store of one replica among several sharing a database: the memory-indexed store
/// holding the shards this replica owns, its writes fenced by their claims.
pub struct SharedStore {
    core: DurableStore,
    shared: Arc<Shared>,
    /// Waiting deliveries over every shard, as last counted (`refresh_backlog`).
    backlog: AtomicU64,
}

impl SharedStore {
    /// The store on a database several replicas share, sharded `shards` ways: memory
    /// starts empty and holds the shards this replica is told it owns (`Sharing`).
    pub fn new(
        engine: Arc<dyn Engine>,
        shared_engine: Arc<dyn SharedEngine>,
        shards: usize,
    ) -> Result<SharedStore, StoreError> {
        let shared = Arc::new(Shared {
            engine: shared_engine,
            shards: shards.max(1),
            owned: Mutex::default(),
            claims: Mutex::default(),
        });
        let fence: Arc<dyn Fence> = shared.clone();
        Ok(SharedStore {
            core: DurableStore::with(engine, State::default(), Some(fence))?,
            shared,
            backlog: AtomicU64::new(0),
        })
    }

    /// Ingest: the database de-duplicates producer ids and numbers the deliveries;
    /// memory learns of them when their shard's owner claims them.
    fn ingest_with(
        &self,
        items: Vec<Ingest>,
        raw: Option<RawMessage>,
        extra: Vec<Op>,
    ) -> Result<Vec<Appended>, StoreError> {
        let now = jiff::Timestamp::now();
        let mut archive = false;
        let mut mailboxes = Vec::new();
        let mut batch = Vec::with_capacity(items.len());
        for item in items {
            // Every accepted event is logged, stored or not (nobody subscribed).
            let body = json(&item.event)?;
            let audit = Some(crate::audit::Record::event_leaf(&item.event, &body, now));
            // Archived for the events that refer to it (see `DurableStore`'s ingest).
            if item.event.raw_message.is_some() {
                archive = true;
                mailboxes.push(item.event.mailbox.clone());
            }
            let event = if item.deliveries.is_empty() { None } else { Some(body) };
            let mut deliveries = Vec::with_capacity(item.deliveries.len());
            for d in &item.deliveries {
                let shard = i32::try_from(self.shared.shard(&d.subscription)).unwrap_or(0);
                deliveries.push((d.subscription.clone(), shard, json(&StoredDelivery::from(d))?));
            }
            batch.push(IngestItem {
                producer: item.event.dedup_key(),
                event_id: item.event.id.clone(),
                event,
                deliveries,
                audit,
            });
        }
        let outcome = Arc::new(Mutex::new(None));
        let raw = raw.filter(|_| archive);
        let index = match &raw {
            Some(r) => crate::store::hold::raw_index_ops(&r.sha256, r.bytes.len(), now.as_second(), &mailboxes)?,
            None => Vec::new(),
        };
        let ingest = IngestBatch {
            items: batch,
            seen_at: now.as_second(),
            raw: raw.map(|r| (r.sha256, now.as_second(), r.bytes)),
            outcome: outcome.clone(),
        };
        let mut ops = vec![Op::Ingest(Box::new(ingest))];
        ops.extend(index);
        ops.extend(extra);
        self.core.send(ops, true)?;
        outcome
            .lock()
            .take()
            .ok_or_else(|| StoreError::Failed("the shared ingest committed without an outcome".into()))
    }

    /// Whether a delivery in flight is no longer this replica's (its shard moved on):
    /// then its claim is let go, after the write that was its last.
    fn let_go(&self, d: &PendingDelivery) -> bool {
        if self.shared.owns_subscription(&d.subscription) {
            return false;
        }
        self.shared.claims.lock().remove(&d.seq);
        true
    }
    /// Puts a shard's claimed rows in memory under `epoch` and notes it owned.
    fn load_shard(
        &self,
        shard: u32,
        epoch: u64,
        claimed: Claimed,
        counts: &[(String, u64, u64)],
        subscriptions: &mut std::collections::BTreeSet<String>,
    ) {
        let shared = &self.shared;
        let mut state = self.core.state.lock();
        let mut claims = shared.claims.lock();
        for (seq, bytes) in claimed.pending {
            let Some(stored) = parse_row(seq, &bytes) else { continue };
            // Filed under the wrong shard (written by something that did not know the
            // shards): its own shard's owner loads it, not this one.
            if shared.shard(&stored.subscription) != shard {
                continue;
            }
            claims.insert(seq, epoch);
            if state.queues.knows(&stored.subscription, seq) {
                // In flight here from before (the shard came back): it finishes as it is.
                continue;
            }
            state.hold(&stored.event_id, Ref::Pending);
            subscriptions.insert(stored.subscription.clone());
            state.queues.restore(stored.into_pending(seq));
        }
        for (seq, bytes) in claimed.dead {
            let Some(stored) = parse_row(seq, &bytes) else { continue };
            if shared.shard(&stored.subscription) != shard || state.queues.knows_dead(&stored.subscription, seq) {
                continue;
            }
            state.hold(&stored.event_id, Ref::Dead);
            let dead = Dead {
                at: stored.dead_at.unwrap_or(stored.not_before),
                event_id: stored.event_id,
            };
            state.queues.restore_dead(&stored.subscription, seq, dead);
        }
        for (subscription, n, newest) in counts {
            if shared.shard(subscription) == shard {
                state.note_attempts(subscription.clone(), *n, *newest);
            }
        }
        shared.owned.lock().insert(shard, epoch);
    }
}

impl EventLog for SharedStore {
    fn ingest_archived(&self, items: Vec<Ingest>, raw: Option<RawMessage>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_with(items, raw, Vec::new())
    }

    fn ingest_with_rows(&self, items: Vec<Ingest>, rows: Vec<RowWrite>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_with(items, None, crate::store::rows::ops(rows)?)
    }

    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError> {
        self.core.event(id)
    }

    fn cached_event(&self, id: &str) -> Option<Arc<MailboxEvent>> {
        self.core.cached_event(id)
    }

    fn events(&self, ids: &[String]) -> Vec<Result<Option<Arc<MailboxEvent>>, StoreError>> {
        self.core.events(ids)
    }

    fn purge_producer_ids(&self, before: jiff::Timestamp) -> Result<u64, StoreError> {
        self.shared.engine.purge_producers(before.as_second())
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        self.core.event_count()
    }
}

impl Rows for SharedStore {
    fn rows(&self, group: &str, prefix: &[u8]) -> Result<Vec<Row>, StoreError> {
        self.core.rows(group, prefix)
    }

    fn row(&self, group: &str, key: &[u8]) -> Result<Option<Row>, StoreError> {
        self.core.row(group, key)
    }

    fn row_groups(&self) -> Result<Vec<String>, StoreError> {
        self.core.row_groups()
    }

    fn rows_before(&self, before: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.core.rows_before(before)
    }

    fn write_rows(&self, writes: Vec<RowWrite>) -> Result<(), StoreError> {
        self.core.write_rows(writes)
    }
}

impl crate::store::AuditTrail for SharedStore {
    fn audit_size(&self) -> Result<u64, StoreError> {
        self.core.audit_size()
    }

    fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
        self.core.audit_hashes(indexes)
    }

    fn audit_records(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.core.audit_records(from, to)
    }

    fn audit_leaves_of(&self, event_id: &str) -> Result<Vec<u64>, StoreError> {
        self.core.audit_leaves_of(event_id)
    }

    fn audit_append(&self, record: &crate::audit::Record) -> Result<Option<u64>, StoreError> {
        self.core.audit_append(record)
    }

    fn audit_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.core.audit_checkpoint(size)
    }

    fn audit_keep_checkpoint(&self, size: u64, note: Vec<u8>) -> Result<(), StoreError> {
        self.core.audit_keep_checkpoint(size, note)
    }
}

impl Archive for SharedStore {
    fn raw_message(&self, sha256: &str) -> Result<Option<(jiff::Timestamp, Vec<u8>)>, StoreError> {
        self.core.raw_message(sha256)
    }

    fn purge_raw_messages(
        &self,
        before: jiff::Timestamp,
        holds: &dyn crate::store::Holds,
    ) -> Result<Purged, StoreError> {
        self.core.purge_raw_messages(before, holds)
    }
}

impl Queue for SharedStore {
    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        self.core.take_due(subscription, now, max, ordered)
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        self.core.next_due(subscription)
    }

    fn complete(&self, d: &PendingDelivery) -> Result<Durable, StoreError> {
        self.core.complete(d)
    }

    fn retry(&self, d: PendingDelivery) -> Result<(), StoreError> {
        self.core.retry_unless(d, |d| self.let_go(d))
    }

    fn dead_letter(&self, d: PendingDelivery, reason: String) -> Result<(), StoreError> {
        self.core.dead_letter_unless(d, reason, |d| self.let_go(d))
    }

    fn replay(&self, subscription: &str, since: jiff::Timestamp, now: jiff::Timestamp) -> Result<u64, StoreError> {
        // Back as waiting under this replica's claim; another replica's shard is its own.
        let shard = self.shared.shard(subscription);
        let Some(epoch) = self.shared.owned.lock().get(&shard).copied() else {
            return Ok(0);
        };
        self.core
            .replay_as(subscription, since, now, Some((epoch, shard)), |seq| {
                self.shared.claims.lock().insert(seq, epoch);
            })
    }

    fn expire(
        &self,
        subscription: &str,
        accepted_before: jiff::Timestamp,
        reason: &str,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        self.core.expire(subscription, accepted_before, reason)
    }

    fn counts(&self, subscription: &str) -> QueueCounts {
        self.core.counts(subscription)
    }

    fn limit_backlog(&self, subscription: &str, cap: Option<BacklogCap>) {
        self.core.limit_backlog(subscription, cap);
    }

    fn total_backlog(&self) -> u64 {
        // Every replica's: backpressure holds for the whole store.
        self.backlog.load(Ordering::Relaxed)
    }

    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        self.core.flush()?;
        self.shared.engine.subscriptions()
    }

    fn note_subscription(&self, uid: &str, namespace: &str) -> Result<(), StoreError> {
        self.core.note_subscription(uid, namespace)
    }

    fn forget_subscription(&self, subscription: &str) -> Result<(), StoreError> {
        // Its work on shards this replica does not own too.
        self.core
            .forget_with(subscription, vec![Op::DeleteDeliveriesOf(subscription.to_string())])
    }
}

impl History for SharedStore {
    fn record_attempt(&self, attempt: Attempt) -> Result<(), StoreError> {
        self.core.record_attempt(attempt)
    }

    fn attempts(&self, subscription: &str, since: jiff::Timestamp, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        self.core.attempts(subscription, since, limit)
    }

    fn dead_letters(
        &self,
        subscription: &str,
        since: jiff::Timestamp,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        if self.shared.owns_subscription(subscription) {
            return self.core.dead_letters(subscription, since, limit);
        }
        // Another replica's shard: its dead letters are read from the database.
        self.core.flush()?;
        let rows = self
            .shared
            .engine
            .dead_letters_of(self.shared.shard(subscription), subscription)?;
        let mut out: Vec<(u64, DeadLetter)> = rows
            .into_iter()
            .filter_map(|(seq, bytes)| parse_row(seq, &bytes).map(|d| (seq, d)))
            .map(|(seq, d)| (seq, d.into_dead_letter()))
            .filter(|(_, d)| d.dead_at >= since)
            .collect();
        out.sort_by(|a, b| b.1.dead_at.cmp(&a.1.dead_at).then(b.0.cmp(&a.0)));
        out.truncate(limit);
        Ok(out.into_iter().map(|(_, d)| d).collect())
    }

    fn purge(
        &self,
        subscription: &str,
        retention: Retention,
        holds: &dyn crate::store::Holds,
    ) -> Result<Purged, StoreError> {
        self.core.purge(subscription, retention, holds)
    }
}

impl Backend for SharedStore {
    fn sharing(&self) -> Option<&dyn Sharing> {
        Some(self)
    }

    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        self.core.secret(name)
    }

    fn commit_failures(&self) -> u64 {
        self.core.commit_failures()
    }

    fn unavailable(&self) -> Option<String> {
        self.core.unavailable()
    }

    fn commits_fail(&self) -> Option<String> {
        self.core.commits_fail()
    }

    fn flush(&self) -> Result<(), StoreError> {
        Backend::flush(&self.core)
    }

    fn disk_bytes(&self) -> Option<u64> {
        Backend::disk_bytes(&self.core)
    }

    fn volume(&self) -> Option<(u64, u64)> {
        self.core.volume()
    }
}

impl Sharing for SharedStore {
    fn shards(&self) -> usize {
        self.shared.shards
    }

    fn acquire(&self, taken: &[(u32, u64)]) -> Result<Vec<String>, StoreError> {
        if taken.is_empty() {
            return Ok(vec![]);
        }
        // The attempt log's counts are one read for all the shards taken at once.
        let counts = self.shared.engine.attempt_counts()?;
        let mut subscriptions = BTreeSet::new();
        for &(shard, epoch) in taken {
            let claimed = self.shared.engine.claim_shard(shard, epoch)?;
            self.load_shard(shard, epoch, claimed, &counts, &mut subscriptions);
        }
        Ok(subscriptions.into_iter().collect())
    }

    fn release(&self, shard: u32) {
        let shared = &self.shared;
        shared.owned.lock().remove(&shard);
        let mut state = self.core.state.lock();
        let mine: Vec<String> = state
            .queues
            .subscriptions()
            .chain(state.attempts.keys().map(String::as_str))
            .filter(|s| shared.shard(s) == shard)
            .map(String::from)
            .collect();
        let mut claims = shared.claims.lock();
        for subscription in mine {
            let (waiting, dead) = state.queues.release(&subscription);
            for d in waiting {
                claims.remove(&d.seq);
                state.release(&d.event_id, Ref::Pending);
            }
            for (_, d) in dead {
                state.release(&d.event_id, Ref::Dead);
            }
            state.attempts.remove(&subscription);
        }
    }

    fn in_flight(&self, shard: u32) -> usize {
        self.core
            .state
            .lock()
            .queues
            .in_flight(|s| self.shared.shard(s) == shard)
    }

    fn owns(&self, shard: u32) -> bool {
        self.shared.owned.lock().contains_key(&shard)
    }

    fn owned(&self) -> Vec<(u32, u64)> {
        let mut owned: Vec<(u32, u64)> = self.shared.owned.lock().iter().map(|(s, e)| (*s, *e)).collect();
        owned.sort_unstable();
        owned
    }

    fn claim_arrivals(&self) -> Result<Vec<String>, StoreError> {
        let shared = &self.shared;
        let owned = self.owned();
        if owned.is_empty() {
            return Ok(vec![]);
        }
        let rows = shared.engine.claim_arrivals(&owned)?;
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let mut subscriptions = BTreeSet::new();
        let mut uncached = Vec::new();
        {
            let mut state = self.core.state.lock();
            let mut claims = shared.claims.lock();
            for (seq, epoch, bytes) in rows {
                let Some(stored) = parse_row(seq, &bytes) else { continue };
                // Let go meanwhile: its next owner claims it again.
                if !shared.owns_subscription(&stored.subscription) {
                    continue;
                }
                if state.queues.knows(&stored.subscription, seq) {
                    // Already here (a replay): its writes go under the claim it has now.
                    claims.insert(seq, epoch);
                    continue;
                }
                claims.insert(seq, epoch);
                state.hold(&stored.event_id, Ref::Pending);
                if !state.cache.contains_key(&stored.event_id) {
                    uncached.push(stored.event_id.clone());
                }
                subscriptions.insert(stored.subscription.clone());
                state.queues.restore(stored.into_pending(seq));
            }
        }
        // Parsed once here for every delivery of the event, not read per delivery.
        uncached.sort_unstable();
        uncached.dedup();
        if !uncached.is_empty() {
            let mut events = Vec::new();
            for (id, bytes) in shared.engine.events(&uncached)? {
                let event: MailboxEvent = serde_json::from_slice(&bytes).map_err(io)?;
                events.push((id, Arc::new(event)));
            }
            // Another replica took them in: their log indexes are in the database.
            let read: Vec<Arc<MailboxEvent>> = events.iter().map(|(_, e)| e.clone()).collect();
            super::schema::indexed(self.core.engine.as_ref(), &read);
            let mut state = self.core.state.lock();
            for (id, event) in events {
                if state.cache.len() >= crate::store::event_cache() {
                    break;
                }
                // Completed meanwhile: nothing to cache it for.
                if !state.holds(&id) {
                    continue;
                }
                state.cache.insert(id, event);
            }
        }
        Ok(subscriptions.into_iter().collect())
    }

    fn reload(&self) -> Result<Vec<String>, StoreError> {
        // What is queued reaches the database first, so that what it holds is current.
        self.core.flush()?;
        self.acquire(&self.owned())
    }

    fn refresh_backlog(&self) -> Result<u64, StoreError> {
        let n = self.shared.engine.pending_count()?;
        self.backlog.store(n, Ordering::Relaxed);
        Ok(n)
    }

    fn collect_events(&self) -> Result<u64, StoreError> {
        self.shared.engine.collect_events()
    }

    fn publish_health(&self, owner: &str, rows: Vec<(String, serde_json::Value)>) -> Result<(), StoreError> {
        let rows = rows.into_iter().map(|(uid, v)| (uid, v.to_string())).collect();
        self.shared.engine.publish_health(owner, rows)
    }

    fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError> {
        self.shared.engine.published_health()
    }

    fn forget_health(&self, uids: &[String]) -> Result<(), StoreError> {
        self.shared.engine.forget_health(uids)
    }

    fn fenced_writes(&self) -> u64 {
        self.shared.engine.fenced_writes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl SharedEngine for Nothing {
        fn claim_shard(&self, _: u32, _: u64) -> Result<Claimed, StoreError> {
            Ok(Claimed::default())
        }
        fn claim_arrivals(&self, _: &[(u32, u64)]) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn events(&self, _: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn attempt_counts(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
            Ok(vec![])
        }
        fn purge_producers(&self, _: i64) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn collect_events(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
            Ok(vec![])
        }
        fn publish_health(&self, _: &str, _: Vec<(String, String)>) -> Result<(), StoreError> {
            Ok(())
        }
        fn published_health(&self) -> Result<Vec<PublishedHealth>, StoreError> {
            Ok(vec![])
        }
        fn forget_health(&self, _: &[String]) -> Result<(), StoreError> {
            Ok(())
        }
        fn dead_letters_of(&self, _: u32, _: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn pending_count(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn fenced_writes(&self) -> u64 {
            0
        }
    }

    #[test]
    fn writes_are_fenced_by_their_claim_and_unknown_deliveries_are_left_alone() {
        let shared = Shared {
            engine: Arc::new(Nothing),
            shards: 4,
            owned: Mutex::default(),
            claims: Mutex::new(HashMap::from([(1, 7), (2, 7), (3, 9)])),
        };
        let out = shared.fence(vec![
            Op::DeletePending(1),
            Op::DeleteEvent("evt".into()),
            Op::DeletePending(2),
            Op::PutDead(2, b"dead".to_vec()),
            Op::PutPending(3, b"again".to_vec()),
            // Never claimed here: another replica's.
            Op::DeletePending(4),
            Op::PutDead(4, b"x".to_vec()),
            Op::PutPending(5, b"y".to_vec()),
            Op::DeleteDead(6),
        ]);
        let shape: Vec<String> = out
            .iter()
            .map(|op| match op {
                Op::Fenced(seq, epoch, Fenced::Delete) => format!("delete {seq}@{epoch}"),
                Op::Fenced(seq, epoch, Fenced::Bury(_)) => format!("bury {seq}@{epoch}"),
                Op::Fenced(seq, epoch, Fenced::Update(_)) => format!("update {seq}@{epoch}"),
                Op::DeleteEventIfUnused(id) => format!("collect {id}"),
                Op::DropDead(seq) => format!("delete dead {seq}"),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            shape,
            ["delete 1@7", "collect evt", "bury 2@7", "update 3@9", "delete dead 6"]
        );
        let claims = shared.claims.lock();
        assert_eq!(
            claims.len(),
            1,
            "done deliveries let go of their claim; a retried one keeps it"
        );
        assert_eq!(claims.get(&3), Some(&9));
    }
}
