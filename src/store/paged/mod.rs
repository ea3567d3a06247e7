//! The embedded store with its queues on disk: each subscription's deliveries and dead
//! letters are key ranges of redb tables, and memory keeps only a bounded window of each
//! queue (`window`), the deliveries in flight, and per-subscription figures. Memory does
//! not grow with the backlog, and a start reads each queue's head only when its shard
//! first asks for work.
//!
//! Writes go through the same group-commit thread as the durable store (`durable::
//! committer`); every write carries a generation, and the thread publishes the newest one
//! committed, so a read of the disk knows which of memory's changes it may not show yet.
//! Producer ids and event references live on disk too (one read per ingested producer id).

pub mod window;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel, sync_channel};

use parking_lot::Mutex;
use redb::Database;
use redb::backends::InMemoryBackend;

use self::window::{Key, Queued, Window, nanos};
use super::durable::committer::{self, Job, Op, Outage, Reply, commit_loop};
use super::durable::engine::{Engine, PagedEngine, Redb, redb_cache_bytes};
use super::durable::schema::{StoredDelivery, create_tables, io, json};
use super::{
    Appended, Archive, Attempt, Backend, BacklogCap, DeadLetter, Durable, EventLog, History, Holds, Ingest,
    PendingDelivery, Purged, Queue, QueueCounts, RawMessage, Retention, RowWrite, StoreError,
};
use crate::event::MailboxEvent;

/// Most rows one call of a sweep (expiry, purge, replay) handles; the next call goes on.
const SWEEP: usize = 10_000;

/// How long a queue's oldest acceptance time is reused before it is read again.
const OLDEST_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Per-subscription figures, as on disk (`QUEUE_STATS`) plus what memory counts.
#[derive(Default, Clone, Copy)]
struct Figures {
    queued: u64,
    bytes: u64,
    dead: u64,
    overflowed: u64,
    /// (read at, oldest accepted).
    oldest: Option<(std::time::Instant, Option<jiff::Timestamp>)>,
    /// Bumped whenever `oldest` is dropped: a head read outside the lock is kept only if
    /// nothing dropped it meanwhile.
    oldest_version: u64,
}

impl Figures {
    /// The queue's head may have changed: read it again when asked.
    fn head_changed(&mut self) {
        self.oldest = None;
        self.oldest_version = self.oldest_version.wrapping_add(1);
    }
}

#[derive(Default)]
struct State {
    windows: HashMap<String, Window>,
    figures: HashMap<String, Figures>,
    caps: HashMap<String, BacklogCap>,
    namespaces: HashMap<String, String>,
    cache: HashMap<String, Arc<MailboxEvent>>,
    cache_order: VecDeque<String>,
    /// Producer ids of ingests not committed yet → their event id.
    claiming: HashMap<String, String>,
    /// Seqs an ingest or replay is writing: a read of the disk leaves them to it (it puts
    /// them in the window once committed).
    incoming: HashSet<u64>,
    next_seq: u64,
    last_attempt_key: u64,
    /// Subscriptions forgotten so far: a read planned before one may not go into a
    /// window made after it.
    forgotten: u64,
}

impl State {
    fn cache(&mut self, event: Arc<MailboxEvent>) {
        if self.cache.contains_key(&event.id) {
            return;
        }
        while self.cache.len() >= super::event_cache() {
            let Some(old) = self.cache_order.pop_front() else { break };
            self.cache.remove(&old);
        }
        self.cache_order.push_back(event.id.clone());
        self.cache.insert(event.id.clone(), event);
    }

    fn attempt_key(&mut self, at: jiff::Timestamp) -> u64 {
        self.last_attempt_key = nanos(at).max(self.last_attempt_key + 1);
        self.last_attempt_key
    }
}

pub struct PagedStore {
    engine: Arc<dyn PagedEngine>,
    state: Mutex<State>,
    outage: Arc<Outage>,
    writer: Mutex<Option<(Sender<Job>, u64)>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    commit_failures: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    /// Queued deliveries read from the disk since start.
    rows_read: AtomicU64,
    /// Replays, purges and expiries of dead letters and queues run one at a time: each
    /// reads rows and then changes them.
    sweeps: Mutex<()>,
}

impl Drop for PagedStore {
    fn drop(&mut self) {
        self.writer.lock().take();
        if let Some(handle) = self.committer.lock().take() {
            let _ = handle.join();
        }
    }
}

