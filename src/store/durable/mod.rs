//! The store: redb, on `--store-dir` (durable) or in memory, with the delivery queues
//! indexed in memory.
//!
//! Every write goes through one committer thread, which takes all the writes waiting at
//! that moment into one transaction and one fsync (group commit): durability costs one
//! sync per batch, not per event. `ingest` and `replay` return only after their commit,
//! `complete` hands back a `Durable` to await; retries, dead letters and attempts are
//! queued without waiting (one lost in a crash only means an earlier or extra attempt).
//!
//! An event stays on disk while a pending delivery or a dead letter refers to it.
//!
//! This file owns `DurableStore` (opening, closing) and its `Store` impl, which ties
//! the other three together: `schema` (tables and encoding), `committer` (the commit
//! thread) and `state` (the in-memory indexes). `shared` builds `SharedStore` on it (a
//! replica of a shared PostgreSQL store): the one hook it needs here is `Fence`, which
//! every write passes, and a few steps that let a delivery go or put it back under a
//! claim. Only this file and `shared` lock the state (the commit thread keeps its own
//! outage flag).

pub(crate) mod committer;
pub mod engine;
pub(crate) mod schema;
pub mod shared;
mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel, sync_channel};

use parking_lot::{Mutex, MutexGuard};

use redb::Database;
use redb::backends::InMemoryBackend;

pub use self::committer::Op;
use self::committer::{Job, Outage, Reply, commit_loop};
use self::engine::{Engine, Redb};
use self::schema::{StoredDelivery, create_tables, io, json, nanos};
use self::state::{Ref, State, build, bury_in, dead_ops};
use super::queue::Dead;
use super::{
    Appended, Archive, Attempt, Backend, DeadLetter, Durable, EventLog, History, Holds, Ingest, PendingDelivery,
    Purged, Queue, QueueCounts, RawMessage, Retention, RowWrite, StoreError,
};
use crate::event::MailboxEvent;

/// Locks a store mutex. The crate's rule for locks: parking_lot's, which are never
/// poisoned — a panic is a bug that is caught and counted where it happens, and every
/// critical section here is short code over collections that stay valid (what is stale in
/// memory, the next start rebuilds from disk).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

pub struct DurableStore {
    engine: Arc<dyn Engine>,
    state: Mutex<State>,
    /// Why commits fail right now, if they do (the commit thread says).
    outage: Arc<Outage>,
    /// None once dropped: closing the channel stops the commit thread.
    writer: Mutex<Option<Sender<Job>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Commits that failed (counted by the commit thread; nobody waits for some writes).
    commit_failures: Arc<std::sync::atomic::AtomicU64>,
    /// What every write passes through before it is queued: set by `SharedStore`,
    /// which fences writes to deliveries by the claim they were loaded under.
    fence: Option<Arc<dyn Fence>>,
}

/// A rewrite of the store's writes before they are queued for commit.
pub(super) trait Fence: Send + Sync {
    fn fence(&self, ops: Vec<Op>) -> Vec<Op>;
}

