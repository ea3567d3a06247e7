//! The group-commit thread: the disk writes (`Op`) it applies and the loop that takes
//! every write waiting at that moment into one transaction and one fsync. Depends only
//! on `schema`; knows nothing of the in-memory state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use redb::{Database, Durability};

use super::schema::{ATTEMPTS, DEAD, EVENTS, PENDING, PRODUCERS, RAW, RAW_BY_AGE, SUBSCRIPTIONS, io};
use crate::store::StoreError;

/// Most writes one transaction takes; keeps a commit's latency bounded under load.
const MAX_JOBS_PER_COMMIT: usize = 4096;

pub(super) enum Op {
    PutEvent(String, Vec<u8>),
    DeleteEvent(String),
    PutProducer(String, String, i64),
    DeleteProducer(String),
    PutPending(u64, Vec<u8>),
    DeletePending(u64),
    PutDead(u64, Vec<u8>),
    DeleteDead(u64),
    PutAttempt(String, u64, Vec<u8>),
    /// Deletes the subscription's oldest `n` attempts.
    TrimAttempts(String, u64),
    DeleteAttemptsOf(String),
    PutRaw(String, i64, Vec<u8>),
    /// (archived at, SHA-256).
    DeleteRaw(i64, String),
    PutSubscription(String, String),
    DeleteSubscription(String),
}

/// Who hears that a job's commit finished.
pub(super) enum Reply {
    None,
    Blocking(SyncSender<Result<(), String>>),
    Async(tokio::sync::oneshot::Sender<Result<(), String>>),
}

pub(super) struct Job {
    pub(super) ops: Vec<Op>,
    pub(super) done: Reply,
}

/// Runs until every sender is gone, counting failed commits in `failures`.
pub(super) fn commit_loop(db: &Database, rx: &Receiver<Job>, failures: &AtomicU64) {
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
            failures.fetch_add(1, Ordering::Relaxed);
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
        let mut producers = txn.open_table(PRODUCERS).map_err(io)?;
        let mut pending = txn.open_table(PENDING).map_err(io)?;
        let mut dead = txn.open_table(DEAD).map_err(io)?;
        let mut attempts = txn.open_table(ATTEMPTS).map_err(io)?;
        let mut raw = txn.open_table(RAW).map_err(io)?;
        let mut raw_by_age = txn.open_table(RAW_BY_AGE).map_err(io)?;
        let mut subscriptions = txn.open_table(SUBSCRIPTIONS).map_err(io)?;
        for op in jobs.iter().flat_map(|j| &j.ops) {
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
            }
        }
    }
    txn.commit().map_err(io)
}
