//! The durable store: redb on `--store-dir`, with the delivery queues indexed in memory.
//!
//! Every write goes through one committer thread, which takes all the writes waiting at
//! that moment into one transaction and one fsync (group commit): durability costs one
//! sync per batch, not per event. `ingest` returns only after its commit, `complete` hands
//! back a `Durable` to await;
//! retries and dead letters are queued without waiting (one lost in a crash only means an
//! earlier or extra attempt).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::queue::Queues;
use super::{Appended, Durable, Ingest, PendingDelivery, QueueCounts, Store, StoreError};
use crate::event::MailboxEvent;

const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
const PRODUCER_IDS: TableDefinition<&str, &str> = TableDefinition::new("producer_ids");
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// Most writes one transaction takes; keeps a commit's latency bounded under load.
const MAX_JOBS_PER_COMMIT: usize = 4096;

/// A delivery as stored on disk.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredDelivery {
    subscription: String,
    event_id: String,
    attempts: u32,
    not_before: jiff::Timestamp,
    accepted_at: jiff::Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ordering_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    matched_filters: Vec<String>,
    /// Dead letters only: why it was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl StoredDelivery {
    fn from(d: &PendingDelivery, reason: Option<String>) -> StoredDelivery {
        StoredDelivery {
            subscription: d.subscription.clone(),
            event_id: d.event_id.clone(),
            attempts: d.attempts,
            not_before: d.not_before,
            accepted_at: d.accepted_at,
            ordering_key: d.ordering_key.clone(),
            matched_filters: d.matched_filters.clone(),
            reason,
        }
    }

    fn into_pending(self, seq: u64) -> PendingDelivery {
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

enum Op {
    PutEvent(String, Vec<u8>),
    DeleteEvent(String),
    PutProducer(String, String),
    PutPending(u64, Vec<u8>),
    DeletePending(u64),
    PutDead(u64, Vec<u8>),
    /// Removes every dead letter of a subscription (a scan: deletions are rare).
    DeleteDeadOf(String),
}

/// Who hears that a job's commit finished.
enum Reply {
    None,
    Blocking(SyncSender<Result<(), String>>),
    Async(tokio::sync::oneshot::Sender<Result<(), String>>),
}

struct Job {
    ops: Vec<Op>,
    done: Reply,
}

/// Events with pending deliveries kept parsed in memory, up to this many; beyond it
/// deliveries read them from disk.
const EVENT_CACHE: usize = 100_000;

#[derive(Default)]
struct State {
    queues: Queues,
    /// Parsed events that still have pending deliveries (bounded by EVENT_CACHE): fan-out
    /// and retries do not re-read and re-parse them.
    cache: HashMap<String, Arc<MailboxEvent>>,
    producer_ids: HashMap<String, String>,
    /// Pending deliveries per event: at zero the event is deleted (dead letters keep it).
    pending_per_event: HashMap<String, u32>,
}

pub struct DurableStore {
    db: Arc<Database>,
    state: Mutex<State>,
    /// None once dropped: closing the channel stops the commit thread.
    writer: Mutex<Option<Sender<Job>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

impl Drop for DurableStore {
    /// Lets the commit thread finish what is queued and release the database.
    fn drop(&mut self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Some(handle) = self.committer.lock().ok().and_then(|mut c| c.take()) {
            let _ = handle.join();
        }
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(io)
}

impl State {
    /// One pending delivery of `event_id` is gone (delivered, dead-lettered or dropped).
    /// Returns true when it was the event's last: the event leaves the cache and the
    /// caller decides whether it also leaves the disk.
    fn release(&mut self, event_id: &str) -> bool {
        let Some(n) = self.pending_per_event.get_mut(event_id) else {
            return false;
        };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return false;
        }
        self.pending_per_event.remove(event_id);
        self.cache.remove(event_id);
        true
    }
}

impl DurableStore {
    /// Opens (or creates) the store in `dir` and loads the queues from it: deliveries
    /// that were in flight at a crash are waiting again, on their old schedule.
    pub fn open(dir: &Path) -> Result<DurableStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("mailhook.redb");
        let db = Arc::new(Database::create(&path).map_err(io)?);
        {
            let txn = db.begin_write().map_err(io)?;
            txn.open_table(EVENTS).map_err(io)?;
            txn.open_table(PRODUCER_IDS).map_err(io)?;
            txn.open_table(PENDING).map_err(io)?;
            txn.open_table(DEAD).map_err(io)?;
            txn.commit().map_err(io)?;
        }
        let mut state = State::default();
        {
            let txn = db.begin_read().map_err(io)?;
            for row in txn.open_table(PENDING).map_err(io)?.iter().map_err(io)? {
                let (seq, bytes) = row.map_err(io)?;
                let stored: StoredDelivery = serde_json::from_slice(bytes.value()).map_err(io)?;
                *state.pending_per_event.entry(stored.event_id.clone()).or_default() += 1;
                state.queues.restore(stored.into_pending(seq.value()));
            }
            for row in txn.open_table(DEAD).map_err(io)?.iter().map_err(io)? {
                let (seq, bytes) = row.map_err(io)?;
                let stored: StoredDelivery = serde_json::from_slice(bytes.value()).map_err(io)?;
                state.queues.restore_dead(&stored.subscription, seq.value());
            }
            for row in txn.open_table(PRODUCER_IDS).map_err(io)?.iter().map_err(io)? {
                let (producer, event) = row.map_err(io)?;
                state
                    .producer_ids
                    .insert(producer.value().to_string(), event.value().to_string());
            }
        }
        let (tx, rx) = channel();
        let writer_db = db.clone();
        let committer = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || commit_loop(&writer_db, &rx))
            .map_err(io)?;
        Ok(DurableStore {
            db,
            state: Mutex::new(state),
            writer: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(committer)),
            path,
        })
    }

    /// Bytes the store occupies on disk.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Unavailable("store state lock poisoned".into()))
    }

    fn submit(&self, ops: Vec<Op>, done: Reply) -> Result<(), StoreError> {
        self.writer
            .lock()
            .map_err(|_| StoreError::Unavailable("store writer lock poisoned".into()))?
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?
            .send(Job { ops, done })
            .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))
    }

    /// Queues `ops`; with `wait`, blocks until they are committed.
    fn send(&self, ops: Vec<Op>, wait: bool) -> Result<(), StoreError> {
        if !wait {
            return self.submit(ops, Reply::None);
        }
        let (tx, rx) = sync_channel(1);
        self.submit(ops, Reply::Blocking(tx))?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))?
            .map_err(StoreError::Io)
    }
}