impl PagedStore {
    /// Opens (or creates) the store in `dir`. What an older release kept in memory-indexed
    /// tables is moved into the paged ones first (once).
    pub fn open(dir: &Path) -> Result<PagedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("mailhook.redb");
        let db = Database::builder()
            .set_cache_size(redb_cache_bytes())
            .create(&path)
            .map_err(io)?;
        PagedStore::start(db, Some(path))
    }

    /// A store in memory only: lost when the process ends.
    pub fn in_memory() -> Result<PagedStore, StoreError> {
        let db = Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .map_err(io)?;
        PagedStore::start(db, None)
    }

    fn start(db: Database, path: Option<std::path::PathBuf>) -> Result<PagedStore, StoreError> {
        create_tables(&db)?;
        PagedStore::on(Arc::new(Redb::new(db, path)))
    }

    /// The store on `engine` (redb, or a PostgreSQL database one operator owns).
    pub fn on(engine: Arc<dyn PagedEngine>) -> Result<PagedStore, StoreError> {
        let moved = engine.migrate_legacy()?;
        if moved > 0 {
            tracing::info!(
                rows = moved,
                "moved the queues of an older release into the paged tables"
            );
        }
        let mut state = State {
            next_seq: engine.next_seq()?,
            ..State::default()
        };
        for (uid, (queued, bytes, dead)) in engine.queue_stats()? {
            state.figures.insert(
                uid,
                Figures {
                    queued,
                    bytes,
                    dead,
                    ..Figures::default()
                },
            );
        }
        state.namespaces = engine.namespaces()?.into_iter().collect();
        let (tx, rx) = channel();
        let commit_failures = Arc::new(AtomicU64::new(0));
        let committed = Arc::new(AtomicU64::new(0));
        let outage = Arc::new(Outage::default());
        let (failures, down, done, writer_db) = (
            commit_failures.clone(),
            outage.clone(),
            committed.clone(),
            engine.clone(),
        );
        let committer = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || {
                let engine: &dyn Engine = writer_db.as_ref();
                commit_loop(engine, &rx, &failures, &down, &done)
            })
            .map_err(io)?;
        Ok(PagedStore {
            engine,
            state: Mutex::new(state),
            outage,
            writer: Mutex::new(Some((tx, 0))),
            committer: Mutex::new(Some(committer)),
            commit_failures,
            committed,
            rows_read: AtomicU64::new(0),
            sweeps: Mutex::new(()),
        })
    }

    /// Queued deliveries read from the disk since start (a start reads queue heads only).
    pub fn rows_read(&self) -> u64 {
        self.rows_read.load(Ordering::Relaxed)
    }

    /// Queues `ops` for the commit thread; returns the write's generation.
    fn submit(&self, ops: Vec<Op>, done: Reply, kept: bool) -> Result<u64, StoreError> {
        let mut writer = self.writer.lock();
        let (tx, last) = writer
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        *last += 1;
        let generation = *last;
        tx.send(Job {
            ops,
            done,
            kept,
            generation,
        })
        .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))?;
        Ok(generation)
    }

    /// Blocks until `ops` are committed (`kept`: memory shows them already).
    fn wait_for(&self, ops: Vec<Op>, kept: bool) -> Result<(), StoreError> {
        let (tx, rx) = sync_channel(1);
        self.submit(ops, Reply::Blocking(tx), kept)?;
        rx.recv()
            .map_err(|_| StoreError::Unavailable("the store's commit thread stopped".into()))?
            .map_err(StoreError::Failed)
    }

    /// Waits until every write queued so far is committed, when one is not yet.
    fn settle(&self) -> Result<(), StoreError> {
        let last = self.writer.lock().as_ref().map_or(0, |(_, last)| *last);
        if self.committed() >= last {
            return Ok(());
        }
        self.wait_for(Vec::new(), false)
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// The page reader a window uses.
    fn page<'a>(&'a self, subscription: &'a str) -> impl FnMut(bool, Option<Key>, usize) -> window::PageRows + 'a {
        move |ordered, after, limit| {
            let rows = self.engine.queue_page(subscription, ordered, after, limit)?;
            self.rows_read.fetch_add(rows.len() as u64, Ordering::Relaxed);
            let mut out = Vec::with_capacity(rows.len());
            for ((due, seq), body) in rows {
                let key = if ordered { (0, seq) } else { (due, seq) };
                let Ok(stored) = serde_json::from_slice::<StoredDelivery>(&body) else {
                    tracing::error!(seq, subscription, "a stored delivery does not parse; it is skipped");
                    out.push((key, None));
                    continue;
                };
                let size = stored.size;
                out.push((
                    key,
                    Some(Queued {
                        delivery: stored.into_pending(seq),
                        size,
                        written: 0,
                    }),
                ));
            }
            Ok(out)
        }
    }

    /// The writes that make `d` a dead letter (`queued`: it was a queued delivery).
    fn bury_ops(
        d: &PendingDelivery,
        size: u64,
        reason: &str,
        at: jiff::Timestamp,
        queued: bool,
    ) -> Result<Vec<Op>, StoreError> {
        let mut stored = StoredDelivery::from(d);
        stored.reason = Some(reason.to_string());
        stored.dead_at = Some(at);
        stored.size = size;
        let mut ops = Vec::with_capacity(3);
        if queued {
            ops.push(Op::Dequeue {
                subscription: d.subscription.clone(),
                seq: d.seq,
                due: nanos(d.not_before),
            });
        }
        ops.push(Op::Bury(d.subscription.clone(), d.seq, nanos(at), json(&stored)?));
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        ops.push(if queued {
            Op::Stats(d.subscription.clone(), -1, -size, 1)
        } else {
            Op::Stats(d.subscription.clone(), 0, 0, 1)
        });
        Ok(ops)
    }

    fn ingest_with(
        &self,
        items: Vec<Ingest>,
        raw: Option<RawMessage>,
        extra: Vec<Op>,
    ) -> Result<Vec<Appended>, StoreError> {
        let now = jiff::Timestamp::now();
        // Producer ids: claimed in memory first (a concurrent duplicate sees the claim), then
        // looked up on disk (a claim is dropped only once its commit is readable).
        let mut out: Vec<Option<Appended>> = Vec::with_capacity(items.len());
        let mut claimed = Vec::new();
        {
            let mut state = self.state.lock();
            for item in &items {
                let Some(pid) = item.event.dedup_key() else {
                    out.push(None);
                    continue;
                };
                if let Some(existing) = state.claiming.get(&pid) {
                    out.push(Some(Appended {
                        id: existing.clone(),
                        duplicate: true,
                    }));
                    continue;
                }
                state.claiming.insert(pid.clone(), item.event.id.clone());
                claimed.push(pid);
                out.push(None);
            }
        }
        let release = |claimed: &[String]| {
            let mut state = self.state.lock();
            for pid in claimed {
                state.claiming.remove(pid);
            }
        };
        let known: HashMap<String, String> = match self
            .engine
            .producers(&claimed.iter().map(String::as_str).collect::<Vec<_>>())
        {
            Ok(rows) => rows.into_iter().collect(),
            Err(err) => {
                release(&claimed);
                // The database may be gone: a write lets the commit thread find out, so
                // readiness and status say so (and it says when it is back).
                self.wait_for(Vec::new(), false)?;
                return Err(err);
            }
        };
        let mut ops = Vec::new();
        let mut archive = false;
        let mut mailboxes = Vec::new();
        let mut queued: Vec<Queued> = Vec::new();
        let mut cached = Vec::new();
        let mut figures: HashMap<String, (i64, i64, i64, u64)> = HashMap::new();
        let prepared = (|| -> Result<(), StoreError> {
            let mut state = self.state.lock();
            for (item, slot) in items.into_iter().zip(out.iter_mut()) {
                // Archived for the events that refer to it, duplicates too (see
                // `DurableStore`'s ingest).
                if item.event.raw_message.is_some() {
                    archive = true;
                    mailboxes.push(item.event.mailbox.clone());
                }
                if slot.is_some() {
                    continue;
                }
                let pid = item.event.dedup_key();
                if let Some(existing) = pid.as_ref().and_then(|p| known.get(p)) {
                    *slot = Some(Appended {
                        id: existing.clone(),
                        duplicate: true,
                    });
                    continue;
                }
                if let Some(pid) = pid {
                    ops.push(Op::PutAgedProducer(pid, item.event.id.clone(), now.as_second()));
                }
                let id = item.event.id.clone();
                *slot = Some(Appended {
                    id: id.clone(),
                    duplicate: false,
                });
                // Every accepted event is logged, stored or not (nobody subscribed).
                let body = json(&item.event)?;
                ops.push(Op::Audit(Box::new(crate::audit::Record::event_leaf(
                    &item.event,
                    &body,
                    now,
                ))));
                if item.deliveries.is_empty() {
                    continue;
                }
                let size = body.len() as u64;
                ops.push(Op::PutCountedEvent(
                    id.clone(),
                    body,
                    u32::try_from(item.deliveries.len()).unwrap_or(u32::MAX),
                ));
                for mut d in item.deliveries {
                    d.seq = state.next_seq;
                    state.next_seq += 1;
                    state.incoming.insert(d.seq);
                    let sub = d.subscription.clone();
                    let pending = figures.entry(sub.clone()).or_default();
                    let current = state.figures.get(&sub).copied().unwrap_or_default();
                    let counts = QueueCounts {
                        backlog: current.queued.saturating_add_signed(pending.0),
                        bytes: current.bytes.saturating_add_signed(pending.1),
                        ..QueueCounts::default()
                    };
                    let full = state.caps.get(&sub).and_then(|cap| cap.full(&counts));
                    let size_i = i64::try_from(size).unwrap_or(i64::MAX);
                    if let Some(reason) = full {
                        ops.extend(Self::bury_ops(&d, size, &reason, now, false)?);
                        pending.2 += 1;
                        pending.3 += 1;
                        continue;
                    }
                    let mut stored = StoredDelivery::from(&d);
                    stored.size = size;
                    ops.push(Op::Enqueue(Box::new(committer::Queued {
                        subscription: sub.clone(),
                        seq: d.seq,
                        due: nanos(d.not_before),
                        old_due: None,
                        body: json(&stored)?,
                    })));
                    ops.push(Op::Stats(sub, 1, size_i, 0));
                    pending.0 += 1;
                    pending.1 += size_i;
                    queued.push(Queued {
                        delivery: d,
                        size,
                        written: 0,
                    });
                }
                cached.push(Arc::new(item.event));
            }
            ops.push(Op::NextSeq(state.next_seq));
            Ok(())
        })();
        let forget_incoming = |queued: &[Queued]| {
            let mut state = self.state.lock();
            for q in queued {
                state.incoming.remove(&q.delivery.seq);
            }
        };
        if let Err(err) = prepared {
            forget_incoming(&queued);
            release(&claimed);
            return Err(err);
        }
        if let Some(raw) = raw.filter(|_| archive) {
            ops.extend(super::hold::archive_ops(raw, now.as_second(), &mailboxes)?);
        }
        ops.extend(extra);
        let committed = self.wait_for(ops, false);
        let mut state = self.state.lock();
        for pid in &claimed {
            state.claiming.remove(pid);
        }
        if let Err(err) = committed {
            for q in &queued {
                state.incoming.remove(&q.delivery.seq);
            }
            return Err(err);
        }
        for (sub, (q, b, d, overflowed)) in figures {
            let f = state.figures.entry(sub).or_default();
            f.queued = f.queued.saturating_add_signed(q);
            f.bytes = f.bytes.saturating_add_signed(b);
            f.dead = f.dead.saturating_add_signed(d);
            f.overflowed += overflowed;
            if f.oldest.is_some_and(|(_, o)| o.is_none()) {
                f.head_changed();
            }
        }
        for event in cached {
            state.cache(event);
        }
        for q in queued {
            state.incoming.remove(&q.delivery.seq);
            if let Some(w) = state.windows.get_mut(&q.delivery.subscription) {
                w.insert(q);
            }
        }
        Ok(out
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| Appended {
                    id: String::new(),
                    duplicate: true,
                })
            })
            .collect())
    }
}

