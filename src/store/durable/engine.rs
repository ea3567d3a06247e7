//! What the durable store needs from the database under it: apply one group commit's
//! writes in one durable transaction, load what the in-memory index is rebuilt from, and
//! a few reads. `Redb` is the embedded engine; `store::postgres::Postgres` the shared one.
//! Depends on `schema` (redb's layout) and `committer::Op` only.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::committer::Op;
use super::schema::{
    ATTEMPTS, AUDIT_CHECKPOINTS, AUDIT_DELIVERIES, AUDIT_EVENTS, AUDIT_HASHES, AUDIT_RECORDS, DEAD, DEAD_BY_TIME,
    DEAD_QUEUE, EVENT_REFS, EVENTS, MAILBOX_INDEX, META, PENDING, PRODUCERS, PRODUCERS_BY_AGE, QUEUE, QUEUE_DUE,
    QUEUE_STATS, RAW, RAW_BY_AGE, SUBSCRIPTIONS, io,
};
use crate::store::StoreError;

/// The two delivery tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliveries {
    Pending,
    Dead,
}

/// Everything the in-memory index is rebuilt from at start.
#[derive(Default)]
pub struct Loaded {
    /// (seq, stored delivery JSON), waiting deliveries.
    pub pending: Vec<(u64, Vec<u8>)>,
    /// (seq, stored delivery JSON), dead letters.
    pub dead: Vec<(u64, Vec<u8>)>,
    /// (producer id, event id, unix seconds first seen).
    pub producers: Vec<(String, String, i64)>,
    /// (subscription UID, namespace).
    pub subscriptions: Vec<(String, String)>,
    /// (subscription UID, attempt key) of every logged attempt.
    pub attempt_keys: Vec<(String, u64)>,
}

/// A keyed row as stored: (`group NUL key`, unix seconds written, body).
pub type StoredRow = (Vec<u8>, i64, Vec<u8>);

