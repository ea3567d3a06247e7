//! What the durable store needs from the database under it: apply one group commit's
//! writes in one durable transaction, load what the in-memory index is rebuilt from, and
//! a few reads. `Redb` is the embedded engine; `store::postgres::Postgres` the shared one.
//! Depends on `schema` (redb's layout) and `committer::Op` only.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::committer::Op;
use super::schema::{
    ATTEMPTS, DEAD, EVENTS, MAILBOX_INDEX, META, PENDING, PRODUCERS, RAW, RAW_BY_AGE, SUBSCRIPTIONS, io,
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

/// A mailbox index entry: (key, unix seconds indexed, body).
pub type IndexRow = (Vec<u8>, i64, Vec<u8>);

pub trait Engine: Send + Sync + 'static {
    /// Applies `ops`, in order, in one durable transaction.
    fn commit(&self, ops: &[&Op]) -> Result<(), StoreError>;
    fn load(&self) -> Result<Loaded, StoreError>;
    /// An event's JSON.
    fn event(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
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
    /// Bytes the data occupies, when it can tell.
    fn disk_bytes(&self) -> Option<u64>;
    /// The store's volume: (size, bytes available), for backends on a local volume.
    fn volume(&self) -> Option<(u64, u64)> {
        None
    }
    /// Mailbox index entries whose key starts with `prefix` (which ends in a NUL, see
    /// `store::index_key`): (key, unix seconds indexed, body), in key order.
    fn index_scan(&self, prefix: &[u8]) -> Result<Vec<IndexRow>, StoreError>;
    /// One mailbox index entry's body.
    fn index_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every user with a mailbox index entry.
    fn index_users(&self) -> Result<Vec<String>, StoreError>;
    /// Keys of mailbox index entries indexed before `before` (unix seconds).
    fn index_before(&self, before: i64) -> Result<Vec<Vec<u8>>, StoreError>;
}

/// The keys that start with `prefix`, when it ends in a NUL: from the prefix up to the
/// same bytes with the NUL raised to 1.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    match end.last_mut() {
        Some(last) => *last = last.saturating_add(1),
        None => end.push(0xff),
    }
    end
}

/// redb's page cache. Its default (1 GiB) let the operator's memory grow with the store
/// file, i.e. with the backlog; the OS page cache keeps recently used pages anyway.
pub(super) const REDB_CACHE_BYTES: usize = 32 << 20;

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

impl Redb {
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
            .map_err(|_| StoreError::Io("the store file is being opened again".into()))
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
                .set_cache_size(REDB_CACHE_BYTES)
                .create(path)
                .map_err(io)?,
        );
        self.broken.store(false, std::sync::atomic::Ordering::Release);
        tracing::info!(path = %path.display(), "store file opened again after a failed write");
        Ok(())
    }

    fn write(&self, ops: &[&Op]) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(io)?;

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
                        raw.remove(sha256.as_str()).map_err(io)?;
                        raw_by_age.remove((*at, sha256.as_str())).map_err(io)?;
                    }
                    Op::PutSubscription(uid, namespace) => {
                        subscriptions.insert(uid.as_str(), namespace.as_str()).map_err(io)?;
                    }
                    Op::DeleteSubscription(uid) => {
                        subscriptions.remove(uid.as_str()).map_err(io)?;
                    }
                    Op::PutIndex(key, _, at, body) => {
                        index.insert(key.as_slice(), (*at, body.as_slice())).map_err(io)?;
                    }
                    Op::DeleteIndex(key) => {
                        index.remove(key.as_slice()).map_err(io)?;
                    }
                    Op::Ingest(_)
                    | Op::Fenced(..)
                    | Op::PutClaimed(..)
                    | Op::DeleteEventIfUnused(_)
                    | Op::DropDead(_)
                    | Op::DeleteDeliveriesOf(_) => {
                        return Err(StoreError::Io(
                            "a shared-store write reached the embedded store (a bug)".into(),
                        ));
                    }
                }
            }
        }
        txn.commit().map_err(io)
    }
}

impl Engine for Redb {
    fn commit(&self, ops: &[&Op]) -> Result<(), StoreError> {
        if self.broken.load(std::sync::atomic::Ordering::Acquire) {
            self.reopen()?;
        }
        let result = self.write(ops);
        if result.is_err() {
            self.broken.store(true, std::sync::atomic::Ordering::Release);
        }
        result
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

    fn index_scan(&self, prefix: &[u8]) -> Result<Vec<IndexRow>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        for row in table.range(prefix..end.as_slice()).map_err(io)? {
            let (key, value) = row.map_err(io)?;
            let (at, body) = value.value();
            out.push((key.value().to_vec(), at, body.to_vec()));
        }
        Ok(out)
    }

    fn index_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        Ok(table.get(key).map_err(io)?.map(|v| v.value().1.to_vec()))
    }

    fn index_users(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db()?.begin_read().map_err(io)?;
        let table = txn.open_table(MAILBOX_INDEX).map_err(io)?;
        let mut users = Vec::new();
        // One seek per user: past a user's entries to the next one.
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

    fn index_before(&self, before: i64) -> Result<Vec<Vec<u8>>, StoreError> {
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