fn commit_loop(db: &Database, rx: &Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let result = commit(db, &jobs).map_err(|e| e.to_string());
        if let Err(err) = &result {
            tracing::error!(%err, "store commit failed");
        }
        for job in jobs {
            match job.done {
                Reply::None => {}
                Reply::Blocking(tx) => {
                    let _ = tx.send(result.clone());
                }
                Reply::Async(tx) => {
                    let _ = tx.send(result.clone());
                }
            }
        }
    }
}

fn commit(db: &Database, jobs: &[Job]) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(io)?;
    txn.set_durability(Durability::Immediate).map_err(io)?;
    {
        let mut events = txn.open_table(EVENTS).map_err(io)?;
        let mut producers = txn.open_table(PRODUCER_IDS).map_err(io)?;
        let mut pending = txn.open_table(PENDING).map_err(io)?;
        let mut dead = txn.open_table(DEAD).map_err(io)?;
        for op in jobs.iter().flat_map(|j| &j.ops) {
            match op {
                Op::PutEvent(id, bytes) => {
                    events.insert(id.as_str(), bytes.as_slice()).map_err(io)?;
                }
                Op::DeleteEvent(id) => {
                    events.remove(id.as_str()).map_err(io)?;
                }
                Op::PutProducer(p, id) => {
                    producers.insert(p.as_str(), id.as_str()).map_err(io)?;
                }
                Op::PutPending(seq, bytes) => {
                    pending.insert(*seq, bytes.as_slice()).map_err(io)?;
                }
                Op::DeletePending(seq) => {
                    pending.remove(*seq).map_err(io)?;
                }
                Op::PutDead(seq, bytes) => {
                    dead.insert(*seq, bytes.as_slice()).map_err(io)?;
                }
                Op::DeleteDeadOf(subscription) => {
                    dead.retain(|_, bytes| {
                        serde_json::from_slice::<StoredDelivery>(bytes)
                            .map_or(true, |d| &d.subscription != subscription)
                    })
                    .map_err(io)?;
                }
            }
        }
    }
    txn.commit().map_err(io)
}