pub trait Engine: Send + Sync + 'static {
    /// Applies `ops`, in order, in one durable transaction.
    fn commit(&self, ops: &[&Op]) -> Result<(), StoreError>;
    /// Whether a commit of about `bytes` would go through now: what the commit thread asks,
    /// with nothing else to write, while commits fail. An empty commit is not enough where
    /// it needs no new space (redb on a full volume writes nothing and succeeds).
    fn probe(&self, _bytes: usize) -> Result<(), StoreError> {
        self.commit(&[])
    }
    fn load(&self) -> Result<Loaded, StoreError>;
    /// An event's JSON.
    fn event(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Events' JSON by id, in one read (absent ones skipped).
    fn events_by_id(&self, ids: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(body) = self.event(id)? {
                found.push((id.clone(), body));
            }
        }
        Ok(found)
    }
    /// As `events_by_id`, with each event's acceptance index in the audit log, when it
    /// has one.
    fn events_indexed(&self, ids: &[String]) -> Result<Vec<IndexedEvent>, StoreError> {
        let read = self.events_by_id(ids)?;
        let read_ids: Vec<String> = read.iter().map(|(id, _)| id.clone()).collect();
        // Without its index a delivery only lacks its log index header.
        let indexes = self.audit_accepted(&read_ids).unwrap_or_else(|err| {
            tracing::debug!(%err, "cannot read the events' audit log indexes");
            vec![None; read_ids.len()]
        });
        Ok(read
            .into_iter()
            .zip(indexes)
            .map(|((id, body), index)| (id, body, index))
            .collect())
    }
    fn event_count(&self) -> Result<u64, StoreError>;
    /// Stored deliveries by seq (absent ones skipped).
    fn deliveries(&self, table: Deliveries, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// An archived raw message: (unix seconds archived, bytes).
    fn raw(&self, sha256: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    /// (archived at, SHA-256) of every raw message archived before `before` (unix s).
    fn raw_before(&self, before: i64) -> Result<Vec<(i64, String)>, StoreError>;
    /// The named 32-byte secret, created at random on first use (durably, at once).
    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError>;
    /// A subscription's attempt JSON with keys from `from`, newest first, at most `limit`.
    fn attempts(&self, subscription: &str, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError>;
    /// How many of a subscription's attempts have keys below `before`.
    fn attempts_before(&self, subscription: &str, before: u64) -> Result<u64, StoreError>;
    /// The subscription's oldest `limit` attempts, oldest first, with their keys.
    fn oldest_attempts(&self, subscription: &str, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Bytes the data occupies, when it can tell.
    fn disk_bytes(&self) -> Option<u64>;
    /// The store's volume: (size, bytes available), for backends on a local volume.
    fn volume(&self) -> Option<(u64, u64)> {
        None
    }
    /// Gives back the space held in reserve on the volume (true if there was some): when a
    /// write fails for want of space, deliveries still need room to record that they are
    /// done — redb writes every change to new pages before it frees the old ones.
    fn release_reserve(&self) -> bool {
        false
    }
    /// Holds the reserve again (at start, and before new events are taken after the volume
    /// was full); fails while there is no room for it.
    fn restore_reserve(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Keyed rows (`store::rows`, stored as `group NUL key`) from `from` up to `to`
    /// (exclusive): (stored key, unix seconds written, body), in key order.
    fn rows_scan(&self, from: &[u8], to: &[u8]) -> Result<Vec<StoredRow>, StoreError>;
    /// One keyed row: (unix seconds written, body).
    fn row_get(&self, key: &[u8]) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    /// Every group with a keyed row, in order.
    fn row_groups(&self) -> Result<Vec<String>, StoreError>;
    /// Stored keys of keyed rows written before `before` (unix seconds).
    fn rows_before(&self, before: i64) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Leaves in the audit log.
    fn audit_size(&self) -> Result<u64, StoreError> {
        Err(StoreError::Failed("this engine keeps no audit log".into()))
    }
    /// The audit log's stored hashes at `indexes`, in that order (None where missing).
    fn audit_hashes(&self, _indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
        Err(StoreError::Failed("this engine keeps no audit log".into()))
    }
    /// The audit log's leaves with index in `from..to`, in order.
    fn audit_records(&self, _from: u64, _to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Err(StoreError::Failed("this engine keeps no audit log".into()))
    }
    /// The leaves about an event, in order (its acceptance first).
    fn audit_leaves_of(&self, _event_id: &str) -> Result<Vec<u64>, StoreError> {
        Err(StoreError::Failed("this engine keeps no audit log".into()))
    }
    /// The signed checkpoint of `size`, or the newest one: (size, note).
    fn audit_checkpoint(&self, _size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Err(StoreError::Failed("this engine keeps no audit log".into()))
    }
    /// The leaf of each event's acceptance, in the order asked.
    fn audit_accepted(&self, ids: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        ids.iter()
            .map(|id| Ok(self.audit_leaves_of(id)?.first().copied()))
            .collect()
    }
}

/// The end (exclusive) of the keys that start with `prefix`: the prefix without its
/// trailing 0xff bytes, its last byte raised by one. A prefix of 0xff bytes only has no
/// such end; none is asked for (a row's stored key starts with UTF-8, which never holds
/// 0xff), and it gets one that covers keys up to 64 bytes past it.
/// An event read back: its id, its stored JSON, and its acceptance index in the audit log.
pub type IndexedEvent = (String, Vec<u8>, Option<u64>);

pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while end.last() == Some(&0xff) {
        end.pop();
    }
    match end.last_mut() {
        Some(last) => *last += 1,
        None => end = vec![0xff; prefix.len() + 64],
    }
    end
}

/// redb's page cache: an eighth of the memory limit, 4 to 32 MiB (32 without a limit). Its
/// default (1 GiB) let the operator's memory grow with the store file, i.e. with the
/// backlog; the OS page cache keeps recently used pages anyway. Under a 64 MiB limit 32 MiB
/// of it (what an ingest burst fills) was half of what the pod may use.
pub(crate) fn redb_cache_bytes() -> usize {
    crate::memory::share(crate::memory::limit(), 8, 4 << 20, 32 << 20) as usize
}

/// The embedded engine: one redb file (or redb's in-memory backend).
pub struct Redb {
    /// None only while the file is being opened again.
    db: parking_lot::RwLock<Option<Database>>,
    /// None in memory.
    pub path: Option<std::path::PathBuf>,
    /// A write failed: after one failed write redb refuses every later transaction until
    /// the file is opened again ("Previous I/O error occurred"), so the next commit reopens
    /// it first. A volume that filled up and was grown then works again without a restart.
    broken: std::sync::atomic::AtomicBool,
}

/// The space reserve on the store's volume: 1/128 of it, 1 to 16 MiB (a commit of a few
/// thousand finished deliveries needs a few MiB of new pages).
const RESERVE_MIN: u64 = 1 << 20;
const RESERVE_MAX: u64 = 16 << 20;

impl Redb {
    /// The file holding the space reserve, beside the store file.
    fn reserve_path(&self) -> Option<std::path::PathBuf> {
        Some(self.path.as_ref()?.with_file_name("space-reserve"))
    }

    pub fn new(db: Database, path: Option<std::path::PathBuf>) -> Redb {
        Redb {
            db: parking_lot::RwLock::new(Some(db)),
            path,
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The open database, for one transaction.
    fn db(&self) -> Result<parking_lot::MappedRwLockReadGuard<'_, Database>, StoreError> {
        parking_lot::RwLockReadGuard::try_map(self.db.read(), Option::as_ref)
            .map_err(|_| StoreError::Failed("the store file is being opened again".into()))
    }

    /// Closes the file and opens it again (no-op in memory).
    fn reopen(&self) -> Result<(), StoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut db = self.db.write();
        // Dropped first: redb locks the file while a Database holds it.
        *db = None;
        *db = Some(
            Database::builder()
                .set_cache_size(redb_cache_bytes())
                .create(path)
                .map_err(io)?,
        );
        self.broken.store(false, std::sync::atomic::Ordering::Release);
        tracing::info!(path = %path.display(), "store file opened again after a failed write");
        Ok(())
    }

    /// Runs a write transaction, reopening the file first when the last write failed (and
    /// marking it so when this one fails).
    fn writing(&self, write: impl FnOnce() -> Result<(), StoreError>) -> Result<(), StoreError> {
        if self.broken.load(std::sync::atomic::Ordering::Acquire) {
            self.reopen()?;
        }
        let result = write();
        if result.is_err() {
            self.broken.store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }

    fn write(&self, ops: &[&Op]) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(io)?;
        // The audit leaves appended, with their indexes: told once committed.
        let mut appended: Vec<(crate::audit::Leaf, u64)> = Vec::new();

        txn.set_durability(Durability::Immediate).map_err(io)?;
        {
            let mut events = txn.open_table(EVENTS).map_err(io)?;
            let mut producers = txn.open_table(PRODUCERS).map_err(io)?;
            let mut pending = txn.open_table(PENDING).map_err(io)?;
            let mut dead = txn.open_table(DEAD).map_err(io)?;
            let mut attempts = txn.open_table(ATTEMPTS).map_err(io)?;
            let mut raw = txn.open_table(RAW).map_err(io)?;
            let mut raw_by_age = txn.open_table(RAW_BY_AGE).map_err(io)?;
            let mut subscriptions = txn.open_table(SUBSCRIPTIONS).map_err(io)?;
            let mut index = txn.open_table(MAILBOX_INDEX).map_err(io)?;
            let mut paged = Paged {
                queue: txn.open_table(QUEUE).map_err(io)?,
                due: txn.open_table(QUEUE_DUE).map_err(io)?,
                dead: txn.open_table(DEAD_QUEUE).map_err(io)?,
                dead_by_time: txn.open_table(DEAD_BY_TIME).map_err(io)?,
                refs: txn.open_table(EVENT_REFS).map_err(io)?,
                producers_by_age: txn.open_table(PRODUCERS_BY_AGE).map_err(io)?,
                stats: std::collections::HashMap::new(),
                released: std::collections::HashMap::new(),
                next_seq: None,
                forgotten: Vec::new(),
            };
            let mut audit: Vec<crate::audit::Leaf> = Vec::new();
            for op in ops {
                match op {
                    Op::PutEvent(id, bytes) => {
                        events.insert(id.as_str(), bytes.as_slice()).map_err(io)?;
                    }
                    Op::DeleteEvent(id) => {
                        events.remove(id.as_str()).map_err(io)?;
                    }
                    Op::PutProducer(p, id, at) => {
                        producers.insert(p.as_str(), (id.as_str(), *at)).map_err(io)?;
                    }
                    Op::DeleteProducer(p) => {
                        producers.remove(p.as_str()).map_err(io)?;
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
                    Op::DeleteDead(seq) => {
                        dead.remove(*seq).map_err(io)?;
                    }
                    Op::PutAttempt(subscription, key, bytes) => {
                        attempts
                            .insert((subscription.as_str(), *key), bytes.as_slice())
                            .map_err(io)?;
                    }
                    Op::TrimAttempts(subscription, n) => {
                        let mut left = *n;
                        let range = (subscription.as_str(), 0u64)..=(subscription.as_str(), u64::MAX);
                        attempts
                            .retain_in(range, |_, _| {
                                if left == 0 {
                                    return true;
                                }
                                left -= 1;
                                false
                            })
                            .map_err(io)?;
                    }
                    Op::TrimAttemptsThrough(subscription, through, keep) => {
                        let range = (subscription.as_str(), 0u64)..=(subscription.as_str(), *through);
                        attempts
                            .retain_in(range, |(_, key), _| keep.contains(&key))
                            .map_err(io)?;
                    }
                    Op::DeleteAttemptsOf(subscription) => {
                        let range = (subscription.as_str(), 0u64)..=(subscription.as_str(), u64::MAX);
                        attempts.retain_in(range, |_, _| false).map_err(io)?;
                    }
                    Op::PutRaw(sha256, at, bytes) => {
                        // Archived again: its age starts over.
                        if let Some(old) = raw.insert(sha256.as_str(), (*at, bytes.as_slice())).map_err(io)? {
                            let old_at = old.value().0;
                            drop(old);
                            raw_by_age.remove((old_at, sha256.as_str())).map_err(io)?;
                        }
                        raw_by_age.insert((*at, sha256.as_str()), ()).map_err(io)?;
                    }
                    Op::DeleteRaw(at, sha256) => {
                        // Only the archive the purge read: one archived again since is
                        // newer, and stays.
                        let current = raw.get(sha256.as_str()).map_err(io)?.map(|v| v.value().0);
                        if current == Some(*at) {
                            raw.remove(sha256.as_str()).map_err(io)?;
                        }
                        raw_by_age.remove((*at, sha256.as_str())).map_err(io)?;
                    }
                    Op::PutSubscription(uid, namespace) => {
                        subscriptions.insert(uid.as_str(), namespace.as_str()).map_err(io)?;
                    }
                    Op::DeleteSubscription(uid) => {
                        subscriptions.remove(uid.as_str()).map_err(io)?;
                    }
                    Op::PutRow(key, _, at, body) => {
                        index.insert(key.as_slice(), (*at, body.as_slice())).map_err(io)?;
                    }
                    Op::DeleteRow(key) => {
                        index.remove(key.as_slice()).map_err(io)?;
                    }
                    Op::PutCountedEvent(id, bytes, n) => {
                        events.insert(id.as_str(), bytes.as_slice()).map_err(io)?;
                        paged.refs.insert(id.as_str(), *n).map_err(io)?;
                    }
                    Op::ReleaseEvent(id) => *paged.released.entry(id.clone()).or_default() += 1,
                    Op::Enqueue(q) => {
                        // Queued again: its old place in the due index goes, wherever the
                        // row on disk says it was.
                        let old = paged
                            .queue
                            .insert((q.subscription.as_str(), q.seq), q.body.as_slice())
                            .map_err(io)?
                            .map(|v| due_of(v.value()));
                        if let Some(old) = old {
                            paged.due.remove((q.subscription.as_str(), old, q.seq)).map_err(io)?;
                        }
                        paged
                            .due
                            .insert((q.subscription.as_str(), q.due, q.seq), ())
                            .map_err(io)?;
                        paged.seq(q.seq);
                    }
                    Op::Dequeue { subscription, seq, .. } => {
                        let removed = paged
                            .queue
                            .remove((subscription.as_str(), *seq))
                            .map_err(io)?
                            .map(|v| due_of(v.value()));
                        if let Some(due) = removed {
                            paged.due.remove((subscription.as_str(), due, *seq)).map_err(io)?;
                        }
                    }
                    Op::Bury(subscription, seq, at, body) => {
                        paged
                            .dead
                            .insert((subscription.as_str(), *seq), body.as_slice())
                            .map_err(io)?;
                        paged
                            .dead_by_time
                            .insert((subscription.as_str(), *at, *seq), ())
                            .map_err(io)?;
                        paged.seq(*seq);
                    }
                    Op::Unbury(subscription, seq, at) => {
                        paged.dead.remove((subscription.as_str(), *seq)).map_err(io)?;
                        paged
                            .dead_by_time
                            .remove((subscription.as_str(), *at, *seq))
                            .map_err(io)?;
                    }
                    Op::Stats(subscription, queued, bytes, dead) => {
                        let s = paged.stats.entry(subscription.clone()).or_default();
                        s.0 += queued;
                        s.1 += bytes;
                        s.2 += dead;
                    }
                    Op::ForgetQueue(subscription) => {
                        paged.forget(subscription)?;
                    }
                    Op::PutAgedProducer(p, id, at) => {
                        producers.insert(p.as_str(), (id.as_str(), *at)).map_err(io)?;
                        paged.producers_by_age.insert((*at, p.as_str()), ()).map_err(io)?;
                    }
                    Op::DeleteAgedProducer(p, at) => {
                        producers.remove(p.as_str()).map_err(io)?;
                        paged.producers_by_age.remove((*at, p.as_str())).map_err(io)?;
                    }
                    Op::NextSeq(n) => paged.seq(n.saturating_sub(1)),
                    Op::Audit(leaf) => audit.push(leaf.as_ref().clone()),
                    Op::AuditCheckpoint(size, note) => {
                        let mut checkpoints = txn.open_table(AUDIT_CHECKPOINTS).map_err(io)?;
                        if checkpoints.get(*size).map_err(io)?.is_none() {
                            checkpoints.insert(*size, note.as_slice()).map_err(io)?;
                        }
                    }
                    Op::Ingest(_)
                    | Op::Fenced(..)
                    | Op::PutClaimed(..)
                    | Op::DeleteEventIfUnused(_)
                    | Op::DropDead(_)
                    | Op::DeleteDeliveriesOf(_) => {
                        return Err(StoreError::Failed(
                            "a shared-store write reached the embedded store (a bug)".into(),
                        ));
                    }
                }
            }
            paged.finish(&mut events)?;
            if !audit.is_empty() {
                appended = append_audit(&txn, &audit)?;
            }
            if let Some(next) = paged.next_seq {
                let mut meta = txn.open_table(META).map_err(io)?;
                let stored = meta
                    .get(NEXT_SEQ)
                    .map_err(io)?
                    .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                    .map_or(0, u64::from_be_bytes);
                if next > stored {
                    meta.insert(NEXT_SEQ, next.to_be_bytes().as_slice()).map_err(io)?;
                }
            }
            let mut stats = txn.open_table(QUEUE_STATS).map_err(io)?;
            for subscription in &paged.forgotten {
                stats.remove(subscription.as_str()).map_err(io)?;
            }
            for (subscription, (queued, bytes, dead)) in paged.stats {
                let (q, b, d) = stats
                    .get(subscription.as_str())
                    .map_err(io)?
                    .map_or((0, 0, 0), |v| v.value());
                let add = |v: u64, by: i64| u64::try_from(i128::from(v) + i128::from(by)).unwrap_or(0);
                let row = (add(q, queued), add(b, bytes), add(d, dead));
                if row == (0, 0, 0) {
                    stats.remove(subscription.as_str()).map_err(io)?;
                } else {
                    stats.insert(subscription.as_str(), row).map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)?;
        for (leaf, index) in appended {
            leaf.committed_at(index);
        }
        Ok(())
    }
}

/// The META key of the next seq the paged store hands out.
const NEXT_SEQ: &str = "next_seq";

type Table<'t, K, V> = redb::Table<'t, K, V>;

/// The paged store's tables within one write, and what the write accumulates.
struct Paged<'t> {
    queue: Table<'t, (&'static str, u64), &'static [u8]>,
    due: Table<'t, (&'static str, u64, u64), ()>,
    dead: Table<'t, (&'static str, u64), &'static [u8]>,
    dead_by_time: Table<'t, (&'static str, u64, u64), ()>,
    refs: Table<'t, &'static str, u32>,
    producers_by_age: Table<'t, (i64, &'static str), ()>,
    stats: std::collections::HashMap<String, (i64, i64, i64)>,
    /// References released per event.
    released: std::collections::HashMap<String, u32>,
    next_seq: Option<u64>,
    /// Subscriptions whose figures were dropped.
    forgotten: Vec<String>,
}