impl Drop for DurableStore {
    /// Lets the commit thread finish what is queued and release the database.
    fn drop(&mut self) {
        lock(&self.writer).take();
        let handle = lock(&self.committer).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl DurableStore {
    /// Opens (or creates) the store in `dir` and loads the queues from it: deliveries
    /// that were in flight at a crash are waiting again, on their old schedule.
    pub fn open(dir: &Path) -> Result<DurableStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("mailhook.redb");
        let db = Database::builder()
            .set_cache_size(engine::redb_cache_bytes())
            .create(&path)
            .map_err(io)?;
        DurableStore::start(db, Some(path))
    }

    /// A store that lives in memory only: lost when the process ends.
    pub fn in_memory() -> Result<DurableStore, StoreError> {
        let db = Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .map_err(io)?;
        DurableStore::start(db, None)
    }

    fn start(db: Database, path: Option<PathBuf>) -> Result<DurableStore, StoreError> {
        create_tables(&db)?;
        DurableStore::on(Arc::new(Redb::new(db, path)))
    }

    /// The store on `engine`: its queues loaded from it, its writes committed by one thread.
    pub fn on(engine: Arc<dyn Engine>) -> Result<DurableStore, StoreError> {
        let state = build(engine.load()?)?;
        DurableStore::with(engine, state, None)
    }

    /// The store on `engine` with `state` in memory; its writes pass `fence` first.
    fn with(engine: Arc<dyn Engine>, state: State, fence: Option<Arc<dyn Fence>>) -> Result<DurableStore, StoreError> {
        let (tx, rx) = channel();
        let writer_db = engine.clone();
        let commit_failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = commit_failures.clone();
        let outage = Arc::new(Outage::default());
        let down = outage.clone();
        let committer = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || {
                let committed = std::sync::atomic::AtomicU64::new(0);
                commit_loop(writer_db.as_ref(), &rx, &failures, &down, &committed)
            })
            .map_err(io)?;
        Ok(DurableStore {
            engine,
            outage,
            state: Mutex::new(state),
            writer: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(committer)),
            commit_failures,
            fence,
        })
    }

    /// Bytes the store occupies on disk (0 in memory).
    pub fn disk_bytes(&self) -> u64 {
        self.engine.disk_bytes().unwrap_or(0)
    }

    /// Queues `ops` for the commit thread; `kept`: memory shows them already (see `Job`).
    fn submit(&self, ops: Vec<Op>, done: Reply, kept: bool) -> Result<(), StoreError> {
        let ops = match &self.fence {
            Some(fence) => fence.fence(ops),
            None => ops,
        };
        lock(&self.writer)
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?
            .send(Job {
                ops,
                done,
                kept,
                generation: 0,
            })
            .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))
    }

    /// Queues `ops`. Without `wait`, memory shows them already and they are kept until
    /// committed; with `wait`, blocks until they are committed or refused, and the caller
    /// changes memory only on success.
    fn send(&self, ops: Vec<Op>, wait: bool) -> Result<(), StoreError> {
        if !wait {
            return self.submit(ops, Reply::None, true);
        }
        self.wait_for(ops, false)
    }

    /// Blocks until `ops` are committed, or their commit failed (`kept`: tried again later).
    fn wait_for(&self, ops: Vec<Op>, kept: bool) -> Result<(), StoreError> {
        let (tx, rx) = sync_channel(1);
        self.submit(ops, Reply::Blocking(tx), kept)?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))?
            .map_err(StoreError::Failed)
    }

    /// Waits until every write queued before it is committed, so a read sees them.
    fn flush(&self) -> Result<(), StoreError> {
        self.send(Vec::new(), true)
    }

    /// Ingest, with `extra` writes (a source's keyed rows) in the same commit.
    fn ingest_with(
        &self,
        items: Vec<Ingest>,
        raw: Option<RawMessage>,
        extra: Vec<Op>,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut ops = Vec::new();

        let mut archive = false;
        let mut mailboxes = Vec::new();
        let mut out = Vec::with_capacity(items.len());
        let mut queued = Vec::new();
        let mut cached = Vec::new();
        let mut claimed = Vec::new();
        let now = jiff::Timestamp::now();
        {
            let mut state = lock(&self.state);
            for item in items {
                // A raw message is archived for the events that refer to it, a duplicate's
                // too: the pipeline counts it archived (a later chunk's events link to
                // it), and leaves the reference only where a subscription links to it or
                // a hold keeps it (then with no delivery at all, maybe).
                if item.event.raw_message.is_some() {
                    archive = true;
                    mailboxes.push(item.event.mailbox.clone());
                }
                if let Some(pid) = &item.event.dedup_key() {
                    if let Some(existing) = state.producer_ids.get(pid) {
                        out.push(Appended {
                            id: existing.clone(),
                            duplicate: true,
                        });
                        continue;
                    }
                    // Claimed now, so a concurrent duplicate sees it; released if the commit fails.
                    state.producer_ids.insert(pid.clone(), item.event.id.clone());
                    state.producer_order.push_back((now, pid.clone()));
                    claimed.push(pid.clone());
                    ops.push(Op::PutProducer(pid.clone(), item.event.id.clone(), now.as_second()));
                }
                let id = item.event.id.clone();
                // Every accepted event is logged; one nobody subscribed to is done at once:
                // nothing else to keep but its producer id.
                let body = json(&item.event)?;
                ops.push(Op::Audit(Box::new(crate::audit::Record::event_leaf(
                    &item.event,
                    &body,
                    now,
                ))));
                if !item.deliveries.is_empty() {
                    ops.push(Op::PutEvent(id.clone(), body));
                    cached.push(Arc::new(item.event));
                }
                for mut d in item.deliveries {
                    d.seq = state.queues.reserve_seq();
                    ops.push(Op::PutPending(d.seq, json(&StoredDelivery::from(&d))?));
                    queued.push(d);
                }
                out.push(Appended { id, duplicate: false });
            }
        }
        if let Some(raw) = raw.filter(|_| archive) {
            ops.extend(super::hold::archive_ops(raw, now.as_second(), &mailboxes)?);
        }
        ops.extend(extra);
        if let Err(err) = self.send(ops, true) {
            let mut state = lock(&self.state);
            for pid in claimed {
                state.producer_ids.remove(&pid);
            }
            return Err(err);
        }
        // Only what is on disk becomes deliverable.
        let mut state = lock(&self.state);
        for event in cached {
            if state.cache.len() < super::event_cache() {
                state.cache.insert(event.id.clone(), event);
            }
        }
        for d in queued {
            state.hold(&d.event_id, Ref::Pending);
            state.queues.restore(d);
        }
        Ok(out)
    }

    /// Reads stored deliveries from `table` by seq.
    fn read_deliveries(
        &self,
        table: engine::Deliveries,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<(u64, StoredDelivery)>, StoreError> {
        let seqs: Vec<u64> = seqs.into_iter().collect();
        self.engine
            .deliveries(table, &seqs)?
            .into_iter()
            .map(|(seq, bytes)| Ok((seq, serde_json::from_slice(&bytes).map_err(io)?)))
            .collect()
    }

    /// Queues a retry of `d`. When `let_go(&d)` says its subscription is no longer this
    /// store's to deliver (a shared store's shard moved on while it was in flight), memory
    /// lets it go instead: the write is the last this replica makes to it.
    pub(super) fn retry_unless(
        &self,
        d: PendingDelivery,
        let_go: impl FnOnce(&PendingDelivery) -> bool,
    ) -> Result<(), StoreError> {
        let op = Op::PutPending(d.seq, json(&StoredDelivery::from(&d))?);
        let mut state = lock(&self.state);
        // The disk write is queued before memory changes: on an error nothing changed (the
        // delivery is still in flight), so the caller may try again without putting a
        // delivery back twice.
        self.submit(vec![op], Reply::None, true)?;
        if let_go(&d) {
            state.queues.complete(&d);
            state.release(&d.event_id, Ref::Pending);
            return Ok(());
        }
        state.queues.retry(d);
        Ok(())
    }

    /// Moves `d` to the dead letters; as `retry_unless` when it is no longer this store's.
    pub(super) fn dead_letter_unless(
        &self,
        d: PendingDelivery,
        reason: String,
        let_go: impl FnOnce(&PendingDelivery) -> bool,
    ) -> Result<(), StoreError> {
        let now = jiff::Timestamp::now();
        let deliveries = [d];
        let ops = dead_ops(&deliveries, &reason, now)?;
        let mut state = lock(&self.state);
        self.submit(ops, Reply::None, true)?;
        if let_go(&deliveries[0]) {
            state.queues.complete(&deliveries[0]);
            state.release(&deliveries[0].event_id, Ref::Pending);
            return Ok(());
        }
        bury_in(&mut state, &deliveries, now);
        Ok(())
    }

    /// Puts `subscription`'s dead letters since `since` back in its queue, due `now`:
    /// as waiting, or with `claim` (epoch, shard) as claimed by this replica, `claimed`
    /// told of each before it can be taken.
    pub(super) fn replay_as(
        &self,
        subscription: &str,
        since: jiff::Timestamp,
        now: jiff::Timestamp,
        claim: Option<(u64, u32)>,
        claimed: impl Fn(u64),
    ) -> Result<u64, StoreError> {
        self.flush()?;
        let seqs: Vec<u64> = lock(&self.state)
            .queues
            .dead(subscription, since, true)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let stored = self.read_deliveries(engine::Deliveries::Dead, seqs)?;
        let mut ops = Vec::with_capacity(stored.len() * 2);
        let mut replayed = Vec::with_capacity(stored.len());
        for (seq, mut d) in stored {
            d.attempts = 0;
            d.not_before = now;
            // The event's age starts again: replaying is a decision to deliver it.
            d.accepted_at = now;
            d.reason = None;
            d.dead_at = None;
            ops.push(Op::DeleteDead(seq));
            ops.push(match claim {
                Some((epoch, shard)) => Op::PutClaimed(seq, epoch, shard, json(&d)?),
                None => Op::PutPending(seq, json(&d)?),
            });
            replayed.push(d.into_pending(seq));
        }
        // On disk first, so a replay never shows deliveries a crash could lose.
        self.send(ops, true)?;
        let mut state = lock(&self.state);
        let mut n = 0;
        for d in replayed {
            // A purge or forget may have run meanwhile: replay only what is still dead.
            if state.queues.remove_dead(subscription, d.seq).is_none() {
                continue;
            }
            state.hold(&d.event_id, Ref::Pending);
            state.release(&d.event_id, Ref::Dead);
            claimed(d.seq);
            state.queues.restore(d);
            n += 1;
        }
        Ok(n)
    }

    /// Forgets `subscription`: its queue, dead letters, attempts and namespace, with
    /// `extra` writes in the same commit.
    pub(super) fn forget_with(&self, subscription: &str, extra: Vec<Op>) -> Result<(), StoreError> {
        let mut ops: Vec<Op> = Vec::new();
        {
            let mut state = lock(&self.state);
            let (pending, dead) = state.queues.forget(subscription);
            for d in pending {
                ops.push(Op::DeletePending(d.seq));
                if state.release(&d.event_id, Ref::Pending) {
                    ops.push(Op::DeleteEvent(d.event_id.clone()));
                }
            }
            for (seq, d) in dead {
                ops.push(Op::DeleteDead(seq));
                if state.release(&d.event_id, Ref::Dead) {
                    ops.push(Op::DeleteEvent(d.event_id));
                }
            }
            state.attempts.remove(subscription);
            state.namespaces.remove(subscription);
        }
        ops.extend(extra);
        ops.push(Op::DeleteAttemptsOf(subscription.to_string()));
        ops.push(Op::DeleteSubscription(subscription.to_string()));
        // Memory has forgotten it already: the deletes are kept until they commit.
        self.wait_for(ops, true)
    }

    /// Moves deliveries to the dead letters (state and ops), releasing their pending refs.
    fn bury(&self, state: &mut State, deliveries: Vec<PendingDelivery>, reason: &str) -> Result<Vec<Op>, StoreError> {
        let now = jiff::Timestamp::now();
        let ops = dead_ops(&deliveries, reason, now)?;
        bury_in(state, &deliveries, now);
        Ok(ops)
    }
}

