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
    /// Deletes the subscription's attempts up to the key given, but those of the keys
    /// listed (what a LegalHold keeps): the range a purge read and judged.
    TrimAttemptsThrough(String, u64, Vec<u64>),
    DeleteAttemptsOf(String),
    PutRaw(String, i64, Vec<u8>),
    /// (archived at, SHA-256).
    DeleteRaw(i64, String),
    PutSubscription(String, String),
    DeleteSubscription(String),
    /// A keyed row (`store::rows`): (stored key, group, unix seconds written, body).
    PutRow(Vec<u8>, String, i64, Vec<u8>),
    DeleteRow(Vec<u8>),
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
    /// A leaf appended to the audit log, in commit order (`audit`).
    Audit(Box<crate::audit::Leaf>),
    /// A signed checkpoint of the audit log: (tree size, note); kept when one exists.
    AuditCheckpoint(u64, Vec<u8>),
}

impl Op {
    /// Whether it stores something new (an event, a raw message, an index entry): what a
    /// full volume refuses, while deletes and the writes of deliveries go on.
    fn adds_data(&self) -> bool {
        matches!(
            self,
            Op::PutEvent(..)
                | Op::PutCountedEvent(..)
                | Op::Ingest(_)
                | Op::PutRaw(..)
                | Op::PutRow(..)
                | Op::PutClaimed(..)
                | Op::PutProducer(..)
                | Op::PutAgedProducer(..)
                | Op::Audit(_)
                | Op::AuditCheckpoint(..)
        )
    }

    /// About how many bytes it writes: what a probe must be able to write before the store
    /// counts as back after a failed commit.
    fn weight(&self) -> usize {
        match self {
            Op::PutEvent(id, b) | Op::PutCountedEvent(id, b, _) => id.len() + b.len(),
            Op::PutPending(_, b) | Op::PutDead(_, b) | Op::PutClaimed(_, _, _, b) => 8 + b.len(),
            Op::PutAttempt(s, _, b) | Op::PutRaw(s, _, b) | Op::Bury(s, _, _, b) => s.len() + 16 + b.len(),
            Op::PutRow(k, u, _, b) => k.len() + u.len() + b.len(),
            Op::Enqueue(q) => q.subscription.len() + q.body.len() + 32,
            Op::Audit(leaf) => leaf.bytes.len() + 96,
            Op::Ingest(_) | Op::Fenced(..) => 1024,
            _ => 64,
        }
    }
}

/// Fewest bytes a probe writes: a write of one page would pass where a real batch fails.
const PROBE_MIN_BYTES: usize = 64 << 10;

/// Most bytes a probe writes (a failed batch can hold a 256 MiB message's events).
const PROBE_MAX_BYTES: usize = 8 << 20;

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

/// Why the store refuses new events right now (None: it takes them). Set by the commit
/// thread: `failing` on a failed commit, cleared by the next one that succeeds; `full`
/// while the volume has no room for new events, though writes memory shows may still go
/// through (into pages the file already holds), so deliveries keep draining.
#[derive(Default)]
pub(crate) struct Outage {
    failing: Mutex<Option<String>>,
    full: Mutex<Option<String>>,
}

impl Outage {
    /// Why new events are refused: commits fail, or the volume is full.
    pub(crate) fn reason(&self) -> Option<String> {
        self.failing.lock().clone().or_else(|| self.full.lock().clone())
    }

    /// Why commits fail, if they do: deliveries pause (a completion would not be durable).
    pub(crate) fn failing(&self) -> Option<String> {
        self.failing.lock().clone()
    }
}

/// How long new events stay refused after a commit failed for want of space when the
/// volume has not grown meanwhile: then the reserve is taken again and a probe tries, so
/// space freed on the volume by other means is noticed. (Each failed write costs a reopen
/// of the file.)
const FULL_RETRY: Duration = Duration::from_secs(30);

/// A commit failed for want of space. Writes into pages the file already holds may still
/// go through, so a probe alone would say "back" while every new event fails again, and
/// the store would flap between up and down on a volume that stays full.
struct Full {
    /// Bytes free on the volume then (None: the backend does not say).
    available: Option<u64>,
    /// About what the failed write needed.
    needed: u64,
    since: Instant,
}

impl Full {
    fn new(engine: &dyn Engine, needed: usize) -> Full {
        Full {
            available: engine.volume().map(|(_, available)| available),
            needed: needed as u64,
            since: Instant::now(),
        }
    }