/// Where a stored delivery is in its queue's due index (unix nanoseconds of `notBefore`).
fn due_of(body: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Due {
        #[serde(rename = "notBefore")]
        not_before: jiff::Timestamp,
    }
    serde_json::from_slice::<Due>(body).map_or(0, |d| super::schema::nanos(d.not_before))
}

/// The event a stored delivery refers to.
#[derive(serde::Deserialize, Default)]
struct EventOf {
    #[serde(rename = "eventId", default)]
    event_id: String,
}

impl Paged<'_> {
    fn seq(&mut self, seq: u64) {
        self.next_seq = Some(self.next_seq.unwrap_or(0).max(seq + 1));
    }

    /// Drops a subscription's queue and dead letters, releasing their events.
    fn forget(&mut self, subscription: &str) -> Result<(), StoreError> {
        let range = (subscription, 0u64)..=(subscription, u64::MAX);
        let mut events = Vec::new();
        for table in [&mut self.queue, &mut self.dead] {
            for row in table.range(range.clone()).map_err(io)? {
                let (_, body) = row.map_err(io)?;
                let of: EventOf = serde_json::from_slice(body.value()).unwrap_or_default();
                events.push(of.event_id);
            }
            table.retain_in(range.clone(), |_, _| false).map_err(io)?;
        }
        let timed = (subscription, 0u64, 0u64)..=(subscription, u64::MAX, u64::MAX);
        self.due.retain_in(timed.clone(), |_, _| false).map_err(io)?;
        self.dead_by_time.retain_in(timed, |_, _| false).map_err(io)?;
        for id in events {
            *self.released.entry(id).or_default() += 1;
        }
        // Its figures go; changes after this in the same write count from nothing.
        self.stats.remove(subscription);
        self.forgotten.push(subscription.to_string());
        Ok(())
    }

    /// Applies the released references: an event nothing refers to any more is deleted.
    fn finish(&mut self, events: &mut Table<'_, &'static str, &'static [u8]>) -> Result<(), StoreError> {
        for (id, n) in std::mem::take(&mut self.released) {
            let left = self
                .refs
                .get(id.as_str())
                .map_err(io)?
                .map_or(0, |v| v.value())
                .saturating_sub(n);
            if left == 0 {
                self.refs.remove(id.as_str()).map_err(io)?;
                events.remove(id.as_str()).map_err(io)?;
            } else {
                self.refs.insert(id.as_str(), left).map_err(io)?;
            }
        }
        Ok(())
    }
}