impl EventLog for DurableStore {
    fn ingest_archived(&self, items: Vec<Ingest>, raw: Option<RawMessage>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_with(items, raw, Vec::new())
    }

    fn ingest_with_rows(&self, items: Vec<Ingest>, rows: Vec<RowWrite>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_with(items, None, super::rows::ops(rows)?)
    }

    fn cached_event(&self, id: &str) -> Option<Arc<MailboxEvent>> {
        lock(&self.state).cache.get(id).cloned()
    }

    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError> {
        if let Some(e) = self.cached_event(id) {
            return Ok(Some(e));
        }
        match self.engine.event(id)? {
            None => Ok(None),
            Some(bytes) => {
                let event = Arc::new(serde_json::from_slice(&bytes).map_err(io)?);
                schema::indexed(self.engine.as_ref(), std::slice::from_ref(&event));
                Ok(Some(event))
            }
        }
    }

    fn events(&self, ids: &[String]) -> Vec<Result<Option<Arc<MailboxEvent>>, StoreError>> {
        // Shared mode's cache holds what this replica ingested; a read is not kept.
        schema::events_by_id(
            self.engine.as_ref(),
            ids,
            |ids| ids.iter().map(|id| self.cached_event(id)).collect(),
            |_| {},
        )
    }

    fn purge_producer_ids(&self, before: jiff::Timestamp) -> Result<u64, StoreError> {
        let mut ops = Vec::new();
        {
            let mut state = lock(&self.state);
            while state.producer_order.front().is_some_and(|(at, _)| *at < before) {
                let Some((_, pid)) = state.producer_order.pop_front() else {
                    break;
                };
                state.producer_ids.remove(&pid);
                ops.push(Op::DeleteProducer(pid));
            }
        }
        let n = ops.len() as u64;
        if n > 0 {
            self.send(ops, false)?;
        }
        Ok(n)
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        self.engine.event_count()
    }
}