    /// Ok once new events may be tried again: the volume has `needed` more bytes free than
    /// when the write failed, or `FULL_RETRY` has passed. Otherwise why not, worded as the
    /// out-of-space error it is (ingest answers 507 / SMTP 452 on it).
    fn room(&self, volume: Option<(u64, u64)>) -> Result<(), String> {
        let waited = self.since.elapsed();
        if waited >= FULL_RETRY {
            return Ok(());
        }
        let again = FULL_RETRY.saturating_sub(waited).as_secs().max(1);
        match (self.available, volume) {
            (Some(then), Some((_, now))) if now >= then.saturating_add(self.needed) => Ok(()),
            (_, Some((_, now))) => Err(format!(
                "No space left on device: {now} bytes free on the store's volume; new events are \
                 taken again once ~{} bytes more are free (grow the volume), or tried again in {again} s",
                self.needed
            )),
            (_, None) => Err(format!(
                "No space left on device: new events are tried again in {again} s"
            )),
        }
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
    // How much the failed commit wrote: with nothing owed, a probe of that size says
    // whether the store is back (an empty commit succeeds on a volume that is still full).
    let mut probe_bytes = PROBE_MIN_BYTES;
    let mut full: Option<Full> = None;
    if let Err(err) = engine.restore_reserve() {
        tracing::warn!(%err, "the store's volume has no room for its space reserve: a full volume may stop deliveries too");
    }
    loop {
        let mut jobs = std::mem::take(&mut owed);
        let failing = outage.failing().is_some();
        if jobs.is_empty() && !failing {
            // While the volume is full, wake every second to see whether it has room.
            let job = match full {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(_) => rx.recv_timeout(RETRY_MAX),
            };
            match job {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else if failing {
            // Down: wait out the pause, taking what comes meanwhile; then try again (with
            // nothing owed, a probe finds out whether the store is back).
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
        // A full volume: new events wait until it has room (and a write of the size that
        // failed goes through); writes memory shows go on.
        if let Some(f) = &full
            && !failing
        {
            // Err((why, whether a probe failed)).
            let verdict = match f.room(engine.volume()) {
                Err(why) => Err((why, false)),
                // The reserve first: new events only once deliveries have room again.
                Ok(()) => engine
                    .restore_reserve()
                    .and_then(|()| engine.probe(probe_bytes))
                    .map_err(|e| {
                        failures.fetch_add(1, Ordering::Relaxed);
                        (e.to_string(), true)
                    }),
            };
            match verdict {
                Ok(()) => {
                    full = None;
                    probe_bytes = PROBE_MIN_BYTES;
                    *outage.full.lock() = None;
                    tracing::info!("the store's volume has room again: new events are taken");
                }
                Err((why, probed)) => {
                    if probed {
                        // Room was expected and the probe failed: the reserve goes back to
                        // the deliveries, and the wait for room starts again from here.
                        engine.release_reserve();
                        full = Some(Full::new(engine, probe_bytes));
                    }
                    *outage.full.lock() = Some(why.clone());
                    // New events are refused; writes memory shows, purges (they free
                    // space) and barriers (a flush: no writes of its own) go on.
                    jobs.retain_mut(|job| {
                        let refused = !job.kept && job.ops.iter().any(Op::adds_data);
                        if refused {
                            std::mem::replace(&mut job.done, Reply::None).send(Err(why.clone()));
                        }
                        !refused
                    });
                }
            }
        }
        let ops: Vec<&Op> = jobs.iter().flat_map(|j| &j.ops).collect();
        let result = if ops.is_empty() && failing {
            // While the volume is full, only whether writes memory shows go through: the
            // size new events need is the full check's.
            engine.probe(if full.is_some() { PROBE_MIN_BYTES } else { probe_bytes })
        } else if jobs.is_empty() {
            // Woken to look at a full volume, with nothing to write.
            if closed {
                return;
            }
            continue;
        } else {
            engine.commit(&ops)
        };
        match result {
            Ok(()) => {
                if outage.failing.lock().take().is_some() {
                    tracing::info!("the store commits again; the writes kept meanwhile are on disk");
                }
                if full.is_none() {
                    probe_bytes = PROBE_MIN_BYTES;
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
                let weight: usize = ops.iter().map(|op| op.weight()).sum();
                // Twice: a B-tree write takes more pages than its payload.
                probe_bytes = probe_bytes.max(weight.saturating_mul(2).min(PROBE_MAX_BYTES));
                if crate::store::out_of_space(&err) {
                    // Room for deliveries to finish; new events wait (the volume's free
                    // space now counts the reserve, so `Full` asks for more than that).
                    engine.release_reserve();
                    if full.is_none() {
                        full = Some(Full::new(engine, probe_bytes));
                        *outage.full.lock() = Some(err.clone());
                    }
                }
                let first = outage.failing.lock().replace(err.clone()).is_none();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_volume_takes_new_events_again_once_grown_or_after_a_while() {
        let full = Full {
            available: Some(1_000),
            needed: 500_000,
            since: Instant::now(),
        };
        let why = full.room(Some((4 << 20, 1_000))).expect_err("still full");
        assert!(crate::store::out_of_space(&why), "answered as a full volume: {why}");
        assert!(why.contains("grow the volume"), "{why}");
        assert!(full.room(Some((4 << 20, 400_000))).is_err(), "not enough freed yet");
        assert!(full.room(Some((256 << 20, 250 << 20))).is_ok(), "grown");
        assert!(full.room(None).is_err(), "no figure: wait out the retry");
        let old = Full {
            since: Instant::now().checked_sub(FULL_RETRY).expect("clock"),
            ..full
        };
        assert!(old.room(Some((4 << 20, 0))).is_ok(), "tried again after FULL_RETRY");
    }
}