impl EventLog for PagedStore {
    fn ingest_archived(&self, items: Vec<Ingest>, raw: Option<RawMessage>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_with(items, raw, Vec::new())
    }

    fn ingest_with_rows(&self, items: Vec<Ingest>, rows: Vec<RowWrite>) -> Result<Vec<Appended>, StoreError> {
        self.ingest_with(items, None, super::rows::ops(rows)?)
    }

    fn cached_event(&self, id: &str) -> Option<Arc<MailboxEvent>> {
        self.state.lock().cache.get(id).cloned()
    }

    fn event(&self, id: &str) -> Result<Option<Arc<MailboxEvent>>, StoreError> {
        if let Some(e) = self.cached_event(id) {
            return Ok(Some(e));
        }
        match self.engine.event(id)? {
            None => Ok(None),
            Some(bytes) => {
                let event = Arc::new(serde_json::from_slice::<MailboxEvent>(&bytes).map_err(io)?);
                super::durable::schema::indexed(self.engine.as_ref(), std::slice::from_ref(&event));
                self.state.lock().cache(event.clone());
                Ok(Some(event))
            }
        }
    }

    fn events(&self, ids: &[String]) -> Vec<Result<Option<Arc<MailboxEvent>>, StoreError>> {
        super::durable::schema::events_by_id(
            self.engine.as_ref(),
            ids,
            |ids| {
                let state = self.state.lock();
                ids.iter().map(|id| state.cache.get(id).cloned()).collect()
            },
            |read| {
                let mut state = self.state.lock();
                for e in read {
                    state.cache(e.clone());
                }
            },
        )
    }

    fn purge_producer_ids(&self, before: jiff::Timestamp) -> Result<u64, StoreError> {
        let mut n = 0;
        loop {
            let old = self.engine.producers_before(before.as_second(), SWEEP)?;
            if old.is_empty() {
                break;
            }
            let more = old.len() == SWEEP;
            n += old.len() as u64;
            let ops = old.into_iter().map(|(at, p)| Op::DeleteAgedProducer(p, at)).collect();
            self.wait_for(ops, false)?;
            if !more {
                break;
            }
        }
        Ok(n)
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        self.engine.event_count()
    }
}

super::rows::rows_on_engine!(PagedStore);
super::audit::audit_on_engine!(PagedStore);

impl Archive for PagedStore {
    fn raw_message(&self, sha256: &str) -> Result<Option<(jiff::Timestamp, Vec<u8>)>, StoreError> {
        super::durable::raw_message(self.engine.as_ref() as &dyn Engine, sha256)
    }