super::rows::rows_on_engine!(DurableStore);
super::audit::audit_on_engine!(DurableStore);

impl Archive for DurableStore {
    fn raw_message(&self, sha256: &str) -> Result<Option<(jiff::Timestamp, Vec<u8>)>, StoreError> {
        raw_message(self.engine.as_ref(), sha256)
    }

    fn purge_raw_messages(&self, before: jiff::Timestamp, holds: &dyn Holds) -> Result<Purged, StoreError> {
        let mut purged = Purged::default();
        let old = super::hold::purge_raw_ops(self.engine.as_ref(), before, holds, &mut purged.kept)?;
        purged.raw_messages = super::hold::raw_deletes(&old);
        if !old.is_empty() {
            self.send(old, true)?;
        }
        Ok(purged)
    }
}

impl Queue for DurableStore {
    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        Ok(lock(&self.state).queues.take_due(subscription, now, max, ordered))
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        lock(&self.state).queues.next_due(subscription)
    }

    fn complete(&self, d: &PendingDelivery) -> Result<Durable, StoreError> {
        let mut ops = vec![Op::DeletePending(d.seq)];
        {
            let mut state = lock(&self.state);
            state.queues.complete(d);
            if state.release(&d.event_id, Ref::Pending) {
                ops.push(Op::DeleteEvent(d.event_id.clone()));
            }
        }
        // The caller awaits the group commit: a delivery counts as in flight until its
        // completion is on disk, so a crash re-delivers only what was in flight.
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(ops, Reply::Async(tx), true)?;
        Ok(Durable(Some(rx)))
    }

    fn retry(&self, d: PendingDelivery) -> Result<(), StoreError> {
        self.retry_unless(d, |_| false)
    }

    fn dead_letter(&self, d: PendingDelivery, reason: String) -> Result<(), StoreError> {
        self.dead_letter_unless(d, reason, |_| false)
    }

    fn note_subscription(&self, uid: &str, namespace: &str) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        if state.namespaces.get(uid).is_some_and(|ns| ns == namespace) {
            return Ok(());
        }
        self.submit(
            vec![Op::PutSubscription(uid.to_string(), namespace.to_string())],
            Reply::None,
            true,
        )?;
        state.namespaces.insert(uid.to_string(), namespace.to_string());
        Ok(())
    }

    fn replay(&self, subscription: &str, since: jiff::Timestamp, now: jiff::Timestamp) -> Result<u64, StoreError> {
        self.replay_as(subscription, since, now, None, |_| {})
    }

    fn expire(
        &self,
        subscription: &str,
        accepted_before: jiff::Timestamp,
        reason: &str,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let mut state = lock(&self.state);
        let expired = state.queues.waiting_accepted_before(subscription, accepted_before);
        if expired.is_empty() {
            return Ok(expired);
        }
        let ops = self.bury(&mut state, expired.clone(), reason)?;
        drop(state);
        self.send(ops, false)?;
        Ok(expired)
    }

    fn forget_subscription(&self, subscription: &str) -> Result<(), StoreError> {
        self.forget_with(subscription, Vec::new())
    }

    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        let state = lock(&self.state);
        let mut all: Vec<&str> = state
            .queues
            .subscriptions()
            .chain(state.attempts.keys().map(String::as_str))
            .chain(state.namespaces.keys().map(String::as_str))
            .collect();
        all.sort_unstable();
        all.dedup();
        Ok(all
            .into_iter()
            .map(|uid| (uid.to_string(), state.namespaces.get(uid).cloned()))
            .collect())
    }

    fn total_backlog(&self) -> u64 {
        lock(&self.state).queues.total_backlog()
    }

    fn counts(&self, subscription: &str) -> QueueCounts {
        lock(&self.state).queues.counts(subscription)
    }

    fn limit_backlog(&self, subscription: &str, cap: Option<super::BacklogCap>) {
        let mut state = lock(&self.state);
        match cap {
            Some(cap) => state.caps.insert(subscription.to_string(), cap),
            None => state.caps.remove(subscription),
        };
    }
}

