//! The group-commit thread: the disk writes (`Op`) it applies and the loop that takes
//! every write waiting at that moment into one transaction and one fsync. Depends only
//! on `engine`; knows nothing of the in-memory state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

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
    /// Mailbox index entry: (key, user, unix seconds indexed, body).
    PutIndex(Vec<u8>, String, i64, Vec<u8>),
    DeleteIndex(Vec<u8>),
    // Shared mode only (PostgreSQL, several replicas): see `store::durable::shared`.
    /// New events and their deliveries: producer ids de-duplicated by the database, seqs
    /// from its sequence; the outcome is left in the op's slot once committed.
    Ingest(Box<super::shared::IngestBatch>),
    /// A write to a delivery this replica loaded under `epoch`; the database drops it when
    /// the row was claimed since by another owner.
    Fenced(u64, u64, super::shared::Fenced),
    /// A delivery put back as waiting on `shard`, already claimed under `epoch` (a replay).
    PutClaimed(u64, u64, u32, Vec<u8>),
    /// A dead letter deleted, in order with the shared writes to the same delivery.
    DropDead(u64),
    /// Deletes the event unless a delivery or dead letter still refers to it.
    DeleteEventIfUnused(String),
    /// Every delivery and dead letter of a subscription, on any replica.
    DeleteDeliveriesOf(String),
    // The paged store's writes (`store::paged`, on redb): queues and dead letters kept by
    // subscription, events counted by what refers to them.
    /// An event and how many deliveries refer to it.
    PutCountedEvent(String, Vec<u8>, u32),
    /// One delivery or dead letter of the event is gone: the event goes with the last.
    ReleaseEvent(String),
    /// A delivery queued, or queued again (`old_due`: where it was).
    Enqueue(Box<Queued>),
    /// A queued delivery gone (delivered, moved to the dead letters).
    Dequeue {
        subscription: String,
        seq: u64,
        due: u64,
    },
    /// A dead letter: (subscription, seq, given up at in unix nanoseconds, stored JSON).
    Bury(String, u64, u64, Vec<u8>),
    /// A dead letter gone (replayed or purged): (subscription, seq, given up at).
    Unbury(String, u64, u64),
    /// Changes a subscription's queue figures: (queued, bytes, dead letters).
    Stats(String, i64, i64, i64),
    /// Every queued delivery, dead letter and figure of a subscription, their events released.
    ForgetQueue(String),
    /// A producer id with its age index: (producer id, event id, unix seconds).
    PutAgedProducer(String, String, i64),
    /// A producer id and its age index entry: (producer id, unix seconds).
    DeleteAgedProducer(String, i64),
    /// The next seq to hand out, when higher than the stored one.
    NextSeq(u64),
}

/// A delivery queued by the paged store.
pub struct Queued {
    pub subscription: String,
    pub seq: u64,
    /// Due time, unix nanoseconds.
    pub due: u64,
    pub old_due: Option<u64>,
    pub body: Vec<u8>,
}

/// Who hears that a job's commit finished.
pub(crate) enum Reply {
    None,
    Blocking(SyncSender<Result<(), String>>),
    Async(tokio::sync::oneshot::Sender<Result<(), String>>),
}

impl Reply {
    fn send(self, result: Result<(), String>) {
        match self {
            Reply::None => {}
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

pub(crate) struct Job {
    pub(crate) ops: Vec<Op>,
    pub(crate) done: Reply,
    /// Memory already shows these writes (a completion, a retry, a purge): they must reach
    /// disk, so a failed commit keeps them and tries again, in order, before anything newer.
    /// Otherwise (an ingest, a replay) the caller changes memory only once told it worked:
    /// a failed commit answers it and drops the writes.
    pub(crate) kept: bool,
    /// Its place in the order of writes (0: nobody counts it); `commit_loop` publishes the
    /// newest committed one.
    pub(crate) generation: u64,
}

/// Why the store cannot commit right now (None: it can). Set by the commit thread on a
/// failed commit, cleared by the next one that succeeds.
#[derive(Default)]
pub(crate) struct Outage(Mutex<Option<String>>);

impl Outage {
    pub(crate) fn reason(&self) -> Option<String> {
        self.0.lock().clone()
    }
}

/// The first pause between two tries of writes that are owed, doubled up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Runs until every sender is gone, counting failed commits in `failures`. While commits
/// fail (the database is down, the disk full), writes that memory shows are kept and tried
/// again every second at most, and writes whose callers wait to change memory are refused
/// at once — the caller answers 503 rather than hang.
pub(crate) fn commit_loop(
    engine: &dyn Engine,
    rx: &Receiver<Job>,
    failures: &AtomicU64,
    outage: &Outage,
    committed: &AtomicU64,
) {
    let mut owed: Vec<Job> = Vec::new();
    let mut pause = RETRY_MIN;
    let mut closed = false;
    loop {
        let mut jobs = std::mem::take(&mut owed);
        if jobs.is_empty() && outage.reason().is_none() {
            match rx.recv() {
                Ok(job) => jobs.push(job),
                Err(_) => return,
            }
        } else {
            // Down: wait out the pause, taking what comes meanwhile; then try again (with
            // nothing owed, an empty commit finds out whether the store is back).
            let until = Instant::now() + pause;
            while !closed {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(job) if job.kept => jobs.push(job),
                    Ok(job) => job
                        .done
                        .send(Err(outage.reason().unwrap_or_else(|| "the store is down".into()))),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => closed = true,
                }
            }
        }
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let ops: Vec<&Op> = jobs.iter().flat_map(|j| &j.ops).collect();
        match engine.commit(&ops) {
            Ok(()) => {
                if outage.0.lock().take().is_some() {
                    tracing::info!("the store commits again; the writes kept meanwhile are on disk");
                }
                pause = RETRY_MIN;
                if let Some(newest) = jobs.iter().map(|j| j.generation).max() {
                    committed.fetch_max(newest, Ordering::AcqRel);
                }
                for job in jobs {
                    job.done.send(Ok(()));
                }
                if closed {
                    return;
                }
            }
            Err(err) => {
                let err = err.to_string();
                failures.fetch_add(1, Ordering::Relaxed);
                let first = outage.0.lock().replace(err.clone()).is_none();
                if first {
                    tracing::error!(%err, "store commit failed; new events are refused until it commits again");
                } else {
                    tracing::debug!(%err, "store commit failed again");
                }
                pause = if first { RETRY_MIN } else { (pause * 2).min(RETRY_MAX) };
                for mut job in jobs {
                    if !job.kept {
                        job.done.send(Err(err.clone()));
                        continue;
                    }
                    // A blocked caller is told now (and must not hang); a completion waits
                    // for the commit that makes it durable.
                    if matches!(job.done, Reply::Blocking(_)) {
                        std::mem::replace(&mut job.done, Reply::None).send(Err(format!(
                            "{err} (kept in memory; written when the store commits again)"
                        )));
                    }
                    owed.push(job);
                }
                if closed {
                    let lost: usize = owed.iter().map(|j| j.ops.len()).sum();
                    tracing::error!(
                        %err, writes = lost,
                        "the store closed while commits fail: writes kept in memory are not on disk; \
                         the next start redoes them from the last commit (some deliveries are made again)"
                    );
                    for job in owed {
                        job.done.send(Err(err.clone()));
                    }
                    return;
                }
            }
        }
    }
}