/// The META key of the audit log's size (leaves appended).
const AUDIT_SIZE: &str = "audit_size";

fn meta_u64(meta: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<u64, StoreError> {
    Ok(meta
        .get(key)
        .map_err(io)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// The stored hash at `index`, from the run that holds it (None when no run does).
fn stored_hash(
    runs: &impl ReadableTable<u64, &'static [u8]>,
    index: u64,
) -> Result<Option<crate::audit::Hash>, StoreError> {
    let Some(row) = runs.range(..=index).map_err(io)?.next_back() else {
        return Ok(None);
    };
    let (start, run) = row.map_err(io)?;
    let at = usize::try_from(index - start.value())
        .ok()
        .and_then(|n| n.checked_mul(32));
    Ok(at
        .and_then(|at| run.value().get(at..at.checked_add(32)?))
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .map(crate::audit::Hash))
}

/// Appends leaves to the audit log inside the write `txn`: the tree grows from the hashes
/// of its frontier, in this commit's order. Returns each leaf with its index.
fn append_audit(
    txn: &redb::WriteTransaction,
    leaves: &[crate::audit::Leaf],
) -> Result<Vec<(crate::audit::Leaf, u64)>, StoreError> {
    let mut meta = txn.open_table(META).map_err(io)?;
    let mut hashes = txn.open_table(AUDIT_HASHES).map_err(io)?;
    let mut records = txn.open_table(AUDIT_RECORDS).map_err(io)?;
    let mut by_event = txn.open_table(AUDIT_EVENTS).map_err(io)?;
    let mut by_acceptance = txn.open_table(AUDIT_DELIVERIES).map_err(io)?;
    let size = meta_u64(&meta, AUDIT_SIZE)?;
    let mut frontier = std::collections::HashMap::new();
    for index in crate::audit::frontier(size) {
        let hash = stored_hash(&hashes, index)?
            .ok_or_else(|| StoreError::Failed(format!("the audit log lacks stored hash {index}")))?;
        frontier.insert(index, hash);
    }
    let stored = crate::audit::append(size, frontier, leaves).map_err(|e| StoreError::Failed(e.to_string()))?;
    // The new stored hashes are one run of consecutive indexes, after every other run: a
    // run beyond it means the recorded size went back (an edited store), and reading
    // hashes would mix the two.
    if let Some((first, _)) = stored.first() {
        if hashes.range(*first..).map_err(io)?.next().is_some() {
            return Err(StoreError::Failed(format!(
                "the audit log's size says {size} leaves, but it holds hashes past them: the store was edited"
            )));
        }
        let run: Vec<u8> = stored.iter().flat_map(|(_, h)| h.0).collect();
        hashes.insert(*first, run.as_slice()).map_err(io)?;
    }
    for (i, leaf) in leaves.iter().enumerate() {
        let n = size + i as u64;
        records.insert(n, leaf.bytes.as_slice()).map_err(io)?;
        match (&leaf.event_id, leaf.accepted_at_index) {
            (_, Some(accepted)) => {
                by_acceptance.insert((accepted, n), ()).map_err(io)?;
            }
            (Some(id), None) if crate::audit::Record::is_acceptance(&leaf.bytes) => {
                by_event.insert(id.as_str(), n).map_err(io)?;
            }
            // A delivery whose event did not know its acceptance's index (read back before
            // it was told): found by its id here, so that the event's evidence lists it.
            (Some(id), None) => {
                let accepted = by_event.get(id.as_str()).map_err(io)?.map(|v| v.value());
                if let Some(accepted) = accepted {
                    by_acceptance.insert((accepted, n), ()).map_err(io)?;
                }
            }
            _ => {}
        }
    }
    let grown = size + leaves.len() as u64;
    meta.insert(AUDIT_SIZE, grown.to_be_bytes().as_slice()).map_err(io)?;
    Ok(leaves.iter().cloned().zip(size..).collect())
}

/// The META key a probe writes and deletes.
const PROBE_KEY: &str = "probe";

impl Engine for Redb {
    fn commit(&self, ops: &[&Op]) -> Result<(), StoreError> {
        self.writing(|| self.write(ops))
    }

    /// Commits `bytes`, then deletes them in a second commit: redb takes the pages (growing
    /// the file) as a real write of that size would, so a volume still too full fails here
    /// rather than on the next event. (Written and deleted in one transaction, the pages
    /// would never reach the file.)
    fn probe(&self, bytes: usize) -> Result<(), StoreError> {
        let put = |value: Option<&[u8]>| -> Result<(), StoreError> {
            let db = self.db()?;
            let mut txn = db.begin_write().map_err(io)?;
            txn.set_durability(Durability::Immediate).map_err(io)?;
            {
                let mut meta = txn.open_table(META).map_err(io)?;
                match value {
                    Some(v) => meta.insert(PROBE_KEY, v).map(|_| ()),
                    None => meta.remove(PROBE_KEY).map(|_| ()),
                }
                .map_err(io)?;
            }
            txn.commit().map_err(io)
        };
        self.writing(|| put(Some(vec![0xa5u8; bytes].as_slice())).and_then(|()| put(None)))
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        let txn = self.db()?.begin_read().map_err(io)?;
        for row in txn.open_table(PENDING).map_err(io)?.iter().map_err(io)? {
            let (seq, bytes) = row.map_err(io)?;
            loaded.pending.push((seq.value(), bytes.value().to_vec()));
        }
        for row in txn.open_table(DEAD).map_err(io)?.iter().map_err(io)? {
            let (seq, bytes) = row.map_err(io)?;
            loaded.dead.push((seq.value(), bytes.value().to_vec()));
        }
        for row in txn.open_table(PRODUCERS).map_err(io)?.iter().map_err(io)? {
            let (producer, value) = row.map_err(io)?;
            let (event, at) = value.value();
            loaded
                .producers
                .push((producer.value().to_string(), event.to_string(), at));
        }
        for row in txn.open_table(SUBSCRIPTIONS).map_err(io)?.iter().map_err(io)? {
            let (uid, namespace) = row.map_err(io)?;
            loaded
                .subscriptions
                .push((uid.value().to_string(), namespace.value().to_string()));
        }
        for row in txn.open_table(ATTEMPTS).map_err(io)?.iter().map_err(io)? {
            let (key, _) = row.map_err(io)?;
            let (subscription, at) = key.value();
            loaded.attempt_keys.push((subscription.to_string(), at));
        }
        Ok(loaded)
    }

    fn event(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(EVENTS).map_err(io)?;
        Ok(table.get(id).map_err(io)?.map(|v| v.value().to_vec()))
    }

    fn events_by_id(&self, ids: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(EVENTS).map_err(io)?;
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = table.get(id.as_str()).map_err(io)? {
                found.push((id.clone(), v.value().to_vec()));
            }
        }
        Ok(found)
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        txn.open_table(EVENTS).map_err(io)?.len().map_err(io)
    }

    fn deliveries(&self, table: Deliveries, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let t = txn
            .open_table(match table {
                Deliveries::Pending => PENDING,
                Deliveries::Dead => DEAD,
            })
            .map_err(io)?;
        let mut out = Vec::new();
        for seq in seqs {
            if let Some(bytes) = t.get(*seq).map_err(io)? {
                out.push((*seq, bytes.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn raw(&self, sha256: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(RAW).map_err(io)?;
        Ok(table.get(sha256).map_err(io)?.map(|v| {
            let (at, bytes) = v.value();
            (at, bytes.to_vec())
        }))
    }

    fn raw_before(&self, before: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let index = txn.open_table(RAW_BY_AGE).map_err(io)?;
        let mut old = Vec::new();
        for row in index.range((i64::MIN, "")..(before, "")).map_err(io)? {
            let (key, _) = row.map_err(io)?;
            let (at, sha256) = key.value();
            old.push((at, sha256.to_string()));
        }
        Ok(old)
    }

    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let mut txn = self.db()?.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        let key = {
            let mut table = txn.open_table(META).map_err(io)?;
            let existing = table
                .get(name)
                .map_err(io)?
                .and_then(|v| <[u8; 32]>::try_from(v.value()).ok());
            match existing {
                Some(key) => key,
                None => {
                    let key = crate::crypto::random_bytes();
                    table.insert(name, key.as_slice()).map_err(io)?;
                    key
                }
            }
        };
        txn.commit().map_err(io)?;
        Ok(key)
    }

    fn attempts(&self, subscription: &str, from: u64, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(ATTEMPTS).map_err(io)?;
        let mut out = Vec::new();
        for row in table
            .range((subscription, from)..=(subscription, u64::MAX))
            .map_err(io)?
            .rev()
            .take(limit)
        {
            let (_, bytes) = row.map_err(io)?;
            out.push(bytes.value().to_vec());
        }
        Ok(out)
    }

    fn oldest_attempts(&self, subscription: &str, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(ATTEMPTS).map_err(io)?;
        let mut out = Vec::new();
        for row in table
            .range((subscription, 0u64)..=(subscription, u64::MAX))
            .map_err(io)?
            .take(limit)
        {
            let (key, bytes) = row.map_err(io)?;
            out.push((key.value().1, bytes.value().to_vec()));
        }
        Ok(out)
    }

    fn attempts_before(&self, subscription: &str, before: u64) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(ATTEMPTS).map_err(io)?;
        Ok(table
            .range((subscription, 0u64)..(subscription, before))
            .map_err(io)?
            .count() as u64)
    }

    fn disk_bytes(&self) -> Option<u64> {
        let path = self.path.as_ref()?;
        Some(std::fs::metadata(path).map_or(0, |m| m.len()))
    }

    fn volume(&self) -> Option<(u64, u64)> {
        let stat = rustix::fs::statvfs(self.path.as_ref()?).ok()?;
        let block = stat.f_frsize;
        Some((stat.f_blocks.saturating_mul(block), stat.f_bavail.saturating_mul(block)))
    }

    fn release_reserve(&self) -> bool {
        let Some(path) = self.reserve_path() else {
            return false;
        };
        let released = std::fs::remove_file(&path).is_ok();
        if released {
            tracing::warn!(path = %path.display(), "the store's volume is full: released its space reserve so that deliveries can finish");
        }
        released
    }

    fn restore_reserve(&self) -> Result<(), StoreError> {
        use std::io::Write;
        let (Some(path), Some((size, _))) = (self.reserve_path(), self.volume()) else {
            return Ok(());
        };
        let want = (size / 128).clamp(RESERVE_MIN, RESERVE_MAX);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == want) {
            return Ok(());
        }
        // Written out, not a sparse set_len: the blocks must be taken now.
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&path)?;
            let chunk = vec![0u8; 64 << 10];
            let mut left = want;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                file.write_all(chunk.get(..n).unwrap_or_default())?;
                left -= n as u64;
            }
            file.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&path);
            StoreError::Failed(format!(
                "cannot hold the space reserve {} ({want} bytes): {e}",
                path.display()
            ))
        })
    }

    fn rows_scan(&self, from: &[u8], to: &[u8]) -> Result<Vec<StoredRow>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        let mut out = Vec::new();
        for row in table.range(from..to).map_err(io)? {
            let (key, value) = row.map_err(io)?;
            let (at, body) = value.value();
            out.push((key.value().to_vec(), at, body.to_vec()));
        }
        Ok(out)
    }

    fn row_get(&self, key: &[u8]) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        Ok(table.get(key).map_err(io)?.map(|v| {
            let (at, body) = v.value();
            (at, body.to_vec())
        }))
    }

    fn row_groups(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        let mut users = Vec::new();
        // One seek per group: past a group's rows to the next one.
        let mut from: Vec<u8> = Vec::new();
        loop {
            let next = table.range(from.as_slice()..).map_err(io)?.next();
            let Some(row) = next else { break };
            let (key, _) = row.map_err(io)?;
            let key = key.value();
            let user = key.split(|b| *b == 0).next().unwrap_or_default();
            users.push(String::from_utf8_lossy(user).into_owned());
            let mut prefix = user.to_vec();
            prefix.push(0);
            from = prefix_end(&prefix);
        }
        Ok(users)
    }

    fn audit_size(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        meta_u64(&txn.open_table(META).map_err(io)?, AUDIT_SIZE)
    }

    fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(AUDIT_HASHES).map_err(io)?;
        indexes
            .iter()
            .map(|i| Ok(stored_hash(&table, *i)?.map(|h| h.0)))
            .collect()
    }

    fn audit_records(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(AUDIT_RECORDS).map_err(io)?;
        let mut out = Vec::new();
        for row in table.range(from..to).map_err(io)? {
            let (k, v) = row.map_err(io)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn audit_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(AUDIT_CHECKPOINTS).map_err(io)?;
        Ok(match size {
            Some(size) => table.get(size).map_err(io)?.map(|v| (size, v.value().to_vec())),
            None => table.last().map_err(io)?.map(|(k, v)| (k.value(), v.value().to_vec())),
        })
    }

    fn audit_accepted(&self, ids: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(AUDIT_EVENTS).map_err(io)?;
        ids.iter()
            .map(|id| Ok(table.get(id.as_str()).map_err(io)?.map(|v| v.value())))
            .collect()
    }

    fn audit_leaves_of(&self, event_id: &str) -> Result<Vec<u64>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let Some(accepted) = txn
            .open_table(AUDIT_EVENTS)
            .map_err(io)?
            .get(event_id)
            .map_err(io)?
            .map(|v| v.value())
        else {
            return Ok(Vec::new());
        };
        let mut out = vec![accepted];
        let deliveries = txn.open_table(AUDIT_DELIVERIES).map_err(io)?;
        for row in deliveries.range((accepted, 0u64)..=(accepted, u64::MAX)).map_err(io)? {
            out.push(row.map_err(io)?.0.value().1);
        }
        Ok(out)
    }

    fn rows_before(&self, before: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        let mut old = Vec::new();
        for row in table.iter().map_err(io)? {
            let (key, value) = row.map_err(io)?;
            if value.value().0 < before {
                old.push(key.value().to_vec());
            }
        }
        Ok(old)
    }
}