impl History for DurableStore {
    fn record_attempt(&self, attempt: Attempt) -> Result<(), StoreError> {
        let bytes = json(&attempt)?;
        let key = {
            let mut state = lock(&self.state);
            // Per delivery: no key allocation once the subscription has a count.
            match state.attempts.get_mut(&attempt.subscription) {
                Some(n) => *n += 1,
                None => {
                    state.attempts.insert(attempt.subscription.clone(), 1);
                }
            }
            state.attempt_key(attempt.at)
        };
        let leaf = Box::new(attempt.audit_record().to_leaf());
        self.send(
            vec![Op::PutAttempt(attempt.subscription, key, bytes), Op::Audit(leaf)],
            false,
        )
    }

    fn attempts(&self, subscription: &str, since: jiff::Timestamp, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        self.flush()?;
        schema::read_attempts(self.engine.as_ref(), subscription, since, limit)
    }

    fn dead_letters(
        &self,
        subscription: &str,
        since: jiff::Timestamp,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.flush()?;
        let mut seqs: Vec<(u64, Dead)> = lock(&self.state).queues.dead(subscription, since, true);
        seqs.sort_by(|a, b| b.1.at.cmp(&a.1.at).then(b.0.cmp(&a.0)));
        seqs.truncate(limit);
        let stored = self.read_deliveries(engine::Deliveries::Dead, seqs.into_iter().map(|(s, _)| s))?;
        Ok(stored.into_iter().map(|(_, d)| d.into_dead_letter()).collect())
    }

