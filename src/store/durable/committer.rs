//! The group-commit thread: the disk writes (`Op`) it applies and the loop that takes
//! every write waiting at that moment into one transaction and one fsync. Depends only
//! on `engine`; knows nothing of the in-memory state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use super::engine::Engine;

/// Most writes one transaction takes; keeps a commit's latency bounded under load.
const MAX_JOBS_PER_COMMIT: usize = 4096;

pub enum Op {
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
pub(super) fn commit_loop(engine: &dyn Engine, rx: &Receiver<Job>, failures: &AtomicU64) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let ops: Vec<&Op> = jobs.iter().flat_map(|j| &j.ops).collect();
        let result = engine.commit(&ops).map_err(|e| e.to_string());
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