    fn purge_raw_messages(&self, before: jiff::Timestamp, holds: &dyn Holds) -> Result<Purged, StoreError> {
        let mut purged = Purged::default();
        let old = super::hold::purge_raw_ops(self.engine.as_ref() as &dyn Engine, before, holds, &mut purged.kept)?;
        purged.raw_messages = super::hold::raw_deletes(&old);
        if !old.is_empty() {
            self.wait_for(old, false)?;
        }
        Ok(purged)
    }
}

impl Queue for PagedStore {
    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let committed = self.committed();
        let mut page = self.page(subscription);
        let mut state = self.state.lock();
        let State { windows, incoming, .. } = &mut *state;
        let size = window::size_for(windows.len() + usize::from(!windows.contains_key(subscription)));
        let window = windows.entry(subscription.to_string()).or_default();
        // Never less than one take needs (a batch over the concurrency).
        window.resize(size.max(max.min(window::WINDOW)));
        window.take_due(&mut page, committed, incoming, now, max, ordered)
    }

    fn wants_read(&self, subscription: &str, ordered: bool) -> bool {
        let state = self.state.lock();
        match state.windows.get(subscription) {
            Some(w) => w.wants_read(ordered),
            None => state.figures.get(subscription).is_some_and(|f| f.queued > 0),
        }
    }

    fn read_ahead(&self, subscription: &str, ordered: bool) -> Result<(), StoreError> {
        let committed = self.committed();
        let (planned, forgotten) = {
            let mut state = self.state.lock();
            let State {
                windows,
                figures,
                forgotten,
                ..
            } = &mut *state;
            // Forgotten since the shard asked: no window for it.
            if !windows.contains_key(subscription) && !figures.contains_key(subscription) {
                return Ok(());
            }
            let size = window::size_for(windows.len() + usize::from(!windows.contains_key(subscription)));
            let window = windows.entry(subscription.to_string()).or_insert_with(|| {
                let mut w = Window::default();
                // A new window's size; a take sets it to what the take needs.
                w.resize(size);
                w
            });
            (window.plan(committed, ordered), *forgotten)
        };
        let Some(planned) = planned else { return Ok(()) };
        // The read, without the lock: a cold page of a large file takes milliseconds.
        let rows = (self.page(subscription))(planned.ordered, planned.after, planned.limit)?;
        let mut state = self.state.lock();
        let State {
            windows,
            incoming,
            forgotten: now_forgotten,
            ..
        } = &mut *state;
        if *now_forgotten == forgotten
            && let Some(window) = windows.get_mut(subscription)
        {
            window.apply(planned, rows, incoming);
        }
        Ok(())
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        let state = self.state.lock();
        match state.windows.get(subscription) {
            Some(w) => w.next_due(),
            // Not read yet: something may be due now; the first take reads the head.
            None => state
                .figures
                .get(subscription)
                .filter(|f| f.queued > 0)
                .map(|_| jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn complete(&self, d: &PendingDelivery) -> Result<Durable, StoreError> {
        let mut state = self.state.lock();
        // Not in flight here: its subscription was forgotten meanwhile (its rows and their
        // event references went with it), so there is nothing left to write.
        let Some(size) = state
            .windows
            .get(&d.subscription)
            .and_then(|w| w.in_flight(d.seq))
            .map(|q| q.size)
        else {
            return Ok(Durable::now());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ops = vec![
            Op::Dequeue {
                subscription: d.subscription.clone(),
                seq: d.seq,
                due: nanos(d.not_before),
            },
            Op::ReleaseEvent(d.event_id.clone()),
            Op::Stats(d.subscription.clone(), -1, -i64::try_from(size).unwrap_or(i64::MAX), 0),
        ];
        let generation = self.submit(ops, Reply::Async(tx), true)?;
        if let Some(w) = state.windows.get_mut(&d.subscription) {
            w.finish(d.seq, generation);
        }
        let f = state.figures.entry(d.subscription.clone()).or_default();
        f.queued = f.queued.saturating_sub(1);
        f.bytes = f.bytes.saturating_sub(size);
        f.head_changed();
        Ok(Durable(Some(rx)))
    }

    fn retry(&self, d: PendingDelivery) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        let Some(old) = state
            .windows
            .get(&d.subscription)
            .and_then(|w| w.in_flight(d.seq))
            .cloned()
        else {
            return Ok(());
        };
        let mut stored = StoredDelivery::from(&d);
        stored.size = old.size;
        let op = Op::Enqueue(Box::new(committer::Queued {
            subscription: d.subscription.clone(),
            seq: d.seq,
            due: nanos(d.not_before),
            old_due: Some(nanos(old.delivery.not_before)),
            body: json(&stored)?,
        }));
        let generation = self.submit(vec![op], Reply::None, true)?;
        if let Some(w) = state.windows.get_mut(&d.subscription) {
            w.requeue(d, generation);
        }
        Ok(())
    }

    fn dead_letter(&self, d: PendingDelivery, reason: String) -> Result<(), StoreError> {
        let now = jiff::Timestamp::now();
        let mut state = self.state.lock();
        // Not in flight here: its subscription was forgotten meanwhile; nothing to keep.
        let Some((size, due)) = state
            .windows
            .get(&d.subscription)
            .and_then(|w| w.in_flight(d.seq))
            .map(|q| (q.size, q.delivery.not_before))
        else {
            return Ok(());
        };
        let mut current = d.clone();
        current.not_before = due;
        let mut ops = Self::bury_ops(&current, size, &reason, now, true)?;
        // The stored dead letter keeps the attempts made.
        if let Some(Op::Bury(_, _, _, body)) = ops.get_mut(1) {
            let mut stored = StoredDelivery::from(&d);
            stored.reason = Some(reason.clone());
            stored.dead_at = Some(now);
            stored.size = size;
            *body = json(&stored)?;
        }
        let generation = self.submit(ops, Reply::None, true)?;
        if let Some(w) = state.windows.get_mut(&d.subscription) {
            w.finish(d.seq, generation);
        }
        let f = state.figures.entry(d.subscription.clone()).or_default();
        f.queued = f.queued.saturating_sub(1);
        f.bytes = f.bytes.saturating_sub(size);
        f.dead += 1;
        f.head_changed();
        Ok(())
    }

    fn replay(&self, subscription: &str, since: jiff::Timestamp, now: jiff::Timestamp) -> Result<u64, StoreError> {
        let _sweep = self.sweeps.lock();
        self.settle()?;
        let mut n = 0u64;
        // Page by page, oldest first; each page durable before it shows in memory.
        let mut from = nanos(since);
        loop {
            let rows = self.engine.dead_range(subscription, from, u64::MAX, false, 1_000)?;
            let Some(&(last_at, _, _)) = rows.last() else { break };
            let more = rows.len() == 1_000;
            let mut ops = Vec::with_capacity(rows.len() * 3);
            let mut replayed = Vec::with_capacity(rows.len());
            let mut bytes = 0i64;
            {
                let mut state = self.state.lock();
                for (at, seq, body) in rows {
                    let Ok(mut stored) = serde_json::from_slice::<StoredDelivery>(&body) else {
                        continue;
                    };
                    ops.push(Op::Unbury(subscription.to_string(), seq, at));
                    stored.attempts = 0;
                    stored.not_before = now;
                    // The event's age starts again: replaying is a decision to deliver it.
                    stored.accepted_at = now;
                    stored.reason = None;
                    stored.dead_at = None;
                    let new_seq = state.next_seq;
                    state.next_seq += 1;
                    state.incoming.insert(new_seq);
                    bytes += i64::try_from(stored.size).unwrap_or(0);
                    ops.push(Op::Enqueue(Box::new(committer::Queued {
                        subscription: subscription.to_string(),
                        seq: new_seq,
                        due: nanos(now),
                        old_due: None,
                        body: json(&stored)?,
                    })));
                    let size = stored.size;
                    replayed.push(Queued {
                        delivery: stored.into_pending(new_seq),
                        size,
                        written: 0,
                    });
                }
                ops.push(Op::NextSeq(state.next_seq));
            }
            let count = replayed.len() as i64;
            ops.push(Op::Stats(subscription.to_string(), count, bytes, -count));
            let written = self.wait_for(ops, false);
            let mut state = self.state.lock();
            for q in &replayed {
                state.incoming.remove(&q.delivery.seq);
            }
            written?;
            let f = state.figures.entry(subscription.to_string()).or_default();
            f.queued += count as u64;
            f.bytes = f.bytes.saturating_add_signed(bytes);
            f.dead = f.dead.saturating_sub(count as u64);
            f.head_changed();
            if let Some(w) = state.windows.get_mut(subscription) {
                for q in replayed {
                    w.insert(q);
                }
            }
            n += count as u64;
            if !more {
                break;
            }
            from = last_at;
        }
        Ok(n)
    }

    fn expire(
        &self,
        subscription: &str,
        accepted_before: jiff::Timestamp,
        reason: &str,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let _sweep = self.sweeps.lock();
        let now = jiff::Timestamp::now();
        let mut expired = Vec::new();
        let mut after = None;
        // The first page is small: usually the head is young and nothing expires, and this
        // read holds the lock.
        let mut limit = 16;
        // In the order of acceptance from the head, a page at a time under the lock (so no
        // completion or retry slips between the read and the write), until one is young
        // enough.
        while expired.len() < SWEEP {
            let mut state = self.state.lock();
            let committed = self.committed();
            let rows = self.engine.queue_page(subscription, true, after, limit)?;
            let full = rows.len() == limit;
            limit = 1_000;
            let State { windows, figures, .. } = &mut *state;
            let window = windows.entry(subscription.to_string()).or_default();
            let mut ops = Vec::new();
            let mut page = Vec::new();
            let mut bytes = 0u64;
            let mut young = false;
            for (key, body) in rows {
                after = Some(key);
                let Ok(stored) = serde_json::from_slice::<StoredDelivery>(&body) else {
                    continue;
                };
                if stored.accepted_at >= accepted_before {
                    young = true;
                    break;
                }
                let seq = key.1;
                if window.busy(seq, committed) {
                    continue;
                }
                // Memory's copy is the newest (a retry committed since the read is in it).
                let size = stored.size;
                let d = match window.waiting(seq) {
                    Some(q) => q.delivery.clone(),
                    None => stored.into_pending(seq),
                };
                ops.extend(Self::bury_ops(&d, size, reason, now, true)?);
                bytes += size;
                page.push(d);
            }
            if !page.is_empty() {
                let generation = self.submit(ops, Reply::None, true)?;
                let seqs: HashSet<u64> = page.iter().map(|d| d.seq).collect();
                window.remove_waiting(&seqs, generation);
                let f = figures.entry(subscription.to_string()).or_default();
                f.queued = f.queued.saturating_sub(page.len() as u64);
                f.bytes = f.bytes.saturating_sub(bytes);
                f.dead += page.len() as u64;
                f.head_changed();
                expired.extend(page);
            }
            if young || !full {
                break;
            }
        }
        Ok(expired)
    }

    fn counts(&self, subscription: &str) -> QueueCounts {
        let (in_flight, figures) = {
            let state = self.state.lock();
            let in_flight = state
                .windows
                .get(subscription)
                .map_or(0, |w| w.in_flight_count() as u64);
            (in_flight, state.figures.get(subscription).copied())
        };
        let Some(f) = figures else {
            return QueueCounts {
                in_flight,
                ..QueueCounts::default()
            };
        };
        let oldest = match f.oldest {
            Some((at, oldest)) if at.elapsed() < OLDEST_TTL => oldest,
            _ if f.queued == 0 => None,
            _ => {
                // Read without the lock (the status writer asks for every subscription; a
                // cold head takes a disk read each).
                let oldest = self
                    .engine
                    .queue_head(subscription)
                    .ok()
                    .flatten()
                    .and_then(|body| serde_json::from_slice::<StoredDelivery>(&body).ok())
                    .map(|s| s.accepted_at);
                if let Some(now) = self.state.lock().figures.get_mut(subscription)
                    && now.oldest_version == f.oldest_version
                {
                    now.oldest = Some((std::time::Instant::now(), oldest));
                }
                oldest
            }
        };
        QueueCounts {
            backlog: f.queued,
            in_flight,
            dead_lettered: f.dead,
            bytes: f.bytes,
            oldest_accepted: oldest,
            overflowed: f.overflowed,
        }
    }

    fn limit_backlog(&self, subscription: &str, cap: Option<BacklogCap>) {
        let mut state = self.state.lock();
        match cap {
            Some(cap) => state.caps.insert(subscription.to_string(), cap),
            None => state.caps.remove(subscription),
        };
    }

    fn total_backlog(&self) -> u64 {
        self.state.lock().figures.values().map(|f| f.queued).sum()
    }

    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        self.settle()?;
        let logged = self.engine.attempt_subscriptions()?;
        let state = self.state.lock();
        let mut all: Vec<&str> = state
            .figures
            .iter()
            .filter(|(_, f)| f.queued > 0 || f.dead > 0)
            .map(|(s, _)| s.as_str())
            .chain(logged.iter().map(String::as_str))
            .chain(state.namespaces.keys().map(String::as_str))
            .collect();
        all.sort_unstable();
        all.dedup();
        Ok(all
            .into_iter()
            .map(|uid| (uid.to_string(), state.namespaces.get(uid).cloned()))
            .collect())
    }

    fn note_subscription(&self, uid: &str, namespace: &str) -> Result<(), StoreError> {
        let mut state = self.state.lock();
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

    fn forget_subscription(&self, subscription: &str) -> Result<(), StoreError> {
        {
            let mut state = self.state.lock();
            state.windows.remove(subscription);
            state.forgotten += 1;
            state.figures.remove(subscription);
            state.namespaces.remove(subscription);
            state.caps.remove(subscription);
        }
        self.wait_for(
            vec![
                Op::ForgetQueue(subscription.to_string()),
                Op::DeleteAttemptsOf(subscription.to_string()),
                Op::DeleteSubscription(subscription.to_string()),
            ],
            true,
        )
    }

    fn queue_rows_read(&self) -> Option<u64> {
        Some(self.rows_read())
    }
}

impl History for PagedStore {
    fn record_attempt(&self, attempt: Attempt) -> Result<(), StoreError> {
        let bytes = json(&attempt)?;
        let key = self.state.lock().attempt_key(attempt.at);
        let leaf = Box::new(attempt.audit_record().to_leaf());
        self.submit(
            vec![Op::PutAttempt(attempt.subscription, key, bytes), Op::Audit(leaf)],
            Reply::None,
            true,
        )?;
        Ok(())
    }

    fn attempts(&self, subscription: &str, since: jiff::Timestamp, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        self.settle()?;
        super::durable::schema::read_attempts(self.engine.as_ref(), subscription, since, limit)
    }

    fn dead_letters(
        &self,
        subscription: &str,
        since: jiff::Timestamp,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.settle()?;
        let rows = self
            .engine
            .dead_range(subscription, nanos(since), u64::MAX, true, limit)?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, _, body)| serde_json::from_slice::<StoredDelivery>(&body).ok())
            .map(StoredDelivery::into_dead_letter)
            .collect())
    }

    fn purge(&self, subscription: &str, retention: Retention, holds: &dyn Holds) -> Result<Purged, StoreError> {
        let _sweep = self.sweeps.lock();
        // Reads below see every write queued before (a dead letter just made).
        self.settle()?;
        let mut ops = Vec::new();
        let mut purged = Purged::default();
        let engine = self.engine.as_ref() as &dyn Engine;
        let expired = self
            .engine
            .attempts_before(subscription, nanos(retention.attempts_before))?;
        let logged = self.engine.attempts_before(subscription, u64::MAX)?;
        let over = logged.saturating_sub(expired).saturating_sub(retention.max_attempts);
        let n = (expired + over).min(logged);
        if n > 0 {
            let (trim, deleted) = super::hold::trim_attempts(engine, subscription, n, holds, &mut purged.kept)?;
            purged.attempts = deleted;
            if deleted > 0 {
                ops.push(trim);
            }
        }
        // Dead letters a hold keeps stay, with their events; a sweep reads on past them
        // (a page of held ones must not stop the purge of those after it).
        let before = nanos(retention.dead_letters_before);
        let mut from = 0u64;
        let mut seen: HashSet<u64> = HashSet::new();
        loop {
            let page = self.engine.dead_range(subscription, from, before, false, SWEEP)?;
            let full = page.len() == SWEEP;
            let last_at = page.last().map(|(at, _, _)| *at);
            let page: Vec<(u64, u64, Option<StoredDelivery>)> = page
                .into_iter()
                .filter(|(_, seq, _)| seen.insert(*seq))
                .map(|(at, seq, body)| (at, seq, serde_json::from_slice::<StoredDelivery>(&body).ok()))
                .collect();
            let ids: Vec<String> = if holds.any() {
                page.iter()
                    .filter_map(|(_, _, d)| d.as_ref().map(|d| d.event_id.clone()))
                    .collect()
            } else {
                Vec::new()
            };
            let held = super::hold::held_events(engine, &ids, holds, &mut purged.kept)?;
            let mut kept_here = 0;
            for (at, seq, stored) in page {
                if stored.as_ref().is_some_and(|d| held.contains(&d.event_id)) {
                    kept_here += 1;
                    continue;
                }
                ops.push(Op::Unbury(subscription.to_string(), seq, at));
                if let Some(stored) = stored {
                    ops.push(Op::ReleaseEvent(stored.event_id));
                }
                purged.dead_letters += 1;
            }
            // Another page only past a full one that holds kept from the purge, and while
            // the sweep's budget lasts.
            match last_at {
                Some(at) if full && kept_here > 0 && at != from && purged.dead_letters < SWEEP as u64 => from = at,
                _ => break,
            }
        }
        if purged.dead_letters > 0 {
            let n = i64::try_from(purged.dead_letters).unwrap_or(i64::MAX);
            ops.push(Op::Stats(subscription.to_string(), 0, 0, -n));
        }
        if !ops.is_empty() {
            self.wait_for(ops, false)?;
            let mut state = self.state.lock();
            let f = state.figures.entry(subscription.to_string()).or_default();
            f.dead = f.dead.saturating_sub(purged.dead_letters);
        }
        Ok(purged)
    }
}