    fn purge(&self, subscription: &str, retention: Retention, holds: &dyn Holds) -> Result<Purged, StoreError> {
        let mut ops = Vec::new();
        let mut purged = Purged::default();
        // Attempts: the expired ones plus any beyond the cap are the oldest `n` in the range,
        // but those a hold keeps. No flush first (it would cost a commit per subscription
        // per round): attempts still queued are the newest, so at worst an expired one
        // waits for the next round, and the trim runs after them in commit order.
        let expired = self
            .engine
            .attempts_before(subscription, nanos(retention.attempts_before))?;
        let logged = lock(&self.state).attempts.get(subscription).copied().unwrap_or(0);
        let over = logged.saturating_sub(expired).saturating_sub(retention.max_attempts);
        let n = (expired + over).min(logged);
        let trim = if n > 0 {
            let (op, deleted) =
                super::hold::trim_attempts(self.engine.as_ref(), subscription, n, holds, &mut purged.kept)?;
            purged.attempts = deleted;
            Some(op)
        } else {
            None
        };
        // Dead letters a hold keeps stay, with their events.
        let old = lock(&self.state)
            .queues
            .dead(subscription, retention.dead_letters_before, false);
        let ids: Vec<String> = if holds.any() {
            old.iter().map(|(_, d)| d.event_id.clone()).collect()
        } else {
            Vec::new()
        };
        let held = super::hold::held_events(self.engine.as_ref(), &ids, holds, &mut purged.kept)?;
        let mut state = lock(&self.state);
        if let Some(trim) = trim.filter(|_| purged.attempts > 0) {
            ops.push(trim);
            if let Some(count) = state.attempts.get_mut(subscription) {
                *count = count.saturating_sub(purged.attempts);
            }
        }
        for (seq, dead) in old {
            if held.contains(&dead.event_id) || state.queues.remove_dead(subscription, seq).is_none() {
                continue;
            }
            ops.push(Op::DeleteDead(seq));
            if state.release(&dead.event_id, Ref::Dead) {
                ops.push(Op::DeleteEvent(dead.event_id));
            }
            purged.dead_letters += 1;
        }
        drop(state);
        if !ops.is_empty() {
            self.send(ops, false)?;
        }
        Ok(purged)
    }
}

impl Backend for DurableStore {
    fn flush(&self) -> Result<(), StoreError> {
        // Jobs commit in order: an empty one that is durable means all before it are.
        self.send(Vec::new(), true)
    }

    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        self.engine.secret(name)
    }

    fn commit_failures(&self) -> u64 {
        self.commit_failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn unavailable(&self) -> Option<String> {
        self.outage.reason()
    }

    fn commits_fail(&self) -> Option<String> {
        self.outage.failing()
    }

    fn disk_bytes(&self) -> Option<u64> {
        self.engine.disk_bytes()
    }

    fn volume(&self) -> Option<(u64, u64)> {
        self.engine.volume()
    }
}

/// An archived raw message with when it was archived.
pub(crate) fn raw_message(engine: &dyn Engine, sha256: &str) -> Result<Option<(jiff::Timestamp, Vec<u8>)>, StoreError> {
    Ok(engine.raw(sha256)?.map(|(at, bytes)| {
        (
            jiff::Timestamp::from_second(at).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            bytes,
        )
    }))
}