/// A page of a queue: ((due, seq) or (0, seq), stored JSON).
pub(crate) type QueueRow = ((u64, u64), Vec<u8>);

/// A queue's figures as stored: (deliveries queued, bytes of their events, dead letters).
pub(crate) type QueueFigures = (u64, u64, u64);

/// What the paged store (`store::paged`) needs from the database beyond `Engine`: its
/// queues, dead letters, producer ids and figures read a page at a time.
pub trait PagedEngine: Engine {
    /// Up to `limit` queued deliveries of `subscription` after `after`: by seq when
    /// `ordered` (key (0, seq)), else by (due, seq).
    fn queue_page(
        &self,
        subscription: &str,
        ordered: bool,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<QueueRow>, StoreError>;
    /// Dead letters of `subscription` given up in `from..to` (unix nanoseconds): (given up
    /// at, seq, stored JSON), oldest or newest first, at most `limit`.
    fn dead_range(
        &self,
        subscription: &str,
        from: u64,
        to: u64,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError>;
    /// (producer id, event id) of the producer ids known among `ids`.
    fn producers(&self, ids: &[&str]) -> Result<Vec<(String, String)>, StoreError>;
    /// (unix seconds, producer id) of producer ids first seen before `before`, oldest first.
    fn producers_before(&self, before: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError>;
    /// Every subscription's queue figures.
    fn queue_stats(&self) -> Result<Vec<(String, QueueFigures)>, StoreError>;
    /// The next seq to hand out.
    fn next_seq(&self) -> Result<u64, StoreError>;
    /// Every subscription with an attempt log.
    fn attempt_subscriptions(&self) -> Result<Vec<String>, StoreError>;
    /// Subscription UID → namespace, as noted.
    fn namespaces(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Moves what the memory-indexed layout kept into the paged one; returns rows moved.
    fn migrate_legacy(&self) -> Result<u64, StoreError>;
    /// The first queued delivery of `subscription` in the order of acceptance.
    fn queue_head(&self, subscription: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .queue_page(subscription, true, None, 1)?
            .into_iter()
            .next()
            .map(|(_, body)| body))
    }
}

impl PagedEngine for Redb {
    fn queue_page(
        &self,
        subscription: &str,
        ordered: bool,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<QueueRow>, StoreError> {
        Redb::queue_page(self, subscription, ordered, after, limit)
    }
    fn dead_range(
        &self,
        subscription: &str,
        from: u64,
        to: u64,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        Redb::dead_range(self, subscription, from, to, newest_first, limit)
    }
    fn producers(&self, ids: &[&str]) -> Result<Vec<(String, String)>, StoreError> {
        Redb::producers(self, ids)
    }
    fn producers_before(&self, before: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        Redb::producers_before(self, before, limit)
    }
    fn queue_stats(&self) -> Result<Vec<(String, QueueFigures)>, StoreError> {
        Redb::queue_stats(self)
    }
    fn next_seq(&self) -> Result<u64, StoreError> {
        Redb::next_seq(self)
    }
    fn attempt_subscriptions(&self) -> Result<Vec<String>, StoreError> {
        Redb::attempt_subscriptions(self)
    }
    fn namespaces(&self) -> Result<Vec<(String, String)>, StoreError> {
        Redb::namespaces(self)
    }
    fn migrate_legacy(&self) -> Result<u64, StoreError> {
        Redb::migrate_legacy(self)
    }
}

/// The paged store's reads on redb.
impl Redb {
    /// Up to `limit` queued deliveries of `subscription` after `after`: by seq when
    /// `ordered`, else by (due, seq).
    pub(crate) fn queue_page(
        &self,
        subscription: &str,
        ordered: bool,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<QueueRow>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let queue = txn.open_table(QUEUE).map_err(io)?;
        let mut out = Vec::new();
        if ordered {
            let from = after.map_or(0, |a| a.1.saturating_add(1));
            if after.is_some_and(|a| a.1 == u64::MAX) {
                return Ok(out);
            }
            for row in queue
                .range((subscription, from)..=(subscription, u64::MAX))
                .map_err(io)?
                .take(limit)
            {
                let (key, body) = row.map_err(io)?;
                out.push(((0, key.value().1), body.value().to_vec()));
            }
            return Ok(out);
        }
        let due = txn.open_table(QUEUE_DUE).map_err(io)?;
        let range = match after {
            None => due.range((subscription, 0u64, 0u64)..=(subscription, u64::MAX, u64::MAX)),
            Some((d, s)) => {
                // Strictly after (d, s).
                let (d, s) = match s.checked_add(1) {
                    Some(s) => (d, s),
                    None => match d.checked_add(1) {
                        Some(d) => (d, 0),
                        None => return Ok(out),
                    },
                };
                due.range((subscription, d, s)..=(subscription, u64::MAX, u64::MAX))
            }
        }
        .map_err(io)?;
        for row in range.take(limit) {
            let (key, _) = row.map_err(io)?;
            let (_, d, seq) = key.value();
            // An index entry without its row (never written so by this store) reads as an
            // empty body: skipped by the reader, but counted, so a page is never short.
            let body = queue.get((subscription, seq)).map_err(io)?.map(|b| b.value().to_vec());
            out.push(((d, seq), body.unwrap_or_default()));
        }
        Ok(out)
    }

    /// Dead letters of `subscription` given up in `from..to` (unix nanoseconds): (given up
    /// at, seq, stored JSON), oldest first or newest first, at most `limit`.
    pub(crate) fn dead_range(
        &self,
        subscription: &str,
        from: u64,
        to: u64,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let index = txn.open_table(DEAD_BY_TIME).map_err(io)?;
        let dead = txn.open_table(DEAD_QUEUE).map_err(io)?;
        let range = index
            .range((subscription, from, 0u64)..(subscription, to, 0u64))
            .map_err(io)?;
        let keys: Vec<(u64, u64)> = if newest_first {
            range
                .rev()
                .take(limit)
                .map(|r| r.map(|(k, _)| (k.value().1, k.value().2)))
                .collect::<Result<_, _>>()
                .map_err(io)?
        } else {
            range
                .take(limit)
                .map(|r| r.map(|(k, _)| (k.value().1, k.value().2)))
                .collect::<Result<_, _>>()
                .map_err(io)?
        };
        let mut out = Vec::with_capacity(keys.len());
        for (at, seq) in keys {
            if let Some(body) = dead.get((subscription, seq)).map_err(io)? {
                out.push((at, seq, body.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// The event ids of the producer ids known: (producer id, event id).
    pub(crate) fn producers(&self, ids: &[&str]) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(PRODUCERS).map_err(io)?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(v) = table.get(*id).map_err(io)? {
                out.push(((*id).to_string(), v.value().0.to_string()));
            }
        }
        Ok(out)
    }

    /// (unix seconds, producer id) of producer ids first seen before `before`, oldest first.
    pub(crate) fn producers_before(&self, before: i64, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let index = txn.open_table(PRODUCERS_BY_AGE).map_err(io)?;
        let mut out = Vec::new();
        for row in index.range((i64::MIN, "")..(before, "")).map_err(io)?.take(limit) {
            let (key, _) = row.map_err(io)?;
            let (at, id) = key.value();
            out.push((at, id.to_string()));
        }
        Ok(out)
    }

    /// Every subscription's queue figures: (queued, bytes, dead letters).
    pub(crate) fn queue_stats(&self) -> Result<Vec<(String, QueueFigures)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(QUEUE_STATS).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// The next seq to hand out.
    pub(crate) fn next_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let meta = txn.open_table(META).map_err(io)?;
        Ok(meta
            .get(NEXT_SEQ)
            .map_err(io)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Every subscription with an attempt log (one seek per subscription).
    pub(crate) fn attempt_subscriptions(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(ATTEMPTS).map_err(io)?;
        let mut out: Vec<String> = Vec::new();
        let mut from = String::new();
        loop {
            let next = table.range((from.as_str(), 0u64)..).map_err(io)?.next();
            let Some(row) = next else { break };
            let (key, _) = row.map_err(io)?;
            let subscription = key.value().0.to_string();
            // The smallest string after every "subscription…" key is subscription + "\0".
            from = format!("{subscription}\0");
            out.push(subscription);
        }
        Ok(out)
    }

    /// Subscription UID → namespace, as noted.
    pub(crate) fn namespaces(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(SUBSCRIPTIONS).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            out.push((k.value().to_string(), v.value().to_string()));
        }
        Ok(out)
    }

    /// Moves what an older release kept (deliveries and dead letters by seq, producer ids
    /// without their age index) into the paged tables, in one transaction. Returns the
    /// rows moved (0 when there was nothing to move).
    pub(crate) fn migrate_legacy(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        let mut moved = 0u64;
        {
            let mut pending = txn.open_table(PENDING).map_err(io)?;
            let mut dead = txn.open_table(DEAD).map_err(io)?;
            if pending.is_empty().map_err(io)? && dead.is_empty().map_err(io)? {
                let producers = txn.open_table(PRODUCERS).map_err(io)?;
                let by_age = txn.open_table(PRODUCERS_BY_AGE).map_err(io)?;
                if producers.len().map_err(io)? == by_age.len().map_err(io)? {
                    return Ok(0);
                }
            }
            let mut queue = txn.open_table(QUEUE).map_err(io)?;
            let mut due = txn.open_table(QUEUE_DUE).map_err(io)?;
            let mut dead_queue = txn.open_table(DEAD_QUEUE).map_err(io)?;
            let mut dead_by_time = txn.open_table(DEAD_BY_TIME).map_err(io)?;
            let mut refs = txn.open_table(EVENT_REFS).map_err(io)?;
            let mut stats_table = txn.open_table(QUEUE_STATS).map_err(io)?;
            let mut stats: std::collections::HashMap<String, (u64, u64, u64)> = std::collections::HashMap::new();
            let mut counts: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
            let mut next = 0u64;
            let mut kept = std::collections::HashSet::new();
            for (is_dead, table) in [(false, &mut pending), (true, &mut dead)] {
                for row in table.iter().map_err(io)? {
                    let (seq, body) = row.map_err(io)?;
                    let seq = seq.value();
                    let Ok(stored) = serde_json::from_slice::<super::schema::StoredDelivery>(body.value()) else {
                        tracing::error!(seq, "a stored delivery does not parse; it is left where it is");
                        kept.insert(seq);
                        continue;
                    };
                    next = next.max(seq + 1);
                    *counts.entry(stored.event_id.clone()).or_default() += 1;
                    let sub = stored.subscription.as_str();
                    let s = stats.entry(stored.subscription.clone()).or_default();
                    if is_dead {
                        let at = super::schema::nanos(stored.dead_at.unwrap_or(stored.not_before));
                        dead_queue.insert((sub, seq), body.value()).map_err(io)?;
                        dead_by_time.insert((sub, at, seq), ()).map_err(io)?;
                        s.2 += 1;
                    } else {
                        queue.insert((sub, seq), body.value()).map_err(io)?;
                        due.insert((sub, super::schema::nanos(stored.not_before), seq), ())
                            .map_err(io)?;
                        s.0 += 1;
                    }
                    moved += 1;
                }
                table.retain(|seq, _| kept.contains(&seq)).map_err(io)?;
            }
            for (id, n) in counts {
                let old = refs.get(id.as_str()).map_err(io)?.map_or(0, |v| v.value());
                refs.insert(id.as_str(), old + n).map_err(io)?;
            }
            for (sub, (q, b, d)) in stats {
                let (oq, ob, od) = stats_table
                    .get(sub.as_str())
                    .map_err(io)?
                    .map_or((0, 0, 0), |v| v.value());
                stats_table.insert(sub.as_str(), (oq + q, ob + b, od + d)).map_err(io)?;
            }
            let producers = txn.open_table(PRODUCERS).map_err(io)?;
            let mut by_age = txn.open_table(PRODUCERS_BY_AGE).map_err(io)?;
            for row in producers.iter().map_err(io)? {
                let (p, v) = row.map_err(io)?;
                by_age.insert((v.value().1, p.value()), ()).map_err(io)?;
            }
            let mut meta = txn.open_table(META).map_err(io)?;
            let stored = meta
                .get(NEXT_SEQ)
                .map_err(io)?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map_or(0, u64::from_be_bytes);
            if next > stored {
                meta.insert(NEXT_SEQ, next.to_be_bytes().as_slice()).map_err(io)?;
            }
        }
        txn.commit().map_err(io)?;
        Ok(moved)
    }
}