impl Backend for PagedStore {
    fn flush(&self) -> Result<(), StoreError> {
        self.wait_for(Vec::new(), false)
    }

    fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        self.engine.secret(name)
    }

    fn commit_failures(&self) -> u64 {
        self.commit_failures.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Events `e{i}` for each i, each with one delivery to `sub`.
    pub(super) fn one_delivery_each(ids: std::ops::Range<u64>) -> Vec<Ingest> {
        ids.map(|i| {
            let id = format!("e{i}");
            Ingest {
                event: conformance::event(&id, Some(&id)),
                deliveries: vec![conformance::pending(&id, None, 0)],
            }
        })
        .collect()
    }
    use crate::store::conformance;

    #[test]
    fn conforms_in_memory() {
        conformance::run(&|| Box::new(PagedStore::in_memory().expect("in memory")));
    }

    #[test]
    fn conforms_on_disk() {
        let dirs: Mutex<Vec<std::path::PathBuf>> = Mutex::default();
        conformance::run(&|| {
            let dir = std::env::temp_dir().join(format!("mailhook-paged-test-{}", uuid::Uuid::now_v7().simple()));
            dirs.lock().push(dir.clone());
            Box::new(PagedStore::open(&dir).expect("open"))
        });
        for d in dirs.into_inner() {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn events_not_in_memory_are_read_in_one_go() {
        let dir = std::env::temp_dir().join(format!("mailhook-paged-test-{}", uuid::Uuid::now_v7().simple()));
        {
            let s = PagedStore::open(&dir).expect("open");
            s.ingest(one_delivery_each(0..3)).expect("ingest");
        }
        let s = PagedStore::open(&dir).expect("reopen");
        assert!(s.cached_event("e1").is_none(), "a fresh start holds no event");
        let ids: Vec<String> = ["e2", "nope", "e0"].iter().map(|i| i.to_string()).collect();
        let read: Vec<Option<String>> = s
            .events(&ids)
            .into_iter()
            .map(|e| e.expect("read").map(|e| e.id.clone()))
            .collect();
        assert_eq!(read, [Some("e2".to_string()), None, Some("e0".to_string())]);
        assert!(s.cached_event("e2").is_some(), "kept for the next request");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn heads_read_ahead_while_ingest_takes_and_retries_run_hand_out_each_delivery_once() {
        let dir = std::env::temp_dir().join(format!("mailhook-paged-test-{}", uuid::Uuid::now_v7().simple()));
        let s = Arc::new(PagedStore::open(&dir).expect("open"));
        let n = 6_000u64;
        s.ingest(one_delivery_each(0..2_000)).expect("ingest");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if s.wants_read("sub", false) {
                        s.read_ahead("sub", false).expect("read ahead");
                    }
                    std::thread::yield_now();
                }
            })
        };
        let ingest = {
            let s = s.clone();
            std::thread::spawn(move || {
                for chunk in one_delivery_each(2_000..n).chunks(100) {
                    s.ingest(chunk.to_vec()).expect("ingest");
                }
            })
        };
        let mut seen: HashSet<String> = HashSet::new();
        let mut retried: HashSet<String> = HashSet::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while (seen.len() as u64) < n && std::time::Instant::now() < deadline {
            for mut d in s.take_due("sub", jiff::Timestamp::now(), 64, false).expect("take") {
                // Every tenth is retried once, at once: it moves within the queue.
                if d.seq % 10 == 0 && retried.insert(d.event_id.clone()) {
                    d.attempts += 1;
                    s.retry(d).expect("retry");
                    continue;
                }
                assert!(seen.insert(d.event_id.clone()), "{} handed out twice", d.event_id);
                drop(s.complete(&d).expect("complete"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        ingest.join().expect("ingest thread");
        reader.join().expect("reader thread");
        assert_eq!(seen.len() as u64, n, "every delivery, once");
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_restart_reads_queue_heads_only_and_delivers_everything_once() {
        let dir = std::env::temp_dir().join(format!("mailhook-paged-test-{}", uuid::Uuid::now_v7().simple()));
        let n = 20_000u64;
        {
            let s = PagedStore::open(&dir).expect("open");
            let items = one_delivery_each(0..n);
            for chunk in items.chunks(1_000) {
                s.ingest(chunk.to_vec()).expect("ingest");
            }
            assert_eq!(s.counts("sub").backlog, n);
            // Killed with one page in flight.
            let taken = s.take_due("sub", jiff::Timestamp::now(), 100, false).expect("take");
            assert_eq!(taken.len(), 100);
        }
        let s = PagedStore::open(&dir).expect("reopen");
        assert_eq!(
            s.counts("sub").backlog,
            n,
            "the figures survive without reading the queue"
        );
        assert_eq!(s.rows_read(), 0, "nothing of the queue is read before a take");
        let first = s.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
        assert_eq!(s.rows_read(), window::WINDOW as u64, "a window, not the backlog");
        let mut seen: HashSet<String> = first.iter().map(|d| d.event_id.clone()).collect();
        for d in &first {
            drop(s.complete(d).expect("complete"));
        }
        loop {
            let taken = s.take_due("sub", jiff::Timestamp::now(), 500, false).expect("take");
            if taken.is_empty() {
                break;
            }
            for d in taken {
                assert!(seen.insert(d.event_id.clone()), "{} twice", d.event_id);
                drop(s.complete(&d).expect("complete"));
            }
        }
        assert_eq!(seen.len() as u64, n);
        s.flush().expect("flush");
        assert_eq!(s.counts("sub").backlog, 0);
        assert_eq!(
            s.event_count().expect("count"),
            0,
            "every event left with its last delivery"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_store_an_older_release_left_is_moved_into_the_paged_tables_once() {
        let dir = std::env::temp_dir().join(format!("mailhook-paged-test-{}", uuid::Uuid::now_v7().simple()));
        {
            let legacy = crate::store::DurableStore::open(&dir).expect("open");
            let items: Vec<Ingest> = (0..300)
                .map(|i| {
                    let id = format!("e{i}");
                    Ingest {
                        event: conformance::event(&id, Some(&id)),
                        deliveries: vec![conformance::pending(&id, Some("k"), 0)],
                    }
                })
                .collect();
            legacy.ingest(items).expect("ingest");
            let mut dead = legacy.take_due("sub", jiff::Timestamp::now(), 1, true).expect("take");
            legacy.dead_letter(dead.remove(0), "gave up".into()).expect("dead");
            legacy.flush().expect("flush");
        }
        let s = PagedStore::open(&dir).expect("open paged");
        let c = s.counts("sub");
        assert_eq!((c.backlog, c.dead_lettered), (299, 1));
        // Ordered: one at a time, in acceptance order.
        let mut order = vec![];
        loop {
            let taken = s.take_due("sub", jiff::Timestamp::now(), 10, true).expect("take");
            if taken.is_empty() {
                break;
            }
            assert_eq!(taken.len(), 1, "a busy key holds the rest back");
            for d in taken {
                order.push(d.seq);
                drop(s.complete(&d).expect("complete"));
            }
        }
        assert_eq!(order.len(), 299);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "in order");
        let dup = s
            .ingest(vec![Ingest {
                event: conformance::event("x", Some("e5")),
                deliveries: vec![],
            }])
            .expect("ingest");
        assert!(dup[0].duplicate, "producer ids carried over");
        assert_eq!(
            s.dead_letters("sub", jiff::Timestamp::UNIX_EPOCH, 10)
                .expect("dead")
                .len(),
            1
        );
        drop(s);
        let again = PagedStore::open(&dir).expect("reopen");
        assert_eq!(again.counts("sub").dead_lettered, 1, "moved once");
        drop(again);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_subscription_at_its_cap_dead_letters_its_new_deliveries_and_only_its_own() {
        let s = PagedStore::in_memory().expect("store");
        s.limit_backlog(
            "sub",
            Some(BacklogCap {
                events: Some(2),
                bytes: None,
            }),
        );
        for i in 0..5 {
            let id = format!("e{i}");
            let mut other = conformance::pending(&id, None, 0);
            other.subscription = "other".into();
            s.ingest(vec![Ingest {
                event: conformance::event(&id, None),
                deliveries: vec![conformance::pending(&id, None, 0), other],
            }])
            .expect("ingest");
        }
        let capped = s.counts("sub");
        assert_eq!((capped.backlog, capped.dead_lettered, capped.overflowed), (2, 3, 3));
        assert_eq!(s.counts("other").backlog, 5, "the other subscription gets all");
        let dead = s.dead_letters("sub", jiff::Timestamp::UNIX_EPOCH, 10).expect("dead");
        assert!(dead[0].reason.contains("delivery.maxBacklog"), "{}", dead[0].reason);
    }

    #[test]
    fn a_delivery_finished_after_its_subscription_was_forgotten_writes_nothing() {
        let s = PagedStore::in_memory().expect("store");
        let mut other = conformance::pending("e1", None, 0);
        other.subscription = "other".into();
        s.ingest(vec![Ingest {
            event: conformance::event("e1", None),
            deliveries: vec![conformance::pending("e1", None, 0), other],
        }])
        .expect("ingest");
        s.ingest(vec![Ingest {
            event: conformance::event("e2", None),
            deliveries: vec![conformance::pending("e2", None, 0)],
        }])
        .expect("ingest");
        let taken = s.take_due("sub", jiff::Timestamp::now(), 10, false).expect("take");
        assert_eq!(taken.len(), 2);
        s.forget_subscription("sub").expect("forget");
        drop(s.complete(&taken[0]).expect("complete"));
        s.dead_letter(taken[1].clone(), "gave up".into()).expect("dead letter");
        s.flush().expect("flush");
        assert_eq!(s.counts("other").backlog, 1);
        assert_eq!(
            s.event_count().expect("count"),
            1,
            "the other subscription's event stays"
        );
        assert!(
            s.dead_letters("sub", jiff::Timestamp::UNIX_EPOCH, 10)
                .expect("dead")
                .is_empty()
        );
        assert!(
            s.subscriptions()
                .expect("subscriptions")
                .iter()
                .all(|(uid, _)| uid != "sub"),
            "nothing brings the forgotten subscription back"
        );
    }

    #[test]
    fn two_replays_at_once_queue_each_dead_letter_once() {
        let s = Arc::new(PagedStore::in_memory().expect("store"));
        let items: Vec<Ingest> = (0..2_000)
            .map(|i| {
                let id = format!("e{i}");
                Ingest {
                    event: conformance::event(&id, None),
                    deliveries: vec![conformance::pending(&id, None, 0)],
                }
            })
            .collect();
        s.ingest(items).expect("ingest");
        loop {
            let taken = s.take_due("sub", jiff::Timestamp::now(), 500, false).expect("take");
            if taken.is_empty() {
                break;
            }
            for d in taken {
                s.dead_letter(d, "gave up".into()).expect("dead letter");
            }
        }
        s.flush().expect("flush");
        let now = jiff::Timestamp::now();
        let (a, b) = (s.clone(), s.clone());
        let one = std::thread::spawn(move || a.replay("sub", jiff::Timestamp::UNIX_EPOCH, now).expect("replay"));
        let two = std::thread::spawn(move || b.replay("sub", jiff::Timestamp::UNIX_EPOCH, now).expect("replay"));
        let n = one.join().expect("thread") + two.join().expect("thread");
        assert_eq!(n, 2_000);
        let c = s.counts("sub");
        assert_eq!((c.backlog, c.dead_lettered), (2_000, 0));
        let mut delivered = 0;
        loop {
            let taken = s.take_due("sub", jiff::Timestamp::now(), 500, false).expect("take");
            if taken.is_empty() {
                break;
            }
            for d in taken {
                assert!(
                    s.event(&d.event_id).expect("read").is_some(),
                    "{} lost its event",
                    d.event_id
                );
                drop(s.complete(&d).expect("complete"));
                delivered += 1;
            }
        }
        assert_eq!(delivered, 2_000);
        s.flush().expect("flush");
        assert_eq!(s.event_count().expect("count"), 0);
    }
}

#[cfg(test)]
mod open_cost {
    use super::*;

    #[test]
    #[ignore]
    fn redb_open_after_an_unclean_stop() {
        let n: u64 = std::env::var("OPEN_COST_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        if let Ok(dir) = std::env::var("OPEN_COST_CHILD") {
            let s = PagedStore::open(std::path::Path::new(&dir)).expect("open");
            for start in (0..n).step_by(2_000) {
                s.ingest(super::tests::one_delivery_each(start..(start + 2_000).min(n)))
                    .expect("ingest");
            }
            s.flush().expect("flush");
            // As a SIGKILL leaves it: no clean close.
            std::process::abort();
        }
        let dir = std::env::temp_dir().join(format!("mailhook-open-cost-{}", uuid::Uuid::now_v7().simple()));
        let status = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--ignored",
                "--exact",
                "store::paged::open_cost::redb_open_after_an_unclean_stop",
            ])
            .env("OPEN_COST_CHILD", &dir)
            .status()
            .expect("child");
        assert!(!status.success(), "the child aborts");
        let size = std::fs::metadata(dir.join("mailhook.redb"))
            .map(|m| m.len())
            .unwrap_or(0);
        let started = std::time::Instant::now();
        let s = PagedStore::open(&dir).expect("reopen");
        let unclean = started.elapsed();
        assert_eq!(s.counts("sub").backlog, n);
        drop(s);
        let started = std::time::Instant::now();
        let s = PagedStore::open(&dir).expect("reopen");
        let clean = started.elapsed();
        drop(s);
        eprintln!(
            "{n} events, file {} MiB: open after an unclean stop {unclean:?}, after a clean one {clean:?}",
            size >> 20
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