/// A stored delivery's JSON; one that does not parse (never written by this store) is
/// logged and left where it is rather than stopping the load of every other row.
fn parse_row(seq: u64, bytes: &[u8]) -> Option<StoredDelivery> {
    match serde_json::from_slice(bytes) {
        Ok(stored) => Some(stored),
        Err(err) => {
            tracing::error!(seq, %err, "a stored delivery does not parse; it is skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn conforms_in_memory() {
        conformance::run(&|| Box::new(DurableStore::in_memory().expect("in memory")));
    }

    #[test]
    fn conforms() {
        let dirs: Mutex<Vec<PathBuf>> = Mutex::default();
        conformance::run(&|| {
            let dir = std::env::temp_dir().join(format!("mailhook-store-test-{}", uuid::Uuid::now_v7().simple()));
            dirs.lock().push(dir.clone());
            Box::new(DurableStore::open(&dir).expect("open"))
        });
        for d in dirs.into_inner() {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// redb whose commits fail while `down` is set (a database that went away).
    struct Flaky {
        inner: Redb,
        down: std::sync::atomic::AtomicBool,
        /// The size of each probe the commit thread made.
        probes: Mutex<Vec<usize>>,
    }

    impl Flaky {
        /// On redb in memory, down from the start or not.
        fn new(down: bool) -> Arc<Flaky> {
            let db = Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .expect("in memory");
            create_tables(&db).expect("tables");
            Arc::new(Flaky {
                inner: Redb::new(db, None),
                down: std::sync::atomic::AtomicBool::new(down),
                probes: Mutex::default(),
            })
        }
    }

    impl Engine for Flaky {
        fn commit(&self, ops: &[&Op]) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            self.inner.commit(ops)
        }
        fn probe(&self, bytes: usize) -> Result<(), StoreError> {
            self.probes.lock().push(bytes);
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            self.inner.probe(bytes)
        }
        fn load(&self) -> Result<engine::Loaded, StoreError> {
            self.inner.load()
        }
        fn event(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.event(id)
        }
        fn event_count(&self) -> Result<u64, StoreError> {
            self.inner.event_count()
        }
        fn deliveries(&self, table: engine::Deliveries, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.inner.deliveries(table, seqs)
        }
        fn raw(&self, sha256: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
            self.inner.raw(sha256)
        }
        fn raw_before(&self, before: i64) -> Result<Vec<(i64, String)>, StoreError> {
            self.inner.raw_before(before)
        }
        fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
            self.inner.secret(name)
        }
        fn attempts(&self, subscription: &str, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
            self.inner.attempts(subscription, from, limit)
        }
        fn attempts_before(&self, subscription: &str, before: u64) -> Result<u64, StoreError> {
            self.inner.attempts_before(subscription, before)
        }
        fn oldest_attempts(&self, subscription: &str, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            self.inner.oldest_attempts(subscription, limit)
        }
        fn disk_bytes(&self) -> Option<u64> {
            None
        }
        fn rows_scan(
            &self,
            from: &[u8],
            to: &[u8],
        ) -> Result<Vec<crate::store::durable::engine::StoredRow>, StoreError> {
            self.inner.rows_scan(from, to)
        }
        fn row_get(&self, key: &[u8]) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
            self.inner.row_get(key)
        }
        fn row_groups(&self) -> Result<Vec<String>, StoreError> {
            self.inner.row_groups()
        }
        fn rows_before(&self, before: i64) -> Result<Vec<Vec<u8>>, StoreError> {
            self.inner.rows_before(before)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_refuses_new_events_keeps_what_memory_shows_and_commits_it_after() {
        let engine = Flaky::new(false);
        let s = DurableStore::on(engine.clone()).expect("store");
        let one = |id: &str| Ingest {
            event: conformance::event(id, Some(id)),
            deliveries: vec![conformance::pending(id, None, 0)],
        };
        s.ingest(vec![one("evt_1"), one("evt_2")]).expect("ingest");
        let mut taken = s.take_due("sub", jiff::Timestamp::now(), 2, false).expect("take");
        assert_eq!(taken.len(), 2);
        assert_eq!(s.unavailable(), None);

        engine.down.store(true, std::sync::atomic::Ordering::SeqCst);
        // A completion waits for a commit that makes it durable (its slot stays held)...
        let done = s.complete(&taken[0]).expect("queued");
        let waiting = tokio::spawn(done.wait());
        // ... a retry is kept in memory and on its way to disk ...
        let mut again = taken.remove(1);
        again.attempts = 1;
        s.retry(again).expect("queued");
        // ... and a new event is refused, its producer id free again.
        let blocking = |f: fn(&DurableStore) -> Result<Vec<Appended>, StoreError>| {
            let s = &s;
            std::thread::scope(|t| t.spawn(move || f(s)).join().expect("no panic"))
        };
        let refused = blocking(|s| {
            s.ingest(vec![Ingest {
                event: conformance::event("evt_3", Some("evt_3")),
                deliveries: vec![conformance::pending("evt_3", None, 0)],
            }])
        });
        assert!(refused.is_err(), "nothing is acknowledged while the store is down");
        let why = s.unavailable().expect("the outage is known");
        assert!(why.contains("connection refused"), "{why}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "the completion is not durable yet");
        // While down, a refusal comes at once (no commit tried): the caller answers 503.
        let started = std::time::Instant::now();
        assert!(blocking(|s| s.ingest(vec![])).is_err());
        assert!(started.elapsed() < std::time::Duration::from_millis(500));

        engine.down.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the completion commits once the store is back")
            .expect("task")
            .expect("durable");
        assert_eq!(s.unavailable(), None);
        let loaded = engine.load().expect("load");
        let pending: Vec<StoredDelivery> = loaded
            .pending
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).expect("json"))
            .collect();
        assert_eq!(pending.len(), 1, "the completion is on disk: one delivery waits");
        assert_eq!(pending[0].attempts, 1, "and the retry kept meanwhile is on disk too");
        assert_eq!(engine.event_count().expect("count"), 1, "the completed event is gone");
        let again = blocking(|s| {
            s.ingest(vec![Ingest {
                event: conformance::event("evt_3b", Some("evt_3")),
                deliveries: vec![],
            }])
        })
        .expect("ingest after the outage");
        assert!(!again[0].duplicate, "the refused event's producer id was released");
    }

    /// On a full volume an empty commit succeeds (redb writes only its header), so the
    /// store would look back while every event still fails: the probe writes as much as
    /// the commit that failed. (A full volume is also gated on its free space: see
    /// `committer::Full` and the integration test that fills a tmpfs.)
    #[test]
    fn while_down_the_probe_writes_as_much_as_the_failed_commit() {
        let engine = Flaky::new(true);
        let s = DurableStore::on(engine.clone()).expect("store");
        let mut event = conformance::event("evt_big", Some("evt_big"));
        event.subject = Some("x".repeat(300 << 10));
        let refused = s.ingest(vec![Ingest {
            event,
            deliveries: vec![conformance::pending("evt_big", None, 0)],
        }]);
        assert!(refused.is_err(), "the database is down");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while engine.probes.lock().is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let probes = engine.probes.lock().clone();
        assert!(
            probes.first().is_some_and(|&n| n >= 300 << 10),
            "the probe is at least the failed commit's size: {probes:?}"
        );
        assert!(s.unavailable().is_some(), "still down while probes fail");
        engine.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s.unavailable().is_some() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(s.unavailable(), None, "a probe that goes through ends the outage");
    }

    #[test]
    fn survives_a_reopen_with_in_flight_deliveries_waiting_again() {
        let dir = std::env::temp_dir().join(format!("mailhook-store-test-{}", uuid::Uuid::now_v7().simple()));
        let key = {
            let s = DurableStore::open(&dir).expect("open");
            let key = s.secret("links").expect("secret");
            s.ingest(vec![Ingest {
                event: conformance::event("evt_1", Some("p-1")),
                deliveries: vec![
                    conformance::pending("evt_1", None, 0),
                    conformance::pending("evt_1", None, 0),
                ],
            }])
            .expect("ingest");
            let taken = s.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
            assert_eq!(taken.len(), 1, "one in flight when the process dies");
            let mut dead = s.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
            s.dead_letter(dead.remove(0), "gave up".into()).expect("dead letter");
            s.note_subscription("sub", "mail").expect("note");
            // A later write waits for the ones queued before it.
            s.ingest(vec![]).expect("flush");
            key
        };
        let s = DurableStore::open(&dir).expect("reopen");
        assert_eq!(
            s.secret("links").expect("secret"),
            key,
            "links signed before a restart stay valid"
        );
        assert_eq!(
            s.subscriptions().expect("subscriptions"),
            vec![("sub".to_string(), Some("mail".to_string()))],
            "a subscription's namespace survives a restart"
        );
        assert_eq!(
            s.counts("sub"),
            QueueCounts {
                backlog: 1,
                in_flight: 0,
                dead_lettered: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            s.take_due("sub", jiff::Timestamp::now(), 10, false)
                .expect("take")
                .len(),
            1
        );
        assert!(s.event("evt_1").expect("read").is_some());
        let again = s
            .ingest(vec![Ingest {
                event: conformance::event("evt_9", Some("p-1")),
                deliveries: vec![],
            }])
            .expect("ingest");
        assert!(again[0].duplicate, "producer ids survive a restart");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }
}