impl Store for DurableStore {
    fn ingest(&self, items: Vec<Ingest>) -> Result<Vec<Appended>, StoreError> {
        let mut ops = Vec::new();
        let mut out = Vec::with_capacity(items.len());
        let mut queued = Vec::new();
        let mut cached = Vec::new();
        let mut claimed = Vec::new();
        {
            let mut state = self.lock()?;
            for item in items {
                if let Some(pid) = &item.event.producer_event_id {
                    if let Some(existing) = state.producer_ids.get(pid) {
                        out.push(Appended {
                            id: existing.clone(),
                            duplicate: true,
                        });
                        continue;
                    }
                    // Claimed now, so a concurrent duplicate sees it; released if the commit fails.
                    state.producer_ids.insert(pid.clone(), item.event.id.clone());
                    claimed.push(pid.clone());
                    ops.push(Op::PutProducer(pid.clone(), item.event.id.clone()));
                }
                let id = item.event.id.clone();
                ops.push(Op::PutEvent(id.clone(), json(&item.event)?));
                if !item.deliveries.is_empty() {
                    cached.push(Arc::new(item.event));
                }
                for mut d in item.deliveries {
                    d.seq = state.queues.reserve_seq();
                    ops.push(Op::PutPending(d.seq, json(&StoredDelivery::from(&d, None))?));
                    queued.push(d);
                }
                out.push(Appended { id, duplicate: false });
            }
        }
        if let Err(err) = self.send(ops, true) {
            if let Ok(mut state) = self.lock() {
                for pid in claimed {
                    state.producer_ids.remove(&pid);
                }
            }
            return Err(err);
        }
        // Only what is on disk becomes deliverable.
        let mut state = self.lock()?;
        for event in cached {
            if state.cache.len() < EVENT_CACHE {
                state.cache.insert(event.id.clone(), event);
            }
        }
        for d in queued {
            *state.pending_per_event.entry(d.event_id.clone()).or_default() += 1;
            state.queues.restore(d);
        }
        Ok(out)
    }

    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError> {
        if let Some(e) = self.lock()?.cache.get(id) {
            return Ok(Some(e.clone()));
        }
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(EVENTS).map_err(io)?;
        match table.get(id).map_err(io)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(Arc::new(serde_json::from_slice(bytes.value()).map_err(io)?))),
        }
    }

    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        Ok(self.lock()?.queues.take_due(subscription, now, max, ordered))
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        self.state.lock().ok()?.queues.next_due(subscription)
    }

    fn complete(&self, d: &PendingDelivery) -> Result<Durable, StoreError> {
        let mut ops = vec![Op::DeletePending(d.seq)];
        {
            let mut state = self.lock()?;
            state.queues.complete(d);
            if state.release(&d.event_id) {
                ops.push(Op::DeleteEvent(d.event_id.clone()));
            }
        }
        // The caller awaits the group commit: a delivery counts as in flight until its
        // completion is on disk, so a crash re-delivers only what was in flight.
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(ops, Reply::Async(tx))?;
        Ok(Durable(Some(rx)))
    }

    fn retry(&self, d: PendingDelivery) -> Result<(), StoreError> {
        let op = Op::PutPending(d.seq, json(&StoredDelivery::from(&d, None))?);
        self.lock()?.queues.retry(d);
        self.send(vec![op], false)
    }

    fn dead_letter(&self, d: PendingDelivery, reason: String) -> Result<(), StoreError> {
        let ops = vec![
            Op::DeletePending(d.seq),
            Op::PutDead(d.seq, json(&StoredDelivery::from(&d, Some(reason)))?),
        ];
        let mut state = self.lock()?;
        state.queues.dead_letter(&d);
        // Dead letters keep their event on disk for replay; only the cache lets go.
        state.release(&d.event_id);
        drop(state);
        self.send(ops, false)
    }

    fn forget_subscription(&self, subscription: &str) -> Result<(), StoreError> {
        let mut ops: Vec<Op> = Vec::new();
        {
            let mut state = self.lock()?;
            for d in state.queues.forget(subscription) {
                ops.push(Op::DeletePending(d.seq));
                if state.release(&d.event_id) {
                    ops.push(Op::DeleteEvent(d.event_id.clone()));
                }
            }
        }
        ops.push(Op::DeleteDeadOf(subscription.to_string()));
        self.send(ops, true)
    }

    fn total_backlog(&self) -> u64 {
        self.state.lock().map(|s| s.queues.total_backlog()).unwrap_or(0)
    }

    fn counts(&self, subscription: &str) -> QueueCounts {
        self.state
            .lock()
            .map(|s| s.queues.counts(subscription))
            .unwrap_or_default()
    }

    fn disk_bytes(&self) -> Option<u64> {
        Some(DurableStore::disk_bytes(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn conforms() {
        let dirs: Mutex<Vec<PathBuf>> = Mutex::default();
        conformance::run(&|| {
            let dir = std::env::temp_dir().join(format!("mailhook-store-test-{}", uuid::Uuid::now_v7().simple()));
            dirs.lock().expect("lock").push(dir.clone());
            Box::new(DurableStore::open(&dir).expect("open"))
        });
        for d in dirs.into_inner().expect("lock") {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn survives_a_reopen_with_in_flight_deliveries_waiting_again() {
        let dir = std::env::temp_dir().join(format!("mailhook-store-test-{}", uuid::Uuid::now_v7().simple()));
        {
            let s = DurableStore::open(&dir).expect("open");
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
            // A later write waits for the ones queued before it.
            s.ingest(vec![]).expect("flush");
        }
        let s = DurableStore::open(&dir).expect("reopen");
        assert_eq!(
            s.counts("sub"),
            QueueCounts {
                backlog: 1,
                dead_lettered: 1
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
